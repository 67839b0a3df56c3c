//! `dr-agent wal-push %p`: PostgreSQL's `archive_command`.
//!
//! Contract with PostgreSQL (manual, "Setting Up WAL Archiving"): exit 0 only once the file is
//! durably stored; non-zero makes the server retry later; and the command must refuse to
//! overwrite an existing archive file with different content, while a repeat of the same file
//! (after a crash between store and acknowledgement) must succeed.
//!
//! Layout: `wal/<timeline>/<file name>`, sealed like every object. A name that exists is
//! compared by content: the archived object is opened (authenticated, decrypted, its hash
//! checked) and its plaintext compared with the file's, byte for byte (`compare_archived`).
//! That costs a read and a decompression, only on a repeat or a conflict, and holds for every
//! object whatever hash its header records (of the plaintext, or, for objects this module
//! streams, of the stored bytes; see [`super::key`]).
//!
//! Speed (target: a 16 MiB segment to fs in at most 0.3 times pgBackRest's archive-push,
//! process start included): an fs location takes [`wal_push_fs`], which runs before any async
//! runtime exists (a tokio runtime costs threads to start and several ms to shut down, per
//! segment), after a command line parse without clap (`main.rs`). The file is mapped
//! read-only and taken in pieces of 256 KiB by two workers (the calling thread and one more;
//! up to four on bigger machines), each held on its own CPU while they work (left to the
//! scheduler, the two often took turns on one core: see [`Placement`]): a piece is
//! compressed into its own zstd frame. Reading the whole segment into one fresh buffer cost
//! as much CPU in page faults, zeroing and unmapping as zstd did, and copying pieces into
//! reused buffers still cost 12 % of a push (`map_segment` says why the mapping is sound).
//! Whichever worker completes the next frame in file order hashes it (keyed BLAKE3 over the
//! frames, ~2 MiB, where the plaintext was 16 MiB and 9 % of a push's CPU), encrypts it
//! (XChaCha20, and Poly1305 over the ciphertext as it goes) and writes it into a temp file
//! under `.tmp/`, then any frames after it that are ready: no thread is woken per frame, and
//! a frame's buffer is reused once it is written. Every 512 KiB written, writeback of the
//! temp file starts (posix_fadvise DONTNEED, which does not wait), so the fdatasync at the
//! end waits for the last piece and the journal commit only (2.4 ms of 2 MiB written at the
//! end before, 0.4 ms after). Once all frames are in, the tag is completed (the aad, which
//! holds the hash, is put in front with Poly1305's algebra, see [`super::key`]'s
//! `StreamSeal`) and the header and tag are written, then fdatasync, a hard link to the real
//! name (which, unlike a rename, never replaces an object another pusher stored meanwhile)
//! and an fsync of the directory: exit 0 means the object and its name are on disk. The
//! object is the frames (concatenated zstd frames are one zstd stream) encrypted as
//! [`RepoKey::seal`] would with the same nonce, under header flag bit 1. WAL is compressed
//! at zstd -1 by default (smaller and faster than 1 on pgbench WAL in 256 KiB frames;
//! `wal_compression_level`). Remote locations go through opendal ([`wal_push`]).
//!
//! Read-ahead (`--push-ahead N`, optional, like pgBackRest's asynchronous archiving): after
//! its own segment is durable, a call starts one detached pusher (one at a time, `flock`) that
//! stores the next N `.ready` segments of the same `pg_wal` and records each, once durable, in
//! `<spool_dir>/pushed/<segment>` (the hash in the object's header + the file's device, inode,
//! size, mtime). PostgreSQL's later call for such a segment returns 0 after checking that the
//! archived object exists with the recorded hash in its header and that the file is the one
//! the pusher read; any other file goes the normal way (compared, a different one refused).
//! The records are local and only ever shortcut a check, never a store.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

use tracing::{debug, info};

use super::key::{ChunkId, HEADER_LEN, RepoKey, compress_into};
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
    // The whole object if the name exists: a repeat or a conflict is decided on its content.
    let existing = repo.get_raw(&name).await?;
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
        Some(raw) => {
            // The name exists (a repeat after a crash, or another file): the archived copy
            // must open, and its plaintext must be this file's.
            let key = repo.key().clone();
            let n = name.clone();
            let same = blocking(move || {
                let (archived, _) = key.open(&n, raw, MAX_WAL_SIZE)?;
                Ok(archived == plain)
            })
            .await?;
            if !same {
                return Err(BackupError::WalConflict { name: file_name });
            }
            info!(wal = %file_name, "already archived with the same content");
            Ok(PushOutcome::AlreadyArchived)
        }
        None => {
            let key = repo.key().clone();
            let level = repo.config().wal_compression_level;
            let n = name.clone();
            let (sealed, _) = blocking(move || key.seal(&n, &plain, level, 2)).await?;
            let stored = sealed.len();
            repo.put_raw(&name, sealed).await?;
            debug!(wal = %file_name, stored, "archived");
            Ok(PushOutcome::Stored)
        }
    }
}

/// Archive one WAL file into an fs location without an async runtime (see the module docs).
/// Same contract and the same objects as [`wal_push`].
pub fn wal_push_fs(cfg: &RepoConfig, path: &Path) -> BackupResult<PushOutcome> {
    push_fs_hashed(cfg, path).map(|(o, _)| o)
}

/// [`wal_push_fs`], also returning the hash in the archived object's header (the read-ahead
/// pusher records it).
fn push_fs_hashed(cfg: &RepoConfig, path: &Path) -> BackupResult<(PushOutcome, ChunkId)> {
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
        return compare_archived(&key, &name, &file_name, &dest, &file, path, len as usize);
    }
    let level = cfg.wal_compression_level;
    let (linked, hash) =
        store_streamed(&key, &root, &dest, &name, &file, path, len as usize, level)?;
    if linked {
        return Ok((PushOutcome::Stored, hash));
    }
    // Another pusher stored that name between our check and our link.
    compare_archived(&key, &name, &file_name, &dest, &file, path, len as usize)
}

/// Compress, encrypt and write the file into a temp object frame by frame (each frame is
/// encrypted and written while the workers compress the next ones), then make it durable and
/// link it to `dest` unless that name exists. Returns whether it was linked, and the hash.
#[allow(clippy::too_many_arguments)]
fn store_streamed(
    key: &RepoKey,
    root: &Path,
    dest: &Path,
    name: &str,
    file: &std::fs::File,
    path: &Path,
    len: usize,
    level: i32,
) -> BackupResult<(bool, ChunkId)> {
    let file_name = file_name_of(path)?;
    let (tmp, out) = create_tmp(root, dest, &file_name)?;
    let written = (|| {
        let mut seal = key.seal_stream();
        let write_err = |e| BackupError::io(format!("write {}", tmp.display()), e);
        let mut flushed = 0u64;
        scan(file, path, len, level, |frame| {
            let at = (HEADER_LEN as u64) + seal.len();
            seal.encrypt(frame);
            out.write_all_at(frame, at).map_err(write_err)?;
            // Start writing back what is written (whole pages) while later frames are still
            // being compressed, so the fdatasync below waits for less (see WRITEBACK).
            let upto = (at + frame.len() as u64) & !4095;
            if upto >= flushed + WRITEBACK {
                let _ignored = posix_fadvise(
                    &out,
                    flushed as i64,
                    (upto - flushed) as i64,
                    PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                );
                flushed = upto;
            }
            Ok(())
        })?;
        let body = seal.len();
        let hash = if body < len as u64 {
            let (header, tag, hash) = seal.finish(name)?;
            out.write_all_at(&header, 0).map_err(write_err)?;
            out.write_all_at(&tag, HEADER_LEN as u64 + body)
                .map_err(write_err)?;
            hash
        } else {
            // Incompressible (rare for WAL): the object holds the plaintext itself, with the
            // plaintext's hash like any object sealed whole.
            let plain = read_all(file, path, len)?;
            let hash = key.hash(&plain);
            let sealed = key.seal_plain(name, &plain, hash)?;
            out.set_len(0).map_err(write_err)?;
            out.write_all_at(&sealed, 0).map_err(write_err)?;
            hash
        };
        out.sync_data().map_err(write_err)?;
        Ok(hash)
    })();
    drop(out);
    let hash = match written {
        Ok(h) => h,
        Err(e) => {
            let _ignored = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let linked = publish(&tmp, dest)?;
    debug!(wal = %file_name, linked, "archived");
    Ok((linked, hash))
}

/// Bytes of the temp object written between two starts of its writeback. POSIX_FADV_DONTNEED
/// starts writeback of a range's dirty pages without waiting (as sync_file_range(WRITE),
/// which neither nix nor rustix wraps) and drops only its clean pages; durability still comes
/// from the fdatasync after the last frame, which then waits for the tail and the journal
/// commit only. Ignored errors: at worst the fdatasync writes it all, as before.
const WRITEBACK: u64 = 512 << 10;

/// Environment variable that turns a `wal-push` process into the read-ahead pusher.
pub const AHEAD_ENV: &str = "DR_WAL_PUSH_AHEAD";
const AHEAD_LOCK: &str = ".push-ahead.lock";
/// `<spool>/pushed/<segment>`: the hex plaintext hash of a segment the read-ahead pusher
/// stored durably and the identity (device, inode, size, mtime) of the file it read, written
/// (temp + rename) only after the object and its name were fsynced.
const PUSHED_DIR: &str = "pushed";

/// `wal-push --push-ahead N` (fs locations; see the module docs): like [`wal_push_fs`], but a segment the read-ahead pusher already
/// stored is answered by checking that the file is the one it read (same inode, size and
/// mtime, else by hashing it again) and that the archived object's header holds the recorded
/// hash (no compression, no write); afterwards a detached pusher stores the next `ahead`
/// `.ready` segments of the same `pg_wal` while PostgreSQL is still busy with this one.
pub fn wal_push_fs_ahead(cfg: &RepoConfig, path: &Path, ahead: usize) -> BackupResult<PushOutcome> {
    let spool = cfg.spool_dir.as_ref().ok_or_else(|| {
        BackupError::Invalid(
            "--push-ahead needs spool_dir in the repository config (it records the segments \
             pushed ahead); set spool_dir or drop --push-ahead"
                .into(),
        )
    })?;
    if std::env::var_os(AHEAD_ENV).is_some() {
        run_ahead(cfg, spool, path, ahead);
        return Ok(PushOutcome::Stored);
    }
    let outcome = match pushed_ahead(cfg, spool, path)? {
        Some(o) => o,
        None => wal_push_fs(cfg, path)?,
    };
    kick_ahead(spool, path, ahead);
    Ok(outcome)
}

fn file_name_of(path: &Path) -> BackupResult<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| BackupError::Invalid(format!("{} has no file name", path.display())))
}

/// Some: the read-ahead pusher stored this very content (the file's hash equals the one it
/// recorded and the one in the archived object's header). None: push it the normal way.
fn pushed_ahead(cfg: &RepoConfig, spool: &Path, path: &Path) -> BackupResult<Option<PushOutcome>> {
    let file_name = file_name_of(path)?;
    let marker = spool.join(PUSHED_DIR).join(&file_name);
    let Ok(text) = std::fs::read_to_string(&marker) else {
        return Ok(None);
    };
    let _ignored = std::fs::remove_file(&marker);
    let mut fields = text.split_whitespace();
    let Some(Ok(recorded)) = fields.next().map(str::parse::<ChunkId>) else {
        return Ok(None);
    };
    let recorded_identity = fields.next().unwrap_or_default().to_string();
    let name = wal_object_name(&file_name)?;
    // Opened for its checks (the key file, the repository's key check) only.
    let (root, _key) = Repository::open_fs_blocking(cfg)?;
    let file = std::fs::File::open(path)
        .map_err(|e| BackupError::io(format!("open {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| BackupError::io(format!("stat {}", path.display()), e))?;
    let len = meta.len();
    if len > MAX_WAL_SIZE as u64 {
        return Ok(None);
    }
    // Only the very file the pusher read (same inode, size and mtime; PostgreSQL never writes
    // a segment once it is .ready) is taken as stored; any other goes the normal way, which
    // compares it with the archived copy.
    if identity(&meta) != recorded_identity {
        return Ok(None);
    }
    let mut header = [0u8; HEADER_LEN];
    let archived = std::fs::File::open(root.join(&name))
        .and_then(|f| f.read_exact_at(&mut header, 0))
        .is_ok();
    if archived && RepoKey::peek_hash(&name, &header)? == recorded {
        debug!(wal = %file_name, "already pushed ahead");
        return Ok(Some(PushOutcome::AlreadyArchived));
    }
    Ok(None)
}

/// Device, inode, size and modification time of a file, as one token.
fn identity(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{}:{}:{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    )
}

/// The `.ready` segments after `file_name` in `<pg_wal>/archive_status`, oldest first.
fn ready_after(path: &Path, file_name: &str, n: usize) -> Vec<String> {
    let Some(status) = path.parent().map(|d| d.join("archive_status")) else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir(status) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|n| n.strip_suffix(".ready").map(str::to_string))
        .filter(|n| n.len() == 24 && n.as_str() > file_name && n[..8] == file_name[..8])
        .filter(|n| wal_object_name(n).is_ok())
        .collect();
    v.sort();
    v.truncate(n);
    v
}

/// Start the read-ahead pusher when segments after this one wait and none is running.
fn kick_ahead(spool: &Path, path: &Path, ahead: usize) {
    let Ok(file_name) = file_name_of(path) else {
        return;
    };
    let pushed = spool.join(PUSHED_DIR);
    // Records of segments PostgreSQL never asked for (it moved past them): stale.
    if let Ok(rd) = std::fs::read_dir(&pushed) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n < file_name.as_str())
            {
                let _ignored = std::fs::remove_file(e.path());
            }
        }
    }
    let todo = ready_after(path, &file_name, ahead);
    if todo.iter().all(|n| pushed.join(n).exists()) {
        return;
    }
    if std::fs::create_dir_all(&pushed).is_err() {
        return;
    }
    match super::wal_fetch::try_lock_file(&spool.join(AHEAD_LOCK)) {
        Ok(Some(lock)) => drop(lock),
        _ => return,
    }
    let exe = match std::env::current_exe() {
        Ok(exe) if exe.file_name().is_some_and(|n| n == "dr-agent") => exe,
        _ => return,
    };
    use std::os::unix::process::CommandExt;
    let spawned = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(AHEAD_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the wal read-ahead pusher; archiving continues without it");
    }
}

/// The read-ahead pusher: store the next `ahead` `.ready` segments after `path` (one at a
/// time; each push already uses two threads) and record each once it is durable.
fn run_ahead(cfg: &RepoConfig, spool: &Path, path: &Path, ahead: usize) {
    let Ok(lock) = super::wal_fetch::try_lock_file(&spool.join(AHEAD_LOCK)) else {
        return;
    };
    let Some(lock) = lock else {
        return;
    };
    let Ok(file_name) = file_name_of(path) else {
        return;
    };
    let pushed = spool.join(PUSHED_DIR);
    let Some(dir) = path.parent() else {
        return;
    };
    for n in ready_after(path, &file_name, ahead) {
        let marker = pushed.join(&n);
        if marker.exists() {
            continue;
        }
        let p = dir.join(&n);
        // Identity before the push: a file changed meanwhile gets a new mtime and no match.
        let Ok(before) = std::fs::metadata(&p).map(|m| identity(&m)) else {
            break;
        };
        match push_fs_hashed(cfg, &p) {
            Ok((_, hash)) => {
                let tmp = pushed.join(format!(".{n}.{}", std::process::id()));
                let r = std::fs::write(&tmp, format!("{hash} {before}\n"))
                    .and_then(|()| std::fs::rename(&tmp, &marker));
                if r.is_err() {
                    let _ignored = std::fs::remove_file(&tmp);
                    break;
                }
            }
            // PostgreSQL's own call will push it and report the error.
            Err(e) => {
                tracing::warn!(wal = %n, error = %e, "read-ahead push failed");
                break;
            }
        }
    }
    drop(lock);
}

/// The first `len` bytes of `file`, mapped read-only. Not `MAP_POPULATE`: that faults all
/// 4,096 pages in on the calling thread before the workers start; unpopulated, each worker
/// takes the faults of its own pieces (alternating A/B: 16.9 and 17.6 ms against 18.5 and
/// 18.1 ms populated).
///
/// Why a mapping: the workers hash and compress straight from the page cache. Reading each
/// piece into a buffer first was 12 % of a push's CPU in the kernel's copy; with the
/// mapping, pushes in the same bench runs took 16.7-18.4 ms instead of 19.0-20.2 ms
/// (docs/benchmarks.md, "wal-push, late evening").
#[allow(unsafe_code)]
fn map_segment(file: &std::fs::File, path: &Path, len: usize) -> BackupResult<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and private to this process, and it is read only while
    // the segment's pieces are compressed (or while `compare_archived` compares it with an
    // archived copy); then it is unmapped (`scan` hands it to a thread for that; at the latest
    // the process's exit does). Its bytes must not change while they are read: `%p` is a
    // completed WAL segment, which PostgreSQL neither writes nor truncates while its
    // archive_command runs (a segment is recycled only after archiving it succeeded), and the
    // read-ahead pusher reads only such segments. A file already shorter than `len` is
    // refused below, before it is mapped. Outside that contract a truncation while the bytes
    // are read raises SIGBUS (the wal-push process dies, non-zero, nothing is linked into the
    // repository; the agent daemon never maps segments), and a concurrent rewrite stores a mix
    // of old and new bytes, as any reader of a file being rewritten would (the object is still
    // self-consistent: its hash is of the bytes it holds).
    let size = file
        .metadata()
        .map_err(|e| BackupError::io(format!("stat {}", path.display()), e))?
        .len();
    if size < len as u64 {
        return Err(BackupError::Invalid(format!(
            "{} shrank to {size} bytes while being archived (expected {len}); \
             PostgreSQL retries the archive_command",
            path.display()
        )));
    }
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(file) }
        .map_err(|e| BackupError::io(format!("map {}", path.display()), e))?;
    Ok(map)
}

/// Unmap the segment on a short-lived thread: tearing down a 16 MiB mapping (4,096 page
/// table entries and their reverse mappings) took 0.2-0.8 ms on the pushing thread, which now
/// goes on to its fdatasync, link and directory fsync while that happens. If the thread cannot
/// be started, the mapping is unmapped here as before.
fn release_in_background(map: memmap2::Mmap) {
    let spawned = std::thread::Builder::new()
        .name("wal-unmap".into())
        .stack_size(64 << 10)
        .spawn(move || drop(map));
    // A failed spawn drops the closure, and the mapping with it, before returning.
    drop(spawned);
}

fn read_all(file: &std::fs::File, path: &Path, len: usize) -> BackupResult<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| BackupError::io(format!("read {}", path.display()), e))?;
    Ok(buf)
}

/// Plaintext bytes a push reads, hashes and compresses as one unit (one zstd frame, one
/// BLAKE3 subtree). 256 KiB: a piece and zstd's tables stay in the core's cache, each worker
/// reuses one buffer, and the frames of a 16 MiB segment store ~2.5 % more than one frame.
const PIECE: usize = 256 << 10;

/// Compress `len` bytes of `file` at `level` into zstd frames of [`PIECE`] bytes of
/// plaintext each (their concatenation is one valid zstd stream), handing each frame to `sink`
/// in file order as soon as it and those before it are ready. Workers (the calling thread and
/// one more, up to four in all on bigger machines) take pieces of the mapped file in turn
/// ([`map_segment`]: no copy out of the page cache, and no fresh 16 MiB allocation, whose page
/// faults, zeroing and unmapping cost as much CPU as zstd did). The worker that completes the
/// next frame in file order runs `sink` on it and on the ready frames after it, so no thread
/// waits to be woken per frame (64 wake-ups and context switches per segment on two cores),
/// and frame buffers go back to a pool once sunk (a few of them per segment, not 64 fresh
/// ones).
fn scan(
    file: &std::fs::File,
    path: &Path,
    len: usize,
    level: i32,
    sink: impl FnMut(&mut [u8]) -> BackupResult<()> + Send,
) -> BackupResult<()> {
    let mut sink = sink;
    if len <= PIECE {
        let plain = read_all(file, path, len)?;
        let mut f = Vec::new();
        compress_into(&plain, level, &mut f)?;
        return sink(&mut f);
    }
    let n = len.div_ceil(PIECE);
    // The pusher's CPU and the others it may use ([`Placement`]); their number sets the
    // workers. Not `available_parallelism`, which also reads the cgroup's CPU quota from three
    // files (0.08-0.14 ms of a ~14 ms push); under a quota smaller than the mask the workers
    // share it, doing the same work.
    let placement = Placement::pin_self();
    let cpus = placement.as_ref().map_or(&[][..], |p| &p.others[..]);
    let workers = (cpus.len() + 1).clamp(2, 4).min(n);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let order = Mutex::new(InOrder {
        next: 0,
        ready: vec![None; n],
        spare: Vec::new(),
        writing: false,
    });
    let sink = Mutex::new(sink);
    let fail = |e: BackupError| {
        failed.store(true, Ordering::Relaxed);
        Err(e)
    };
    let map = map_segment(file, path, len)?;
    let work = || -> BackupResult<()> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n || failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let off = i * PIECE;
            let part = &map[off..off + PIECE.min(len - off)];
            let mut out = lock(&order).spare.pop().unwrap_or_default();
            if let Err(e) = compress_into(part, level, &mut out) {
                return fail(e);
            }
            let mut st = lock(&order);
            st.ready[i] = Some(out);
            if st.writing {
                continue;
            }
            // This worker hands the ready frames to the sink, in order, until none is ready.
            st.writing = true;
            loop {
                let mut run = Vec::new();
                let s = &mut *st;
                while let Some(f) = s.ready.get_mut(s.next).and_then(Option::take) {
                    run.push(f);
                    s.next += 1;
                }
                if run.is_empty() {
                    st.writing = false;
                    break;
                }
                drop(st);
                let sunk = {
                    let mut sink = lock(&sink);
                    run.iter_mut().try_for_each(|f| (*sink)(f))
                };
                st = lock(&order);
                st.spare.append(&mut run);
                if let Err(e) = sunk {
                    st.writing = false;
                    return fail(e);
                }
            }
        }
    };
    let started = CheckIn::default();
    std::thread::scope(|s| {
        let (work, started) = (&work, &started);
        let handles: Vec<_> = (1..workers)
            .map(|w| {
                let cpu = (!cpus.is_empty()).then(|| cpus[(w - 1) % cpus.len()]);
                s.spawn(move || {
                    if let Some(cpu) = cpu {
                        started.leave();
                        run_on(cpu);
                    }
                    started.arrive();
                    work()
                })
            })
            .collect();
        started.wait_for(workers - 1);
        let mut result = work();
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(BackupError::Invalid("wal-push worker panicked".into())));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })?;
    drop(placement);
    release_in_background(map);
    let st = order.into_inner().unwrap_or_else(PoisonError::into_inner);
    if st.next == n {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "{}: a piece was never read",
            path.display()
        )))
    }
}

/// Where the pusher and its workers run while they compress. Linux often puts a new thread
/// on its creator's CPU, and here the two then took turns on one core in 4 ms slices for
/// most of a push while the other core idled (`perf sched`: the worker created on the
/// pusher's CPU, the other CPU idle for the whole push, no migration; `perf stat`: 1.0-1.3
/// CPUs used by a two-thread push). Moving the worker away was not enough: when its
/// check-in woke the pusher, the pusher was woken onto the worker's CPU. So for the scan the
/// pusher holds its current CPU, each worker first moves itself to another CPU of the
/// process's affinity mask ([`run_on`]) for the few milliseconds it lives, and the pusher
/// lets them go first ([`CheckIn`]) before it starts on pieces itself: it yields its CPU, so
/// a worker queued behind it there gets to run and move away, and only if one did not, it
/// waits for their check-in. The wait is bounded, in case a guest's idle virtual CPU takes
/// long to wake (up to a few ms seen here), so the pusher never idles longer than
/// [`CHECK_IN_WAIT`]. Dropping the placement gives the pusher its mask back. With a single
/// CPU allowed, nothing is pinned.
struct Placement {
    allowed: nix::sched::CpuSet,
    /// The other allowed CPUs, in order after the pusher's, wrapping around.
    others: Vec<usize>,
}

impl Placement {
    fn pin_self() -> Option<Placement> {
        use nix::sched::{CpuSet, sched_getaffinity, sched_getcpu, sched_setaffinity};
        let me = sched_getcpu().ok()?;
        let allowed = sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
        let n = CpuSet::count();
        let others: Vec<usize> = (1..n)
            .map(|k| (me + k) % n)
            .filter(|&c| allowed.is_set(c).unwrap_or(false))
            .collect();
        if others.is_empty() {
            return None;
        }
        let mut only_me = CpuSet::new();
        only_me.set(me).ok()?;
        sched_setaffinity(nix::unistd::Pid::from_raw(0), &only_me).ok()?;
        Some(Placement { allowed, others })
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        let _ignored = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.allowed);
    }
}

/// Move the calling thread to `cpu` (best effort: if the mask cannot be set, the thread
/// stays where the scheduler put it).
fn run_on(cpu: usize) {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ignored = sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// How the pushing thread lets its workers move to their CPUs before it starts on pieces
/// itself (see [`Placement`]): a yield, then, if needed, a short wait for their check-in.
#[derive(Default)]
struct CheckIn {
    /// Workers that got a CPU and asked to move away from the pusher's.
    leaving: AtomicUsize,
    arrived: Mutex<usize>,
    cv: Condvar,
}

/// See [`Placement`]: far more than a context switch and a move to another CPU (tens of
/// microseconds), far less than a push.
const CHECK_IN_WAIT: std::time::Duration = std::time::Duration::from_micros(300);

impl CheckIn {
    fn arrive(&self) {
        *lock(&self.arrived) += 1;
        self.cv.notify_all();
    }

    fn leave(&self) {
        self.leaving.fetch_add(1, Ordering::Release);
    }

    /// First the pusher yields its CPU once: a new worker, queued behind it there (it is born
    /// with the pusher's one-CPU mask), runs and asks to move; the pusher runs again once that
    /// worker is off its CPU, without having slept (waking a sleeping pusher on an idle
    /// virtual CPU took 0.11-0.18 ms). Only if not every worker got to run does it wait for
    /// their check-in. (A worker preempted between asking and moving waits for the pusher's
    /// time slice, as before the check-in existed: a slower push, nothing worse.)
    fn wait_for(&self, n: usize) {
        std::thread::yield_now();
        if self.leaving.load(Ordering::Acquire) >= n {
            return;
        }
        let guard = lock(&self.arrived);
        let _ignored = self
            .cv
            .wait_timeout_while(guard, CHECK_IN_WAIT, |arrived| *arrived < n);
    }
}

/// [`scan`]'s frames between the workers: the next one the sink takes, the ones compressed
/// ahead of their turn, and buffers to reuse.
struct InOrder {
    next: usize,
    ready: Vec<Option<Vec<u8>>>,
    spare: Vec<Vec<u8>>,
    /// A worker is handing frames to the sink (only one at a time does).
    writing: bool,
}

/// A poisoned lock only means another worker panicked; its join reports that.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The name exists: the same content is success (the archived copy opens, and its plaintext
/// is the file's), anything else is refused. Returns the hash in the archived object's header.
/// Plaintexts are compared, not hashes: the fs push records the hash of what it stores (see
/// [`super::key`]), which depends on how the segment was compressed. This runs only for a
/// repeat (PostgreSQL retrying after a crash between store and acknowledgement) or a
/// conflict.
fn compare_archived(
    key: &RepoKey,
    name: &str,
    file_name: &str,
    dest: &Path,
    file: &std::fs::File,
    path: &Path,
    len: usize,
) -> BackupResult<(PushOutcome, ChunkId)> {
    let raw =
        std::fs::read(dest).map_err(|e| BackupError::io(format!("read {}", dest.display()), e))?;
    let (archived, hash) = key.open(name, raw, MAX_WAL_SIZE)?;
    // Compared against the mapped file: no second 16 MiB buffer to fault in and zero.
    let same =
        archived.len() == len && (len == 0 || *map_segment(file, path, len)? == archived[..]);
    if !same {
        return Err(BackupError::WalConflict {
            name: file_name.to_string(),
        });
    }
    info!(wal = %file_name, "already archived with the same content");
    Ok((PushOutcome::AlreadyArchived, hash))
}

/// A new temp file under `<root>/.tmp/` for the object `dest` (creating and fsyncing the
/// directories the object needs first).
fn create_tmp(root: &Path, dest: &Path, file_name: &str) -> BackupResult<(PathBuf, std::fs::File)> {
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
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| BackupError::io(format!("create {}", tmp.display()), e))?;
    Ok((tmp, f))
}

/// Link the durable temp object `tmp` to `dest` unless that name exists (false then; nothing
/// replaced), remove the temp name and fsync `dest`'s directory.
fn publish(tmp: &Path, dest: &Path) -> BackupResult<bool> {
    let dir = dest
        .parent()
        .ok_or_else(|| BackupError::Invalid(format!("{} has no parent", dest.display())))?;
    let linked = match std::fs::hard_link(tmp, dest) {
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
                std::fs::rename(tmp, dest)
                    .map(|()| true)
                    .map_err(|e| BackupError::io(format!("rename to {}", dest.display()), e))
            }
        }
        Err(e) => Err(BackupError::io(format!("link {}", dest.display()), e)),
    };
    let _ignored = std::fs::remove_file(tmp);
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
    fn t20_scan_frames_equal_the_whole_file() {
        let key = RepoKey::from_master(&[9u8; 32]);
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1, PIECE, PIECE + 1, 3 * PIECE + 4097, 16 << 20] {
            let data: Vec<u8> = (0..len)
                .map(|i| if i % 3 == 0 { (i >> 9) as u8 } else { 0 })
                .collect();
            let path = dir.path().join(format!("f{len}"));
            std::fs::write(&path, &data).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            let mut frames = Vec::new();
            scan(&file, &path, len, 1, |f| {
                frames.push(f.to_vec());
                Ok(())
            })
            .unwrap();
            assert_eq!(frames.len(), len.div_ceil(PIECE).max(1));
            let stream: Vec<u8> = frames.concat();
            let decoded = zstd::bulk::decompress(&stream, len.max(1)).unwrap();
            assert!(decoded == data, "len {len}");
            // The sealed object opens to the file (what wal-fetch and verify read).
            if let Some(sealed) = key
                .seal_compressed("wal/00000001/x", len, key.hash(&data), &frames)
                .unwrap()
            {
                let (plain, _) = key.open("wal/00000001/x", sealed, 32 << 20).unwrap();
                assert!(plain == data, "len {len}");
            }
        }
        // A file shorter than the length taken from its metadata: an error, not a short object.
        let path = dir.path().join("short");
        std::fs::write(&path, vec![1u8; PIECE + 10]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        assert!(scan(&file, &path, 2 * PIECE, 1, |_| Ok(())).is_err());
    }

    /// The pusher holds its CPU only while it scans, and a thread already held to one CPU
    /// (nothing to spread over) scans there and keeps that mask.
    #[test]
    fn t21_scan_gives_the_cpu_mask_back() {
        use nix::sched::{CpuSet, sched_getaffinity, sched_getcpu, sched_setaffinity};
        let me = nix::unistd::Pid::from_raw(0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let data: Vec<u8> = (0..4 * PIECE).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mask = |s: &CpuSet| -> Vec<usize> {
            (0..CpuSet::count())
                .filter(|&c| s.is_set(c).unwrap())
                .collect()
        };
        let compress_all = |stream: &mut Vec<u8>| {
            scan(&file, &path, data.len(), 1, |f| {
                stream.extend_from_slice(f);
                Ok(())
            })
        };
        let before = sched_getaffinity(me).unwrap();
        let mut stream = Vec::new();
        compress_all(&mut stream).unwrap();
        assert!(zstd::bulk::decompress(&stream, data.len()).unwrap() == data);
        assert_eq!(mask(&sched_getaffinity(me).unwrap()), mask(&before));

        let mut one = CpuSet::new();
        one.set(sched_getcpu().unwrap()).unwrap();
        sched_setaffinity(me, &one).unwrap();
        let mut again = Vec::new();
        let scanned = compress_all(&mut again);
        let held = sched_getaffinity(me).unwrap();
        sched_setaffinity(me, &before).unwrap();
        scanned.unwrap();
        assert!(again == stream);
        assert_eq!(mask(&held), mask(&one));
    }

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

    #[test]
    fn t30_streamed_objects_open_and_never_replace() {
        let key = RepoKey::from_master(&[9u8; 32]);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        std::fs::create_dir_all(&root).unwrap();
        let wal: Vec<u8> = (0..(16usize << 20))
            .map(|i| if i % 4 == 0 { (i >> 11) as u8 } else { 0 })
            .collect();
        let noise: Vec<u8> = (0..(PIECE * 2 + 100))
            .map(|_| rand::random::<u8>())
            .collect();
        for (seg, data) in [
            ("000000010000000000000001", &wal),
            ("000000010000000000000002", &noise),
        ] {
            let path = dir.path().join(seg);
            std::fs::write(&path, data).unwrap();
            let name = wal_object_name(seg).unwrap();
            let dest = root.join(&name);
            let file = std::fs::File::open(&path).unwrap();
            let (linked, hash) =
                store_streamed(&key, &root, &dest, &name, &file, &path, data.len(), 1).unwrap();
            assert!(linked);
            let raw = std::fs::read(&dest).unwrap();
            // Compressed: zstd, and the hash is of the stored stream (flag bits 0 and 1);
            // incompressible: the plaintext, hashed as such.
            assert_eq!(raw[4], if seg.ends_with('1') { 3 } else { 0 }, "flags");
            let (plain, h) = key.open(&name, raw.clone(), 32 << 20).unwrap();
            assert!(plain == *data && h == hash);
            assert_eq!(RepoKey::peek_hash(&name, &raw).unwrap(), hash);
            // The name exists now: nothing is replaced, the temp file is gone.
            let (linked, _) =
                store_streamed(&key, &root, &dest, &name, &file, &path, data.len(), 1).unwrap();
            assert!(!linked);
            assert!(std::fs::read(&dest).unwrap() == raw);
            assert_eq!(std::fs::read_dir(root.join(".tmp")).unwrap().count(), 0);
            // A repeat of the same file is recognised by its plaintext; a file that differs
            // in one byte, or in length, is refused.
            let same = compare_archived(&key, &name, seg, &dest, &file, &path, data.len());
            assert_eq!(same.unwrap(), (PushOutcome::AlreadyArchived, hash));
            let mut other = data.clone();
            other[data.len() / 2] ^= 1;
            for (i, o) in [other, data[..data.len() - 1].to_vec()].iter().enumerate() {
                let p = dir.path().join(format!("other{i}"));
                std::fs::write(&p, o).unwrap();
                let f = std::fs::File::open(&p).unwrap();
                assert!(matches!(
                    compare_archived(&key, &name, seg, &dest, &f, &p, o.len()),
                    Err(BackupError::WalConflict { .. })
                ));
            }
        }
    }
}
