//! A command in flight survives the loss of its session and runs exactly once.
//!
//! The agent's named action appends a line to a file and sleeps 3 s. While it runs, the
//! session is broken (leader kill -9, or the agent's links cut by the fault layer); the
//! new session re-sends the command with the same idempotency key, and the agent must
//! answer with the result of the run it already has instead of running it again.

use std::time::Duration;

use anyhow::{Result, bail};
use dr_tests::harness::cluster::{AgentSpec, agent_name, cli, get_str};
use dr_tests::{LinkMode, TestCluster, wait_until};
use tracing::info;

const ACTION: &str = "append-slow";
const RUNS_FILE: &str = "h1-runs.txt";

fn agent() -> AgentSpec {
    AgentSpec::new("h1").region("shanghai").action(
        ACTION,
        [
            "sh",
            "-c",
            &format!("echo run >> {{dir}}/{RUNS_FILE}; sleep 3"),
        ],
    )
}

fn runs(cluster: &TestCluster) -> usize {
    std::fs::read_to_string(cluster.dir().join(RUNS_FILE))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

async fn wait_running(cluster: &TestCluster) -> Result<()> {
    wait_until(
        "the action has started on h1",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            let n = runs(cluster);
            async move { Ok((n >= 1).then_some(())) }
        },
    )
    .await
}

/// Waits until the exec command on h1 is reported done, and returns its state.
async fn wait_done(cluster: &TestCluster) -> Result<String> {
    wait_until(
        "the exec command on h1 is done",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || async {
            let cmds = cluster.commands("h1").await?;
            let states: Vec<&str> = cmds.iter().filter_map(|c| get_str(c, "state")).collect();
            match states.as_slice() {
                ["done"] => Ok(Some("done".to_owned())),
                [s] if *s == "failed" || *s == "expired" || *s == "cancelled" => {
                    bail!("the command ended {s}: {cmds:?}")
                }
                _ => bail!("commands on h1: {states:?}"),
            }
        },
    )
    .await
}

/// After the result: a later command on h1 completes (the agent went through its queue
/// after reconnecting), and the file still holds exactly one run.
async fn assert_ran_once(cluster: &TestCluster) -> Result<()> {
    assert_eq!(runs(cluster), 1, "the action ran {} times", runs(cluster));
    wait_until(
        "a later drctl run checks on h1 succeeds",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let out = cluster.drctl(cli::run_checks("h1")).await?;
            if out.status.success() {
                Ok(Some(()))
            } else {
                bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
            }
        },
    )
    .await?;
    assert_eq!(runs(cluster), 1, "the action ran {} times", runs(cluster));
    Ok(())
}

#[tokio::test]
async fn command_in_flight_survives_leader_kill9_and_runs_once() -> Result<()> {
    let mut cluster = TestCluster::builder()
        .coordinators(3)
        .agent(agent())
        .start()
        .await?;

    let _run = {
        info!("--- drctl run --host h1 exec {ACTION}");
        let run = cluster.spawn_drctl("drctl-run", cli::run_exec("h1", ACTION))?;
        wait_running(&cluster).await?;
        run
    };
    let old = {
        info!("--- kill -9 the leader while the action runs");
        let old = cluster.leader_id().await?;
        cluster.kill9(old)?;
        old
    };
    {
        info!("--- new leader; the command is reported done; it ran exactly once");
        cluster.wait_for_leader(Some(old)).await?;
        cluster.wait_agents_connected(&["h1".to_owned()]).await?;
        wait_done(&cluster).await?;
        assert_ran_once(&cluster).await?;
    }
    cluster.restart(old)?;
    cluster.shutdown().await
}

#[tokio::test]
async fn command_in_flight_survives_agent_link_cut_and_runs_once() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(agent())
        .start()
        .await?;

    let _run = {
        info!("--- drctl run --host h1 exec {ACTION}");
        let run = cluster.spawn_drctl("drctl-run", cli::run_exec("h1", ACTION))?;
        wait_running(&cluster).await?;
        run
    };
    {
        info!("--- cut the agent's links to every coordinator while the action runs");
        cluster.net.isolate(&agent_name("h1"), LinkMode::Cut);
        wait_until(
            "the leader sees h1 disconnected",
            Duration::from_secs(60),
            Duration::from_millis(300),
            || async {
                let agents = cluster.agents_at_leader().await?;
                let connected = agents.iter().any(|a| {
                    get_str(a, "host_id") == Some("h1")
                        && dr_tests::harness::cluster::is_connected(a)
                });
                Ok((!connected).then_some(()))
            },
        )
        .await?;
    }
    {
        info!("--- heal: the agent reconnects, the command is done, it ran exactly once");
        cluster.net.heal();
        cluster.wait_agents_connected(&["h1".to_owned()]).await?;
        wait_done(&cluster).await?;
        assert_ran_once(&cluster).await?;
    }
    cluster.shutdown().await
}
