//! Process wiring: one coordinator from configuration to ordered shutdown.
//!
//! Why here and not in `main`: tests start a whole coordinator in-process through
//! [`run`], and the binary only adds argument parsing, logging and signals.
//!
//! Task tree (one root `CancellationToken`, a child per subsystem):
//!
//! ```text
//!  root ─┬─ tls        certificate reloaders (server + client side)
//!        ├─ grpc       AgentService + ControlService + RaftService on `listen` (mTLS)
//!        ├─ control    leader-only controllers (crate::control::run)
//!        ├─ raft       RaftNode (write retries stop on cancel)
//!        └─ metrics    /metrics on `metrics_listen` (mTLS) + raft gauge updater
//! ```
//!
//! Shutdown order: stop accepting RPCs -> stop controllers -> shut Raft down and close
//! the log database -> stop metrics and reloaders. Each stage is timed, logged and bounded
//! by a grace timeout so a stuck stage cannot keep the process alive forever.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dr_proto::identity::Identity;
use dr_proto::pb::agent_service_server::AgentServiceServer;
use dr_proto::pb::control_service_server::ControlServiceServer;
use dr_proto::pb::raft_service_server::RaftServiceServer;
use dr_proto::tls::{ClientTls, ServerTls, TlsPaths};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::raft::RaftNode;
use crate::raft::service::RaftApi;
use crate::{Ctx, config};

/// Grace period of each shutdown stage.
const STAGE_GRACE: Duration = Duration::from_secs(10);
/// Largest Raft message (append batches and snapshot chunks).
const RAFT_MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// The `[tls]` section as dr_proto's TLS loader wants it.
pub fn tls_paths(tls: &config::TlsConfig) -> TlsPaths {
    TlsPaths {
        ca: tls.ca.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        reload_interval: Some(tls.reload_interval),
    }
}

/// Runs one coordinator until `shutdown` completes or an essential task fails.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let root = CancellationToken::new();
    let span = info_span!("coordinator", node_id = config.node_id, region = %config.region);
    let result = run_inner(config, shutdown, root.clone())
        .instrument(span)
        .await;
    root.cancel();
    result
}

async fn run_inner(
    config: Arc<Config>,
    shutdown: impl Future<Output = ()>,
    root: CancellationToken,
) -> anyhow::Result<()> {
    // --- TLS
    let paths = tls_paths(&config.tls);
    let server_tls = ServerTls::load(&paths).context("load server certificate")?;
    let client_tls = ClientTls::load(&paths).context("load client certificate")?;
    match server_tls.own_identity().identity {
        Identity::Coordinator { node_id } if node_id == config.node_id => {}
        other => bail!(
            "certificate {} names {} {}, but this is coordinator {}: issue a coordinator certificate for node {}",
            paths.cert.display(),
            other.kind(),
            other.name(),
            config.node_id,
            config.node_id
        ),
    }
    let tls_cancel = root.child_token();
    let _server_reloader = server_tls.spawn_reloader(tls_cancel.clone());
    let _client_reloader = client_tls.spawn_reloader(tls_cancel.clone());

    // --- Raft
    let raft_cancel = root.child_token();
    let node = RaftNode::start(&config, client_tls.clone(), raft_cancel.clone())
        .await
        .context("start raft node")?;
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(Ctx {
        config: config.clone(),
        node: node.clone(),
        registry: crate::registry::Registry::new(),
        metrics: metrics.clone(),
        ops: Default::default(),
        tls: crate::TlsHandles {
            server: server_tls.clone(),
            client: client_tls.clone(),
        },
    });

    // --- metrics
    let metrics_cancel = root.child_token();
    let mut metrics_tasks: Vec<JoinHandle<()>> = Vec::new();
    // The gauge updater asks Raft for its commit index: it stops before Raft does, or
    // openraft logs an ERROR for a request to a stopped core (issue 2, defect 3).
    let updater_cancel = root.child_token();
    let updater = tokio::spawn(crate::metrics::run_raft_updater(
        metrics.clone(),
        node.clone(),
        Some(server_tls.stats().clone()),
        updater_cancel.clone(),
    ));
    if let Some(addr) = config.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind metrics_listen {addr}"))?;
        info!(%addr, "serving /metrics");
        metrics_tasks.push(tokio::spawn(
            crate::metrics::serve(
                metrics.clone(),
                listener,
                server_tls.clone(),
                metrics_cancel.clone(),
            )
            .instrument(info_span!("metrics")),
        ));
    }

    // --- gRPC
    let grpc_cancel = root.child_token();
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind listen {}", config.listen))?;
    let router = tonic::transport::Server::builder()
        .add_service(AgentServiceServer::new(crate::api::agent::AgentApi::new(
            ctx.clone(),
        )))
        .add_service(ControlServiceServer::new(
            crate::api::control::ControlApi::new(ctx.clone()),
        ))
        .add_service(
            dr_proto::pb::operations_service_server::OperationsServiceServer::new(
                crate::api::operations::OperationsApi::new(ctx.clone()),
            ),
        )
        .add_service(
            dr_proto::pb::backup_service_server::BackupServiceServer::new(
                crate::api::backup::BackupApi::new(ctx.clone()),
            ),
        )
        .add_service(
            dr_proto::pb::approval_service_server::ApprovalServiceServer::new(
                crate::api::security::ApprovalApi::new(ctx.clone()),
            ),
        )
        .add_service(dr_proto::pb::audit_service_server::AuditServiceServer::new(
            crate::api::security::AuditApi::new(ctx.clone()),
        ))
        .add_service(
            dr_proto::pb::restore_service_server::RestoreServiceServer::new(
                crate::api::restore::RestoreApi::new(ctx.clone()),
            ),
        )
        .add_service(
            dr_proto::pb::response_service_server::ResponseServiceServer::new(
                crate::api::response::ResponseApi::new(ctx.clone()),
            ),
        )
        .add_service(
            dr_proto::pb::incident_service_server::IncidentServiceServer::new(
                crate::api::incident::IncidentApi::new(ctx.clone()),
            ),
        )
        .add_service(
            RaftServiceServer::new(RaftApi::new(node.clone(), metrics.clone()))
                .max_decoding_message_size(RAFT_MAX_MESSAGE)
                .max_encoding_message_size(RAFT_MAX_MESSAGE),
        );
    info!(listen = %config.listen, advertise = %config.advertise, "serving grpc");
    let mut grpc = tokio::spawn(
        dr_proto::tls::serve(router, listener, server_tls.clone(), grpc_cancel.clone())
            .instrument(info_span!("grpc")),
    );

    // --- security monitoring (every node: revocations and refused handshakes are per node)
    let _security = tokio::spawn(
        crate::control::security_alerts::run(ctx.clone(), server_tls.clone(), grpc_cancel.clone())
            .instrument(info_span!("security")),
    );

    // --- controllers
    let control_cancel = root.child_token();
    let mut control = tokio::spawn(
        crate::control::run(ctx.clone(), control_cancel.clone()).instrument(info_span!("control")),
    );

    // --- wait
    let mut failure: Option<anyhow::Error> = None;
    let mut grpc_done = false;
    let mut control_done = false;
    tokio::select! {
        () = shutdown => info!("shutdown requested"),
        r = &mut grpc => {
            grpc_done = true;
            failure = Some(match r {
                Ok(Ok(())) => anyhow::anyhow!("grpc server stopped unexpectedly"),
                Ok(Err(e)) => anyhow::Error::new(e).context("grpc server failed"),
                Err(e) => anyhow::Error::new(e).context("grpc server task panicked"),
            });
        }
        r = &mut control => {
            control_done = true;
            failure = Some(match r {
                Ok(Ok(())) => anyhow::anyhow!("controllers stopped unexpectedly"),
                Ok(Err(e)) => e.context("controllers failed"),
                Err(e) => anyhow::Error::new(e).context("controllers task panicked"),
            });
        }
    }
    if let Some(e) = &failure {
        tracing::error!(
            error = format!("{e:#}"),
            "essential task ended, shutting down"
        );
    }

    // --- ordered shutdown
    // Long-lived streams first: agent sessions (with a Redirect naming the leader if it
    // is another node) and RunAction streams. Otherwise the server's graceful stop waits
    // for them until the stage grace runs out (issue 2, defect 3).
    stage("close agent sessions and action streams", async {
        let closed = ctx.registry.begin_shutdown(&crate::api::agent::redirect(
            &ctx,
            "this coordinator is shutting down",
        ));
        ctx.metrics.agents_connected.set(0);
        info!(closed, "agent sessions redirected");
    })
    .await;
    stage("stop accepting rpcs", async {
        grpc_cancel.cancel();
        if !grpc_done && let Ok(Err(e)) = grpc.await {
            warn!(error = %e, "grpc server ended with an error");
        }
    })
    .await;
    stage("stop controllers", async {
        control_cancel.cancel();
        if !control_done {
            match control.await {
                Ok(Err(e)) => warn!(error = format!("{e:#}"), "controllers ended with an error"),
                Err(e) => warn!(error = %e, "controllers task panicked"),
                Ok(Ok(())) => {}
            }
        }
    })
    .await;
    updater_cancel.cancel();
    // A panicked updater is not worth failing shutdown over.
    let _join = updater.await;
    stage("shut down raft and flush the log", async {
        raft_cancel.cancel();
        node.shutdown().await;
    })
    .await;
    stage("stop metrics", async {
        metrics_cancel.cancel();
        for t in metrics_tasks {
            // A panicked metrics task is not worth failing shutdown over.
            let _join = t.await;
        }
    })
    .await;
    tls_cancel.cancel();
    drop(ctx);
    info!("coordinator stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs one shutdown stage with a grace timeout, logging how long it took.
async fn stage(name: &'static str, fut: impl Future<Output = ()>) {
    let start = Instant::now();
    info!(stage = name, "shutdown stage started");
    match tokio::time::timeout(STAGE_GRACE, fut).await {
        Ok(()) => info!(
            stage = name,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "shutdown stage done"
        ),
        Err(_) => {
            warn!(stage = name, grace = ?STAGE_GRACE, "shutdown stage did not finish in time, moving on")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;

    use super::*;
    use crate::raft::t20_cluster::TestCa;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn t30_run_serves_metrics_over_mtls_and_shuts_down() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path());
        let paths = ca.issue("coordinator-1", "coordinator/1");
        let (grpc_port, metrics_port) = (free_port(), free_port());
        let text = format!(
            r#"
version = 1
node_id = 1
region = "beijing"
listen = "127.0.0.1:{grpc_port}"
metrics_listen = "127.0.0.1:{metrics_port}"
data_dir = "{data}"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
"#,
            ca = paths.ca.display(),
            cert = paths.cert.display(),
            key = paths.key.display(),
            data = dir.path().join("data").display(),
        );
        let config =
            Config::from_toml_str(&text, &dir.path().join("c.toml").display().to_string()).unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(run(config, stop.clone().cancelled_owned()));

        // Any certificate of our CA may scrape; here a viewer operator's.
        let scraper = ca.issue("operator-prom", "operator/prom?role=viewer");
        let client = ClientTls::load(&scraper).unwrap();
        let endpoint = format!("127.0.0.1:{metrics_port}");
        let start = Instant::now();
        let stream = loop {
            match client.connect_stream(&endpoint).await {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "metrics endpoint never came up: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(format!("https://{endpoint}/metrics"))
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), hyper::StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("raft_term"), "{text}");
        assert!(text.contains("agents_connected"), "{text}");

        stop.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("run returns after shutdown")
            .unwrap();
        result.unwrap();
        assert!(dir.path().join("data/raft.db").is_file());
    }
}
