//! Control API: what drctl speaks.
//!
//! Why any node answers: an operator in a cut-off region must still see what its local
//! coordinator knows. Reads are served from this node's applied state and say whether they
//! were linearizable; writes go through [`crate::raft::RaftNode::write`], which forwards to
//! the leader. Live agent details (connected, last heartbeat, facts) exist only in the
//! leader's memory, so a follower answers with committed state alone.
//!
//! RunAction is idempotent per `request_id`: a retried drctl call finds the commands it
//! already issued and streams them instead of issuing again.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dr_proto::identity::SpiffeId;
use dr_proto::pb::{self, action_event::Event};
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span};

use super::auth::{Permission, authorize};
use super::error::{ApiError, ApiResult};
use super::now_unix_ms;
use crate::Ctx;
use crate::registry::{CommandEvent, SessionView};
use crate::state::{
    self, Command, CommandRecord, CommandState, Host, HostState, NewCommand, Refusal,
};

/// Default page size of ListCommands.
const LIST_COMMANDS_DEFAULT: usize = 100;
/// How long a handler waits for its own write to be applied on this node.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// How long a waiting RunAction keeps streaming after the commands' deadline, so the
/// expiry (committed by the leader's expiry loop) can still be reported.
const WAIT_GRACE: Duration = Duration::from_secs(3);

/// The ControlService implementation.
pub struct ControlApi {
    ctx: Arc<Ctx>,
}

impl ControlApi {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        ControlApi { ctx }
    }

    async fn write(&self, origin: &SpiffeId, cmd: Command) -> ApiResult<(u64, state::Response)> {
        let req = state::Request {
            at_unix_ms: now_unix_ms(),
            origin: origin.to_string(),
            cmd,
        };
        let (index, resp) = self.ctx.node.write(req).await?;
        self.wait_applied(index).await;
        Ok((index, resp))
    }

    /// Waits until this node applied `index`, so a read right after our own write sees it
    /// (a follower applies after the leader answered). Bounded: on timeout the caller
    /// reads what is there.
    async fn wait_applied(&self, index: u64) {
        let mut applied = self.ctx.node.applied();
        let waited = tokio::time::timeout(APPLY_WAIT, applied.wait_for(|a| *a >= index)).await;
        if waited.is_err() {
            debug!(
                index,
                "own write not applied here yet, answering from current state"
            );
        }
    }

    /// Live view of hosts, only on the leader (a follower's registry is empty or stale).
    fn live(&self) -> Option<BTreeMap<String, SessionView>> {
        self.ctx.node.is_leader().then(|| {
            self.ctx
                .registry
                .views()
                .into_iter()
                .map(|v| (v.host_id.clone(), v))
                .collect()
        })
    }
}

type ActionStream = Pin<Box<dyn Stream<Item = Result<pb::ActionEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::control_service_server::ControlService for ControlApi {
    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let id = authorize(&self.ctx, &req, "WhoAmI", Permission::WhoAmI)?;
        Ok(Response::new(pb::WhoAmIResponse {
            identity: id.to_string(),
            kind: id.identity.kind().to_owned(),
            name: id.identity.name(),
            role: id
                .identity
                .role()
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default(),
            answered_by: self.ctx.node.id(),
        }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        authorize(&self.ctx, &req, "Status", Permission::Read)?;
        let linearizable = req.get_ref().linearizable;
        if linearizable {
            self.ctx
                .node
                .ensure_linearizable()
                .await
                .map_err(ApiError::from)?;
        }
        let cluster = self
            .ctx
            .node
            .cluster_status(false)
            .await
            .map_err(ApiError::from)?;
        let live = self.live();
        let mut resp = self
            .ctx
            .node
            .read(|s| build_status(s, live.as_ref(), &cluster));
        resp.answered_by = self.ctx.node.id();
        resp.linearizable = linearizable;
        if !linearizable {
            resp.notes.push("answered from this node's applied state without confirming leadership (ask with --linearizable for a confirmed answer)".to_owned());
        }
        // Failover: why automatic failover is refused, and what waits for an operator.
        resp.notes
            .extend(self.ctx.node.read(crate::state::operations::status_notes));
        // Fenced members and split-brain warnings, from the members' live facts (leader).
        if let Some(live) = &live {
            resp.notes.extend(self.ctx.node.read(|s| {
                crate::control::failover::member_notes(s, |h| {
                    live.get(h).filter(|v| v.connected).map(|v| v.facts.clone())
                })
            }));
        }
        if live.is_none() {
            resp.notes.push(match self.ctx.node.leader() {
                Some((id, info)) => format!(
                    "this node is a follower: live agent details are on the leader, node {id} at {}",
                    info.addr
                ),
                None => "no leader is elected: agent states may be stale".to_owned(),
            });
        }
        Ok(Response::new(resp))
    }

    async fn cluster_init(
        &self,
        req: Request<pb::ClusterInitRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let id = authorize(&self.ctx, &req, "ClusterInit", Permission::Admin)?;
        info!(identity = %id, "cluster init requested");
        let members = req.into_inner().members;
        Ok(Response::new(
            self.ctx
                .node
                .cluster_init(members)
                .await
                .map_err(ApiError::from)?,
        ))
    }

    async fn cluster_add_node(
        &self,
        req: Request<pb::ClusterAddNodeRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let id = authorize(&self.ctx, &req, "ClusterAddNode", Permission::Admin)?;
        let r = req.into_inner();
        let member = r.member.ok_or_else(|| {
            ApiError::InvalidArgument(
                "ClusterAddNode needs a member (node_id, addr, region)".into(),
            )
        })?;
        info!(identity = %id, node_id = member.node_id, addr = %member.addr, "add node requested");
        Ok(Response::new(
            self.ctx
                .node
                .add_node(member, r.learner_only)
                .await
                .map_err(ApiError::from)?,
        ))
    }

    async fn cluster_remove_node(
        &self,
        req: Request<pb::ClusterRemoveNodeRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let id = authorize(&self.ctx, &req, "ClusterRemoveNode", Permission::Admin)?;
        let node_id = req.get_ref().node_id;
        info!(identity = %id, node_id, "remove node requested");
        Ok(Response::new(
            self.ctx
                .node
                .remove_node(node_id)
                .await
                .map_err(ApiError::from)?,
        ))
    }

    async fn cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        authorize(&self.ctx, &req, "ClusterStatus", Permission::Read)?;
        let lin = req.get_ref().linearizable;
        Ok(Response::new(
            self.ctx
                .node
                .cluster_status(lin)
                .await
                .map_err(ApiError::from)?,
        ))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        authorize(&self.ctx, &req, "ListAgents", Permission::Read)?;
        let sel = req.into_inner().selector.unwrap_or_default();
        let live = self.live();
        let agents = self.ctx.node.read(|s| {
            s.select(&sel)
                .map(|h| agent_info(h, live.as_ref()))
                .collect()
        });
        Ok(Response::new(pb::ListAgentsResponse {
            agents,
            linearizable: false,
            answered_by: self.ctx.node.id(),
        }))
    }

    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::AgentInfo>, Status> {
        authorize(&self.ctx, &req, "GetAgent", Permission::Read)?;
        let host_id = req.into_inner().host_id;
        // One host: copy its entry only, not the whole registry.
        let live = self.ctx.node.is_leader().then(|| {
            self.ctx
                .registry
                .view(&host_id)
                .map(|v| (v.host_id.clone(), v))
                .into_iter()
                .collect::<BTreeMap<_, _>>()
        });
        let found = self.ctx.node.read(|s| match s.host(&host_id) {
            Some(h) => Ok(agent_info(h, live.as_ref())),
            None => Err(unknown_host_hint(s, &host_id)),
        });
        Ok(Response::new(found.map_err(ApiError::NotFound)?))
    }

    type RunActionStream = ActionStream;

    async fn run_action(
        &self,
        req: Request<pb::RunActionRequest>,
    ) -> Result<Response<Self::RunActionStream>, Status> {
        let origin = authorize(&self.ctx, &req, "RunAction", Permission::Act)?;
        // Acks, progress and results stream from the leader's live sessions: a follower
        // would stream nothing (issue 2, defect 1). Send the caller to the leader (drctl
        // retries there with the same request id), and refuse on a leader cut off from
        // the majority, whose agents are roaming away.
        if !self.ctx.node.is_leader() {
            return Err(ApiError::from(crate::raft::ClusterError::NotLeader {
                leader: self.ctx.node.leader(),
            })
            .into());
        }
        if let Some(lost) = self.ctx.node.quorum_lost_for() {
            return Err(ApiError::from(crate::raft::WriteError::LostMajority {
                for_ms: u64::try_from(lost.as_millis()).unwrap_or(u64::MAX),
            })
            .into());
        }
        let r = req.into_inner();
        let action = r.action.filter(|a| a.kind.is_some()).ok_or_else(|| {
            ApiError::InvalidArgument(
                "RunAction needs an action (run-checks, service, exec, ...)".into(),
            )
        })?;
        let timeout = if r.timeout_ms == 0 {
            self.ctx.config.agents.command_timeout
        } else {
            Duration::from_millis(r.timeout_ms)
        };
        let selector = r.selector.unwrap_or_default();
        // Subscribe before committing so no progress published after the commit is missed.
        let events = self.ctx.registry.subscribe();

        // A retried call with the same request id: stream what was issued, issue nothing.
        let existing: Vec<(String, String, u64, i64)> = if r.request_id.is_empty() {
            Vec::new()
        } else {
            self.ctx.node.read(|s| {
                s.commands
                    .by_request_id(&r.request_id)
                    .map(|c| {
                        (
                            c.key.clone(),
                            c.host_id.clone(),
                            c.issued_index,
                            c.deadline_unix_ms,
                        )
                    })
                    .collect()
            })
        };
        let issued: Vec<(String, String, u64, i64)> = if !existing.is_empty() {
            info!(request_id = %r.request_id, count = existing.len(), "run action retried, not issuing again");
            existing
        } else {
            let hosts = self.ctx.node.read(|s| {
                let hosts: Vec<String> = s.select(&selector).map(|h| h.host_id.clone()).collect();
                if hosts.is_empty() {
                    Err(empty_selection(s, &selector))
                } else {
                    Ok(hosts)
                }
            });
            let hosts = hosts.map_err(ApiError::FailedPrecondition)?;
            let prefix = if r.request_id.is_empty() {
                uuid::Uuid::new_v4().to_string()
            } else {
                r.request_id.clone()
            };
            let deadline =
                now_unix_ms() + i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 2);
            let commands: Vec<NewCommand> = hosts
                .iter()
                .map(|h| NewCommand {
                    key: format!("{prefix}-{h}"),
                    host_id: h.clone(),
                    action: action.clone(),
                    deadline_unix_ms: deadline,
                    request_id: r.request_id.clone(),
                })
                .collect();
            let (index, resp) = self
                .write(&origin, Command::IssueCommands { commands })
                .await?;
            let keys = match resp {
                state::Response::Issued { issued, existing } => {
                    issued
                        .len()
                        .try_into()
                        .map(|n| self.ctx.metrics.commands_issued_total.inc_by(n))
                        .ok();
                    issued.into_iter().chain(existing).collect::<HashSet<_>>()
                }
                state::Response::Refused { refusal } => {
                    return Err(ApiError::Refused(refusal).into());
                }
                other => return Err(ApiError::Unexpected(format!("{other:?}")).into()),
            };
            info!(identity = %origin, count = keys.len(), index, "commands issued");
            self.ctx.node.read(|s| {
                let mut v: Vec<_> = keys
                    .iter()
                    .filter_map(|k| s.commands.get(k))
                    .map(|c| {
                        (
                            c.key.clone(),
                            c.host_id.clone(),
                            c.issued_index,
                            c.deadline_unix_ms,
                        )
                    })
                    .collect();
                v.sort();
                v
            })
        };

        let (tx, rx) = mpsc::channel(256);
        let watcher = Watcher {
            ctx: self.ctx.clone(),
            tx,
            issued,
            wait: r.wait,
            timeout: timeout + WAIT_GRACE,
        };
        tokio::spawn(watcher.run(events).instrument(info_span!("run_action")));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_action(
        &self,
        req: Request<pb::CancelActionRequest>,
    ) -> Result<Response<pb::CancelActionResponse>, Status> {
        let origin = authorize(&self.ctx, &req, "CancelAction", Permission::Act)?;
        let r = req.into_inner();
        let reason = if r.reason.is_empty() {
            format!("cancelled by {origin}")
        } else {
            r.reason
        };
        let (_, resp) = self
            .write(
                &origin,
                Command::CancelCommand {
                    key: r.key.clone(),
                    reason: reason.clone(),
                },
            )
            .await?;
        match resp {
            state::Response::Applied => {
                info!(identity = %origin, key = %r.key, "command cancelled");
                // The leader's dispatcher also pushes the cancel; sending here is faster
                // when this node holds the session, and agents treat repeats as no-ops.
                let host = self
                    .ctx
                    .node
                    .read(|s| s.commands.get(&r.key).map(|c| c.host_id.clone()));
                if let Some(tx) = host.and_then(|h| self.ctx.registry.sender(&h)) {
                    let msg = pb::CoordinatorMessage {
                        msg: Some(pb::coordinator_message::Msg::Cancel(pb::CancelCommand {
                            key: r.key.clone(),
                            reason,
                        })),
                    };
                    if tx.try_send(Box::new(Ok(msg))).is_err() {
                        debug!(key = %r.key, "session busy or closed, the dispatcher will retry the cancel");
                    }
                }
                Ok(Response::new(pb::CancelActionResponse {
                    cancelled: true,
                    state: CommandState::Cancelled.to_string(),
                }))
            }
            state::Response::Refused {
                refusal: Refusal::AlreadyFinished { state, .. },
            } => Ok(Response::new(pb::CancelActionResponse {
                cancelled: false,
                state: state.to_string(),
            })),
            state::Response::Refused { refusal } => Err(ApiError::Refused(refusal).into()),
            other => Err(ApiError::Unexpected(format!("{other:?}")).into()),
        }
    }

    async fn list_commands(
        &self,
        req: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        authorize(&self.ctx, &req, "ListCommands", Permission::Read)?;
        let r = req.into_inner();
        let limit = if r.limit == 0 {
            LIST_COMMANDS_DEFAULT
        } else {
            r.limit as usize
        };
        let commands = self.ctx.node.read(|s| {
            let mut v: Vec<&CommandRecord> = s
                .commands
                .iter()
                .filter(|c| r.host_id.is_empty() || c.host_id == r.host_id)
                .filter(|c| !r.pending_only || !c.state.is_finished())
                .collect();
            v.sort_by(|a, b| {
                b.issued_index
                    .cmp(&a.issued_index)
                    .then_with(|| a.key.cmp(&b.key))
            });
            v.into_iter()
                .take(limit)
                .map(CommandRecord::to_info)
                .collect()
        });
        Ok(Response::new(pb::ListCommandsResponse { commands }))
    }
}

/// Streams what happens to the commands of one RunAction.
struct Watcher {
    ctx: Arc<Ctx>,
    tx: mpsc::Sender<Result<pb::ActionEvent, Status>>,
    /// (key, host, log index, deadline)
    issued: Vec<(String, String, u64, i64)>,
    wait: bool,
    timeout: Duration,
}

impl Watcher {
    async fn run(self, mut events: broadcast::Receiver<CommandEvent>) {
        for (key, host, index, deadline) in &self.issued {
            let ev = Event::Issued(pb::Issued {
                log_index: *index,
                deadline_unix_ms: *deadline,
            });
            if !self.send(key, host, ev).await {
                return;
            }
        }
        if !self.wait {
            return;
        }
        let hosts: BTreeMap<&str, &str> = self
            .issued
            .iter()
            .map(|(k, h, _, _)| (k.as_str(), h.as_str()))
            .collect();
        let mut applied = self.ctx.node.applied();
        let mut acked: HashSet<String> = HashSet::new();
        let mut finished: HashSet<String> = HashSet::new();
        let until = tokio::time::Instant::now() + self.timeout;
        loop {
            // Committed state is the truth for acks and results: it works on followers too
            // and survives a leader change mid-action.
            let snapshot: Vec<(String, Option<i64>, Option<pb::CommandResult>)> =
                self.ctx.node.read(|s| {
                    hosts
                        .keys()
                        .filter(|k| !finished.contains(**k))
                        .filter_map(|k| s.commands.get(k))
                        .map(|c| {
                            (
                                c.key.clone(),
                                c.acked_at_unix_ms,
                                c.state.is_finished().then(|| final_result(c)),
                            )
                        })
                        .collect()
                });
            for (key, acked_at, result) in snapshot {
                let host = hosts.get(key.as_str()).copied().unwrap_or_default();
                if let Some(at) = acked_at
                    && acked.insert(key.clone())
                    && !self
                        .send(&key, host, Event::Acked(pb::Acked { at_unix_ms: at }))
                        .await
                {
                    return;
                }
                if let Some(result) = result {
                    finished.insert(key.clone());
                    if !self.send(&key, host, Event::Result(result)).await {
                        return;
                    }
                }
            }
            if finished.len() >= hosts.len() {
                return;
            }
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                ev = events.recv() => match ev {
                    Ok(CommandEvent::Progress { key, host_id, progress }) if hosts.contains_key(key.as_str()) => {
                        let ev = Event::Progress(pb::CommandProgressEvent {
                            message: progress.message,
                            done: progress.done,
                            total: progress.total,
                        });
                        if !self.send(&key, &host_id, ev).await {
                            return;
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    // The registry lives as long as the process; nothing more will come.
                    Err(broadcast::error::RecvError::Closed) => events = self.ctx.registry.subscribe(),
                },
                _ = tokio::time::sleep_until(until) => {
                    let open: Vec<&str> = hosts.keys().copied().filter(|k| !finished.contains(*k)).collect();
                    let msg = format!(
                        "{} of {} commands had not finished after {}: {}; they keep running, follow them with `drctl commands`",
                        open.len(),
                        hosts.len(),
                        humantime::format_duration(self.timeout),
                        open.join(", ")
                    );
                    self.tx.send(Err(Status::deadline_exceeded(msg))).await.ok();
                    return;
                }
                _ = self.tx.closed() => return,
                // Shutting down: end the stream so the server can stop at once. The
                // commands keep running; drctl retries elsewhere with the same request
                // id and follows them there.
                _ = self.ctx.registry.closing().cancelled() => {
                    let msg = "this coordinator is shutting down; the commands keep running, retry to follow them at another coordinator";
                    self.tx.send(Err(Status::unavailable(msg))).await.ok();
                    return;
                }
            }
        }
    }

    async fn send(&self, key: &str, host: &str, ev: Event) -> bool {
        let ev = pb::ActionEvent {
            key: key.to_owned(),
            host_id: host.to_owned(),
            event: Some(ev),
        };
        self.tx.send(Ok(ev)).await.is_ok()
    }
}

/// The result to report for a finished command: the agent's, or one that says why there
/// is none (cancelled, expired).
fn final_result(c: &CommandRecord) -> pb::CommandResult {
    match (&c.result, c.state) {
        (Some(r), CommandState::Done | CommandState::Failed) => r.clone(),
        (_, state) => pb::CommandResult {
            key: c.key.clone(),
            host_id: c.host_id.clone(),
            success: false,
            message: format!("{state}: {}", c.reason),
            ..Default::default()
        },
    }
}

fn agent_info(h: &Host, live: Option<&BTreeMap<String, SessionView>>) -> pb::AgentInfo {
    let mut info = pb::AgentInfo {
        host_id: h.host_id.clone(),
        region: h.region.clone(),
        site: h.site.clone(),
        roles: h.roles.clone(),
        state: h.state.to_string(),
        state_since_unix_ms: h.state_since_unix_ms,
        version: h.version.clone(),
        incarnation: h.incarnation,
        checks: h
            .checks
            .values()
            .map(state::CheckRecord::to_result)
            .collect(),
        ..Default::default()
    };
    if let Some(v) = live.and_then(|l| l.get(&h.host_id)) {
        info.connected = v.connected;
        info.connected_to = v.connected_to;
        info.last_heartbeat_unix_ms = v.last_heartbeat_unix_ms;
        if !v.checks.is_empty() {
            info.checks = v.checks.values().cloned().collect();
        }
        info.facts = v.facts.clone();
    }
    info
}

fn unknown_host_hint(s: &state::State, host_id: &str) -> String {
    let known: Vec<&str> = s.hosts.keys().map(String::as_str).take(10).collect();
    if known.is_empty() {
        format!(
            "host {host_id} is not known: no agent has connected yet; start dr-agent on the host and check its coordinator endpoints and certificate"
        )
    } else {
        let more = if s.hosts.len() > known.len() {
            format!(" and {} more", s.hosts.len() - known.len())
        } else {
            String::new()
        };
        format!(
            "host {host_id} is not known (hosts register when their agent first connects); known hosts: {}{more}",
            known.join(", ")
        )
    }
}

fn empty_selection(s: &state::State, sel: &pb::Selector) -> String {
    let regions: BTreeSet<&str> = s
        .hosts
        .values()
        .map(|h| h.region.as_str())
        .filter(|r| !r.is_empty())
        .collect();
    let roles: BTreeSet<&str> = s
        .hosts
        .values()
        .flat_map(|h| h.roles.iter().map(String::as_str))
        .collect();
    let sites: BTreeSet<&str> = s
        .hosts
        .values()
        .map(|h| h.site.as_str())
        .filter(|r| !r.is_empty())
        .collect();
    let list = |v: &BTreeSet<&str>| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.iter().copied().collect::<Vec<_>>().join(", ")
        }
    };
    format!(
        "no known host matches the selector (hosts={:?} region={:?} role={:?} site={:?}); {} hosts are known; regions: {}; roles: {}; sites: {}",
        sel.hosts,
        sel.region,
        sel.role,
        sel.site,
        s.hosts.len(),
        list(&regions),
        list(&roles),
        list(&sites)
    )
}

fn build_status(
    s: &state::State,
    live: Option<&BTreeMap<String, SessionView>>,
    cluster: &pb::ClusterStatusResponse,
) -> pb::StatusResponse {
    #[derive(Default)]
    struct Acc {
        up: u32,
        down: u32,
        tiers: BTreeMap<i32, (u32, u32)>,
        coordinators: Vec<u64>,
    }
    let mut regions: BTreeMap<String, Acc> = BTreeMap::new();
    let mut failing = Vec::new();
    let mut failing_hosts = Vec::new();
    for h in s.hosts.values() {
        let acc = regions.entry(h.region.clone()).or_default();
        if h.state == HostState::Up {
            acc.up += 1
        } else {
            acc.down += 1
        }
        if h.state != HostState::Up {
            // A down host's checks are stale; it is counted as down instead.
            continue;
        }
        let checks: Vec<pb::CheckResult> = match live
            .and_then(|l| l.get(&h.host_id))
            .filter(|v| !v.checks.is_empty())
        {
            Some(v) => v.checks.values().cloned().collect(),
            None => h
                .checks
                .values()
                .map(state::CheckRecord::to_result)
                .collect(),
        };
        for c in checks {
            let t = acc.tiers.entry(c.tier).or_default();
            match state::topology::check_state(&c) {
                pb::CheckState::Passing => t.0 += 1,
                pb::CheckState::Failing => {
                    t.1 += 1;
                    failing.push(c);
                    failing_hosts.push(h.host_id.clone());
                }
                _ => {}
            }
        }
    }
    let mut member_regions = BTreeSet::new();
    for m in &cluster.members {
        member_regions.insert(m.region.clone());
        regions
            .entry(m.region.clone())
            .or_default()
            .coordinators
            .push(m.node_id);
    }
    let mut notes = Vec::new();
    if member_regions.len() < 3 {
        notes.push(format!(
            "coordinators span {} region(s): automatic regional failover is off, because with fewer than three failure domains no side can tell a dead peer from a cut link; only forced manual failover is offered",
            member_regions.len()
        ));
    }
    if cluster.leader_id == 0 {
        notes.push("no leader is elected: writes and actions will fail until a majority of coordinators is connected".to_owned());
    }
    pb::StatusResponse {
        leader_id: cluster.leader_id,
        leader_endpoint: cluster.leader_endpoint.clone(),
        term: cluster.term,
        answered_by: 0,
        linearizable: false,
        regions: regions
            .into_iter()
            .map(|(name, a)| pb::RegionStatus {
                name,
                agents_up: a.up,
                agents_down: a.down,
                tiers: a
                    .tiers
                    .into_iter()
                    .map(|(tier, (p, f))| pb::TierCount {
                        tier,
                        checks_passing: p,
                        checks_failing: f,
                    })
                    .collect(),
                coordinators: a.coordinators,
            })
            .collect(),
        failing_checks: failing,
        failing_check_hosts: failing_hosts,
        notes,
        members: cluster.members.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with_hosts() -> state::State {
        let mut s = state::State::default();
        for (i, (h, region, role)) in [("db-1", "beijing", "db"), ("app-1", "shanghai", "app")]
            .iter()
            .enumerate()
        {
            state::apply(
                &mut s,
                i as u64 + 1,
                &state::Request {
                    at_unix_ms: 1,
                    origin: "test".into(),
                    cmd: Command::HostUp {
                        host_id: (*h).into(),
                        region: (*region).into(),
                        site: String::new(),
                        roles: vec![(*role).into()],
                        version: "1".into(),
                        incarnation: 1,
                    },
                },
            );
        }
        state::apply(
            &mut s,
            3,
            &state::Request {
                at_unix_ms: 2,
                origin: "test".into(),
                cmd: Command::CheckTransitions {
                    host_id: "db-1".into(),
                    changes: vec![pb::CheckResult {
                        name: "pg".into(),
                        tier: pb::Tier::Critical as i32,
                        state: pb::CheckState::Failing as i32,
                        ..Default::default()
                    }],
                },
            },
        );
        s
    }

    #[test]
    fn t10_empty_selection_lists_what_exists() {
        let s = state_with_hosts();
        let msg = empty_selection(
            &s,
            &pb::Selector {
                region: "guangzhou".into(),
                ..Default::default()
            },
        );
        assert!(
            msg.contains("regions: beijing, shanghai; roles: app, db"),
            "{msg}"
        );
    }

    #[test]
    fn t20_status_counts_regions_tiers_and_notes() {
        let s = state_with_hosts();
        let cluster = pb::ClusterStatusResponse {
            leader_id: 1,
            members: vec![pb::MemberStatus {
                node_id: 1,
                region: "beijing".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let st = build_status(&s, None, &cluster);
        let bj = st.regions.iter().find(|r| r.name == "beijing").unwrap();
        assert_eq!(
            (bj.agents_up, bj.agents_down, bj.coordinators.clone()),
            (1, 0, vec![1])
        );
        assert_eq!(
            bj.tiers,
            vec![pb::TierCount {
                tier: pb::Tier::Critical as i32,
                checks_passing: 0,
                checks_failing: 1
            }]
        );
        assert_eq!(st.failing_check_hosts, vec!["db-1"]);
        assert!(st.notes[0].contains("automatic regional failover is off"));
    }

    #[test]
    fn t30_unknown_host_hint() {
        let s = state_with_hosts();
        assert!(unknown_host_hint(&s, "x").contains("known hosts: app-1, db-1"));
        assert!(
            unknown_host_hint(&state::State::default(), "x").contains("no agent has connected yet")
        );
    }
}
