//! The `dr-agent` binary: command line, logging, signals and exit codes; the work is in the
//! library (`dr_agent::run` for the daemon, `dr_agent::backup` for the standalone backup
//! commands that must work with every coordinator gone).
//!
//! Exit codes: 0 clean shutdown; 1 the agent failed at run time; 2 bad command line or bad
//! configuration (one line on stderr naming file, line and key).

use std::ffi::OsString;
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

/// `wal-push PATH` with only `--repo-config` and `--push-ahead`, as PostgreSQL's
/// archive_command runs it once per segment, parsed without clap: building the whole command
/// line (every subcommand's arguments) took 0.2 ms of a ~14 ms push. The result is what clap
/// makes of the same line (unit test t1); None for anything else (another spelling, another
/// option, a missing or doubled value), which clap then parses or explains.
fn plain_wal_push(
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Option<dr_agent::backup::cli::Command> {
    use dr_agent::backup::cli::{Command, RepoArg, WalPushArgs};
    let mut args = args.into_iter().skip(1);
    if args.next()? != "wal-push" {
        return None;
    }
    let (mut path, mut repo_config, mut push_ahead) = (None, None, None);
    let plain =
        |v: OsString| (!v.is_empty() && !v.as_encoded_bytes().starts_with(b"-")).then_some(v);
    while let Some(a) = args.next() {
        let text = a.to_str().unwrap_or_default();
        let (flag, inline) = match text.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(OsString::from(v))),
            _ => (text, None),
        };
        let slot = match flag {
            "--repo-config" => &mut repo_config,
            "--push-ahead" => &mut push_ahead,
            _ if path.is_none() && inline.is_none() => {
                path = Some(plain(a)?);
                continue;
            }
            _ => return None,
        };
        let value = match inline {
            Some(v) => v,
            None => plain(args.next()?)?,
        };
        if slot.replace(value).is_some() {
            return None;
        }
    }
    let push_ahead = match push_ahead {
        Some(n) => n.to_str()?.parse().ok()?,
        None => 0,
    };
    let repo_config = repo_config.or_else(|| env("DR_REPO_CONFIG").filter(|v| !v.is_empty()))?;
    // clap would also read these; one set here means the general path decides.
    if ["DR_AGENT_CONFIG", "DR_AGENT_LOG_FORMAT"]
        .iter()
        .any(|k| env(k).is_some())
    {
        return None;
    }
    Some(Command::WalPush(WalPushArgs {
        path: PathBuf::from(path?),
        push_ahead,
        repo: RepoArg {
            repo_config: PathBuf::from(repo_config),
        },
    }))
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
    if let Some(cmd) = plain_wal_push(std::env::args_os(), |k| std::env::var_os(k)) {
        return dr_agent::backup::cli::main(cmd);
    }
    let cli = Cli::parse();
    match &cli.command {
        None | Some(Command::Run) => run_daemon(&cli),
        Some(Command::Backup(c)) => dr_agent::backup::cli::main(c.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clap-free `wal-push` parse is clap's, and declines what it does not know.
    #[test]
    fn t1_plain_wal_push_is_what_clap_makes_of_it() {
        let os = |line: &str| -> Vec<OsString> { line.split(' ').map(OsString::from).collect() };
        let no_env = |_: &str| None;
        for line in [
            "dr-agent wal-push pg_wal/000000010000000000000001 --repo-config /etc/dr/repo.toml",
            "dr-agent wal-push --repo-config /etc/dr/repo.toml pg_wal/000000010000000000000001",
            "dr-agent wal-push --repo-config=/r.toml p --push-ahead 4",
            "dr-agent wal-push p --push-ahead=0 --repo-config /r=x.toml",
            "dr-agent wal-push ./00000002.history --repo-config r.toml",
        ] {
            let fast = plain_wal_push(os(line), no_env).unwrap_or_else(|| panic!("{line}"));
            let Some(Command::Backup(general)) = Cli::try_parse_from(os(line)).unwrap().command
            else {
                panic!("{line}: clap made no backup command");
            };
            assert_eq!(format!("{fast:?}"), format!("{general:?}"), "{line}");
        }
        for line in [
            "dr-agent wal-fetch 000000010000000000000001 p --repo-config r",
            "dr-agent wal-push p",
            "dr-agent wal-push p q --repo-config r",
            "dr-agent wal-push p --repo-config",
            "dr-agent wal-push p --repo-config --push-ahead",
            "dr-agent wal-push p --repo-config r --repo-config s",
            "dr-agent wal-push p --repo-config r --push-ahead x",
            "dr-agent wal-push p --repo-config r --push-ahead -1",
            "dr-agent wal-push p --repo-config r --check-config",
            "dr-agent wal-push -p --repo-config r",
            "dr-agent wal-push p --repo r",
            "dr-agent wal-push p --repo-config= ",
            "dr-agent --config a.toml wal-push p --repo-config r",
            "dr-agent wal-push -- p --repo-config r",
        ] {
            assert!(plain_wal_push(os(line), no_env).is_none(), "{line}");
        }
        // The environment: the repository config from DR_REPO_CONFIG unless given; the
        // agent's own variables leave the decision to clap.
        let env = |k: &str| (k == "DR_REPO_CONFIG").then(|| OsString::from("/env.toml"));
        let Some(dr_agent::backup::cli::Command::WalPush(a)) =
            plain_wal_push(os("dr-agent wal-push p"), env)
        else {
            panic!("DR_REPO_CONFIG");
        };
        assert_eq!(a.repo.repo_config, PathBuf::from("/env.toml"));
        let Some(dr_agent::backup::cli::Command::WalPush(a)) =
            plain_wal_push(os("dr-agent wal-push p --repo-config r"), env)
        else {
            panic!("flag over DR_REPO_CONFIG");
        };
        assert_eq!(a.repo.repo_config, PathBuf::from("r"));
        let agent_env = |k: &str| (k == "DR_AGENT_LOG_FORMAT").then(|| OsString::from("xml"));
        assert!(plain_wal_push(os("dr-agent wal-push p --repo-config r"), agent_env).is_none());
    }
}
