//! Issue 4, item 8: cancelling a restore stops the agent's work and leaves no database running
//! from a partial restore; the target directory is not left looking like a data directory,
//! and the same restore run again afterwards succeeds.
//!
//! The database is made large enough (~200 MB of poorly compressible rows) that the file
//! restore of the debug-built agent takes several seconds, so the cancel lands while the
//! `restore.pg-files` step runs; the test fails, saying so, if it finished first.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use dr_tests::TestCluster;
use dr_tests::harness::backup::{
    ArchivingDb, apply_policy, archiving_db, full_backup, text, yeslocker_policy,
};
use dr_tests::harness::cluster::AgentSpec;
use serde_json::Value;
use sqlx::Connection;
use tracing::info;

use crate::t10_pitr::{pg_parent, res, stop_pg};

const BJ: &str = "db-bj-1";

/// Whether any process has `dir` in its command line (read-only scan of /proc; nothing is
/// signalled).
fn process_using(dir: &Path) -> Option<String> {
    let needle = dir.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(&needle) && cmd.contains("postgres") {
            return Some(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    None
}

fn step_running(op: &Value, verb: &str) -> bool {
    op["steps"].as_array().is_some_and(|steps| {
        steps.iter().any(|s| {
            s["kind"].as_str().is_some_and(|k| k.contains(verb)) && s["state"] == "running"
        })
    })
}

fn terminal(op: &Value) -> bool {
    matches!(
        op["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_restore_then_rerun() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(AgentSpec::new(BJ).roles(&["db"]))
        .start()
        .await?;
    let ArchivingDb {
        dir: bk,
        repo_cfg,
        pg,
    } = archiving_db(&cluster).await?;
    let restores = pg_parent(cluster.dir().path(), "restores")?;
    let url = pg.url("postgres");
    apply_policy(&cluster, &bk, &yeslocker_policy(BJ, &pg, &repo_cfg, "")).await?;

    info!("--- ~200 MB of rows, full backup");
    {
        let mut c = sqlx::PgConnection::connect(&url).await?;
        sqlx::query(
            "create table big as select g as id, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) as v \
             from generate_series(1, 1500000) g",
        )
        .execute(&mut c)
        .await?;
    }
    full_backup(&cluster).await?;

    let target = restores.join("cancelled");
    let target_s = target.display().to_string();
    let started = cluster
        .drctl_json([
            "restore",
            "--db",
            "yeslocker",
            "--latest",
            "--to-host",
            BJ,
            "--data-dir",
            &target_s,
        ])
        .await?;
    let id = started["operation"]["id"]
        .as_u64()
        .with_context(|| format!("no operation id in {started}"))?
        .to_string();
    info!(%id, "restore started; waiting for its file step");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let op = cluster.drctl_json(["operations", "show", &id]).await?;
        if step_running(&op, "pg-files") {
            break;
        }
        if terminal(&op) {
            bail!(
                "the restore ended before it could be cancelled (make the database larger): {op}"
            );
        }
        ensure!(
            Instant::now() < deadline,
            "file step never ran within 120 s: {op}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let some files land first: the cancel must cope with a half-written restore.
    tokio::time::sleep(Duration::from_millis(500)).await;
    info!("--- cancel while the files are being restored");
    let out = cluster
        .drctl([
            "operations",
            "cancel",
            &id,
            "--reason",
            "t20: cancel mid-restore",
        ])
        .await?;
    ensure!(out.status.success(), "cancel: {}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(60);
    let op = loop {
        let op = cluster.drctl_json(["operations", "show", &id]).await?;
        if terminal(&op) {
            break op;
        }
        ensure!(
            Instant::now() < deadline,
            "not finished 60 s after the cancel: {op}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    info!(%op, "after the cancel");
    ensure!(op["state"] == "cancelled", "state after cancel: {op}");
    // Give a (wrongly) started server a moment to show up before looking.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        !target.join("postmaster.pid").exists(),
        "a server was started from the partial restore in {target_s}"
    );
    ensure!(
        !target.join("PG_VERSION").exists(),
        "the partial restore was left in {target_s} looking like a data directory"
    );
    if let Some(p) = process_using(&target) {
        bail!("a process runs on the partial restore: {p}");
    }

    info!("--- the same restore again, to the end");
    let op = cluster
        .drctl_json([
            "restore",
            "--db",
            "yeslocker",
            "--latest",
            "--to-host",
            BJ,
            "--data-dir",
            &target_s,
            "--wait",
        ])
        .await?;
    ensure!(res(&op, "restore") == "succeeded", "{op}");
    let port = res(&op, "port");
    let n: i64 = {
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let mut c = sqlx::PgConnection::connect(&url).await?;
        sqlx::query_scalar("select count(*) from big")
            .fetch_one(&mut c)
            .await?
    };
    stop_pg(&target).await;
    ensure!(n == 1_500_000, "restored rows: {n}");
    drop(pg);
    cluster.shutdown().await
}
