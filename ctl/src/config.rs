//! Where drctl finds its coordinators and credentials.
//!
//! Why a separate layer: an operator mostly runs drctl with a config file
//! (`deploy/examples/drctl.toml`) but overrides a piece of it now and then (another
//! endpoint during an incident, another certificate to test a role). The precedence is
//! fixed and documented here: **flags > environment > file > defaults**.
//!
//! The environment is passed in as a map (never read here), so tests need no `set_var`.
//! Relative paths in a file are relative to that file's directory, and `~/` expands to
//! `$HOME`; the file is parsed with unknown keys refused (toml names the line and key).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::ConnArgs;

/// Defaults when neither flag nor file says otherwise.
pub mod defaults {
    use std::time::Duration;
    /// Deadline of one RPC.
    pub const TIMEOUT: Duration = Duration::from_secs(10);
    /// How long to wait for a TCP connection to one endpoint before trying the next.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
}

pub const ENV_CONFIG: &str = "DRCTL_CONFIG";
pub const ENV_ENDPOINTS: &str = "DRCTL_ENDPOINTS";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: unsupported version {version} (this drctl reads version 1)")]
    Version { path: PathBuf, version: u32 },
    #[error("config file {path}: timeout {value:?}: {message}")]
    Timeout {
        path: PathBuf,
        value: String,
        message: String,
    },
    #[error(
        "no coordinator endpoint: pass --endpoint HOST:PORT, set {ENV_ENDPOINTS}=a:7443,b:7443, \
         or put endpoints = [...] in the config file (--config or {ENV_CONFIG})"
    )]
    NoEndpoints,
    #[error(
        "no {what} given: pass --{what} FILE or set tls.{what} in the config file \
         (--config or {ENV_CONFIG}); create certificates with `drctl cert`"
    )]
    MissingTls { what: &'static str },
}

/// The file format (`deploy/examples/drctl.toml`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub version: Option<u32>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub timeout: Option<String>,
    pub tls: Option<FileTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// What the client needs, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub endpoints: Vec<String>,
    pub tls: dr_proto::tls::TlsPaths,
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

impl FileConfig {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(version) = cfg.version
            && version != 1
        {
            return Err(ConfigError::Version {
                path: path.to_path_buf(),
                version,
            });
        }
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }
}

/// Which config file applies: `--config`, else `$DRCTL_CONFIG`, else
/// `$XDG_CONFIG_HOME/drctl/config.toml` / `~/.config/drctl/config.toml` when it exists.
pub fn config_path(flag: Option<&Path>, env: &HashMap<String, String>) -> Option<PathBuf> {
    if let Some(p) = flag {
        return Some(p.to_path_buf());
    }
    if let Some(p) = env.get(ENV_CONFIG).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base = env
        .get("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| env.get("HOME").map(|h| Path::new(h).join(".config")))?;
    let p = base.join("drctl").join("config.toml");
    std::fs::metadata(&p).is_ok().then_some(p)
}

/// Merges flags, environment and file into the client's configuration.
pub fn resolve(
    conn: &ConnArgs,
    timeout_flag: Option<Duration>,
    env: &HashMap<String, String>,
) -> Result<ClientConfig, ConfigError> {
    let path = config_path(conn.config.as_deref(), env);
    let (file, base) = match &path {
        Some(p) => (
            FileConfig::load(p)?,
            p.parent().map(Path::to_path_buf).unwrap_or_default(),
        ),
        None => (FileConfig::default(), PathBuf::new()),
    };
    merge(conn, timeout_flag, env, file, &base, path.as_deref())
}

/// The pure part of [`resolve`].
pub fn merge(
    conn: &ConnArgs,
    timeout_flag: Option<Duration>,
    env: &HashMap<String, String>,
    file: FileConfig,
    file_dir: &Path,
    file_path: Option<&Path>,
) -> Result<ClientConfig, ConfigError> {
    let env_endpoints: Vec<String> = env
        .get(ENV_ENDPOINTS)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let endpoints = if !conn.endpoints.is_empty() {
        conn.endpoints.clone()
    } else if !env_endpoints.is_empty() {
        env_endpoints
    } else {
        file.endpoints.clone()
    };
    if endpoints.is_empty() {
        return Err(ConfigError::NoEndpoints);
    }
    let file_timeout = match &file.timeout {
        Some(v) => Some(
            humantime::parse_duration(v).map_err(|e| ConfigError::Timeout {
                path: file_path.map(Path::to_path_buf).unwrap_or_default(),
                value: v.clone(),
                message: e.to_string(),
            })?,
        ),
        None => None,
    };
    let timeout = timeout_flag.or(file_timeout).unwrap_or(defaults::TIMEOUT);
    let file_tls = file.tls.unwrap_or_default();
    let home = env.get("HOME").map(PathBuf::from);
    let pick = |flag: &Option<PathBuf>, from_file: Option<PathBuf>, what: &'static str| {
        match (flag, from_file) {
            // Flags are relative to the working directory, as any shell user expects.
            (Some(p), _) => Ok(expand_home(p, home.as_deref())),
            (None, Some(p)) => {
                let p = expand_home(&p, home.as_deref());
                Ok(if p.is_relative() { file_dir.join(p) } else { p })
            }
            (None, None) => Err(ConfigError::MissingTls { what }),
        }
    };
    let tls = dr_proto::tls::TlsPaths {
        ca: pick(&conn.ca, file_tls.ca, "ca")?,
        cert: pick(&conn.cert, file_tls.cert, "cert")?,
        key: pick(&conn.key, file_tls.key, "key")?,
        reload_interval: None,
    };
    Ok(ClientConfig {
        endpoints,
        tls,
        timeout,
        connect_timeout: defaults::CONNECT_TIMEOUT.min(timeout),
    })
}

fn expand_home(p: &Path, home: Option<&Path>) -> PathBuf {
    match (p.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => p.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> FileConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/drctl.toml");
        FileConfig::load(&path).unwrap()
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn example_file_parses_and_fills_everything() {
        let cfg = merge(
            &ConnArgs::default(),
            None,
            &env(&[("HOME", "/home/op")]),
            example(),
            Path::new("/etc"),
            None,
        )
        .unwrap();
        assert_eq!(cfg.endpoints.len(), 3);
        assert_eq!(cfg.timeout, Duration::from_secs(10));
        assert_eq!(cfg.tls.ca, PathBuf::from("/etc/dr/tls/ca.pem"));
        assert_eq!(
            cfg.tls.cert,
            PathBuf::from("/home/op/.config/drctl/operator-alice.pem")
        );
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let e = env(&[(ENV_ENDPOINTS, "e1:1, e2:2,")]);
        let cfg = merge(
            &ConnArgs::default(),
            None,
            &e,
            example(),
            Path::new("/"),
            None,
        )
        .unwrap();
        assert_eq!(cfg.endpoints, vec!["e1:1".to_string(), "e2:2".to_string()]);
        let conn = ConnArgs {
            endpoints: vec!["f:1".into()],
            cert: Some("mine.pem".into()),
            ..ConnArgs::default()
        };
        let cfg = merge(
            &conn,
            Some(Duration::from_secs(1)),
            &e,
            example(),
            Path::new("/"),
            None,
        )
        .unwrap();
        assert_eq!(cfg.endpoints, vec!["f:1".to_string()]);
        assert_eq!(cfg.tls.cert, PathBuf::from("mine.pem"));
        assert_eq!(cfg.timeout, Duration::from_secs(1));
        assert_eq!(cfg.connect_timeout, Duration::from_secs(1));
    }

    #[test]
    fn relative_file_paths_follow_the_file() {
        let file = FileConfig::parse(
            Path::new("x.toml"),
            "endpoints = [\"a:1\"]\ntimeout = \"3s\"\n[tls]\nca = \"tls/ca.pem\"\ncert = \"tls/op.pem\"\nkey = \"/abs/op.key\"\n",
        )
        .unwrap();
        let cfg = merge(
            &ConnArgs::default(),
            None,
            &env(&[]),
            file,
            Path::new("/demo"),
            None,
        )
        .unwrap();
        assert_eq!(cfg.tls.ca, PathBuf::from("/demo/tls/ca.pem"));
        assert_eq!(cfg.tls.key, PathBuf::from("/abs/op.key"));
        assert_eq!(cfg.timeout, Duration::from_secs(3));
    }

    #[test]
    fn errors_name_what_is_missing() {
        let err = merge(
            &ConnArgs::default(),
            None,
            &env(&[]),
            FileConfig::default(),
            Path::new("/"),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::NoEndpoints));
        assert!(err.to_string().contains("--endpoint"));
        let conn = ConnArgs {
            endpoints: vec!["a:1".into()],
            ..ConnArgs::default()
        };
        let err = merge(
            &conn,
            None,
            &env(&[]),
            FileConfig::default(),
            Path::new("/"),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("--ca"), "{err}");
        let err =
            FileConfig::parse(Path::new("f.toml"), "endpoints = []\nbogus = 1\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("f.toml") && msg.contains("bogus") && msg.contains("line 2"),
            "{msg}"
        );
    }

    #[test]
    fn config_path_precedence() {
        let e = env(&[(ENV_CONFIG, "/env.toml"), ("HOME", "/nonexistent-home")]);
        assert_eq!(
            config_path(Some(Path::new("/flag.toml")), &e),
            Some(PathBuf::from("/flag.toml"))
        );
        assert_eq!(config_path(None, &e), Some(PathBuf::from("/env.toml")));
        assert_eq!(
            config_path(None, &env(&[("HOME", "/nonexistent-home")])),
            None
        );
    }
}
