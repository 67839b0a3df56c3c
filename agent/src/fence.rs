//! Self-fencing: a primary that cannot prove it still holds its lease stops itself.
//!
//! DESIGN.md ("Fencing"): the coordinator promotes elsewhere only after the primary's lease
//! (plus a drift margin) has run out, so by then this host MUST no longer accept writes.
//! A read-only setting can be undone by any superuser client, so the fence is certain:
//!
//! 1. write `<data_dir>/dr_fenced` first, so `start()` (and a racing start) refuses to bring
//!    the server back as a primary until an explicit `unfence(epoch)`;
//! 2. stop PostgreSQL: fast shutdown, immediate if fast does not finish within
//!    `fast_stop_bound`, SIGKILL of the postmaster as the last resort;
//! 3. at the same time run the `stop_writes_hooks` so the region's application hosts stop
//!    writing too.
//!
//! The lease arrives as a `watch` of the session's last [`Lease`] (the session sends the
//! renewal, counts from the moment it SENT it, and publishes it). [`FenceTask`] sleeps until
//! the deadline and is re-armed by each renewal: no polling. `None` means no lease was ever
//! granted; then the deadline is `initial_grace` after the task started, so a primary whose
//! agent never reaches a coordinator still fences. A later `None` never extends a lease.
//!
//! Only a lease that names a database cluster (the coordinators' recorded primary) arms the
//! fence. The plain session lease (no topology yet, or a host in no database cluster) means
//! no failover plan will ever promote another server in this one's place, so there is
//! nothing to fence against: it disarms the fence instead. Without this, a coordinator
//! leader crash (plain lease = 3 heartbeats) stopped every unmanaged database.
//!
//! Only a primary is fenced: a data dir with `standby.signal` cannot accept writes, so an
//! expired lease there is only logged. If the agent itself dies nothing fences: run it under
//! systemd with `WatchdogSec` and bind the database unit to it (operator guide).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::pg::{PgError, PgInstance, StopReport};
use crate::session::Lease;

pub mod defaults {
    use std::time::Duration;
    pub const FAST_STOP_BOUND: Duration = Duration::from_secs(10);
    pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
    pub const INITIAL_GRACE: Duration = Duration::from_secs(30);
    pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
}

/// `[fence]` table of the agent config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceConfig {
    /// Time a fast shutdown gets before the fence escalates to immediate.
    #[serde(default = "d_fast_stop_bound", with = "humantime_serde")]
    pub fast_stop_bound: Duration,
    /// Commands (argv, no shell) that make this region's application hosts stop writing.
    /// They get `DR_FENCE_REASON` and `DR_CLUSTER` in their environment.
    #[serde(default)]
    pub stop_writes_hooks: Vec<Vec<String>>,
    #[serde(default = "d_hook_timeout", with = "humantime_serde")]
    pub hook_timeout: Duration,
    /// Lease deadline, counted from agent start, while no lease was ever granted.
    #[serde(default = "d_initial_grace", with = "humantime_serde")]
    pub initial_grace: Duration,
}

fn d_fast_stop_bound() -> Duration {
    defaults::FAST_STOP_BOUND
}
fn d_hook_timeout() -> Duration {
    defaults::HOOK_TIMEOUT
}
fn d_initial_grace() -> Duration {
    defaults::INITIAL_GRACE
}

impl Default for FenceConfig {
    fn default() -> Self {
        Self {
            fast_stop_bound: defaults::FAST_STOP_BOUND,
            stop_writes_hooks: vec![],
            hook_timeout: defaults::HOOK_TIMEOUT,
            initial_grace: defaults::INITIAL_GRACE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// PostgreSQL may still accept writes.
    #[error("fence could not stop PostgreSQL: {0}")]
    Stop(#[source] PgError),
    #[error("fence could not inspect the data dir: {0}")]
    Inspect(#[source] PgError),
    #[error("invalid [fence] config: {0}")]
    Config(String),
}

pub type FenceResult<T> = Result<T, FenceError>;

/// Outcome of one stop-writes hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookOutcome {
    pub program: String,
    pub ok: bool,
    pub detail: String,
}

/// What a fence did. `Err` from [`Fencer::fence`] is reserved for "the database may still
/// be writable"; a failed hook or marker is reported here (and logged as an error).
#[derive(Clone, Debug, Serialize)]
pub struct FenceReport {
    pub reason: String,
    pub was_running: bool,
    pub stop: Option<StopReport>,
    /// Writing `dr_fenced` failed (the server is stopped, but could be started again).
    pub marker_error: Option<String>,
    pub hooks: Vec<HookOutcome>,
}

/// Performs fences; shared by the lease task and the coordinator's `pg.fence` action.
#[derive(Debug)]
pub struct Fencer {
    pg: Arc<PgInstance>,
    cfg: FenceConfig,
}

impl Fencer {
    pub fn new(pg: Arc<PgInstance>, cfg: FenceConfig) -> FenceResult<Self> {
        if cfg
            .stop_writes_hooks
            .iter()
            .any(|h| h.first().is_none_or(|p| p.is_empty()))
        {
            return Err(FenceError::Config(
                "stop_writes_hooks: every hook needs a program".into(),
            ));
        }
        Ok(Self { pg, cfg })
    }

    pub fn pg(&self) -> &Arc<PgInstance> {
        &self.pg
    }

    /// Fences now: marker, stop (bounded fast, then immediate), stop-writes hooks.
    /// Idempotent; the first marker (its reason and time) is kept.
    pub async fn fence(&self, reason: &str) -> FenceResult<FenceReport> {
        let span = info_span!("fence", cluster = %self.pg.config().cluster, reason);
        async {
            error!("FENCING postgresql: stopping it and telling application hosts to stop writing");
            let was_running = self.pg.is_running().map_err(FenceError::Inspect)?;
            // The marker first; its failure must not keep us from stopping.
            let marker_error = match self.pg.fence_marker() {
                Ok(Some(_)) => None,
                _ => self.pg.mark_fenced(reason).err().map(|e| e.to_string()),
            };
            if let Some(e) = &marker_error {
                error!(error = %e, "could not write the fence marker; stopping anyway");
            }
            let stop = async {
                if was_running {
                    self.pg
                        .stop_for_fence(self.cfg.fast_stop_bound)
                        .await
                        .map(Some)
                } else {
                    Ok(None)
                }
            };
            let (stop, hooks) = tokio::join!(stop, self.run_hooks(reason));
            let stop = stop.map_err(|e| {
                error!(error = %e, "FENCE FAILED: postgresql may still accept writes");
                FenceError::Stop(e)
            })?;
            for h in hooks.iter().filter(|h| !h.ok) {
                error!(program = %h.program, detail = %h.detail, "stop-writes hook failed");
            }
            error!(
                was_running,
                hooks_ok = hooks.iter().filter(|h| h.ok).count(),
                hooks_failed = hooks.iter().filter(|h| !h.ok).count(),
                "FENCED: postgresql is stopped and will not start as a primary until unfenced"
            );
            Ok(FenceReport {
                reason: reason.to_owned(),
                was_running,
                stop,
                marker_error,
                hooks,
            })
        }
        .instrument(span)
        .await
    }

    async fn run_hooks(&self, reason: &str) -> Vec<HookOutcome> {
        let runs = self.cfg.stop_writes_hooks.iter().map(|argv| async move {
            let program = argv.first().cloned().unwrap_or_default();
            let mut cmd = tokio::process::Command::new(&program);
            cmd.args(&argv[1..])
                .env("DR_FENCE_REASON", reason)
                .env("DR_CLUSTER", &self.pg.config().cluster)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            let (ok, detail) = match tokio::time::timeout(self.cfg.hook_timeout, cmd.output()).await
            {
                Err(_) => (
                    false,
                    format!("timed out after {:?}", self.cfg.hook_timeout),
                ),
                Ok(Err(e)) => (false, format!("cannot run: {e}")),
                Ok(Ok(o)) if o.status.success() => (true, "ok".to_owned()),
                Ok(Ok(o)) => (
                    false,
                    format!(
                        "{}: {}",
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                ),
            };
            HookOutcome {
                program,
                ok,
                detail,
            }
        });
        futures::future::join_all(runs).await
    }

    /// The lease ran out: fence if this data dir could act as a primary. `Ok(None)` when it
    /// is a standby (nothing to fence).
    async fn on_lease_expired(&self, late_by: Duration) -> FenceResult<Option<FenceReport>> {
        let standby = self.pg.config().data_dir.join("standby.signal");
        if standby.is_file() {
            info!("lease expired on a standby: nothing to fence");
            return Ok(None);
        }
        let reason = format!("lease expired {} ms ago", late_by.as_millis());
        self.fence(&reason).await.map(Some)
    }
}

/// Watches the lease and fences when it runs out. See the module docs.
pub struct FenceTask {
    fencer: Arc<Fencer>,
    lease: watch::Receiver<Option<Lease>>,
}

/// Where the task is, for tests and status pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Armed {
    /// Will fence at this instant unless renewed.
    Until(Instant),
    /// Fired (or a standby at expiry); waiting for a renewal to re-arm.
    Fired,
    /// Holding a plain lease: not a failover-managed primary, nothing to fence against.
    Disarmed,
}

/// What a published lease means for the fence (`None`: a plain lease, disarm).
fn deadline_of(lease: &Lease) -> Option<Instant> {
    (!lease.db_cluster.is_empty()).then_some(lease.valid_until)
}

impl FenceTask {
    pub fn new(fencer: Arc<Fencer>, lease: watch::Receiver<Option<Lease>>) -> Self {
        Self { fencer, lease }
    }

    /// Runs until `cancel`. Cancel safety: a fence in progress is finished before the task
    /// looks at the token again (a half-done fence is worse than a late shutdown).
    pub async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let grace = self.fencer.cfg.initial_grace;
        let mut state = match self.lease.borrow_and_update().as_ref() {
            Some(l) => deadline_of(l).map_or(Armed::Disarmed, Armed::Until),
            None => Armed::Until(Instant::now() + grace),
        };
        let mut sender_alive = true;
        let span = info_span!("fence_task", cluster = %self.fencer.pg.config().cluster);
        async {
            loop {
                let armed = state;
                let sleep = async move {
                    match armed {
                        Armed::Until(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                        Armed::Fired | Armed::Disarmed => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    changed = self.lease.changed(), if sender_alive => {
                        if changed.is_err() {
                            // The session is gone: nobody can renew any more. Keep the deadline.
                            warn!("lease channel closed; the lease can no longer be renewed");
                            sender_alive = false;
                            continue;
                        }
                        let renewed = self.lease.borrow_and_update().clone();
                        match renewed.as_ref().map(deadline_of) {
                            Some(Some(d)) if d > Instant::now() => {
                                if state == Armed::Fired {
                                    info!("lease granted again; fence re-armed (an existing fence stays until unfence)");
                                }
                                state = Armed::Until(d);
                            }
                            Some(None) if state != Armed::Fired => {
                                if state != Armed::Disarmed {
                                    info!("plain session lease (this host is no recorded primary of a database cluster): fence disarmed");
                                }
                                state = Armed::Disarmed;
                            }
                            _ => {}
                        }
                    }
                    _ = sleep => {
                        let Armed::Until(d) = state else { continue };
                        let late = Instant::now().saturating_duration_since(d);
                        warn!(late_ms = late.as_millis() as u64, "lease expired");
                        match self.fencer.on_lease_expired(late).await {
                            Ok(_) => state = Armed::Fired,
                            Err(e) => {
                                error!(error = %e, "fence failed, retrying");
                                state = Armed::Until(Instant::now() + defaults::RETRY_INTERVAL);
                            }
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::PgConfig;

    fn fencer(dir: &std::path::Path, hooks: Vec<Vec<String>>) -> Arc<Fencer> {
        let mut cfg = PgConfig::new("t", dir);
        cfg.bin_dir = "/nonexistent".into();
        // run_as = current user, so no user lookup is needed in unit tests
        cfg.run_as = "root".into();
        let pg = Arc::new(PgInstance::with_env(cfg, Default::default()).unwrap());
        Arc::new(
            Fencer::new(
                pg,
                FenceConfig {
                    stop_writes_hooks: hooks,
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    }

    /// On a stopped data dir the fence writes the marker and runs the hooks, without
    /// needing PostgreSQL; the lease task fires once at the deadline and not before.
    #[tokio::test]
    async fn lease_expiry_marks_and_runs_hooks() {
        let d = tempfile::tempdir().unwrap();
        let flag = d.path().join("hook-ran");
        let f = fencer(
            d.path(),
            vec![vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("echo $DR_FENCE_REASON > {}", flag.display()),
            ]],
        );
        let lease = |ms| {
            Some(Lease {
                valid_until: Instant::now() + Duration::from_millis(ms),
                epoch: 1,
                db_cluster: "t".into(),
            })
        };
        let (tx, rx) = watch::channel(lease(200));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(FenceTask::new(f.clone(), rx).run(cancel.clone()));
        // renewals keep it alive
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(lease(200)).unwrap();
        }
        assert!(f.pg().fence_marker().unwrap().is_none());
        tokio::time::sleep(Duration::from_millis(400)).await;
        let m = f.pg().fence_marker().unwrap().expect("fenced after expiry");
        assert!(m.reason.contains("lease expired"));
        assert!(
            std::fs::read_to_string(&flag)
                .unwrap()
                .contains("lease expired")
        );
        cancel.cancel();
        task.await.unwrap().unwrap();
    }

    /// A plain session lease (no database cluster) never fences, even when it runs out,
    /// and it disarms the initial-grace deadline; a primary lease arms the fence again.
    #[tokio::test]
    async fn plain_lease_disarms_the_fence() {
        let d = tempfile::tempdir().unwrap();
        let f = fencer(d.path(), vec![]);
        let plain = Some(Lease {
            valid_until: Instant::now() + Duration::from_millis(50),
            epoch: 0,
            db_cluster: String::new(),
        });
        let (tx, rx) = watch::channel(plain);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(FenceTask::new(f.clone(), rx).run(cancel.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            f.pg().fence_marker().unwrap().is_none(),
            "a plain lease fenced"
        );
        tx.send(Some(Lease {
            valid_until: Instant::now() + Duration::from_millis(100),
            epoch: 1,
            db_cluster: "t".into(),
        }))
        .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            f.pg().fence_marker().unwrap().is_some(),
            "primary lease expiry did not fence"
        );
        cancel.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn standby_is_not_fenced_and_bad_hooks_are_reported() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("standby.signal"), "").unwrap();
        let f = fencer(d.path(), vec![vec!["/nonexistent/hook".into()]]);
        assert!(f.on_lease_expired(Duration::ZERO).await.unwrap().is_none());
        assert!(f.pg().fence_marker().unwrap().is_none());
        let r = f.fence("operator").await.unwrap();
        assert!(!r.was_running);
        assert_eq!(r.hooks.len(), 1);
        assert!(!r.hooks[0].ok);
        assert!(
            Fencer::new(
                f.pg().clone(),
                FenceConfig {
                    stop_writes_hooks: vec![vec![]],
                    ..Default::default()
                }
            )
            .is_err()
        );
    }
}
