//! The coordinator's Raft layer: openraft with a SQLite log, JSON snapshots on disk and a
//! mutual-TLS gRPC network.
//!
//! Why a separate layer: the state machine (`crate::state`) is pure and knows nothing of
//! replication; handlers and controllers talk to [`RaftNode`] only, so the storage and
//! network underneath can change without touching them.
//!
//! ```text
//!  RaftNode ── openraft::Raft ─┬─ LogStore          <data_dir>/raft.db (sqlx, WAL, synchronous=FULL)
//!                              ├─ StateMachineStore State in memory, <data_dir>/snapshots/
//!                              └─ Network ──gRPC──► peers' RaftService (service.rs)
//! ```

pub mod batcher;
pub mod log_store;
pub mod network;
pub mod node;
pub mod service;
pub mod state_machine;
pub mod typ;

pub use node::{ClusterError, RaftNode, RaftNodeError, WriteError};
pub use typ::{NodeInfo, TypeConfig};

/// Metadata key naming the leader's node id on an `unavailable` answer.
pub const LEADER_ID_HEADER: &str = "x-dr-leader-id";
/// Metadata key naming the leader's endpoint on an `unavailable` answer (what drctl reads).
pub const LEADER_ENDPOINT_HEADER: &str = "x-dr-leader";

#[cfg(test)]
mod t10_storage;
#[cfg(test)]
pub(crate) mod t20_cluster;
