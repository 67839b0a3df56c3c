//! Read objects back and name every one that is missing or corrupt.
//!
//! Why: a backup nobody has read back is a hope, not a backup. Verification downloads each
//! object, authenticates and decrypts it, decompresses it and re-hashes it (a chunk's hash
//! must equal its id), exactly as a restore would, without writing anything.
//!
//! WAL chain: a physical backup is only consistent with every WAL segment from its start to
//! its stop LSN (on its timeline), and point-in-time recovery past it needs every segment
//! after that. So verify also names each segment a verified physical backup needs and the
//! archive lacks, and, with `include_wal`, each gap inside the archived range of a timeline
//! (from the oldest physical backup's start segment on).

use std::collections::BTreeSet;

use futures::StreamExt;
use serde::Serialize;
use tracing::{info, warn};

use super::key::ChunkId;
use super::manifest::{BackupId, Manifest};
use super::prune::{lsn_segment, segment_number};
use super::repo::{MAX_WAL_SIZE, Repository};
use super::{BackupError, BackupResult, blocking};

/// One object that failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Object name in the repository, e.g. `data/ab/ab12…`.
    pub object: String,
    /// `missing` or `corrupt`.
    pub status: &'static str,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub backups: Vec<BackupId>,
    pub objects_checked: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn problem(object: String, e: &BackupError) -> Problem {
    let status = match e {
        BackupError::NotFound { .. } => "missing",
        _ => "corrupt",
    };
    Problem {
        object,
        status,
        reason: e.to_string(),
    }
}

/// Verify the given backups (their manifests and every chunk they reference); with
/// `include_wal`, also every archived WAL object.
pub async fn verify(
    repo: &Repository,
    ids: &[BackupId],
    include_wal: bool,
) -> BackupResult<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut chunks: BTreeSet<ChunkId> = BTreeSet::new();
    let mut physical: Vec<Manifest> = Vec::new();
    for id in ids {
        report.objects_checked += 1;
        match repo.get_manifest(id).await {
            Ok(m) => {
                chunks.extend(m.chunk_ids());
                if m.kind.is_physical() {
                    // Keep what the WAL check needs, not the file list.
                    physical.push(Manifest {
                        entries: Vec::new(),
                        ..m
                    });
                }
            }
            Err(e @ (BackupError::NotFound { .. } | BackupError::Corrupt { .. })) => {
                report.problems.push(problem(format!("backups/{id}"), &e));
            }
            Err(e) => return Err(e),
        }
        report.backups.push(id.clone());
    }
    let conc = repo.config().concurrency;
    let results: Vec<(String, BackupResult<()>)> = futures::stream::iter(chunks)
        .map(|c| async move { (c.object_name(), repo.get_chunk(c).await.map(drop)) })
        .buffer_unordered(conc)
        .collect()
        .await;
    for (name, r) in results {
        report.objects_checked += 1;
        match r {
            Ok(()) => {}
            Err(e @ (BackupError::NotFound { .. } | BackupError::Corrupt { .. })) => {
                report.problems.push(problem(name, &e))
            }
            Err(e) => return Err(e),
        }
    }
    if include_wal {
        let names: Vec<String> = repo
            .list_objects("wal/")
            .await?
            .into_iter()
            .map(|e| e.path().to_string())
            .collect();
        let results: Vec<(String, BackupResult<()>)> = futures::stream::iter(names)
            .map(|n| async move {
                let r = async {
                    let raw = repo
                        .get_raw(&n)
                        .await?
                        .ok_or_else(|| BackupError::NotFound { key: n.clone() })?;
                    let key = repo.key().clone();
                    let n2 = n.clone();
                    blocking(move || key.open(&n2, raw, MAX_WAL_SIZE).map(drop)).await
                }
                .await;
                (n, r)
            })
            .buffer_unordered(conc)
            .collect()
            .await;
        for (name, r) in results {
            report.objects_checked += 1;
            if let Err(e) = r {
                report.problems.push(problem(name, &e));
            }
        }
    }
    if include_wal || !physical.is_empty() {
        let mut oldest = physical.clone();
        if include_wal {
            // The chain starts at the oldest physical backup of the repository.
            for id in repo.list_backups().await? {
                if id.0.ends_with("-full") || id.0.ends_with("-incr") {
                    if let Ok(m) = repo.get_manifest(&id).await {
                        oldest.push(Manifest {
                            entries: Vec::new(),
                            ..m
                        });
                    }
                    break;
                }
            }
        }
        let archived = archived_segments(repo).await?;
        report.problems.extend(wal_chain_problems(
            &archived,
            &physical,
            &oldest,
            include_wal,
        ));
    }
    report.problems.sort_by(|a, b| a.object.cmp(&b.object));
    for p in &report.problems {
        warn!(object = %p.object, status = p.status, reason = %p.reason, "verify found a bad object");
    }
    info!(
        objects = report.objects_checked,
        problems = report.problems.len(),
        "verify finished"
    );
    Ok(report)
}

/// Archived segment numbers per timeline (history and other files left out).
async fn archived_segments(
    repo: &Repository,
) -> BackupResult<std::collections::BTreeMap<u32, BTreeSet<u64>>> {
    let mut out: std::collections::BTreeMap<u32, BTreeSet<u64>> = Default::default();
    for e in repo.list_objects("wal/").await? {
        let name = e.name();
        if name.len() != 24 {
            continue;
        }
        let (Some(n), Ok(tl)) = (segment_number(name), u32::from_str_radix(&name[..8], 16)) else {
            continue;
        };
        out.entry(tl).or_default().insert(n);
    }
    Ok(out)
}

fn seg_name(tl: u32, n: u64) -> String {
    format!("{tl:08X}{:08X}{:08X}", n / 0x100, n % 0x100)
}

/// Segments `backups` need (start..=stop on their timeline) that are not archived, and with
/// `gaps`, holes inside each timeline's archived range from the oldest backup's start on.
fn wal_chain_problems(
    archived: &std::collections::BTreeMap<u32, BTreeSet<u64>>,
    backups: &[Manifest],
    oldest: &[Manifest],
    gaps: bool,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut named = BTreeSet::new();
    let empty = BTreeSet::new();
    for m in backups {
        let have = archived.get(&m.timeline).unwrap_or(&empty);
        for n in lsn_segment(m.start_lsn)..=lsn_segment(m.stop_lsn) {
            if !have.contains(&n) && named.insert((m.timeline, n)) {
                out.push(Problem {
                    object: format!("wal/{:08X}/{}", m.timeline, seg_name(m.timeline, n)),
                    status: "missing",
                    reason: format!(
                        "WAL segment needed by backup {} ({}..{}) is not archived; the backup cannot be restored without it",
                        m.id, m.start_lsn, m.stop_lsn
                    ),
                });
            }
        }
    }
    if gaps {
        let from = oldest.iter().map(|m| lsn_segment(m.start_lsn)).min();
        for (tl, segs) in archived {
            let mut in_range = segs
                .iter()
                .copied()
                .filter(|n| from.is_none_or(|f| *n >= f));
            let Some(first) = in_range.next() else {
                continue;
            };
            let mut prev = first;
            for n in in_range {
                for missing in prev + 1..n {
                    if named.insert((*tl, missing)) {
                        out.push(Problem {
                            object: format!("wal/{tl:08X}/{}", seg_name(*tl, missing)),
                            status: "missing",
                            reason: format!(
                                "gap in the WAL archive of timeline {tl}: {} and {} are archived, this one is not (recovery cannot pass it)",
                                seg_name(*tl, prev),
                                seg_name(*tl, n)
                            ),
                        });
                    }
                }
                prev = n;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::{BackupKind, BackupStats, Lsn};

    fn m(id: &str, tl: u32, start: u64, stop: u64) -> Manifest {
        Manifest {
            format_version: 1,
            id: BackupId(id.into()),
            kind: BackupKind::Full,
            parent: None,
            label: String::new(),
            started_at: chrono::Utc::now(),
            finished_at: chrono::Utc::now(),
            start_lsn: Lsn(start << 24),
            stop_lsn: Lsn((stop << 24) + 40),
            timeline: tl,
            pg_version_num: 150000,
            system_identifier: None,
            backup_label: String::new(),
            tablespace_map: None,
            chunk_size: 1 << 20,
            stats: BackupStats::default(),
            entries: Vec::new(),
        }
    }

    #[test]
    fn t10_wal_chain() {
        let mut archived: std::collections::BTreeMap<u32, BTreeSet<u64>> = Default::default();
        archived.insert(1, [1, 2, 3, 5, 6].into_iter().collect());
        archived.insert(2, [6, 7, 9].into_iter().collect());
        let b = m("b1", 1, 2, 4);
        let p = wal_chain_problems(
            &archived,
            std::slice::from_ref(&b),
            std::slice::from_ref(&b),
            false,
        );
        let names: Vec<&str> = p.iter().map(|p| p.object.as_str()).collect();
        assert_eq!(names, vec!["wal/00000001/000000010000000000000004"]);
        let p = wal_chain_problems(&archived, &[], std::slice::from_ref(&b), true);
        let names: Vec<&str> = p.iter().map(|p| p.object.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "wal/00000001/000000010000000000000004",
                "wal/00000002/000000020000000000000008"
            ]
        );
        assert!(p[0].reason.contains("gap"));
        // Nothing before the oldest backup's start is a gap.
        let late = m("b2", 1, 5, 5);
        assert_eq!(wal_chain_problems(&archived, &[], &[late], true).len(), 1);
    }
}
