//! Durable record of recent command keys: the agent's half of exactly-once execution.
//!
//! Why: the coordinator re-sends a `Command` after every reconnect until it is acknowledged,
//! and a new leader resumes half-done plans by re-sending their steps. A failover step such as
//! "promote" or "stop the database" must not run twice because a stream broke. So a key is
//! recorded as `running` and made durable BEFORE its work starts; a repeat of a key returns the
//! stored result (or just an ack while it still runs), and a key found `running` when the
//! process starts is reported failed, never re-run: we cannot know how far it got.
//!
//! File: `<data_dir>/commands.json`, rewritten atomically (temp file, fsync, rename, fsync of
//! the directory) on every state change. At most [`MAX_ENTRIES`] finished keys are kept (the
//! oldest are dropped first; running keys are never dropped). The same file keeps the highest
//! fencing epoch seen per database cluster, so a restarted agent still refuses stale epochs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use dr_proto::pb;
use serde::{Deserialize, Serialize};

/// How many finished keys are remembered.
pub const MAX_ENTRIES: usize = 1000;
const FILE_NAME: &str = "commands.json";
const FORMAT_VERSION: u32 = 1;

/// The message of a command interrupted by an agent restart.
pub const RESTARTED_MESSAGE: &str = "agent restarted while running; not re-run";

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid command record ({source}); move it aside to start over (commands in it may then run again)"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub type IdempotencyResult<T> = Result<T, IdempotencyError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    Running,
    Done,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub state: EntryState,
    /// Which action (for operators reading the file).
    pub action: String,
    pub started_at_unix_ms: i64,
    /// Insertion order, for eviction.
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<pb::CommandResult>,
    /// Whether the result was handed to a session stream (resent after reconnects until then).
    #[serde(default)]
    pub reported: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    next_seq: u64,
    #[serde(default)]
    epochs: BTreeMap<String, u64>,
    entries: BTreeMap<String, Entry>,
}

/// What the store knows about a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    New,
    Running,
    Done(pb::CommandResult),
}

/// The record; not shared by itself (the executor keeps it behind a mutex).
#[derive(Debug)]
pub struct IdempotencyStore {
    path: PathBuf,
    data: FileFormat,
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl IdempotencyStore {
    /// Opens (or creates) the record in `data_dir`. Keys left `running` by a previous process
    /// become failed results with [`RESTARTED_MESSAGE`]; their keys are returned.
    pub fn open(data_dir: &Path, host_id: &str) -> IdempotencyResult<(Self, Vec<String>)> {
        let path = data_dir.join(FILE_NAME);
        std::fs::create_dir_all(data_dir).map_err(|source| IdempotencyError::Write {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let data = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<FileFormat>(&bytes).map_err(|source| {
                IdempotencyError::Corrupt {
                    path: path.clone(),
                    source,
                }
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileFormat {
                version: FORMAT_VERSION,
                ..Default::default()
            },
            Err(source) => return Err(IdempotencyError::Read { path, source }),
        };
        let mut store = Self { path, data };
        let mut interrupted = Vec::new();
        for (key, entry) in &mut store.data.entries {
            if entry.state == EntryState::Running {
                entry.state = EntryState::Done;
                entry.reported = false;
                entry.result = Some(pb::CommandResult {
                    key: key.clone(),
                    success: false,
                    message: RESTARTED_MESSAGE.to_string(),
                    host_id: host_id.to_string(),
                    ..Default::default()
                });
                interrupted.push(key.clone());
            }
        }
        if !interrupted.is_empty() {
            store.persist()?;
        }
        Ok((store, interrupted))
    }

    pub fn lookup(&self, key: &str) -> Lookup {
        match self.data.entries.get(key) {
            None => Lookup::New,
            Some(Entry {
                state: EntryState::Running,
                ..
            }) => Lookup::Running,
            Some(Entry {
                result: Some(r), ..
            }) => Lookup::Done(r.clone()),
            // A done entry always has a result; treat a hand-edited one as still running
            // rather than run it again.
            Some(_) => Lookup::Running,
        }
    }

    /// Records `key` as running and makes it durable. Only then may its work start.
    pub fn begin(&mut self, key: &str, action: &str) -> IdempotencyResult<()> {
        debug_assert!(!self.data.entries.contains_key(key), "begin on a known key");
        let seq = self.data.next_seq;
        self.data.next_seq += 1;
        self.data.entries.insert(
            key.to_string(),
            Entry {
                state: EntryState::Running,
                action: action.to_string(),
                started_at_unix_ms: now_unix_ms(),
                seq,
                result: None,
                reported: false,
            },
        );
        if let Err(e) = self.persist() {
            // Not durable means not started: forget it so a retry can try again.
            self.data.entries.remove(key);
            return Err(e);
        }
        Ok(())
    }

    /// Stores the result of `result.key` and makes it durable.
    pub fn finish(&mut self, result: pb::CommandResult) -> IdempotencyResult<()> {
        let seq = self.data.next_seq;
        let entry = self
            .data
            .entries
            .entry(result.key.clone())
            .or_insert_with(|| {
                self.data.next_seq += 1;
                Entry {
                    state: EntryState::Running,
                    action: String::new(),
                    started_at_unix_ms: now_unix_ms(),
                    seq,
                    result: None,
                    reported: false,
                }
            });
        entry.state = EntryState::Done;
        entry.reported = false;
        entry.result = Some(result);
        self.evict();
        self.persist()
    }

    /// Notes that the result of `key` went out on a session. Not persisted by itself (it rides
    /// along with the next write): at worst a result is sent twice, which the coordinator
    /// deduplicates by key.
    pub fn mark_reported(&mut self, key: &str) {
        if let Some(e) = self.data.entries.get_mut(key)
            && e.state == EntryState::Done
        {
            e.reported = true;
        }
    }

    /// Keys to announce in `Hello.known_keys`: running, or finished but not yet reported.
    pub fn known_keys(&self) -> Vec<String> {
        self.data
            .entries
            .iter()
            .filter(|(_, e)| e.state == EntryState::Running || !e.reported)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Finished results not yet handed to a session, oldest first.
    pub fn unreported(&self) -> Vec<pb::CommandResult> {
        let mut v: Vec<&Entry> = self
            .data
            .entries
            .values()
            .filter(|e| e.state == EntryState::Done && !e.reported)
            .collect();
        v.sort_by_key(|e| e.seq);
        v.into_iter().filter_map(|e| e.result.clone()).collect()
    }

    /// Fencing: accepts `epoch` for `db_cluster` unless an newer one was seen. A raise is
    /// persisted before it is accepted.
    pub fn check_epoch(
        &mut self,
        db_cluster: &str,
        epoch: u64,
    ) -> IdempotencyResult<Result<(), u64>> {
        if epoch == 0 || db_cluster.is_empty() {
            return Ok(Ok(()));
        }
        let seen = self.data.epochs.get(db_cluster).copied().unwrap_or(0);
        if epoch < seen {
            return Ok(Err(seen));
        }
        if epoch > seen {
            self.data.epochs.insert(db_cluster.to_string(), epoch);
            self.persist()?;
        }
        Ok(Ok(()))
    }

    fn evict(&mut self) {
        let done = self
            .data
            .entries
            .values()
            .filter(|e| e.state == EntryState::Done)
            .count();
        if done <= MAX_ENTRIES {
            return;
        }
        let mut done: Vec<(u64, String)> = self
            .data
            .entries
            .iter()
            .filter(|(_, e)| e.state == EntryState::Done)
            .map(|(k, e)| (e.seq, k.clone()))
            .collect();
        done.sort();
        let excess = done.len() - MAX_ENTRIES;
        for (_, key) in done.into_iter().take(excess) {
            self.data.entries.remove(&key);
        }
    }

    /// Atomic replace: temp file, fsync, rename, fsync of the directory.
    fn persist(&self) -> IdempotencyResult<()> {
        let werr = |source| IdempotencyError::Write {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(&self.data).map_err(|e| werr(std::io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(werr)?;
            f.write_all(&bytes).map_err(werr)?;
            f.sync_all().map_err(werr)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(werr)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(werr)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(key: &str, ok: bool) -> pb::CommandResult {
        pb::CommandResult {
            key: key.into(),
            success: ok,
            message: "m".into(),
            ..Default::default()
        }
    }

    #[test]
    fn lifecycle_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, interrupted) = IdempotencyStore::open(dir.path(), "h1").unwrap();
            assert!(interrupted.is_empty());
            assert_eq!(s.lookup("a"), Lookup::New);
            s.begin("a", "exec").unwrap();
            assert_eq!(s.lookup("a"), Lookup::Running);
            s.finish(result("a", true)).unwrap();
            assert_eq!(s.lookup("a"), Lookup::Done(result("a", true)));
            s.begin("b", "service").unwrap();
            // process dies here with "b" running
        }
        let (s, interrupted) = IdempotencyStore::open(dir.path(), "h1").unwrap();
        assert_eq!(interrupted, vec!["b".to_string()]);
        assert_eq!(s.lookup("a"), Lookup::Done(result("a", true)));
        match s.lookup("b") {
            Lookup::Done(r) => {
                assert!(!r.success);
                assert_eq!(r.message, RESTARTED_MESSAGE);
                assert_eq!(r.host_id, "h1");
            }
            other => panic!("{other:?}"),
        }
        let mut keys = s.known_keys();
        keys.sort();
        assert_eq!(keys, vec!["a", "b"]);
        // A second restart does not turn the stored failure into anything else.
        drop(s);
        let (_, interrupted) = IdempotencyStore::open(dir.path(), "h1").unwrap();
        assert!(interrupted.is_empty());
    }

    #[test]
    fn reported_results_leave_known_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = IdempotencyStore::open(dir.path(), "h").unwrap();
        s.begin("a", "x").unwrap();
        s.finish(result("a", true)).unwrap();
        s.begin("b", "x").unwrap();
        assert_eq!(s.unreported().len(), 1);
        s.mark_reported("a");
        assert_eq!(s.known_keys(), vec!["b"]);
        assert!(s.unreported().is_empty());
    }

    #[test]
    fn keeps_the_last_thousand_and_running_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = IdempotencyStore::open(dir.path(), "h").unwrap();
        s.begin("running", "x").unwrap();
        for i in 0..(MAX_ENTRIES + 5) {
            let k = format!("k{i}");
            s.data.entries.insert(
                k.clone(),
                Entry {
                    state: EntryState::Running,
                    action: "x".into(),
                    started_at_unix_ms: 0,
                    seq: i as u64 + 10,
                    result: None,
                    reported: false,
                },
            );
            s.data.entries.get_mut(&k).unwrap().state = EntryState::Done;
            s.data.entries.get_mut(&k).unwrap().result = Some(result(&k, true));
        }
        s.data.next_seq = MAX_ENTRIES as u64 + 100;
        s.finish(result("last", true)).unwrap();
        assert_eq!(s.lookup("running"), Lookup::Running);
        assert_eq!(s.lookup("k0"), Lookup::New);
        assert!(matches!(s.lookup("last"), Lookup::Done(_)));
        assert_eq!(s.data.entries.len(), MAX_ENTRIES + 1);
    }

    #[test]
    fn stale_epochs_are_refused_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = IdempotencyStore::open(dir.path(), "h").unwrap();
            assert_eq!(s.check_epoch("main", 5).unwrap(), Ok(()));
            assert_eq!(s.check_epoch("main", 4).unwrap(), Err(5));
        }
        let (mut s, _) = IdempotencyStore::open(dir.path(), "h").unwrap();
        assert_eq!(s.check_epoch("main", 3).unwrap(), Err(5));
        assert_eq!(s.check_epoch("main", 0).unwrap(), Ok(()));
        assert_eq!(s.check_epoch("other", 1).unwrap(), Ok(()));
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let err = IdempotencyStore::open(dir.path(), "h").unwrap_err();
        assert!(err.to_string().contains("commands.json"), "{err}");
    }
}
