//! The repository: every read and write of backup data goes through here, over opendal.
//!
//! Why a type: it pairs one opendal `Operator` (fs, s3, oss, sftp — chosen by
//! [`RepoConfig`]) with the [`RepoKey`], so no caller can write an unsealed object or read one
//! without verifying it. Layout and format: see the [`super`] module docs.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{ErrorKind, Operator, services};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

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
    /// Root directory of an fs location: chunk reads and writes of backups and restores go
    /// straight to the filesystem (see [`ChunkSink`]); everything else through opendal.
    fs_root: Option<PathBuf>,
}

/// Directories of an fs repository that `archive_command` (run as the PostgreSQL server's
/// user) writes into, while backups, prunes and restores run in the agent, usually as root.
/// Why: a `.tmp` or `wal` directory first created by root would be root's, and every later
/// `wal-push` would fail with "permission denied" until someone noticed the archive stopped.
/// So they are created up front, and when we run as root they belong to the owner of the
/// repository's root directory (the operator hands that directory to the server's user).
const SHARED_DIRS: [&str; 2] = [".tmp", "wal"];

fn prepare_shared_dirs(root: &Path) {
    use std::os::unix::fs::MetadataExt;
    // Best effort: a read-only location (a restore from a mounted NAS copy) stays usable for
    // reading; a write that needs these directories names its own error.
    let Ok(owner) = std::fs::metadata(root) else {
        return;
    };
    let is_root = nix::unistd::Uid::effective().is_root();
    for d in SHARED_DIRS {
        let dir = root.join(d);
        if let Err(e) = std::fs::create_dir(&dir)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            debug!(error = %e, dir = %dir.display(), "cannot create a repository directory");
            continue;
        }
        if !is_root {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        if (meta.uid() != owner.uid() || meta.gid() != owner.gid())
            && let Err(e) = std::os::unix::fs::chown(&dir, Some(owner.uid()), Some(owner.gid()))
        {
            warn!(error = %e, dir = %dir.display(), uid = owner.uid(),
                "cannot hand a repository directory to the owner of the repository; \
                 archive_command running as that user may fail with permission denied");
        }
    }
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

/// Format version, chunk size and key check of the repository `config` object.
fn check_meta(raw: &[u8], key: &RepoKey) -> BackupResult<()> {
    let meta: RepoMeta = serde_json::from_slice(raw).map_err(|e| BackupError::Corrupt {
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
    Ok(())
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
        check_meta(&raw, &key)?;
        let fs_root = match &cfg.location {
            Location::Fs { path } => {
                prepare_shared_dirs(path);
                Some(path.clone())
            }
            _ => None,
        };
        Ok(Repository {
            op,
            key,
            cfg: cfg.clone(),
            fs_root,
        })
    }

    /// The blocking check of an fs location for the one-shot WAL commands (`wal-push`), which
    /// run without an async runtime: the key file and the repository `config`, exactly as
    /// [`Repository::open`] checks them. Returns the root directory and the key.
    pub fn open_fs_blocking(cfg: &RepoConfig) -> BackupResult<(PathBuf, RepoKey)> {
        let Location::Fs { path } = &cfg.location else {
            return Err(BackupError::Invalid(
                "open_fs_blocking needs an fs location".into(),
            ));
        };
        let key = RepoKey::load(&cfg.key_file)?;
        let raw = match std::fs::read(path.join(CONFIG_OBJECT)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BackupError::NotInitialised);
            }
            Err(e) => {
                return Err(BackupError::io(
                    format!("read {}", path.join(CONFIG_OBJECT).display()),
                    e,
                ));
            }
        };
        check_meta(&raw, &key)?;
        Ok((path.clone(), key))
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
    /// Returns the stored size when it was uploaded. (Remote locations; a backup to fs uses
    /// [`ChunkSink`].)
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
        let sealed = blocking(move || key.seal_hashed(&name, &plain, id, level)).await?;
        let size = sealed.len() as u64;
        self.put_raw(&id.object_name(), sealed).await?;
        Ok(Some(size))
    }

    /// The fs root, when chunks can be read and written directly.
    pub fn fs_root(&self) -> Option<&Path> {
        self.fs_root.as_deref()
    }

    /// Download and verify one chunk (authenticated, and its hash equals its id).
    pub async fn get_chunk(&self, id: ChunkId) -> BackupResult<Vec<u8>> {
        if self.fs_root.is_some() {
            let r = self.clone();
            return blocking(move || r.get_chunk_blocking(id)).await;
        }
        let name = id.object_name();
        let raw = self
            .get_raw(&name)
            .await?
            .ok_or_else(|| BackupError::NotFound { key: name.clone() })?;
        let key = self.key.clone();
        blocking(move || open_chunk(&key, id, raw)).await
    }

    /// [`Repository::get_chunk`] on the calling (blocking) thread: read, authenticate,
    /// decompress and re-hash in one step, with no hop through the async runtime. On a remote
    /// location this blocks on the runtime handle, so call it from `spawn_blocking` only.
    pub fn get_chunk_blocking(&self, id: ChunkId) -> BackupResult<Vec<u8>> {
        let name = id.object_name();
        let raw = match &self.fs_root {
            Some(root) => match std::fs::read(root.join(&name)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(BackupError::NotFound { key: name });
                }
                Err(e) => return Err(BackupError::io(format!("read {name}"), e)),
            },
            None => tokio::runtime::Handle::current()
                .block_on(self.get_raw(&name))?
                .ok_or_else(|| BackupError::NotFound { key: name.clone() })?,
        };
        open_chunk(&self.key, id, raw)
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

fn open_chunk(key: &RepoKey, id: ChunkId, raw: Vec<u8>) -> BackupResult<Vec<u8>> {
    let name = id.object_name();
    let (plain, hash) = key.open(&name, raw, CHUNK_SIZE)?;
    if hash != id {
        return Err(BackupError::Corrupt {
            key: name,
            reason: "content does not match its id".into(),
        });
    }
    Ok(plain)
}

/// Chunks committed per batch (one fsync each, then renamed).
const FS_BATCH: usize = 64;

/// What [`ChunkSink::put_blocking`] did.
pub enum Stored {
    /// Known or already in the repository.
    Skipped,
    /// Written (fs), this many sealed bytes.
    Written(u64),
    /// Sealed, to be uploaded (remote locations): object name and bytes.
    Upload(String, Vec<u8>),
}

/// Where one backup writes its chunks.
///
/// Why not opendal's fs writer for chunks: it fsyncs every object before its rename, so each
/// 1 MiB chunk waited for the disk inside the pipeline (about a thousand waits per GB). Here a
/// sealed chunk is written under `.tmp/` without waiting; every [`FS_BATCH`] chunks the batch
/// is fsynced and only then renamed to its real name. So the invariant of the repository is
/// unchanged: an object under its real name is complete and durable (an `exists` answer can be
/// trusted, and nothing durable is ever replaced). [`ChunkSink::finish`] commits the rest and
/// fsyncs the directories; the caller writes the manifest only after it. Remote locations go
/// through opendal as before.
pub struct ChunkSink {
    repo: Repository,
    pending: Mutex<Vec<(PathBuf, PathBuf)>>,
    dirs: Mutex<HashSet<PathBuf>>,
}

impl ChunkSink {
    pub fn new(repo: &Repository) -> Self {
        ChunkSink {
            repo: repo.clone(),
            pending: Mutex::new(Vec::new()),
            dirs: Mutex::new(HashSet::new()),
        }
    }

    /// Store one chunk whose id the caller computed, unless it is `known` or already stored.
    /// Blocking (fs I/O and CPU): call from `spawn_blocking`. On fs the chunk is written here;
    /// on a remote location the sealed chunk comes back as [`Stored::Upload`] for the caller
    /// to upload (with [`ChunkSink::upload`]) from async code. Compression is adaptive
    /// ([`RepoKey::seal_adaptive`]); `poor` is the file's flag for it.
    pub fn put_blocking(
        &self,
        id: ChunkId,
        plain: &[u8],
        known: bool,
        poor: &std::sync::atomic::AtomicBool,
    ) -> BackupResult<Stored> {
        if known {
            return Ok(Stored::Skipped);
        }
        let name = id.object_name();
        let Some(root) = &self.repo.fs_root else {
            let sealed = self.repo.key.seal_adaptive(
                &name,
                plain,
                id,
                self.repo.cfg.compression_level,
                poor,
            )?;
            return Ok(Stored::Upload(name, sealed));
        };
        let dest = root.join(&name);
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Ok(Stored::Skipped);
        }
        let sealed =
            self.repo
                .key
                .seal_adaptive(&name, plain, id, self.repo.cfg.compression_level, poor)?;
        let tmp_dir = root.join(".tmp");
        let tmp = tmp_dir.join(format!("{id}.{:016x}", rand::random::<u64>()));
        let write = |p: &Path| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)?;
            f.write_all(&sealed)
        };
        match write(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&tmp_dir)
                    .map_err(|e| BackupError::io(format!("create {}", tmp_dir.display()), e))?;
                write(&tmp).map_err(|e| BackupError::io(format!("write {}", tmp.display()), e))?;
            }
            Err(e) => return Err(BackupError::io(format!("write {}", tmp.display()), e)),
        }
        let batch = {
            let mut p = self.pending.lock().map_err(|_| poisoned())?;
            p.push((tmp, dest));
            if p.len() >= FS_BATCH {
                std::mem::take(&mut *p)
            } else {
                Vec::new()
            }
        };
        self.commit(batch)?;
        Ok(Stored::Written(sealed.len() as u64))
    }

    /// Upload a chunk sealed by [`ChunkSink::put_blocking`] unless it exists. Returns the
    /// stored size when it was uploaded.
    pub async fn upload(&self, name: &str, sealed: Vec<u8>) -> BackupResult<Option<u64>> {
        if self.repo.exists(name).await? {
            return Ok(None);
        }
        let size = sealed.len() as u64;
        self.repo.put_raw(name, sealed).await?;
        Ok(Some(size))
    }

    /// fsync each temp file, then rename it to its real name.
    fn commit(&self, batch: Vec<(PathBuf, PathBuf)>) -> BackupResult<()> {
        for (tmp, _) in &batch {
            std::fs::File::open(tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| BackupError::io(format!("fsync {}", tmp.display()), e))?;
        }
        let mut dirs = self.dirs.lock().map_err(|_| poisoned())?;
        for (tmp, dest) in batch {
            let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
            if !dirs.contains(&dir) {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| BackupError::io(format!("create {}", dir.display()), e))?;
                dirs.insert(dir);
            }
            std::fs::rename(&tmp, &dest).map_err(|e| {
                BackupError::io(format!("rename {} to {}", tmp.display(), dest.display()), e)
            })?;
        }
        Ok(())
    }

    /// Commit what is pending and make the renames durable. Blocking.
    pub fn finish_blocking(&self) -> BackupResult<()> {
        let Some(root) = &self.repo.fs_root else {
            return Ok(());
        };
        let batch = std::mem::take(&mut *self.pending.lock().map_err(|_| poisoned())?);
        self.commit(batch)?;
        let mut dirs: Vec<PathBuf> = self.dirs.lock().map_err(|_| poisoned())?.drain().collect();
        dirs.push(root.join("data"));
        for d in dirs {
            std::fs::File::open(&d)
                .and_then(|f| f.sync_all())
                .map_err(|e| BackupError::io(format!("fsync {}", d.display()), e))?;
        }
        Ok(())
    }
}

impl Drop for ChunkSink {
    /// A failed or cancelled backup leaves no temp files behind (what was renamed already is
    /// complete, and an orphan for prune).
    fn drop(&mut self) {
        if let Ok(p) = self.pending.get_mut() {
            for (tmp, _) in p.drain(..) {
                let _ignored = std::fs::remove_file(tmp);
            }
        }
    }
}

fn poisoned() -> BackupError {
    BackupError::Invalid("a backup worker panicked".into())
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
