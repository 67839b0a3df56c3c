//! The `dr-agent` binary: command line, logging, signals and exit codes; the work is in the
//! library (`dr_agent::run` for the daemon, `dr_agent::backup` for the standalone backup
//! commands that must work with every coordinator gone).
//!
//! Exit codes: 0 clean shutdown; 1 the agent failed at run time; 2 bad command line or bad
//! configuration (one line on stderr naming file, line and key).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dr_agent::config::{Config, LogFormat};
use tracing::error;

#[derive(Debug, Parser)]
#[command(
    name = "dr-agent",
    version,
    about = "YesLocker DR agent: health checks, commands, backups and restores on one host"
)]
struct Cli {
    /// Agent configuration file (see deploy/examples/agent.toml).
    #[arg(long, env = "DR_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format: text or json (default: the config's `log_format`, else text).
    #[arg(long, env = "DR_AGENT_LOG_FORMAT", global = true)]
    log_format: Option<LogFormat>,
    /// Validate the configuration and its TLS files, then exit (0 valid, 2 invalid with
    /// file, line and key).
    #[arg(long, global = true)]
    check_config: bool,
    /// Without a subcommand the agent runs as a daemon (same as `run`).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent daemon (the default).
    Run,
    // BACKUP: standalone backup/restore/WAL commands (dr_agent::backup::cli).
    #[command(flatten)]
    Backup(dr_agent::backup::cli::Command),
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,h2=warn,hyper=warn,tower=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => {}
        r = tokio::signal::ctrl_c() => if let Err(e) = r { error!("cannot listen for ctrl-c: {e}") },
    }
}

fn run_daemon(cli: &Cli) -> ExitCode {
    let Some(path) = cli.config.as_deref() else {
        eprintln!("dr-agent: no configuration: pass --config FILE or set DR_AGENT_CONFIG");
        return ExitCode::from(2);
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dr-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        return match check_tls(&config, path) {
            Ok(()) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dr-agent: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    init_tracing(cli.log_format.unwrap_or(config.log_format));
    // One thread is plenty for an agent at rest (a few checks a second, one stream); blocking
    // work (statvfs, file writes) goes to the blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the runtime")
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dr_agent::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("agent failed: {e:#}");
            eprintln!("dr-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the `[tls]` files as the daemon will and checks the certificate is this host's
/// agent certificate (an agent may only speak for its own host).
fn check_tls(config: &Config, path: &std::path::Path) -> anyhow::Result<()> {
    let tls = dr_proto::tls::ClientTls::load(&config.tls).with_context(|| {
        format!(
            "{}: [tls] ca {}, cert {}, key {}",
            path.display(),
            config.tls.ca.display(),
            config.tls.cert.display(),
            config.tls.key.display()
        )
    })?;
    match tls.own_identity().identity {
        dr_proto::identity::Identity::Agent { host_id } if host_id == config.host_id => Ok(()),
        other => anyhow::bail!(
            "{}: [tls] cert {} names {} {}, but host_id is {}: issue an agent certificate for {}",
            path.display(),
            config.tls.cert.display(),
            other.kind(),
            other.name(),
            config.host_id,
            config.host_id
        ),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        None | Some(Command::Run) => run_daemon(&cli),
        Some(Command::Backup(c)) => dr_agent::backup::cli::main(c.clone()),
    }
}
