//! Turning this server into a streaming replica: configure_standby, rewind, reseed.
//!
//! These are how a failed or demoted primary comes back. pg_rewind is cheap (it copies only
//! the blocks changed since the timelines diverged) but needs a clean history; pg_basebackup
//! (reseed) always works but copies everything. Both rewrite the data dir from the source,
//! including our marker files, so the target's own epoch and fence state are carried across.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{Instrument, info, info_span, warn};

use super::conninfo::Conninfo;
use super::{PgError, PgInstance, PgResult, StopMode, validate_slot};

const REWIND_TIMEOUT: Duration = Duration::from_secs(3600);
const BASEBACKUP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl PgInstance {
    fn application_name(&self) -> String {
        self.cfg.application_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "dr-agent".into())
        })
    }

    /// The conninfo a standby streams with: the coordinator's (host, port) plus the
    /// replication user and password known locally.
    fn streaming_conninfo(&self, primary: &str) -> PgResult<Conninfo> {
        let mut c = Conninfo::parse(primary)?
            .with_default("user", &self.cfg.replication.user)
            .with_default("application_name", &self.application_name());
        if let Some(src) = &self.cfg.replication.password {
            c = c.with_default("password", &src.resolve(&self.env)?);
        }
        Ok(c)
    }

    /// Makes this server a standby of `primary_conninfo` (using `slot` if given) and makes
    /// sure it runs. Idempotent. When running, the settings go through ALTER SYSTEM (a
    /// running replica only reloads; a running primary restarts as a standby, which is only
    /// safe if it has not diverged: the caller rewinds first); when stopped, they are written
    /// into postgresql.auto.conf.
    pub async fn configure_standby(
        &self,
        primary_conninfo: &str,
        slot: Option<&str>,
    ) -> PgResult<()> {
        let _g = self.op_lock.lock().await;
        self.configure_standby_locked(primary_conninfo, slot).await
    }

    pub(super) async fn configure_standby_locked(
        &self,
        primary_conninfo: &str,
        slot: Option<&str>,
    ) -> PgResult<()> {
        if let Some(s) = slot {
            validate_slot(s)?;
        }
        let conninfo = self.streaming_conninfo(primary_conninfo)?;
        async {
            let settings = [
                ("primary_conninfo", conninfo.expose()),
                ("primary_slot_name", slot.unwrap_or("").to_owned()),
                (
                    "wal_receiver_timeout",
                    format!("{}ms", self.cfg.wal_receiver_timeout.as_millis()),
                ),
            ];
            let running = self.is_running()?;
            let mut was_replica = false;
            if running {
                let mut c = self.connect().await?;
                was_replica = sqlx::query_scalar("select pg_is_in_recovery()")
                    .fetch_one(&mut c)
                    .await
                    .map_err(PgError::query("query recovery state"))?;
                // The value may hold a password: keep it out of the server log too.
                sqlx::query("set log_statement = 'none'")
                    .execute(&mut c)
                    .await
                    .map_err(PgError::query("set log_statement"))?;
                for (k, v) in &settings {
                    sqlx::query(&format!("alter system set {k} = {}", sql_literal(v)))
                        .execute(&mut c)
                        .await
                        .map_err(PgError::query("alter system"))?;
                }
                if was_replica {
                    sqlx::query("select pg_reload_conf()")
                        .execute(&mut c)
                        .await
                        .map_err(PgError::query("pg_reload_conf"))?;
                }
            } else {
                self.write_auto_conf(&settings)?;
            }
            self.touch(&self.standby_signal())?;
            if running && !was_replica {
                info!("restarting the primary as a standby");
                self.stop_locked(StopMode::Fast, self.cfg.stop_timeout)
                    .await?;
            }
            self.start_locked().await?;
            info!(primary = %conninfo, ?slot, "configured as standby");
            Ok(())
        }
        .instrument(info_span!("pg_configure_standby", cluster = %self.cfg.cluster))
        .await
    }

    /// Rewinds this (old primary) data dir onto `source_conninfo`'s timeline, then
    /// configures it as a standby of that source. Stops the server cleanly first.
    /// The source connection uses the superuser (pg_rewind reads files through SQL); the
    /// standby connection uses the replication user.
    pub async fn rewind(&self, source_conninfo: &str, slot: Option<&str>) -> PgResult<()> {
        let _g = self.op_lock.lock().await;
        async {
            let mut src = Conninfo::parse(source_conninfo)?
                .with_default("user", &self.cfg.superuser.user)
                .with_default("dbname", &self.cfg.superuser.database);
            let mut env = Vec::new();
            if let Some(pw) = src.get("password").map(str::to_owned) {
                env.push(("PGPASSWORD", pw));
                src = src.without_password();
            } else if let Some(p) = &self.cfg.superuser.password {
                env.push(("PGPASSWORD", p.resolve(&self.env)?));
            }
            if self.is_running()? {
                let r = self.stop_locked(StopMode::Fast, self.cfg.stop_timeout).await?;
                if !r.clean {
                    warn!(state = %r.state, "not cleanly stopped; pg_rewind will run crash recovery first");
                }
            }
            let snap = self.markers.snapshot()?;
            info!(source = %src, "pg_rewind");
            let args: Vec<OsString> = vec![
                "--target-pgdata".into(),
                self.cfg.data_dir.clone().into(),
                "--source-server".into(),
                src.expose().into(),
            ];
            let res = self.runner.run_ok("pg_rewind", &args, &env, REWIND_TIMEOUT).await;
            // Whatever pg_rewind did to them, our markers are ours.
            self.markers.restore(&snap)?;
            let out = res?;
            info!(output = %out.stdout.lines().chain(out.stderr.lines()).last().unwrap_or(""), "pg_rewind done");
            self.configure_standby_locked(source_conninfo, slot).await
        }
        .instrument(info_span!("pg_rewind", cluster = %self.cfg.cluster))
        .await
    }

    /// Replaces this data dir by a fresh pg_basebackup of `source_conninfo` and starts it as
    /// a standby. The old dir is kept as `<data_dir>.old-<ts>` until the new one runs, and
    /// then removed.
    pub async fn reseed(&self, source_conninfo: &str, slot: Option<&str>) -> PgResult<()> {
        let _g = self.op_lock.lock().await;
        if let Some(s) = slot {
            validate_slot(s)?;
        }
        async {
            let conn = self.streaming_conninfo(source_conninfo)?;
            let mut env = Vec::new();
            if let Some(pw) = conn.get("password") {
                env.push(("PGPASSWORD", pw.to_owned()));
            }
            let conn = conn.without_password();
            let ts = chrono::Utc::now().format("%Y%m%dT%H%M%S");
            let data = self.cfg.data_dir.clone();
            let sibling = |suffix: String| PathBuf::from(format!("{}.{suffix}", data.display()));
            let new_dir = sibling(format!("new-{ts}"));
            let old_dir = sibling(format!("old-{ts}"));
            let snap = if data.is_dir() {
                Some(self.markers.snapshot()?)
            } else {
                None
            };
            remove_dir_if_exists(&new_dir).await?;

            info!(source = %conn, "pg_basebackup");
            let mut args: Vec<OsString> = vec![
                "-D".into(),
                new_dir.clone().into(),
                "-X".into(),
                "stream".into(),
                "-R".into(),
                "-c".into(),
                "fast".into(),
                "-d".into(),
                conn.expose().into(),
            ];
            if let Some(s) = slot {
                args.push("-S".into());
                args.push(s.into());
            }
            if let Err(e) = self
                .runner
                .run_ok("pg_basebackup", &args, &env, BASEBACKUP_TIMEOUT)
                .await
            {
                // Leave nothing half-copied behind; the old dir is untouched.
                if let Err(e2) = remove_dir_if_exists(&new_dir).await {
                    warn!(error = %e2, "removing the partial base backup");
                }
                return Err(e);
            }
            if self.is_running()? {
                self.stop_locked(StopMode::Fast, self.cfg.stop_timeout)
                    .await?;
            }
            let had_old = data.is_dir();
            if had_old {
                rename(&data, &old_dir)?;
            }
            rename(&new_dir, &data)?;
            fsync_parent(&data)?;
            if let Some(snap) = &snap {
                self.markers.restore(snap)?;
            }
            match self.configure_standby_locked(source_conninfo, slot).await {
                Ok(()) => {
                    if had_old {
                        remove_dir_if_exists(&old_dir).await?;
                    }
                    Ok(())
                }
                Err(e) => Err(PgError::Io {
                    what: format!(
                        "start the reseeded data dir (the previous one is kept at {})",
                        old_dir.display()
                    ),
                    reason: e.to_string(),
                }),
            }
        }
        .instrument(info_span!("pg_reseed", cluster = %self.cfg.cluster))
        .await
    }

    /// Rewrites postgresql.auto.conf with `settings` replacing any earlier lines for them
    /// (server stopped). Written as the run_as user's file, atomically.
    fn write_auto_conf(&self, settings: &[(&str, String)]) -> PgResult<()> {
        let p = self.cfg.data_dir.join("postgresql.auto.conf");
        let old = match std::fs::read_to_string(&p) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(PgError::Io {
                    what: format!("read {}", p.display()),
                    reason: e.to_string(),
                });
            }
        };
        let mut out: String = old
            .lines()
            .filter(|l| {
                let key = l.split(['=', ' ', '\t']).next().unwrap_or("").trim();
                !settings.iter().any(|(k, _)| key.eq_ignore_ascii_case(k))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        for (k, v) in settings {
            out.push_str(&format!("{k} = {}\n", sql_literal(v)));
        }
        let tmp = p.with_extension("conf.dr-tmp");
        let io = |what: &str, e: std::io::Error| PgError::Io {
            what: format!("{what} {}", p.display()),
            reason: e.to_string(),
        };
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io("write", e))?;
            f.write_all(out.as_bytes()).map_err(|e| io("write", e))?;
            f.sync_all().map_err(|e| io("fsync", e))?;
        }
        self.runner.chown_to_run_as(&tmp)?;
        std::fs::rename(&tmp, &p).map_err(|e| io("rename onto", e))
    }

    fn touch(&self, p: &Path) -> PgResult<()> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| PgError::Io {
                what: format!("create {}", p.display()),
                reason: e.to_string(),
            })?;
        self.runner.chown_to_run_as(p)
    }
}

/// A single-quoted SQL / postgresql.conf literal.
fn sql_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

fn rename(from: &Path, to: &Path) -> PgResult<()> {
    std::fs::rename(from, to).map_err(|e| PgError::Io {
        what: format!("rename {} to {}", from.display(), to.display()),
        reason: e.to_string(),
    })
}

fn fsync_parent(p: &Path) -> PgResult<()> {
    let parent = p.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| PgError::Io {
            what: format!("fsync {}", parent.display()),
            reason: e.to_string(),
        })
}

async fn remove_dir_if_exists(p: &Path) -> PgResult<()> {
    let p = p.to_owned();
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PgError::Io {
            what: format!("remove {}", p.display()),
            reason: e.to_string(),
        }),
    })
    .await
    .map_err(|e| PgError::Io {
        what: "remove a directory".into(),
        reason: e.to_string(),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_quotes() {
        assert_eq!(sql_literal("a'b"), "'a''b'");
    }
}
