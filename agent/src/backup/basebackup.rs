//! Physical backup of a running PostgreSQL server (full or incremental), without blocking writes.
//!
//! Protocol (PostgreSQL's non-exclusive low-level API, over ONE sqlx connection that stays open
//! for the whole backup — if it drops, the server aborts the backup by itself):
//! ```text
//!  agent                         postgres
//!   | select pg_backup_start(label, fast)  -> start LSN (after a checkpoint)
//!   | walk + chunk + upload the data directory (the server keeps writing; WAL replay
//!   |   from the start LSN repairs torn or stale pages on restore)
//!   | select pg_backup_stop(false)         -> stop LSN, backup_label, tablespace_map
//!   | poll pg_wal/archive_status every 20 ms until the stop segment is archived (the
//!   |   server's own wait polls once a second)
//!   | write the manifest (the backup exists from this moment)
//! ```
//! Incremental: a file whose (size, mtime) equal the parent manifest's entry is not read; its
//! chunk list is reused (mtime is observed before the file is read, and ext4/xfs keep ns
//! mtimes). A changed file is re-chunked and only chunks whose id is new are uploaded, so a
//! one-page update of a big relation file costs one 1 MiB chunk.
//!
//! Cancel safety: cancelling (token or dropping the future) uploads no manifest, so no catalog
//! entry appears; the chunks already uploaded are orphans for `repo prune`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::files::{self, FoundKind};
use super::key::ChunkId;
use super::manifest::{BackupId, BackupKind, BackupStats, Entry, EntryKind, Lsn, Manifest};
use super::repo::{CHUNK_SIZE, ChunkSink, Repository, Stored};
use super::{BackupError, BackupResult, blocking};

/// What to back up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// libpq-style URL of a superuser (or a role with pg_backup_start rights) on the server.
    pub pg_url: String,
    pub data_dir: PathBuf,
    pub kind: BackupKind,
    /// Request an immediate checkpoint (`fast`) rather than a spread one.
    pub fast_checkpoint: bool,
}

struct ChunkJob {
    file: usize,
    index: usize,
    path: Arc<PathBuf>,
    /// The file's chunks need the configured zstd level (see `key::RepoKey::seal_adaptive`).
    poor: Arc<AtomicBool>,
}

/// Take a backup and write its manifest. Returns the manifest.
pub async fn run_backup(
    repo: &Repository,
    opts: &BackupOptions,
    cancel: &CancellationToken,
) -> BackupResult<Manifest> {
    let started_at = chrono::Utc::now();
    // Parent: the latest backup, for the (size, mtime) shortcut and known chunk ids.
    let mut kind = opts.kind;
    let parent = if kind == BackupKind::Incr {
        // Logical dumps and file sets share the repository; only a physical backup can be a
        // parent (ids end with their kind).
        let physical = repo
            .list_backups()
            .await?
            .into_iter()
            .rfind(|id| id.0.ends_with("-full") || id.0.ends_with("-incr"));
        match physical {
            Some(id) => Some(repo.get_manifest(&id).await?),
            None => {
                warn!("no earlier backup to base an incremental on, taking a full backup");
                kind = BackupKind::Full;
                None
            }
        }
    } else {
        None
    };
    let id = BackupId::new(started_at, kind);
    let span = info_span!("backup", backup = %id, kind = %kind);
    async move {
        let mut conn = PgConnection::connect(&opts.pg_url).await?;
        let version: i32 = sqlx::query_scalar("select current_setting('server_version_num')::int")
            .fetch_one(&mut conn)
            .await?;
        let sysid: Option<String> =
            sqlx::query_scalar("select system_identifier::text from pg_control_system()")
                .fetch_optional(&mut conn)
                .await?;
        let label = format!("dr-agent {id}");
        let start_sql = if version >= 150000 {
            "select pg_backup_start($1, $2)::text"
        } else {
            "select pg_start_backup($1, $2, false)::text"
        };
        let start_lsn: String = sqlx::query_scalar(start_sql)
            .bind(&label)
            .bind(opts.fast_checkpoint)
            .fetch_one(&mut conn)
            .await?;
        let start_lsn: Lsn = start_lsn.parse().map_err(BackupError::Invalid)?;
        info!(%start_lsn, "backup started");

        let copied = copy_data_dir(repo, opts, parent.as_ref(), cancel).await;
        let (entries, stats) = match copied {
            Ok(x) => x,
            Err(e) => {
                // Closing the session aborts the non-exclusive backup on the server.
                if let Err(ce) = conn.close().await {
                    warn!(error = %ce, "closing the postgres session after a failed backup");
                }
                return Err(e);
            }
        };

        // Whether the server waits for archiving (PostgreSQL's own rule in pg_backup_stop),
        // and its segment size, asked before the stop while the session is open.
        let (archiving, seg_size): (bool, i64) = sqlx::query_as(
            "select case when pg_is_in_recovery() then current_setting('archive_mode') = 'always' \
             else current_setting('archive_mode') <> 'off' end, \
             (select setting::bigint from pg_settings where name = 'wal_segment_size')",
        )
        .fetch_one(&mut conn)
        .await?;
        // wait_for_archive = false: the server would poll once a second (about half a
        // second lost per backup on average); we poll the same status files every 20 ms.
        let stop_sql = if version >= 150000 {
            "select lsn::text, labelfile, spcmapfile from pg_backup_stop(false)"
        } else {
            "select lsn::text, labelfile, spcmapfile from pg_stop_backup(false, false)"
        };
        let (stop_lsn, backup_label, spcmap): (String, String, Option<String>) =
            sqlx::query_as(stop_sql).fetch_one(&mut conn).await?;
        if let Err(e) = conn.close().await {
            warn!(error = %e, "closing the postgres session");
        }
        let stop_lsn: Lsn = stop_lsn.parse().map_err(BackupError::Invalid)?;
        let timeline = parse_timeline(&backup_label)?;
        if archiving {
            let seg_size = u64::try_from(seg_size)
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| BackupError::Invalid(format!("wal_segment_size {seg_size}")))?;
            wait_archived(&opts.data_dir, timeline, stop_lsn, seg_size, cancel).await?;
        }
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let manifest = Manifest {
            format_version: 1,
            id: id.clone(),
            kind,
            parent: parent.as_ref().map(|p| p.id.clone()),
            label,
            started_at,
            finished_at: chrono::Utc::now(),
            start_lsn,
            stop_lsn,
            timeline,
            pg_version_num: u32::try_from(version).unwrap_or_default(),
            system_identifier: sysid,
            backup_label,
            tablespace_map: spcmap.filter(|s| !s.is_empty()),
            chunk_size: CHUNK_SIZE as u64,
            stats,
            entries,
        };
        repo.put_manifest(&manifest).await?;
        info!(
            %stop_lsn,
            timeline,
            files = manifest.stats.files,
            bytes_total = manifest.stats.bytes_total,
            bytes_read = manifest.stats.bytes_read,
            chunks_new = manifest.stats.chunks_new,
            bytes_added = manifest.stats.bytes_added,
            "backup finished"
        );
        Ok(manifest)
    }
    .instrument(span)
    .await
}

/// Wait until the segment holding the backup's last WAL record is archived, exactly as
/// pg_backup_stop(wait_for_archive => true) decides it (XLogArchiveIsBusy): `.done` means
/// archived; `.ready`, or no status file while the segment is still in pg_wal, means not yet.
async fn wait_archived(
    data_dir: &std::path::Path,
    timeline: u32,
    stop_lsn: Lsn,
    seg_size: u64,
    cancel: &CancellationToken,
) -> BackupResult<()> {
    let seg = stop_lsn.0.saturating_sub(1) / seg_size;
    let per_log = 0x1_0000_0000 / seg_size;
    let name = format!("{timeline:08X}{:08X}{:08X}", seg / per_log, seg % per_log);
    let wal = data_dir.join("pg_wal");
    let status = wal.join("archive_status");
    let exists =
        |p: std::path::PathBuf| async move { tokio::fs::try_exists(p).await.unwrap_or(false) };
    let started = std::time::Instant::now();
    let mut next_warning = std::time::Duration::from_secs(60);
    loop {
        if exists(status.join(format!("{name}.done"))).await {
            return Ok(());
        }
        let busy = exists(status.join(format!("{name}.ready"))).await
            || (!exists(status.join(format!("{name}.done"))).await
                && exists(wal.join(&name)).await);
        if !busy {
            return Ok(());
        }
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        if started.elapsed() > next_warning {
            warn!(segment = %name, waited_s = started.elapsed().as_secs(),
                "still waiting for archive_command to archive the backup's last WAL segment; check the server log");
            next_warning += std::time::Duration::from_secs(60);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `START TIMELINE: 1` from a backup_label.
fn parse_timeline(label: &str) -> BackupResult<u32> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| BackupError::Invalid("backup_label has no START TIMELINE line".into()))
}

async fn copy_data_dir(
    repo: &Repository,
    opts: &BackupOptions,
    parent: Option<&Manifest>,
    cancel: &CancellationToken,
) -> BackupResult<(Vec<Entry>, BackupStats)> {
    let dir = opts.data_dir.clone();
    let found = blocking(move || files::walk(&dir)).await?;

    let parent_files: HashMap<&str, &EntryKind> = parent
        .map(|p| {
            p.entries
                .iter()
                .filter(|e| matches!(e.kind, EntryKind::File { .. }))
                .map(|e| (e.path.as_str(), &e.kind))
                .collect()
        })
        .unwrap_or_default();
    let known: Arc<Mutex<HashSet<ChunkId>>> = Arc::new(Mutex::new(
        parent
            .map(|p| p.chunk_ids().into_iter().collect())
            .unwrap_or_default(),
    ));

    let mut stats = BackupStats::default();
    let mut entries: Vec<Entry> = Vec::with_capacity(found.len());
    // Per file entry index: chunk results (id, len) filled by the upload stream.
    let mut jobs = Vec::new();
    let mut pending: HashMap<usize, Vec<Option<(ChunkId, usize)>>> = HashMap::new();
    for f in found {
        let kind = match f.kind {
            FoundKind::Dir => EntryKind::Dir,
            FoundKind::Symlink { target } => EntryKind::Symlink { target },
            FoundKind::File { size, mtime_ns } => {
                stats.files += 1;
                match parent_files.get(f.rel.as_str()) {
                    Some(EntryKind::File {
                        size: ps,
                        mtime_ns: pm,
                        chunks,
                    }) if *ps == size && *pm == mtime_ns => {
                        stats.bytes_total += size;
                        EntryKind::File {
                            size,
                            mtime_ns,
                            chunks: chunks.clone(),
                        }
                    }
                    _ => {
                        let n = usize::try_from(size.div_ceil(CHUNK_SIZE as u64))
                            .map_err(|_| BackupError::Invalid("file too large".into()))?;
                        let path = Arc::new(f.abs.clone());
                        let poor = Arc::new(AtomicBool::new(false));
                        let file = entries.len();
                        pending.insert(file, vec![None; n]);
                        for index in 0..n {
                            jobs.push(ChunkJob {
                                file,
                                index,
                                path: path.clone(),
                                poor: poor.clone(),
                            });
                        }
                        EntryKind::File {
                            size,
                            mtime_ns,
                            chunks: Vec::new(),
                        }
                    }
                }
            }
        };
        entries.push(Entry {
            path: f.rel,
            mode: f.mode,
            kind,
        });
    }

    // Pipeline: `concurrency` chunks in flight, each one blocking step (read, hash, skip if
    // known, compress, encrypt, write) on the blocking pool, so the two cores do nothing but
    // that work; memory is bounded by `concurrency` x (chunk + sealed chunk).
    let sink = Arc::new(ChunkSink::new(repo));
    let concurrency = repo.config().concurrency;
    let mut results = futures::stream::iter(jobs)
        .map(|job| {
            let known = known.clone();
            let sink = sink.clone();
            async move {
                if cancel.is_cancelled() {
                    return Err(BackupError::Cancelled);
                }
                let path = job.path.clone();
                let poor = job.poor.clone();
                let offset = (job.index * CHUNK_SIZE) as u64;
                let k = repo.key().clone();
                let sk = sink.clone();
                let r = blocking(move || {
                    READ_BUF.with(|b| {
                        let mut buf = b.borrow_mut();
                        let data = read_chunk(&path, offset, &mut buf)?;
                        if data.is_empty() {
                            return Ok(None);
                        }
                        let id = k.hash(data);
                        // Known: in the parent, or stored earlier in this run; then no
                        // storage round trip at all.
                        let is_known = known.lock().map(|s| s.contains(&id)).unwrap_or(false);
                        let stored = sk.put_blocking(id, data, is_known, &poor)?;
                        if let Ok(mut s) = known.lock() {
                            s.insert(id);
                        }
                        Ok(Some((id, data.len(), stored)))
                    })
                })
                .await?;
                let r = match r {
                    None => None,
                    Some((id, len, Stored::Skipped)) => Some((id, len, None)),
                    Some((id, len, Stored::Written(n))) => Some((id, len, Some(n))),
                    Some((id, len, Stored::Upload(name, sealed))) => {
                        Some((id, len, sink.upload(&name, sealed).await?))
                    }
                };
                Ok((job, r))
            }
        })
        .buffer_unordered(concurrency);

    while let Some((job, r)) = results.try_next().await? {
        let Some((id, len, stored)) = r else { continue };
        stats.bytes_read += len as u64;
        if let Some(s) = stored {
            stats.chunks_new += 1;
            stats.bytes_added += s;
        }
        if let Some(v) = pending.get_mut(&job.file) {
            v[job.index] = Some((id, len));
        }
    }
    drop(results);
    // Every chunk durable before the caller writes the manifest.
    let s = sink.clone();
    blocking(move || s.finish_blocking()).await?;

    // Assemble chunk lists; a file truncated while we read it ends at its first short chunk.
    for (file, chunks) in pending {
        let mut ids = Vec::with_capacity(chunks.len());
        let mut size = 0u64;
        for c in chunks {
            let Some((id, len)) = c else { break };
            ids.push(id);
            size += len as u64;
            if len < CHUNK_SIZE {
                break;
            }
        }
        stats.bytes_total += size;
        if let EntryKind::File {
            size: s, chunks, ..
        } = &mut entries[file].kind
        {
            *s = size;
            *chunks = ids;
        }
    }
    stats.chunks_total = entries
        .iter()
        .map(|e| match &e.kind {
            EntryKind::File { chunks, .. } => chunks.len() as u64,
            _ => 0,
        })
        .sum();
    Ok((entries, stats))
}

thread_local! {
    /// One chunk buffer per backup worker thread, reused (a fresh zeroed 1 MiB per chunk
    /// cost a page-fault storm or a memset each time).
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Read up to one chunk at `offset` into `buf`; a vanished file reads as empty (WAL replay
/// recreates or drops it).
fn read_chunk<'a>(
    path: &std::path::Path,
    offset: u64,
    buf: &'a mut Vec<u8>,
) -> BackupResult<&'a [u8]> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(&[]),
        Err(e) => return Err(BackupError::io(format!("open {}", path.display()), e)),
    };
    if buf.len() != CHUNK_SIZE {
        buf.resize(CHUNK_SIZE, 0);
    }
    let mut filled = 0;
    while filled < CHUNK_SIZE {
        match f.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BackupError::io(format!("read {}", path.display()), e)),
        }
    }
    Ok(&buf[..filled])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_timeline_from_label() {
        let l =
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTART TIMELINE: 3\n";
        assert_eq!(parse_timeline(l).unwrap(), 3);
        assert!(parse_timeline("nothing").is_err());
    }
}
