//! `dr-agent wal-fetch %f %p`: PostgreSQL's `restore_command`.
//!
//! Contract: exit 0 with the file at `%p`, or non-zero when it does not exist — PostgreSQL
//! asks for files past the end of the archive (and for history files of future timelines) as a
//! matter of course, so "not found" is quiet and not an error.
//!
//! Prefetch: replay asks for segments one at a time, one process each. When a spool directory
//! is configured, a miss fetches the requested segment *and* the next `wal_prefetch` ones
//! concurrently, verified, into the spool (temp name + rename, so a half-written spool file is
//! never used); later calls are a rename. Spool files older than the requested one are
//! removed. Next-segment names assume 16 MiB segments; another size only costs misses.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tracing::{debug, warn};

use super::repo::{MAX_WAL_SIZE, Repository};
use super::wal_push::wal_object_name;
use super::{BackupError, BackupResult, blocking};

/// Fetch one WAL file into `dest`. Returns false when the archive has no such file.
pub async fn wal_fetch(repo: &Repository, file_name: &str, dest: &Path) -> BackupResult<bool> {
    let name = wal_object_name(file_name)?;
    let spool = repo.config().spool_dir.clone();
    if let Some(spool) = &spool {
        let spooled = spool.join(file_name);
        match tokio::fs::rename(&spooled, dest).await {
            Ok(()) => {
                debug!(wal = file_name, "served from the prefetch spool");
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => {
                // Other filesystem: copy, then drop the spool copy.
                tokio::fs::copy(&spooled, dest).await.map_err(|e| {
                    BackupError::io(
                        format!("copy {} to {}", spooled.display(), dest.display()),
                        e,
                    )
                })?;
                let _ignored = tokio::fs::remove_file(&spooled).await;
                return Ok(true);
            }
        }
    }
    let prefetch = match (&spool, next_segments(file_name, repo.config().wal_prefetch)) {
        (Some(spool), Some(names)) if !names.is_empty() => Some((spool.clone(), names)),
        _ => None,
    };
    let (found, prefetched) = tokio::join!(fetch_to(repo, &name, dest), async {
        match &prefetch {
            Some((spool, names)) => prefetch_into(repo, spool, names).await,
            None => Ok(()),
        }
    });
    if let Err(e) = prefetched {
        warn!(error = %e, "wal prefetch failed; replay continues without it");
    }
    if let Some((spool, _)) = &prefetch {
        clean_spool(spool, file_name).await;
    }
    found
}

async fn fetch_to(repo: &Repository, name: &str, dest: &Path) -> BackupResult<bool> {
    let Some(raw) = repo.get_raw(name).await? else {
        return Ok(false);
    };
    let key = repo.key().clone();
    let n = name.to_string();
    let dest = dest.to_path_buf();
    blocking(move || {
        let (plain, _) = key.open(&n, raw, MAX_WAL_SIZE)?;
        std::fs::write(&dest, &plain)
            .map_err(|e| BackupError::io(format!("write {}", dest.display()), e))
    })
    .await?;
    Ok(true)
}

async fn prefetch_into(repo: &Repository, spool: &Path, names: &[String]) -> BackupResult<()> {
    tokio::fs::create_dir_all(spool)
        .await
        .map_err(|e| BackupError::io(format!("create spool {}", spool.display()), e))?;
    let results: Vec<BackupResult<()>> = futures::stream::iter(names.iter())
        .map(|n| async move {
            let target = spool.join(n);
            if tokio::fs::try_exists(&target).await.unwrap_or(false) {
                return Ok(());
            }
            let tmp = spool.join(format!("{n}.tmp"));
            if fetch_to(repo, &wal_object_name(n)?, &tmp).await? {
                tokio::fs::rename(&tmp, &target)
                    .await
                    .map_err(|e| BackupError::io(format!("rename {}", tmp.display()), e))?;
            }
            Ok(())
        })
        .buffer_unordered(repo.config().concurrency)
        .collect()
        .await;
    results.into_iter().collect()
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
