//! Outgoing Raft RPCs: openraft's `RaftNetworkFactory` over the `RaftService` gRPC.
//!
//! Every peer gets one lazily-connecting mutual-TLS channel, cached by address, so
//! replication streams and forwarded writes to the same peer share one HTTP/2
//! connection. Payloads are serde-JSON of openraft's request types; the answer is the
//! JSON of `Result<Response, RaftError>` so a remote Raft error (e.g. a higher vote)
//! reaches openraft as a `RemoteError`, not a network failure.
//!
//! Every completed RPC (outbound answered, or inbound from a coordinator, recorded by the
//! service) stamps the peer's last-contact time: `cluster status` derives `reachable`
//! from it, because replication progress alone keeps looking fine for a dead member.
//!
//! Errors that mean "could not reach the peer" map to `Unreachable`, which makes openraft
//! back off instead of hammering a dead node; anything else is a `NetworkError`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dr_proto::pb;
use dr_proto::pb::raft_service_client::RaftServiceClient;
use dr_proto::tls::ClientTls;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::typ::{NodeId, NodeInfo, TypeConfig};

/// Builds per-peer clients; cheap to clone.
#[derive(Clone)]
pub struct Network {
    tls: ClientTls,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    contact: Arc<Mutex<HashMap<NodeId, Instant>>>,
}

/// Failure of one call to a peer, before openraft's error types are chosen.
#[derive(Debug, thiserror::Error)]
pub enum PeerCallError {
    #[error("peer {addr} unreachable: {message}")]
    Unreachable { addr: String, message: String },
    #[error("peer {addr}: {status}")]
    Status { addr: String, status: tonic::Status },
    #[error("peer {addr}: bad payload: {message}")]
    Payload { addr: String, message: String },
}

impl Network {
    pub fn new(tls: ClientTls) -> Network {
        Network {
            tls,
            channels: Arc::default(),
            contact: Arc::default(),
        }
    }

    /// Records that `peer` answered us or called us just now.
    pub fn heard_from(&self, peer: NodeId) {
        let mut map = self.contact.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(peer, Instant::now());
    }

    /// When `peer` last answered or called us.
    pub fn last_contact(&self, peer: NodeId) -> Option<Instant> {
        let map = self.contact.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&peer).copied()
    }

    /// The cached channel to `addr`, created on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, PeerCallError> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let ch = self
            .tls
            .channel(addr)
            .map_err(|e| PeerCallError::Unreachable {
                addr: addr.to_owned(),
                message: e.to_string(),
            })?;
        map.insert(addr.to_owned(), ch.clone());
        Ok(ch)
    }

    /// A gRPC client of the Raft service at `addr`.
    pub fn client(&self, addr: &str) -> Result<RaftServiceClient<Channel>, PeerCallError> {
        Ok(RaftServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024))
    }
}

/// Maps a tonic status from a peer: connection-level failures become `Unreachable`.
pub fn classify_status(addr: &str, status: tonic::Status) -> PeerCallError {
    if status.code() == tonic::Code::Unavailable {
        PeerCallError::Unreachable {
            addr: addr.to_owned(),
            message: status.message().to_owned(),
        }
    } else {
        PeerCallError::Status {
            addr: addr.to_owned(),
            status,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            client: self.client(&node.addr),
            network: self.clone(),
        }
    }
}

/// The connection to one peer, as openraft uses it.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    client: Result<RaftServiceClient<Channel>, PeerCallError>,
    network: Network,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(e))),
        };
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(pb::RaftPayload { data });
        request.set_timeout(timeout);
        let mut client = client;
        let fut = async {
            match rpc {
                Rpc::Append => client.append_entries(request).await,
                Rpc::Vote => client.vote(request).await,
                Rpc::Snapshot => client.install_snapshot(request).await,
            }
        };
        let reply = match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(r)) => {
                self.network.heard_from(self.target);
                r.into_inner()
            }
            Ok(Err(status)) => {
                return Err(match classify_status(&self.addr, status) {
                    e @ PeerCallError::Unreachable { .. } => {
                        RPCError::Unreachable(Unreachable::new(&e))
                    }
                    e => RPCError::Network(NetworkError::new(&e)),
                });
            }
            Err(_elapsed) => {
                let e = PeerCallError::Unreachable {
                    addr: self.addr.clone(),
                    message: format!("no answer within {timeout:?}"),
                };
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&reply.data)
            .map_err(|e| {
                RPCError::Network(NetworkError::new(&PeerCallError::Payload {
                    addr: self.addr.clone(),
                    message: e.to_string(),
                }))
            })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.call(Rpc::Append, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }
}
