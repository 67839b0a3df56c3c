//! The coordinator's gRPC services, kept thin.
//!
//! Why thin: handlers authorise ([`auth`]), translate wire messages into state-machine
//! requests, and map every domain error through the one table in [`error`]. Decisions live
//! in [`crate::state`] and [`crate::control`], so they can be tested without a network.

pub mod agent;
pub mod auth;
pub mod backup;
pub mod control;
pub mod error;
pub mod incident;
pub mod operations;
pub mod response;
pub mod restore;
pub mod security;

use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::Ctx;
use error::ApiError;

/// Request metadata key: the caller accepts an answer this node cannot confirm with a
/// majority (a minority leader or a lagging follower during an incident).
pub const ALLOW_STALE_HEADER: &str = "x-dr-allow-stale";
/// Response metadata key set when the answer was given without that confirmation.
pub const STALE_HEADER: &str = "x-dr-stale";

/// How long a read waits for a quorum round before it gives up. A healthy leader confirms
/// in milliseconds; a leader cut off from its majority never does, and the caller (drctl)
/// should move on to the next endpoint well within its own timeout.
const READ_CONFIRM_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether a read's answer was confirmed with a quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Confirmed,
    /// Answered from this node's applied state, which may be behind the majority's.
    PossiblyStale,
}

impl Freshness {
    /// Wraps a read's answer, marking it in metadata when it may be stale.
    pub fn respond<T>(self, body: T) -> Response<T> {
        let mut resp = Response::new(body);
        if self == Freshness::PossiblyStale {
            resp.metadata_mut().insert(
                STALE_HEADER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        resp
    }
}

/// The one gate in front of every read of the replicated state.
///
/// Why: a coordinator cut off from its majority (or a lagging follower) still holds an
/// applied state that looks authoritative, and answering from it silently shows an
/// operator an old primary or a finished failover as running. So by default a read first
/// confirms leadership with a quorum ([`crate::raft::RaftNode::ensure_linearizable`]); a
/// follower answers `unavailable` naming the leader, and a node without a majority answers
/// `unavailable` too, so drctl tries its next endpoint. Only a caller that sent
/// [`ALLOW_STALE_HEADER`] gets the local answer, marked with [`STALE_HEADER`].
pub async fn read_guard<T>(ctx: &Ctx, req: &Request<T>) -> Result<Freshness, Status> {
    let allow_stale = req.metadata().get(ALLOW_STALE_HEADER).is_some();
    let outcome = tokio::time::timeout(READ_CONFIRM_TIMEOUT, ctx.node.ensure_linearizable()).await;
    let err = match outcome {
        Ok(Ok(())) => return Ok(Freshness::Confirmed),
        Ok(Err(e)) if e.is_fatal() => return Err(ApiError::from(e).into()),
        Ok(Err(e)) => ApiError::from(e),
        Err(_) => ApiError::Cluster(crate::raft::ClusterError::NoQuorum(format!(
            "this coordinator could not confirm with a majority within {}s that its state is current",
            READ_CONFIRM_TIMEOUT.as_secs()
        ))),
    };
    if allow_stale {
        tracing::debug!(error = %err, "answering a read from possibly stale state, as asked");
        return Ok(Freshness::PossiblyStale);
    }
    tracing::debug!(error = %err, "read refused: state not confirmed with a majority");
    Err(err.into())
}

/// Commits `cmd` as `origin` and waits (up to 5 s) until this node has applied it, so a read
/// right after sees it. Refusals come back as a response, not an error: the caller decides
/// what a refusal means for its RPC.
pub(crate) async fn propose(
    ctx: &Ctx,
    origin: &str,
    cmd: crate::state::Command,
) -> error::ApiResult<crate::state::Response> {
    let req = crate::state::Request {
        at_unix_ms: now_unix_ms(),
        origin: origin.to_owned(),
        cmd,
    };
    let (index, resp) = ctx.node.write(req).await?;
    let mut applied = ctx.node.applied();
    let _late =
        tokio::time::timeout(Duration::from_secs(5), applied.wait_for(|a| *a >= index)).await;
    Ok(resp)
}

/// Milliseconds since the Unix epoch from the system clock. Only proposers call this: the
/// state machine gets time from the request, never from a clock.
pub fn now_unix_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod t50_session;
#[cfg(test)]
mod t51_leader_change;
