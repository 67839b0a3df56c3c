//! The audit log: one entry per applied request, refused ones included, in log order.
//!
//! Why it lives in the replicated state: "who did what, when, and did it work" must
//! survive the loss of any coordinator and agree on every node. It is append-only; a
//! later issue hash-chains the entries, so keep them plain data with a dense `seq`.
//!
//! Bounded in the state (issue 2, defect 2): every snapshot serialises the whole state,
//! so an audit log that only grows makes every snapshot bigger and slower than the last.
//! The state keeps the newest [`AUDIT_IN_STATE`] entries; older ones are handed to the
//! Raft layer by [`AuditLog::trim`], which appends them to each node's local archive
//! (`<data_dir>/audit-archive.jsonl`). Trimming happens at the same log positions on
//! every node, so the state stays identical everywhere, and `seq` stays dense across the
//! archive and the state, which is what a hash chain needs.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    /// 1, 2, 3... with no gaps.
    pub seq: u64,
    /// Raft log index of the request that produced this entry.
    pub log_index: u64,
    pub at_unix_ms: i64,
    /// SPIFFE id of whoever asked.
    pub origin: String,
    /// Command name, e.g. `issue_commands`.
    pub what: String,
    /// Host ids or command keys touched.
    pub target: String,
    /// `applied`, `unchanged`, or `refused: <reason>`.
    pub result: String,
}

/// Audit entries kept in the replicated state (and so in every snapshot).
pub const AUDIT_IN_STATE: usize = 10_000;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditLog {
    entries: Vec<AuditEntry>,
}

impl AuditLog {
    /// Appends an entry, assigning the next `seq`.
    pub fn append(
        &mut self,
        log_index: u64,
        at_unix_ms: i64,
        origin: &str,
        what: &str,
        target: String,
        result: String,
    ) -> u64 {
        let seq = self.entries.last().map_or(1, |e| e.seq + 1);
        self.entries.push(AuditEntry {
            seq,
            log_index,
            at_unix_ms,
            origin: origin.to_owned(),
            what: what.to_owned(),
            target,
            result,
        });
        seq
    }

    /// Removes and returns the oldest entries beyond `keep` (at least one entry stays, so
    /// `seq` continues densely). Deterministic: call it at the same point on every node.
    pub fn trim(&mut self, keep: usize) -> Vec<AuditEntry> {
        let keep = keep.max(1);
        if self.entries.len() <= keep {
            return Vec::new();
        }
        let excess = self.entries.len() - keep;
        self.entries.drain(..excess).collect()
    }

    pub fn entries(&self) -> &[AuditEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
