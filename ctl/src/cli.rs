//! Command-line surface of drctl (clap derive).
//!
//! Why it is its own module: the argument tree is the operator's contract, and keeping it
//! apart from the code that runs each command makes it reviewable in one screen and lets
//! tests parse argument vectors without touching the network.
//!
//! Connection flags (`--endpoint`, `--ca`, `--cert`, `--key`, `--config`, `--output`) are
//! global so they may follow the subcommand. `--timeout` (per RPC) is accepted before the
//! subcommand only, because `drctl run --timeout 5m` is the action's own deadline.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cmd::cert::Kind;
use crate::output::OutputFormat;

#[derive(Debug, Parser)]
#[command(
    name = "drctl",
    version,
    about = "Operator CLI of the YesLocker DR control plane"
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Deadline of each RPC (e.g. 10s); default from the config file, else 10s.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// How to reach and authenticate to the coordinators. Flags override the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnArgs {
    /// Coordinator endpoint, host:port or https://host:port (repeatable; tried in order).
    #[arg(long = "endpoint", global = true, value_name = "HOST:PORT")]
    pub endpoints: Vec<String>,
    /// CA bundle (PEM) the coordinators' certificates chain to.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Operator certificate (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Operator private key (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Config file (default: $DRCTL_CONFIG, else ~/.config/drctl/config.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the CA and issue certificates (offline; no coordinator needed).
    #[command(subcommand)]
    Cert(CertCmd),
    /// Show the identity and role the coordinators see for your certificate.
    Whoami,
    /// One-screen overview: regions, agents, checks, coordinators, notes.
    Status {
        /// Confirm leadership with a quorum before answering.
        #[arg(long)]
        linearizable: bool,
    },
    /// Coordinator membership (admin).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Agents known to the cluster.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// Run an action on selected agents and follow it to the end.
    Run(RunArgs),
    /// Commands issued to agents.
    #[command(subcommand)]
    Commands(CommandsCmd),
    /// Cancel a pending or running command by its key.
    Cancel {
        key: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Start a local 3-coordinator, 5-agent cluster and walk through a leader failover.
    Demo(DemoArgs),
    /// Backups: the catalog, run, verify, copy, and the backup policy.
    #[command(subcommand)]
    Backup(crate::cmd::backup::BackupCmd),
    /// Validate a topology file, show its diff and commit it (admin).
    Apply(crate::cmd::topology::ApplyArgs),
    /// The committed topology.
    #[command(subcommand)]
    Topology(crate::cmd::topology::TopologyCmd),
    /// Planned switchover (or, with --force, emergency failover) to another region.
    Failover(crate::cmd::failover::FailoverArgs),
    /// Durable operations (failovers, switchovers) and their steps.
    #[command(subcommand)]
    Operations(crate::cmd::operations::OperationsCmd),
    /// Restore a database: latest, a backup, or a point in time; onto a host or in place.
    Restore(crate::cmd::restore::RestoreArgs),
    /// Restore drills (backup-restore): run one now, list past ones.
    #[command(subcommand)]
    Drill(crate::cmd::drill::DrillCmd),
    /// Incidents P0-P3 (DRP activate-incident): open, note, level, resolve, timeline.
    #[command(subcommand)]
    Incident(crate::cmd::incident::IncidentCmd),
    /// Approve another operator's pending request (admin; runs it as the requester).
    Approve(crate::cmd::approve::ApproveArgs),
    /// Two-person approvals: pending requests, rejection, and the policy.
    #[command(subcommand)]
    Approvals(crate::cmd::approvals::ApprovalsCmd),
    /// The hash-chained audit log: list, export, verify.
    #[command(subcommand)]
    Audit(crate::cmd::audit::AuditCmd),
    /// Isolate hosts: only their coordinator session (and management sources) stay open.
    Isolate(crate::cmd::isolate::IsolateArgs),
    /// Restore the selected hosts' pre-isolation firewall rules, byte for byte.
    Unisolate(crate::cmd::isolate::UnisolateArgs),
    /// Emergency credential rotation: database passwords, application secrets, certificates.
    RotateCredentials(crate::cmd::rotate::RotateArgs),
    /// Security monitoring level, isolated hosts, revocations, alerts.
    #[command(subcommand)]
    Security(crate::cmd::security::SecurityCmd),
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Create a new CA (ca.pem, ca.key) for a trust domain.
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing CA (every certificate issued from the old one stops working).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the CA in --ca-dir.
    Issue(IssueArgs),
    /// Print identity, validity and issuer of a certificate file.
    Show { file: PathBuf },
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    #[arg(long, value_name = "DIR")]
    pub ca_dir: PathBuf,
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Node id (coordinator), host id (agent) or operator name.
    #[arg(long)]
    pub name: String,
    /// Operator role: viewer, operator or admin (operators only).
    #[arg(long, value_parser = ["viewer", "operator", "admin"])]
    pub role: Option<String>,
    /// DNS name SAN (repeatable; default localhost for coordinators and agents).
    #[arg(long)]
    pub dns: Vec<String>,
    /// IP address SAN (repeatable; default 127.0.0.1 for coordinators and agents).
    #[arg(long = "ip")]
    pub ips: Vec<IpAddr>,
    /// Lifetime, e.g. 365d, 90d, 12h.
    #[arg(long, value_parser = parse_duration, default_value = "365d")]
    pub valid_for: Duration,
    /// Start of validity (RFC 3339); default now minus 5 minutes.
    #[arg(long, value_parser = crate::cmd::cert::parse_rfc3339)]
    pub not_before: Option<time::OffsetDateTime>,
    /// End of validity (RFC 3339); may be in the past (for testing refusal of expired certificates).
    #[arg(long, value_parser = crate::cmd::cert::parse_rfc3339)]
    pub not_after: Option<time::OffsetDateTime>,
    /// Output directory (default: the CA directory).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Initialise the Raft cluster (once, on a fresh cluster).
    Init {
        /// Member as ID=ADDR@REGION (repeatable); default: the answering node's configured peers.
        #[arg(long = "member", value_parser = parse_member)]
        members: Vec<MemberSpec>,
    },
    /// Add a coordinator (as learner first, then voter unless --learner).
    AddNode {
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        addr: String,
        #[arg(long)]
        region: String,
        /// Stay a learner (no vote).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a coordinator from the membership.
    RemoveNode {
        #[arg(long)]
        node_id: u64,
    },
    /// Members, roles, replication progress and Raft indexes.
    Status {
        #[arg(long)]
        linearizable: bool,
    },
}

/// `ID=ADDR@REGION` from `cluster init --member`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSpec {
    pub node_id: u64,
    pub addr: String,
    pub region: String,
}

pub fn parse_member(s: &str) -> Result<MemberSpec, String> {
    let usage = || format!("expected ID=ADDR@REGION, e.g. 1=10.0.0.1:7443@beijing, got {s:?}");
    let (id, rest) = s.split_once('=').ok_or_else(usage)?;
    let (addr, region) = rest.rsplit_once('@').ok_or_else(usage)?;
    let node_id: u64 = id.trim().parse().map_err(|_| usage())?;
    if node_id == 0 || addr.is_empty() || region.is_empty() {
        return Err(usage());
    }
    Ok(MemberSpec {
        node_id,
        addr: addr.to_string(),
        region: region.to_string(),
    })
}

#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// List agents, optionally filtered.
    List {
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        site: Option<String>,
    },
    /// Details of one agent: state, checks, facts.
    Show { host: String },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Target host (repeatable). Selectors combine: all given must match.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    #[arg(long)]
    pub region: Option<String>,
    #[arg(long)]
    pub role: Option<String>,
    #[arg(long)]
    pub site: Option<String>,
    /// How long the commands may take, including waiting for disconnected agents.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub timeout: Duration,
    /// Return once the commands are issued, without following them.
    #[arg(long)]
    pub no_wait: bool,
    #[command(subcommand)]
    pub action: ActionCmd,
}

#[derive(Debug, Subcommand)]
pub enum ActionCmd {
    /// Run health checks now (all when no NAME is given).
    Checks { names: Vec<String> },
    /// Start, stop, restart or query a configured service.
    Service {
        #[arg(value_enum)]
        op: ServiceOp,
        name: String,
    },
    /// Enable or disable maintenance mode.
    Maintenance {
        #[arg(value_enum)]
        state: OnOff,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Run configured smoke tests (all when no NAME is given).
    SmokeTest { names: Vec<String> },
    /// Run a named action from the agents' [[actions]] config.
    Exec {
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run an agent verb with KEY=VALUE arguments (KEY=@FILE reads the value from a file):
    /// e.g. `verb isolate`, `verb rotate-credentials scope=db`,
    /// `verb security-monitoring level=high`, `verb pg.status`, `verb traffic.status`.
    Verb {
        name: String,
        #[arg(value_parser = parse_verb_arg)]
        args: Vec<(String, String)>,
    },
}

/// `KEY=VALUE`, or `KEY=@FILE` to read the value from a file (certificates, keys: never typed
/// on a command line, where they would land in shell history).
fn parse_verb_arg(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("`{s}` has an empty key"));
    }
    let v = match v.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the value of `{k}` from {path}: {e}"))?,
        None => v.to_string(),
    };
    Ok((k.to_string(), v))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ServiceOp {
    Start,
    Stop,
    Restart,
    Status,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum CommandsCmd {
    /// List recent commands.
    List {
        #[arg(long)]
        host: Option<String>,
        /// Only commands not finished yet.
        #[arg(long)]
        pending: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory (kept at exit). Default: a new temporary directory, removed at exit.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run the scenario once and exit (0 only if every step succeeded).
    #[arg(long)]
    pub once: bool,
    /// Use ports P.. instead of free ports picked by the OS.
    #[arg(long)]
    pub base_port: Option<u16>,
}

/// humantime durations: `10s`, `5m`, `365d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 10s, 5m, 365d)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_after_subcommand_and_run_timeout() {
        let cli = Cli::try_parse_from([
            "drctl",
            "--timeout",
            "2s",
            "run",
            "--timeout",
            "1m",
            "--host",
            "a",
            "--host",
            "b",
            "--endpoint",
            "x:1",
            "--output",
            "json",
            "exec",
            "flush",
            "--all",
            "-n",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Some(Duration::from_secs(2)));
        assert_eq!(cli.conn.endpoints, vec!["x:1".to_string()]);
        assert_eq!(cli.conn.output, OutputFormat::Json);
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.timeout, Duration::from_secs(60));
        assert_eq!(run.hosts, vec!["a".to_string(), "b".to_string()]);
        let ActionCmd::Exec { name, args } = run.action else {
            panic!("not exec")
        };
        assert_eq!(name, "flush");
        assert_eq!(args, vec!["--all", "-n", "3"]);
    }

    #[test]
    fn verb_arguments_are_key_value_and_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("new.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let at = format!("cert_pem=@{}", pem.display());
        let cli = Cli::try_parse_from([
            "drctl",
            "run",
            "--host",
            "h",
            "verb",
            "rotate-credentials",
            "scope=certs",
            &at,
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        let ActionCmd::Verb { name, args } = run.action else {
            panic!("not verb")
        };
        assert_eq!(name, "rotate-credentials");
        assert_eq!(
            args,
            vec![
                ("scope".to_string(), "certs".to_string()),
                (
                    "cert_pem".to_string(),
                    "-----BEGIN CERTIFICATE-----\n".to_string()
                )
            ]
        );
        for bad in ["noequals", "=x", "k=@/nonexistent/file"] {
            assert!(
                Cli::try_parse_from(["drctl", "run", "--host", "h", "verb", "v", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn members_parse() {
        assert_eq!(
            parse_member("2=127.0.0.1:7002@shanghai").unwrap(),
            MemberSpec {
                node_id: 2,
                addr: "127.0.0.1:7002".into(),
                region: "shanghai".into()
            }
        );
        for bad in ["x=a@b", "1=a", "0=a:1@r", "1=@r", "1=a:1@"] {
            assert!(parse_member(bad).is_err(), "{bad}");
        }
    }
}
