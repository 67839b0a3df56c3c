//! `dr-agent wal-push %p`: PostgreSQL's `archive_command`.
//!
//! Contract with PostgreSQL (manual, "Setting Up WAL Archiving"): exit 0 only once the file is
//! durably stored; non-zero makes the server retry later; and the command must refuse to
//! overwrite an existing archive file with different content, while a repeat of the same file
//! (after a crash between store and acknowledgement) must succeed.
//!
//! Layout: `wal/<timeline>/<file name>`, sealed like every object; the keyed BLAKE3 of the
//! plaintext in the object header is the recorded content hash, so a repeat is recognised
//! without downloading and decrypting when it differs.
//!
//! Speed (target: a 16 MiB segment to fs in about 20 ms, process start included): an fs
//! location takes [`wal_push_fs`], which runs before any async runtime exists (a tokio runtime
//! costs threads to start and several ms to shut down, per segment). Its two halves of the file
//! are read and zstd-compressed on two threads while the calling thread hashes each half as
//! soon as it is read, so the read, the page faults of the buffer, the hash and the compression
//! overlap. Then one in-place encryption, one write + fdatasync of a temp file under `.tmp/`, a
//! hard link to the real name (which, unlike a rename, never replaces an object another pusher
//! stored meanwhile) and an fsync of the directory: exit 0 means the object and its name are
//! on disk. Remote locations go through opendal ([`wal_push`]).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::{debug, info};

use super::key::{ChunkId, HEADER_LEN, RepoKey, compress};
use super::repo::{MAX_WAL_SIZE, Repository};
use super::repo_config::RepoConfig;
use super::{BackupError, BackupResult, blocking};

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Stored,
    /// The same content was already archived under that name.
    AlreadyArchived,
}

/// Object name for a WAL file name, validating it (`%f` comes from PostgreSQL, but the CLI
/// accepts any path).
pub fn wal_object_name(file_name: &str) -> BackupResult<String> {
    let bad = || {
        BackupError::Invalid(format!(
            "{file_name:?} is not a WAL segment, history or backup history file name"
        ))
    };
    let hex = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
    };
    let ok = match file_name.len() {
        24 => hex(file_name),
        32 if file_name.ends_with(".partial") => hex(&file_name[..24]),
        16 if file_name.ends_with(".history") => hex(&file_name[..8]),
        40 if file_name.ends_with(".backup") => {
            hex(&file_name[..24]) && file_name.as_bytes()[24] == b'.' && hex(&file_name[25..33])
        }
        _ => false,
    };
    if !ok {
        return Err(bad());
    }
    Ok(format!("wal/{}/{}", &file_name[..8], file_name))
}

/// Archive one WAL file.
pub async fn wal_push(repo: &Repository, path: &Path) -> BackupResult<PushOutcome> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| BackupError::Invalid(format!("{} has no file name", path.display())))?
        .to_string();
    let name = wal_object_name(&file_name)?;
    let p = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || std::fs::read(&p));
    let existing = repo
        .operator()
        .read_with(&name)
        .range(0..HEADER_LEN as u64)
        .await;
    let plain = read
        .await
        .map_err(|e| BackupError::Invalid(format!("read task failed: {e}")))?
        .map_err(|e| BackupError::io(format!("read {}", path.display()), e))?;
    if plain.len() > MAX_WAL_SIZE {
        return Err(BackupError::Invalid(format!(
            "{} is larger than 1 GiB",
            path.display()
        )));
    }
    match existing {
        Ok(header) => {
            let old_hash = RepoKey::peek_hash(&name, &header.to_vec())?;
            let key = repo.key().clone();
            let (plain, new_hash) = blocking(move || {
                let h = key.hash(&plain);
                Ok((plain, h))
            })
            .await?;
            drop(plain);
            if old_hash != new_hash {
                return Err(BackupError::WalConflict { name: file_name });
            }
            // Same recorded hash: make sure the archived copy really opens before saying yes.
            let raw = repo
                .get_raw(&name)
                .await?
                .ok_or_else(|| BackupError::NotFound { key: name.clone() })?;
            let key = repo.key().clone();
            let n = name.clone();
            let (_, h) = blocking(move || key.open(&n, raw, MAX_WAL_SIZE)).await?;
            if h != new_hash {
                return Err(BackupError::WalConflict { name: file_name });
            }
            info!(wal = %file_name, "already archived with the same content");
            Ok(PushOutcome::AlreadyArchived)
        }
        Err(e) if e.kind() == opendal::ErrorKind::NotFound => {
            let key = repo.key().clone();
            let level = repo.config().wal_compression_level;
            let n = name.clone();
            let (sealed, _) = blocking(move || key.seal(&n, &plain, level, 2)).await?;
            let stored = sealed.len();
            repo.put_raw(&name, sealed).await?;
            debug!(wal = %file_name, stored, "archived");
            Ok(PushOutcome::Stored)
        }
        Err(e) => Err(e.into()),
    }
}

/// Archive one WAL file into an fs location without an async runtime (see the module docs).
/// Same contract and the same objects as [`wal_push`].
pub fn wal_push_fs(cfg: &RepoConfig, path: &Path) -> BackupResult<PushOutcome> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| BackupError::Invalid(format!("{} has no file name", path.display())))?
        .to_string();
    let name = wal_object_name(&file_name)?;
    let (root, key) = Repository::open_fs_blocking(cfg)?;
    let dest = root.join(&name);
    let file = std::fs::File::open(path)
        .map_err(|e| BackupError::io(format!("open {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| BackupError::io(format!("stat {}", path.display()), e))?
        .len();
    if len > MAX_WAL_SIZE as u64 {
        return Err(BackupError::Invalid(format!(
            "{} is larger than 1 GiB",
            path.display()
        )));
    }
    if dest.exists() {
        let plain = read_all(&file, path, len as usize)?;
        return compare_archived(&key, &name, &file_name, &dest, key.hash(&plain));
    }
    let level = cfg.wal_compression_level;
    let (plain, hash, pieces) = read_hash_compress(&key, &file, path, len as usize, level)?;
    let sealed = key.seal_pieces(&name, &plain, hash, &pieces)?;
    drop(pieces);
    drop(plain);
    let stored = sealed.len();
    match store_no_replace(&root, &dest, &file_name, &sealed)? {
        true => {
            debug!(wal = %file_name, stored, "archived");
            Ok(PushOutcome::Stored)
        }
        // Another pusher stored that name between our check and our link.
        false => compare_archived(&key, &name, &file_name, &dest, hash),
    }
}

fn read_all(file: &std::fs::File, path: &Path, len: usize) -> BackupResult<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| BackupError::io(format!("read {}", path.display()), e))?;
    Ok(buf)
}

/// Read the file in two halves on two threads, each compressing its half right after reading
/// it, while this thread hashes the halves in order. The zstd frames of the halves concatenate
/// into one valid stream (the format of [`RepoKey::seal`]'s parallel path).
fn read_hash_compress(
    key: &RepoKey,
    file: &std::fs::File,
    path: &Path,
    len: usize,
    level: i32,
) -> BackupResult<(Vec<u8>, ChunkId, Vec<Vec<u8>>)> {
    let mut buf = vec![0u8; len];
    let half = len.div_ceil(2).max(1);
    let read_err = |e| BackupError::io(format!("read {}", path.display()), e);
    let (hash, pieces) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<(usize, &[u8])>();
        let mut handles = Vec::new();
        for (i, part) in buf.chunks_mut(half).enumerate() {
            let tx = tx.clone();
            handles.push(s.spawn(move || -> BackupResult<Vec<u8>> {
                file.read_exact_at(part, (i * half) as u64)
                    .map_err(read_err)?;
                let part: &[u8] = part;
                // The hasher may have gone (an error elsewhere): compress anyway, it is dropped.
                let _ignored = tx.send((i, part));
                compress(part, level)
            }));
        }
        drop(tx);
        let mut hasher = key.hasher();
        let mut next = 0;
        let mut early: Vec<Option<&[u8]>> = vec![None; handles.len()];
        for (i, part) in rx.iter() {
            early[i] = Some(part);
            while let Some(Some(p)) = early.get(next) {
                hasher.update(p);
                next += 1;
            }
        }
        let mut pieces = Vec::with_capacity(handles.len());
        for h in handles {
            match h.join() {
                Ok(r) => pieces.push(r?),
                Err(_) => return Err(BackupError::Invalid("wal-push worker panicked".into())),
            }
        }
        Ok((ChunkId(*hasher.finalize().as_bytes()), pieces))
    })?;
    Ok((buf, hash, pieces))
}

/// The name exists: the same content is success (after the archived copy opens and matches),
/// anything else is refused.
fn compare_archived(
    key: &RepoKey,
    name: &str,
    file_name: &str,
    dest: &Path,
    new_hash: ChunkId,
) -> BackupResult<PushOutcome> {
    let raw =
        std::fs::read(dest).map_err(|e| BackupError::io(format!("read {}", dest.display()), e))?;
    if RepoKey::peek_hash(name, &raw)? != new_hash {
        return Err(BackupError::WalConflict {
            name: file_name.to_string(),
        });
    }
    let (_, h) = key.open(name, raw, MAX_WAL_SIZE)?;
    if h != new_hash {
        return Err(BackupError::WalConflict {
            name: file_name.to_string(),
        });
    }
    info!(wal = %file_name, "already archived with the same content");
    Ok(PushOutcome::AlreadyArchived)
}

/// Durably store `sealed` under `dest` unless the name exists (false then; nothing replaced).
fn store_no_replace(
    root: &Path,
    dest: &Path,
    file_name: &str,
    sealed: &[u8],
) -> BackupResult<bool> {
    let tmp_dir = root.join(".tmp");
    let dir = dest
        .parent()
        .ok_or_else(|| BackupError::Invalid(format!("{} has no parent", dest.display())))?;
    for d in [&tmp_dir, &dir.to_path_buf()] {
        if !d.is_dir() {
            std::fs::create_dir_all(d)
                .map_err(|e| BackupError::io(format!("create {}", d.display()), e))?;
            if let Some(p) = d.parent() {
                sync_dir(p)?;
            }
        }
    }
    let tmp: PathBuf = tmp_dir.join(format!(
        "{file_name}.{}.{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(sealed)?;
        f.sync_data()
    })();
    if let Err(e) = written {
        let _ignored = std::fs::remove_file(&tmp);
        return Err(BackupError::io(format!("write {}", tmp.display()), e));
    }
    let linked = match std::fs::hard_link(&tmp, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        // A filesystem without hard links: rename, after one more look (a race there can
        // only replace an object by one of the same name pushed at the same moment).
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EPERM) | Some(nix::libc::EOPNOTSUPP) | Some(nix::libc::EXDEV)
            ) =>
        {
            if dest.exists() {
                Ok(false)
            } else {
                std::fs::rename(&tmp, dest)
                    .map(|()| true)
                    .map_err(|e| BackupError::io(format!("rename to {}", dest.display()), e))
            }
        }
        Err(e) => Err(BackupError::io(format!("link {}", dest.display()), e)),
    };
    let _ignored = std::fs::remove_file(&tmp);
    let linked = linked?;
    if linked {
        sync_dir(dir)?;
    }
    Ok(linked)
}

fn sync_dir(d: &Path) -> BackupResult<()> {
    std::fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|e| BackupError::io(format!("fsync {}", d.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_names() {
        assert_eq!(
            wal_object_name("000000010000000000000002").unwrap(),
            "wal/00000001/000000010000000000000002"
        );
        assert!(wal_object_name("00000002.history").is_ok());
        assert!(wal_object_name("000000010000000000000002.00000028.backup").is_ok());
        assert!(wal_object_name("000000010000000000000002.partial").is_ok());
        assert!(wal_object_name("../etc/passwd").is_err());
        assert!(wal_object_name("00000001000000000000000g").is_err());
        assert!(wal_object_name("RECOVERYXLOG").is_err());
    }
}
