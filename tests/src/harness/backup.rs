//! What the backup and restore suites share: an fs repository made with the real
//! `dr-agent repo init`, a PostgreSQL 15 whose `archive_command` is `dr-agent wal-push`,
//! running the agent's CLI with a deadline, and reading drctl's catalog answers.
//!
//! Why here: every backup/restore test starts from the same repository + archiving server,
//! and a fix to how that is set up (ownership for the postgres user, the repo config's keys)
//! must reach all of them at once.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use tokio::process::Command;

use super::postgres::Postgres;
use super::testdir::TestDir;

/// stdout then stderr of a finished command, for messages and assertions.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` (killed if it outlives 180 s) and returns its trimmed stdout; fails with
/// everything it printed when it exits non-zero.
pub async fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.kill_on_drop(true).output())
        .await
        .with_context(|| format!("{what} did not finish within 180 s"))?
        .with_context(|| format!("run {what}"))?;
    ensure!(out.status.success(), "{what} failed: {}", text(&out));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Writes `<dir>/<name>.toml`: an fs repository at `repo` with key `<name>.key` next to it.
pub fn fs_repo_config(dir: &Path, name: &str, repo: &Path) -> Result<PathBuf> {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "version = 1\nkey_file = \"{name}.key\"\nconcurrency = 4\n\n[location]\nkind = \"fs\"\npath = \"{}\"\n",
            repo.display()
        ),
    )?;
    Ok(cfg)
}

/// `dr-agent repo init`, then (as root) `owner_dir` handed to the postgres user, whose
/// `archive_command` writes into the repository.
pub async fn init_repo(agent: &Path, repo_cfg: &Path, owner_dir: &Path) -> Result<()> {
    run_ok(
        Command::new(agent)
            .args(["repo", "init", "--repo-config"])
            .arg(repo_cfg),
        "dr-agent repo init",
    )
    .await?;
    if nix::unistd::Uid::effective().is_root() {
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(owner_dir),
            "chown the repository to postgres",
        )
        .await?;
    }
    Ok(())
}

/// A PostgreSQL 15 under `<dir>/pg` archiving every segment with `dr-agent wal-push`.
pub async fn archiving_postgres(dir: &TestDir, agent: &Path, repo_cfg: &Path) -> Result<Postgres> {
    Postgres::start_with(
        &dir.join("pg"),
        &dir.log_path("postgres"),
        &[
            "archive_mode=on".to_owned(),
            format!(
                "archive_command={} wal-push %p --repo-config {}",
                agent.display(),
                repo_cfg.display()
            ),
        ],
    )
    .await
}

/// A db host's backup set-up as every backup and restore test starts it.
pub struct ArchivingDb {
    /// `<test>/backup`: repository configs, the fs repository `repo`, scratch files.
    pub dir: PathBuf,
    /// The config of the initialised fs repository `<dir>/repo`.
    pub repo_cfg: PathBuf,
    /// PostgreSQL 15 archiving into that repository with `dr-agent wal-push`.
    pub pg: Postgres,
}

/// `<test>/backup` with an fs repository initialised by `dr-agent repo init`, then a
/// PostgreSQL 15 archiving into it (so its first archive_command already finds the repository).
pub async fn archiving_db(cluster: &super::cluster::TestCluster) -> Result<ArchivingDb> {
    let agent = &cluster.bins.agent;
    let dir = cluster.dir().join("backup");
    std::fs::create_dir_all(&dir)?;
    let repo_cfg = fs_repo_config(&dir, "repo", &dir.join("repo"))?;
    init_repo(agent, &repo_cfg, &dir).await?;
    let pg = archiving_postgres(cluster.dir(), agent, &repo_cfg).await?;
    Ok(ArchivingDb { dir, repo_cfg, pg })
}

/// The last JSON document drctl printed (`--wait` may stream progress before the result).
pub fn last_doc(v: Value) -> Value {
    match v {
        Value::Array(mut a) => a.pop().unwrap_or(Value::Null),
        other => other,
    }
}

/// The entries of `drctl backup list --output json`.
pub fn catalog_rows(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        other => other
            .get("backups")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    }
}

/// The backup policy of the restore suite: database `yeslocker` on `host` (server `pg`),
/// backed up to one location `primary` (tier primary, jurisdiction cn) at `repo_cfg`, in
/// Asia/Shanghai, followed by `extra` (more sections, e.g. `[restore]`).
pub fn yeslocker_policy(host: &str, pg: &Postgres, repo_cfg: &Path, extra: &str) -> String {
    format!(
        r#"version = 1
timezone = "Asia/Shanghai"

[[databases]]
name = "yeslocker"
host = "{host}"
pg_url = "{}"
data_dir = "{}"
location = "primary"

[[locations]]
name = "primary"
tier = "primary"
jurisdiction = "cn"
repo_config = "{}"
{extra}"#,
        pg.url("postgres"),
        pg.data_dir.display(),
        repo_cfg.display(),
    )
}

/// Writes `policy` to `<dir>/policy.toml` and applies it with `drctl backup policy apply`.
pub async fn apply_policy(
    cluster: &super::cluster::TestCluster,
    dir: &Path,
    policy: &str,
) -> Result<()> {
    let file = dir.join("policy.toml");
    std::fs::write(&file, policy).with_context(|| format!("write {}", file.display()))?;
    cluster
        .drctl_json([
            "backup",
            "policy",
            "apply",
            "-f",
            &file.display().to_string(),
        ])
        .await?;
    Ok(())
}

/// `drctl backup run --db DB --type KIND --wait`: the answer (catalog documents).
pub async fn run_backup(
    cluster: &super::cluster::TestCluster,
    db: &str,
    kind: &str,
) -> Result<Value> {
    cluster
        .drctl_json(["backup", "run", "--db", db, "--type", kind, "--wait"])
        .await
}

/// `drctl backup run --db yeslocker --type full --wait`: the answer (catalog documents).
pub async fn full_backup(cluster: &super::cluster::TestCluster) -> Result<Value> {
    run_backup(cluster, "yeslocker", "full").await
}
