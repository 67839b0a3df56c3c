//! Issue 2, defect 3: SIGTERM to a leader with agents connected (and a RunAction stream
//! open) used to wait out the 10 s grace of "stop accepting rpcs", because the sessions
//! and streams kept the gRPC server busy, and it logged ERROR lines on the way out. A
//! clean shutdown closes sessions (with a Redirect) and streams first, exits 0 quickly,
//! and logs no ERROR or WARN line.

use std::time::{Duration, Instant};

use anyhow::Result;
use dr_tests::TestCluster;
use dr_tests::harness::cluster::cli;
use tracing::info;

#[tokio::test]
async fn sigterm_to_the_leader_with_agents_connected_is_quick_and_quiet() -> Result<()> {
    let mut cluster = TestCluster::builder()
        .coordinators(3)
        .agents(["h1", "h2"])
        .start()
        .await?;
    let leader = cluster.leader_id().await?;
    let log_start = cluster
        .coord_guard(leader)
        .map(|g| g.log().len())
        .unwrap_or_default();

    {
        info!("--- a waiting RunAction stream is open at the leader");
        let drctl = cluster.drctl_config_at(leader);
        let bins = dr_tests::harness::bins::Bins::locate()?;
        // A waiting `drctl run` keeps a RunAction stream open at the leader.
        let mut run = tokio::process::Command::new(&bins.drctl)
            .arg("--config")
            .arg(&drctl)
            .args(cli::run_checks("h1"))
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        tokio::time::sleep(Duration::from_millis(300)).await;

        info!("--- SIGTERM the leader");
        let guard = cluster.coord_guard(leader).expect("leader is running");
        let t = Instant::now();
        let status = guard.stop().await?;
        let took = t.elapsed();
        info!(?took, ?status, "leader stopped");
        let log = guard.log();
        let tail = &log[log_start.min(log.len())..];
        assert!(status.success(), "exit status {status:?}: {tail}");
        // Well under a second on an idle machine; allow for a loaded CI box.
        assert!(
            took < Duration::from_secs(3),
            "shutdown took {took:?}: {tail}"
        );
        let noisy: Vec<&str> = tail
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .collect();
        assert!(noisy.is_empty(), "clean shutdown logged: {noisy:#?}");
        run.kill().await.ok();
    }

    {
        info!("--- the others elect a leader and the agents follow it");
        let rest: Vec<u64> = cluster
            .coord_ids()
            .into_iter()
            .filter(|i| *i != leader)
            .collect();
        let new = cluster.wait_for_leader_among(&rest, Some(leader)).await?;
        info!(new, "new leader");
    }
    cluster.shutdown().await
}
