//! The agent config's `[postgres]` table.
//!
//! Kept in the `pg` module (not the agent's `config.rs`) so the PostgreSQL manager can be
//! built, validated and tested alone; the agent config embeds [`PgConfig`] as a field.
//! Secrets are never values in this file: only where to find them (a file or an environment
//! variable name), so the config can be printed and diffed safely.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{PgError, PgResult};

pub mod defaults {
    use std::time::Duration;
    pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
    pub const RUN_AS: &str = "postgres";
    pub const PORT: u16 = 5432;
    pub const SOCKET_DIR: &str = "/var/run/postgresql";
    pub const SUPERUSER: &str = "postgres";
    pub const DATABASE: &str = "postgres";
    pub const REPLICATION_USER: &str = "replicator";
    pub const START_TIMEOUT: Duration = Duration::from_secs(60);
    pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const WAL_RECEIVER_TIMEOUT: Duration = Duration::from_secs(5);
}

/// `[postgres]`: one PostgreSQL cluster (data directory) managed by this agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    /// Database cluster name as the coordinator knows it (`Command.db_cluster`).
    pub cluster: String,
    pub data_dir: PathBuf,
    #[serde(default = "d_bin_dir")]
    pub bin_dir: PathBuf,
    /// `listen_addresses` passed to the server; `None` keeps postgresql.conf's.
    #[serde(default)]
    pub listen_host: Option<String>,
    #[serde(default = "d_port")]
    pub port: u16,
    /// `unix_socket_directories`; the agent connects through it.
    #[serde(default = "d_socket_dir")]
    pub socket_dir: PathBuf,
    /// OS user that owns the data dir and runs every PostgreSQL binary. Used (through
    /// `runuser`) only when the agent runs as root; otherwise the agent's own user runs them.
    #[serde(default = "d_run_as")]
    pub run_as: String,
    #[serde(default)]
    pub superuser: SuperuserConfig,
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// Manage the server through this systemd unit instead of `pg_ctl`.
    #[serde(default)]
    pub systemd_unit: Option<String>,
    /// `application_name` in primary_conninfo when this server is a standby (how it shows up
    /// in the primary's pg_stat_replication); default: the host name.
    #[serde(default)]
    pub application_name: Option<String>,
    /// Server log for `pg_ctl start -l`; default `<data_dir>.pg_ctl.log`, next to the data dir
    /// and not in it, because pg_rewind and pg_basebackup replace the data dir's files.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default = "d_start_timeout", with = "humantime_serde")]
    pub start_timeout: Duration,
    #[serde(default = "d_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    #[serde(default = "d_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// `wal_receiver_timeout` set on this server whenever the agent makes it a standby.
    /// Why: after a partition (silence, no reset) the WAL receiver reports `streaming` until
    /// this runs out, and the failure detector waits for the candidate's receiver to be down;
    /// PostgreSQL's 60 s default would add up to a minute to every regional failover. The
    /// receiver pings the primary at half of it when idle, so a low value costs no false
    /// disconnects.
    #[serde(default = "d_wal_receiver_timeout", with = "humantime_serde")]
    pub wal_receiver_timeout: Duration,
}

/// How the agent connects for queries (status, promote, ALTER SYSTEM).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuperuserConfig {
    #[serde(default = "d_superuser")]
    pub user: String,
    #[serde(default = "d_database")]
    pub database: String,
    /// None: rely on trust/peer authentication over the unix socket.
    #[serde(default)]
    pub password: Option<SecretSource>,
}

/// The role standbys use for streaming and pg_rewind/pg_basebackup use against a source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    #[serde(default = "d_replication_user")]
    pub user: String,
    #[serde(default)]
    pub password: Option<SecretSource>,
}

/// Where a secret lives. The value itself is never in the config, a log line or a `Debug`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SecretSource {
    /// A file whose content (trailing newline trimmed) is the secret.
    File(PathBuf),
    /// The name of an environment variable (taken from the env map given to the agent).
    Env(String),
}

impl SecretSource {
    /// Reads the secret. Errors name the source, never the value.
    pub fn resolve(&self, env: &BTreeMap<String, String>) -> PgResult<String> {
        match self {
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|e| PgError::Secret {
                    source_desc: format!("file {}", p.display()),
                    reason: e.to_string(),
                }),
            SecretSource::Env(name) => env.get(name).cloned().ok_or_else(|| PgError::Secret {
                source_desc: format!("environment variable {name}"),
                reason: "not set".into(),
            }),
        }
    }
}

impl Default for SuperuserConfig {
    fn default() -> Self {
        Self {
            user: d_superuser(),
            database: d_database(),
            password: None,
        }
    }
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            user: d_replication_user(),
            password: None,
        }
    }
}

impl PgConfig {
    /// A config with defaults for everything but the cluster name and data dir.
    pub fn new(cluster: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            cluster: cluster.into(),
            data_dir: data_dir.into(),
            bin_dir: d_bin_dir(),
            listen_host: None,
            port: d_port(),
            socket_dir: d_socket_dir(),
            run_as: d_run_as(),
            superuser: SuperuserConfig::default(),
            replication: ReplicationConfig::default(),
            systemd_unit: None,
            application_name: None,
            log_file: None,
            start_timeout: d_start_timeout(),
            stop_timeout: d_stop_timeout(),
            connect_timeout: d_connect_timeout(),
            wal_receiver_timeout: d_wal_receiver_timeout(),
        }
    }

    /// Checks what serde cannot. Destructures exhaustively so a new field must be considered.
    pub fn validate(&self) -> PgResult<()> {
        let PgConfig {
            cluster,
            data_dir,
            bin_dir,
            listen_host,
            port,
            socket_dir,
            run_as,
            superuser:
                SuperuserConfig {
                    user,
                    database,
                    password: _,
                },
            replication:
                ReplicationConfig {
                    user: repl_user,
                    password: _,
                },
            systemd_unit,
            application_name: _,
            log_file,
            start_timeout: _,
            stop_timeout: _,
            connect_timeout: _,
            wal_receiver_timeout,
        } = self;
        let bad = |field: &str, why: &str| {
            Err(PgError::Config {
                field: field.to_owned(),
                reason: why.to_owned(),
            })
        };
        if cluster.is_empty() {
            return bad("cluster", "must not be empty");
        }
        if *wal_receiver_timeout < Duration::from_secs(1) {
            return bad(
                "wal_receiver_timeout",
                "must be at least 1s (e.g. \"5s\"; near the failover's detect_after)",
            );
        }
        if !data_dir.is_absolute() {
            return bad("data_dir", "must be an absolute path");
        }
        if !bin_dir.is_absolute() {
            return bad("bin_dir", "must be an absolute path");
        }
        if *port == 0 {
            return bad("port", "must not be 0");
        }
        // These end up inside pg_ctl's `-o '...'`, which pg_ctl hands to /bin/sh.
        for (field, v) in [
            ("data_dir", data_dir.to_string_lossy().into_owned()),
            ("socket_dir", socket_dir.to_string_lossy().into_owned()),
            ("listen_host", listen_host.clone().unwrap_or_default()),
            (
                "log_file",
                log_file
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        ] {
            if v.contains(['\'', '\n', '\0']) {
                return bad(field, "must not contain quotes or newlines");
            }
        }
        for (field, v) in [
            ("run_as", run_as),
            ("superuser.user", user),
            ("replication.user", repl_user),
            ("superuser.database", database),
        ] {
            if v.is_empty() {
                return bad(field, "must not be empty");
            }
        }
        if let Some(u) = systemd_unit
            && (u.is_empty() || u.contains(char::is_whitespace))
        {
            return bad("systemd_unit", "must be a unit name");
        }
        Ok(())
    }

    pub fn log_file(&self) -> PathBuf {
        self.log_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.pg_ctl.log", self.data_dir.display())))
    }
}

fn d_bin_dir() -> PathBuf {
    PathBuf::from(defaults::BIN_DIR)
}
fn d_port() -> u16 {
    defaults::PORT
}
fn d_socket_dir() -> PathBuf {
    PathBuf::from(defaults::SOCKET_DIR)
}
fn d_run_as() -> String {
    defaults::RUN_AS.into()
}
fn d_superuser() -> String {
    defaults::SUPERUSER.into()
}
fn d_database() -> String {
    defaults::DATABASE.into()
}
fn d_replication_user() -> String {
    defaults::REPLICATION_USER.into()
}
fn d_start_timeout() -> Duration {
    defaults::START_TIMEOUT
}
fn d_stop_timeout() -> Duration {
    defaults::STOP_TIMEOUT
}
fn d_connect_timeout() -> Duration {
    defaults::CONNECT_TIMEOUT
}
fn d_wal_receiver_timeout() -> Duration {
    defaults::WAL_RECEIVER_TIMEOUT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_and_full_tables() {
        let c: PgConfig = toml::from_str(
            r#"
            cluster = "yeslocker"
            data_dir = "/var/lib/postgresql/15/main"
            "#,
        )
        .unwrap();
        assert_eq!(c.bin_dir, PathBuf::from(defaults::BIN_DIR));
        assert_eq!(c.run_as, "postgres");
        assert_eq!(c.wal_receiver_timeout, Duration::from_secs(5));
        c.validate().unwrap();

        let c: PgConfig = toml::from_str(
            r#"
            cluster = "yeslocker"
            data_dir = "/srv/pg"
            port = 5433
            socket_dir = "/run/pg"
            listen_host = "10.0.0.5"
            systemd_unit = "postgresql@15-main.service"
            stop_timeout = "30s"
            superuser = { user = "dr", password = { env = "DR_PG_PASSWORD" } }
            replication = { user = "repl", password = { file = "/etc/dr/repl.pass" } }
            "#,
        )
        .unwrap();
        assert_eq!(c.stop_timeout, Duration::from_secs(30));
        assert_eq!(
            c.replication.password,
            Some(SecretSource::File("/etc/dr/repl.pass".into()))
        );
        c.validate().unwrap();
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        assert!(toml::from_str::<PgConfig>("cluster='a'\ndata_dir='/x'\nbogus=1").is_err());
        let mut c = PgConfig::new("a", "relative/dir");
        assert!(c.validate().is_err());
        c.data_dir = "/x'; rm -rf /".into();
        assert!(c.validate().is_err());
        let mut c = PgConfig::new("a", "/x");
        c.wal_receiver_timeout = Duration::from_millis(500);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("wal_receiver_timeout")
        );
    }

    #[test]
    fn secret_from_env_map() {
        let env = BTreeMap::from([("P".to_owned(), "s3cret".to_owned())]);
        assert_eq!(
            SecretSource::Env("P".into()).resolve(&env).unwrap(),
            "s3cret"
        );
        let e = SecretSource::Env("Q".into())
            .resolve(&env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Q") && !e.contains("s3cret"));
    }
}
