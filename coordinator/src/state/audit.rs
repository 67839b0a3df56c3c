//! The audit log: one hash-chained entry per applied request, refused ones included, in
//! log order.
//!
//! Why it lives in the replicated state: "who did what, when, and did it work" must
//! survive the loss of any coordinator and agree on every node. Why a hash chain: so that
//! an entry edited, removed or reordered afterwards (in a node's archive, in a snapshot, in
//! an export handed to an auditor) is detected and named by `drctl audit verify`. The hash
//! is computed here, inside `apply`, from the entry alone and the previous hash, so every
//! node computes the same chain; the format and verifier are shared with drctl in
//! [`dr_proto::audit_chain`]. Limits (what the chain does not prove) are in
//! docs/security-model.md, "Tamper-evident audit log".
//!
//! Bounded in the state (issue 2, defect 2): every snapshot serialises the whole state,
//! so an audit log that only grows makes every snapshot bigger and slower than the last.
//! The state keeps the newest [`AUDIT_IN_STATE`] entries; older ones are handed to the
//! Raft layer by [`AuditLog::trim`], which appends them to each node's local archive
//! (`<data_dir>/audit-archive.jsonl`). Trimming happens at the same log positions on
//! every node, so the state stays identical everywhere, and `seq` and the chain continue
//! across the archive and the state: at least one entry always stays, so the next entry
//! links to it.
//!
//! No secrets: entries hold the command name, the ids it touched and action verbs, never
//! action arguments, payloads or agent output (see [`describe_action`]).

use dr_proto::audit_chain::{GENESIS_PREV, entry_hash};
use dr_proto::pb;
use serde::{Deserialize, Serialize};

pub use dr_proto::audit_chain::AuditEntry;

/// Audit entries kept in the replicated state (and so in every snapshot).
pub const AUDIT_IN_STATE: usize = 10_000;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditLog {
    entries: Vec<AuditEntry>,
}

impl AuditLog {
    /// Appends an entry, assigning the next `seq` and chaining it to the previous entry.
    pub fn append(
        &mut self,
        log_index: u64,
        at_unix_ms: i64,
        origin: &str,
        what: &str,
        target: String,
        result: String,
    ) -> u64 {
        let last = self.entries.last();
        let seq = last.map_or(1, |e| e.seq + 1);
        // A state from before the chain has unhashed entries: the chain starts afresh.
        let prev_hash = match last {
            Some(e) if !e.hash.is_empty() => e.hash.clone(),
            _ => GENESIS_PREV.to_owned(),
        };
        let mut e = AuditEntry {
            seq,
            log_index,
            at_unix_ms,
            origin: origin.to_owned(),
            what: what.to_owned(),
            target,
            result,
            prev_hash,
            hash: String::new(),
        };
        e.hash = entry_hash(&e);
        self.entries.push(e);
        seq
    }

    /// Removes and returns the oldest entries beyond `keep` (at least one entry stays, so
    /// `seq` and the chain continue). Deterministic: call it at the same point on every node.
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

    /// The newest entry: the chain's anchor.
    pub fn head(&self) -> Option<&AuditEntry> {
        self.entries.last()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The verb of an action, for audit targets: never its arguments, which may hold secrets
/// (a generic verb's args, an exec's environment).
pub fn describe_action(a: &pb::Action) -> String {
    use pb::action::Kind;
    match &a.kind {
        None => "none".to_owned(),
        Some(Kind::RunChecks(_)) => "run_checks".to_owned(),
        Some(Kind::Service(s)) => format!(
            "service.{}:{}",
            pb::service_control::Op::try_from(s.op).map_or("unknown", |o| match o {
                pb::service_control::Op::Unspecified => "unspecified",
                pb::service_control::Op::Start => "start",
                pb::service_control::Op::Stop => "stop",
                pb::service_control::Op::Restart => "restart",
                pb::service_control::Op::Status => "status",
            }),
            s.service
        ),
        Some(Kind::Maintenance(m)) => {
            format!("maintenance:{}", if m.enabled { "on" } else { "off" })
        }
        Some(Kind::SmokeTest(_)) => "smoke_test".to_owned(),
        Some(Kind::Exec(e)) => format!("exec:{}", e.name),
        Some(Kind::Generic(g)) => g.verb.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dr_proto::audit_chain::{Problem, VerifyOptions, verify};

    fn log(n: usize) -> AuditLog {
        let mut l = AuditLog::default();
        for i in 0..n {
            l.append(
                i as u64 + 1,
                1_000,
                "o",
                "host_up",
                format!("h{i}"),
                "applied".into(),
            );
        }
        l
    }

    #[test]
    fn t10_append_chains_and_verifies() {
        let l = log(20);
        let r = verify(
            l.entries(),
            &VerifyOptions {
                from_genesis: true,
                anchors: vec![],
            },
        );
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(l.entries()[0].prev_hash, GENESIS_PREV);
        assert_eq!(r.head_hash, l.head().unwrap().hash);
        // Deterministic: another node computes the same chain.
        assert_eq!(log(20), l);
    }

    #[test]
    fn t20_chain_continues_across_trim_and_snapshot() {
        let mut l = log(10);
        let mut archive = l.trim(4);
        assert_eq!((archive.len(), l.len()), (6, 4));
        // Through a snapshot (JSON) and on.
        let mut l: AuditLog = serde_json::from_slice(&serde_json::to_vec(&l).unwrap()).unwrap();
        l.append(11, 2_000, "o", "host_down", "h0".into(), "applied".into());
        archive.extend(l.trim(2));
        let all: Vec<AuditEntry> = archive.iter().chain(l.entries()).cloned().collect();
        assert_eq!(all.len(), 11);
        let opts = VerifyOptions {
            from_genesis: true,
            anchors: vec![],
        };
        assert!(verify(&all, &opts).ok());
        // Tampering with the archived part is caught at the archive/state boundary too.
        let mut bad = all.clone();
        bad[8].result = "refused".into();
        assert_eq!(
            verify(&bad, &opts).problems,
            vec![Problem::Edited {
                seq: 9,
                position: 9
            }]
        );
    }

    #[test]
    fn t30_pre_chain_state_starts_a_new_chain() {
        // An entry as a snapshot from before the chain holds it.
        let old = r#"{"entries":[{"seq":1,"log_index":1,"at_unix_ms":5,"origin":"o","what":"host_up","target":"h","result":"applied"}]}"#;
        let mut l: AuditLog = serde_json::from_str(old).unwrap();
        l.append(2, 6, "o", "host_up", "h".into(), "unchanged".into());
        assert_eq!(l.entries()[1].prev_hash, GENESIS_PREV);
        let r = verify(l.entries(), &VerifyOptions::default());
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(r.pre_chain, 1);
    }

    #[test]
    fn t40_actions_described_without_arguments() {
        let g = pb::Action {
            kind: Some(pb::action::Kind::Generic(pb::Generic {
                verb: "pg.alter-role".into(),
                args: [("password".to_owned(), "hunter2".to_owned())].into(),
            })),
        };
        assert_eq!(describe_action(&g), "pg.alter-role");
        assert!(!describe_action(&g).contains("hunter2"));
    }
}
