//! The audit log's hash chain: entry format, canonical hash and verification.
//!
//! Why it lives in the wire crate: the coordinator computes the chain inside `apply` and
//! verifies what it holds, and drctl verifies an exported file offline, possibly years
//! later on a machine with no coordinator. Both must agree on one canonical encoding, so
//! there is exactly one implementation, here.
//!
//! The encoding is not JSON (whose key order, escaping and number formatting are not
//! canonical) but a fixed sequence of fields, integers little-endian and strings
//! length-prefixed, under a domain tag, hashed with BLAKE3. Each entry's hash covers the
//! previous entry's hash, so changing, removing or reordering an entry breaks the chain
//! from that point; the newest hash (the "head") is the anchor: it is replicated on every
//! coordinator and operators may record it elsewhere (`drctl audit verify` prints it).
//!
//! What verification can and cannot prove is written up in docs/security-model.md
//! ("Tamper-evident audit log").

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// `prev_hash` of the first chained entry.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const DOMAIN: &[u8] = b"yeslocker-dr/audit-entry/v1\0";

/// One audit entry, as kept in the Raft state, in each node's archive and in exports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    /// 1, 2, 3... with no gaps, across the archive and the state.
    pub seq: u64,
    /// Raft log index of the request that produced this entry.
    pub log_index: u64,
    /// When the proposer stamped the request (ms since the Unix epoch).
    pub at_unix_ms: i64,
    /// SPIFFE id of whoever asked.
    pub origin: String,
    /// What was done, e.g. `issue_commands`, `approvals.decide`.
    pub what: String,
    /// What it was done to: host ids, command keys and verbs, request ids. Never secrets.
    pub target: String,
    /// `applied`, `unchanged`, `refused: <reason>`, or a short outcome.
    pub result: String,
    /// Hash of the entry before this one ([`GENESIS_PREV`] for the first). Empty only for
    /// entries written before the chain existed.
    #[serde(default)]
    pub prev_hash: String,
    /// [`entry_hash`] of this entry, lowercase hex. Empty only for pre-chain entries.
    #[serde(default)]
    pub hash: String,
}

impl AuditEntry {
    /// Recomputes this entry's hash from its content and `prev_hash`.
    pub fn compute_hash(&self) -> String {
        entry_hash(self)
    }
}

/// BLAKE3 over the canonical encoding of every field except `hash` itself, hex.
pub fn entry_hash(e: &AuditEntry) -> String {
    let mut h = blake3::Hasher::new();
    h.update(DOMAIN);
    h.update(&e.seq.to_le_bytes());
    h.update(&e.log_index.to_le_bytes());
    h.update(&e.at_unix_ms.to_le_bytes());
    for s in [&e.origin, &e.what, &e.target, &e.result, &e.prev_hash] {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// One thing wrong with a chain. Each names the entry (by `seq`) and, when known, where it
/// was found (`position`: 1-based line of the file or index in the list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// The content does not match the entry's own hash.
    Edited { seq: u64, position: usize },
    /// The entry's own hash is consistent, but the next entry does not link to it: it was
    /// changed and re-hashed, or replaced.
    Rehashed { seq: u64, next_seq: u64 },
    /// Entries with these sequence numbers are missing.
    Removed { from_seq: u64, to_seq: u64 },
    /// The entry comes after a later one.
    Reordered {
        seq: u64,
        position: usize,
        after_seq: u64,
    },
    /// Two different entries claim the same sequence number.
    Conflict { seq: u64, position: usize },
    /// An entry without a hash after chained entries (hashes stripped to hide an edit).
    Unchained { seq: u64, position: usize },
    /// A line of a JSON-lines file that is not an entry.
    Unreadable { position: usize, error: String },
    /// An anchor (a `seq:hash` recorded elsewhere) does not match, or its entry is absent.
    AnchorMismatch {
        seq: u64,
        expected: String,
        found: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Edited { seq, position } => write!(
                f,
                "entry seq {seq} (position {position}) was EDITED: its content does not match its hash"
            ),
            Problem::Rehashed { seq, next_seq } => write!(
                f,
                "entry seq {seq} was EDITED or REPLACED and re-hashed: entry seq {next_seq} does not link to it"
            ),
            Problem::Removed { from_seq, to_seq } if from_seq == to_seq => {
                write!(f, "entry seq {from_seq} was REMOVED (sequence gap)")
            }
            Problem::Removed { from_seq, to_seq } => {
                write!(
                    f,
                    "entries seq {from_seq}..={to_seq} were REMOVED (sequence gap)"
                )
            }
            Problem::Reordered {
                seq,
                position,
                after_seq,
            } => write!(
                f,
                "entry seq {seq} (position {position}) was REORDERED: it comes after entry seq {after_seq}"
            ),
            Problem::Conflict { seq, position } => write!(
                f,
                "entry seq {seq} (position {position}) CONFLICTS with another entry of the same seq"
            ),
            Problem::Unchained { seq, position } => write!(
                f,
                "entry seq {seq} (position {position}) has NO HASH although earlier entries are chained"
            ),
            Problem::Unreadable { position, error } => {
                write!(f, "line {position} is not an audit entry: {error}")
            }
            Problem::AnchorMismatch {
                seq,
                expected,
                found,
            } => write!(
                f,
                "anchor seq {seq}: expected hash {expected}, found {}",
                if found.is_empty() {
                    "no such entry"
                } else {
                    found
                }
            ),
        }
    }
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Entries examined (after dropping exact duplicates).
    pub entries: usize,
    /// Entries written before the chain existed (a prefix; not verifiable).
    pub pre_chain: usize,
    /// Byte-identical entries seen twice (an archive re-append after a crash), ignored.
    pub duplicates: usize,
    pub first_seq: u64,
    /// The newest entry and its hash: the anchor to compare with other nodes or to record.
    pub head_seq: u64,
    pub head_hash: String,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Options of [`verify`].
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// The entries must start at seq 1 (a complete export); otherwise a chain may start
    /// later (a node that holds only part of the history) and the start is not a problem.
    pub from_genesis: bool,
    /// `(seq, hash)` pairs recorded elsewhere that must match.
    pub anchors: Vec<(u64, String)>,
}

/// Checks a chain given in stored order and reports EVERY problem found, naming entries.
pub fn verify(entries: &[AuditEntry], opts: &VerifyOptions) -> Report {
    let mut report = Report::default();
    // 1. Exact duplicates are dropped; same seq with different content is a conflict.
    let mut by_seq: BTreeMap<u64, (usize, &AuditEntry)> = BTreeMap::new();
    let mut order: Vec<(usize, &AuditEntry)> = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let position = i + 1;
        match by_seq.get(&e.seq) {
            Some((_, prev)) if *prev == e => {
                report.duplicates += 1;
                continue;
            }
            Some(_) => {
                report.problems.push(Problem::Conflict {
                    seq: e.seq,
                    position,
                });
                continue;
            }
            None => {
                by_seq.insert(e.seq, (position, e));
                order.push((position, e));
            }
        }
    }
    report.entries = order.len();
    // 2. Each entry against its own hash; hashes only missing in a leading prefix.
    let mut seen_chained = false;
    for (position, e) in &order {
        if e.hash.is_empty() {
            if seen_chained {
                report.problems.push(Problem::Unchained {
                    seq: e.seq,
                    position: *position,
                });
            } else {
                report.pre_chain += 1;
            }
            continue;
        }
        seen_chained = true;
        if entry_hash(e) != e.hash {
            report.problems.push(Problem::Edited {
                seq: e.seq,
                position: *position,
            });
        }
    }
    // 3. Stored order: every entry after a later one is reordered.
    let mut max_seen: Option<u64> = None;
    for (position, e) in &order {
        if let Some(m) = max_seen
            && e.seq < m
        {
            report.problems.push(Problem::Reordered {
                seq: e.seq,
                position: *position,
                after_seq: m,
            });
        }
        max_seen = Some(max_seen.map_or(e.seq, |m| m.max(e.seq)));
    }
    // 4. In seq order: gaps, and links between consecutive entries.
    let sorted: Vec<&AuditEntry> = by_seq.values().map(|(_, e)| *e).collect();
    if let Some(first) = sorted.first() {
        report.first_seq = first.seq;
        if opts.from_genesis && first.seq > 1 {
            report.problems.push(Problem::Removed {
                from_seq: 1,
                to_seq: first.seq - 1,
            });
        }
        if first.seq == 1 && !first.hash.is_empty() && first.prev_hash != GENESIS_PREV {
            report.problems.push(Problem::Rehashed {
                seq: 0,
                next_seq: 1,
            });
        }
    }
    for pair in sorted.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.seq > a.seq + 1 {
            report.problems.push(Problem::Removed {
                from_seq: a.seq + 1,
                to_seq: b.seq - 1,
            });
            continue;
        }
        if a.hash.is_empty() || b.hash.is_empty() {
            continue;
        }
        // Only an entry whose own hash is consistent can be blamed for a broken link; an
        // edited one is already reported.
        if b.prev_hash != a.hash && entry_hash(a) == a.hash {
            report.problems.push(Problem::Rehashed {
                seq: a.seq,
                next_seq: b.seq,
            });
        }
    }
    if let Some(last) = sorted.last() {
        report.head_seq = last.seq;
        report.head_hash = last.hash.clone();
    }
    for (seq, expected) in &opts.anchors {
        let found = by_seq
            .get(seq)
            .map(|(_, e)| e.hash.clone())
            .unwrap_or_default();
        if &found != expected {
            report.problems.push(Problem::AnchorMismatch {
                seq: *seq,
                expected: expected.clone(),
                found,
            });
        }
    }
    report
}

/// Parses JSON lines (an export or a node's archive): the entries, and one
/// [`Problem::Unreadable`] per line that is not an entry (empty lines are skipped).
/// `first_line` numbers the lines (1 for a whole file).
pub fn parse_jsonl(text: &str, first_line: usize) -> (Vec<AuditEntry>, Vec<Problem>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<AuditEntry>(line) {
            Ok(e) => entries.push(e),
            Err(e) => problems.push(Problem::Unreadable {
                position: first_line + i,
                error: e.to_string(),
            }),
        }
    }
    (entries, problems)
}

/// Parses an anchor written as `SEQ:HASH`.
pub fn parse_anchor(s: &str) -> Result<(u64, String), String> {
    let (seq, hash) = s.split_once(':').ok_or_else(|| {
        format!("anchor `{s}` is not SEQ:HASH (as printed by `drctl audit verify`)")
    })?;
    let seq = seq
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("anchor `{s}`: `{seq}` is not a sequence number"))?;
    let hash = hash.trim().to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("anchor `{s}`: the hash must be 64 hex digits"));
    }
    Ok((seq, hash))
}

/// Builds a correctly chained list from unchained content (tests and benchmarks).
pub fn chain(mut entries: Vec<AuditEntry>) -> Vec<AuditEntry> {
    let mut prev = GENESIS_PREV.to_owned();
    for e in &mut entries {
        e.prev_hash = prev;
        e.hash = entry_hash(e);
        prev = e.hash.clone();
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u64) -> Vec<AuditEntry> {
        chain(
            (1..=n)
                .map(|i| AuditEntry {
                    seq: i,
                    log_index: i + 10,
                    at_unix_ms: 1_000 + i as i64,
                    origin: "spiffe://t/operator/alice?role=admin".into(),
                    what: "host_up".into(),
                    target: format!("h{i}"),
                    result: "applied".into(),
                    prev_hash: String::new(),
                    hash: String::new(),
                })
                .collect(),
        )
    }

    fn check(list: &[AuditEntry]) -> Vec<Problem> {
        verify(
            list,
            &VerifyOptions {
                from_genesis: true,
                anchors: vec![],
            },
        )
        .problems
    }

    #[test]
    fn t10_untouched_chain_verifies_and_hash_is_stable() {
        let list = entries(5);
        let r = verify(&list, &VerifyOptions::default());
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!((r.entries, r.head_seq), (5, 5));
        assert_eq!(r.head_hash, list[4].hash);
        // Every field is covered.
        let base = list[2].clone();
        let variants = [
            AuditEntry {
                seq: 99,
                ..base.clone()
            },
            AuditEntry {
                log_index: 0,
                ..base.clone()
            },
            AuditEntry {
                at_unix_ms: 0,
                ..base.clone()
            },
            AuditEntry {
                origin: "x".into(),
                ..base.clone()
            },
            AuditEntry {
                what: "x".into(),
                ..base.clone()
            },
            AuditEntry {
                target: "x".into(),
                ..base.clone()
            },
            AuditEntry {
                result: "x".into(),
                ..base.clone()
            },
            AuditEntry {
                prev_hash: "x".into(),
                ..base.clone()
            },
        ];
        for v in variants {
            assert_ne!(entry_hash(&v), base.hash, "{v:?}");
        }
        // Length prefixes: moving a byte between fields changes the hash.
        let a = AuditEntry {
            what: "ab".into(),
            target: "c".into(),
            ..base.clone()
        };
        let b = AuditEntry {
            what: "a".into(),
            target: "bc".into(),
            ..base
        };
        assert_ne!(entry_hash(&a), entry_hash(&b));
    }

    #[test]
    fn t20_edit_remove_reorder_each_named() {
        let mut list = entries(10);
        list[2].result = "refused: nothing".into(); // seq 3 edited
        list.remove(5); // seq 6 removed
        list.swap(6, 7); // seq 8 and 9 swapped (positions 7 and 8 after the removal)
        let p = check(&list);
        assert_eq!(
            p,
            vec![
                Problem::Edited {
                    seq: 3,
                    position: 3
                },
                Problem::Reordered {
                    seq: 8,
                    position: 8,
                    after_seq: 9
                },
                Problem::Removed {
                    from_seq: 6,
                    to_seq: 6
                },
            ]
        );
        let text: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert!(
            text[0].contains("seq 3") && text[0].contains("EDITED"),
            "{text:?}"
        );
        assert!(
            text[1].contains("seq 8") && text[1].contains("REORDERED"),
            "{text:?}"
        );
        assert!(
            text[2].contains("seq 6") && text[2].contains("REMOVED"),
            "{text:?}"
        );
    }

    #[test]
    fn t30_rehashed_edit_breaks_the_next_link() {
        let mut list = entries(4);
        list[1].target = "forged".into();
        list[1].hash = entry_hash(&list[1]);
        assert_eq!(
            check(&list),
            vec![Problem::Rehashed {
                seq: 2,
                next_seq: 3
            }]
        );
        // Rewriting the whole tail verifies locally: only an anchor catches it.
        let honest_head = list[3].hash.clone();
        let mut forged = list.clone();
        for i in 2..4 {
            forged[i].prev_hash = forged[i - 1].hash.clone();
            forged[i].hash = entry_hash(&forged[i]);
        }
        assert!(check(&forged).is_empty());
        let r = verify(
            &forged,
            &VerifyOptions {
                from_genesis: true,
                anchors: vec![(4, honest_head)],
            },
        );
        assert!(matches!(
            r.problems.as_slice(),
            [Problem::AnchorMismatch { seq: 4, .. }]
        ));
    }

    #[test]
    fn t40_duplicates_prefix_and_stripped_hashes() {
        let mut list = entries(4);
        let dup = list[1].clone();
        list.push(dup);
        let r = verify(&list, &VerifyOptions::default());
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(r.duplicates, 1);
        // A conflicting duplicate is named.
        let mut other = list[0].clone();
        other.target = "x".into();
        list.push(other);
        assert!(check(&list).contains(&Problem::Conflict {
            seq: 1,
            position: 6
        }));
        // Stripping the hash of a later entry is not a "pre-chain" entry.
        let mut list = entries(3);
        list[2].hash.clear();
        assert_eq!(
            check(&list),
            vec![Problem::Unchained {
                seq: 3,
                position: 3
            }]
        );
        // A partial chain (a node without the archive) is fine unless from_genesis.
        let list = entries(5)[2..].to_vec();
        assert!(verify(&list, &VerifyOptions::default()).ok());
        assert_eq!(
            check(&list),
            vec![Problem::Removed {
                from_seq: 1,
                to_seq: 2
            }]
        );
    }

    #[test]
    fn t45_jsonl() {
        let list = entries(2);
        let mut text = String::new();
        for e in &list {
            text.push_str(&serde_json::to_string(e).unwrap());
            text.push('\n');
        }
        text.push_str("{not json\n\n");
        let (got, problems) = parse_jsonl(&text, 1);
        assert_eq!(got, list);
        assert!(matches!(
            problems.as_slice(),
            [Problem::Unreadable { position: 3, .. }]
        ));
    }

    #[test]
    fn t50_anchor_parse() {
        let h = "a".repeat(64);
        assert_eq!(parse_anchor(&format!("7:{h}")), Ok((7, h)));
        assert!(parse_anchor("7").is_err());
        assert!(parse_anchor("x:ab").is_err());
        assert!(parse_anchor("7:ab").is_err());
    }
}
