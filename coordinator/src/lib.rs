//! dr-coordinator: one member of the Raft cluster that decides for the YesLocker DR
//! control plane.
//!
//! What the cluster DECIDES (topology, host up/down transitions, commands and their
//! results, the audit trail) is a command in the replicated log and lives in
//! [`state::State`]. What agents merely REPORT (heartbeats, check results) lives in the
//! leader's memory in [`registry::Registry`]; only transitions become log entries, so ten
//! thousand agents heartbeating once a second do not mean ten thousand Raft writes a
//! second.
//!
//! Process layout (one task tree, one cancellation token):
//!
//! ```text
//!  gRPC server (mTLS) ── AgentService  ─┐
//!                     ── ControlService ─┼── Ctx { node: RaftNode, registry, metrics, config }
//!                     ── RaftService  ──┘
//!  leader-only controllers (control::run): failure detector, command dispatcher
//!  cert reloader, metrics endpoint
//! ```

pub mod api;
pub mod config;
pub mod control;
pub mod metrics;
pub mod raft;
pub mod registry;
pub mod server;
pub mod state;

use std::sync::Arc;

/// Everything a request handler or controller needs, shared by reference.
pub struct Ctx {
    pub config: Arc<config::Config>,
    pub node: raft::RaftNode,
    pub registry: registry::Registry,
    pub metrics: Arc<metrics::Metrics>,
    /// Failover leader memory: the lease book (see [`control::failover`]).
    pub ops: control::failover::OpsMemory,
    /// This node's TLS layers: the coordinator certificate rotation reloads them at once
    /// (before its old certificate is revoked), and revocations apply to both.
    pub tls: TlsHandles,
}

/// The server side (every port) and the client side (Raft peers, forwarding) of this node.
#[derive(Clone)]
pub struct TlsHandles {
    pub server: dr_proto::tls::ServerTls,
    pub client: dr_proto::tls::ClientTls,
}

pub use server::run;
