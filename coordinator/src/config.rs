//! The coordinator's configuration file (`coordinator.toml`) and its validated runtime form.
//!
//! Why two layers: the file format ([`raw`]) is what operators write and must refuse
//! anything it does not know (`deny_unknown_fields`), while the runtime [`Config`] is what
//! the process relies on (timeouts that make sense together, absolute paths). The file is
//! turned into the runtime struct by exhaustive destructuring, so a new key cannot be
//! added to the file format and silently ignored.
//!
//! Every error names the file, the line and the key, e.g.
//! `coordinator.toml:12: unknown field `foo`, expected one of ...`, because an operator
//! fixing a config at 3am should not have to guess where the problem is.
//!
//! Relative paths (`data_dir`, `[tls]` files) resolve against the directory of the file,
//! so a config and its certificates can be moved together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Named defaults for optional keys.
pub mod defaults {
    use std::time::Duration;

    pub const LOG_FORMAT: super::LogFormat = super::LogFormat::Text;
    pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
    pub const RAFT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(150);
    pub const RAFT_ELECTION_TIMEOUT_MIN: Duration = Duration::from_millis(600);
    pub const RAFT_ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(1200);
    pub const RAFT_SNAPSHOT_EVERY: u64 = 5000;
    /// Logs kept behind a snapshot so a briefly lagging member catches up by log, not by a
    /// full snapshot transfer.
    pub const RAFT_KEEP_LOGS: u64 = 2000;
    pub const AGENTS_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
    pub const AGENTS_DOWN_AFTER: Duration = Duration::from_secs(5);
    pub const AGENTS_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);
}

/// The only file format version this build understands.
pub const CONFIG_VERSION: u32 = 1;

/// Why a configuration could not be loaded. Display is one line: `file:line: what`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: cannot read configuration: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}:{line}: {message}", line = fmt_line(*.line))]
    Parse {
        origin: String,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },
    #[error("{origin}:{line}: key `{key}`: {message}", line = fmt_line(*.line))]
    Invalid {
        origin: String,
        line: Option<usize>,
        key: String,
        message: String,
    },
}

fn fmt_line(line: Option<usize>) -> String {
    line.map_or_else(|| "?".to_owned(), |l| l.to_string())
}

impl ConfigError {
    /// The line of the file the error points at, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { line, .. } | ConfigError::Invalid { line, .. } => *line,
        }
    }
}

/// Log output format of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A configured peer coordinator (used by `cluster init` without explicit members).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node_id: u64,
    pub addr: String,
    pub region: String,
}

/// Certificate files of this node (mutual TLS on every port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub reload_interval: Duration,
}

/// Raft timing and log compaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftConfig {
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot every this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot.
    pub keep_logs: u64,
}

/// How the coordinator treats agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentsConfig {
    pub heartbeat_interval: Duration,
    pub down_after: Duration,
    pub command_timeout: Duration,
}

/// Validated runtime configuration of one coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where the configuration came from (for messages).
    pub origin: String,
    pub node_id: u64,
    pub region: String,
    pub listen: SocketAddr,
    /// Address other nodes and agents use to reach this node (`host:port`).
    pub advertise: String,
    pub data_dir: PathBuf,
    /// `None`: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub peers: Vec<Peer>,
    pub tls: TlsConfig,
    pub raft: RaftConfig,
    pub agents: AgentsConfig,
}

/// The file format, exactly as written by operators.
mod raw {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub version: u32,
        pub node_id: u64,
        pub region: String,
        pub listen: SocketAddr,
        pub advertise: Option<String>,
        pub data_dir: PathBuf,
        pub metrics_listen: Option<SocketAddr>,
        pub log_format: Option<super::LogFormat>,
        #[serde(default)]
        pub peers: Vec<Peer>,
        pub tls: Tls,
        #[serde(default)]
        pub raft: Raft,
        #[serde(default)]
        pub agents: Agents,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Peer {
        pub node_id: u64,
        pub addr: String,
        pub region: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub ca: PathBuf,
        pub cert: PathBuf,
        pub key: PathBuf,
        #[serde(default, with = "humantime_serde")]
        pub reload_interval: Option<Duration>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Raft {
        #[serde(default, with = "humantime_serde")]
        pub heartbeat_interval: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub election_timeout_min: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub election_timeout_max: Option<Duration>,
        pub snapshot_every: Option<u64>,
        pub keep_logs: Option<u64>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Agents {
        #[serde(default, with = "humantime_serde")]
        pub heartbeat_interval: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub down_after: Option<Duration>,
        #[serde(default, with = "humantime_serde")]
        pub command_timeout: Option<Duration>,
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            origin: origin.clone(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &origin, &base)
    }

    /// Parses configuration text; `origin` is a file path (relative paths resolve against
    /// its directory) or a label such as `<inline>`.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let base = Path::new(origin)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Self::parse(text, origin, &base)
    }

    fn parse(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigError> {
        let file: raw::File = toml::from_str(text).map_err(|e| {
            let span = e.span();
            let line = span.as_ref().map(|s| line_of(text, s.start));
            let key = span.as_ref().and_then(|s| key_at(text, s.start));
            let msg = e.message().trim().to_owned();
            // serde names the offending key of "unknown field" and "missing field" errors
            // itself; for bad values, name the key we found at the error's position.
            let message = match &key {
                Some(k) if !msg.contains(&format!("`{}`", k.rsplit('.').next().unwrap_or(k))) => {
                    format!("key `{k}`: {msg}")
                }
                _ => msg,
            };
            ConfigError::Parse {
                origin: origin.to_owned(),
                line,
                key,
                message,
            }
        })?;
        validate(file, text, origin, base)
    }

    /// This node as a Raft member.
    pub fn self_member(&self) -> Peer {
        Peer {
            node_id: self.node_id,
            addr: self.advertise.clone(),
            region: self.region.clone(),
        }
    }
}

fn validate(file: raw::File, text: &str, origin: &str, base: &Path) -> Result<Config, ConfigError> {
    // Exhaustive destructuring: a new key in the file format must be handled here.
    let raw::File {
        version,
        node_id,
        region,
        listen,
        advertise,
        data_dir,
        metrics_listen,
        log_format,
        peers,
        tls,
        raft,
        agents,
    } = file;
    let invalid = |section: Option<&str>, key: &str, message: String| ConfigError::Invalid {
        origin: origin.to_owned(),
        line: find_key_line(text, section, key),
        key: match section {
            Some(s) => format!("{s}.{key}"),
            None => key.to_owned(),
        },
        message,
    };

    if version != CONFIG_VERSION {
        return Err(invalid(
            None,
            "version",
            format!("unsupported version {version}, this build reads version {CONFIG_VERSION}"),
        ));
    }
    if node_id == 0 {
        return Err(invalid(None, "node_id", "must be greater than 0".into()));
    }
    if region.trim().is_empty() {
        return Err(invalid(None, "region", "must not be empty".into()));
    }
    let advertise = match advertise {
        Some(a) if a.trim().is_empty() => {
            return Err(invalid(None, "advertise", "must not be empty".into()));
        }
        Some(a) => a,
        None => listen.to_string(),
    };

    let mut seen = std::collections::BTreeSet::from([node_id]);
    let mut out_peers = Vec::with_capacity(peers.len());
    for raw::Peer {
        node_id: peer_id,
        addr,
        region: peer_region,
    } in peers
    {
        if !seen.insert(peer_id) {
            return Err(invalid(
                Some("peers"),
                "node_id",
                format!("node id {peer_id} appears twice (this node or another peer)"),
            ));
        }
        if peer_id == 0 || addr.trim().is_empty() {
            return Err(invalid(
                Some("peers"),
                "addr",
                format!("peer {peer_id} needs a node_id > 0 and a non-empty addr"),
            ));
        }
        out_peers.push(Peer {
            node_id: peer_id,
            addr,
            region: peer_region,
        });
    }

    let raw::Tls {
        ca,
        cert,
        key,
        reload_interval,
    } = tls;
    let tls = TlsConfig {
        ca: base.join(ca),
        cert: base.join(cert),
        key: base.join(key),
        reload_interval: reload_interval.unwrap_or(defaults::TLS_RELOAD_INTERVAL),
    };
    if tls.reload_interval.is_zero() {
        return Err(invalid(
            Some("tls"),
            "reload_interval",
            "must be greater than 0".into(),
        ));
    }

    let raw::Raft {
        heartbeat_interval,
        election_timeout_min,
        election_timeout_max,
        snapshot_every,
        keep_logs,
    } = raft;
    let raft = RaftConfig {
        heartbeat_interval: heartbeat_interval.unwrap_or(defaults::RAFT_HEARTBEAT_INTERVAL),
        election_timeout_min: election_timeout_min.unwrap_or(defaults::RAFT_ELECTION_TIMEOUT_MIN),
        election_timeout_max: election_timeout_max.unwrap_or(defaults::RAFT_ELECTION_TIMEOUT_MAX),
        snapshot_every: snapshot_every.unwrap_or(defaults::RAFT_SNAPSHOT_EVERY),
        keep_logs: keep_logs.unwrap_or(defaults::RAFT_KEEP_LOGS),
    };
    if raft.heartbeat_interval < Duration::from_millis(1) {
        return Err(invalid(
            Some("raft"),
            "heartbeat_interval",
            "must be at least 1ms".into(),
        ));
    }
    if raft.election_timeout_min >= raft.election_timeout_max {
        return Err(invalid(
            Some("raft"),
            "election_timeout_min",
            format!(
                "must be less than election_timeout_max ({} >= {})",
                humantime::format_duration(raft.election_timeout_min),
                humantime::format_duration(raft.election_timeout_max)
            ),
        ));
    }
    if raft.heartbeat_interval >= raft.election_timeout_min {
        return Err(invalid(
            Some("raft"),
            "heartbeat_interval",
            format!(
                "must be less than election_timeout_min ({} >= {}), or followers start elections",
                humantime::format_duration(raft.heartbeat_interval),
                humantime::format_duration(raft.election_timeout_min)
            ),
        ));
    }
    if raft.snapshot_every == 0 {
        return Err(invalid(
            Some("raft"),
            "snapshot_every",
            "must be greater than 0".into(),
        ));
    }

    let raw::Agents {
        heartbeat_interval,
        down_after,
        command_timeout,
    } = agents;
    let agents = AgentsConfig {
        heartbeat_interval: heartbeat_interval.unwrap_or(defaults::AGENTS_HEARTBEAT_INTERVAL),
        down_after: down_after.unwrap_or(defaults::AGENTS_DOWN_AFTER),
        command_timeout: command_timeout.unwrap_or(defaults::AGENTS_COMMAND_TIMEOUT),
    };
    if agents.heartbeat_interval.is_zero() {
        return Err(invalid(
            Some("agents"),
            "heartbeat_interval",
            "must be greater than 0".into(),
        ));
    }
    if agents.down_after <= agents.heartbeat_interval {
        return Err(invalid(
            Some("agents"),
            "down_after",
            format!(
                "must be longer than heartbeat_interval ({} <= {}), or every host flaps down",
                humantime::format_duration(agents.down_after),
                humantime::format_duration(agents.heartbeat_interval)
            ),
        ));
    }
    if agents.command_timeout.is_zero() {
        return Err(invalid(
            Some("agents"),
            "command_timeout",
            "must be greater than 0".into(),
        ));
    }

    Ok(Config {
        origin: origin.to_owned(),
        node_id,
        region,
        listen,
        advertise,
        data_dir: base.join(data_dir),
        metrics_listen,
        log_format: log_format.unwrap_or(defaults::LOG_FORMAT),
        peers: out_peers,
        tls,
        raft,
        agents,
    })
}

/// 1-based line number of byte offset `pos`.
fn line_of(text: &str, pos: usize) -> usize {
    let pos = pos.min(text.len());
    text.as_bytes()[..pos]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The dotted key (`section.key`) whose line contains byte offset `pos`, if the line is a
/// `key = value` line.
fn key_at(text: &str, pos: usize) -> Option<String> {
    let pos = pos.min(text.len());
    let line_start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || key.starts_with('#') || key.starts_with('[') {
        return None;
    }
    let section = text[..line_start].lines().rev().find_map(section_header);
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_owned(),
    })
}

/// `[name]` or `[[name]]` -> `name`.
fn section_header(line: &str) -> Option<&str> {
    let l = line.trim();
    let l = l.split('#').next().unwrap_or("").trim();
    let inner = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]"));
    let inner = inner.or_else(|| l.strip_prefix('[').and_then(|r| r.strip_suffix(']')));
    inner.map(str::trim)
}

/// Line where `key` is set inside `section` (top level when `None`); the first match.
fn find_key_line(text: &str, section: Option<&str>, key: &str) -> Option<usize> {
    let mut current: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(s) = section_header(line) {
            current = Some(s);
            continue;
        }
        if current == section
            && let Some((k, _)) = line.split_once('=')
            && k.trim() == key
        {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
version = 1
node_id = 1
region = "beijing"
listen = "127.0.0.1:7443"
data_dir = "data"

[tls]
ca = "tls/ca.pem"
cert = "tls/c.pem"
key = "tls/c.key"
"#;

    #[test]
    fn parses_the_example_config() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/coordinator.toml");
        let cfg = Config::load(&path).expect("example config parses");
        assert_eq!(cfg.node_id, 1);
        assert_eq!(cfg.region, "beijing");
        assert_eq!(cfg.advertise, "coord-bj-1.dr.yeslocker.internal:7443");
        assert_eq!(cfg.listen, "0.0.0.0:7443".parse().unwrap());
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/dr-coordinator"));
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9443".parse().unwrap()));
        assert_eq!(cfg.log_format, LogFormat::Text);
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(cfg.peers[1].region, "witness");
        assert_eq!(cfg.tls.ca, PathBuf::from("/etc/dr/tls/ca.pem"));
        assert_eq!(cfg.tls.reload_interval, Duration::from_secs(5));
        assert_eq!(cfg.raft.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(cfg.raft.election_timeout_min, Duration::from_millis(500));
        assert_eq!(cfg.raft.election_timeout_max, Duration::from_millis(1000));
        assert_eq!(cfg.raft.snapshot_every, 5000);
        assert_eq!(cfg.agents.down_after, Duration::from_secs(5));
        assert_eq!(cfg.agents.command_timeout, Duration::from_secs(600));
    }

    #[test]
    fn defaults_and_relative_paths() {
        let cfg = Config::from_toml_str(MINIMAL, "/etc/dr/coordinator.toml").unwrap();
        assert_eq!(cfg.advertise, "127.0.0.1:7443");
        assert_eq!(cfg.data_dir, PathBuf::from("/etc/dr/data"));
        assert_eq!(cfg.tls.key, PathBuf::from("/etc/dr/tls/c.key"));
        assert_eq!(cfg.metrics_listen, None);
        assert_eq!(cfg.raft.keep_logs, defaults::RAFT_KEEP_LOGS);
        assert_eq!(cfg.agents.heartbeat_interval, Duration::from_secs(1));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = MINIMAL.replace("[tls]", "[tls]\nfoo = 1");
        let err = Config::from_toml_str(&text, "coordinator.toml").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("coordinator.toml:9: unknown field `foo`"),
            "{msg}"
        );
        assert!(msg.contains("expected one of"), "{msg}");
        assert_eq!(err.line(), Some(9));
    }

    #[test]
    fn unknown_top_level_key() {
        let text = format!("{MINIMAL}\n");
        let text = text.replace("region = \"beijing\"", "region = \"beijing\"\nzone = \"a\"");
        let msg = Config::from_toml_str(&text, "coordinator.toml")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("coordinator.toml:5: unknown field `zone`"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_value_names_file_line_and_key() {
        let text = format!("{MINIMAL}\n[raft]\nheartbeat_interval = \"fast\"\n");
        let err = Config::from_toml_str(&text, "coordinator.toml").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("coordinator.toml:14: key `raft.heartbeat_interval`"),
            "{msg}"
        );
        let text = MINIMAL.replace("node_id = 1", "node_id = \"one\"");
        let msg = Config::from_toml_str(&text, "coordinator.toml")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("coordinator.toml:3: key `node_id`"),
            "{msg}"
        );
    }

    #[test]
    fn inconsistent_timeouts_are_refused() {
        let text = format!(
            "{MINIMAL}\n[raft]\nelection_timeout_min = \"2s\"\nelection_timeout_max = \"1s\"\n"
        );
        let msg = Config::from_toml_str(&text, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("c.toml:14: key `raft.election_timeout_min`"),
            "{msg}"
        );

        let text = format!("{MINIMAL}\n[raft]\nheartbeat_interval = \"700ms\"\n");
        let msg = Config::from_toml_str(&text, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("c.toml:14: key `raft.heartbeat_interval`"),
            "{msg}"
        );
    }

    #[test]
    fn missing_key_and_bad_version() {
        let text = MINIMAL.replace("data_dir = \"data\"\n", "");
        let msg = Config::from_toml_str(&text, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("missing field `data_dir`"), "{msg}");
        let text = MINIMAL.replace("version = 1", "version = 2");
        let msg = Config::from_toml_str(&text, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("c.toml:2: key `version`: unsupported version 2"),
            "{msg}"
        );
    }
}
