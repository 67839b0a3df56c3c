//! Incoming Raft RPCs: the `RaftService` gRPC server.
//!
//! Only coordinators may call it: a valid agent or operator certificate of our CA must
//! still not be able to vote, append entries or bypass API authorisation through
//! `Forward`. Every RPC is authorised from the caller's certificate identity before its
//! payload is decoded.
//!
//! `Forward` carries a client write that a follower already authorised; the leader
//! commits it and answers with the JSON response and log index. A node that is no longer
//! leader answers `unavailable` with the leader in metadata, which the follower treats as
//! "retry elsewhere".

use std::sync::Arc;

use dr_proto::identity::Identity;
use dr_proto::pb;
use dr_proto::pb::raft_service_server::RaftService;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use super::batcher::LocalWriteError;
use super::node::{RaftNode, leader_metadata};
use crate::metrics::Metrics;

/// The `RaftService` implementation.
pub struct RaftApi {
    node: RaftNode,
    metrics: Arc<Metrics>,
}

impl RaftApi {
    pub fn new(node: RaftNode, metrics: Arc<Metrics>) -> RaftApi {
        RaftApi { node, metrics }
    }

    fn authorise<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let id = dr_proto::tls::peer_identity(req)?;
        match id.identity {
            Identity::Coordinator { node_id } => {
                self.node.network().heard_from(node_id);
                Ok(())
            }
            other => {
                self.metrics
                    .rpc_refused_total
                    .get_or_create(&crate::metrics::RefusedLabels {
                        reason: "raft_not_coordinator".to_owned(),
                    })
                    .inc();
                tracing::warn!(caller = %other.kind(), name = %other.name(), "refused raft rpc from non-coordinator");
                Err(Status::permission_denied(
                    "only coordinators may call the Raft API",
                ))
            }
        }
    }
}

fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(data)
        .map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<pb::RaftPayload>, Status> {
    let data = serde_json::to_vec(value)
        .map_err(|e| Status::internal(format!("encode raft payload: {e}")))?;
    Ok(Response::new(pb::RaftPayload { data }))
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn append_entries(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        self.authorise(&req)?;
        let rpc = decode(&req.get_ref().data)?;
        let res = self.node.raft().append_entries(rpc).await;
        encode(&res)
    }

    async fn vote(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        self.authorise(&req)?;
        let rpc = decode(&req.get_ref().data)?;
        let res = self.node.raft().vote(rpc).await;
        encode(&res)
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        self.authorise(&req)?;
        let rpc = decode(&req.get_ref().data)?;
        let res = self.node.raft().install_snapshot(rpc).await;
        encode(&res)
    }

    async fn forward(
        &self,
        req: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        self.authorise(&req)?;
        let command: crate::state::Request = decode(&req.get_ref().command)?;
        match self.node.write_local(command).await {
            Ok((log_index, data)) => {
                let response = serde_json::to_vec(&data)
                    .map_err(|e| Status::internal(format!("encode response: {e}")))?;
                Ok(Response::new(pb::ForwardResponse {
                    response,
                    log_index,
                }))
            }
            Err(LocalWriteError::ForwardToLeader { .. }) => {
                let mut status = Status::unavailable("this coordinator is not the leader");
                leader_metadata(&mut status, &self.node.leader());
                Err(status)
            }
            Err(LocalWriteError::ChangeMembership(e)) => Err(Status::failed_precondition(e)),
            Err(LocalWriteError::ShuttingDown) => {
                Err(Status::unavailable("this coordinator is shutting down"))
            }
            Err(LocalWriteError::Fatal(e)) => Err(Status::internal(format!("raft stopped: {e}"))),
        }
    }
}
