//! `--repo-config FILE`: where the repository lives, where its key is, how hard to compress.
//!
//! Why a separate small file rather than a section of agent.toml: the standalone commands
//! (`backup`, `restore`, `wal-push` as PostgreSQL's `archive_command`) must work on a host
//! whose agent config is gone or was never written, e.g. a fresh machine in the total-loss
//! case. Example with every field: `deploy/examples/repository.toml`.
//!
//! ```toml
//! version = 1
//! key_file = "repo.key"          # relative paths are relative to this file
//! compression_level = 3          # zstd level for chunks and manifests
//! wal_compression_level = -1     # zstd level for WAL (wal-push latency matters most)
//! concurrency = 4                # chunk uploads/downloads in flight
//! spool_dir = "/var/lib/dr-agent/wal-spool"   # optional: wal-fetch prefetch target
//! wal_prefetch = 8               # segments wal-fetch prefetches when spool_dir is set
//!
//! [location]
//! kind = "fs"                    # fs | s3 | oss | sftp
//! path = "/srv/dr-repo"
//! ```
//! Secrets (S3/OSS keys) are never in this file: they come from environment variables named
//! by the file (defaults `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, `OSS_ACCESS_KEY_ID` /
//! `OSS_ACCESS_KEY_SECRET`) or from a `credentials_file` (TOML with `access_key_id` and
//! `secret_access_key`, mode 0600). The environment is passed in as a map (STYLE.md).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{BackupError, BackupResult};

/// A secret string that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Validated repository configuration.
#[derive(Debug, Clone)]
pub struct RepoConfig {
    pub location: Location,
    pub key_file: PathBuf,
    pub compression_level: i32,
    pub wal_compression_level: i32,
    pub concurrency: usize,
    pub spool_dir: Option<PathBuf>,
    pub wal_prefetch: usize,
    /// The file this came from (absolute), for `restore_command` lines.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub enum Location {
    Fs {
        path: PathBuf,
    },
    S3 {
        bucket: String,
        endpoint: Option<String>,
        region: String,
        prefix: String,
        virtual_host_style: bool,
        access_key_id: Option<Secret>,
        secret_access_key: Option<Secret>,
    },
    Oss {
        bucket: String,
        endpoint: String,
        prefix: String,
        access_key_id: Option<Secret>,
        secret_access_key: Option<Secret>,
    },
    Sftp {
        endpoint: String,
        user: String,
        key: Option<PathBuf>,
        root: String,
    },
}

impl Location {
    /// A description safe to log.
    pub fn describe(&self) -> String {
        match self {
            Location::Fs { path } => format!("fs:{}", path.display()),
            Location::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}"),
            Location::Oss { bucket, prefix, .. } => format!("oss://{bucket}/{prefix}"),
            Location::Sftp { endpoint, root, .. } => format!("sftp://{endpoint}{root}"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV1 {
    version: u32,
    key_file: PathBuf,
    #[serde(default = "default_level")]
    compression_level: i32,
    #[serde(default = "default_wal_level")]
    wal_compression_level: i32,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    #[serde(default)]
    spool_dir: Option<PathBuf>,
    #[serde(default = "default_prefetch")]
    wal_prefetch: usize,
    location: FileLocation,
}

fn default_level() -> i32 {
    3
}
/// zstd -1 (no Huffman coding of literals): on pgbench WAL in wal-push's 256 KiB frames it
/// stores 2 % less than level 1 and compresses ~4 % faster (docs/benchmarks.md, WAL path).
fn default_wal_level() -> i32 {
    -1
}
fn default_concurrency() -> usize {
    4
}
fn default_prefetch() -> usize {
    8
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum FileLocation {
    Fs {
        path: PathBuf,
    },
    S3 {
        bucket: String,
        #[serde(default)]
        endpoint: Option<String>,
        #[serde(default = "default_region")]
        region: String,
        #[serde(default)]
        prefix: String,
        #[serde(default)]
        virtual_host_style: bool,
        #[serde(default)]
        access_key_id_env: Option<String>,
        #[serde(default)]
        secret_access_key_env: Option<String>,
        #[serde(default)]
        credentials_file: Option<PathBuf>,
    },
    Oss {
        bucket: String,
        endpoint: String,
        #[serde(default)]
        prefix: String,
        #[serde(default)]
        access_key_id_env: Option<String>,
        #[serde(default)]
        secret_access_key_env: Option<String>,
        #[serde(default)]
        credentials_file: Option<PathBuf>,
    },
    Sftp {
        endpoint: String,
        user: String,
        #[serde(default)]
        key: Option<PathBuf>,
        root: String,
    },
}

fn default_region() -> String {
    "us-east-1".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    access_key_id: String,
    secret_access_key: String,
}

impl RepoConfig {
    /// Read and validate a repository config file.
    pub fn load(path: &Path, env: &HashMap<String, String>) -> BackupResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            BackupError::io(format!("read repository config {}", path.display()), e)
        })?;
        let abs = std::path::absolute(path)
            .map_err(|e| BackupError::io(format!("resolve {}", path.display()), e))?;
        let base = abs.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut cfg = Self::parse(&text, &base, env).map_err(|e| match e {
            BackupError::Config(m) => BackupError::Config(format!("{}: {m}", path.display())),
            other => other,
        })?;
        cfg.source = Some(abs);
        Ok(cfg)
    }

    /// Parse config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path, env: &HashMap<String, String>) -> BackupResult<Self> {
        let file: FileV1 = toml::from_str(text).map_err(|e| BackupError::Config(e.to_string()))?;
        // Exhaustive destructuring: a new field cannot be silently ignored.
        let FileV1 {
            version,
            key_file,
            compression_level,
            wal_compression_level,
            concurrency,
            spool_dir,
            wal_prefetch,
            location,
        } = file;
        if version != 1 {
            return Err(BackupError::Config(format!(
                "unsupported version {version}, expected 1"
            )));
        }
        for (name, l) in [
            ("compression_level", compression_level),
            ("wal_compression_level", wal_compression_level),
        ] {
            if !(-7..=19).contains(&l) {
                return Err(BackupError::Config(format!(
                    "{name} = {l} is outside -7..=19"
                )));
            }
        }
        if !(1..=64).contains(&concurrency) {
            return Err(BackupError::Config(format!(
                "concurrency = {concurrency} is outside 1..=64"
            )));
        }
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let location = match location {
            FileLocation::Fs { path } => Location::Fs { path: abs(path) },
            FileLocation::S3 {
                bucket,
                endpoint,
                region,
                prefix,
                virtual_host_style,
                access_key_id_env,
                secret_access_key_env,
                credentials_file,
            } => {
                let (access_key_id, secret_access_key) = credentials(
                    env,
                    access_key_id_env.as_deref().unwrap_or("AWS_ACCESS_KEY_ID"),
                    secret_access_key_env
                        .as_deref()
                        .unwrap_or("AWS_SECRET_ACCESS_KEY"),
                    credentials_file.map(abs),
                )?;
                Location::S3 {
                    bucket,
                    endpoint,
                    region,
                    prefix,
                    virtual_host_style,
                    access_key_id,
                    secret_access_key,
                }
            }
            FileLocation::Oss {
                bucket,
                endpoint,
                prefix,
                access_key_id_env,
                secret_access_key_env,
                credentials_file,
            } => {
                let (access_key_id, secret_access_key) = credentials(
                    env,
                    access_key_id_env.as_deref().unwrap_or("OSS_ACCESS_KEY_ID"),
                    secret_access_key_env
                        .as_deref()
                        .unwrap_or("OSS_ACCESS_KEY_SECRET"),
                    credentials_file.map(abs),
                )?;
                Location::Oss {
                    bucket,
                    endpoint,
                    prefix,
                    access_key_id,
                    secret_access_key,
                }
            }
            FileLocation::Sftp {
                endpoint,
                user,
                key,
                root,
            } => Location::Sftp {
                endpoint,
                user,
                key: key.map(abs),
                root,
            },
        };
        Ok(RepoConfig {
            location,
            key_file: abs(key_file),
            compression_level,
            wal_compression_level,
            concurrency,
            spool_dir: spool_dir.map(abs),
            wal_prefetch,
            source: None,
        })
    }
}

fn credentials(
    env: &HashMap<String, String>,
    id_var: &str,
    secret_var: &str,
    file: Option<PathBuf>,
) -> BackupResult<(Option<Secret>, Option<Secret>)> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| BackupError::io(format!("read credentials file {}", path.display()), e))?;
        let c: CredentialsFile = toml::from_str(&text).map_err(|e| {
            BackupError::Config(format!(
                "credentials file {}: {}",
                path.display(),
                e.message()
            ))
        })?;
        return Ok((
            Some(Secret(c.access_key_id)),
            Some(Secret(c.secret_access_key)),
        ));
    }
    Ok((
        env.get(id_var).cloned().map(Secret),
        env.get(secret_var).cloned().map(Secret),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_example_parses() {
        let text = include_str!("../../../deploy/examples/repository.toml");
        let env = HashMap::from([
            ("AWS_ACCESS_KEY_ID".to_string(), "id".to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), "secret".to_string()),
        ]);
        let cfg = RepoConfig::parse(text, Path::new("/etc/dr"), &env).unwrap();
        assert!(cfg.key_file.is_absolute());
    }

    #[test]
    fn t20_unknown_field_refused_and_secrets_redacted() {
        let bad =
            "version = 1\nkey_file = \"k\"\nbogus = 1\n[location]\nkind = \"fs\"\npath = \"r\"\n";
        assert!(RepoConfig::parse(bad, Path::new("/x"), &HashMap::new()).is_err());
        let s3 = "version = 1\nkey_file = \"k\"\n[location]\nkind = \"s3\"\nbucket = \"b\"\nvirtual_host_style = true\n";
        let env = HashMap::from([("AWS_SECRET_ACCESS_KEY".to_string(), "hunter2".to_string())]);
        let cfg = RepoConfig::parse(s3, Path::new("/x"), &env).unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert_eq!(cfg.key_file, PathBuf::from("/x/k"));
    }
}
