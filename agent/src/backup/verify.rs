//! Read objects back and name every one that is missing or corrupt.
//!
//! Why: a backup nobody has read back is a hope, not a backup. Verification downloads each
//! object, authenticates and decrypts it, decompresses it and re-hashes it (a chunk's hash
//! must equal its id), exactly as a restore would, without writing anything.

use std::collections::BTreeSet;

use futures::StreamExt;
use serde::Serialize;
use tracing::{info, warn};

use super::key::ChunkId;
use super::manifest::BackupId;
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
    for id in ids {
        report.objects_checked += 1;
        match repo.get_manifest(id).await {
            Ok(m) => chunks.extend(m.chunk_ids()),
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
