//! Local health checks: each configured check probes on its own interval, bounded by its
//! timeout, and its latest [`pb::CheckResult`] is kept for the next heartbeat.
//!
//! Why here and not in the coordinator: the coordinator can only see whether an agent is
//! connected; whether PostgreSQL answers on this host is only visible from this host, and the
//! failure detector needs both. Checks run locally even while no coordinator is reachable,
//! so the first heartbeat after a reconnect carries fresh results.
//!
//! Cost at rest matters (an agent on every host, five checks a second): probes keep their
//! connection between runs (see `http`, `postgres`), timers are plain `tokio::time::interval`
//! ticks, and nothing polls. A result is reported as `UNKNOWN` until the first run finishes
//! and when a run times out (the proto's meaning of UNKNOWN).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dr_proto::pb;
use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::{CheckSpec, Probe};
use crate::metrics::Metrics;

pub mod command;
pub mod disk;
pub mod http;
pub mod postgres;
pub mod process;
pub mod tcp;
pub mod wal_archive;

/// What one probe run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    Fail(String),
    /// Timed out or could not run at all: no verdict either way.
    Unknown(String),
}

impl Outcome {
    pub fn state(&self) -> pb::CheckState {
        match self {
            Outcome::Pass(_) => pb::CheckState::Passing,
            Outcome::Fail(_) => pb::CheckState::Failing,
            Outcome::Unknown(_) => pb::CheckState::Unknown,
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            Outcome::Pass(d) | Outcome::Fail(d) | Outcome::Unknown(d) => d,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("no check named `{0}` is configured on this host")]
    UnknownCheck(String),
}

/// A probe plus the state it keeps between runs (open connections, TLS config).
pub struct Prober {
    probe: Probe,
    state: ProberState,
}

enum ProberState {
    Stateless,
    Http(http::HttpState),
    Postgres(postgres::PgState),
    WalArchive(wal_archive::WalArchiveState),
}

impl Prober {
    /// `interval` is the check's (it decides when `wal_archive` forces a segment switch);
    /// smoke tests pass zero.
    pub fn new(probe: Probe, interval: Duration) -> Self {
        let state = match &probe {
            Probe::WalArchive { url, rpo } => {
                ProberState::WalArchive(wal_archive::WalArchiveState::new(url, *rpo, interval))
            }
            Probe::Http { url, ca, .. } => ProberState::Http(http::HttpState::new(url, ca.clone())),
            Probe::Postgres { url, query, expect } => {
                ProberState::Postgres(postgres::PgState::new(url, query, expect.as_deref()))
            }
            _ => ProberState::Stateless,
        };
        Self { probe, state }
    }

    /// Runs the probe once, at most `timeout`.
    ///
    /// Cancel safety: yes; probes keep no half-used connection (see the probe modules) and
    /// command children are killed.
    pub async fn run(&mut self, timeout: Duration, cancel: &CancellationToken) -> Outcome {
        let fut = async {
            match (&self.probe, &mut self.state) {
                (Probe::Tcp { addr }, _) => tcp::probe(addr).await,
                (Probe::Http { expect_status, .. }, ProberState::Http(st)) => {
                    st.probe(*expect_status).await
                }
                (Probe::Postgres { .. }, ProberState::Postgres(st)) => st.probe().await,
                (Probe::WalArchive { .. }, ProberState::WalArchive(st)) => st.probe().await,
                (
                    Probe::Disk {
                        path,
                        min_free_percent,
                        min_free_bytes,
                    },
                    _,
                ) => disk::probe(path, *min_free_percent, *min_free_bytes).await,
                (Probe::Process { pidfile }, _) => process::probe(pidfile).await,
                // The command runner enforces the timeout itself (and kills the group).
                (Probe::Command { command }, _) => command::probe(command, timeout, cancel).await,
                (p, _) => Outcome::Unknown(format!("internal: no state for a {} probe", p.kind())),
            }
        };
        let grace = if matches!(self.probe, Probe::Command { .. }) {
            Duration::from_secs(2)
        } else {
            Duration::ZERO
        };
        match tokio::time::timeout(timeout + grace, fut).await {
            Ok(o) => o,
            Err(_) => Outcome::Unknown(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
        }
    }

    pub async fn close(&mut self) {
        match &mut self.state {
            ProberState::Postgres(st) => st.close().await,
            ProberState::WalArchive(st) => st.close().await,
            _ => {}
        }
    }
}

struct CheckSlot {
    spec: CheckSpec,
    prober: tokio::sync::Mutex<Prober>,
    latest: Mutex<pb::CheckResult>,
}

/// The configured checks and their latest results. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    slots: Arc<BTreeMap<String, CheckSlot>>,
    metrics: Arc<Metrics>,
    /// Results of checks that are not probes run here but verdicts of another subsystem
    /// (the integrity monitor's `integrity:<path>`); reported with the others.
    external: Arc<Mutex<BTreeMap<String, pb::CheckResult>>>,
    /// Every check interval is divided by this (1 = as configured); raised by
    /// `security-monitoring level=high`.
    interval_divisor: tokio::sync::watch::Sender<u32>,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Health {
    pub fn new(specs: &[CheckSpec], metrics: Arc<Metrics>) -> Self {
        let slots = specs
            .iter()
            .map(|spec| {
                let latest = pb::CheckResult {
                    name: spec.name.clone(),
                    service: spec.service.clone(),
                    tier: spec.tier as i32,
                    state: pb::CheckState::Unknown as i32,
                    detail: "not run yet".into(),
                    duration_ms: 0,
                    observed_at_unix_ms: 0,
                };
                metrics.set_check_state(&spec.name, &spec.service, pb::CheckState::Unknown);
                let slot = CheckSlot {
                    spec: spec.clone(),
                    prober: tokio::sync::Mutex::new(Prober::new(spec.probe.clone(), spec.interval)),
                    latest: Mutex::new(latest),
                };
                (spec.name.clone(), slot)
            })
            .collect();
        Self {
            slots: Arc::new(slots),
            metrics,
            external: Arc::default(),
            interval_divisor: tokio::sync::watch::Sender::new(1),
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.slots.keys().cloned().collect();
        names.extend(lock(&self.external).keys().cloned());
        names
    }

    /// The latest result of every check (for a heartbeat).
    pub fn latest(&self) -> Vec<pb::CheckResult> {
        let mut all: Vec<pb::CheckResult> = self
            .slots
            .values()
            .map(|s| lock(&s.latest).clone())
            .collect();
        all.extend(lock(&self.external).values().cloned());
        all
    }

    /// Records the verdict of a check run elsewhere (see `external`); logged and counted
    /// like a probe's when its state changes.
    pub fn report_external(&self, result: pb::CheckResult) {
        let previous = lock(&self.external).insert(result.name.clone(), result.clone());
        if previous.is_none_or(|p| p.state != result.state) {
            let state = pb::CheckState::try_from(result.state).unwrap_or(pb::CheckState::Unknown);
            if state == pb::CheckState::Failing {
                warn!(check = %result.name, state = state.as_str_name(), detail = %result.detail, "check state changed");
            } else {
                info!(check = %result.name, state = state.as_str_name(), detail = %result.detail, "check state changed");
            }
            self.metrics
                .set_check_state(&result.name, &result.service, state);
        }
    }

    /// Runs every check `divisor` times as often as configured (1 restores the config).
    pub fn set_interval_divisor(&self, divisor: u32) {
        self.interval_divisor.send_replace(divisor.max(1));
    }

    /// Runs the named checks now (all when `names` is empty), concurrently, and returns their
    /// results. Unknown names are refused before anything runs.
    pub async fn run_now(
        &self,
        names: &[String],
        cancel: &CancellationToken,
    ) -> Result<Vec<pb::CheckResult>, HealthError> {
        let slots: Vec<&CheckSlot> = if names.is_empty() {
            self.slots.values().collect()
        } else {
            names
                .iter()
                .map(|n| {
                    self.slots
                        .get(n)
                        .ok_or_else(|| HealthError::UnknownCheck(n.clone()))
                })
                .collect::<Result<_, _>>()?
        };
        Ok(join_all(slots.into_iter().map(|s| self.run_one(s, cancel))).await)
    }

    async fn run_one(&self, slot: &CheckSlot, cancel: &CancellationToken) -> pb::CheckResult {
        let spec = &slot.spec;
        let started = Instant::now();
        let outcome = slot.prober.lock().await.run(spec.timeout, cancel).await;
        let result = pb::CheckResult {
            name: spec.name.clone(),
            service: spec.service.clone(),
            tier: spec.tier as i32,
            state: outcome.state() as i32,
            detail: outcome.detail().to_string(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            observed_at_unix_ms: unix_ms(SystemTime::now()),
        };
        let previous = std::mem::replace(&mut *lock(&slot.latest), result.clone());
        if previous.state != result.state {
            let state = outcome.state().as_str_name();
            match outcome {
                Outcome::Pass(_) => {
                    info!(check = %spec.name, state, detail = %result.detail, "check state changed")
                }
                _ => {
                    warn!(check = %spec.name, state, detail = %result.detail, "check state changed")
                }
            }
            self.metrics
                .set_check_state(&spec.name, &spec.service, outcome.state());
        }
        result
    }

    /// Runs every check on its interval until `cancel` fires.
    ///
    /// Cancel safety: yes (see [`Prober::run`]); kept connections are closed on the way out.
    pub async fn run(self, cancel: CancellationToken) {
        let this = &self;
        let loops = self.slots.values().map(|slot| {
            let cancel = cancel.clone();
            let mut divisor = this.interval_divisor.subscribe();
            async move {
                let period =
                    |d: u32| (slot.spec.interval / d.max(1)).max(Duration::from_millis(100));
                let mut tick = tokio::time::interval(period(*divisor.borrow_and_update()));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        _ = tick.tick() => {}
                        Ok(()) = divisor.changed() => {
                            // New pace: the next run comes one new period from now.
                            let p = period(*divisor.borrow_and_update());
                            tick = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            continue;
                        }
                    }
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        _ = this.run_one(slot, &cancel) => {}
                    }
                }
                slot.prober.lock().await.close().await;
            }
            .instrument(info_span!("check", name = %slot.spec.name, kind = slot.spec.probe.kind()))
        });
        join_all(loops).await;
    }
}

/// A poisoned lock only means another task panicked mid-update of a plain value; the value
/// is still a valid result, so keep going.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, probe: Probe) -> CheckSpec {
        CheckSpec {
            name: name.into(),
            service: "svc".into(),
            tier: pb::Tier::Critical,
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(2),
            probe,
        }
    }

    #[tokio::test]
    async fn periodic_results_and_run_now() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let specs = vec![
            spec("port", Probe::Tcp { addr }),
            spec(
                "script",
                Probe::Command {
                    command: vec!["false".into()],
                },
            ),
        ];
        let health = Health::new(&specs, Arc::new(Metrics::new()));
        assert!(
            health
                .latest()
                .iter()
                .all(|r| r.state == pb::CheckState::Unknown as i32)
        );

        let cancel = CancellationToken::new();
        let task = tokio::spawn(health.clone().run(cancel.clone()));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let latest = health.latest();
            if latest
                .iter()
                .all(|r| r.state != pb::CheckState::Unknown as i32)
            {
                assert_eq!(latest[0].state, pb::CheckState::Passing as i32);
                assert_eq!(latest[1].state, pb::CheckState::Failing as i32);
                break;
            }
            assert!(Instant::now() < deadline, "checks never ran: {latest:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = health.run_now(&["port".into()], &cancel).await.unwrap();
        assert_eq!(now.len(), 1);
        assert!(matches!(
            health.run_now(&["nope".into()], &cancel).await,
            Err(HealthError::UnknownCheck(_))
        ));
        cancel.cancel();
        task.await.unwrap();
    }
}
