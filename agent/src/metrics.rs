//! Prometheus metrics of the agent, served at `/metrics` on `metrics_listen` over the same
//! mutual TLS as every other port (DESIGN.md: no plaintext port, ever; the scraper needs a
//! client certificate of the deployment's CA).
//!
//! Why these metrics: an operator must be able to tell from outside whether the agent is
//! connected (`dr_agent_session_connected`), flapping (`dr_agent_reconnects_total`), alive
//! (`dr_agent_heartbeats_sent_total`), what it sees locally (`dr_agent_check_state`) and how
//! long commands take (`dr_agent_command_duration_seconds`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use dr_proto::pb;
use dr_proto::tls::{ServerTls, TlsPaths};
use futures::StreamExt;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub check: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub action: String,
    pub outcome: String,
}

type HistogramFamily = Family<CommandLabels, Histogram, fn() -> Histogram>;

fn command_histogram() -> Histogram {
    // 10 ms .. ~45 min.
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

/// Every metric of the process; shared by `Arc`.
pub struct Metrics {
    registry: Registry,
    pub session_connected: Gauge,
    pub reconnects_total: Counter,
    pub heartbeats_sent_total: Counter,
    check_state: Family<CheckLabels, Gauge>,
    command_duration: HistogramFamily,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dr_agent");
        let session_connected = Gauge::default();
        let reconnects_total = Counter::default();
        let heartbeats_sent_total = Counter::default();
        let check_state = Family::<CheckLabels, Gauge>::default();
        let command_duration: HistogramFamily = Family::new_with_constructor(command_histogram);
        registry.register(
            "session_connected",
            "1 while a session with the coordinator leader is open",
            session_connected.clone(),
        );
        registry.register(
            "reconnects",
            "Session (re)connection attempts",
            reconnects_total.clone(),
        );
        registry.register(
            "heartbeats_sent",
            "Heartbeats sent to the coordinator",
            heartbeats_sent_total.clone(),
        );
        registry.register(
            "check_state",
            "Latest state of each health check: 1 passing, 0 failing, -1 unknown",
            check_state.clone(),
        );
        registry.register(
            "command_duration_seconds",
            "Duration of coordinator commands",
            command_duration.clone(),
        );
        Self {
            registry,
            session_connected,
            reconnects_total,
            heartbeats_sent_total,
            check_state,
            command_duration,
        }
    }

    pub fn set_check_state(&self, check: &str, service: &str, state: pb::CheckState) {
        let v = match state {
            pb::CheckState::Passing => 1,
            pb::CheckState::Failing => 0,
            pb::CheckState::Unknown | pb::CheckState::Unspecified => -1,
        };
        self.check_state
            .get_or_create(&CheckLabels {
                check: check.into(),
                service: service.into(),
            })
            .set(v);
    }

    pub fn observe_command(&self, action: &str, success: bool, seconds: f64) {
        let labels = CommandLabels {
            action: action.into(),
            outcome: if success { "success" } else { "failure" }.into(),
        };
        self.command_duration
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ignored = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics tls: {0}")]
    Tls(#[from] dr_proto::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Serves `/metrics` on `listen` with mutual TLS until `cancel` fires.
pub async fn serve(
    metrics: Arc<Metrics>,
    listen: SocketAddr,
    tls: &TlsPaths,
    cancel: CancellationToken,
) -> Result<(), MetricsError> {
    let server_tls = ServerTls::load(tls)?;
    let reloader = server_tls.spawn_reloader(cancel.child_token());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: listen,
            source,
        })?;
    info!(%listen, "metrics listening");
    let mut incoming = dr_proto::tls::incoming(listener, server_tls, cancel.clone());
    while let Some(conn) = incoming.next().await {
        let Ok(conn) = conn else { continue };
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    if req.uri().path() == "/metrics" {
                        http::Response::builder()
                            .header(
                                http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.encode())))
                    } else {
                        http::Response::builder()
                            .status(http::StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"not found\n")))
                    }
                }
            });
            // The acceptor may negotiate h2 by ALPN (it is shared with gRPC), so speak both.
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(conn), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "metrics connection ended") },
                () = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ignored = conn.await;
                }
            }
        });
    }
    reloader.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_all_families() {
        let m = Metrics::new();
        m.session_connected.set(1);
        m.reconnects_total.inc();
        m.set_check_state("pg", "database", pb::CheckState::Passing);
        m.observe_command("run_checks", true, 0.2);
        let text = m.encode();
        for needle in [
            "dr_agent_session_connected 1",
            "dr_agent_reconnects_total 1",
            "dr_agent_heartbeats_sent_total 0",
            "dr_agent_check_state{check=\"pg\",service=\"database\"} 1",
            "dr_agent_command_duration_seconds_count{action=\"run_checks\",outcome=\"success\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
