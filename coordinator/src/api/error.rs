//! The single map from domain errors to `tonic::Status`.
//!
//! Why one map: clients (drctl, agents) decide what to do from the gRPC code — retry
//! elsewhere on `unavailable`, give up on `invalid_argument` — so every handler must agree
//! on it. A non-leader that could not forward answers `unavailable` with the leader's
//! endpoint in metadata (`x-dr-leader`, plus RAFT's `x-dr-leader-id` and
//! `x-dr-leader-endpoint`), and drctl retries there once.

use tonic::{Code, Status};

use crate::raft::{ClusterError, NodeInfo, WriteError};
use crate::state::Refusal;

/// Metadata key drctl reads to retry at the leader (its `client::LEADER_HEADER`).
pub const LEADER_HEADER: &str = "x-dr-leader";

/// Everything a handler can fail with, before it becomes a `Status`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The answer the state machine gave does not fit the request (a bug, not the caller's
    /// fault).
    #[error("unexpected state machine response: {0}")]
    Unexpected(String),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let msg = e.to_string();
        match e {
            ApiError::Write(w) => match w {
                WriteError::NoLeader { .. }
                | WriteError::ShuttingDown
                | WriteError::LostMajority { .. } => Status::unavailable(msg),
                WriteError::Forward {
                    leader_id,
                    addr,
                    status,
                } => {
                    // Transport-ish failures: tell the caller where the leader is so it can
                    // go there directly. Anything else is the leader's verdict: keep its code.
                    if matches!(
                        status.code(),
                        Code::Unavailable
                            | Code::Unknown
                            | Code::DeadlineExceeded
                            | Code::Cancelled
                            | Code::Internal
                    ) {
                        let leader = Some((
                            leader_id,
                            NodeInfo {
                                addr,
                                region: String::new(),
                            },
                        ));
                        with_leader(Status::unavailable(msg), &leader)
                    } else {
                        Status::new(status.code(), status.message().to_owned())
                    }
                }
                WriteError::Encode(_) | WriteError::Fatal(_) => Status::internal(msg),
            },
            ApiError::Cluster(c) => match c {
                ClusterError::NotLeader { leader } => {
                    with_leader(Status::unavailable(msg), &leader)
                }
                ClusterError::NoQuorum(_) => Status::unavailable(msg),
                ClusterError::AlreadyInitialised { .. } => Status::already_exists(msg),
                ClusterError::InvalidMember(_) => Status::invalid_argument(msg),
                ClusterError::LastVoter(_) | ClusterError::Refused(_) => {
                    Status::failed_precondition(msg)
                }
                ClusterError::UnknownMember(_) => Status::not_found(msg),
                ClusterError::Fatal(_) => Status::internal(msg),
            },
            ApiError::Refused(r) => match r {
                Refusal::UnknownHost { .. } | Refusal::UnknownCommand { .. } => {
                    Status::not_found(msg)
                }
                Refusal::KeyConflict { .. } => Status::already_exists(msg),
                Refusal::AlreadyFinished { .. } => Status::failed_precondition(msg),
                Refusal::Invalid { .. } => Status::invalid_argument(msg),
            },
            ApiError::NotFound(_) => Status::not_found(msg),
            ApiError::InvalidArgument(_) => Status::invalid_argument(msg),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(msg),
            ApiError::Unexpected(_) => Status::internal(msg),
        }
    }
}

/// Attaches the leader's identity and endpoint to a status.
pub fn with_leader(mut status: Status, leader: &Option<(u64, NodeInfo)>) -> Status {
    crate::raft::node::leader_metadata(&mut status, leader);
    if let Some((_, info)) = leader
        && let Ok(v) = info.addr.parse()
    {
        status.metadata_mut().insert(LEADER_HEADER, v);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_codes() {
        let cases: Vec<(ApiError, Code)> = vec![
            (
                Refusal::UnknownHost {
                    host_id: "h".into(),
                }
                .into(),
                Code::NotFound,
            ),
            (
                Refusal::Invalid {
                    message: "x".into(),
                }
                .into(),
                Code::InvalidArgument,
            ),
            (ClusterError::LastVoter(1).into(), Code::FailedPrecondition),
            (WriteError::ShuttingDown.into(), Code::Unavailable),
            (WriteError::Fatal("x".into()).into(), Code::Internal),
            (ApiError::NotFound("x".into()), Code::NotFound),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }

    #[test]
    fn t20_forward_failure_names_leader() {
        let e = WriteError::Forward {
            leader_id: 2,
            addr: "127.0.0.1:7002".into(),
            status: Status::unavailable("connection refused"),
        };
        let s = Status::from(ApiError::from(e));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(LEADER_HEADER).unwrap(), "127.0.0.1:7002");

        let e = WriteError::Forward {
            leader_id: 2,
            addr: "127.0.0.1:7002".into(),
            status: Status::permission_denied("no"),
        };
        assert_eq!(
            Status::from(ApiError::from(e)).code(),
            Code::PermissionDenied
        );
    }
}
