//! Backup repository, PostgreSQL physical backups, WAL archive (issue "Backups").
//!
//! # Why this exists
//! The agent must be able to back up and restore its host's database with nothing but the
//! repository and the repository key, even when every coordinator is gone (the total-loss
//! case in DESIGN.md). So the whole data path lives here, in the agent, and the standalone
//! CLI (`dr-agent backup run|list|verify`, `restore`, `repo init|prune`, `wal-push`,
//! `wal-fetch`, see [`cli`]) drives it with a small TOML file ([`repo_config`]).
//!
//! # Repository format (decided here, version 1)
//! ```text
//! <root>/config                 sealed JSON: format version, chunk size, key check
//! <root>/data/<2 hex>/<64 hex>  one chunk (content-addressed), sealed
//! <root>/backups/<backup id>    one manifest per backup (JSON), sealed, written LAST
//! <root>/wal/<timeline>/<name>  one WAL segment / history / .backup file, sealed
//! ```
//! Every object is *sealed* ([`key`]): `zstd(plaintext)` (or raw when zstd does not help),
//! encrypted with XChaCha20-Poly1305 under a key derived from the repository key, with a
//! random 24-byte nonce; the associated data binds the object's *name* and the keyed BLAKE3
//! hash of the plaintext, which is also kept in the header. (WAL segments stored by the fs
//! `wal-push` record the hash of the stored zstd stream instead, marked by a header flag:
//! nothing is addressed by a segment's content, and hashing 2 MiB instead of 16 MiB is 6 % of
//! a push; [`key`] and [`wal_push`] say more.) Opening an object authenticates it
//! (a flipped bit or an object moved to another name fails), then decompresses and re-hashes
//! it, so every object is checksummed end to end. (Restore's hot path skips only the re-hash,
//! because the tag already binds the hash to the compressed bytes; `key` argues it, and
//! checks the decoded length against the manifest instead; `verify` re-hashes everything.)
//!
//! * **Chunks.** Files are cut into fixed 1 MiB chunks (128 PostgreSQL pages, so chunk
//!   boundaries are page boundaries). A chunk's id is `BLAKE3_keyed(id_key, plaintext)`: keyed,
//!   so an id reveals nothing about the content (no confirmation-of-file attack). Fixed-size
//!   chunks are the natural unit for relation files, which change in place page by page:
//!   an update to one page changes one chunk. Content-defined chunking (FastCDC) would only
//!   help for inserted bytes (dumps, tarballs); it is a later option for `pg_dump` file sets and
//!   the format leaves room for it (a manifest lists chunk ids, not offsets).
//! * **Incrementals are deduplicated fulls.** An incremental backup skips files whose
//!   (size, mtime) equal the parent manifest's entry and re-chunks changed files; chunks whose id
//!   already exists are not uploaded. Its manifest lists *every* file with all its chunk ids, so
//!   every backup restores on its own and deleting a parent never breaks a child (prune keeps
//!   any chunk referenced by a live manifest).
//! * **Manifests are written last**, as one atomic object: a failed or interrupted backup has no
//!   catalog entry. Its uploaded chunks are orphans, deleted by `repo prune` once they are older
//!   than a grace period (so a running backup's fresh chunks are never pruned).
//!
//! # Why not rustic_core (the restic format)
//! A repository a stock tool can read is a recovery path in itself, so restic's format was
//! weighed first. We decided against it for now: rustic_core brings a large dependency tree
//! (its own backend stack, rayon, several crypto and serialization stacks) into an agent that
//! must stay small and build fast on 2 cores; restic's pack files group many blobs into one
//! object, which costs a repack on prune and a read amplification on restore that our 1 MiB
//! objects avoid; and its content-defined chunker is not page-aligned, so a one-page update in
//! an 800 MB relation file would not map onto one chunk. Our format is small (the whole codec
//! is [`key`] plus [`manifest`]) and documented here, so a recovery tool for it is a page of
//! code. Measured (`scripts/bench-restic.sh`, docs/benchmarks.md "Repository format vs
//! restic's"): on a 964 MB pgbench database restic's format stored the full backup in 2.1
//! times our bytes and added 2.2 times our bytes for the backup after `pgbench -c 4 -T 30`.
//! Revisit if the operators require restic compatibility.
//!
//! # The repository key
//! 32 random bytes, hex in a file with 0600 permissions (`dr-agent repo init` creates it).
//! Two sub-keys are derived with BLAKE3 `derive_key` (chunk-id key, encryption key) and a key
//! check value is stored in `config`, so a wrong key is named as such rather than as corruption.
//! **Without the key nothing in the repository can be read**: keep a copy offline (printed or
//! in the operators' secret store, and in the escrow the DR plan names), separate from the
//! repository. Recovery = put the key file back and point `--repo-config` at it. The key never
//! appears in logs, errors or manifests.
//!
//! # Memory and concurrency
//! Backups and restores stream: at most `concurrency` chunks (default 4) are in flight, each
//! at most 1 MiB plus its sealed copy, so RSS stays bounded whatever the database size;
//! only the list of chunk ids of the backup is kept in memory (32 bytes per MiB of data).
//! CPU work (hashing, zstd, AEAD) runs in `spawn_blocking`.

pub mod basebackup;
pub mod cli;
pub mod files;
pub mod fileset;
pub mod key;
pub mod logical;
pub mod manifest;
pub mod prune;
pub mod repo;
pub mod repo_config;
pub mod restore;
pub mod verify;
pub mod wal_fetch;
pub mod wal_push;

pub use key::{ChunkId, RepoKey};
pub use manifest::{BackupId, BackupKind, Lsn, Manifest};
pub use repo::Repository;
pub use repo_config::RepoConfig;

/// Errors of the backup subsystem (one enum for this boundary; the CLI turns it into anyhow).
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("object {key} not found in the repository")]
    NotFound { key: String },
    #[error("object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "the repository key does not match this repository (key check failed); use the key file created by `repo init` for it"
    )]
    WrongKey,
    #[error(
        "repository is not initialised (no `config` object); run `dr-agent repo init --repo-config FILE`"
    )]
    NotInitialised,
    #[error("WAL file {name} already archived with different content; refusing to overwrite")]
    WalConflict { name: String },
    #[error("restore target {path} is not empty; choose an empty or absent directory")]
    TargetNotEmpty { path: String },
    #[error("invalid repository configuration: {0}")]
    Config(String),
    #[error("invalid key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("storage: {0}")]
    Storage(#[from] opendal::Error),
    #[error("manifest encoding: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cancelled")]
    Cancelled,
}

impl BackupError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BackupError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether retrying the same call cannot help (neon `DownloadError::is_permanent`).
    pub fn is_permanent(&self) -> bool {
        match self {
            BackupError::Storage(e) => !e.is_temporary(),
            BackupError::Io { .. } | BackupError::Postgres(_) => false,
            _ => true,
        }
    }
}

/// Result type of the backup subsystem.
pub type BackupResult<T> = Result<T, BackupError>;

/// Run CPU-bound work off the async executor, mapping a panic to an error.
pub(crate) async fn blocking<T, F>(f: F) -> BackupResult<T>
where
    F: FnOnce() -> BackupResult<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(BackupError::Invalid(format!("worker task failed: {e}"))),
    }
}
