//! `dr-agent wal-fetch %f %p`: PostgreSQL's `restore_command`.
//!
//! Contract: exit 0 with the file at `%p`, or non-zero when it does not exist — PostgreSQL
//! asks for files past the end of the archive (and for history files of future timelines) as a
//! matter of course, so "not found" is quiet and not an error.
//!
//! Prefetch (why: replay asks for segments one at a time, one process each, and waits for
//! every answer; a storage round trip per segment would stall replay). When a spool directory
//! is configured, every call makes sure a *background* prefetcher is filling the spool with
//! the next `wal_prefetch` segments (verified, temp name + `fdatasync` + rename, so a
//! half-written spool file is never used and PostgreSQL's own fsync of it finds nothing left
//! to write), and returns at once: a hit is a rename; a call whose segment the prefetcher is
//! writing waits for it; a miss (replay start, or replay overtook the prefetcher) starts the
//! prefetcher and fetches only the requested segment.
//!
//! CPU is the constraint (measured on 2 cores): preparing a segment (decrypt, decompress,
//! hash, 16 MiB into the page cache) costs about as much CPU as replaying it, so the
//! prefetcher runs niced, at most [`PREFETCH_PARALLEL`] segments at once, and never fetches a
//! segment twice when it can be waited for.
//!
//! The prefetcher is this same program started detached with `DR_WAL_PREFETCH=1` (one at a
//! time: `flock` on `<spool>/.prefetch.lock`). Every wal-fetch writes the segment replay asked
//! for to `<spool>/.position`; the prefetcher keeps the `wal_prefetch` segments after it
//! spooled, a few at a time, and exits at the end of the archive or after 5 s without
//! progress, so it never outlives a recovery by more than that, and the spool never holds more
//! than the window (bounded cache). Spool files older than the requested one are removed.
//! Next-segment names assume 16 MiB segments; another size only costs misses. Spooled content
//! is what the archive holds under that name, and an archived name never changes content
//! (wal-push refuses that), so a spool file is never stale.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tracing::{debug, warn};

use super::repo::{MAX_WAL_SIZE, Repository};
use super::repo_config::RepoConfig;
use super::wal_push::wal_object_name;
use super::{BackupError, BackupResult, blocking};

/// Environment variable that turns a `wal-fetch` process into the background prefetcher.
pub const PREFETCH_ENV: &str = "DR_WAL_PREFETCH";
const LOCK_FILE: &str = ".prefetch.lock";
const POSITION_FILE: &str = ".position";
/// The prefetcher exits after this long without replay progress.
const IDLE_EXIT: std::time::Duration = std::time::Duration::from_secs(5);
const POLL: std::time::Duration = std::time::Duration::from_millis(20);
/// How long a wal-fetch waits for a segment the prefetcher is writing before fetching it
/// itself, and how often it looks.
const IN_PROGRESS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const IN_PROGRESS_POLL: std::time::Duration = std::time::Duration::from_millis(2);
/// Segments the background prefetcher fetches at once, at most: each one is decrypt +
/// decompress + hash + 16 MiB written, about as much CPU as replaying it, and replay itself
/// needs a core; more in parallel only takes that core from PostgreSQL's startup process.
const PREFETCH_PARALLEL: usize = 2;
/// The prefetcher runs at this niceness (through `nice`, when installed): when it and
/// PostgreSQL's startup process want the same core, replay goes first.
const PREFETCH_NICE: &str = "10";
const NICE: &str = "/usr/bin/nice";

/// Fetch one WAL file into `dest`. Returns false when the archive has no such file.
pub async fn wal_fetch(repo: &Repository, file_name: &str, dest: &Path) -> BackupResult<bool> {
    let name = wal_object_name(file_name)?;
    let spool = repo.config().spool_dir.clone();
    let window = next_segments(file_name, repo.config().wal_prefetch).unwrap_or_default();
    if let Some(spool) = &spool
        && std::env::var_os(PREFETCH_ENV).is_some()
    {
        // We are the background prefetcher started by another wal-fetch.
        prefetch_window(repo, spool, file_name, &window).await;
        return Ok(true);
    }
    if let Some(spool) = &spool {
        let spooled = spool.join(file_name);
        let hit = match tokio::fs::rename(&spooled, dest).await {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(_) => {
                // Other filesystem: copy, then drop the spool copy.
                tokio::fs::copy(&spooled, dest).await.map_err(|e| {
                    BackupError::io(
                        format!("copy {} to {}", spooled.display(), dest.display()),
                        e,
                    )
                })?;
                let _ignored = tokio::fs::remove_file(&spooled).await;
                true
            }
        };
        record_position(spool, file_name);
        if hit {
            debug!(wal = file_name, "served from the prefetch spool");
            kick_prefetcher(spool, &window);
            return Ok(true);
        }
        // A miss (replay start, or replay overtook the prefetcher): the background prefetcher
        // starts on the window first, so it works on another core while this call fetches
        // only the segment replay waits for (fetching the window here too made the first
        // call of a recovery wait for wal_prefetch + 1 segments).
        debug!(wal = file_name, "not in the prefetch spool: fetching it");
        kick_prefetcher(spool, &window);
        let found = fetch_to(repo, &name, dest, false).await;
        clean_spool(spool, file_name).await;
        return found;
    }
    fetch_to(repo, &name, dest, false).await
}

/// The spool hit, before any runtime or repository is opened (the spool holds only verified
/// segments, so a hit needs neither the key nor the location): rename the spooled file to
/// `dest`, record replay's position and make sure a prefetcher runs. Ok(false): not spooled
/// (or no spool configured, or we are the prefetcher), the caller takes the full path.
pub fn wal_fetch_spooled(cfg: &RepoConfig, file_name: &str, dest: &Path) -> BackupResult<bool> {
    let Some(spool) = &cfg.spool_dir else {
        return Ok(false);
    };
    if std::env::var_os(PREFETCH_ENV).is_some() {
        return Ok(false);
    }
    wal_object_name(file_name)?;
    let spooled = spool.join(file_name);
    let deadline = std::time::Instant::now() + IN_PROGRESS_WAIT;
    loop {
        match std::fs::rename(&spooled, dest) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The prefetcher may be writing this very segment: waiting for its rename
                // costs less than fetching the segment a second time, on the same cores.
                if std::time::Instant::now() < deadline && being_prefetched(spool, file_name) {
                    std::thread::sleep(IN_PROGRESS_POLL);
                    continue;
                }
                return Ok(false);
            }
            // Another filesystem (EXDEV): the async path copies.
            Err(_) => return Ok(false),
        }
    }
    record_position(spool, file_name);
    let window = next_segments(file_name, cfg.wal_prefetch).unwrap_or_default();
    kick_prefetcher(spool, &window);
    debug!(wal = file_name, "served from the prefetch spool");
    Ok(true)
}

/// Whether a running prefetcher is writing `file_name` now: its temp file exists and the
/// prefetch lock is held (a temp file left by a killed prefetcher does not count).
fn being_prefetched(spool: &Path, file_name: &str) -> bool {
    let writing = std::fs::read_dir(spool).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with(file_name) && n.ends_with(".tmp")
        })
    });
    writing && matches!(try_lock(spool), Ok(None))
}

/// Tell the prefetcher where replay is (temp file + rename: it never reads half a name).
fn record_position(spool: &Path, file_name: &str) {
    if next_segments(file_name, 1).is_none() {
        return;
    }
    let tmp = spool.join(format!("{POSITION_FILE}.{}", std::process::id()));
    let r = std::fs::write(&tmp, file_name)
        .and_then(|()| std::fs::rename(&tmp, spool.join(POSITION_FILE)));
    if let Err(e) = r {
        debug!(error = %e, "recording the replay position for the prefetcher");
        let _ignored = std::fs::remove_file(&tmp);
    }
}

/// Start the background prefetcher unless the window is spooled or one is running.
fn kick_prefetcher(spool: &Path, window: &[String]) {
    if window.is_empty() || window.iter().all(|n| spool.join(n).exists()) {
        return;
    }
    if let Err(e) = std::fs::create_dir_all(spool) {
        warn!(error = %e, spool = %spool.display(), "cannot create the wal prefetch spool");
        return;
    }
    match try_lock(spool) {
        Ok(Some(lock)) => drop(lock), // free: the child takes it (a race only costs a miss)
        Ok(None) => return,           // a prefetcher is running
        Err(e) => {
            warn!(error = %e, "wal prefetch lock");
            return;
        }
    }
    let exe = match std::env::current_exe() {
        // Only the dr-agent program can be the prefetcher (not a test binary calling in).
        Ok(exe) if exe.file_name().is_some_and(|n| n == "dr-agent") => exe,
        _ => return,
    };
    let spawn = {
        use std::os::unix::process::CommandExt;
        let mut c = if Path::new(NICE).is_file() {
            let mut c = std::process::Command::new(NICE);
            c.args(["-n", PREFETCH_NICE]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        };
        c.args(std::env::args_os().skip(1))
            .env(PREFETCH_ENV, "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Own process group: PostgreSQL's signals to the restore_command do not reach it.
            .process_group(0)
            .spawn()
    };
    if let Err(e) = spawn {
        warn!(error = %e, "cannot start the wal prefetcher; replay continues without it");
    }
}

fn try_lock(spool: &Path) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    try_lock_file(&spool.join(LOCK_FILE))
}

/// A non-blocking exclusive `flock` on `path` (created if absent); None when it is held.
pub(crate) fn try_lock_file(
    path: &Path,
) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// The prefetcher's work: keep the window ahead of replay full. Replay's position comes from
/// `<spool>/.position` (written by every wal-fetch); the loop ends at the end of the archive
/// (a segment not found: the next wal-fetch starts a new prefetcher if more WAL arrives), or
/// after [`IDLE_EXIT`] without progress (replay finished or stopped), so it never outlives a
/// recovery by more than that.
async fn prefetch_window(repo: &Repository, spool: &Path, current: &str, window: &[String]) {
    let lock = match try_lock(spool) {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(e) => {
            warn!(error = %e, "wal prefetch lock");
            return;
        }
    };
    let n = window.len();
    let mut pos = current.to_string();
    let mut window = window.to_vec();
    let mut last_progress = std::time::Instant::now();
    loop {
        let missing: Vec<String> = window
            .iter()
            .filter(|w| !spool.join(w).exists())
            .cloned()
            .collect();
        if !missing.is_empty() {
            match prefetch_into(repo, spool, &missing).await {
                Ok(true) => {}
                Ok(false) => break, // end of the archive
                Err(e) => {
                    warn!(error = %e, "wal prefetch failed; replay continues without it");
                    break;
                }
            }
        }
        tokio::time::sleep(POLL).await;
        let newer = std::fs::read_to_string(spool.join(POSITION_FILE))
            .ok()
            .filter(|p| p.len() == 24 && p[..8] == pos[..8] && **p > *pos);
        match newer.and_then(|p| next_segments(&p, n).map(|w| (p, w))) {
            Some((p, w)) => {
                clean_spool(spool, &p).await;
                pos = p;
                window = w;
                last_progress = std::time::Instant::now();
            }
            None if last_progress.elapsed() > IDLE_EXIT => break,
            None => {}
        }
    }
    drop(lock);
}

/// Fetch, verify and write one object to `dest`. `durable`: `fdatasync` before returning
/// (spool files, see [`prefetch_into`]; a file for PostgreSQL's `%p` is synced by
/// PostgreSQL itself).
async fn fetch_to(repo: &Repository, name: &str, dest: &Path, durable: bool) -> BackupResult<bool> {
    let Some(raw) = repo.get_raw(name).await? else {
        return Ok(false);
    };
    let key = repo.key().clone();
    let n = name.to_string();
    let dest = dest.to_path_buf();
    blocking(move || {
        use std::io::Write as _;
        let (plain, _) = key.open(&n, raw, MAX_WAL_SIZE)?;
        let io = |e| BackupError::io(format!("write {}", dest.display()), e);
        let mut f = std::fs::File::create(&dest).map_err(io)?;
        f.write_all(&plain).map_err(io)?;
        if durable {
            f.sync_data().map_err(io)?;
        }
        Ok(())
    })
    .await?;
    Ok(true)
}

/// Fetch `names` into the spool, `concurrency` (at most [`PREFETCH_PARALLEL`]) at a time.
/// Ok(false) if any is not archived.
///
/// Each spool file is on disk (`fdatasync`) before it gets its name: PostgreSQL fsyncs every
/// restored segment (`durable_rename` when it keeps the file in pg_wal), and a spool file
/// still dirty in the page cache made replay's startup process wait for its 16 MiB to be
/// written; done here, that write happens in the background, ahead of replay.
async fn prefetch_into(repo: &Repository, spool: &Path, names: &[String]) -> BackupResult<bool> {
    tokio::fs::create_dir_all(spool)
        .await
        .map_err(|e| BackupError::io(format!("create spool {}", spool.display()), e))?;
    let results: Vec<BackupResult<bool>> = futures::stream::iter(names.iter())
        .map(|n| async move {
            let target = spool.join(n);
            if tokio::fs::try_exists(&target).await.unwrap_or(false) {
                return Ok(true);
            }
            // Per-process temp name, `<segment>.<pid>.tmp`: a wal-fetch that finds it (and
            // the prefetch lock held) waits for the rename instead of fetching it again.
            let tmp = spool.join(format!("{n}.{}.tmp", std::process::id()));
            if !fetch_to(repo, &wal_object_name(n)?, &tmp, true).await? {
                return Ok(false);
            }
            tokio::fs::rename(&tmp, &target)
                .await
                .map_err(|e| BackupError::io(format!("rename {}", tmp.display()), e))?;
            Ok(true)
        })
        .buffer_unordered(repo.config().concurrency.min(PREFETCH_PARALLEL))
        .collect()
        .await;
    let mut all = true;
    for r in results {
        all &= r?;
    }
    Ok(all)
}

/// Remove spool files that sort before `current` (already replayed or skipped).
async fn clean_spool(spool: &Path, current: &str) {
    let Ok(mut rd) = tokio::fs::read_dir(spool).await else {
        return;
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.len() >= 24 && n[..24] < *current && n[..8] == current[..8] {
            let p: PathBuf = e.path();
            let _ignored = tokio::fs::remove_file(p).await;
        }
    }
}

/// The `n` segment names after `name` (16 MiB segments); None for non-segment names.
pub fn next_segments(name: &str, n: usize) -> Option<Vec<String>> {
    if name.len() != 24 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let tl = &name[..8];
    let log = u32::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u32::from_str_radix(&name[16..24], 16).ok()?;
    let mut pos = u64::from(log) * 256 + u64::from(seg);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        pos += 1;
        out.push(format!("{tl}{:08X}{:08X}", pos / 256, pos % 256));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_next_segments() {
        assert_eq!(
            next_segments("0000000100000000000000FE", 3).unwrap(),
            vec![
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000010000000100000001"
            ]
        );
        assert!(next_segments("00000002.history", 3).is_none());
    }
}
