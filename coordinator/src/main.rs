//! `dr-coordinator`: the binary. Parses arguments, loads the config, sets up logging and
//! signals, then hands over to [`dr_coordinator::run`]; everything else lives in the
//! library so tests can reach it.
//!
//! Exit codes: 0 clean shutdown, 1 runtime failure (error chain on stderr), 2 bad
//! command line or configuration (one line naming file, line and key).
//!
//! `--check-config` validates the file and the TLS files it names (they exist, parse, and
//! the certificate is this node's coordinator certificate), prints `ok`, and exits 0, or
//! prints the error and exits 2: what a deploy pipeline runs before a restart.

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
    /// Validate the configuration and its TLS files, then exit (0 valid, 2 invalid).
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    cap_malloc_arenas();
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dr-coordinator: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        return match check_tls(&config) {
            Ok(()) => {
                println!("{}: ok", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dr-coordinator: invalid configuration: {e:#}");
                ExitCode::from(2)
            }
        };
    }
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

/// Arenas glibc's malloc may create when `MALLOC_ARENA_MAX` does not say otherwise.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc at [`MALLOC_ARENAS`] arenas, unless the environment already sets
/// `MALLOC_ARENA_MAX` (an operator's choice wins).
///
/// Why: glibc gives every thread that meets contention an arena of its own, up to 8 per
/// core, and each arena keeps its freed memory. A leader holding 10,000 agent sessions
/// allocates on the gRPC runtime's workers, Raft's runtime and the blocking pool, and its
/// connections migrate between them, so freed buffers stay stranded in arenas no one
/// allocates from. With two arenas the fan-in benchmark's leader (issue 2) measured 611
/// instead of 645 MB RSS at 10,000 sessions, at the same CPU and latency. Called first
/// thing in `main`, before any thread exists.
#[allow(unsafe_code)]
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// `M_ARENA_MAX` of glibc's `<malloc.h>`.
        const M_ARENA_MAX: i32 = -8;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only sets a tuning parameter of the process's allocator and
            // is called before any other thread exists; on failure (0) the default stays.
            unsafe {
                mallopt(M_ARENA_MAX, MALLOC_ARENAS);
            }
        }
    }
}

/// Loads the `[tls]` files the way the server will and checks that the certificate is
/// this node's.
fn check_tls(config: &Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let paths = dr_coordinator::server::tls_paths(&config.tls);
    let server = dr_proto::tls::ServerTls::load(&paths).with_context(|| {
        format!(
            "[tls] in {}: ca {}, cert {}, key {}",
            config.origin,
            paths.ca.display(),
            paths.cert.display(),
            paths.key.display()
        )
    })?;
    match server.own_identity().identity {
        dr_proto::identity::Identity::Coordinator { node_id } if node_id == config.node_id => {
            Ok(())
        }
        other => anyhow::bail!(
            "{}: [tls] cert {} names {} {}, but node_id is {}: issue a coordinator certificate for node {}",
            config.origin,
            paths.cert.display(),
            other.kind(),
            other.name(),
            config.node_id,
            config.node_id
        ),
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
