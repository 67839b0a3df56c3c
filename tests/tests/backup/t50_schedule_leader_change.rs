//! Issue 3, item 5: a schedule slot missed across a leader change runs once, not twice, and
//! not never. A file-set backup scheduled every minute (`* * * * *`):
//! - "not never": the leader is killed 4 s before a slot, so no leader exists at the slot;
//!   the one elected after it fires that slot late, once.
//! - "not twice": the leader is killed right after it issued the next slot's backup; the new
//!   leader sees the slot marked as fired (and re-issues at most the same idempotent command
//!   key), so that slot also has exactly one catalog entry.
//!
//! Each slot is checked in the catalog: entries whose start falls in the slot's minute.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, ensure};
use dr_tests::TestCluster;
use dr_tests::harness::backup::apply_policy;
use dr_tests::harness::cluster::AgentSpec;
use serde_json::Value;
use tokio::process::Command;
use tracing::info;

const HOST: &str = "app-bj-1";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Sleeps until `at_ms` (wall clock).
async fn sleep_until_ms(at_ms: i64) {
    let d = at_ms - now_ms();
    if d > 0 {
        tokio::time::sleep(Duration::from_millis(u64::try_from(d).unwrap_or(0))).await;
    }
}

fn next_minute(after_ms: i64) -> i64 {
    (after_ms / 60_000 + 1) * 60_000
}

fn entries(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        other => other
            .get("backups")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    }
}

/// Catalog entries of the scheduled file set that started within the minute of `slot_ms`.
async fn in_slot(cluster: &TestCluster, slot_ms: i64) -> Result<Vec<Value>> {
    let list = entries(&cluster.drctl_json(["backup", "list"]).await?);
    Ok(list
        .into_iter()
        .filter(|b| {
            b["command_key"]
                .as_str()
                .is_some_and(|k| k.starts_with("sched-every-minute-"))
                && b["started_at_unix_ms"]
                    .as_i64()
                    .is_some_and(|t| t >= slot_ms && t < slot_ms + 60_000)
        })
        .collect())
}

/// Waits until the slot has an entry, then a while longer (a second firing would show up).
async fn exactly_one(cluster: &TestCluster, slot_ms: i64, what: &str) -> Result<()> {
    let deadline = now_ms() + 50_000;
    loop {
        let got = in_slot(cluster, slot_ms).await?;
        if !got.is_empty() {
            break;
        }
        ensure!(
            now_ms() < deadline,
            "{what}: the slot never ran (no catalog entry 50 s after it)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let got = in_slot(cluster, slot_ms).await?;
    ensure!(
        got.len() == 1,
        "{what}: {} catalog entries for one slot: {got:?}",
        got.len()
    );
    info!(what, key = %got[0]["command_key"], "the slot ran exactly once");
    Ok(())
}

async fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.kill_on_drop(true).output())
        .await
        .with_context(|| format!("{what} did not finish within 60 s"))?
        .with_context(|| format!("run {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The policy: one file set backed up every minute.
fn policy(repo_cfg: &Path, data: &Path) -> String {
    format!(
        r#"version = 1
timezone = "Asia/Shanghai"

[[file_sets]]
name = "app-config"
host = "{HOST}"
paths = ["{}"]
location = "primary"

[[locations]]
name = "primary"
tier = "primary"
jurisdiction = "cn"
repo_config = "{}"

[[schedules]]
name = "every-minute"
cron = "* * * * *"
kind = "files"
target = "app-config"
"#,
        data.display(),
        repo_cfg.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_runs_once_across_leader_kills() -> Result<()> {
    let mut cluster = TestCluster::builder()
        .coordinators(3)
        .agent(AgentSpec::new(HOST).roles(&["app"]))
        .start()
        .await?;
    let bk = cluster.dir().join("backup");
    let data = cluster.dir().join("app-config");
    std::fs::create_dir_all(&bk)?;
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("app.env"), "MODE=production\n")?;
    std::fs::write(data.join("nginx.conf"), "worker_processes 2;\n")?;
    let repo_cfg = bk.join("repo.toml");
    std::fs::write(
        &repo_cfg,
        format!(
            "version = 1\nkey_file = \"repo.key\"\n\n[location]\nkind = \"fs\"\npath = \"{}\"\n",
            bk.join("repo").display()
        ),
    )?;
    run_ok(
        Command::new(&cluster.bins.agent)
            .args(["repo", "init", "--repo-config"])
            .arg(&repo_cfg),
        "dr-agent repo init",
    )
    .await?;
    apply_policy(&cluster, &bk, &policy(&repo_cfg, &data)).await?;

    info!("--- not never: no leader at the slot");
    // At least 10 s before the slot we aim at, so the policy's first sighting (which marks
    // the current slot without running it) is behind us.
    let slot1 = next_minute(now_ms() + 10_000);
    sleep_until_ms(slot1 - 4_000).await;
    let old = cluster.leader_id().await?;
    cluster.kill9(old)?;
    info!(old, slot1, "leader killed 4 s before the slot");
    let new = cluster.wait_for_leader(Some(old)).await?;
    info!(new, late_ms = now_ms() - slot1, "new leader");
    cluster.restart(old)?;
    exactly_one(&cluster, slot1, "slot missed while leaderless").await?;

    info!("--- not twice: the leader dies right after issuing the slot's backup");
    let slot2 = slot1 + 60_000;
    let sched_commands = |cmds: &[Value]| {
        cmds.iter()
            .filter(|c| c.to_string().contains("sched-every-minute-"))
            .count()
    };
    let before = sched_commands(&cluster.commands(HOST).await?);
    sleep_until_ms(slot2).await;
    let leader = cluster.leader_id().await?;
    let deadline = now_ms() + 20_000;
    loop {
        let cmds = cluster.commands(HOST).await?;
        if sched_commands(&cmds) > before {
            break;
        }
        ensure!(now_ms() < deadline, "slot 2 was never issued: {cmds:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.kill9(leader)?;
    info!(leader, "leader killed after issuing slot 2");
    cluster.wait_for_leader(Some(leader)).await?;
    cluster.restart(leader)?;
    exactly_one(&cluster, slot2, "slot fired before a leader change").await?;

    cluster.shutdown().await
}
