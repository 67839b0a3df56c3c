//! Prometheus metrics of one coordinator, and the `/metrics` endpoint that serves them.
//!
//! Why one struct with public fields: handlers and controllers update counters inline
//! (`ctx.metrics.commands_issued_total.inc()`), and a metric that exists only when some
//! code path registered it is a metric missing from dashboards exactly when needed.
//!
//! Raft gauges are not updated by the Raft layer itself: [`run_raft_updater`] follows
//! openraft's metrics watch, so the hot path stays free of metric bookkeeping.
//!
//! The endpoint speaks the same mutual TLS as gRPC: any certificate of our CA may scrape
//! (Prometheus gets a viewer certificate). There is no plaintext port, as for gRPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dr_proto::tls::{ServerTls, TlsStats};
use futures::StreamExt;
use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::security_alerts::RefusedRpcLog;
use crate::raft::RaftNode;
use crate::state::security::SecurityState;

/// Labels of `check_states`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckStateLabels {
    pub state: String,
    pub tier: String,
}

/// Labels of `commands_completed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// Labels of `rpc_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: String,
}

/// Labels of `security_alerts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertKindLabels {
    pub kind: String,
}

/// What `security_alerts_recent` counts: alerts committed within this long.
pub const RECENT_ALERTS_MS: i64 = 3_600_000;

/// Every metric of the coordinator. Counters are exposed with a `_total` suffix.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub raft_term: Gauge,
    pub raft_is_leader: Gauge,
    pub raft_leader_id: Gauge,
    pub raft_last_log_index: Gauge,
    pub raft_commit_index: Gauge,
    pub raft_applied_index: Gauge,
    pub agents_connected: Gauge,
    pub agent_sessions_total: Counter,
    pub check_states: Family<CheckStateLabels, Gauge>,
    pub commands_issued_total: Counter,
    pub commands_completed_total: Family<ResultLabels, Counter>,
    pub command_latency_seconds: Histogram,
    pub rpc_refused_total: Family<RefusedLabels, Counter>,
    pub tls_handshake_failures_total: Counter,
    /// Security alerts committed, by kind, as followed from the replicated state (every
    /// node counts every alert once, whichever node raised it).
    pub security_alerts_total: Family<AlertKindLabels, Counter>,
    /// Alerts committed within [`RECENT_ALERTS_MS`]: the "something is going on now" gauge.
    pub security_alerts_recent: Gauge,
    pub security_isolated_hosts: Gauge,
    /// Highest alert seq already counted in `security_alerts_total`.
    alerts_counted_seq: AtomicU64,
    /// Not a metric: refused RPCs handed to the security monitoring loop. It lives here
    /// because the metrics are the per-node observation sink every handler already holds.
    pub refused_rpcs: RefusedRpcLog,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            raft_term: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_leader_id: Gauge::default(),
            raft_last_log_index: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            agents_connected: Gauge::default(),
            agent_sessions_total: Counter::default(),
            check_states: Family::default(),
            commands_issued_total: Counter::default(),
            commands_completed_total: Family::default(),
            // 10ms .. ~80s: agent commands range from a file check to a base backup step.
            command_latency_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            rpc_refused_total: Family::default(),
            tls_handshake_failures_total: Counter::default(),
            security_alerts_total: Family::default(),
            security_alerts_recent: Gauge::default(),
            security_isolated_hosts: Gauge::default(),
            alerts_counted_seq: AtomicU64::new(0),
            refused_rpcs: RefusedRpcLog::default(),
        };
        registry.register("raft_term", "Current Raft term", m.raft_term.clone());
        registry.register(
            "raft_is_leader",
            "1 if this node is the Raft leader",
            m.raft_is_leader.clone(),
        );
        registry.register(
            "raft_leader_id",
            "Node id of the known leader (0: none)",
            m.raft_leader_id.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Index of the last log entry",
            m.raft_last_log_index.clone(),
        );
        registry.register(
            "raft_commit_index",
            "Index of the last committed entry",
            m.raft_commit_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Index of the last applied entry",
            m.raft_applied_index.clone(),
        );
        registry.register(
            "agents_connected",
            "Agents with a live session to this node",
            m.agents_connected.clone(),
        );
        registry.register(
            "agent_sessions",
            "Agent sessions opened",
            m.agent_sessions_total.clone(),
        );
        registry.register(
            "check_states",
            "Health checks by state and tier",
            m.check_states.clone(),
        );
        registry.register(
            "commands_issued",
            "Commands issued to agents",
            m.commands_issued_total.clone(),
        );
        registry.register(
            "commands_completed",
            "Commands finished, by result",
            m.commands_completed_total.clone(),
        );
        registry.register(
            "command_latency_seconds",
            "Time from issuing a command to its result",
            m.command_latency_seconds.clone(),
        );
        registry.register(
            "rpc_refused",
            "RPCs refused, by reason",
            m.rpc_refused_total.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed",
            m.tls_handshake_failures_total.clone(),
        );
        registry.register(
            "security_alerts",
            "Security alerts committed, by kind",
            m.security_alerts_total.clone(),
        );
        registry.register(
            "security_alerts_recent",
            "Security alerts committed within the last hour",
            m.security_alerts_recent.clone(),
        );
        registry.register(
            "security_isolated_hosts",
            "Hosts currently isolated",
            m.security_isolated_hosts.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Follows the committed security state: counts alerts not counted before (by seq) and
    /// sets the gauges. Alerts trimmed from the state before this node saw them are not
    /// counted; after a restart the alerts still kept are counted again (a counter reset,
    /// which Prometheus' `rate`/`increase` handle).
    pub fn observe_security(&self, sec: &SecurityState, now_ms: i64) {
        let seen = self.alerts_counted_seq.load(Ordering::Relaxed);
        let mut max = seen;
        for a in sec.alerts.iter().filter(|a| a.seq > seen) {
            self.security_alerts_total
                .get_or_create(&AlertKindLabels {
                    kind: a.kind.clone(),
                })
                .inc();
            max = max.max(a.seq);
        }
        self.alerts_counted_seq.store(max, Ordering::Relaxed);
        let recent = sec
            .alerts
            .iter()
            .filter(|a| now_ms - a.at_unix_ms <= RECENT_ALERTS_MS)
            .count();
        gauge_u64(&self.security_alerts_recent, recent as u64);
        gauge_u64(&self.security_isolated_hosts, sec.isolated.len() as u64);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encode metrics failed");
        }
        out
    }
}

fn gauge_u64(g: &Gauge, v: u64) {
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// How often index gauges are refreshed (a scrape every 15 s needs nothing finer).
const INDEX_REFRESH: Duration = Duration::from_secs(1);

/// Follows Raft metrics into the gauges and TLS handshake failures into their counter,
/// until `cancel` fires.
///
/// Wakes on role/term/leader changes (the server-metrics watch, which notifies only on a
/// real change) and once per [`INDEX_REFRESH`]. It must NOT wake on openraft's full
/// metrics watch: that one is sent after every pass of the Raft core loop, changed or
/// not, and the `with_raft_state` call below is itself such a pass, so the updater fed
/// itself and spun (issue 2, defect 2).
pub async fn run_raft_updater(
    metrics: Arc<Metrics>,
    node: RaftNode,
    tls_stats: Option<Arc<TlsStats>>,
    cancel: CancellationToken,
) {
    let full = node.metrics();
    let mut rx = node.server_metrics();
    let mut seen_failures = 0u64;
    let mut tick = tokio::time::interval(INDEX_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        rx.borrow_and_update();
        {
            let m = full.borrow();
            gauge_u64(&metrics.raft_term, m.current_term);
            metrics
                .raft_is_leader
                .set(i64::from(m.current_leader == Some(m.id)));
            gauge_u64(&metrics.raft_leader_id, m.current_leader.unwrap_or(0));
            gauge_u64(&metrics.raft_last_log_index, m.last_log_index.unwrap_or(0));
            gauge_u64(
                &metrics.raft_applied_index,
                m.last_applied.map_or(0, |l| l.index),
            );
        }
        if let Ok(c) = node
            .raft()
            .with_raft_state(|st| st.committed.map_or(0, |l| l.index))
            .await
        {
            gauge_u64(&metrics.raft_commit_index, c);
        }
        if let Some(stats) = &tls_stats {
            let now = stats.handshakes_failed.load(Ordering::Relaxed);
            if now > seen_failures {
                metrics
                    .tls_handshake_failures_total
                    .inc_by(now - seen_failures);
                seen_failures = now;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// Serves `GET /metrics` with mutual TLS on `listener` until `cancel` fires.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    tls: ServerTls,
    cancel: CancellationToken,
) {
    let mut incoming = dr_proto::tls::incoming(listener, tls, cancel.clone());
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "metrics connection failed");
                    continue;
                }
                None => return,
            },
        };
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&metrics, &req)) }
                });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), svc);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                },
                _ = cancel.cancelled() => {}
            }
        });
    }
}

fn respond<B>(metrics: &Metrics, req: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    let (status, ctype, body) = if req.method() != hyper::Method::GET {
        (
            hyper::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".to_owned(),
        )
    } else if req.uri().path() == "/metrics" {
        (
            hyper::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        )
    } else {
        (
            hyper::StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics\n".to_owned(),
        )
    };
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::new();
        m.commands_completed_total
            .get_or_create(&ResultLabels {
                result: "ok".into(),
            })
            .inc();
        m.check_states
            .get_or_create(&CheckStateLabels {
                state: "failing".into(),
                tier: "critical".into(),
            })
            .set(2);
        m.rpc_refused_total
            .get_or_create(&RefusedLabels {
                reason: "role".into(),
            })
            .inc();
        let text = m.encode();
        for name in [
            "raft_term",
            "raft_is_leader",
            "raft_leader_id",
            "raft_last_log_index",
            "raft_commit_index",
            "raft_applied_index",
            "agents_connected",
            "agent_sessions_total",
            "commands_issued_total",
            "commands_completed_total{result=\"ok\"} 1",
            "check_states{state=\"failing\",tier=\"critical\"} 2",
            "command_latency_seconds_bucket",
            "rpc_refused_total{reason=\"role\"} 1",
            "tls_handshake_failures_total",
            "security_alerts_recent",
            "security_isolated_hosts",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn security_alerts_are_counted_once_by_kind() {
        use crate::state::security::{Alert, Isolation};
        let m = Metrics::new();
        let alert = |seq: u64, at: i64, kind: &str| Alert {
            seq,
            at_unix_ms: at,
            kind: kind.into(),
            source: "s".into(),
            detail: "d".into(),
            count: 5,
        };
        let mut sec = SecurityState::default();
        let now = 10 * RECENT_ALERTS_MS;
        sec.alerts.push(alert(1, 0, "refused-rpcs"));
        sec.alerts.push(alert(2, now - 1_000, "refused-rpcs"));
        sec.isolated.insert(
            "db-1".into(),
            Isolation {
                since_unix_ms: 1,
                by: "x".into(),
                reason: "r".into(),
                allow_mgmt: vec![],
            },
        );
        m.observe_security(&sec, now);
        // Observed again with one more alert: only the new one is counted.
        sec.alerts.push(alert(3, now, "integrity"));
        m.observe_security(&sec, now);
        m.observe_security(&sec, now);
        let text = m.encode();
        for line in [
            "security_alerts_total{kind=\"refused-rpcs\"} 2",
            "security_alerts_total{kind=\"integrity\"} 1",
            "security_alerts_recent 2",
            "security_isolated_hosts 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
