//! The coordinator leader killed with SIGKILL at each step of a failover plan (issue 5,
//! acceptance 4): a planned switchover of the real PostgreSQL pair, and for every step of
//! its plan, the moment the operation shows that step started, the current leader is
//! killed and restarted once a new leader exists. The plan must still complete exactly
//! once: every agent command of the plan started once on its agent (the agents' logs of
//! their exactly-once executor), one attempt per step, one promotion (shanghai on timeline
//! 2), the epoch raised once, and no acknowledged write lost.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use dr_tests::wait_until;
use serde_json::Value;
use tracing::info;

use super::t30_region_cut::{Fixture, Topo, Writer};

#[tokio::test]
async fn leader_killed_at_every_step_plan_completes_once() -> Result<()> {
    let mut fx = Fixture::start(
        "t50",
        Topo {
            automatic: false,
            // Elections after each kill must not outlast the primaries' leases: the test is
            // about the plan, not about a self-fence racing the switchover. A switchover
            // never waits for the lease, so a long one costs nothing; 15 s was once not
            // enough on a loaded machine (an election took 14 s, shanghai fenced itself).
            lease: "60s".into(),
            ..Topo::default()
        },
    )
    .await?;
    let r = scenario(&mut fx).await;
    fx.finish(r).await
}

async fn operation(fx: &Fixture, id: u64) -> Result<Value> {
    let ops = fx.operations().await?;
    ops.into_iter()
        .find(|o| o["id"].as_u64() == Some(id) || o["id"].as_str() == Some(id.to_string().as_str()))
        .with_context(|| format!("operation {id} not listed"))
}

async fn scenario(fx: &mut Fixture) -> Result<()> {
    let w = Writer::start(&fx.bj, &fx.sh, Duration::from_millis(100));
    w.wait_acks_on(fx.bj.port, 10, "writes acknowledged by beijing")
        .await?;

    info!("--- start the switchover (no --wait)");
    let v = fx
        .cluster
        .drctl_json(["failover", "--to", "shanghai"])
        .await?;
    let id = v["id"]
        .as_u64()
        .or_else(|| v["id"].as_str().and_then(|s| s.parse().ok()))
        .with_context(|| format!("no operation id in {v}"))?;
    let op = operation(fx, id).await?;
    let names: Vec<String> = op["steps"]
        .as_array()
        .context("steps")?
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect();
    // Compensation steps run only when the plan aborts.
    let main: Vec<String> = names
        .iter()
        .take_while(|n| !n.starts_with("restart_") && *n != "maintenance_off_after_abort")
        .cloned()
        .collect();
    info!(?main, "steps to kill the leader at");

    let mut kills: Vec<(String, String)> = Vec::new();
    let mut leader = fx.cluster.leader_id().await?;
    for (i, name) in main.iter().enumerate() {
        // Watch the step at the leader itself (fast, and its applied state is current).
        let seen = wait_until(
            &format!("step {name} started"),
            Duration::from_secs(120),
            Duration::from_millis(30),
            || async {
                let v = fx
                    .cluster
                    .drctl_json_at(leader, ["operations", "show", &id.to_string()])
                    .await?;
                let op = if v.get("steps").is_some() {
                    v
                } else {
                    v.get("operation").cloned().unwrap_or(v)
                };
                if op["state"] != "running" {
                    return Ok(Some(("finished".to_owned(), op["state"].to_string())));
                }
                let st = op["steps"][i]["state"].as_str().unwrap_or("").to_owned();
                Ok((!st.is_empty() && st != "pending").then(|| ("step".to_owned(), st)))
            },
        )
        .await?;
        if seen.0 == "finished" {
            info!(step = %name, state = %seen.1, "the plan finished before this step's kill");
            break;
        }
        let st = fx.cluster.cluster_status_at(leader).await?;
        if dr_tests::harness::cluster::get_u64(&st, "leader_id") != Some(leader) {
            leader = fx.cluster.leader_id().await?;
        }
        info!(step = %name, step_state = %seen.1, leader, "--- kill -9 the leader");
        fx.cluster.kill9(leader)?;
        kills.push((name.clone(), seen.1.clone()));
        let others: Vec<u64> = fx
            .cluster
            .coord_ids()
            .into_iter()
            .filter(|c| *c != leader)
            .collect();
        let next = fx
            .cluster
            .wait_for_leader_among(&others, Some(leader))
            .await?;
        fx.cluster.restart(leader)?;
        leader = next;
    }
    info!(?kills, "leader kills");
    assert!(
        kills.len() >= main.len() / 2,
        "too few kills landed inside the plan: {kills:?} of {main:?}"
    );

    let done = wait_until(
        "the switchover finished",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || async {
            let op = operation(fx, id).await?;
            Ok((op["state"] != "running").then_some(op))
        },
    )
    .await?;
    info!(%done, "switchover after the kills");
    assert_eq!(done["state"], "succeeded", "{done}");
    w.wait_acks_on(fx.sh.port, 5, "writes acknowledged by shanghai")
        .await?;
    let (acks, _) = w.finish().await?;

    info!("--- exactly once: one attempt per step, each command started once on its agent");
    let steps = done["steps"].as_array().context("steps")?;
    let mut keys: Vec<String> = Vec::new();
    for s in steps {
        let name = s["name"].as_str().unwrap_or_default();
        if !main.iter().any(|m| m == name) {
            continue;
        }
        assert_eq!(s["state"], "done", "step {name}: {s}");
        // Attempts count from 1; internal steps have none.
        assert!(
            s["attempt"].as_u64().unwrap_or(0) <= 1,
            "step {name} needed a retry: {s}"
        );
        for k in s["command_key"].as_str().unwrap_or("").split(',') {
            if !k.is_empty() {
                keys.push(k.to_owned());
            }
        }
    }
    assert!(
        !keys.is_empty(),
        "no agent step recorded a command key: {done}"
    );
    let mut starts: BTreeMap<String, usize> = BTreeMap::new();
    for log in fx.cluster.dir().logs() {
        let name = log.file_name().map(|n| n.to_string_lossy().into_owned());
        if !name.is_some_and(|n| n.starts_with("agent-")) {
            continue;
        }
        let text = strip_ansi(&std::fs::read_to_string(&log)?);
        for line in text.lines().filter(|l| l.contains("command started")) {
            for k in &keys {
                // The span prints `key=op-1-4-0`; the comma or space ends it.
                if line.contains(&format!("key={k} ")) || line.contains(&format!("key={k}}}")) {
                    *starts.entry(k.clone()).or_default() += 1;
                }
            }
        }
    }
    info!(?starts, "command starts per key in the agents' logs");
    for k in &keys {
        match starts.get(k) {
            Some(1) => {}
            other => bail!("command {k} started {other:?} times on its agent (expected once)"),
        }
    }

    info!("--- one promotion, epoch raised once, nothing acknowledged lost");
    let mut c = fx.sh.connect().await?;
    let wal: String = sqlx::query_scalar("select pg_walfile_name(pg_current_wal_lsn())")
        .fetch_one(&mut c)
        .await?;
    assert_eq!(
        &wal[..8],
        "00000002",
        "shanghai's timeline after one promotion: {wal}"
    );
    let t = fx.cluster_info().await?;
    assert_eq!(t["primary_host"], "sh-db-1", "{t}");
    assert_eq!(t["epoch"].as_u64(), Some(fx.epoch_before + 1), "{t}");
    let ids: Vec<i64> = sqlx::query_scalar("select id from writes")
        .fetch_all(&mut c)
        .await?;
    let ids: std::collections::HashSet<i64> = ids.into_iter().collect();
    let lost: Vec<i64> = acks
        .iter()
        .filter(|a| !ids.contains(&a.id))
        .map(|a| a.id)
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    Ok(())
}

/// The children log in colour when they think they may: drop the escape sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
