//! The audit log: one entry per applied request, refused ones included, in log order.
//!
//! Why it lives in the replicated state: "who did what, when, and did it work" must
//! survive the loss of any coordinator and agree on every node. It is append-only; a
//! later issue hash-chains the entries, so keep them plain data with a dense `seq`.

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
