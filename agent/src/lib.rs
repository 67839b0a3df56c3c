//! dr-agent: the per-host half of YesLocker DR.
//!
//! Why a library under a thin binary: the integration tests and the backup CLI reach the same
//! code the daemon runs. [`run`] wires the daemon: health checks, the command executor, the
//! session with the coordinator leader and the metrics endpoint, all under one cancellation
//! tree, and shuts them down in order:
//!
//! ```text
//! root token ─┬─ commands  (1st: running commands are stopped, their results recorded
//!             │             and, while the session is still open, sent)
//!             ├─ session   (2nd: the stream is closed after the message in hand)
//!             └─ background: health checks, metrics, certificate reload (last)
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

pub mod actions;
pub mod backup;
pub mod backup_verbs;
pub mod config;
pub mod exec;
pub mod failover_verbs;
pub mod fence;
pub mod health;
pub mod integrity;
pub mod isolate;
pub mod metrics;
pub mod pg;
pub mod restore_verbs;
pub mod rotate;
pub mod session;
pub mod traffic;

pub use config::Config;

/// How long running commands get to stop (their children are killed) at shutdown.
const COMMAND_GRACE: Duration = Duration::from_secs(5);
/// How long the session gets to send the last results and close its stream.
const SESSION_GRACE: Duration = Duration::from_secs(3);
/// How long health checks and the metrics server get to stop.
const BACKGROUND_GRACE: Duration = Duration::from_secs(3);

/// Runs the agent daemon until `shutdown` resolves (or an essential task fails).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let root = CancellationToken::new();
    let commands_cancel = root.child_token();
    let session_cancel = root.child_token();
    let background_cancel = root.child_token();
    let command_tasks = TaskTracker::new();
    let background_tasks = TaskTracker::new();

    let metrics = Arc::new(metrics::Metrics::new());
    let tls = dr_proto::tls::ClientTls::load(&config.tls)
        .context("load the agent's TLS certificate and CA")?;
    background_tasks.spawn(tls.spawn_reloader(background_cancel.child_token()));

    let health = health::Health::new(&config.checks, metrics.clone());
    // Generic verbs: BACKUP registers `backup`, `wal-status`, ... here.
    let mut registry = actions::Registry::default();
    let integrity = integrity::IntegrityMonitor::new(&config, health.clone());
    actions::register_security(&mut registry, &config, integrity.clone());
    // Backup verbs; repository configs may name credential env vars, read once here.
    backup_verbs::register(&mut registry, std::env::vars().collect());
    // Restore verbs (issue 4): the PostgreSQL binaries and user of `[postgres]` when set.
    restore_verbs::register(
        &mut registry,
        std::env::vars().collect(),
        config
            .postgres
            .as_ref()
            .map(|p| restore_verbs::PgBins {
                bin_dir: p.bin_dir.clone(),
                run_as: p.run_as.clone(),
            })
            .unwrap_or_default(),
    );
    // Failover verbs (pg.*, traffic.*) and the self-fence, when this host has the parts.
    let failover = failover_verbs::build(&config).context("set up postgresql and traffic")?;
    failover_verbs::register(&mut registry, &failover);
    let actions = actions::Actions::new(config.clone(), health.clone(), registry);
    let (executor, outbox) = exec::Executor::open(
        &config.data_dir,
        &config.host_id,
        actions,
        metrics.clone(),
        command_tasks.clone(),
        commands_cancel.clone(),
    )
    .context("open the command record")?;

    background_tasks.spawn(
        health
            .clone()
            .run(background_cancel.child_token())
            .instrument(info_span!("health")),
    );

    // Essential tasks report here when they end; any end before shutdown is fatal.
    let (essential_tx, mut essential_rx) =
        tokio::sync::mpsc::channel::<(&'static str, anyhow::Result<()>)>(4);
    if let Some(listen) = config.metrics_listen {
        let (m, tls_paths, cancel, tx) = (
            metrics.clone(),
            config.tls.clone(),
            background_cancel.clone(),
            essential_tx.clone(),
        );
        background_tasks.spawn(
            async move {
                let r = metrics::serve(m, listen, &tls_paths, cancel)
                    .await
                    .map_err(anyhow::Error::from);
                let _closing = tx.send(("metrics", r)).await;
            }
            .instrument(info_span!("metrics")),
        );
    }
    let (session, session_handle) =
        session::SessionTask::new(config.clone(), tls, health, executor, outbox, metrics);
    integrity.attach_session(session_handle.clone());
    failover_verbs::spawn_tasks(
        &failover,
        &session_handle,
        config.session.heartbeat_interval,
        &background_tasks,
        &background_cancel,
    );
    background_tasks.spawn(
        integrity
            .run(background_cancel.child_token())
            .instrument(info_span!("integrity")),
    );
    background_tasks
        .spawn(isolate::reapply_at_start(config.clone()).instrument(info_span!("isolation")));
    let session_task = {
        let (cancel, tx) = (session_cancel.clone(), essential_tx.clone());
        tokio::spawn(
            async move {
                let r = session.run(cancel).await;
                let _closing = tx.send(("session", r)).await;
            }
            .instrument(info_span!("agent", host = %config.host_id)),
        )
    };
    drop(essential_tx);
    info!(host = %config.host_id, region = %config.region, coordinators = config.coordinators.len(), "agent started");

    let outcome = tokio::select! {
        () = shutdown => { info!("shutdown requested"); Ok(()) }
        Some((name, r)) = essential_rx.recv() => {
            let e = match r { Ok(()) => anyhow::anyhow!("{name} task ended"), Err(e) => e.context(format!("{name} task failed")) };
            error!("{e:#}");
            Err(e)
        }
    };

    info!("stopping commands");
    commands_cancel.cancel();
    command_tasks.close();
    if tokio::time::timeout(COMMAND_GRACE, command_tasks.wait())
        .await
        .is_err()
    {
        warn!("commands did not stop within the grace period");
    }
    info!("closing session");
    session_cancel.cancel();
    if tokio::time::timeout(SESSION_GRACE, session_task)
        .await
        .is_err()
    {
        warn!("session did not close within the grace period");
    }
    info!("stopping health checks and metrics");
    background_cancel.cancel();
    root.cancel();
    background_tasks.close();
    if tokio::time::timeout(BACKGROUND_GRACE, background_tasks.wait())
        .await
        .is_err()
    {
        warn!("background tasks did not stop within the grace period");
    }
    info!("agent stopped");
    outcome
}
