//! Operations API: topology apply/show, failover and switchover, and following operations.
//!
//! Why plans are built here and not by drctl: the plan depends on the committed topology,
//! the recorded primary and the leader's live replica facts; drctl only names the target
//! region. `--dry-run` returns exactly the plan that would be committed. Authorisation:
//! reads need viewer, a failover operator (admin with `force`), topology apply admin.

use std::pin::Pin;
use std::sync::Arc;

use dr_proto::pb;
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span};

use super::auth::{Permission, authorize};
use super::error::{ApiError, ApiResult};
use super::now_unix_ms;
use crate::Ctx;
use crate::control::failover::{choose_candidate, estimate_loss};
use crate::control::plan_executor::member_facts;
use crate::state::operations::plans::{
    failback_switchover, planned_switchover, split_traffic, unplanned_failover,
};
use crate::state::operations::{NewOperation, Operation, OpsCommand};
use crate::state::topology_spec::{RegionKind, TopologySpec, diff};
use crate::state::{self, Command};

pub struct OperationsApi {
    ctx: Arc<Ctx>,
}

impl OperationsApi {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        OperationsApi { ctx }
    }

    async fn write(&self, origin: &str, cmd: OpsCommand) -> ApiResult<state::Response> {
        let (index, resp) = self
            .ctx
            .node
            .write(state::Request {
                at_unix_ms: now_unix_ms(),
                origin: origin.to_owned(),
                cmd: Command::Ops(cmd),
            })
            .await?;
        let mut applied = self.ctx.node.applied();
        let _waited = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            applied.wait_for(|a| *a >= index),
        )
        .await;
        if let state::Response::Refused { refusal } = resp {
            return Err(ApiError::Refused(refusal));
        }
        Ok(resp)
    }

    fn plan(
        &self,
        req: &pb::StartFailoverRequest,
        request_id: &str,
    ) -> ApiResult<(NewOperation, u64, Vec<String>)> {
        let (topo, clusters) = self
            .ctx
            .node
            .read(|s| (s.ops.topology.clone(), s.ops.clusters.clone()));
        let Some(topo) = topo else {
            return Err(ApiError::FailedPrecondition(
                "no topology is committed yet; run `drctl apply -f topology.toml` first".into(),
            ));
        };
        let spec = &topo.spec;
        let cluster = if req.cluster.is_empty() {
            match spec.db_clusters.as_slice() {
                [one] => one.name.clone(),
                _ => {
                    return Err(ApiError::InvalidArgument(
                        "the topology has several database clusters; name one with --cluster"
                            .into(),
                    ));
                }
            }
        } else {
            req.cluster.clone()
        };
        let Some(cs) = clusters.get(&cluster) else {
            return Err(ApiError::NotFound(format!(
                "database cluster `{cluster}` is not in the topology"
            )));
        };
        match spec.region(&req.to_region) {
            None => {
                return Err(ApiError::InvalidArgument(format!(
                    "unknown region `{}`",
                    req.to_region
                )));
            }
            Some(r) if r.kind == RegionKind::Witness => {
                return Err(ApiError::InvalidArgument(format!(
                    "region `{}` is a witness and holds no database",
                    req.to_region
                )));
            }
            Some(_) => {}
        }
        let from = spec.region_of(&cs.primary_host);
        if from == req.to_region {
            return Err(ApiError::FailedPrecondition(format!(
                "the primary of {cluster} ({}) is already in {}",
                cs.primary_host, req.to_region
            )));
        }
        let members = member_facts(&self.ctx, spec, &cluster);
        let leader = self.ctx.node.is_leader();
        let candidate = match choose_candidate(
            spec,
            &cluster,
            &cs.primary_host,
            Some(&req.to_region),
            &members,
        ) {
            Ok(c) => c.host,
            Err(why) if leader => return Err(ApiError::FailedPrecondition(why)),
            // A follower has no live facts: the first member there; the leader's decide step
            // re-checks for an unplanned failover.
            Err(_) => spec
                .cluster(&cluster)
                .and_then(|c| {
                    c.members
                        .iter()
                        .find(|m| spec.region_of(m) == req.to_region)
                        .cloned()
                })
                .ok_or_else(|| {
                    ApiError::FailedPrecondition(format!(
                        "no member of {cluster} in {}",
                        req.to_region
                    ))
                })?,
        };
        let mut warnings = Vec::new();
        let estimate = estimate_loss(&members, &cs.primary_host, &candidate);
        let loss = estimate.bytes;
        let reason = if req.reason.is_empty() {
            format!("requested: move {cluster} to {}", req.to_region)
        } else {
            req.reason.clone()
        };
        let percent = match req.traffic_percentage {
            0 => 100,
            p => p,
        };
        if req.force && percent != 100 {
            return Err(ApiError::InvalidArgument(format!(
                "--percentage {percent} needs a planned switchover: in a forced failover {from} cannot be reached, so it cannot keep a share of the traffic"
            )));
        }
        let op = if req.force {
            warnings.push(format!(
                "forced failover: the old primary {} is not stopped cleanly; writes it acknowledged after {candidate}'s replay position are lost ({})",
                cs.primary_host,
                estimate.describe(&cs.primary_host, &candidate)
            ));
            unplanned_failover(
                spec,
                cs,
                &cluster,
                &req.to_region,
                &candidate,
                true,
                &reason,
                request_id,
                None,
            )
        } else {
            let old_connected = members
                .iter()
                .any(|m| m.host == cs.primary_host && m.connected);
            if leader && !old_connected {
                return Err(ApiError::FailedPrecondition(format!(
                    "the old primary {} is not connected, so a clean switchover is impossible; use --force for an emergency failover ({})",
                    cs.primary_host,
                    estimate.describe(&cs.primary_host, &candidate)
                )));
            }
            // Failback: a target that is not streaming (an old primary after an unplanned
            // failover) is rejoined and caught up first. Only the leader has live facts.
            let streaming = members
                .iter()
                .find(|m| m.host == candidate)
                .and_then(|m| m.wal_receiver.as_deref())
                == Some("streaming");
            // Committed history, which followers see too: the candidate was the old primary
            // of the last finished unplanned failover, so it has diverged and is fenced.
            let diverged = self.ctx.node.read(|s| {
                s.ops
                    .operations
                    .values()
                    .filter(|o| {
                        o.cluster == cluster
                            && o.state == crate::state::operations::OpState::Succeeded
                            && !o.kind.is_restore()
                    })
                    .max_by_key(|o| o.id)
                    .is_some_and(|o| {
                        o.kind.revokes_lease_at_start()
                            && o.vars.get("old_primary") == Some(&candidate)
                    })
            });
            if diverged || (leader && !streaming) {
                warnings.push(format!(
                    "{candidate} is not a streaming replica: it is rejoined first (pg_rewind, or a re-seed from {} if rewind is impossible) and caught up, then switched over",
                    cs.primary_host
                ));
                failback_switchover(
                    spec,
                    cs,
                    &cluster,
                    &req.to_region,
                    &candidate,
                    &reason,
                    request_id,
                )
            } else {
                planned_switchover(
                    spec,
                    cs,
                    &cluster,
                    &req.to_region,
                    &candidate,
                    &reason,
                    request_id,
                )
            }
        };
        let mut op = op;
        if percent != 100 {
            split_traffic(spec, &mut op, from, &req.to_region, percent)
                .map_err(ApiError::InvalidArgument)?;
            warnings.push(format!(
                "traffic: {} gets {percent} %, {from} keeps {} % (the database moves entirely: {from}'s share writes to the new primary across regions)",
                req.to_region,
                100 - percent
            ));
        }
        Ok((op, loss, warnings))
    }
}

/// Approvals launcher (see `api::security::build_launch`): the operation a stored
/// StartFailover request asks for, planned now (the facts may have changed since it was
/// requested), as the command StartFailover would commit.
pub(crate) fn build_failover_launch(ctx: &Arc<Ctx>, payload_json: &str) -> ApiResult<Command> {
    let req: pb::StartFailoverRequest = serde_json::from_str(payload_json).map_err(|e| {
        ApiError::InvalidArgument(format!("the stored failover request is unreadable: {e}"))
    })?;
    let api = OperationsApi { ctx: ctx.clone() };
    let (op, _loss, _warnings) = api.plan(&req, &req.request_id)?;
    Ok(Command::Ops(OpsCommand::CreateOperation { op }))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::OperationInfo, Status>> + Send>>;

/// Shows a planned (not yet committed) operation the way drctl shows committed ones.
fn preview(op: &NewOperation, origin: &str) -> pb::OperationInfo {
    let o = Operation {
        id: 0,
        kind: op.kind,
        cluster: op.cluster.clone(),
        from_region: op.from_region.clone(),
        to_region: op.to_region.clone(),
        created_by: origin.to_owned(),
        created_at_unix_ms: now_unix_ms(),
        finished_at_unix_ms: None,
        state: crate::state::operations::OpState::Running,
        reason: op.reason.clone(),
        request_id: op.request_id.clone(),
        compensating: false,
        steps: op
            .steps
            .iter()
            .map(|s| crate::state::operations::Step {
                spec: s.clone(),
                state: crate::state::operations::StepState::Pending,
                attempt: 0,
                started_at_unix_ms: None,
                finished_at_unix_ms: None,
                command_keys: vec![],
                hosts: vec![],
                message: String::new(),
                details: Default::default(),
            })
            .collect(),
        vars: op.vars.clone(),
        results: Default::default(),
    };
    let mut info = o.to_info();
    info.state = "planned".into();
    info
}

#[tonic::async_trait]
impl pb::operations_service_server::OperationsService for OperationsApi {
    async fn apply_topology(
        &self,
        req: Request<pb::ApplyTopologyRequest>,
    ) -> Result<Response<pb::ApplyTopologyResponse>, Status> {
        let id = authorize(&self.ctx, &req, "ApplyTopology", Permission::Admin)?;
        let req = req.into_inner();
        let spec =
            TopologySpec::parse(&req.toml).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let current = self.ctx.node.read(|s| s.ops.topology.clone());
        let lines = diff(current.as_ref().map(|t| &t.spec), &spec);
        let version = current.as_ref().map_or(0, |t| t.version);
        let warnings = spec.warnings();
        if req.dry_run || lines.is_empty() {
            return Ok(Response::new(pb::ApplyTopologyResponse {
                version,
                diff: lines,
                applied: false,
                warnings,
            }));
        }
        let expected = if req.expected_version != 0 {
            req.expected_version
        } else {
            version
        };
        let resp = self
            .write(
                &id.to_string(),
                OpsCommand::ApplyTopology {
                    spec,
                    expected_version: expected,
                },
            )
            .instrument(info_span!("apply_topology", identity = %id))
            .await?;
        let version = self
            .ctx
            .node
            .read(|s| s.ops.topology.as_ref().map_or(0, |t| t.version));
        info!(identity = %id, version, "topology applied");
        Ok(Response::new(pb::ApplyTopologyResponse {
            version,
            diff: lines,
            applied: resp == state::Response::Applied,
            warnings,
        }))
    }

    async fn get_topology(
        &self,
        req: Request<pb::GetTopologyRequest>,
    ) -> Result<Response<pb::GetTopologyResponse>, Status> {
        authorize(&self.ctx, &req, "GetTopology", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let resp = self.ctx.node.read(|s| match &s.ops.topology {
            None => pb::GetTopologyResponse::default(),
            Some(t) => pb::GetTopologyResponse {
                version: t.version,
                json: serde_json::to_string_pretty(&t.spec).unwrap_or_default(),
                applied_at_unix_ms: t.applied_at_unix_ms,
                applied_by: t.applied_by.clone(),
                clusters: s
                    .ops
                    .clusters
                    .iter()
                    .map(|(n, c)| pb::DbClusterStatus {
                        name: n.clone(),
                        primary_host: c.primary_host.clone(),
                        primary_region: t.spec.region_of(&c.primary_host).to_owned(),
                        epoch: c.epoch,
                        last_failover_unix_ms: c.last_failover_unix_ms,
                    })
                    .collect(),
            },
        });
        Ok(fresh.respond(resp))
    }

    async fn start_failover(
        &self,
        req: Request<pb::StartFailoverRequest>,
    ) -> Result<Response<pb::StartFailoverResponse>, Status> {
        let perm = if req.get_ref().force {
            Permission::Admin
        } else {
            Permission::Act
        };
        let id = authorize(&self.ctx, &req, "StartFailover", perm)?;
        let req = req.into_inner();
        let request_id = if req.request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            req.request_id.clone()
        };
        let (op, loss, warnings) = self.plan(&req, &request_id)?;
        if req.dry_run {
            return Ok(Response::new(pb::StartFailoverResponse {
                operation: Some(preview(&op, &id.to_string())),
                started: false,
                estimated_loss_bytes: loss,
                warnings,
            }));
        }
        // Two-person rule: when the policy gates failovers, this records a pending request
        // (the request as sent, with its request id) and answers "needs approval".
        let mut stored = req.clone();
        stored.request_id.clone_from(&request_id);
        super::security::gate(
            &self.ctx,
            &id,
            super::security::ApprovalKind::Failover,
            &format!("{} -> {}", op.cluster, op.to_region),
            &stored,
        )
        .await?;
        info!(identity = %id, kind = op.kind.as_str(), cluster = %op.cluster, to = %op.to_region, "failover requested");
        self.write(&id.to_string(), OpsCommand::CreateOperation { op })
            .await?;
        let info = self.ctx.node.read(|s| {
            s.ops
                .operations
                .values()
                .find(|o| o.request_id == request_id)
                .map(Operation::to_info)
        });
        let Some(info) = info else {
            return Err(ApiError::Unexpected("operation not found after create".into()).into());
        };
        Ok(Response::new(pb::StartFailoverResponse {
            operation: Some(info),
            started: true,
            estimated_loss_bytes: loss,
            warnings,
        }))
    }

    async fn list_operations(
        &self,
        req: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        authorize(&self.ctx, &req, "ListOperations", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let limit = match req.get_ref().limit {
            0 => 50,
            n => n as usize,
        };
        let operations = self.ctx.node.read(|s| {
            s.ops
                .operations
                .values()
                .rev()
                .take(limit)
                .map(Operation::to_info)
                .collect()
        });
        Ok(fresh.respond(pb::ListOperationsResponse { operations }))
    }

    async fn get_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::OperationInfo>, Status> {
        authorize(&self.ctx, &req, "GetOperation", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let id = req.get_ref().id;
        self.ctx
            .node
            .read(|s| s.ops.operations.get(&id).map(Operation::to_info))
            .map(|b| fresh.respond(b))
            .ok_or_else(|| ApiError::NotFound(format!("operation {id} does not exist")).into())
    }

    type WatchOperationStream = WatchStream;

    async fn watch_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<Response<Self::WatchOperationStream>, Status> {
        authorize(&self.ctx, &req, "WatchOperation", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let id = req.get_ref().id;
        if self.ctx.node.read(|s| !s.ops.operations.contains_key(&id)) {
            return Err(ApiError::NotFound(format!("operation {id} does not exist")).into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let mut applied = ctx.node.applied();
            let mut last: Option<pb::OperationInfo> = None;
            loop {
                let info = ctx
                    .node
                    .read(|s| s.ops.operations.get(&id).map(Operation::to_info));
                let Some(info) = info else { return };
                let finished = info.finished_at_unix_ms != 0;
                if last.as_ref() != Some(&info) {
                    if tx.send(Ok(info.clone())).await.is_err() {
                        return;
                    }
                    last = Some(info);
                }
                if finished {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                }
            }
        });
        Ok(fresh.respond(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_operation(
        &self,
        req: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::OperationInfo>, Status> {
        let who = authorize(&self.ctx, &req, "CancelOperation", Permission::Act)?;
        let req = req.into_inner();
        let reason = if req.reason.is_empty() {
            "cancelled by operator".to_owned()
        } else {
            req.reason
        };
        self.write(
            &who.to_string(),
            OpsCommand::CancelOperation {
                op_id: req.id,
                reason,
            },
        )
        .await?;
        self.ctx
            .node
            .read(|s| s.ops.operations.get(&req.id).map(Operation::to_info))
            .map(Response::new)
            .ok_or_else(|| {
                ApiError::NotFound(format!("operation {} does not exist", req.id)).into()
            })
    }
}
