//! Logical dumps and file sets through the coordinators: `drctl backup run --type logical` of a
//! real PostgreSQL 15 database and `--type files` of a file set, both in the catalog with their
//! kind; `restore.logical` (pg_restore --clean --if-exists) and `restore.files` (dry run, then
//! the real one) sent to the agent with `drctl run verb`; and a FULL fs location (a 24 MiB tmpfs):
//! the backup that does not fit fails with a clear message, leaves no catalog entry and no
//! manifest, and the earlier backups still verify.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};
use dr_tests::TestCluster;
use dr_tests::harness::backup::{
    apply_policy, catalog_rows, fs_repo_config, init_repo, last_doc, run_backup, run_ok, text,
};
use dr_tests::harness::cluster::{AgentSpec, get_str};
use dr_tests::harness::postgres::{Postgres, pg_bin_dir};
use tokio::process::Command;
use tracing::info;

const HOST: &str = "db-bj-1";

/// Unmounts the tmpfs on drop (also when the test fails).
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let st = std::process::Command::new("umount").arg(&self.0).status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("umount {} failed", self.0.display());
        }
    }
}

fn random_file(path: &Path, len: usize, seed: u64) -> Result<()> {
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (seed + 1);
    for b in &mut data {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(path, data)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_files_full_fs() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "SKIPPED: needs root (PostgreSQL as the postgres user, a tmpfs mount for the full location)"
        );
        return Ok(());
    }
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(AgentSpec::new(HOST).roles(&["db"]))
        .start()
        .await?;
    let agent = cluster.bins.agent.clone();
    let bk = cluster.dir().join("backup");
    std::fs::create_dir_all(&bk)?;
    let repo_cfg = fs_repo_config(&bk, "repo", &bk.join("repo"))?;
    let small = bk.join("small");
    std::fs::create_dir_all(&small)?;
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&small)
        .status()?;
    ensure!(st.success(), "mount a 24 MiB tmpfs on {}", small.display());
    let tmpfs = Tmpfs(small.clone());
    let small_cfg = fs_repo_config(&bk, "small", &small.join("repo"))?;
    for cfg in [&repo_cfg, &small_cfg] {
        init_repo(&agent, cfg, &bk).await?;
    }

    info!("--- PostgreSQL 15 with a database `app`");
    let mut pg = Postgres::start_with(
        &cluster.dir().join("pg"),
        &cluster.dir().log_path("postgres"),
        &[],
    )
    .await?;
    let port = pg.port.to_string();
    let psql = |db: &str, sql: &str| {
        let mut c = Command::new(pg_bin_dir().join("psql"));
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(["-d", db, "-c", sql]);
        c
    };
    run_ok(&mut psql("postgres", "create database app"), "create db").await?;
    run_ok(
        &mut psql(
            "app",
            "create table t(id int primary key, v text); insert into t select g, md5(g::text) from generate_series(1, 50000) g",
        ),
        "fill app",
    )
    .await?;
    let fingerprint = "select count(*) || ':' || md5(string_agg(v, ',' order by id)) from t";
    let before = run_ok(&mut psql("app", fingerprint), "fingerprint").await?;

    info!("--- file sets: config (small) and blobs (does not fit the 24 MiB location)");
    let conf = bk.join("etc-app");
    std::fs::create_dir_all(conf.join("tls"))?;
    std::fs::write(conf.join("app.conf"), "listen = 443\n")?;
    std::fs::write(conf.join("tls/server.pem"), "CERT\n")?;
    std::fs::write(conf.join("scratch.tmp"), "x")?;
    random_file(&conf.join("tls/ca.bin"), 2 << 20, 100)?;
    let blobs = bk.join("blobs");
    std::fs::create_dir_all(&blobs)?;
    for i in 0..4 {
        random_file(&blobs.join(format!("blob{i}")), 8 << 20, i)?;
    }

    apply_policy(
        &cluster,
        &bk,
        &format!(
            r#"version = 1
timezone = "Asia/Shanghai"

[[databases]]
name = "yeslocker"
host = "{HOST}"
pg_url = "{}"
data_dir = "{}"
location = "primary"
dump_dbname = "app"

[[file_sets]]
name = "config"
host = "{HOST}"
paths = ["{}"]
exclude = ["*.tmp"]
location = "small"

[[file_sets]]
name = "blobs"
host = "{HOST}"
paths = ["{}"]
location = "small"

[[locations]]
name = "primary"
tier = "primary"
jurisdiction = "cn"
repo_config = "{}"

[[locations]]
name = "small"
tier = "nas"
jurisdiction = "cn"
repo_config = "{}"
"#,
            pg.url("postgres"),
            pg.data_dir.display(),
            conf.display(),
            blobs.display(),
            repo_cfg.display(),
            small_cfg.display()
        ),
    )
    .await?;

    info!("--- logical backup through drctl");
    let dump = last_doc(run_backup(&cluster, "yeslocker", "logical").await?);
    let dump_id = get_str(&dump, "id")
        .context("logical backup id")?
        .to_owned();
    ensure!(dump_id.ends_with("-logical"), "{dump}");

    info!("--- files backup through drctl");
    let files = last_doc(run_backup(&cluster, "config", "files").await?);
    let files_id = get_str(&files, "id").context("files backup id")?.to_owned();
    ensure!(files_id.ends_with("-files"), "{files}");

    let list = catalog_rows(&cluster.drctl_json(["backup", "list"]).await?);
    ensure!(list.len() == 2, "two entries: {list:?}");
    let kinds: Vec<&str> = list.iter().filter_map(|b| get_str(b, "kind")).collect();
    ensure!(
        kinds.contains(&"logical") && kinds.contains(&"files"),
        "{kinds:?}"
    );

    info!("--- damage the database; restore.logical through the agent puts it back");
    run_ok(
        &mut psql("app", "delete from t where id % 2 = 0"),
        "damage app",
    )
    .await?;
    let out = cluster
        .drctl([
            "run",
            "--host",
            HOST,
            "verb",
            "restore.logical",
            &format!("repo_config={}", repo_cfg.display()),
            &format!("backup_id={dump_id}"),
            &format!("pg_url={}", pg.url("postgres")),
            "dbname=app",
        ])
        .await?;
    ensure!(out.status.success(), "restore.logical: {}", text(&out));
    let after = run_ok(&mut psql("app", fingerprint), "fingerprint").await?;
    ensure!(
        after == before,
        "restored data differs: {after} vs {before}"
    );

    info!("--- restore.files: dry run writes nothing, the real one writes the set");
    let target = bk.join("restored");
    std::fs::create_dir_all(&target)?;
    let out = cluster
        .drctl([
            "run",
            "--host",
            HOST,
            "verb",
            "restore.files",
            &format!("repo_config={}", small_cfg.display()),
            "backup_id=latest",
            "set=config",
            &format!("target={}", target.display()),
            "dry_run=true",
        ])
        .await?;
    ensure!(
        out.status.success(),
        "restore.files dry run: {}",
        text(&out)
    );
    ensure!(
        std::fs::read_dir(&target)?.next().is_none(),
        "the dry run wrote something"
    );
    let out = cluster
        .drctl([
            "run",
            "--host",
            HOST,
            "verb",
            "restore.files",
            &format!("repo_config={}", small_cfg.display()),
            &format!("backup_id={files_id}"),
            &format!("target={}", target.display()),
        ])
        .await?;
    ensure!(out.status.success(), "restore.files: {}", text(&out));
    let back = target.join(conf.strip_prefix("/")?);
    ensure!(std::fs::read_to_string(back.join("app.conf"))? == "listen = 443\n");
    ensure!(std::fs::read(back.join("tls/ca.bin"))? == std::fs::read(conf.join("tls/ca.bin"))?);
    ensure!(!back.join("scratch.tmp").exists(), "excluded file restored");

    info!("--- the 32 MiB file set does not fit the 24 MiB location");
    let out = cluster
        .drctl([
            "backup", "run", "--db", "blobs", "--type", "files", "--wait",
        ])
        .await?;
    let msg = text(&out);
    ensure!(out.status.code() == Some(1), "exit 1 expected: {msg}");
    ensure!(
        msg.contains("No space left on device") && msg.contains("location is full"),
        "the message names the full disk and what to do: {msg}"
    );
    info!(%msg, "backup into a full location");
    let list = catalog_rows(&cluster.drctl_json(["backup", "list"]).await?);
    ensure!(list.len() == 2, "no entry for the failed backup: {list:?}");
    let manifests: Vec<String> = std::fs::read_dir(small.join("repo/backups"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(
        manifests == vec![files_id.clone()],
        "only the earlier manifest at the full location: {manifests:?}"
    );

    info!("--- nothing lost: the earlier backups still verify");
    let out = cluster.drctl(["backup", "verify", "--all"]).await?;
    ensure!(out.status.success(), "verify --all: {}", text(&out));
    let out = run_ok(
        Command::new(&agent)
            .args(["backup", "verify", &files_id, "--repo-config"])
            .arg(&small_cfg),
        "dr-agent backup verify on the full location",
    )
    .await?;
    info!(%out, "verify of the earlier files backup");

    pg.stop().await?;
    drop(pg);
    // Unmount before the cluster removes its directory (a mount point cannot be removed).
    drop(tmpfs);
    cluster.shutdown().await
}
