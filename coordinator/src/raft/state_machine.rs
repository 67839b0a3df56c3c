//! The replicated state machine as openraft sees it: [`crate::state::State`] in memory,
//! snapshots on disk.
//!
//! Why in memory: the state is what the cluster DECIDES (topology, operations, catalog),
//! small enough to hold, and handlers read it on every request. Durability comes from
//! the log plus periodic snapshots: on restart the newest snapshot is loaded and openraft
//! replays the log entries after it.
//!
//! Invariants:
//! - `state` and `last_applied` change together under one write lock, and the lock is
//!   never held across an `.await` (handlers read through [`SharedState::read`]).
//! - The `applied` watch is bumped after the lock is released, so a handler that sees
//!   index N in the watch also sees entry N in the state.
//! - A snapshot file is written to a temporary name, fsynced, then renamed (and the
//!   directory fsynced), so a crash leaves either the old or the new snapshot, never half
//!   of one. Snapshot files are `snapshot-<index>-<term>-<leader>.json`, holding
//!   [`SnapshotFile`].
//! - The audit log in the state is bounded (see [`crate::state::audit`]): every
//!   [`AUDIT_TRIM_BATCH`] entries beyond [`crate::state::audit::AUDIT_IN_STATE`], the oldest
//!   are moved to `<data_dir>/audit-archive.jsonl` (one JSON entry per line), so snapshot
//!   size and build time stay flat however long the cluster runs.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::typ::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::state::audit::AUDIT_IN_STATE;
use crate::state::{self, State};

/// Audit entries over the in-state bound that trigger one trim (trimming per entry would
/// shift the whole vector on every apply).
pub const AUDIT_TRIM_BATCH: usize = 1_000;

/// What a snapshot carries, and what its bytes decode to on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotPayload {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: State,
}

/// A snapshot on disk: its metadata plus the payload bytes it was sent or built with.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    payload: SnapshotPayload,
}

/// The applied state, shared between the state machine and request handlers.
#[derive(Debug)]
struct Applied {
    state: State,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
}

/// Read access to the applied state for handlers; cheap to clone.
#[derive(Clone, Debug)]
pub struct SharedState {
    inner: Arc<RwLock<Applied>>,
    applied_tx: Arc<watch::Sender<u64>>,
}

impl SharedState {
    /// Runs `f` on the current state under a read lock held only for the call.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let guard = self
            .inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&guard.state)
    }

    /// Index of the last applied entry (0 before any).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }
}

/// Why the state machine store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StateMachineError {
    #[error("create snapshot directory {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("read snapshot {path}: {message}")]
    Load { path: String, message: String },
}

/// The newest snapshot: its metadata and encoded payload.
type CurrentSnapshot = (SnapshotMeta, Arc<Vec<u8>>);

/// openraft's view of the state machine.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    shared: SharedState,
    snapshot_dir: PathBuf,
    /// Newest snapshot built or installed here (metadata + encoded payload).
    current: Arc<RwLock<Option<CurrentSnapshot>>>,
}

impl StateMachineStore {
    /// Opens the store, loading the newest snapshot in `snapshot_dir` if there is one.
    pub async fn open(snapshot_dir: &Path) -> Result<StateMachineStore, StateMachineError> {
        let dir = snapshot_dir.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&dir))
            .await
            .map_err(|e| StateMachineError::Load {
                path: snapshot_dir.display().to_string(),
                message: e.to_string(),
            })?
    }

    fn open_blocking(dir: &Path) -> Result<StateMachineStore, StateMachineError> {
        std::fs::create_dir_all(dir).map_err(|source| StateMachineError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let newest = newest_snapshot(dir).map_err(|source| StateMachineError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let mut applied = Applied {
            state: State::default(),
            last_applied: None,
            last_membership: StoredMembership::default(),
        };
        let mut current = None;
        if let Some(path) = newest {
            let load_err = |message: String| StateMachineError::Load {
                path: path.display().to_string(),
                message,
            };
            let bytes = std::fs::read(&path).map_err(|e| load_err(e.to_string()))?;
            let file: SnapshotFile =
                serde_json::from_slice(&bytes).map_err(|e| load_err(e.to_string()))?;
            let data = serde_json::to_vec(&file.payload).map_err(|e| load_err(e.to_string()))?;
            tracing::info!(path = %path.display(), last_log_id = ?file.meta.last_log_id, "loaded snapshot");
            applied = Applied {
                state: file.payload.state,
                last_applied: file.payload.last_applied,
                last_membership: file.payload.last_membership,
            };
            current = Some((file.meta, Arc::new(data)));
        }
        let index = applied.last_applied.map_or(0, |l| l.index);
        let (applied_tx, _) = watch::channel(index);
        Ok(StateMachineStore {
            shared: SharedState {
                inner: Arc::new(RwLock::new(applied)),
                applied_tx: Arc::new(applied_tx),
            },
            snapshot_dir: dir.to_path_buf(),
            current: Arc::new(RwLock::new(current)),
        })
    }

    /// Handle for request handlers.
    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    fn set_current(&self, meta: SnapshotMeta, data: Arc<Vec<u8>>) {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        *cur = Some((meta, data));
    }

    /// Appends audit entries trimmed from the state to this node's archive. Best effort:
    /// the replicated state stays correct either way, and a failure is logged once per
    /// batch. Not fsynced: the Raft log still holds these entries until it is purged.
    fn archive_audit(&self, entries: &[crate::state::AuditEntry]) {
        let Some(dir) = self.snapshot_dir.parent() else {
            return;
        };
        let path = dir.join("audit-archive.jsonl");
        let mut buf = Vec::with_capacity(entries.len() * 160);
        for e in entries {
            if serde_json::to_writer(&mut buf, e).is_ok() {
                buf.push(b'\n');
            }
        }
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&buf));
        match res {
            Ok(()) => {
                tracing::debug!(count = entries.len(), path = %path.display(), "audit entries archived")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot archive audit entries")
            }
        }
    }

    fn bump_applied(&self, index: u64) {
        self.shared.applied_tx.send_if_modified(|v| {
            if *v < index {
                *v = index;
                true
            } else {
                false
            }
        });
    }

    /// Writes a snapshot file atomically and removes older ones.
    async fn persist(
        &self,
        meta: &SnapshotMeta,
        payload: SnapshotPayload,
    ) -> Result<(), StorageError> {
        let file = SnapshotFile {
            meta: meta.clone(),
            payload,
        };
        let dir = self.snapshot_dir.clone();
        let signature = meta.signature();
        let sig2 = signature.clone();
        tokio::task::spawn_blocking(move || write_snapshot_file(&dir, &file))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(signature), &e))?
            .map_err(|e| StorageIOError::write_snapshot(Some(sig2), &e))?;
        Ok(())
    }
}

fn snapshot_name(meta: &SnapshotMeta) -> String {
    match &meta.last_log_id {
        Some(l) => format!(
            "snapshot-{:020}-{}-{}.json",
            l.index, l.leader_id.term, l.leader_id.node_id
        ),
        None => "snapshot-empty.json".to_owned(),
    }
}

/// Newest snapshot file in `dir` by its zero-padded index.
fn newest_snapshot(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut best: Option<PathBuf> = None;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !(name.starts_with("snapshot-") && name.ends_with(".json")) {
            continue;
        }
        if best
            .as_ref()
            .and_then(|b| b.file_name())
            .is_none_or(|b| b.to_str() < Some(name))
        {
            best = Some(path);
        }
    }
    Ok(best)
}

fn write_snapshot_file(dir: &Path, file: &SnapshotFile) -> std::io::Result<()> {
    let name = snapshot_name(&file.meta);
    let tmp = dir.join(format!(".{name}.tmp"));
    let dest = dir.join(&name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, file).map_err(std::io::Error::other)?;
        f.flush()?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &dest)?;
    std::fs::File::open(dir)?.sync_all()?;
    // Keep only the newest snapshot; older ones are covered by it.
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(n) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if n.starts_with("snapshot-")
            && n.ends_with(".json")
            && n < name.as_str()
            && let Err(e) = std::fs::remove_file(&path)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove old snapshot");
        }
    }
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let payload = {
            let guard = self.shared.inner.read().unwrap_or_else(|p| p.into_inner());
            SnapshotPayload {
                last_applied: guard.last_applied,
                last_membership: guard.last_membership.clone(),
                state: guard.state.clone(),
            }
        };
        let data =
            serde_json::to_vec(&payload).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let snapshot_id = match payload.last_applied {
            Some(l) => format!(
                "{}-{}-{}",
                l.leader_id.term,
                l.index,
                uuid::Uuid::new_v4().simple()
            ),
            None => format!("0-0-{}", uuid::Uuid::new_v4().simple()),
        };
        let meta = SnapshotMeta {
            last_log_id: payload.last_applied,
            last_membership: payload.last_membership.clone(),
            snapshot_id,
        };
        self.persist(&meta, payload).await?;
        let data = Arc::new(data);
        self.set_current(meta.clone(), data.clone());
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.as_ref().clone())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let guard = self.shared.inner.read().unwrap_or_else(|p| p.into_inner());
        Ok((guard.last_applied, guard.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<state::Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut archived = Vec::new();
        let last = {
            let mut guard = self.shared.inner.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                guard.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => responses.push(state::Response::Unchanged),
                    EntryPayload::Normal(req) => {
                        let resp = state::apply(&mut guard.state, entry.log_id.index, &req);
                        responses.push(resp);
                        if guard.state.audit.len() > AUDIT_IN_STATE + AUDIT_TRIM_BATCH {
                            archived.extend(guard.state.audit.trim(AUDIT_IN_STATE));
                        }
                    }
                    EntryPayload::Membership(m) => {
                        guard.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        responses.push(state::Response::Unchanged);
                    }
                }
            }
            guard.last_applied
        };
        if let Some(l) = last {
            self.bump_applied(l.index);
        }
        if !archived.is_empty() {
            self.archive_audit(&archived);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let payload: SnapshotPayload = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        debug_assert_eq!(
            payload.last_applied, meta.last_log_id,
            "snapshot payload matches its meta"
        );
        self.persist(meta, payload.clone()).await?;
        {
            let mut guard = self.shared.inner.write().unwrap_or_else(|p| p.into_inner());
            *guard = Applied {
                state: payload.state,
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
            };
        }
        self.set_current(meta.clone(), Arc::new(data));
        // The watch only moves forward; an installed snapshot is always ahead of applied.
        self.bump_applied(meta.last_log_id.map_or(0, |l| l.index));
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let cur = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(cur.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.as_ref().clone())),
        }))
    }
}
