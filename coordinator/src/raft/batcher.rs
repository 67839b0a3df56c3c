//! Group commit: concurrent writes on the leader share one Raft entry.
//!
//! Why: every Raft entry costs a pass of openraft's core loop on each node (channel hops,
//! a metrics broadcast, a response slot), a row in each node's SQLite log and a share of an
//! fsync. When the agents of a whole region report at once (a reconnect storm, a failover
//! moving every check), hundreds of small proposals arrive within a few milliseconds; one
//! entry per proposal makes the core loop, not the disk, the limit. So writes queue here
//! and a single task turns whatever has accumulated into ONE entry
//! ([`Command::Batch`]) while earlier batches are still being committed.
//!
//! ```text
//!   write ─┐                       ┌─► client_write(Batch[r1..rn]) ─► Response::Batch ─┐
//!   write ─┼─► queue ─► batcher ───┤   (at most MAX_IN_FLIGHT at a time)               ├─► each
//!   write ─┘      (drains ≤ MAX)   └─► client_write(r) when alone                       ┘   caller
//! ```
//!
//! Nothing waits for a batch to fill: a lone write goes out at once, unwrapped. Batching
//! only happens when writes arrive faster than entries commit, which is exactly when it
//! pays. Every request in a batch keeps its own origin, time and audit entry; the batch
//! shares one log index, so callers must not use the index as a unique id (nothing does:
//! `issued_index` is an ordering, and commands in one entry are issued together).

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::typ::{NodeId, Raft};
use crate::state::{Command, Request, Response};

/// Most requests in one entry (bounded so an entry stays well under the RPC size limits).
const MAX_BATCH: usize = 512;
/// Entries proposed and not yet committed; more waiting writes form the next batch.
const MAX_IN_FLIGHT: usize = 4;
/// Queue length before `submit` waits (back-pressure instead of unbounded memory).
const QUEUE: usize = 8192;

/// Why a locally proposed write failed. Cloneable, because one failure answers a whole
/// batch.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LocalWriteError {
    /// This node is not (or no longer) the leader: nothing was appended.
    #[error("this coordinator is not the leader (leader: {leader:?})")]
    ForwardToLeader { leader: Option<NodeId> },
    #[error("membership change refused: {0}")]
    ChangeMembership(String),
    #[error("raft stopped: {0}")]
    Fatal(String),
    #[error("shutting down")]
    ShuttingDown,
}

/// Where a caller waits for its write. A send fails only when the caller stopped waiting
/// (dropped its future), hence the `let _gone = reply.send(..)` below.
type Reply = oneshot::Sender<Result<(u64, Response), LocalWriteError>>;

/// Handle to the batching task. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<(Request, Reply)>,
}

impl Batcher {
    /// Spawns the batching task; it stops when `cancel` fires (queued writes then fail
    /// with [`LocalWriteError::ShuttingDown`]).
    pub fn start(raft: Raft, cancel: CancellationToken) -> Batcher {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, rx, cancel).instrument(tracing::info_span!("raft_batcher")));
        Batcher { tx }
    }

    /// Proposes `req` on this node (which must be the leader) and waits for its commit.
    ///
    /// Cancel safety: like `client_write`, dropping the future may leave the write
    /// committed or not.
    pub async fn submit(&self, req: Request) -> Result<(u64, Response), LocalWriteError> {
        if matches!(req.cmd, Command::Batch { .. }) {
            // Only this module builds batches; a nested one would be refused by apply.
            return Err(LocalWriteError::Fatal(
                "a batch cannot be submitted as a request".to_owned(),
            ));
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((req, reply))
            .await
            .map_err(|_| LocalWriteError::ShuttingDown)?;
        rx.await.map_err(|_| LocalWriteError::ShuttingDown)?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<(Request, Reply)>, cancel: CancellationToken) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        // Take a slot first: while all slots are busy, writes accumulate in the queue and
        // the next batch is bigger.
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = in_flight.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let first = tokio::select! {
            _ = cancel.cancelled() => break,
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            commit(&raft, batch).await;
            drop(permit);
        });
    }
    // Fail what is still queued so no caller waits forever.
    rx.close();
    while let Ok((_, reply)) = rx.try_recv() {
        let _gone = reply.send(Err(LocalWriteError::ShuttingDown));
    }
}

async fn commit(raft: &Raft, mut batch: Vec<(Request, Reply)>) {
    if batch.len() == 1 {
        if let Some((req, reply)) = batch.pop() {
            let res = raft
                .client_write(req)
                .await
                .map(|r| (r.log_id.index, r.data))
                .map_err(map_error);
            let _gone = reply.send(res);
        }
        return;
    }
    let n = batch.len();
    let (requests, replies): (Vec<Request>, Vec<Reply>) = batch.into_iter().unzip();
    let at_unix_ms = requests.iter().map(|r| r.at_unix_ms).max().unwrap_or(0);
    let wrapper = Request {
        at_unix_ms,
        origin: String::new(),
        cmd: Command::Batch { requests },
    };
    tracing::trace!(requests = n, "committing a batch");
    match raft.client_write(wrapper).await {
        Ok(r) => {
            let index = r.log_id.index;
            match r.data {
                Response::Batch { responses } if responses.len() == n => {
                    for (reply, resp) in replies.into_iter().zip(responses) {
                        let _gone = reply.send(Ok((index, resp)));
                    }
                }
                other => {
                    // apply answers a batch with one response per request; anything else
                    // is a bug, and the callers must not guess what was applied.
                    let e = LocalWriteError::Fatal(format!(
                        "batch of {n} requests at index {index} answered with {other:?}"
                    ));
                    tracing::error!(error = %e, "group commit");
                    for reply in replies {
                        let _gone = reply.send(Err(e.clone()));
                    }
                }
            }
        }
        Err(e) => {
            let e = map_error(e);
            for reply in replies {
                let _gone = reply.send(Err(e.clone()));
            }
        }
    }
}

fn map_error(
    e: RaftError<NodeId, ClientWriteError<NodeId, super::typ::NodeInfo>>,
) -> LocalWriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            LocalWriteError::ForwardToLeader {
                leader: f.leader_id,
            }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            LocalWriteError::ChangeMembership(e.to_string())
        }
        RaftError::Fatal(e) => LocalWriteError::Fatal(e.to_string()),
    }
}
