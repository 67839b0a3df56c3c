//! The openraft type configuration of the coordinator cluster.
//!
//! Kept apart so every other raft file names one `TypeConfig` and the aliases below
//! instead of spelling openraft's generic parameters again.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// What the cluster remembers about a member: where to reach it and which failure domain
/// it lives in (the region decides whether automatic regional failover is safe).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `host:port` or `https://host:port` of its gRPC listener.
    pub addr: String,
    pub region: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.addr, self.region)
    }
}

openraft::declare_raft_types!(
    /// Types of the coordinator's Raft cluster.
    pub TypeConfig:
        D = crate::state::Request,
        R = crate::state::Response,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, NodeInfo>;
pub type RaftServerMetrics = openraft::metrics::RaftServerMetrics<NodeId, NodeInfo>;
