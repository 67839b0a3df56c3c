//! The agent's one long-lived session with the coordinator leader.
//!
//! ```text
//!  dial (next endpoint, or the remembered leader) ── fail ──> backoff (jittered) ─┐
//!    │ Hello(host, incarnation, known_keys, checks)                                │
//!    ├─ Redirect{leader_endpoint} ──> dial that endpoint at once ──────────────────┤
//!    ├─ Welcome{heartbeat_interval, endpoints} ──> remember leader, reset backoff   │
//!    │    loop: Heartbeat(seq) every interval  ──>                                 │
//!    │          <── LeaseGrant(seq)  : valid until send_instant(seq) + lease_ms    │
//!    │          <── Command / CancelCommand : handed to the executor               │
//!    │          executor's acks, progress, results ──>                             │
//!    └─ stream error / end ──────────────────────────────────────────────────────┘
//! ```
//! Why dial out: locker-site gateways sit behind NAT, so coordinators never call agents.
//!
//! The lease is counted from the moment the heartbeat that earned it was SENT, on the
//! monotonic clock (DESIGN.md, fencing): the grant cannot be older than that instant, so the
//! agent's view of its lease always ends no later than the coordinator's. The fencing module
//! reads it through [`SessionHandle::lease_valid_until`].
//!
//! Shutdown: the cancel token is only looked at between messages, so the message in hand is
//! finished; then the request stream is closed, which ends the RPC cleanly on the server.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dr_proto::pb;
use dr_proto::pb::agent_message::Msg as Out;
use dr_proto::pb::agent_service_client::AgentServiceClient;
use dr_proto::pb::coordinator_message::Msg as In;
use dr_proto::tls::ClientTls;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::exec::Executor;
use crate::health::Health;
use crate::metrics::Metrics;

pub mod backoff;
pub mod stats;

use backoff::Backoff;
use stats::StatsSampler;

/// Metadata key naming the leader's endpoint on an `unavailable` answer (the coordinator's
/// `LEADER_ENDPOINT_HEADER`).
pub const LEADER_ENDPOINT_HEADER: &str = "x-dr-leader-endpoint";
/// How many heartbeat send instants are remembered to match `LeaseGrant.seq`.
const SENT_WINDOW: usize = 64;
/// More consecutive redirects than this without a Welcome means the cluster is electing:
/// back off instead of bouncing between coordinators.
const MAX_REDIRECTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{reason}")]
    Connect { endpoint: String, reason: String },
    #[error("{endpoint}: {status}")]
    Rpc { endpoint: String, status: String },
    #[error("{endpoint} closed the session")]
    Closed { endpoint: String },
    #[error("{endpoint} did not answer Hello in time")]
    NoWelcome { endpoint: String },
}

/// The lease last granted to this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub valid_until: Instant,
    pub epoch: u64,
    pub db_cluster: String,
}

#[derive(Default)]
struct Shared {
    lease: Option<Lease>,
    connected: bool,
    leader: Option<String>,
    facts: HashMap<String, String>,
}

/// What other parts of the agent may read from (or add to) the session. Cheap to clone.
#[derive(Clone)]
pub struct SessionHandle {
    shared: Arc<Mutex<Shared>>,
    /// The lease's end, pushed on every grant: the fence task sleeps on it.
    lease_tx: Arc<tokio::sync::watch::Sender<Option<Lease>>>,
}

impl Default for SessionHandle {
    fn default() -> Self {
        Self {
            shared: Arc::default(),
            lease_tx: Arc::new(tokio::sync::watch::channel(None).0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SessionHandle {
    /// Until when the last lease holds, on the monotonic clock (`None`: never granted).
    pub fn lease_valid_until(&self) -> Option<Instant> {
        lock(&self.shared).lease.as_ref().map(|l| l.valid_until)
    }

    pub fn lease(&self) -> Option<Lease> {
        lock(&self.shared).lease.clone()
    }

    pub fn is_connected(&self) -> bool {
        lock(&self.shared).connected
    }

    /// The leader endpoint learned from Welcome/Redirect.
    pub fn leader(&self) -> Option<String> {
        lock(&self.shared).leader.clone()
    }

    /// Follows the lease as grants arrive (`None`: never granted). A lease without a
    /// `db_cluster` is the plain session lease of a host no failover plan depends on.
    pub fn lease_watch(&self) -> tokio::sync::watch::Receiver<Option<Lease>> {
        self.lease_tx.subscribe()
    }

    /// Sets a fact reported with every heartbeat (e.g. `archive_lag_seconds`).
    pub fn set_fact(&self, key: impl Into<String>, value: impl Into<String>) {
        lock(&self.shared).facts.insert(key.into(), value.into());
    }

    /// Replaces every fact whose key starts with `prefix` by `facts` (keys include the
    /// prefix). A fact that stopped being true must disappear, not linger with its last
    /// value: the coordinator reads e.g. a missing `pg.wal_receiver` as "not streaming".
    pub fn replace_facts(&self, prefix: &str, facts: impl IntoIterator<Item = (String, String)>) {
        let mut s = lock(&self.shared);
        s.facts.retain(|k, _| !k.starts_with(prefix));
        s.facts.extend(facts);
    }

    fn grant(&self, lease: Lease) {
        let mut s = lock(&self.shared);
        // Grants can arrive out of order; a lease never shrinks because of an older answer.
        if s.lease
            .as_ref()
            .is_none_or(|l| l.valid_until <= lease.valid_until)
        {
            s.lease = Some(lease.clone());
            drop(s);
            self.lease_tx.send_replace(Some(lease));
        }
    }
}

/// How one session attempt ended.
enum Ended {
    Shutdown,
    Redirect(String),
    /// `welcomed`: the session got as far as Welcome (the backoff starts over).
    Failed {
        error: SessionError,
        welcomed: bool,
    },
}

pub struct SessionTask {
    config: Arc<Config>,
    tls: ClientTls,
    health: Health,
    executor: Executor,
    outbox: mpsc::Receiver<pb::AgentMessage>,
    metrics: Arc<Metrics>,
    handle: SessionHandle,
    incarnation: u64,
    endpoints: Vec<String>,
    heartbeat_interval: Duration,
    seq: u64,
    sent: VecDeque<(u64, Instant)>,
    stats: StatsSampler,
}

impl SessionTask {
    pub fn new(
        config: Arc<Config>,
        tls: ClientTls,
        health: Health,
        executor: Executor,
        outbox: mpsc::Receiver<pb::AgentMessage>,
        metrics: Arc<Metrics>,
    ) -> (Self, SessionHandle) {
        let handle = SessionHandle::default();
        let task = Self {
            endpoints: config.coordinators.clone(),
            heartbeat_interval: config.session.heartbeat_interval,
            config,
            tls,
            health,
            executor,
            outbox,
            metrics,
            handle: handle.clone(),
            incarnation: rand::random(),
            seq: 0,
            sent: VecDeque::with_capacity(SENT_WINDOW),
            stats: StatsSampler::new(),
        };
        (task, handle)
    }

    /// Keeps a session open until `cancel` fires.
    pub async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let s = &self.config.session;
        let mut backoff = Backoff::new(s.reconnect_min, s.reconnect_max, StdRng::from_os_rng());
        let mut next = 0usize;
        let mut redirects = 0u32;
        let mut failures = 0u64;
        info!(incarnation = self.incarnation, "session starting");
        while !cancel.is_cancelled() {
            let endpoint = match self.handle.leader() {
                Some(leader) => leader,
                None => {
                    let ep = self.endpoints[next % self.endpoints.len()].clone();
                    next = next.wrapping_add(1);
                    ep
                }
            };
            self.metrics.reconnects_total.inc();
            let span = info_span!("session", endpoint = %endpoint);
            let ended = self.attempt(&endpoint, &cancel).instrument(span).await;
            self.metrics.session_connected.set(0);
            lock(&self.handle.shared).connected = false;
            let delay = match ended {
                Ended::Shutdown => break,
                Ended::Redirect(leader) => {
                    redirects += 1;
                    info!(from = %endpoint, to = %leader, "redirected to the leader");
                    lock(&self.handle.shared).leader = Some(leader);
                    if redirects <= MAX_REDIRECTS {
                        None
                    } else {
                        Some(backoff.next_delay())
                    }
                }
                Ended::Failed { error, welcomed } => {
                    // A leader that welcomed us is tried once more (a broken stream is often
                    // just that); one we could not even reach is forgotten, and the next
                    // attempt walks the endpoint list.
                    if welcomed {
                        backoff.reset();
                        redirects = 0;
                        failures = 0;
                    } else {
                        lock(&self.handle.shared).leader = None;
                    }
                    let delay = backoff.next_delay();
                    failures += 1;
                    let retry_in_ms = delay.as_millis() as u64;
                    // Warn when a session is lost and then every tenth failed attempt, so a
                    // coordinator outage is visible without one warning per retry.
                    if welcomed || failures % 10 == 1 {
                        warn!(error = %error, failures, retry_in_ms, "session lost");
                    } else {
                        info!(error = %error, failures, retry_in_ms, "reconnect failed");
                    }
                    Some(delay)
                }
            };
            if let Some(delay) = delay {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
        info!("session stopped");
        Ok(())
    }

    fn hello(&self) -> pb::AgentMessage {
        let c = &self.config;
        pb::AgentMessage {
            msg: Some(Out::Hello(pb::Hello {
                host_id: c.host_id.clone(),
                region: c.region.clone(),
                site: c.site.clone(),
                roles: c.roles.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                incarnation: self.incarnation,
                known_keys: self.executor.known_keys(),
                labels: HashMap::new(),
                check_names: self.health.names(),
            })),
        }
    }

    fn heartbeat(&mut self) -> pb::AgentMessage {
        self.seq += 1;
        let now = Instant::now();
        if self.sent.len() == SENT_WINDOW {
            self.sent.pop_front();
        }
        self.sent.push_back((self.seq, now));
        let facts = lock(&self.handle.shared).facts.clone();
        pb::AgentMessage {
            msg: Some(Out::Heartbeat(pb::Heartbeat {
                seq: self.seq,
                checks: self.health.latest(),
                sent_at_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                stats: Some(self.stats.sample(&self.config.data_dir)),
                facts,
            })),
        }
    }

    /// Applies a LeaseGrant: valid until the send instant of heartbeat `seq` plus `lease_ms`.
    fn on_lease(&self, grant: &pb::LeaseGrant) {
        let Some(&(_, sent)) = self.sent.iter().find(|(s, _)| *s == grant.seq) else {
            debug!(
                seq = grant.seq,
                "lease grant for an unknown heartbeat ignored"
            );
            return;
        };
        self.handle.grant(Lease {
            valid_until: sent + Duration::from_millis(grant.lease_ms),
            epoch: grant.epoch,
            db_cluster: grant.db_cluster.clone(),
        });
    }

    /// One session: dial, Hello, then serve until it ends.
    ///
    /// Cancel safety: cancellation is handled inside, between messages.
    async fn attempt(&mut self, endpoint: &str, cancel: &CancellationToken) -> Ended {
        let connect_timeout = self.config.session.connect_timeout;
        let failed = |error, welcomed| Ended::Failed { error, welcomed };
        let channel = tokio::select! {
            () = cancel.cancelled() => return Ended::Shutdown,
            r = self.tls.connect(endpoint, connect_timeout) => match r {
                Ok(c) => c,
                Err(e) => return failed(SessionError::Connect { endpoint: endpoint.into(), reason: e.to_string() }, false),
            },
        };
        let mut client = AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
        if tx.send(self.hello()).await.is_err() {
            return failed(
                SessionError::Closed {
                    endpoint: endpoint.into(),
                },
                false,
            );
        }
        let call = tokio::time::timeout(connect_timeout, client.session(ReceiverStream::new(rx)));
        let mut inbound = tokio::select! {
            () = cancel.cancelled() => return Ended::Shutdown,
            r = call => match r {
                Err(_) => return failed(SessionError::NoWelcome { endpoint: endpoint.into() }, false),
                Ok(Err(status)) => return self.status_ended(endpoint, &status, false),
                Ok(Ok(resp)) => resp.into_inner(),
            },
        };

        // The first answer must be Welcome or Redirect.
        let first = tokio::select! {
            () = cancel.cancelled() => return Ended::Shutdown,
            r = tokio::time::timeout(connect_timeout, inbound.message()) => r,
        };
        match first {
            Err(_) => {
                return failed(
                    SessionError::NoWelcome {
                        endpoint: endpoint.into(),
                    },
                    false,
                );
            }
            Ok(Err(status)) => return self.status_ended(endpoint, &status, false),
            Ok(Ok(None)) => {
                return failed(
                    SessionError::Closed {
                        endpoint: endpoint.into(),
                    },
                    false,
                );
            }
            Ok(Ok(Some(m))) => match m.msg {
                Some(In::Redirect(r)) if !r.leader_endpoint.is_empty() => {
                    return Ended::Redirect(r.leader_endpoint);
                }
                Some(In::Redirect(r)) => {
                    let reason = format!("redirected without a leader endpoint: {}", r.reason);
                    return failed(
                        SessionError::Rpc {
                            endpoint: endpoint.into(),
                            status: reason,
                        },
                        false,
                    );
                }
                Some(In::Welcome(w)) => self.on_welcome(endpoint, &w),
                other => {
                    let status = format!("expected Welcome, got {other:?}");
                    return failed(
                        SessionError::Rpc {
                            endpoint: endpoint.into(),
                            status,
                        },
                        false,
                    );
                }
            },
        }

        // Results produced while we were away go first.
        for result in self.executor.unreported() {
            let key = result.key.clone();
            if tx
                .send(pb::AgentMessage {
                    msg: Some(Out::Result(result)),
                })
                .await
                .is_err()
            {
                return failed(
                    SessionError::Closed {
                        endpoint: endpoint.into(),
                    },
                    true,
                );
            }
            self.executor.mark_reported(&key);
        }

        let mut tick = tokio::time::interval(self.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    info!("closing session");
                    drop(tx);
                    return Ended::Shutdown;
                }
                _ = tick.tick() => {
                    let hb = self.heartbeat();
                    if tx.send(hb).await.is_err() {
                        return failed(SessionError::Closed { endpoint: endpoint.into() }, true);
                    }
                    self.metrics.heartbeats_sent_total.inc();
                }
                Some(out) = self.outbox.recv() => {
                    let result_key = match &out.msg { Some(Out::Result(r)) => Some(r.key.clone()), _ => None };
                    if tx.send(out).await.is_err() {
                        return failed(SessionError::Closed { endpoint: endpoint.into() }, true);
                    }
                    if let Some(key) = result_key {
                        self.executor.mark_reported(&key);
                    }
                }
                msg = inbound.message() => match msg {
                    Err(status) => return self.status_ended(endpoint, &status, true),
                    Ok(None) => return failed(SessionError::Closed { endpoint: endpoint.into() }, true),
                    Ok(Some(m)) => match m.msg {
                        Some(In::Command(cmd)) => {
                            // Runs beside the session: its ack and result come back through the
                            // outbox, which this loop drains (awaiting it here could deadlock).
                            let ex = self.executor.clone();
                            tokio::spawn(async move { ex.handle_command(cmd).await }.in_current_span());
                        }
                        Some(In::Cancel(c)) => self.executor.cancel(&c.key, &c.reason),
                        Some(In::Lease(grant)) => self.on_lease(&grant),
                        Some(In::Revocations(r)) => {
                            // A rotated coordinator's old certificate: refused from now on,
                            // and a session open with it (maybe this one) is closed.
                            let n = r.sha256.len();
                            let cut = self.tls.set_revoked(r.sha256.into_iter().collect());
                            info!(revoked = n, closed = cut, "coordinator certificate revocations applied");
                        }
                        Some(In::Welcome(w)) => {
                            self.on_welcome(endpoint, &w);
                            tick = tokio::time::interval(self.heartbeat_interval);
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                        Some(In::Redirect(r)) if !r.leader_endpoint.is_empty() => return Ended::Redirect(r.leader_endpoint),
                        Some(In::Redirect(r)) => {
                            let status = format!("leadership lost: {}", r.reason);
                            return failed(SessionError::Rpc { endpoint: endpoint.into(), status }, true);
                        }
                        None => debug!("coordinator message of an unknown kind ignored"),
                    },
                },
            }
        }
    }

    fn on_welcome(&mut self, endpoint: &str, w: &pb::Welcome) {
        if w.heartbeat_interval_ms > 0 {
            self.heartbeat_interval = Duration::from_millis(w.heartbeat_interval_ms);
        }
        if !w.coordinator_endpoints.is_empty() {
            self.endpoints = w.coordinator_endpoints.clone();
        }
        {
            let mut s = lock(&self.handle.shared);
            s.connected = true;
            s.leader = Some(endpoint.to_string());
        }
        self.metrics.session_connected.set(1);
        info!(
            leader_id = w.leader_id,
            term = w.term,
            heartbeat_ms = self.heartbeat_interval.as_millis() as u64,
            "session established"
        );
    }

    fn status_ended(&self, endpoint: &str, status: &tonic::Status, welcomed: bool) -> Ended {
        if status.code() == tonic::Code::Unavailable
            && let Some(leader) = status
                .metadata()
                .get(LEADER_ENDPOINT_HEADER)
                .and_then(|v| v.to_str().ok())
            && !leader.is_empty()
            && leader != endpoint
        {
            return Ended::Redirect(leader.to_string());
        }
        Ended::Failed {
            error: SessionError::Rpc {
                endpoint: endpoint.into(),
                status: format!("{}: {}", status.code(), status.message()),
            },
            welcomed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_never_shrinks() {
        let h = SessionHandle::default();
        assert_eq!(h.lease_valid_until(), None);
        let t0 = Instant::now();
        h.grant(Lease {
            valid_until: t0 + Duration::from_secs(5),
            epoch: 1,
            db_cluster: "main".into(),
        });
        h.grant(Lease {
            valid_until: t0 + Duration::from_secs(3),
            epoch: 1,
            db_cluster: "main".into(),
        });
        assert_eq!(h.lease_valid_until(), Some(t0 + Duration::from_secs(5)));
        h.grant(Lease {
            valid_until: t0 + Duration::from_secs(6),
            epoch: 2,
            db_cluster: "main".into(),
        });
        assert_eq!(h.lease().unwrap().epoch, 2);
    }
}
