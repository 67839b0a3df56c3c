//! Issue 4, item 2: a restore along an earlier timeline. A point-in-time restore promoted a
//! copy of the database onto timeline 2, which archives into the same repository as the
//! original primary, which goes on writing on timeline 1. Both timelines then hold WAL past
//! the fork, with different data. The test restores:
//!
//! - through drctl, to an LSN on timeline 1 after the fork with `--timeline 1`: exactly
//!   timeline 1's rows (batches 1 and 2, none of timeline 2's batch 3);
//! - through drctl, the latest state (PostgreSQL's default `recovery_target_timeline =
//!   latest`): timeline 2's rows (batches 1 and 3, not batch 2);
//! - with `dr-agent restore` alone (no coordinator involved), to the same timeline-1 LSN,
//!   while the repository also holds a newer base backup taken on timeline 2 whose stop LSN
//!   lies before the target: the backup chosen must be one timeline 1's recovery can start
//!   from.
//!
//! Each restored server must also have picked a timeline number no other server used (3, as
//! 2 is in the archive): it found `00000002.history` through wal-fetch, and the missing
//! `00000003.history` was answered as "not found".
//!
//! Why the WAL volume on timeline 1: every `pg_switch_wal` after a write starts a new 16 MiB
//! segment, so eight of them put the timeline-1 target at least eight segments past the
//! fork, beyond anything timeline 2 writes (its batch, one switch and one base backup), which
//! makes "the timeline-2 backup ends before the target LSN" hold on every run.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use dr_tests::TestCluster;
use dr_tests::harness::backup::{
    ArchivingDb, apply_policy, archiving_db, full_backup, run_ok, yeslocker_policy,
};
use dr_tests::harness::cluster::AgentSpec;
use dr_tests::harness::ports::free_port;
use dr_tests::harness::wait::wait_until;
use sqlx::Connection;
use tokio::process::Command;
use tracing::info;

use crate::t10_pitr::{archive, pg_parent, res, sql, stop_pg};

const BJ: &str = "db-bj-1";

fn url_of(port: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

/// Rows of batches 1, 2 and 3 in table `t`.
async fn batches(port: &str) -> Result<(i64, i64, i64)> {
    let mut c = sqlx::PgConnection::connect(&url_of(port)).await?;
    let mut n = [0i64; 3];
    for (i, b) in (1..=3).enumerate() {
        n[i] = sqlx::query_scalar("select count(*) from t where batch = $1")
            .bind(b)
            .fetch_one(&mut c)
            .await?;
    }
    Ok((n[0], n[1], n[2]))
}

/// The timeline the server writes on (after promotion).
async fn timeline(port: &str) -> Result<String> {
    sql(
        &url_of(port),
        "select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
    )
    .await
}

async fn insert_batch(url: &str, batch: i32) -> Result<()> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::query("insert into t select g, $1 from generate_series(1, 100) g")
        .bind(batch)
        .execute(&mut c)
        .await?;
    Ok(())
}

/// Waits (generously: replay on a loaded machine) until the server on `port` left recovery.
async fn wait_promoted(port: &str) -> Result<()> {
    let url = url_of(port);
    wait_until(
        "the restored server is promoted",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || {
            let url = url.clone();
            async move {
                let r = sql(&url, "select pg_is_in_recovery()::text").await?;
                Ok((r == "false").then_some(()))
            }
        },
    )
    .await
}

/// `dr-agent restore` as root, the restored files handed to postgres by the agent.
async fn standalone_restore(
    agent: &Path,
    repo_cfg: &Path,
    target: &Path,
    args: &[&str],
) -> Result<String> {
    run_ok(
        Command::new(agent)
            .args(["restore", "--repo-config"])
            .arg(repo_cfg)
            .arg("--target")
            .arg(target)
            .args(args),
        "dr-agent restore",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_along_an_earlier_timeline() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(AgentSpec::new(BJ).roles(&["db"]))
        .start()
        .await?;
    let agent = cluster.bins.agent.clone();
    let ArchivingDb {
        dir: bk,
        repo_cfg,
        mut pg,
    } = archiving_db(&cluster).await?;
    let restores = pg_parent(cluster.dir().path(), "restores")?;
    let url = pg.url("postgres");
    apply_policy(&cluster, &bk, &yeslocker_policy(BJ, &pg, &repo_cfg, "")).await?;

    info!("--- timeline 1: table, archiving settings a restored copy keeps, full backup");
    {
        let mut c = sqlx::PgConnection::connect(&url).await?;
        sqlx::query("create table t (id int, batch int)")
            .execute(&mut c)
            .await?;
        // The primary has these on its command line; written to postgresql.auto.conf they
        // travel with the backup, so a restore with --keep-archive archives into the same
        // repository (the others get `archive_mode = off` appended by the restore).
        let archive_command = format!(
            "{} wal-push %p --repo-config {}",
            agent.display(),
            repo_cfg.display()
        );
        sqlx::query(&format!(
            "alter system set archive_command = '{}'",
            archive_command.replace('\'', "''")
        ))
        .execute(&mut c)
        .await?;
        sqlx::query("alter system set archive_mode = on")
            .execute(&mut c)
            .await?;
    }
    full_backup(&cluster).await?;
    insert_batch(&url, 1).await?;
    let fork_lsn = sql(&url, "select pg_current_wal_lsn()::text").await?;
    archive(&url).await?;

    info!("--- timeline 1 goes on: eight more segments, then batch 2");
    for _ in 0..8 {
        sql(&url, "select txid_current()::text").await?;
        archive(&url).await?;
    }
    insert_batch(&url, 2).await?;
    let tl1_target = sql(&url, "select pg_current_wal_lsn()::text").await?;
    archive(&url).await?;
    info!(%fork_lsn, %tl1_target, "timeline 1 positions");

    info!("--- a copy restored to the fork point is promoted onto timeline 2 and archives");
    let tl2_dir = restores.join("tl2");
    let tl2_port = free_port()?.to_string();
    standalone_restore(
        &agent,
        &repo_cfg,
        &tl2_dir,
        &[
            "--to-lsn",
            &fork_lsn,
            "--keep-archive",
            "--port",
            &tl2_port,
            "--start",
        ],
    )
    .await?;
    let tl2 = async {
        wait_promoted(&tl2_port).await?;
        let tl = timeline(&tl2_port).await?;
        ensure!(tl == "00000002", "the copy promoted onto timeline {tl}");
        let tl2_url = url_of(&tl2_port);
        insert_batch(&tl2_url, 3).await?;
        archive(&tl2_url).await?;
        ensure!(
            batches(&tl2_port).await? == (100, 0, 100),
            "timeline 2 holds batches 1 and 3"
        );
        // A newer base backup, on timeline 2, ending (LSN) before the timeline-1 target.
        let out = run_ok(
            Command::new(&agent)
                .args(["backup", "run", "--repo-config"])
                .arg(&repo_cfg)
                .args(["--pg-url", &tl2_url, "--data-dir"])
                .arg(&tl2_dir)
                .args(["--type", "full"]),
            "dr-agent backup run on timeline 2",
        )
        .await?;
        info!(%out, "timeline 2 backup");
        archive(&tl2_url).await
    }
    .await;
    stop_pg(&tl2_dir).await;
    tl2?;
    let list = run_ok(
        Command::new(&agent)
            .args(["backup", "list", "--output", "json", "--repo-config"])
            .arg(&repo_cfg),
        "dr-agent backup list",
    )
    .await?;
    let list: serde_json::Value = serde_json::from_str(&list).context("backup list json")?;
    ensure!(
        list.as_array()
            .is_some_and(|a| a.iter().any(|b| b["timeline"] == 2 && b["kind"] == "full")),
        "a full backup on timeline 2 is in the repository: {list}"
    );

    info!("--- drctl: to the timeline-1 LSN with --timeline 1 -> exactly timeline 1's rows");
    let d1 = restores.join("drctl-tl1");
    let op = cluster
        .drctl_json([
            "restore",
            "--db",
            "yeslocker",
            "--to-lsn",
            &tl1_target,
            "--timeline",
            "1",
            "--to-host",
            BJ,
            "--data-dir",
            &d1.display().to_string(),
            "--wait",
        ])
        .await?;
    info!(%op, "restore along timeline 1");
    let port = res(&op, "port");
    let got =
        async { Ok::<_, anyhow::Error>((batches(&port).await?, timeline(&port).await?)) }.await;
    stop_pg(&d1).await;
    ensure!(res(&op, "restore") == "succeeded", "{op}");
    let (rows, tl) = got?;
    ensure!(
        rows == (100, 100, 0),
        "restore to {tl1_target} on timeline 1: batches {rows:?}, expected (100, 100, 0)"
    );
    ensure!(
        tl == "00000003",
        "promoted onto a new timeline (3), got {tl}"
    );

    info!("--- drctl: latest (follows the newest timeline) -> timeline 2's rows");
    let d2 = restores.join("drctl-latest");
    let op = cluster
        .drctl_json([
            "restore",
            "--db",
            "yeslocker",
            "--latest",
            "--to-host",
            BJ,
            "--data-dir",
            &d2.display().to_string(),
            "--wait",
        ])
        .await?;
    info!(%op, "latest restore");
    let port = res(&op, "port");
    let got =
        async { Ok::<_, anyhow::Error>((batches(&port).await?, timeline(&port).await?)) }.await;
    stop_pg(&d2).await;
    ensure!(res(&op, "restore") == "succeeded", "{op}");
    let (rows, tl) = got?;
    ensure!(
        rows == (100, 0, 100),
        "latest restore: batches {rows:?}, expected timeline 2's (100, 0, 100)"
    );
    ensure!(
        tl == "00000003",
        "promoted onto a new timeline (3), got {tl}"
    );

    info!("--- dr-agent restore alone: timeline-1 LSN, --timeline 1, a timeline-2 backup present");
    let d3 = restores.join("standalone-tl1");
    let port = free_port()?.to_string();
    let out = standalone_restore(
        &agent,
        &repo_cfg,
        &d3,
        &[
            "--to-lsn",
            &tl1_target,
            "--timeline",
            "1",
            "--port",
            &port,
            "--start",
        ],
    )
    .await;
    let got = match &out {
        Ok(_) => Some(
            async { Ok::<_, anyhow::Error>((batches(&port).await?, timeline(&port).await?)) }.await,
        ),
        Err(_) => None,
    };
    stop_pg(&d3).await;
    info!(?out, "standalone restore");
    out?;
    let (rows, tl) = got.context("standalone restore result")??;
    ensure!(
        rows == (100, 100, 0),
        "standalone restore to {tl1_target} on timeline 1: batches {rows:?}, expected (100, 100, 0)"
    );
    ensure!(
        tl == "00000003",
        "promoted onto a new timeline (3), got {tl}"
    );

    pg.stop().await?;
    drop(pg);
    cluster.shutdown().await
}
