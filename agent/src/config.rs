//! The agent's configuration file (`deploy/examples/agent.toml` is the reference).
//!
//! Why this shape: an agent that silently ignores a misspelt key is an agent whose health
//! check or fencing hook quietly does not run. So every table is `deny_unknown_fields`, the
//! file carries a `version`, and the raw serde structs are turned into the runtime [`Config`]
//! by exhaustive destructuring: adding a raw field without handling it fails to compile.
//!
//! Errors name the file, the line and the key (`agent.toml:7: unknown field `colour`...`,
//! `agent.toml:12: invalid value for `interval`: ...`): the line comes from toml's span.
//! Kind-specific keys of `[[checks]]` and `[[smoke_tests]]` are kept flat (one struct with
//! optional, spanned fields) rather than as a serde-tagged enum, because a tagged enum buffers
//! its content and loses the spans we need for those messages.
//!
//! Relative paths resolve against the directory of the config file, so a config and its
//! certificates can move together.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dr_proto::pb;
use dr_proto::tls::TlsPaths;
use serde::Deserialize;
use toml::Spanned;

/// The only config format version this agent understands.
pub const CONFIG_VERSION: u32 = 1;

/// Defaults used when an optional key is absent.
pub mod defaults {
    use std::time::Duration;
    pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);
    /// The DRP's RPO for ordinary data (critical data: 5 min, set `rpo` on the check).
    pub const WAL_ARCHIVE_RPO: Duration = Duration::from_secs(15 * 60);
    pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
    pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
    pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
    pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
    pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
    pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
    pub const INTEGRITY_INTERVAL: Duration = Duration::from_secs(300);
    pub const INTEGRITY_HIGH_INTERVAL: Duration = Duration::from_secs(10);
}

/// Why a configuration was refused. The Display form is one line meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: {message}")]
    At {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    File { file: String, message: String },
}

pub type ConfigResult<T> = Result<T, ConfigError>;

// ---------------------------------------------------------------- runtime types

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (for messages).
    pub source: PathBuf,
    pub host_id: String,
    pub region: String,
    pub site: String,
    pub roles: Vec<String>,
    pub coordinators: Vec<String>,
    pub data_dir: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Certificate files for mutual TLS (re-read on change by `dr_proto::tls`).
    pub tls: TlsPaths,
    pub session: SessionConfig,
    pub checks: Vec<CheckSpec>,
    pub services: Vec<ServiceSpec>,
    pub maintenance: MaintenanceSpec,
    pub smoke_tests: Vec<SmokeTestSpec>,
    pub actions: Vec<ActionSpec>,
    /// The `[backup]` table, parsed by `crate::backup` (owned by the backup work). Kept raw here
    /// so the two can evolve apart; BACKUP: turn this into your typed section when it lands
    /// (and keep `deny_unknown_fields` there too).
    pub backup: Option<toml::Table>,
    /// `[isolation]`: extra flows kept open while the host is isolated (`crate::isolate`).
    pub isolation: IsolationSpec,
    /// `[rotation]`: credentials `rotate-credentials` may replace (`crate::rotate`).
    pub rotation: RotationSpec,
    /// `[integrity]`: files watched for changes (`crate::integrity`).
    pub integrity: IntegritySpec,
    /// `[postgres]`: the PostgreSQL this agent manages (`crate::pg`); failover verbs need it.
    pub postgres: Option<crate::pg::PgConfig>,
    /// `[fence]`: how this host fences its PostgreSQL when its lease runs out (`crate::fence`).
    pub fence: Option<crate::fence::FenceConfig>,
    /// `[[traffic]]`: traffic-switching providers this host executes (`crate::traffic`).
    pub traffic: Vec<crate::traffic::TrafficConfig>,
}

/// `[isolation]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IsolationSpec {
    /// Management sources that stay reachable while isolated (`10.0.0.5/32:22`).
    pub allow: Vec<crate::isolate::AllowRule>,
    /// Command line that runs `nft` (default: `nft` from PATH). Tests point it into a
    /// network namespace (`["ip", "netns", "exec", "NS", "nft"]`).
    pub nft: Option<Vec<String>>,
}

/// `[rotation]`. `db_admin_url` may carry a password: never log it, use [`redact_url`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationSpec {
    pub db_admin_url: Option<String>,
    /// Where the old/new passwords are tried (host, port, database; user and password are
    /// replaced). Default: the admin URL. Must reach a password-checking `pg_hba` line.
    pub db_check_url: Option<String>,
    /// Terminate the rotated roles' open sessions (an attacker's connection outlives a new
    /// password otherwise). Default true.
    pub terminate_sessions: bool,
    /// Per reload command and per database step.
    pub timeout: Duration,
    /// `scope=db`: PostgreSQL roles.
    pub roles: Vec<RotationTarget>,
    /// `scope=app`: application secrets that live only in files.
    pub app_secrets: Vec<RotationTarget>,
}

impl Default for RotationSpec {
    fn default() -> Self {
        Self {
            db_admin_url: None,
            db_check_url: None,
            terminate_sessions: true,
            timeout: defaults::COMMAND_TIMEOUT,
            roles: Vec::new(),
            app_secrets: Vec::new(),
        }
    }
}

/// One secret to rotate: a PostgreSQL role (`name` is the role) or an application secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationTarget {
    pub name: String,
    pub files: Vec<SecretFile>,
    pub reload: Vec<Reload>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    pub path: PathBuf,
    pub format: SecretFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretFormat {
    /// The file holds only the secret (a trailing newline is kept if there was one).
    Plain,
    /// `KEY=value` lines; only `key`'s line changes.
    Env { key: String },
}

/// How a consumer of a rotated secret picks it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// `systemctl reload UNIT`.
    Unit(String),
    Command(Vec<String>),
}

/// `[integrity]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegritySpec {
    pub paths: Vec<PathBuf>,
    /// Re-hash interval at `level=normal`.
    pub interval: Duration,
    /// Re-hash interval at `level=high`.
    pub high_interval: Duration,
}

impl Default for IntegritySpec {
    fn default() -> Self {
        Self {
            paths: Vec::new(),
            interval: defaults::INTEGRITY_INTERVAL,
            high_interval: defaults::INTEGRITY_HIGH_INTERVAL,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub connect_timeout: Duration,
    /// Used until the coordinator's `Welcome.heartbeat_interval_ms` says otherwise.
    pub heartbeat_interval: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            reconnect_min: defaults::RECONNECT_MIN,
            reconnect_max: defaults::RECONNECT_MAX,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            heartbeat_interval: defaults::HEARTBEAT_INTERVAL,
        }
    }
}

/// One periodic health check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckSpec {
    pub name: String,
    pub service: String,
    pub tier: pb::Tier,
    pub interval: Duration,
    pub timeout: Duration,
    pub probe: Probe,
}

/// What a check or smoke test actually probes.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Tcp {
        addr: String,
    },
    Http {
        url: String,
        expect_status: u16,
        ca: Option<PathBuf>,
    },
    /// `url` may carry a password: never log it, use [`redact_url`].
    Postgres {
        url: String,
        query: String,
        expect: Option<String>,
    },
    Disk {
        path: PathBuf,
        min_free_percent: Option<f64>,
        min_free_bytes: Option<u64>,
    },
    Process {
        pidfile: PathBuf,
    },
    Command {
        command: Vec<String>,
    },
    /// Archive lag of the local PostgreSQL, held under `rpo` (see `health::wal_archive`).
    /// `url` may carry a password, as for `Postgres`.
    WalArchive {
        url: String,
        rpo: Duration,
    },
}

impl Probe {
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Tcp { .. } => "tcp",
            Probe::Http { .. } => "http",
            Probe::Postgres { .. } => "postgres",
            Probe::Disk { .. } => "disk",
            Probe::Process { .. } => "process",
            Probe::Command { .. } => "command",
            Probe::WalArchive { .. } => "wal_archive",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub control: ServiceControl,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceControl {
    /// A systemd unit driven through `systemctl`.
    Unit(String),
    /// Explicit commands; a missing `restart` is stop then start.
    Commands {
        start: Vec<String>,
        stop: Vec<String>,
        restart: Option<Vec<String>>,
        status: Option<Vec<String>>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceSpec {
    pub on: Vec<Vec<String>>,
    pub off: Vec<Vec<String>>,
    /// Per hook.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SmokeTestSpec {
    pub name: String,
    pub timeout: Duration,
    /// Only `Http`, `Postgres` (kind = "sql") and `Command`.
    pub probe: Probe,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionSpec {
    pub name: String,
    pub command: Vec<String>,
    pub timeout: Duration,
    /// Whether `Exec.args` from the coordinator may be appended (default: refused).
    pub allow_args: bool,
}

// ---------------------------------------------------------------- raw serde types

/// A duration written the humantime way (`"100ms"`, `"5s"`, `"1h 30m"`).
#[derive(Debug, Clone, Copy)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a duration ({e}); write e.g. \"500ms\" or \"5s\""
                ))
            })
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawTier {
    Critical,
    Important,
    NonCritical,
}

impl From<RawTier> for pb::Tier {
    fn from(t: RawTier) -> Self {
        match t {
            RawTier::Critical => pb::Tier::Critical,
            RawTier::Important => pb::Tier::Important,
            RawTier::NonCritical => pb::Tier::NonCritical,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    version: Spanned<u32>,
    host_id: Spanned<String>,
    region: String,
    site: String,
    #[serde(default)]
    roles: Vec<String>,
    coordinators: Spanned<Vec<String>>,
    data_dir: PathBuf,
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    log_format: LogFormat,
    tls: RawTls,
    #[serde(default)]
    session: Option<RawSession>,
    #[serde(default)]
    checks: Vec<RawProbeEntry>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
    #[serde(default)]
    maintenance: Option<RawMaintenance>,
    #[serde(default)]
    smoke_tests: Vec<RawProbeEntry>,
    #[serde(default)]
    actions: Vec<RawAction>,
    #[serde(default)]
    backup: Option<toml::Table>,
    #[serde(default)]
    isolation: Option<RawIsolation>,
    #[serde(default)]
    rotation: Option<RawRotation>,
    #[serde(default)]
    integrity: Option<RawIntegrity>,
    #[serde(default)]
    postgres: Option<Spanned<crate::pg::PgConfig>>,
    #[serde(default)]
    fence: Option<crate::fence::FenceConfig>,
    #[serde(default)]
    traffic: Vec<crate::traffic::TrafficConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIsolation {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    nft: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRotation {
    db_admin_url: Option<Spanned<String>>,
    db_check_url: Option<Spanned<String>>,
    terminate_sessions: Option<bool>,
    timeout: Option<HumanDuration>,
    #[serde(default)]
    roles: Vec<RawRotationTarget>,
    #[serde(default)]
    app_secrets: Vec<RawRotationTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRotationTarget {
    name: Spanned<String>,
    #[serde(default)]
    files: Vec<Spanned<RawSecretFile>>,
    #[serde(default)]
    reload: Vec<Spanned<RawReload>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecretFile {
    path: PathBuf,
    format: Option<String>,
    key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReload {
    unit: Option<String>,
    command: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntegrity {
    #[serde(default)]
    paths: Vec<PathBuf>,
    interval: Option<Spanned<HumanDuration>>,
    high_interval: Option<Spanned<HumanDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    reload_interval: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    reconnect_min: Option<HumanDuration>,
    reconnect_max: Option<Spanned<HumanDuration>>,
    connect_timeout: Option<HumanDuration>,
    heartbeat_interval: Option<HumanDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Tcp,
    Http,
    Postgres,
    Sql,
    Disk,
    Process,
    Command,
    #[serde(rename = "wal_archive")]
    WalArchive,
}

/// One `[[checks]]` or `[[smoke_tests]]` entry: flat, so every key keeps its span.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbeEntry {
    name: Spanned<String>,
    kind: Spanned<RawKind>,
    service: Option<Spanned<String>>,
    tier: Option<Spanned<RawTier>>,
    interval: Option<Spanned<HumanDuration>>,
    timeout: Option<HumanDuration>,
    url: Option<Spanned<String>>,
    query: Option<Spanned<String>>,
    expect: Option<Spanned<String>>,
    expect_status: Option<Spanned<u16>>,
    ca: Option<Spanned<PathBuf>>,
    addr: Option<Spanned<String>>,
    path: Option<Spanned<PathBuf>>,
    min_free_percent: Option<Spanned<f64>>,
    min_free_bytes: Option<Spanned<u64>>,
    pidfile: Option<Spanned<PathBuf>>,
    command: Option<Spanned<Vec<String>>>,
    rpo: Option<Spanned<HumanDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    unit: Option<String>,
    start: Option<Vec<String>>,
    stop: Option<Vec<String>>,
    restart: Option<Vec<String>>,
    status: Option<Vec<String>>,
    timeout: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaintenance {
    #[serde(default)]
    on: Vec<Spanned<Vec<String>>>,
    #[serde(default)]
    off: Vec<Spanned<Vec<String>>>,
    timeout: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    name: Spanned<String>,
    command: Spanned<Vec<String>>,
    timeout: Option<HumanDuration>,
    #[serde(default)]
    allow_args: bool,
}

// ---------------------------------------------------------------- loading

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> ConfigResult<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text` as if read from `path` (relative paths resolve against its directory).
    pub fn parse(text: &str, path: &Path) -> ConfigResult<Config> {
        let ctx = Ctx {
            text,
            file: path.display().to_string(),
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        validate(raw, &ctx, &base, path)
    }

    pub fn check(&self, name: &str) -> Option<&CheckSpec> {
        self.checks.iter().find(|c| c.name == name)
    }
}

struct Ctx<'a> {
    text: &'a str,
    file: String,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn at(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::At {
            file: self.file.clone(),
            line: self.line_of(span.start),
            message: message.into(),
        }
    }

    /// The key written on the line containing `offset` (`interval = "x"` → `interval`).
    fn key_at(&self, offset: usize) -> Option<String> {
        let start = self.text[..offset.min(self.text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let line = self.text[start..].lines().next()?;
        let (key, _) = line.split_once('=')?;
        let key = key.trim().trim_matches('"');
        (!key.is_empty() && !key.starts_with('[')).then(|| key.to_string())
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().to_string();
        let Some(span) = e.span() else {
            return ConfigError::File {
                file: self.file.clone(),
                message,
            };
        };
        let structural = [
            "unknown field",
            "missing field",
            "duplicate key",
            "unknown variant",
            "invalid",
        ]
        .iter()
        .any(|p| message.starts_with(p));
        let message = match self.key_at(span.start) {
            Some(key)
                if !structural
                    || message.starts_with("unknown variant")
                    || message.starts_with("invalid") =>
            {
                format!("invalid value for `{key}`: {message}")
            }
            _ => message,
        };
        self.at(span, message)
    }
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() || base.as_os_str().is_empty() {
        p
    } else {
        base.join(p)
    }
}

/// Commands whose program is a relative path with a slash (`./bin/check`) resolve against the
/// config directory; bare names (`systemctl`) are looked up in PATH when run.
fn resolve_command(base: &Path, mut cmd: Vec<String>) -> Vec<String> {
    if let Some(first) = cmd.first_mut() {
        let p = Path::new(first.as_str());
        if !p.is_absolute() && first.contains('/') {
            *first = resolve(base, p.to_path_buf()).display().to_string();
        }
    }
    cmd
}

fn validate(raw: RawConfig, ctx: &Ctx<'_>, base: &Path, path: &Path) -> ConfigResult<Config> {
    let RawConfig {
        version,
        host_id,
        region,
        site,
        roles,
        coordinators,
        data_dir,
        metrics_listen,
        log_format,
        tls,
        session,
        checks,
        services,
        maintenance,
        smoke_tests,
        actions,
        backup,
        isolation,
        rotation,
        integrity,
        postgres,
        fence,
        traffic,
    } = raw;
    let postgres = match postgres {
        None => None,
        Some(pg) => {
            let span = pg.span();
            let pg = pg.into_inner();
            pg.validate()
                .map_err(|e| ctx.at(span, format!("invalid `[postgres]`: {e}")))?;
            Some(pg)
        }
    };

    if *version.get_ref() != CONFIG_VERSION {
        return Err(ctx.at(
            version.span(),
            format!("invalid value for `version`: {} is not supported (this agent reads version {CONFIG_VERSION})", version.get_ref()),
        ));
    }
    if host_id.get_ref().trim().is_empty() {
        return Err(ctx.at(
            host_id.span(),
            "invalid value for `host_id`: must not be empty",
        ));
    }
    if coordinators.get_ref().is_empty() {
        return Err(ctx.at(
            coordinators.span(),
            "invalid value for `coordinators`: list at least one coordinator endpoint",
        ));
    }

    let RawTls {
        ca,
        cert,
        key,
        reload_interval,
    } = tls;
    let tls = TlsPaths {
        ca: resolve(base, ca),
        cert: resolve(base, cert),
        key: resolve(base, key),
        reload_interval: Some(reload_interval.map_or(defaults::TLS_RELOAD_INTERVAL, |d| d.0)),
    };

    let session = match session {
        None => SessionConfig::default(),
        Some(RawSession {
            reconnect_min,
            reconnect_max,
            connect_timeout,
            heartbeat_interval,
        }) => {
            let min = reconnect_min.map_or(defaults::RECONNECT_MIN, |d| d.0);
            let max = match reconnect_max {
                Some(m) if m.get_ref().0 < min => {
                    return Err(ctx.at(
                        m.span(),
                        "invalid value for `reconnect_max`: must not be below `reconnect_min`",
                    ));
                }
                Some(m) => m.into_inner().0,
                None => defaults::RECONNECT_MAX.max(min),
            };
            SessionConfig {
                reconnect_min: min,
                reconnect_max: max,
                connect_timeout: connect_timeout.map_or(defaults::CONNECT_TIMEOUT, |d| d.0),
                heartbeat_interval: heartbeat_interval
                    .map_or(defaults::HEARTBEAT_INTERVAL, |d| d.0),
            }
        }
    };

    let mut seen = BTreeSet::new();
    let mut check_specs = Vec::with_capacity(checks.len());
    for entry in checks {
        let spec = probe_entry(entry, ctx, base, Section::Check)?;
        check_specs.push(spec);
    }
    for c in &check_specs {
        if !seen.insert(c.name.clone()) {
            return Err(ctx.file_err(format!("duplicate check name `{}`", c.name)));
        }
    }

    let mut service_specs = Vec::with_capacity(services.len());
    for s in services {
        let span = s.span();
        let RawService {
            name,
            unit,
            start,
            stop,
            restart,
            status,
            timeout,
        } = s.into_inner();
        let control = match (unit, start, stop) {
            (Some(unit), None, None) if restart.is_none() && status.is_none() => {
                ServiceControl::Unit(unit)
            }
            (Some(_), ..) => {
                return Err(ctx.at(
                    span,
                    format!(
                        "service `{name}`: give either `unit` or start/stop commands, not both"
                    ),
                ));
            }
            (None, Some(start), Some(stop)) => ServiceControl::Commands {
                start: non_empty_cmd(
                    ctx,
                    span.clone(),
                    &name,
                    "start",
                    resolve_command(base, start),
                )?,
                stop: non_empty_cmd(
                    ctx,
                    span.clone(),
                    &name,
                    "stop",
                    resolve_command(base, stop),
                )?,
                restart: restart.map(|c| resolve_command(base, c)),
                status: status.map(|c| resolve_command(base, c)),
            },
            (None, ..) => {
                return Err(ctx.at(
                    span,
                    format!("service `{name}`: missing key `unit` (or both `start` and `stop`)"),
                ));
            }
        };
        service_specs.push(ServiceSpec {
            name,
            control,
            timeout: timeout.map_or(defaults::COMMAND_TIMEOUT, |d| d.0),
        });
    }

    let maintenance = match maintenance {
        None => MaintenanceSpec {
            timeout: defaults::COMMAND_TIMEOUT,
            ..Default::default()
        },
        Some(RawMaintenance { on, off, timeout }) => {
            let hooks =
                |list: Vec<Spanned<Vec<String>>>, which: &str| -> ConfigResult<Vec<Vec<String>>> {
                    list.into_iter()
                        .map(|h| {
                            let span = h.span();
                            non_empty_cmd(
                                ctx,
                                span,
                                "maintenance",
                                which,
                                resolve_command(base, h.into_inner()),
                            )
                        })
                        .collect()
                };
            MaintenanceSpec {
                on: hooks(on, "on")?,
                off: hooks(off, "off")?,
                timeout: timeout.map_or(defaults::COMMAND_TIMEOUT, |d| d.0),
            }
        }
    };

    let mut smoke_specs = Vec::with_capacity(smoke_tests.len());
    for entry in smoke_tests {
        let spec = probe_entry(entry, ctx, base, Section::Smoke)?;
        smoke_specs.push(SmokeTestSpec {
            name: spec.name,
            timeout: spec.timeout,
            probe: spec.probe,
        });
    }

    let mut action_specs = Vec::with_capacity(actions.len());
    for a in actions {
        let RawAction {
            name,
            command,
            timeout,
            allow_args,
        } = a;
        let cspan = command.span();
        let command = non_empty_cmd(
            ctx,
            cspan,
            name.get_ref(),
            "command",
            resolve_command(base, command.into_inner()),
        )?;
        if action_specs
            .iter()
            .any(|x: &ActionSpec| &x.name == name.get_ref())
        {
            return Err(ctx.at(
                name.span(),
                format!("duplicate action name `{}`", name.get_ref()),
            ));
        }
        action_specs.push(ActionSpec {
            name: name.into_inner(),
            command,
            timeout: timeout.map_or(defaults::COMMAND_TIMEOUT, |d| d.0),
            allow_args,
        });
    }

    Ok(Config {
        source: path.to_path_buf(),
        host_id: host_id.into_inner(),
        region,
        site,
        roles,
        coordinators: coordinators.into_inner(),
        data_dir: resolve(base, data_dir),
        metrics_listen,
        log_format,
        tls,
        session,
        checks: check_specs,
        services: service_specs,
        maintenance,
        smoke_tests: smoke_specs,
        actions: action_specs,
        backup,
        isolation: validate_isolation(isolation, ctx)?,
        rotation: validate_rotation(rotation, ctx, base)?,
        integrity: validate_integrity(integrity, ctx, base)?,
        postgres,
        fence,
        traffic,
    })
}

fn validate_isolation(raw: Option<RawIsolation>, ctx: &Ctx<'_>) -> ConfigResult<IsolationSpec> {
    let Some(RawIsolation { allow, nft }) = raw else {
        return Ok(IsolationSpec::default());
    };
    let allow = allow
        .into_iter()
        .map(|a| {
            crate::isolate::AllowRule::parse(a.get_ref())
                .map_err(|e| ctx.at(a.span(), format!("invalid value for `allow`: {e}")))
        })
        .collect::<ConfigResult<_>>()?;
    let nft = match nft {
        None => None,
        Some(n) if n.get_ref().is_empty() || n.get_ref()[0].is_empty() => {
            return Err(ctx.at(
                n.span(),
                "`nft` must name a program, e.g. [\"nft\"] or [\"ip\", \"netns\", \"exec\", \"NS\", \"nft\"]".to_string(),
            ));
        }
        Some(n) => Some(n.into_inner()),
    };
    Ok(IsolationSpec { allow, nft })
}

fn validate_rotation(
    raw: Option<RawRotation>,
    ctx: &Ctx<'_>,
    base: &Path,
) -> ConfigResult<RotationSpec> {
    let Some(RawRotation {
        db_admin_url,
        db_check_url,
        terminate_sessions,
        timeout,
        roles,
        app_secrets,
    }) = raw
    else {
        return Ok(RotationSpec::default());
    };
    let pg_url = |u: Option<Spanned<String>>, key: &str| -> ConfigResult<Option<String>> {
        match u {
            Some(u)
                if !(u.get_ref().starts_with("postgres://")
                    || u.get_ref().starts_with("postgresql://")) =>
            {
                Err(ctx.at(
                    u.span(),
                    format!("invalid value for `{key}`: expected a postgres:// URL"),
                ))
            }
            u => Ok(u.map(Spanned::into_inner)),
        }
    };
    let db_admin_url = pg_url(db_admin_url, "db_admin_url")?;
    let db_check_url = pg_url(db_check_url, "db_check_url")?;
    let targets = |list: Vec<RawRotationTarget>, what: &str| -> ConfigResult<Vec<RotationTarget>> {
        let mut out: Vec<RotationTarget> = Vec::with_capacity(list.len());
        for RawRotationTarget {
            name,
            files,
            reload,
        } in list
        {
            if name.get_ref().is_empty() || out.iter().any(|t| &t.name == name.get_ref()) {
                return Err(ctx.at(
                    name.span(),
                    format!("invalid value for `name`: empty or duplicate {what} name"),
                ));
            }
            let mut secret_files = Vec::with_capacity(files.len());
            for f in files {
                let span = f.span();
                let RawSecretFile { path, format, key } = f.into_inner();
                let format = match (format.as_deref(), key) {
                    (None | Some("plain"), None) => SecretFormat::Plain,
                    (Some("env"), Some(key))
                        if !key.is_empty() && !key.contains(['=', '\n', ' ']) =>
                    {
                        SecretFormat::Env { key }
                    }
                    _ => {
                        return Err(ctx.at(
                            span,
                            "invalid secret file: use format = \"plain\" (no key) or format = \"env\" with key = \"NAME\"",
                        ));
                    }
                };
                secret_files.push(SecretFile {
                    path: resolve(base, path),
                    format,
                });
            }
            let mut reloads = Vec::with_capacity(reload.len());
            for r in reload {
                let span = r.span();
                reloads.push(match r.into_inner() {
                    RawReload {
                        unit: Some(u),
                        command: None,
                    } if !u.is_empty() => Reload::Unit(u),
                    RawReload {
                        unit: None,
                        command: Some(c),
                    } => Reload::Command(non_empty_cmd(
                        ctx,
                        span,
                        name.get_ref(),
                        "reload",
                        resolve_command(base, c),
                    )?),
                    _ => {
                        return Err(ctx.at(
                            span,
                            "invalid reload: give either unit = \"x.service\" or command = [...]",
                        ));
                    }
                });
            }
            out.push(RotationTarget {
                name: name.into_inner(),
                files: secret_files,
                reload: reloads,
            });
        }
        Ok(out)
    };
    let roles = targets(roles, "role")?;
    let app_secrets = targets(app_secrets, "app secret")?;
    if !roles.is_empty() && db_admin_url.is_none() {
        return Err(ctx.file_err(
            "[rotation]: `roles` need `db_admin_url` (a role allowed to ALTER ROLE)".into(),
        ));
    }
    Ok(RotationSpec {
        db_admin_url,
        db_check_url,
        terminate_sessions: terminate_sessions.unwrap_or(true),
        timeout: timeout.map_or(defaults::COMMAND_TIMEOUT, |d| d.0),
        roles,
        app_secrets,
    })
}

fn validate_integrity(
    raw: Option<RawIntegrity>,
    ctx: &Ctx<'_>,
    base: &Path,
) -> ConfigResult<IntegritySpec> {
    let Some(RawIntegrity {
        paths,
        interval,
        high_interval,
    }) = raw
    else {
        return Ok(IntegritySpec::default());
    };
    let positive = |d: Option<Spanned<HumanDuration>>, key: &str, default: Duration| match d {
        Some(d) if d.get_ref().0.is_zero() => Err(ctx.at(
            d.span(),
            format!("invalid value for `{key}`: must be above zero"),
        )),
        Some(d) => Ok(d.into_inner().0),
        None => Ok(default),
    };
    let interval = positive(interval, "interval", defaults::INTEGRITY_INTERVAL)?;
    let high_interval = positive(
        high_interval,
        "high_interval",
        defaults::INTEGRITY_HIGH_INTERVAL.min(interval),
    )?;
    Ok(IntegritySpec {
        paths: paths.into_iter().map(|p| resolve(base, p)).collect(),
        interval,
        high_interval,
    })
}

impl Ctx<'_> {
    fn file_err(&self, message: String) -> ConfigError {
        ConfigError::File {
            file: self.file.clone(),
            message,
        }
    }
}

fn non_empty_cmd(
    ctx: &Ctx<'_>,
    span: std::ops::Range<usize>,
    owner: &str,
    key: &str,
    cmd: Vec<String>,
) -> ConfigResult<Vec<String>> {
    if cmd.first().is_none_or(|p| p.is_empty()) {
        return Err(ctx.at(
            span,
            format!("invalid value for `{key}` of `{owner}`: the command must name a program"),
        ));
    }
    Ok(cmd)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Check,
    Smoke,
}

/// Turns one flat `[[checks]]`/`[[smoke_tests]]` entry into a spec, refusing keys that do not
/// belong to its kind (a `pidfile` on a tcp check is a typo somewhere, not something to ignore).
fn probe_entry(
    entry: RawProbeEntry,
    ctx: &Ctx<'_>,
    base: &Path,
    section: Section,
) -> ConfigResult<CheckSpec> {
    let RawProbeEntry {
        name,
        kind,
        service,
        tier,
        interval,
        timeout,
        url,
        query,
        expect,
        expect_status,
        ca,
        addr,
        path,
        min_free_percent,
        min_free_bytes,
        pidfile,
        command,
        rpo,
    } = entry;
    let kind_span = kind.span();
    let kind = *kind.get_ref();
    let kind_name = match kind {
        RawKind::Tcp => "tcp",
        RawKind::Http => "http",
        RawKind::Postgres => "postgres",
        RawKind::Sql => "sql",
        RawKind::Disk => "disk",
        RawKind::Process => "process",
        RawKind::Command => "command",
        RawKind::WalArchive => "wal_archive",
    };
    let allowed_here = match section {
        Section::Check => kind != RawKind::Sql,
        Section::Smoke => matches!(kind, RawKind::Http | RawKind::Sql | RawKind::Command),
    };
    if !allowed_here {
        let what = if section == Section::Check {
            "tcp, http, postgres, disk, process, command or wal_archive"
        } else {
            "http, sql or command"
        };
        return Err(ctx.at(
            kind_span,
            format!("invalid value for `kind`: `{kind_name}` is not allowed here (use {what})"),
        ));
    }
    let name_s = name.get_ref().clone();

    // Keys allowed per kind; everything else present is refused.
    let own: &[&str] = match kind {
        RawKind::Tcp => &["addr"],
        RawKind::Http => &["url", "expect_status", "ca"],
        RawKind::Postgres | RawKind::Sql => &["url", "query", "expect"],
        RawKind::Disk => &["path", "min_free_percent", "min_free_bytes"],
        RawKind::Process => &["pidfile"],
        RawKind::Command => &["command"],
        RawKind::WalArchive => &["url", "rpo"],
    };
    let present: [(&str, Option<std::ops::Range<usize>>); 12] = [
        ("url", url.as_ref().map(Spanned::span)),
        ("query", query.as_ref().map(Spanned::span)),
        ("expect", expect.as_ref().map(Spanned::span)),
        ("expect_status", expect_status.as_ref().map(Spanned::span)),
        ("ca", ca.as_ref().map(Spanned::span)),
        ("addr", addr.as_ref().map(Spanned::span)),
        ("path", path.as_ref().map(Spanned::span)),
        (
            "min_free_percent",
            min_free_percent.as_ref().map(Spanned::span),
        ),
        ("min_free_bytes", min_free_bytes.as_ref().map(Spanned::span)),
        ("pidfile", pidfile.as_ref().map(Spanned::span)),
        ("command", command.as_ref().map(Spanned::span)),
        ("rpo", rpo.as_ref().map(Spanned::span)),
    ];
    for (key, span) in present {
        if let Some(span) = span
            && !own.contains(&key)
        {
            return Err(ctx.at(
                span,
                format!("key `{key}` does not apply to kind = \"{kind_name}\" (check `{name_s}`)"),
            ));
        }
    }
    let missing = |key: &str| {
        ctx.at(
            kind_span.clone(),
            format!("missing key `{key}` for kind = \"{kind_name}\" (`{name_s}`)"),
        )
    };

    let probe = match kind {
        RawKind::Tcp => Probe::Tcp {
            addr: addr.ok_or_else(|| missing("addr"))?.into_inner(),
        },
        RawKind::Http => {
            let url = url.ok_or_else(|| missing("url"))?;
            let u = url.get_ref();
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.parse::<http::Uri>().is_err()
            {
                return Err(ctx.at(
                    url.span(),
                    format!("invalid value for `url`: {u:?} is not an http(s) URL"),
                ));
            }
            Probe::Http {
                url: url.into_inner(),
                expect_status: expect_status.map_or(200, Spanned::into_inner),
                ca: ca.map(|c| resolve(base, c.into_inner())),
            }
        }
        RawKind::WalArchive => {
            let url = url.ok_or_else(|| missing("url"))?;
            if !(url.get_ref().starts_with("postgres://")
                || url.get_ref().starts_with("postgresql://"))
            {
                return Err(ctx.at(
                    url.span(),
                    "invalid value for `url`: expected a postgres:// URL",
                ));
            }
            let rpo_d = match rpo {
                Some(r) => {
                    let span = r.span();
                    let d = r.into_inner().0;
                    if d < Duration::from_secs(2) {
                        return Err(ctx.at(
                            span,
                            format!("invalid value for `rpo` of `{name_s}`: at least 2s (the tier's recovery point objective, e.g. \"5m\")"),
                        ));
                    }
                    d
                }
                None => defaults::WAL_ARCHIVE_RPO,
            };
            Probe::WalArchive {
                url: url.into_inner(),
                rpo: rpo_d,
            }
        }
        RawKind::Postgres | RawKind::Sql => {
            let url = url.ok_or_else(|| missing("url"))?;
            if !(url.get_ref().starts_with("postgres://")
                || url.get_ref().starts_with("postgresql://"))
            {
                return Err(ctx.at(
                    url.span(),
                    "invalid value for `url`: expected a postgres:// URL",
                ));
            }
            Probe::Postgres {
                url: url.into_inner(),
                query: query.map_or_else(|| "select 1".to_string(), Spanned::into_inner),
                expect: expect.map(Spanned::into_inner),
            }
        }
        RawKind::Disk => {
            if let Some(p) = &min_free_percent
                && !(0.0..=100.0).contains(p.get_ref())
            {
                return Err(ctx.at(
                    p.span(),
                    "invalid value for `min_free_percent`: must be between 0 and 100",
                ));
            }
            if min_free_percent.is_none() && min_free_bytes.is_none() {
                return Err(missing("min_free_percent` or `min_free_bytes"));
            }
            Probe::Disk {
                path: resolve(base, path.ok_or_else(|| missing("path"))?.into_inner()),
                min_free_percent: min_free_percent.map(Spanned::into_inner),
                min_free_bytes: min_free_bytes.map(Spanned::into_inner),
            }
        }
        RawKind::Process => Probe::Process {
            pidfile: resolve(
                base,
                pidfile.ok_or_else(|| missing("pidfile"))?.into_inner(),
            ),
        },
        RawKind::Command => {
            let command = command.ok_or_else(|| missing("command"))?;
            let span = command.span();
            Probe::Command {
                command: non_empty_cmd(
                    ctx,
                    span,
                    &name_s,
                    "command",
                    resolve_command(base, command.into_inner()),
                )?,
            }
        }
    };

    let (service, tier, interval) = match section {
        Section::Check => (
            service.ok_or_else(|| missing("service"))?.into_inner(),
            tier.ok_or_else(|| missing("tier"))?.into_inner().into(),
            interval.map_or(defaults::CHECK_INTERVAL, |i| i.into_inner().0),
        ),
        Section::Smoke => {
            for (key, span) in [
                ("service", service.as_ref().map(Spanned::span)),
                ("tier", tier.as_ref().map(Spanned::span)),
                ("interval", interval.as_ref().map(Spanned::span)),
            ] {
                if let Some(span) = span {
                    return Err(ctx.at(
                        span,
                        format!("key `{key}` does not apply to smoke tests (`{name_s}`)"),
                    ));
                }
            }
            (String::new(), pb::Tier::Unspecified, Duration::ZERO)
        }
    };
    if section == Section::Check && interval.is_zero() {
        return Err(ctx.at(
            kind_span,
            format!("invalid value for `interval` of `{name_s}`: must be above zero"),
        ));
    }
    Ok(CheckSpec {
        name: name.into_inner(),
        service,
        tier,
        interval,
        timeout: timeout.map_or(defaults::CHECK_TIMEOUT, |d| d.0),
        probe,
    })
}

/// Hides the password of a URL (`postgres://u:secret@h/db` → `postgres://u:***@h/db`), for logs
/// and check details.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}://{}:***{}",
                    &url[..scheme_end],
                    &userinfo[..colon],
                    &url[scheme_end + 3 + at..]
                ),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/examples/agent.toml");

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("agent.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn example_parses() {
        let cfg = Config::parse(EXAMPLE, Path::new("/etc/dr/agent.toml")).expect("example parses");
        assert_eq!(cfg.host_id, "bj-db-1");
        assert_eq!(cfg.roles, vec!["db", "primary"]);
        assert_eq!(cfg.coordinators.len(), 3);
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9444".parse().unwrap()));
        assert_eq!(cfg.session.reconnect_min, Duration::from_millis(100));
        assert_eq!(cfg.checks.len(), 7);
        assert_eq!(cfg.checks[0].tier, pb::Tier::Critical);
        assert!(
            matches!(cfg.checks[1].probe, Probe::WalArchive { rpo, .. } if rpo == Duration::from_secs(300))
        );
        assert!(
            matches!(cfg.checks[4].probe, Probe::Disk { min_free_percent: Some(p), .. } if p == 10.0)
        );
        assert_eq!(cfg.services.len(), 2);
        assert_eq!(
            cfg.services[0].control,
            ServiceControl::Unit("yeslocker-app.service".into())
        );
        assert_eq!(cfg.maintenance.on.len(), 1);
        assert_eq!(cfg.smoke_tests.len(), 2);
        assert!(matches!(cfg.smoke_tests[1].probe, Probe::Postgres { .. }));
        assert_eq!(cfg.actions[0].name, "flush-locker-cache");
        assert!(cfg.backup.is_none());
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = EXAMPLE.replace("site = \"bj-dc1\"", "site = \"bj-dc1\"\ncolour = \"blue\"");
        let line = text.lines().position(|l| l.starts_with("colour")).unwrap() + 1;
        let err = parse(&text).unwrap_err();
        assert!(
            err.starts_with(&format!("agent.toml:{line}: unknown field `colour`")),
            "{err}"
        );
    }

    #[test]
    fn malformed_value_names_line_and_key() {
        let text = EXAMPLE.replacen("interval = \"1s\"", "interval = \"1 fortnight\"", 1);
        let line = text.lines().position(|l| l.contains("fortnight")).unwrap() + 1;
        let err = parse(&text).unwrap_err();
        assert!(
            err.starts_with(&format!("agent.toml:{line}: invalid value for `interval`:")),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_key() {
        let text = EXAMPLE.replace(
            "expect_status = 200\n# For",
            "expect_status = \"ok\"\n# For",
        );
        let line = text
            .lines()
            .position(|l| l.contains("expect_status = \"ok\""))
            .unwrap()
            + 1;
        let err = parse(&text).unwrap_err();
        assert!(
            err.starts_with(&format!(
                "agent.toml:{line}: invalid value for `expect_status`"
            )),
            "{err}"
        );
    }

    #[test]
    fn missing_required_key() {
        let text = EXAMPLE.replace("host_id = \"bj-db-1\"\n", "");
        let err = parse(&text).unwrap_err();
        assert!(err.starts_with("agent.toml"), "{err}");
        assert!(err.contains("missing field `host_id`"), "{err}");
    }

    #[test]
    fn key_of_another_kind_is_refused() {
        let text = EXAMPLE.replace(
            "addr = \"127.0.0.1:5432\"",
            "addr = \"127.0.0.1:5432\"\npidfile = \"/x\"",
        );
        let line = text
            .lines()
            .position(|l| l.starts_with("pidfile = \"/x\""))
            .unwrap()
            + 1;
        let err = parse(&text).unwrap_err();
        assert!(
            err.starts_with(&format!("agent.toml:{line}: key `pidfile` does not apply")),
            "{err}"
        );
    }

    #[test]
    fn wal_archive_rpo_is_checked() {
        let text = EXAMPLE.replace("rpo = \"5m\"", "rpo = \"500ms\"");
        let err = parse(&text).unwrap_err();
        assert!(err.contains("invalid value for `rpo`"), "{err}");
        let text = EXAMPLE.replace(
            "addr = \"127.0.0.1:5432\"",
            "addr = \"127.0.0.1:5432\"\nrpo = \"5m\"",
        );
        let err = parse(&text).unwrap_err();
        assert!(err.contains("key `rpo` does not apply"), "{err}");
        // Without `rpo`: the DRP's 15 minutes.
        let text = EXAMPLE.replace("rpo = \"5m\"\n", "");
        let cfg = parse(&text).unwrap();
        assert!(
            matches!(cfg.checks[1].probe, Probe::WalArchive { rpo, .. } if rpo == Duration::from_secs(900))
        );
    }

    #[test]
    fn relative_paths_resolve_against_config_dir() {
        let text = EXAMPLE
            .replace("/etc/dr/tls/ca.pem", "tls/ca.pem")
            .replace("data_dir = \"/var/lib/dr-agent\"", "data_dir = \"state\"");
        let cfg = Config::parse(&text, Path::new("/srv/dr/agent.toml")).unwrap();
        assert_eq!(cfg.tls.ca, PathBuf::from("/srv/dr/tls/ca.pem"));
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/dr/state"));
    }

    #[test]
    fn backup_table_is_kept_raw() {
        let text = format!("{EXAMPLE}\n[backup]\nrepository = \"fs:///backups\"\n");
        let cfg = parse(&text).unwrap();
        assert!(cfg.backup.unwrap().contains_key("repository"));
    }

    #[test]
    fn security_tables_parse() {
        let text = format!(
            "{EXAMPLE}\n[isolation]\nallow = [\"10.0.0.5/32:22\"]\n\n[rotation]\ndb_admin_url = \"postgres://postgres:pw@127.0.0.1/postgres\"\n\n[[rotation.roles]]\nname = \"app\"\nfiles = [{{ path = \"app.env\", format = \"env\", key = \"DB_PASSWORD\" }}]\nreload = [{{ unit = \"app.service\" }}, {{ command = [\"./reload\"] }}]\n\n[integrity]\npaths = [\"agent.toml\"]\ninterval = \"1m\"\n"
        );
        let cfg = Config::parse(&text, Path::new("/etc/dr/agent.toml")).unwrap();
        assert_eq!(cfg.isolation.allow[0].to_string(), "10.0.0.5/32:22");
        let role = &cfg.rotation.roles[0];
        assert_eq!(role.files[0].path, PathBuf::from("/etc/dr/app.env"));
        assert_eq!(
            role.files[0].format,
            SecretFormat::Env {
                key: "DB_PASSWORD".into()
            }
        );
        assert_eq!(
            role.reload,
            vec![
                Reload::Unit("app.service".into()),
                Reload::Command(vec!["/etc/dr/./reload".into()])
            ]
        );
        assert!(cfg.rotation.terminate_sessions);
        assert_eq!(
            cfg.integrity.paths,
            vec![PathBuf::from("/etc/dr/agent.toml")]
        );
        assert_eq!(cfg.integrity.interval, Duration::from_secs(60));
        assert_eq!(
            cfg.integrity.high_interval,
            defaults::INTEGRITY_HIGH_INTERVAL
        );
    }

    #[test]
    fn security_tables_refuse_mistakes() {
        let bad_allow = format!("{EXAMPLE}\n[isolation]\nallow = [\"10.0.0.5/40\"]\n");
        let err = parse(&bad_allow).unwrap_err();
        assert!(err.contains("invalid value for `allow`"), "{err}");
        let typo = format!("{EXAMPLE}\n[isolation]\nalow = []\n");
        assert!(parse(&typo).unwrap_err().contains("unknown field `alow`"));
        let no_admin = format!("{EXAMPLE}\n[[rotation.roles]]\nname = \"app\"\n");
        assert!(
            parse(&no_admin)
                .unwrap_err()
                .contains("need `db_admin_url`")
        );
        let env_without_key = format!(
            "{EXAMPLE}\n[[rotation.app_secrets]]\nname = \"k\"\nfiles = [{{ path = \"x\", format = \"env\" }}]\n"
        );
        assert!(
            parse(&env_without_key)
                .unwrap_err()
                .contains("invalid secret file")
        );
        let zero = format!("{EXAMPLE}\n[integrity]\ninterval = \"0s\"\n");
        assert!(parse(&zero).unwrap_err().contains("must be above zero"));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db?x=@"), "postgres://h/db?x=@");
    }
}
