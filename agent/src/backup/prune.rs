//! Delete chunks no manifest references (orphans of failed or interrupted backups, or of
//! backups whose manifests retention removed).
//!
//! Invariant: never delete what a live backup needs. The referenced set is computed from
//! *every* manifest; if any manifest cannot be read, prune stops without deleting anything.
//! A backup that is running has no manifest yet, so chunks younger than `grace` are kept.
//! WAL retention is the coordinator's retention controller's job (a later issue).

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
