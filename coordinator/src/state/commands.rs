//! Commands issued to agents, from issue to their single final state.
//!
//! Why here and not only in the leader's memory: a command that was issued must be
//! re-sent by whichever coordinator leads next, and its result must be reported once,
//! whoever leads. The idempotency key is the identity: an agent never runs a key twice
//! and the book never finishes a key twice.
//!
//! ```text
//!   pending ──ack──► acked ──result──► done | failed
//!      │               │
//!      └──cancel/expire┴──────────────► cancelled | expired
//! ```
//!
//! Finished commands are kept per host up to [`HISTORY_PER_HOST`]; older ones are dropped
//! so the state (and every snapshot) stays bounded however long the cluster runs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use dr_proto::pb;
use serde::{Deserialize, Serialize};

/// Finished commands kept per host.
pub const HISTORY_PER_HOST: usize = 50;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    Pending,
    Acked,
    Done,
    Failed,
    Cancelled,
    Expired,
}

impl CommandState {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Pending => "pending",
            CommandState::Acked => "acked",
            CommandState::Done => "done",
            CommandState::Failed => "failed",
            CommandState::Cancelled => "cancelled",
            CommandState::Expired => "expired",
        }
    }

    pub fn is_finished(self) -> bool {
        !matches!(self, CommandState::Pending | CommandState::Acked)
    }
}

impl fmt::Display for CommandState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CommandRecord {
    pub key: String,
    pub host_id: String,
    pub action: pb::Action,
    /// Log index of the `IssueCommands` entry: orders commands and lets the dispatcher find
    /// the ones issued since it last looked.
    pub issued_index: u64,
    pub issued_at_unix_ms: i64,
    pub deadline_unix_ms: i64,
    pub issued_by: String,
    pub request_id: String,
    pub state: CommandState,
    pub acked_at_unix_ms: Option<i64>,
    pub finished_at_unix_ms: Option<i64>,
    /// Why it was cancelled or expired.
    pub reason: String,
    pub result: Option<pb::CommandResult>,
    /// Fencing epoch of `db_cluster` when the command was issued by a plan (0: none).
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub db_cluster: String,
}

impl CommandRecord {
    pub fn to_info(&self) -> pb::CommandInfo {
        pb::CommandInfo {
            key: self.key.clone(),
            host_id: self.host_id.clone(),
            action: Some(self.action.clone()),
            state: self.state.as_str().to_owned(),
            issued_at_unix_ms: self.issued_at_unix_ms,
            deadline_unix_ms: self.deadline_unix_ms,
            issued_by: self.issued_by.clone(),
            result: self.result.clone(),
        }
    }

    /// The wire form sent to the agent.
    pub fn to_wire(&self) -> pb::Command {
        pb::Command {
            key: self.key.clone(),
            action: Some(self.action.clone()),
            deadline_unix_ms: self.deadline_unix_ms,
            epoch: self.epoch,
            db_cluster: self.db_cluster.clone(),
        }
    }
}

/// All known commands, indexed for the questions the coordinator asks.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CommandBook {
    by_key: BTreeMap<String, CommandRecord>,
    /// Keys not yet finished, per host (what a reconnecting agent must be sent again).
    open_by_host: BTreeMap<String, BTreeSet<String>>,
    /// Finished keys per host, oldest first, at most [`HISTORY_PER_HOST`].
    finished_by_host: BTreeMap<String, VecDeque<String>>,
}

impl CommandBook {
    pub fn get(&self, key: &str) -> Option<&CommandRecord> {
        self.by_key.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &CommandRecord> {
        self.by_key.values()
    }

    /// Unfinished commands of one host, in issue order.
    pub fn open_for_host(&self, host_id: &str) -> Vec<&CommandRecord> {
        let mut v: Vec<&CommandRecord> = self
            .open_by_host
            .get(host_id)
            .into_iter()
            .flatten()
            .filter_map(|k| self.by_key.get(k))
            .collect();
        v.sort_by_key(|c| c.issued_index);
        v
    }

    /// Every unfinished command.
    pub fn open(&self) -> impl Iterator<Item = &CommandRecord> {
        self.open_by_host
            .values()
            .flatten()
            .filter_map(|k| self.by_key.get(k))
    }

    /// Commands carrying a client request id.
    pub fn by_request_id<'a>(
        &'a self,
        request_id: &'a str,
    ) -> impl Iterator<Item = &'a CommandRecord> + 'a {
        self.by_key
            .values()
            .filter(move |c| !request_id.is_empty() && c.request_id == request_id)
    }

    pub(super) fn insert(&mut self, rec: CommandRecord) {
        debug_assert!(!rec.state.is_finished(), "commands are inserted open");
        self.open_by_host
            .entry(rec.host_id.clone())
            .or_default()
            .insert(rec.key.clone());
        self.by_key.insert(rec.key.clone(), rec);
    }

    pub(super) fn get_mut(&mut self, key: &str) -> Option<&mut CommandRecord> {
        self.by_key.get_mut(key)
    }

    /// Moves an open command to a final state and trims that host's history.
    pub(super) fn finish(&mut self, key: &str, state: CommandState, at_unix_ms: i64) {
        debug_assert!(state.is_finished());
        let Some(rec) = self.by_key.get_mut(key) else {
            return;
        };
        debug_assert!(!rec.state.is_finished(), "a command finishes once");
        rec.state = state;
        rec.finished_at_unix_ms = Some(at_unix_ms);
        let host = rec.host_id.clone();
        if let Some(open) = self.open_by_host.get_mut(&host) {
            open.remove(key);
            if open.is_empty() {
                self.open_by_host.remove(&host);
            }
        }
        let hist = self.finished_by_host.entry(host).or_default();
        hist.push_back(key.to_owned());
        while hist.len() > HISTORY_PER_HOST {
            if let Some(old) = hist.pop_front() {
                self.by_key.remove(&old);
            }
        }
    }
}
