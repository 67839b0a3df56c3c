//! Restore a backup into an empty directory, all or nothing.
//!
//! Why `<target>.partial`: a half-restored data directory that PostgreSQL would start on is
//! worse than none (it would come up with a mix of pages from nowhere). Files are written into
//! `<target>.partial`, every chunk is verified (authenticated, and decoded to the length
//! the manifest says; see `key` for why the tag makes a re-hash unnecessary) before it is
//! written, the filesystem is synced, and only then is the directory renamed to `<target>`.
//! A leftover `.partial` from an earlier failed restore is removed first.
//!
//! Recovery configuration: with [`RestoreOptions::restore_command`] the restore writes
//! `recovery.signal` and appends `restore_command` to `postgresql.auto.conf`, so the restored
//! server fetches the WAL it needs from the archive (`dr-agent wal-fetch %f %p`).

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::key::ChunkId;
use super::manifest::{BackupId, BackupKind, EntryKind};
use super::repo::{CHUNK_SIZE, Repository};
use super::{BackupError, BackupResult, blocking};

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// When set: write recovery.signal and this restore_command.
    pub restore_command: Option<String>,
    /// Extra lines appended to postgresql.auto.conf (e.g. `archive_mode = off`).
    pub extra_conf: Vec<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreStats {
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
}

/// `<target>.partial`
pub fn partial_path(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

fn io(ctx: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let ctx = ctx.into();
    move |e| BackupError::io(ctx, e)
}

/// Restore backup `id` into `target` (absent or empty).
pub async fn restore(
    repo: &Repository,
    id: &BackupId,
    target: &Path,
    opts: &RestoreOptions,
    cancel: &CancellationToken,
) -> BackupResult<RestoreStats> {
    restore_with_progress(repo, id, target, opts, cancel, None).await
}

/// As [`restore`]; the bytes written so far are added to `progress` (progress bars read it).
pub async fn restore_with_progress(
    repo: &Repository,
    id: &BackupId,
    target: &Path,
    opts: &RestoreOptions,
    cancel: &CancellationToken,
    progress: Option<&std::sync::atomic::AtomicU64>,
) -> BackupResult<RestoreStats> {
    let span = info_span!("restore", backup = %id, target = %target.display());
    async move {
        match std::fs::read_dir(target) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(BackupError::TargetNotEmpty {
                        path: target.display().to_string(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackupError::io(format!("read {}", target.display()), e)),
        }
        let manifest = repo.get_manifest(id).await?;
        // A logical dump or a file set in a data directory would be a server that cannot
        // start (or, worse, one that starts on files from nowhere): refuse before writing.
        if !matches!(manifest.kind, BackupKind::Full | BackupKind::Incr) {
            return Err(BackupError::Invalid(format!(
                "backup {id} is a {:?} backup, not a physical one; restore it with \
                 `dr-agent restore-logical` / `restore-files` (or `drctl restore --backup {id}`)",
                manifest.kind
            )));
        }
        let partial = partial_path(target);
        if std::fs::symlink_metadata(&partial).is_ok() {
            warn!(path = %partial.display(), "removing the leftover of an earlier failed restore");
            std::fs::remove_dir_all(&partial)
                .map_err(io(format!("remove {}", partial.display())))?;
        }
        std::fs::create_dir_all(&partial).map_err(io(format!("create {}", partial.display())))?;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", partial.display())))?;

        let mut stats = RestoreStats::default();
        let mut files: Vec<NewFile> = Vec::new();
        // Directories and symlinks first (entries list parents before children); files are
        // created by `create_files` while their chunks are written (see `NewFile`).
        for e in &manifest.entries {
            if e.path.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(BackupError::Corrupt {
                    key: format!("backups/{id}"),
                    reason: format!("unsafe path {:?}", e.path),
                });
            }
            let p = partial.join(&e.path);
            match &e.kind {
                EntryKind::Dir => {
                    std::fs::create_dir_all(&p).map_err(io(format!("create {}", p.display())))?;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(e.mode))
                        .map_err(io(format!("chmod {}", p.display())))?;
                }
                EntryKind::Symlink { target } => {
                    std::os::unix::fs::symlink(target, &p)
                        .map_err(io(format!("symlink {}", p.display())))?;
                }
                EntryKind::File { size, chunks, .. } => {
                    stats.files += 1;
                    stats.bytes += size;
                    stats.chunks += chunks.len() as u64;
                    files.push(NewFile {
                        path: p,
                        size: *size,
                        mode: e.mode,
                        chunks: chunks.clone(),
                    });
                }
            }
        }
        // Largest first: their chunks keep the workers busy while the many small files are
        // created.
        files.sort_by_key(|f| std::cmp::Reverse(f.size));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let creator = {
            let (fs, cancel) = (repo.fs_root().is_some(), cancel.clone());
            tokio::task::spawn_blocking(move || create_files(files, fs, &cancel, &tx))
        };
        let run = |job: Job| async move {
            let Job {
                path,
                offset,
                len,
                id,
                direct,
            } = job;
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            // fs repository: read, authenticate, decompress and write in one blocking
            // step into per-thread buffers (no hop through the runtime, no allocation);
            // remote: download (and re-hash) asynchronously first.
            let data = match repo.fs_root() {
                Some(_) => None,
                None => Some(repo.get_chunk(id).await?),
            };
            let r = repo.clone();
            let written = blocking(move || {
                let write = |data: &[u8]| write_chunk(&path, offset, data, false);
                match (data, r.fs_root()) {
                    (Some(d), _) => {
                        if d.len() != len {
                            return Err(BackupError::Corrupt {
                                key: id.object_name(),
                                reason: format!("{} bytes where the manifest says {len}", d.len()),
                            });
                        }
                        write(&d)
                    }
                    (None, Some(root)) => BUFS.with(|b| {
                        let (sealed, plain) = &mut *b.borrow_mut();
                        read_chunk_object(root, id, sealed)?;
                        // Decoded straight into a page-aligned slice (O_DIRECT needs one).
                        if plain.len() != CHUNK_SIZE + DIRECT_ALIGN {
                            plain.resize(CHUNK_SIZE + DIRECT_ALIGN, 0);
                        }
                        let at = plain.as_ptr().align_offset(DIRECT_ALIGN);
                        let out = &mut plain[at..at + len];
                        r.key().open_chunk_into(&id.object_name(), sealed, out)?;
                        write_chunk(&path, offset, out, direct)
                    }),
                    (None, None) => Err(BackupError::Invalid("no chunk source".into())),
                }
            })
            .await?;
            if let Some(p) = progress {
                p.fetch_add(written, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        };
        let written = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|created| (created, rx))
        })
        .map_ok(|jobs: Vec<Job>| futures::stream::iter(jobs.into_iter().map(Ok)))
        .try_flatten()
        .map_ok(run)
        .try_buffer_unordered(repo.config().concurrency)
        .try_collect::<()>()
        .await;
        // The stream (and the channel's receiver) is gone: a creator still at work stops at
        // its next file. Nothing is left running in `.partial` once this returns.
        let created = creator
            .await
            .map_err(|e| BackupError::Invalid(format!("file creation task failed: {e}")));
        written?;
        created?;

        write_file(
            &partial.join("backup_label"),
            manifest.backup_label.as_bytes(),
        )?;
        if let Some(map) = &manifest.tablespace_map {
            write_file(&partial.join("tablespace_map"), map.as_bytes())?;
        }
        if opts.restore_command.is_some() || !opts.extra_conf.is_empty() {
            use std::io::Write;
            let conf = partial.join("postgresql.auto.conf");
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&conf)
                .map_err(io(format!("open {}", conf.display())))?;
            let mut text = format!("\n# added by dr-agent restore of backup {id}\n");
            if let Some(cmd) = &opts.restore_command {
                text.push_str(&format!(
                    "restore_command = '{}'\n",
                    cmd.replace('\'', "''")
                ));
            }
            for l in &opts.extra_conf {
                text.push_str(l);
                text.push('\n');
            }
            f.write_all(text.as_bytes())
                .map_err(io(format!("write {}", conf.display())))?;
            if opts.restore_command.is_some() {
                write_file(&partial.join("recovery.signal"), b"")?;
            }
        }
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        // Everything durable before the rename makes the directory visible as `target`.
        let dir =
            std::fs::File::open(&partial).map_err(io(format!("open {}", partial.display())))?;
        blocking(move || {
            nix::unistd::syncfs(&dir).map_err(|e| BackupError::io("syncfs", e.into()))
        })
        .await?;
        if std::fs::symlink_metadata(target).is_ok() {
            std::fs::remove_dir(target)
                .map_err(io(format!("remove empty {}", target.display())))?;
        }
        std::fs::rename(&partial, target).map_err(io(format!(
            "rename {} to {}",
            partial.display(),
            target.display()
        )))?;
        info!(
            files = stats.files,
            bytes = stats.bytes,
            chunks = stats.chunks,
            "restore finished"
        );
        Ok(stats)
    }
    .instrument(span)
    .await
}

/// A file of the backup, created (sized, and for multi-chunk files preallocated) by
/// [`create_files`] while the chunks of the files created before it are being written.
///
/// Why not create them all first: on a restore of a 1 GB pgbench database the main thread
/// spent ~0.45 s creating ~1,000 files before the first chunk was written (`perf`: ext4's
/// inode allocator, `find_inode_bit` / `recently_deleted`, on a filesystem with many
/// recently deleted inodes), time in which the disk and the other core idled.
struct NewFile {
    path: PathBuf,
    size: u64,
    mode: u32,
    chunks: Vec<ChunkId>,
}

/// Create `files` in order and send each one's chunk jobs once it exists; stops at the first
/// error (sent on), when the restore is cancelled, or when the receiver is gone.
fn create_files(
    files: Vec<NewFile>,
    fs: bool,
    cancel: &CancellationToken,
    tx: &tokio::sync::mpsc::UnboundedSender<BackupResult<Vec<Job>>>,
) {
    for f in files {
        if cancel.is_cancelled() || tx.is_closed() {
            return;
        }
        let created = create_file(&f, fs).map(|direct| {
            let path = Arc::new(f.path);
            f.chunks
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let offset = (i * CHUNK_SIZE) as u64;
                    let len = f.size.saturating_sub(offset).min(CHUNK_SIZE as u64) as usize;
                    Job {
                        path: path.clone(),
                        offset,
                        len,
                        id: *c,
                        direct: direct && len.is_multiple_of(DIRECT_ALIGN),
                    }
                })
                .collect()
        });
        let failed = created.is_err();
        if tx.send(created).is_err() || failed {
            return;
        }
    }
}

/// Create one file at its full size; returns whether its chunks go with O_DIRECT.
fn create_file(f: &NewFile, fs: bool) -> BackupResult<bool> {
    let p = &f.path;
    let file = std::fs::File::create(p).map_err(io(format!("create {}", p.display())))?;
    // Multi-chunk files are written with O_DIRECT into preallocated extents (see
    // `write_chunk`); small ones through the page cache.
    let direct = f.size >= CHUNK_SIZE as u64 && fs;
    let preallocated = direct
        && i64::try_from(f.size).is_ok_and(|n| {
            nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, n).is_ok()
        });
    if !preallocated {
        file.set_len(f.size)
            .map_err(io(format!("size {}", p.display())))?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(f.mode))
        .map_err(io(format!("chmod {}", p.display())))?;
    Ok(direct)
}

/// One chunk to restore: `len` bytes at `offset` of `path`.
struct Job {
    path: Arc<PathBuf>,
    offset: u64,
    len: usize,
    id: ChunkId,
    /// Write with O_DIRECT (multi-chunk file, aligned length).
    direct: bool,
}

/// Alignment of O_DIRECT buffers, offsets and lengths (the largest logical block size).
const DIRECT_ALIGN: usize = 4096;
/// Set when a filesystem refused O_DIRECT: the rest of the restore writes buffered.
static NO_DIRECT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Write one decoded chunk.
///
/// Why O_DIRECT for the large files: buffered writes copy every byte into the page cache under
/// the inode's lock, so all workers restoring the same 1 GB relation file queue behind one
/// copy (profiled: 53% of restore CPU in the page-cache copy, 16% spinning on that lock), and
/// then the final sync writes it all out again. A direct write of an aligned 1 MiB chunk into
/// a preallocated extent goes from our buffer to the disk. The all-or-nothing rule does not
/// change: the final `syncfs` before the rename also covers these extents' metadata. Any
/// failure of a direct write (a filesystem without O_DIRECT, an odd alignment) retries the
/// chunk buffered.
fn write_chunk(path: &Path, offset: u64, data: &[u8], direct: bool) -> BackupResult<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::Ordering::Relaxed;
    if direct && !NO_DIRECT.load(Relaxed) {
        let r = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(path)
            .and_then(|f| f.write_all_at(data, offset));
        match r {
            Ok(()) => return Ok(data.len() as u64),
            Err(e) => {
                if !NO_DIRECT.swap(true, Relaxed) {
                    warn!(path = %path.display(), error = %e,
                        "direct write refused; restoring through the page cache");
                }
            }
        }
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(format!("open {}", path.display())))?;
    f.write_all_at(data, offset)
        .map_err(io(format!("write {}", path.display())))?;
    Ok(data.len() as u64)
}

thread_local! {
    /// Per restore worker: the sealed object as read, and its plaintext (1 MiB each, reused).
    static BUFS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Read the sealed chunk `id` of an fs repository into `buf` (cleared first).
fn read_chunk_object(root: &Path, id: ChunkId, buf: &mut Vec<u8>) -> BackupResult<()> {
    use std::io::Read;
    let name = id.object_name();
    buf.clear();
    let mut f = match std::fs::File::open(root.join(&name)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BackupError::NotFound { key: name });
        }
        Err(e) => return Err(BackupError::io(format!("read {name}"), e)),
    };
    f.read_to_end(buf)
        .map_err(|e| BackupError::io(format!("read {name}"), e))?;
    Ok(())
}

fn write_file(p: &Path, data: &[u8]) -> BackupResult<()> {
    std::fs::write(p, data).map_err(io(format!("write {}", p.display())))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", p.display())))
}
