//! A real PostgreSQL 15 per test, made with `initdb` in the test dir on a free port.
//!
//! PostgreSQL refuses to run as root, and CI runs as root. The server therefore runs as
//! user `postgres` (created if missing) with its data dir chowned to it. Rather than
//! `runuser -u postgres -- postgres ...`, whose PID would be runuser's and not the
//! postmaster's, the harness spawns `postgres` itself with that uid/gid
//! (`CommandExt::uid/gid`, std drops supplementary groups), so the [`ChildGuard`] holds the
//! postmaster's own PID: SIGTERM on drop is a smart shutdown and SIGKILL after the grace.
//! When the tests do not run as root, everything runs as the current user.
//!
//! `fsync=off`: the data is a throwaway fixture; crash-safety of PostgreSQL itself is not
//! what these tests examine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::unistd::{Uid, User, chown};
use tokio::process::Command;
use tracing::info;

use super::ports::free_port;
use super::process::{ChildGuard, ChildSpec};
use super::wait::wait_until;

/// Where Debian's postgresql-15 installs; `DR_PG_BIN` overrides.
pub fn pg_bin_dir() -> PathBuf {
    std::env::var_os("DR_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

pub struct Postgres {
    pub port: u16,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    guard: ChildGuard,
}

impl Postgres {
    /// initdb + start in `dir` (created), then waits until `select 1` answers.
    pub async fn start(dir: &Path, log: &Path) -> Result<Self> {
        Self::start_with(dir, log, &[]).await
    }

    /// As [`Postgres::start`], with extra server settings passed as `-c NAME=VALUE`
    /// (e.g. `archive_mode=on`, `archive_command=...`).
    pub async fn start_with(dir: &Path, log: &Path, settings: &[String]) -> Result<Self> {
        let bin = pg_bin_dir();
        if !bin.join("initdb").is_file() {
            bail!(
                "{} has no initdb: install postgresql-15 (scripts/test.sh does)",
                bin.display()
            );
        }
        let data_dir = dir.join("data");
        let socket_dir = dir.join("sock");
        std::fs::create_dir_all(&socket_dir)?;
        let user = run_as_user().await?;
        if let Some((uid, gid)) = user {
            for p in [dir, &socket_dir] {
                chown(p, Some(uid.into()), Some(gid.into()))
                    .with_context(|| format!("chown {} to postgres", p.display()))?;
            }
        }

        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D"])
            .arg(&data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .kill_on_drop(true);
        if let Some((uid, gid)) = user {
            initdb.uid(uid).gid(gid);
        }
        let out = tokio::time::timeout(Duration::from_secs(180), initdb.output())
            .await
            .context("initdb took over 180 s")?
            .context("run initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }

        let port = free_port()?;
        let mut spec = ChildSpec::new("postgres", bin.join("postgres"), log).args([
            "-D".to_owned(),
            data_dir.display().to_string(),
            "-p".to_owned(),
            port.to_string(),
            "-k".to_owned(),
            socket_dir.display().to_string(),
            "-c".to_owned(),
            "listen_addresses=127.0.0.1".to_owned(),
            "-c".to_owned(),
            "fsync=off".to_owned(),
        ]);
        for setting in settings {
            spec = spec.args(["-c".to_owned(), setting.clone()]);
        }
        spec.grace = Duration::from_secs(20);
        if let Some((uid, gid)) = user {
            spec = spec.user(uid, gid);
        }
        let guard = ChildGuard::spawn(spec)?;
        let pg = Self {
            port,
            data_dir,
            socket_dir,
            guard,
        };
        let url = pg.url("postgres");
        wait_until(
            "postgres answers select 1",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let url = url.clone();
                async move {
                    use sqlx::Connection;
                    let mut c = sqlx::PgConnection::connect(&url).await?;
                    let one: i32 = sqlx::query_scalar("select 1").fetch_one(&mut c).await?;
                    Ok((one == 1).then_some(()))
                }
            },
        )
        .await?;
        info!(port, "postgres ready");
        Ok(pg)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Fast shutdown (SIGINT to the postmaster), SIGKILL after the grace.
    pub async fn stop(&mut self) -> Result<()> {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.guard.pid())?);
        kill(pid, Signal::SIGINT).ok();
        if self.guard.wait_exit(Duration::from_secs(30)).await.is_err() {
            self.guard.kill9()?;
        }
        Ok(())
    }
}

/// `Some((uid, gid))` of user `postgres` when running as root (created if missing).
async fn run_as_user() -> Result<Option<(u32, u32)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    if User::from_name("postgres")?.is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "postgres",
            ])
            .output()
            .await
            .context("run useradd postgres")?;
        // Another test may have created it at the same moment.
        if !out.status.success() && User::from_name("postgres")?.is_none() {
            bail!(
                "useradd postgres failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let u = User::from_name("postgres")?.context("user postgres exists")?;
    Ok(Some((u.uid.as_raw(), u.gid.as_raw())))
}
