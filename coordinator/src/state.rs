//! The replicated state machine: everything the cluster DECIDES.
//!
//! Why a separate, pure module: every coordinator applies the same log entries in the same
//! order and must end with identical state, or a failover would be decided on a different
//! picture of the world depending on which node happens to lead. So this module does no
//! I/O, reads no clock and spawns nothing; time arrives only as [`Request::at_unix_ms`]
//! (stamped by the proposer) and the log index as an argument. That also makes it
//! testable by feeding requests and asserting on [`Response`]s, the way openraft tests its
//! `Engine`.
//!
//! Invariants kept by [`apply`]:
//! - a refused request changes nothing except appending one audit entry;
//! - a command key is issued at most once and finishes at most once (a second
//!   `CommandCompleted` is [`Response::Unchanged`]): this is what makes agent retries and
//!   drctl retries safe;
//! - check states are written only when they change, so heartbeats never grow the log.
//!
//! ```text
//!   RaftNode::write(Request) ──► log entry ──► apply(&mut State, index, &Request) ──► Response
//! ```

mod apply;
pub mod approvals;
pub mod audit;
pub mod catalog;
pub mod commands;
pub mod incidents;
pub mod operations;
pub mod security;
pub mod topology;
pub mod topology_spec;

use dr_proto::pb;
use serde::{Deserialize, Serialize};

pub use apply::apply;
pub use audit::{AuditEntry, AuditLog};
pub use commands::{CommandBook, CommandRecord, CommandState, HISTORY_PER_HOST};
pub use topology::{CheckRecord, Host, HostState};

/// One proposal to the state machine, as it travels through the Raft log.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Request {
    /// Wall-clock time chosen by the proposer; the only clock `apply` ever sees.
    pub at_unix_ms: i64,
    /// SPIFFE id of whoever asked (operator, agent, or this coordinator's controllers).
    pub origin: String,
    pub cmd: Command,
}

/// Everything that can change [`State`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// An agent session started: the host is up (registers it when new).
    HostUp {
        host_id: String,
        region: String,
        site: String,
        roles: Vec<String>,
        version: String,
        incarnation: u64,
    },
    /// The failure detector gave up on the host.
    HostDown {
        host_id: String,
        reason: String,
    },
    /// Checks whose state differs from the committed one (the proposer filters, `apply`
    /// filters again so a stale proposal cannot write a non-transition).
    CheckTransitions {
        host_id: String,
        changes: Vec<pb::CheckResult>,
    },
    /// One command per target host; keys are chosen by the proposer.
    IssueCommands {
        commands: Vec<NewCommand>,
    },
    CommandAcked {
        key: String,
    },
    CommandCompleted {
        key: String,
        result: pb::CommandResult,
    },
    CancelCommand {
        key: String,
        reason: String,
    },
    /// Every open command whose deadline is at or before `now` becomes expired.
    ExpireCommands {
        now: i64,
    },
    /// Backup catalog, policy and schedule marks (see [`catalog`]).
    Backup(catalog::BackupCommand),
    /// Topology, database-cluster epochs and durable plans (see [`operations`]).
    Ops(operations::OpsCommand),
    /// Two-person approvals: policy, requests, decisions (see [`approvals`]).
    Approvals(approvals::ApprovalCommand),
    /// Isolation, revocations, monitoring level, alerts (see [`security`]).
    Security(security::SecurityCommand),
    /// Incidents P0-P3: open, notes, level changes, resolution (see [`incidents`]).
    Incident(incidents::IncidentCommand),
    /// Several requests committed as one entry by the leader's group commit
    /// (`raft/batcher.rs`); each is applied and audited as if it had its own entry.
    Batch {
        requests: Vec<Request>,
    },
}

impl Command {
    /// Short snake_case name, used by the audit log and in logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::HostUp { .. } => "host_up",
            Command::HostDown { .. } => "host_down",
            Command::CheckTransitions { .. } => "check_transitions",
            Command::IssueCommands { .. } => "issue_commands",
            Command::CommandAcked { .. } => "command_acked",
            Command::CommandCompleted { .. } => "command_completed",
            Command::CancelCommand { .. } => "cancel_command",
            Command::ExpireCommands { .. } => "expire_commands",
            Command::Backup(_) => "backup",
            Command::Ops(o) => o.name(),
            Command::Approvals(a) => a.name(),
            Command::Security(s) => s.name(),
            Command::Incident(i) => i.name(),
            Command::Batch { .. } => "batch",
        }
    }
}

/// A command to issue, as proposed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NewCommand {
    pub key: String,
    pub host_id: String,
    pub action: pb::Action,
    pub deadline_unix_ms: i64,
    /// Client-chosen request id (empty when none): a retried RunAction finds its commands
    /// by it instead of issuing them again.
    #[serde(default)]
    pub request_id: String,
}

/// What applying a [`Request`] did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The state changed.
    Applied,
    /// Valid, but there was nothing to change (a repeat, or a non-transition).
    Unchanged,
    /// `IssueCommands`: keys created now, and keys that already existed (a retry).
    Issued {
        issued: Vec<String>,
        existing: Vec<String>,
    },
    /// `ExpireCommands`: the keys that expired.
    Expired { keys: Vec<String> },
    /// Nothing changed; the reason is for the caller.
    Refused { refusal: Refusal },
    /// `Batch`: one response per request, in order.
    Batch { responses: Vec<Response> },
}

/// Why a request was refused. The API layer maps each variant to a gRPC code.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Refusal {
    #[error("host {host_id} is not known to the cluster")]
    UnknownHost { host_id: String },
    #[error("command {key} is not known (it may have aged out of the history)")]
    UnknownCommand { key: String },
    #[error("command key {key} already belongs to host {host_id}")]
    KeyConflict { key: String, host_id: String },
    #[error("command {key} already finished as {state}")]
    AlreadyFinished { key: String, state: CommandState },
    #[error("invalid request: {message}")]
    Invalid { message: String },
}

impl Response {
    pub fn refused(refusal: Refusal) -> Self {
        Response::Refused { refusal }
    }
}

/// The decided state of the cluster.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub hosts: std::collections::BTreeMap<String, Host>,
    pub commands: CommandBook,
    pub audit: AuditLog,
    /// Backup catalog and policy; `default` so snapshots from before it load.
    #[serde(default)]
    pub catalog: catalog::Catalog,
    /// Topology, primaries and epochs, operations; `default` so older snapshots load.
    #[serde(default)]
    pub ops: operations::OpsState,
    /// Approval policy and requests; `default` so older snapshots load.
    #[serde(default)]
    pub approvals: approvals::ApprovalBook,
    /// Security response; `default` so older snapshots load.
    #[serde(default)]
    pub security: security::SecurityState,
    /// Incidents; `default` so older snapshots load.
    #[serde(default)]
    pub incidents: incidents::IncidentBook,
}

impl State {
    pub fn host(&self, host_id: &str) -> Option<&Host> {
        self.hosts.get(host_id)
    }

    /// Hosts matching a selector (empty fields match everything), in host-id order.
    pub fn select<'a>(&'a self, sel: &'a pb::Selector) -> impl Iterator<Item = &'a Host> + 'a {
        self.hosts.values().filter(move |h| h.matches(sel))
    }
}
