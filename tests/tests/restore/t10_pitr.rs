//! One shared fixture (cluster, primary, full + incremental backups), then every acceptance
//! case of issue 4 in order: point-in-time restore to a time T between two batches, latest
//! restore onto a host in the other region, refusals before any file is written (before the
//! oldest backup, after the newest WAL), in-place refused while the database runs, the
//! drill, a corrupted repository object (restore fails naming it, nothing started), and a
//! standalone restore with every coordinator stopped.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use dr_tests::TestCluster;
use dr_tests::harness::backup::{
    ArchivingDb, apply_policy, archiving_db, full_backup, run_backup, run_ok, text,
    yeslocker_policy,
};
use dr_tests::harness::cluster::AgentSpec;
use dr_tests::harness::ports::free_port;
use dr_tests::harness::postgres::pg_bin_dir;
use serde_json::Value;
use sqlx::Connection;
use tokio::process::Command;
use tracing::info;

const BJ: &str = "db-bj-1";
const SH: &str = "db-sh-1";

pub(crate) async fn sql(url: &str, q: &str) -> Result<String> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    let v: Option<String> = sqlx::query_scalar(q).fetch_one(&mut c).await?;
    Ok(v.unwrap_or_default())
}

async fn count(port: &str, batch: i32) -> Result<i64> {
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let mut c = sqlx::PgConnection::connect(&url).await?;
    Ok(
        sqlx::query_scalar("select count(*) from t where batch = $1")
            .bind(batch)
            .fetch_one(&mut c)
            .await?,
    )
}

/// Inserts one batch, switches WAL and waits until the segment is archived.
async fn batch_and_archive(url: &str, batch: i32) -> Result<()> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::query("insert into t select g, $1 from generate_series(1, 100) g")
        .bind(batch)
        .execute(&mut c)
        .await?;
    archive(url).await
}

pub(crate) async fn archive(url: &str) -> Result<()> {
    let seg = sql(url, "select pg_walfile_name(pg_switch_wal())").await?;
    for _ in 0..300 {
        let last = sql(
            url,
            "select coalesce(last_archived_wal, '') from pg_stat_archiver",
        )
        .await?;
        if last >= seg {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("segment {seg} was not archived within 30 s")
}

/// Stops a restored server by its data directory (pg_ctl as postgres; never by name).
pub(crate) async fn stop_pg(dir: &Path) {
    if !dir.join("postmaster.pid").exists() {
        return;
    }
    let mut c = if nix::unistd::Uid::effective().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(pg_bin_dir().join("pg_ctl"));
        c
    } else {
        Command::new(pg_bin_dir().join("pg_ctl"))
    };
    c.arg("stop")
        .arg("-D")
        .arg(dir)
        .args(["-m", "immediate", "-w"]);
    let _best_effort = run_ok(&mut c, "pg_ctl stop").await;
}

fn results(op: &Value) -> Value {
    op.get("results").cloned().unwrap_or(Value::Null)
}

pub(crate) fn res(op: &Value, k: &str) -> String {
    results(op)
        .get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// A directory the postgres user may create below.
pub(crate) fn pg_parent(root: &Path, name: &str) -> Result<PathBuf> {
    let d = root.join(name);
    std::fs::create_dir_all(&d)?;
    if nix::unistd::Uid::effective().is_root() {
        let u = nix::unistd::User::from_name("postgres")?.context("user postgres")?;
        nix::unistd::chown(&d, Some(u.uid), Some(u.gid))?;
    }
    Ok(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_latest_refusals_inplace_drill_corrupt_standalone() -> Result<()> {
    let mut cluster = TestCluster::builder()
        .coordinators(3)
        .agent(AgentSpec::new(BJ).roles(&["db"]))
        .agent(AgentSpec::new(SH).region("shanghai").roles(&["db"]))
        .start()
        .await?;
    let agent = cluster.bins.agent.clone();
    let ArchivingDb {
        dir: bk,
        repo_cfg,
        mut pg,
    } = archiving_db(&cluster).await?;
    let restores = pg_parent(cluster.dir().path(), "restores")?;
    let scratch = pg_parent(cluster.dir().path(), "scratch")?;
    let url = pg.url("postgres");
    let policy = bk.join("policy.toml");
    let restore_section = format!(
        r#"
[restore]
scratch_dir = "{}"

[[restore.verify]]
db = "yeslocker"
tables = ["public.t"]
queries = ["select count(*) > 0 from t"]

[[restore.drills]]
name = "weekly-restore-test"
db = "yeslocker"
host = "{SH}"
cron = "0 4 * * 0"
"#,
        scratch.display()
    );
    apply_policy(
        &cluster,
        &bk,
        &yeslocker_policy(BJ, &pg, &repo_cfg, &restore_section),
    )
    .await?;

    info!("--- full backup, batch 1, time T, batch 2 (archived)");
    {
        let mut c = sqlx::PgConnection::connect(&url).await?;
        sqlx::query("create table if not exists t (id int, batch int)")
            .execute(&mut c)
            .await?;
    }
    full_backup(&cluster).await?;
    batch_and_archive(&url, 1).await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let t = sql(
        &url,
        "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    batch_and_archive(&url, 2).await?;
    info!(%t, "T between the batches");

    info!("--- restore to T holds exactly the first batch");
    let d1 = restores.join("to-t");
    let op = cluster
        .drctl_json([
            "restore",
            "--db",
            "yeslocker",
            "--to-time",
            &t,
            "--to-host",
            BJ,
            "--data-dir",
            &d1.display().to_string(),
            "--wait",
        ])
        .await?;
    info!(%op, "restore to T");
    ensure!(res(&op, "restore") == "succeeded", "{op}");
    ensure!(res(&op, "verify") == "passed", "{op}");
    ensure!(
        !res(&op, "recovery_lsn").is_empty(),
        "recovery point recorded: {op}"
    );
    ensure!(res(&op, "duration_ms").parse::<u64>().is_ok(), "{op}");
    let port = res(&op, "port");
    let (b1, b2) = (count(&port, 1).await?, count(&port, 2).await?);
    stop_pg(&d1).await;
    ensure!(
        (b1, b2) == (100, 0),
        "restore to T: batch1={b1} batch2={b2}"
    );
    let shown = cluster
        .drctl(["operations", "show", &op["id"].to_string()])
        .await?;
    ensure!(
        text(&shown).contains("recovery_lsn="),
        "operations show prints the results: {}",
        text(&shown)
    );

    info!("--- incremental, batch 3 archived; latest restore onto a host in the other region");
    run_backup(&cluster, "yeslocker", "incr").await?;
    batch_and_archive(&url, 3).await?;
    let d2 = restores.join("latest-sh");
    let op = cluster
        .drctl_json([
            "restore",
            "--db",
            "yeslocker",
            "--latest",
            "--to-host",
            SH,
            "--data-dir",
            &d2.display().to_string(),
            "--wait",
        ])
        .await?;
    ensure!(op["to_region"] == "shanghai", "{op}");
    ensure!(res(&op, "restore") == "succeeded", "{op}");
    let port = res(&op, "port");
    let counts = (
        count(&port, 1).await?,
        count(&port, 2).await?,
        count(&port, 3).await?,
    );
    stop_pg(&d2).await;
    ensure!(counts == (100, 100, 100), "latest restore: {counts:?}");

    info!("--- targets outside the reachable range: refused before any file is written");
    for (when, why) in [
        (
            "2000-01-01T00:00:00Z",
            "before the end of the oldest backup",
        ),
        ("2099-01-01T00:00:00Z", "after the newest archived WAL"),
    ] {
        let d = restores.join("refused");
        let out = cluster
            .drctl([
                "restore",
                "--db",
                "yeslocker",
                "--to-time",
                when,
                "--to-host",
                BJ,
                "--data-dir",
                &d.display().to_string(),
                "--wait",
            ])
            .await?;
        let msg = text(&out);
        ensure!(!out.status.success(), "{when} must be refused: {msg}");
        ensure!(
            msg.contains(why) && msg.contains("reachable range"),
            "{msg}"
        );
        ensure!(!d.exists(), "nothing written for a refused restore");
    }

    info!("--- in-place restore refused while the database runs");
    let out = cluster
        .drctl([
            "restore",
            "--db",
            "yeslocker",
            "--to-time",
            &t,
            "--in-place",
            "--confirm",
            "--wait",
        ])
        .await?;
    let msg = text(&out);
    ensure!(!out.status.success(), "in place while running: {msg}");
    ensure!(msg.contains("running"), "{msg}");
    ensure!(
        count(&pg.port.to_string(), 3).await? == 100,
        "the live database is untouched"
    );

    info!("--- drill: latest backup into a scratch instance, verified, thrown away");
    let out = cluster
        .drctl_json(["drill", "run", "backup-restore", "--db", "yeslocker"])
        .await?;
    ensure!(res(&out, "drill") == "pass", "{out}");
    ensure!(res(&out, "duration_ms").parse::<u64>().is_ok(), "{out}");
    ensure!(
        out["to_region"] == "shanghai",
        "the policy's drill host: {out}"
    );
    let left: Vec<_> = std::fs::read_dir(&scratch)?.flatten().collect();
    ensure!(left.is_empty(), "scratch instance thrown away: {left:?}");
    let list = cluster.drctl_json(["drill", "list"]).await?;
    ensure!(
        list["drills"].as_array().is_some_and(|a| !a.is_empty()),
        "{list}"
    );

    info!("--- a scheduled drill (cron every minute) starts once for its slot and passes");
    let every_minute = bk.join("policy-every-minute.toml");
    std::fs::write(
        &every_minute,
        std::fs::read_to_string(&policy)?.replace("cron = \"0 4 * * 0\"", "cron = \"* * * * *\""),
    )?;
    let apply = |f: &Path| {
        let f = f.display().to_string();
        let c = &cluster;
        async move { c.drctl_json(["backup", "policy", "apply", "-f", &f]).await }
    };
    apply(&every_minute).await?;
    // The minute the schedule was applied in is not a missed slot (it began before the
    // schedule existed): the first slot is the next minute, up to 60 s away, plus the
    // scheduler's 10 s tick and the drill itself.
    let mut scheduled = Value::Null;
    for _ in 0..300 {
        let list = cluster.drctl_json(["drill", "list"]).await?;
        if let Some(d) = list["drills"].as_array().and_then(|a| {
            a.iter()
                .find(|d| {
                    d["created_by"]
                        .as_str()
                        .is_some_and(|c| c.contains("drill_scheduler"))
                })
                .cloned()
        }) && d["finished_at_unix_ms"].as_i64().unwrap_or(0) != 0
        {
            scheduled = d;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    apply(&policy).await?;
    // A slot that fired meanwhile must end (and throw its instance away) before going on.
    for _ in 0..120 {
        let list = cluster.drctl_json(["drill", "list"]).await?;
        let running = list["drills"].as_array().is_some_and(|a| {
            a.iter()
                .any(|d| d["finished_at_unix_ms"].as_i64().unwrap_or(0) == 0)
        });
        if !running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(
        res(&scheduled, "drill") == "pass",
        "scheduled drill: {scheduled}"
    );

    info!("--- a logical backup named with --backup goes to pg_restore --clean --if-exists");
    let dump = run_backup(&cluster, "yeslocker", "logical").await?;
    let dump = match dump {
        Value::Array(mut a) => a.pop().unwrap_or(Value::Null),
        v => v,
    };
    let dump_id = dump["id"].as_str().context("logical backup id")?.to_owned();
    batch_and_archive(&url, 4).await?;
    let op = cluster
        .drctl_json([
            "restore",
            "--db",
            "yeslocker",
            "--backup",
            &dump_id,
            "--to-host",
            BJ,
            "--wait",
        ])
        .await?;
    ensure!(res(&op, "restore") == "succeeded", "{op}");
    let live = pg.port.to_string();
    let counts = (count(&live, 3).await?, count(&live, 4).await?);
    ensure!(
        counts == (100, 0),
        "the dump's contents replaced the table: {counts:?}"
    );

    info!("--- a corrupted chunk: the restore fails naming it, no server started");
    let mut chunks = Vec::new();
    let mut stack = vec![bk.join("repo").join("data")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                chunks.push(e.path());
            }
        }
    }
    chunks.sort();
    let victim = chunks.first().context("a chunk")?.clone();
    let good = std::fs::read(&victim)?;
    let mut bad = good.clone();
    let n = bad.len() / 2;
    bad[n] ^= 0x40;
    std::fs::write(&victim, &bad)?;
    let d4 = restores.join("corrupt");
    let out = cluster
        .drctl([
            "restore",
            "--db",
            "yeslocker",
            "--latest",
            "--to-host",
            SH,
            "--data-dir",
            &d4.display().to_string(),
            "--wait",
        ])
        .await?;
    let msg = text(&out);
    std::fs::write(&victim, &good)?;
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    ensure!(!out.status.success(), "corrupt restore must fail: {msg}");
    ensure!(msg.contains(&name), "names the object {name}: {msg}");
    ensure!(
        !d4.join("postmaster.pid").exists() && !d4.exists(),
        "never started, never renamed into place"
    );

    info!("--- standalone restore to T with every coordinator stopped");
    cluster.stop_all().await?;
    let d5 = restores.join("standalone");
    let port = free_port()?.to_string();
    let out = run_ok(
        Command::new(&agent)
            .args(["restore", "--repo-config"])
            .arg(&repo_cfg)
            .arg("--target")
            .arg(&d5)
            .args(["--to-time", &t, "--port", &port, "--start"]),
        "dr-agent restore --start",
    )
    .await;
    let counts = match &out {
        Ok(_) => Some((count(&port, 1).await?, count(&port, 2).await?)),
        Err(_) => None,
    };
    stop_pg(&d5).await;
    out?;
    ensure!(
        counts == Some((100, 0)),
        "standalone restore to T: {counts:?}"
    );

    pg.stop().await?;
    drop(pg);
    cluster.shutdown().await
}
