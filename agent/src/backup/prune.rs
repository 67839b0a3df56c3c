//! Delete chunks no manifest references (orphans of failed or interrupted backups, or of
//! backups whose manifests retention removed).
//!
//! Invariant: never delete what a live backup needs. The referenced set is computed from
//! *every* manifest; if any manifest cannot be read, prune stops without deleting anything.
//! A backup that is running has no manifest yet, so chunks younger than `grace` are kept.
//!
//! WAL retention ([`prune_wal`]): a physical backup restores from its start LSN onwards, so
//! the oldest retained physical backup's start segment is the cut-off. A WAL object whose
//! segment number is below the smallest start segment of ALL physical backups is needed by
//! none of them, on any timeline (a timeline's segments after a fork continue the numbering;
//! a backup taken on timeline N needs segments ≥ its start on N and on the timelines that
//! fork from N later, never a lower number). `.history` files are always kept (tiny, and
//! recovery needs every one of them to choose a timeline). Without any physical backup
//! nothing is deleted: an archive with no base backup is not ours to judge. A backup that is
//! running starts after every existing one, so its WAL is above the cut-off.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;
use tracing::info;

use super::BackupResult;
use super::key::ChunkId;
use super::repo::Repository;

#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub referenced: u64,
    pub orphans: u64,
    pub deleted: u64,
    pub kept_young: u64,
}

/// What [`prune_wal`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalPruneReport {
    /// The first segment kept (timeline ignored: `<segment number>` as 16 hex digits), empty
    /// when there is no physical backup and nothing was deleted.
    pub keep_from: String,
    pub deleted: u64,
    pub kept: u64,
}

/// Segment number (log * 0x100 + seg for 16 MiB segments) of a WAL object name:
/// `TTTTTTTTLLLLLLLLSSSSSSSS` or `...SSSSSSSS.XXXXXXXX.backup` / `.partial`; `None` for
/// history files and anything else.
pub fn segment_number(name: &str) -> Option<u64> {
    let base = name.get(..24)?;
    if !base.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let rest = &name[24..];
    if !(rest.is_empty() || rest.ends_with(".backup") || rest.ends_with(".partial")) {
        return None;
    }
    let log = u64::from_str_radix(&base[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&base[16..24], 16).ok()?;
    Some(log * 0x100 + seg)
}

/// The segment number holding `lsn` (16 MiB segments).
pub fn lsn_segment(lsn: super::manifest::Lsn) -> u64 {
    lsn.0 / (16 << 20)
}

/// Delete archived WAL no physical backup needs (see the module docs).
pub async fn prune_wal(repo: &Repository, dry_run: bool) -> BackupResult<WalPruneReport> {
    let manifests = repo.list_manifests().await?;
    let Some(cut) = manifests
        .iter()
        .filter(|m| m.kind.is_physical())
        .map(|m| lsn_segment(m.start_lsn))
        .min()
    else {
        info!("no physical backup: archived WAL is kept");
        return Ok(WalPruneReport::default());
    };
    let mut report = WalPruneReport {
        keep_from: format!("{cut:016X}"),
        ..Default::default()
    };
    for e in repo.list_objects("wal/").await? {
        match segment_number(e.name()) {
            Some(n) if n < cut => {
                if !dry_run {
                    repo.operator().delete(e.path()).await?;
                }
                report.deleted += 1;
            }
            _ => report.kept += 1,
        }
    }
    info!(
        keep_from = %report.keep_from,
        deleted = report.deleted,
        kept = report.kept,
        "WAL prune finished"
    );
    Ok(report)
}

pub async fn prune(repo: &Repository, grace: Duration, dry_run: bool) -> BackupResult<PruneReport> {
    let mut live: HashSet<ChunkId> = HashSet::new();
    for m in repo.list_manifests().await? {
        live.extend(m.chunk_ids());
    }
    let mut report = PruneReport {
        referenced: live.len() as u64,
        ..Default::default()
    };
    let now = chrono::Utc::now();
    for e in repo.list_objects("data/").await? {
        let Some(id) = e.name().parse::<ChunkId>().ok() else {
            continue;
        };
        if live.contains(&id) {
            continue;
        }
        report.orphans += 1;
        let modified = match e.metadata().last_modified() {
            Some(t) => Some(t),
            None => repo.operator().stat(e.path()).await?.last_modified(),
        };
        let young = modified.is_some_and(|t| {
            let age = now
                .signed_duration_since(t)
                .to_std()
                .unwrap_or(Duration::ZERO);
            age < grace
        });
        if young {
            report.kept_young += 1;
            continue;
        }
        if !dry_run {
            repo.operator().delete(e.path()).await?;
            report.deleted += 1;
        }
    }
    info!(
        referenced = report.referenced,
        orphans = report.orphans,
        deleted = report.deleted,
        "prune finished"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_segment_numbers() {
        assert_eq!(segment_number("000000010000000000000002"), Some(2));
        assert_eq!(segment_number("0000000200000001000000FF"), Some(0x1ff));
        assert_eq!(
            segment_number("000000010000000000000002.00000028.backup"),
            Some(2)
        );
        assert_eq!(segment_number("00000002.history"), None);
        assert_eq!(segment_number("000000010000000000000002.tmp"), None);
        assert_eq!(lsn_segment("1/2A000028".parse().unwrap()), 0x12a);
    }
}
