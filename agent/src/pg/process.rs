//! Running PostgreSQL's own binaries (pg_ctl, pg_controldata, pg_rewind, pg_basebackup).
//!
//! PostgreSQL refuses to run as root, and the agent usually is root (it also manages
//! services and the firewall). When it is, every binary runs as the data dir's owner through
//! `runuser -u <run_as> --`; otherwise directly as the agent's user. Secrets never go on a
//! command line (visible in `ps`): they go in `PGPASSWORD`. Output is read with `LC_ALL=C` so
//! the parsers below see English labels.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tracing::debug;

use super::lsn::Lsn;
use super::{PgError, PgResult};

/// How the agent launches PostgreSQL binaries.
#[derive(Clone, Debug)]
pub struct Runner {
    bin_dir: PathBuf,
    /// `Some(user)`: wrap in `runuser -u user --` (the agent is root).
    run_as: Option<String>,
}

/// Captured result of one binary.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub code: Option<i32>,
}

impl Runner {
    pub fn new(bin_dir: &Path, run_as: &str) -> Self {
        let root = nix::unistd::geteuid().is_root();
        let run_as = (root && run_as != "root").then(|| run_as.to_owned());
        Self {
            bin_dir: bin_dir.to_owned(),
            run_as,
        }
    }

    pub fn run_as(&self) -> Option<&str> {
        self.run_as.as_deref()
    }

    /// Runs `prog` (a name under `bin_dir`) to completion within `timeout`.
    /// `secret_env` values are passed to the child but never logged.
    pub async fn run(
        &self,
        prog: &str,
        args: &[OsString],
        secret_env: &[(&str, String)],
        timeout: Duration,
    ) -> PgResult<Output> {
        let exe = self.bin_dir.join(prog);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args)
            .env("LC_ALL", "C")
            // The agent's cwd (often /root) may be unreadable for `postgres`.
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in secret_env {
            cmd.env(k, v);
        }
        debug!(program = prog, ?args, "running");
        let child = cmd.spawn().map_err(|e| PgError::Spawn {
            program: exe.display().to_string(),
            reason: e.to_string(),
        })?;
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| PgError::Timeout {
                what: format!("{prog} to finish"),
                after: timeout,
            })?
            .map_err(|e| PgError::Spawn {
                program: exe.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Output {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            code: out.status.code(),
        })
    }

    /// Like [`Runner::run`] but a non-zero exit is an error carrying the tail of stderr.
    pub async fn run_ok(
        &self,
        prog: &str,
        args: &[OsString],
        secret_env: &[(&str, String)],
        timeout: Duration,
    ) -> PgResult<Output> {
        let out = self.run(prog, args, secret_env, timeout).await?;
        if out.code == Some(0) {
            Ok(out)
        } else {
            Err(PgError::Command {
                program: prog.to_owned(),
                code: out.code,
                stderr: tail(&out.stderr, &out.stdout),
            })
        }
    }

    /// uid/gid of the run_as user when the agent is root (files the agent creates in the
    /// data dir must belong to it).
    pub fn owner(&self) -> PgResult<Option<(nix::unistd::Uid, nix::unistd::Gid)>> {
        let Some(user) = &self.run_as else {
            return Ok(None);
        };
        let u = nix::unistd::User::from_name(user)
            .map_err(|e| PgError::Io {
                what: format!("look up user {user}"),
                reason: e.to_string(),
            })?
            .ok_or_else(|| PgError::Io {
                what: format!("look up user {user}"),
                reason: "no such user: create it or set [postgres] run_as".into(),
            })?;
        Ok(Some((u.uid, u.gid)))
    }

    /// `chown` a path the agent created to the run_as user, so PostgreSQL can use it.
    pub fn chown_to_run_as(&self, path: &Path) -> PgResult<()> {
        let Some((uid, gid)) = self.owner()? else {
            return Ok(());
        };
        nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|e| PgError::Io {
            what: format!("chown {}", path.display()),
            reason: e.to_string(),
        })
    }
}

fn tail(stderr: &str, stdout: &str) -> String {
    let s = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let lines: Vec<&str> = s.lines().rev().take(8).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The parts of `pg_controldata` the agent decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlData {
    /// "shut down", "shut down in recovery", "in production", "in archive recovery", ...
    pub state: String,
    pub system_identifier: u64,
    pub checkpoint_lsn: Lsn,
    pub redo_lsn: Lsn,
    pub timeline: u32,
}

impl ControlData {
    /// Cleanly stopped: the last checkpoint is a shutdown checkpoint, nothing to replay.
    pub fn is_clean_shutdown(&self) -> bool {
        self.state == "shut down" || self.state == "shut down in recovery"
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let get = |key: &str| -> Result<String, String> {
            text.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim() == key).then(|| v.trim().to_owned())
                })
                .ok_or_else(|| format!("pg_controldata printed no {key:?}"))
        };
        let lsn = |v: String| v.parse::<Lsn>().map_err(|e| e.to_string());
        Ok(Self {
            state: get("Database cluster state")?,
            system_identifier: get("Database system identifier")?
                .parse()
                .map_err(|e| format!("system identifier: {e}"))?,
            checkpoint_lsn: lsn(get("Latest checkpoint location")?)?,
            redo_lsn: lsn(get("Latest checkpoint's REDO location")?)?,
            timeline: get("Latest checkpoint's TimeLineID")?
                .parse()
                .map_err(|e| format!("timeline: {e}"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7312345678901234567
Database cluster state:               shut down
pg_control last modified:             Mon 01 Jan 2024 00:00:00 AM UTC
Latest checkpoint location:           0/3000028
Latest checkpoint's REDO location:    0/3000028
Latest checkpoint's REDO WAL file:    000000010000000000000003
Latest checkpoint's TimeLineID:       1
";

    #[test]
    fn parses_controldata() {
        let c = ControlData::parse(SAMPLE).unwrap();
        assert_eq!(c.state, "shut down");
        assert!(c.is_clean_shutdown());
        assert_eq!(c.system_identifier, 7312345678901234567);
        assert_eq!(c.checkpoint_lsn, Lsn(0x3000028));
        assert_eq!(c.redo_lsn, Lsn(0x3000028));
        assert_eq!(c.timeline, 1);
        assert!(ControlData::parse("garbage").is_err());
    }
}
