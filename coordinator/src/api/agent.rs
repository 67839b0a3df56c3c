//! Agent API: one long-lived bidirectional session per agent, held by the Raft leader.
//!
//! Why sessions end on the leader only: what agents report is kept in the leader's memory
//! ([`crate::registry`]) and only transitions are committed, so the node that decides must
//! be the node that hears. A follower answers `Redirect` and closes; a leader that loses
//! leadership closes every session with a `Redirect` (see [`crate::control`]).
//!
//! ```text
//!   agent                                     coordinator (leader)
//!     | -- Hello -------------------------------> |  authorise: cert host == Hello host
//!     |                                           |  register; commit HostUp if needed
//!     | <------------------------------ Welcome -- |
//!     | <---------------- Command(key) (resend) -- |  every open command of the host
//!     | -- Heartbeat(seq, checks) ---------------> |  registry; commit CheckTransitions
//!     | <--------------------- LeaseGrant(seq) --- |    only for changed checks
//!     | -- Ack / Progress / Result --------------> |  commit Acked (not awaited) / publish /
//!     |                                           |    commit Completed
//! ```
//!
//! The session task owns its inbound stream; the outbound side is an mpsc channel whose
//! sender is also in the registry, so the dispatcher and CancelAction can push to it.
//! The response stream ends when the task ends and the registry entry is disconnected.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::failover::LeaseDecision;
use dr_proto::identity::{Identity, SpiffeId};
use dr_proto::pb::{self, agent_message::Msg as AgentMsg, coordinator_message::Msg as CoordMsg};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use super::auth;
use super::error::ApiError;
use super::now_unix_ms;
use crate::Ctx;
use crate::metrics::ResultLabels;
use crate::registry::{CommandEvent, HostInfo, SessionId, SessionTx};
use crate::state::{self, Command, CommandState, HostState};

/// Messages buffered towards one agent before senders wait (or, for broadcasts, drop).
const SESSION_BUFFER: usize = 256;
/// How long an agent has to say Hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The AgentService implementation.
pub struct AgentApi {
    ctx: Arc<Ctx>,
}

impl AgentApi {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        AgentApi { ctx }
    }
}

type SessionStream =
    Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = dr_proto::tls::peer_identity(&req)?;
        let host_id = match &peer.identity {
            Identity::Agent { host_id } => host_id.clone(),
            other => {
                auth::refused(&self.ctx, "not_agent");
                return Err(Status::permission_denied(format!(
                    "{peer} is a {} certificate; only agent certificates may open an agent session",
                    other.kind()
                )));
            }
        };
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        // The Hello is read inside the task, after the response headers went out, so an
        // agent that waits for them before sending does not deadlock.
        let session = Session {
            ctx: self.ctx.clone(),
            peer,
            host_id: host_id.clone(),
            tx,
            revocations_sent: Default::default(),
        };
        tokio::spawn(
            session
                .run(inbound)
                .instrument(info_span!("agent_session", host = %host_id)),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| *m))))
    }
}

/// A boxed agent-report write (see `Session::write`).
type WriteFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(u64, state::Response), SessionError>> + Send + 'a>>;

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Refused(Status),
    #[error("agent went away")]
    Gone,
}

impl From<ApiError> for SessionError {
    fn from(e: ApiError) -> Self {
        SessionError::Refused(e.into())
    }
}

struct Session {
    ctx: Arc<Ctx>,
    peer: SpiffeId,
    host_id: String,
    tx: SessionTx,
    /// Size of the revocation set last sent to this agent (the set only grows).
    revocations_sent: std::sync::atomic::AtomicUsize,
}

impl Session {
    async fn run(self, mut inbound: Streaming<pb::AgentMessage>) {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage {
                msg: Some(AgentMsg::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                return self
                    .fail(Status::invalid_argument(
                        "the first message of a session must be Hello",
                    ))
                    .await;
            }
            Ok(Ok(None)) => return,
            Ok(Err(status)) => {
                debug!(error = %status, "agent stream failed before hello");
                return;
            }
            Err(_) => {
                return self
                    .fail(Status::deadline_exceeded("no Hello within 10s"))
                    .await;
            }
        };
        if hello.host_id != self.host_id {
            auth::refused(&self.ctx, "wrong_host");
            warn!(identity = %self.peer, claimed = %hello.host_id, "agent certificate tried to speak for another host");
            let msg = format!(
                "certificate {} may only speak for host {}, not for host {}",
                self.peer, self.host_id, hello.host_id
            );
            return self.fail(Status::permission_denied(msg)).await;
        }
        if self.ctx.registry.is_closing() {
            return self.redirect("this coordinator is shutting down").await;
        }
        if !self.ctx.node.is_leader() {
            return self.redirect("this coordinator is not the leader").await;
        }
        if self.ctx.node.quorum_lost_for().is_some() {
            return self
                .redirect("this coordinator has lost contact with the majority")
                .await;
        }

        let node_id = self.ctx.node.id();
        let info = HostInfo {
            region: hello.region.clone(),
            site: hello.site.clone(),
            roles: hello.roles.clone(),
            version: hello.version.clone(),
            incarnation: hello.incarnation,
            labels: hello.labels.clone(),
        };
        let (sid, cancel) = self.ctx.registry.register(
            &self.host_id,
            info,
            self.tx.clone(),
            node_id,
            Instant::now(),
            now_unix_ms(),
        );
        self.ctx.metrics.agent_sessions_total.inc();
        self.ctx
            .metrics
            .agents_connected
            .set(self.ctx.registry.connected() as i64);
        info!(session = %sid, incarnation = hello.incarnation, version = %hello.version, "agent session started");

        let result = self.serve(&hello, sid, &cancel, &mut inbound).await;
        self.ctx.registry.disconnect(&self.host_id, sid);
        self.ctx
            .metrics
            .agents_connected
            .set(self.ctx.registry.connected() as i64);
        match result {
            Ok(()) | Err(SessionError::Gone) => info!(session = %sid, "agent session ended"),
            Err(SessionError::Refused(status)) => {
                warn!(session = %sid, error = %status.message(), "agent session ended with an error");
                // Best effort: the agent may already be gone.
                self.tx.send(Box::new(Err(status))).await.ok();
            }
        }
    }

    async fn serve(
        &self,
        hello: &pb::Hello,
        sid: SessionId,
        cancel: &tokio_util::sync::CancellationToken,
        inbound: &mut Streaming<pb::AgentMessage>,
    ) -> Result<(), SessionError> {
        self.ensure_up(hello).await?;

        let (term, endpoints) = {
            let m = self.ctx.node.metrics();
            let m = m.borrow();
            let eps = m
                .membership_config
                .membership()
                .nodes()
                .map(|(_, n)| n.addr.clone())
                .collect::<Vec<_>>();
            (m.current_term, eps)
        };
        let interval = self.ctx.config.agents.heartbeat_interval;
        self.send(CoordMsg::Welcome(pb::Welcome {
            leader_id: self.ctx.node.id(),
            term,
            heartbeat_interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            coordinator_endpoints: endpoints,
        }))
        .await?;

        // Re-send every unfinished command: the agent deduplicates by key. Registered
        // before this read, so the dispatcher covers anything committed after it.
        let open: Vec<pb::Command> = self.ctx.node.read(|s| {
            s.commands
                .open_for_host(&self.host_id)
                .into_iter()
                .map(|c| c.to_wire())
                .collect()
        });
        if !open.is_empty() {
            debug!(count = open.len(), "re-sending open commands");
        }
        for c in open {
            self.send(CoordMsg::Command(c)).await?;
        }
        self.push_revocations().await?;

        loop {
            let msg = tokio::select! {
                // Replaced by a newer session, or closed because leadership moved.
                _ = cancel.cancelled() => return Ok(()),
                m = inbound.message() => m,
            };
            let msg = match msg {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(status) => {
                    debug!(error = %status, "agent stream failed");
                    return Err(SessionError::Gone);
                }
            };
            match msg.msg {
                Some(AgentMsg::Heartbeat(hb)) => self.heartbeat(hello, sid, hb).await?,
                Some(AgentMsg::Ack(a)) => self.acked(a.key),
                Some(AgentMsg::Progress(p)) => self.ctx.registry.publish(CommandEvent::Progress {
                    key: p.key.clone(),
                    host_id: self.host_id.clone(),
                    progress: p,
                }),
                Some(AgentMsg::Result(r)) => self.completed(r).await?,
                Some(AgentMsg::Hello(_)) => {
                    return Err(SessionError::Refused(Status::invalid_argument(
                        "Hello may only be sent once per session",
                    )));
                }
                None => debug!("empty agent message ignored"),
            }
        }
    }

    /// Commits HostUp unless the committed state already says up with this incarnation and
    /// metadata.
    async fn ensure_up(&self, hello: &pb::Hello) -> Result<(), SessionError> {
        let current = self.ctx.node.read(|s| {
            s.host(&self.host_id).is_some_and(|h| {
                h.state == HostState::Up
                    && h.incarnation == hello.incarnation
                    && h.region == hello.region
                    && h.site == hello.site
                    && h.roles == hello.roles
                    && h.version == hello.version
            })
        });
        if current {
            return Ok(());
        }
        self.write(Command::HostUp {
            host_id: self.host_id.clone(),
            region: hello.region.clone(),
            site: hello.site.clone(),
            roles: hello.roles.clone(),
            version: hello.version.clone(),
            incarnation: hello.incarnation,
        })
        .await
        .map(|_| ())
    }

    /// Sends the revocation set when it grew since the last one this agent got, so the
    /// agent refuses (and disconnects from) a coordinator whose old certificate was
    /// revoked. Nothing is sent while no certificate is revoked.
    async fn push_revocations(&self) -> Result<(), SessionError> {
        use std::sync::atomic::Ordering;
        let set: Vec<String> = self
            .ctx
            .node
            .read(|s| s.security.revoked.keys().cloned().collect());
        if set.len() == self.revocations_sent.load(Ordering::Relaxed) {
            return Ok(());
        }
        let n = set.len();
        self.send(CoordMsg::Revocations(pb::Revocations { sha256: set }))
            .await?;
        self.revocations_sent.store(n, Ordering::Relaxed);
        debug!(revoked = n, "revocation set sent to the agent");
        Ok(())
    }

    async fn heartbeat(
        &self,
        hello: &pb::Hello,
        sid: SessionId,
        hb: pb::Heartbeat,
    ) -> Result<(), SessionError> {
        if !self.ctx.node.is_leader() {
            self.redirect("leadership moved").await;
            return Err(SessionError::Gone);
        }
        self.push_revocations().await?;
        if self.ctx.node.quorum_lost_for().is_some() {
            self.redirect("this coordinator has lost contact with the majority")
                .await;
            return Err(SessionError::Gone);
        }
        if !self.ctx.registry.heartbeat(
            &self.host_id,
            sid,
            Instant::now(),
            now_unix_ms(),
            &hb.checks,
            &hb.facts,
        ) {
            // Replaced by a newer session of the same host.
            return Err(SessionError::Gone);
        }
        // Grant first: a slow commit below must not eat into the agent's lease. Only a
        // leader confirmed by a quorum very recently may renew (control::lease keeps the
        // confirmation fresh); otherwise the agent's lease runs down, as it must.
        let interval = self.ctx.config.agents.heartbeat_interval;
        if self
            .ctx
            .registry
            .leadership_confirmed_within(Instant::now(), interval)
        {
            // A database primary's lease carries its cluster's epoch and is recorded in the
            // lease book (control::failover) before it is sent; replicas and a primary
            // being failed over get none (docs/failover.md, "Leases and fencing").
            let decision = self.ctx.ops.grant_for(&self.host_id, || {
                self.ctx
                    .node
                    .read(|s| crate::control::failover::lease_for(s, &self.host_id))
            });
            let grant = match decision {
                LeaseDecision::Plain => Some((interval * 3, 0, String::new())),
                LeaseDecision::Primary {
                    cluster,
                    epoch,
                    lease,
                } => Some((lease, epoch, cluster)),
                LeaseDecision::Withheld => None,
            };
            if let Some((lease, epoch, db_cluster)) = grant {
                self.send(CoordMsg::Lease(pb::LeaseGrant {
                    seq: hb.seq,
                    lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
                    epoch,
                    db_cluster,
                }))
                .await?;
            }
        } else {
            debug!(
                seq = hb.seq,
                "leadership not confirmed recently, lease not renewed"
            );
        }

        let (up, changes) = self.ctx.node.read(|s| match s.host(&self.host_id) {
            None => (false, Vec::new()),
            Some(h) => {
                let changes: Vec<pb::CheckResult> = hb
                    .checks
                    .iter()
                    .filter(|c| !c.name.is_empty())
                    .filter(|c| {
                        h.checks
                            .get(&c.name)
                            .is_none_or(|old| old.state != state::topology::check_state(c))
                    })
                    .cloned()
                    .collect();
                (h.state == HostState::Up, changes)
            }
        });
        if !up {
            // The failure detector gave up on us while the session lived (e.g. a long
            // stall): the heartbeat proves otherwise.
            self.ensure_up(hello).await?;
        }
        if !changes.is_empty() {
            debug!(count = changes.len(), "committing check transitions");
            self.write(Command::CheckTransitions {
                host_id: self.host_id.clone(),
                changes,
            })
            .await?;
        }
        Ok(())
    }

    /// Commits the ack beside the session instead of in its loop.
    ///
    /// Why not awaited: the agent sends its result right behind the ack, and awaiting the
    /// ack's commit put a whole fsynced Raft round between the two, on the path of every
    /// command round trip (issue 2 fan-in: three sequential commits per round trip, now
    /// two). The ack only records that the agent has the command: exactly-once rests on the
    /// issue and result entries (the agent dedups by key, a result finishes a key once and
    /// itself implies the ack), re-sending on reconnect covers every unfinished command,
    /// acked or not, and an ack that commits after its result is a no-op (`Unchanged`).
    fn acked(&self, key: String) {
        if !self.owns(&key) {
            return;
        }
        let ctx = self.ctx.clone();
        let req = state::Request {
            at_unix_ms: now_unix_ms(),
            origin: self.peer.to_string(),
            cmd: Command::CommandAcked { key: key.clone() },
        };
        let host_id = self.host_id.clone();
        tokio::spawn(
            async move {
                match ctx.node.write(req).await {
                    Ok((_, state::Response::Applied)) => {
                        ctx.registry.publish(CommandEvent::Acked {
                            key,
                            host_id,
                            at_unix_ms: now_unix_ms(),
                        });
                    }
                    Ok((index, state::Response::Refused { refusal })) => {
                        warn!(index, reason = %refusal, "state machine refused agent ack");
                    }
                    Ok(_) => debug!(%key, "late or repeated ack, nothing to record"),
                    // The result (or the re-send after a reconnect) still settles the command.
                    Err(e) => debug!(%key, error = %e, "ack not committed"),
                }
            }
            .in_current_span(),
        );
    }

    async fn completed(&self, mut result: pb::CommandResult) -> Result<(), SessionError> {
        let key = result.key.clone();
        if !self.owns(&key) {
            return Ok(());
        }
        result.host_id.clone_from(&self.host_id);
        let (_, resp) = self
            .write(Command::CommandCompleted {
                key: key.clone(),
                result: result.clone(),
            })
            .await?;
        if resp != state::Response::Applied {
            debug!(%key, "duplicate or late result ignored");
            return Ok(());
        }
        let issued_at = self.ctx.node.read(|s| {
            s.commands
                .get(&key)
                .filter(|c| matches!(c.state, CommandState::Done | CommandState::Failed))
                .map(|c| c.issued_at_unix_ms)
        });
        if let Some(issued_at) = issued_at {
            let label = if result.success { "success" } else { "failure" };
            self.ctx
                .metrics
                .commands_completed_total
                .get_or_create(&ResultLabels {
                    result: label.to_owned(),
                })
                .inc();
            let secs = (now_unix_ms() - issued_at).max(0) as f64 / 1000.0;
            self.ctx.metrics.command_latency_seconds.observe(secs);
        }
        info!(%key, success = result.success, "command finished");
        self.ctx.registry.publish(CommandEvent::Result {
            key,
            host_id: self.host_id.clone(),
            result,
        });
        Ok(())
    }

    /// Whether `key` is a command of this host. An agent reporting on another host's
    /// command is ignored (and logged): it may only speak for itself.
    fn owns(&self, key: &str) -> bool {
        match self
            .ctx
            .node
            .read(|s| s.commands.get(key).map(|c| c.host_id.clone()))
        {
            Some(h) if h == self.host_id => true,
            Some(other) => {
                warn!(%key, owner = %other, "agent reported on a command of another host, ignored");
                false
            }
            None => {
                debug!(%key, "agent reported on an unknown command (aged out?), ignored");
                false
            }
        }
    }

    /// Commits an agent report. Returns a boxed future on purpose: every await point of
    /// the session holds its future inline, so a write (the command it carries, the leader
    /// check, group commit, forwarding to another leader: a few KiB) would size each of
    /// 10,000 mostly idle session tasks (issue 2 fan-in, RSS); writes are rare (transitions
    /// only), so the allocation is cheap.
    fn write(&self, cmd: Command) -> WriteFuture<'_> {
        Box::pin(async move {
            let what = cmd.name();
            let req = state::Request {
                at_unix_ms: now_unix_ms(),
                origin: self.peer.to_string(),
                cmd,
            };
            let (index, resp) = self.ctx.node.write(req).await.map_err(ApiError::from)?;
            if let state::Response::Refused { refusal } = &resp {
                warn!(what, index, reason = %refusal, "state machine refused agent report");
            }
            Ok((index, resp))
        })
    }

    /// Queues a message to the agent. Boxed before the await (not an `async fn`, whose
    /// argument would be stored inline in every session's future).
    fn send(&self, msg: CoordMsg) -> impl Future<Output = Result<(), SessionError>> + '_ {
        let item = Box::new(Ok(pb::CoordinatorMessage { msg: Some(msg) }));
        async move { self.tx.send(item).await.map_err(|_| SessionError::Gone) }
    }

    async fn fail(&self, status: Status) {
        // Best effort: the agent may already be gone.
        self.tx.send(Box::new(Err(status))).await.ok();
    }

    async fn redirect(&self, reason: &str) {
        let msg = redirect(&self.ctx, reason);
        debug!(reason, "redirecting agent");
        self.tx.send(Box::new(Ok(msg))).await.ok();
    }
}

/// The Redirect this node would send right now.
pub fn redirect(ctx: &Ctx, reason: &str) -> pb::CoordinatorMessage {
    let (leader_id, leader_endpoint, reason) = match ctx.node.leader() {
        Some((id, info)) if id != ctx.node.id() => (id, info.addr, reason.to_owned()),
        _ => (
            0,
            String::new(),
            format!("{reason}; no leader is known yet, retry shortly"),
        ),
    };
    pb::CoordinatorMessage {
        msg: Some(CoordMsg::Redirect(pb::Redirect {
            leader_id,
            leader_endpoint,
            reason,
        })),
    }
}
