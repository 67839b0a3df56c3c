//! `dr-coordinator`: the binary. Parses arguments, loads the config, sets up logging and
//! signals, then hands over to [`dr_coordinator::run`]; everything else lives in the
//! library so tests can reach it.
//!
//! Exit codes: 0 clean shutdown, 1 runtime failure (error chain on stderr), 2 bad
//! command line or configuration (one line naming file, line and key).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dr_coordinator::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "dr-coordinator", version, about = "YesLocker DR coordinator")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, env = "DR_COORDINATOR_CONFIG")]
    config: PathBuf,
    /// Log format; overrides `log_format` in the config.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dr-coordinator: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(cli.log_format.unwrap_or(config.log_format));

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dr-coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dr_coordinator::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "coordinator failed");
            eprintln!("dr-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for sigterm");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received ctrl-c"),
        () = term => tracing::info!("received sigterm"),
    }
}
