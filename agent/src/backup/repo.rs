//! The repository: every read and write of backup data goes through here, over opendal.
//!
//! Why a type: it pairs one opendal `Operator` (fs, s3, oss, sftp — chosen by
//! [`RepoConfig`]) with the [`RepoKey`], so no caller can write an unsealed object or read one
//! without verifying it. Layout and format: see the [`super`] module docs.

use std::time::Duration;

use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{ErrorKind, Operator, services};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::key::{ChunkId, RepoKey};
use super::manifest::{BackupId, Manifest};
use super::repo_config::{Location, RepoConfig};
use super::{BackupError, BackupResult, blocking};

/// Fixed chunk size: 128 PostgreSQL pages.
pub const CHUNK_SIZE: usize = 1 << 20;
/// Largest WAL file we accept (PostgreSQL allows segments up to 1 GiB; ours are 16 MiB).
pub const MAX_WAL_SIZE: usize = 1 << 30;
const MAX_MANIFEST_SIZE: usize = 1 << 30;
const CONFIG_OBJECT: &str = "config";
const FORMAT_VERSION: u32 = 1;

/// Plaintext JSON stored at `<root>/config`; holds nothing secret.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoMeta {
    format_version: u32,
    chunk_size: usize,
    /// Derived from the key by a one-way function; tells a wrong key from corruption.
    key_check: String,
    created_at: String,
}

/// An open, key-checked repository.
#[derive(Debug, Clone)]
pub struct Repository {
    op: Operator,
    key: RepoKey,
    cfg: RepoConfig,
}

/// Build the opendal operator for a location.
pub fn operator(location: &Location) -> BackupResult<Operator> {
    let op = match location {
        Location::Fs { path } => {
            let root = path.to_string_lossy();
            // Atomic writes: temp file + fsync + rename, so a torn object never has a real name.
            let tmp = path.join(".tmp");
            Operator::new(
                services::Fs::default()
                    .root(&root)
                    .atomic_write_dir(&tmp.to_string_lossy()),
            )?
            .finish()
        }
        Location::S3 {
            bucket,
            endpoint,
            region,
            prefix,
            virtual_host_style,
            access_key_id,
            secret_access_key,
        } => {
            let mut b = services::S3::default()
                .bucket(bucket)
                .region(region)
                .root(&format!("/{}", prefix.trim_matches('/')))
                .disable_config_load()
                .disable_ec2_metadata();
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if *virtual_host_style {
                b = b.enable_virtual_host_style();
            }
            if let Some(k) = access_key_id {
                b = b.access_key_id(&k.0);
            }
            if let Some(k) = secret_access_key {
                b = b.secret_access_key(&k.0);
            }
            Operator::new(b)?.finish()
        }
        Location::Oss {
            bucket,
            endpoint,
            prefix,
            access_key_id,
            secret_access_key,
        } => {
            let mut b = services::Oss::default()
                .bucket(bucket)
                .endpoint(endpoint)
                .root(&format!("/{}", prefix.trim_matches('/')));
            if let Some(k) = access_key_id {
                b = b.access_key_id(&k.0);
            }
            if let Some(k) = secret_access_key {
                b = b.access_key_secret(&k.0);
            }
            Operator::new(b)?.finish()
        }
        Location::Sftp {
            endpoint,
            user,
            key,
            root,
        } => {
            let mut b = services::Sftp::default()
                .endpoint(endpoint)
                .user(user)
                .root(root);
            if let Some(k) = key {
                b = b.key(&k.to_string_lossy());
            }
            Operator::new(b)?.finish()
        }
    };
    let remote = !matches!(location, Location::Fs { .. });
    Ok(if remote {
        // Bounded retries: a dead server must turn into an error within seconds, not hang a
        // backup (the "S3 killed mid-backup" test).
        op.layer(
            TimeoutLayer::new()
                .with_timeout(Duration::from_secs(60))
                .with_io_timeout(Duration::from_secs(20)),
        )
        .layer(
            RetryLayer::new()
                .with_jitter()
                .with_max_times(3)
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(2)),
        )
    } else {
        op
    })
}

fn not_found(e: &opendal::Error) -> bool {
    e.kind() == ErrorKind::NotFound
}

impl Repository {
    /// Create the key file (0600, if absent) and the repository `config` (if absent).
    /// Idempotent: on an initialised repository it only checks the key.
    pub async fn init(cfg: &RepoConfig) -> BackupResult<Self> {
        create_key_file(&cfg.key_file)?;
        let key = RepoKey::load(&cfg.key_file)?;
        let op = operator(&cfg.location)?;
        match op.read(CONFIG_OBJECT).await {
            Ok(_) => {}
            Err(e) if not_found(&e) => {
                let meta = RepoMeta {
                    format_version: FORMAT_VERSION,
                    chunk_size: CHUNK_SIZE,
                    key_check: key.check_value(),
                    created_at: chrono::Utc::now().to_rfc3339(),
                };
                op.write(CONFIG_OBJECT, serde_json::to_vec_pretty(&meta)?)
                    .await?;
                info!(location = %cfg.location.describe(), "repository initialised");
            }
            Err(e) => return Err(e.into()),
        }
        Self::open_with(cfg, op, key).await
    }

    /// Open an initialised repository, checking the key.
    pub async fn open(cfg: &RepoConfig) -> BackupResult<Self> {
        let key = RepoKey::load(&cfg.key_file)?;
        let op = operator(&cfg.location)?;
        Self::open_with(cfg, op, key).await
    }

    async fn open_with(cfg: &RepoConfig, op: Operator, key: RepoKey) -> BackupResult<Self> {
        let raw = match op.read(CONFIG_OBJECT).await {
            Ok(b) => b.to_vec(),
            Err(e) if not_found(&e) => return Err(BackupError::NotInitialised),
            Err(e) => return Err(e.into()),
        };
        let meta: RepoMeta = serde_json::from_slice(&raw).map_err(|e| BackupError::Corrupt {
            key: CONFIG_OBJECT.into(),
            reason: e.to_string(),
        })?;
        if meta.format_version != FORMAT_VERSION || meta.chunk_size != CHUNK_SIZE {
            return Err(BackupError::Unsupported(format!(
                "repository format {} with chunk size {}",
                meta.format_version, meta.chunk_size
            )));
        }
        if meta.key_check != key.check_value() {
            return Err(BackupError::WrongKey);
        }
        Ok(Repository {
            op,
            key,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &RepoConfig {
        &self.cfg
    }

    pub fn key(&self) -> &RepoKey {
        &self.key
    }

    pub fn operator(&self) -> &Operator {
        &self.op
    }

    /// Raw object bytes, `None` if absent.
    pub async fn get_raw(&self, name: &str) -> BackupResult<Option<Vec<u8>>> {
        match self.op.read(name).await {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_raw(&self, name: &str, sealed: Vec<u8>) -> BackupResult<()> {
        self.op.write(name, sealed).await?;
        Ok(())
    }

    pub async fn exists(&self, name: &str) -> BackupResult<bool> {
        Ok(self.op.exists(name).await?)
    }

    /// Seal and upload one chunk (`id` = its keyed hash) unless it is `known` or exists.
    /// Returns the stored size when it was uploaded.
    pub async fn put_chunk(
        &self,
        id: ChunkId,
        plain: Vec<u8>,
        known: bool,
    ) -> BackupResult<Option<u64>> {
        debug_assert!(plain.len() <= CHUNK_SIZE);
        if known || self.exists(&id.object_name()).await? {
            return Ok(None);
        }
        let key = self.key.clone();
        let level = self.cfg.compression_level;
        let name = id.object_name();
        let (sealed, _) = blocking(move || key.seal(&name, &plain, level, 1)).await?;
        let size = sealed.len() as u64;
        self.put_raw(&id.object_name(), sealed).await?;
        Ok(Some(size))
    }

    /// Download and verify one chunk (authenticated, and its hash equals its id).
    pub async fn get_chunk(&self, id: ChunkId) -> BackupResult<Vec<u8>> {
        let name = id.object_name();
        let raw = self
            .get_raw(&name)
            .await?
            .ok_or_else(|| BackupError::NotFound { key: name.clone() })?;
        let key = self.key.clone();
        let (plain, hash) = blocking(move || key.open(&name, raw, CHUNK_SIZE)).await?;
        if hash != id {
            return Err(BackupError::Corrupt {
                key: id.object_name(),
                reason: "content does not match its id".into(),
            });
        }
        Ok(plain)
    }

    fn manifest_name(id: &BackupId) -> String {
        format!("backups/{id}")
    }

    /// Write a manifest: the single atomic step that makes a backup exist.
    pub async fn put_manifest(&self, m: &Manifest) -> BackupResult<()> {
        let name = Self::manifest_name(&m.id);
        let json = serde_json::to_vec(m)?;
        let key = self.key.clone();
        let level = self.cfg.compression_level;
        let n = name.clone();
        let (sealed, _) = blocking(move || key.seal(&n, &json, level, 1)).await?;
        self.put_raw(&name, sealed).await?;
        debug!(backup = %m.id, "manifest written");
        Ok(())
    }

    pub async fn get_manifest(&self, id: &BackupId) -> BackupResult<Manifest> {
        let name = Self::manifest_name(id);
        let raw = self
            .get_raw(&name)
            .await?
            .ok_or_else(|| BackupError::NotFound { key: name.clone() })?;
        let key = self.key.clone();
        let n = name.clone();
        let (plain, _) = blocking(move || key.open(&n, raw, MAX_MANIFEST_SIZE)).await?;
        serde_json::from_slice(&plain).map_err(|e| BackupError::Corrupt {
            key: name,
            reason: format!("manifest: {e}"),
        })
    }

    /// Ids of all backups, oldest first (ids sort by time).
    pub async fn list_backups(&self) -> BackupResult<Vec<BackupId>> {
        let mut ids = Vec::new();
        for e in self.op.list("backups/").await? {
            if e.metadata().is_file() {
                ids.push(BackupId(e.name().to_string()));
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// All manifests, oldest first.
    pub async fn list_manifests(&self) -> BackupResult<Vec<Manifest>> {
        let mut out = Vec::new();
        for id in self.list_backups().await? {
            out.push(self.get_manifest(&id).await?);
        }
        Ok(out)
    }

    /// Resolve `latest` or an id.
    pub async fn resolve(&self, id_or_latest: &str) -> BackupResult<BackupId> {
        if id_or_latest == "latest" {
            return self
                .list_backups()
                .await?
                .pop()
                .ok_or_else(|| BackupError::NotFound {
                    key: "backups/ (the repository has no backups)".into(),
                });
        }
        Ok(BackupId(id_or_latest.to_string()))
    }

    /// Every object name under a prefix (recursive).
    pub async fn list_objects(&self, prefix: &str) -> BackupResult<Vec<opendal::Entry>> {
        Ok(self
            .op
            .list_with(prefix)
            .recursive(true)
            .await?
            .into_iter()
            .filter(|e| e.metadata().is_file())
            .collect())
    }
}

/// Create a new random key file with 0600 permissions if none exists.
pub fn create_key_file(path: &std::path::Path) -> BackupResult<bool> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| BackupError::io(format!("create {}", dir.display()), e))?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            let text = RepoKey::generate_hex();
            f.write_all(text.as_bytes())
                .and_then(|()| f.write_all(b"\n"))
                .and_then(|()| f.sync_all())
                .map_err(|e| BackupError::io(format!("write key file {}", path.display()), e))?;
            info!(path = %path.display(), "repository key created; keep an offline copy");
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(BackupError::io(
            format!("create key file {}", path.display()),
            e,
        )),
    }
}
