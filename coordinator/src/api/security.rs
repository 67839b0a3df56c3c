//! Approvals and audit API, and the approvals hook every gated RPC calls.
//!
//! Why a hook rather than a wrapper service: each gated RPC validates its own request and
//! knows what it would commit, so it calls [`gate`] right before committing; the policy,
//! the pending request and the decision all live in the Raft state
//! ([`crate::state::approvals`]). On approval the coordinator does not replay the RPC (it
//! would hit the gate again, and the caller's identity would be the approver's): it asks
//! the kind's launcher in [`build_launch`] for the state command the RPC would have
//! committed, and commits it inside the approving entry, applied as the requester. The
//! contract for other handlers is in docs/dev/team-contracts.md, "Approvals hook".
//!
//! Audit reads combine this node's archive (`<data_dir>/audit-archive.jsonl`) with the
//! entries still in the state; verification uses [`dr_proto::audit_chain::verify`], the
//! same code drctl runs offline on an export.

use std::pin::Pin;
use std::sync::Arc;

use dr_proto::audit_chain::{self, AuditEntry, VerifyOptions};
use dr_proto::identity::SpiffeId;
use dr_proto::pb;
use futures::Stream;
use serde::Serialize;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span};

use super::auth::{Permission, authorize};
use super::error::{ApiError, ApiResult};
use super::now_unix_ms;
use crate::Ctx;
use crate::state::approvals::{
    ApprovalCommand, ApprovalRequest, DecideError, parse_request_name, request_name,
};
use crate::state::{self, Command};

pub use crate::state::approvals::ApprovalKind;

/// Metadata key of a gated RPC's answer: the id of the pending request (`R-N`).
pub const APPROVAL_HEADER: &str = "x-dr-approval-request";

/// Entries per `ExportAudit` chunk.
const EXPORT_CHUNK: usize = 500;

/// The approvals hook. `Ok(())`: the policy does not gate `kind`, run the operation.
/// Otherwise records a pending request (the caller as requester, `request` as the payload
/// that runs on approval) and returns the `FAILED_PRECONDITION` status to hand back to the
/// caller, naming the request and what to do.
pub async fn gate<T: Serialize>(
    ctx: &Ctx,
    caller: &SpiffeId,
    kind: ApprovalKind,
    target: &str,
    request: &T,
) -> Result<(), Status> {
    if !ctx.node.read(|s| s.approvals.requires(kind)) {
        return Ok(());
    }
    let payload_json = serde_json::to_string(request)
        .map_err(|e| ApiError::Unexpected(format!("cannot store the {kind} request: {e}")))?;
    let key = uuid::Uuid::new_v4().to_string();
    let origin = caller.to_string();
    let resp = propose(
        ctx,
        &origin,
        Command::Approvals(ApprovalCommand::Create {
            key: key.clone(),
            kind,
            target: target.to_owned(),
            payload_json,
        }),
    )
    .instrument(info_span!("approval_request", identity = %caller, %kind))
    .await?;
    if let state::Response::Refused { refusal } = resp {
        return Err(ApiError::Refused(refusal).into());
    }
    let Some(id) = ctx.node.read(|s| s.approvals.by_key(&key).map(|r| r.id)) else {
        return Err(ApiError::Unexpected("approval request not found after create".into()).into());
    };
    info!(identity = %caller, %kind, target, request = %request_name(id), "operation needs approval");
    Err(pending_status(id, kind, target))
}

/// The answer of a gated RPC whose operation waits for approval.
pub fn pending_status(id: u64, kind: ApprovalKind, target: &str) -> Status {
    let name = request_name(id);
    let mut st = Status::failed_precondition(format!(
        "needs approval: request {name} ({kind} {target}); another admin runs `drctl approve {name}`"
    ));
    if let Ok(v) = name.parse() {
        st.metadata_mut().insert(APPROVAL_HEADER, v);
    }
    st
}

/// The launcher registry: the state command an approved request of `kind` commits (as its
/// requester, inside the approving entry). One arm per kind; see the module docs.
pub async fn build_launch(
    ctx: &Arc<Ctx>,
    id: u64,
    kind: ApprovalKind,
    requester: &str,
    payload_json: &str,
) -> ApiResult<Command> {
    match kind {
        ApprovalKind::Failover => super::operations::build_failover_launch(ctx, payload_json),
        ApprovalKind::RestoreInPlace => {
            let r: pb::StartRestoreRequest = serde_json::from_str(payload_json).map_err(|e| {
                ApiError::InvalidArgument(format!("the stored restore request is unreadable: {e}"))
            })?;
            let (op, _plan) = super::restore::build_restore(
                ctx,
                requester,
                &r,
                crate::state::operations::OpKind::Restore,
            )
            .await?;
            Ok(Command::Ops(
                crate::state::operations::OpsCommand::CreateOperation { op },
            ))
        }
        ApprovalKind::Isolate => super::response::build_isolate_launch(ctx, payload_json),
        ApprovalKind::RotateCredentials => {
            super::response::build_rotate_launch(ctx, id, requester, payload_json)
        }
        ApprovalKind::Prune => super::backup::build_delete_launch(ctx, payload_json),
    }
}

/// Commits one command and waits (up to 5 s) until this node has applied it, so a read
/// right after sees it. Refusals come back as a response, not an error.
async fn propose(ctx: &Ctx, origin: &str, cmd: Command) -> ApiResult<state::Response> {
    super::propose(ctx, origin, cmd).await
}

fn decide_status(e: &DecideError) -> Status {
    let msg = e.to_string();
    match e {
        DecideError::Unknown { .. } => Status::not_found(msg),
        DecideError::OwnRequest { .. } | DecideError::NotAdmin { .. } => {
            Status::permission_denied(msg)
        }
        DecideError::AlreadyDecided { .. }
        | DecideError::Expired { .. }
        | DecideError::Launch { .. } => Status::failed_precondition(msg),
    }
}

fn approval_info(r: &ApprovalRequest, now: i64) -> pb::ApprovalInfo {
    pb::ApprovalInfo {
        id: r.name(),
        kind: r.kind.to_string(),
        target: r.target.clone(),
        requester: r.requester.clone(),
        created_at_unix_ms: r.created_at_unix_ms,
        expires_at_unix_ms: r.expires_at_unix_ms,
        state: r.shown_state(now).to_owned(),
        decided_by: r.decided_by.clone(),
        decided_at_unix_ms: r.decided_at_unix_ms.unwrap_or(0),
        reason: r.reason.clone(),
        launch_result: r.launch_result.clone(),
        payload_json: r.payload_json.clone(),
    }
}

fn policy_info(p: &crate::state::approvals::ApprovalPolicy) -> pb::ApprovalPolicy {
    pb::ApprovalPolicy {
        require: p.require.iter().map(|k| k.to_string()).collect(),
        ttl_secs: p.ttl_secs,
        set_by: p.set_by.clone(),
        set_at_unix_ms: p.set_at_unix_ms,
        kinds: ApprovalKind::ALL.iter().map(|k| k.to_string()).collect(),
    }
}

pub struct ApprovalApi {
    ctx: Arc<Ctx>,
}

impl ApprovalApi {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        ApprovalApi { ctx }
    }

    async fn decide(
        &self,
        who: &SpiffeId,
        req: pb::DecideApprovalRequest,
        approve: bool,
    ) -> Result<pb::ApprovalInfo, Status> {
        let id = parse_request_name(&req.id).map_err(Status::invalid_argument)?;
        let origin = who.to_string();
        let now = now_unix_ms();
        let checked = self.ctx.node.read(|s| {
            s.approvals
                .check_decide(id, &origin, approve, now)
                .map(|r| (r.kind, r.requester.clone(), r.payload_json.clone()))
        });
        let mut early: Option<Status> = None;
        let mut launch = None;
        let mut launch_error = String::new();
        match checked {
            Err(e) => early = Some(decide_status(&e)),
            Ok((kind, requester, payload)) if approve => {
                match build_launch(&self.ctx, id, kind, &requester, &payload).await {
                    Ok(cmd) => launch = Some(Box::new(cmd)),
                    Err(e) => {
                        launch_error = e.to_string();
                        early = Some(decide_status(&DecideError::Launch {
                            id,
                            message: launch_error.clone(),
                        }));
                    }
                }
            }
            Ok(_) => {}
        }
        // Committed even when it will be refused: the refusal is an audit entry.
        let resp = propose(
            &self.ctx,
            &origin,
            Command::Approvals(ApprovalCommand::Decide {
                id,
                approve,
                reason: req.reason,
                launch,
                launch_error,
            }),
        )
        .instrument(
            info_span!("approval_decide", identity = %who, request = %request_name(id), approve),
        )
        .await?;
        if let Some(st) = early {
            info!(identity = %who, request = %request_name(id), approve, reason = st.message(), "approval decision refused");
            return Err(st);
        }
        if let state::Response::Refused { refusal } = resp {
            return Err(Status::failed_precondition(refusal.to_string()));
        }
        info!(identity = %who, request = %request_name(id), approve, "approval decided");
        self.ctx
            .node
            .read(|s| s.approvals.requests.get(&id).map(|r| approval_info(r, now)))
            .ok_or_else(|| Status::not_found(format!("{} vanished", request_name(id))))
    }
}

#[tonic::async_trait]
impl pb::approval_service_server::ApprovalService for ApprovalApi {
    async fn get_approval_policy(
        &self,
        req: Request<pb::GetApprovalPolicyRequest>,
    ) -> Result<Response<pb::ApprovalPolicy>, Status> {
        authorize(&self.ctx, &req, "GetApprovalPolicy", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        Ok(fresh.respond(self.ctx.node.read(|s| policy_info(&s.approvals.policy))))
    }

    async fn set_approval_policy(
        &self,
        req: Request<pb::SetApprovalPolicyRequest>,
    ) -> Result<Response<pb::ApprovalPolicy>, Status> {
        let who = authorize(&self.ctx, &req, "SetApprovalPolicy", Permission::Admin)?;
        let req = req.into_inner();
        let mut require = Vec::new();
        for k in &req.require {
            for part in k.split(',').filter(|p| !p.trim().is_empty()) {
                require.push(ApprovalKind::parse(part).map_err(Status::invalid_argument)?);
            }
        }
        let ttl_secs = if req.ttl_secs == 0 {
            self.ctx.node.read(|s| s.approvals.policy.ttl_secs)
        } else {
            req.ttl_secs
        };
        let resp = propose(
            &self.ctx,
            &who.to_string(),
            Command::Approvals(ApprovalCommand::SetPolicy { require, ttl_secs }),
        )
        .instrument(info_span!("approval_policy", identity = %who))
        .await?;
        if let state::Response::Refused { refusal } = resp {
            return Err(Status::invalid_argument(refusal.to_string()));
        }
        info!(identity = %who, "approval policy set");
        Ok(Response::new(
            self.ctx.node.read(|s| policy_info(&s.approvals.policy)),
        ))
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        authorize(&self.ctx, &req, "ListApprovals", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let pending_only = req.get_ref().pending_only;
        let now = now_unix_ms();
        let approvals = self.ctx.node.read(|s| {
            s.approvals
                .requests
                .values()
                .rev()
                .map(|r| approval_info(r, now))
                .filter(|i| !pending_only || i.state == "pending")
                .collect()
        });
        Ok(fresh.respond(pb::ListApprovalsResponse { approvals }))
    }

    async fn get_approval(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::ApprovalInfo>, Status> {
        authorize(&self.ctx, &req, "GetApproval", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let id = parse_request_name(&req.get_ref().id).map_err(Status::invalid_argument)?;
        let now = now_unix_ms();
        self.ctx
            .node
            .read(|s| s.approvals.requests.get(&id).map(|r| approval_info(r, now)))
            .map(|b| fresh.respond(b))
            .ok_or_else(|| decide_status(&DecideError::Unknown { id }))
    }

    async fn approve(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::ApprovalInfo>, Status> {
        // Read, not Admin: a viewer's or operator's attempt is refused by the state machine
        // with the reason, and so lands in the audit log.
        let who = authorize(&self.ctx, &req, "Approve", Permission::Read)?;
        self.decide(&who, req.into_inner(), true)
            .await
            .map(Response::new)
    }

    async fn reject(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::ApprovalInfo>, Status> {
        let who = authorize(&self.ctx, &req, "Reject", Permission::Read)?;
        self.decide(&who, req.into_inner(), false)
            .await
            .map(Response::new)
    }
}

/// What this node holds: its archive (with problems reading it) and the state's entries.
struct Held {
    archive: Vec<AuditEntry>,
    problems: Vec<audit_chain::Problem>,
    state: Vec<AuditEntry>,
}

impl Held {
    /// Everything as stored, archive then state: what verification examines.
    fn as_stored(&self) -> Vec<AuditEntry> {
        self.archive.iter().chain(&self.state).cloned().collect()
    }

    /// One entry per seq, oldest first, the state authoritative for its range: what list
    /// and export show.
    fn merged(&self) -> Vec<AuditEntry> {
        let first_in_state = self.state.first().map_or(u64::MAX, |e| e.seq);
        let mut seen = std::collections::BTreeSet::new();
        let mut out: Vec<AuditEntry> = self
            .archive
            .iter()
            .filter(|e| e.seq < first_in_state && seen.insert(e.seq))
            .cloned()
            .collect();
        out.sort_by_key(|e| e.seq);
        out.extend(self.state.iter().cloned());
        out
    }
}

async fn held_entries(ctx: &Ctx) -> ApiResult<Held> {
    let path = ctx.config.data_dir.join("audit-archive.jsonl");
    // The state first: an entry trimmed to the archive between the two reads then shows up
    // in both (verify drops identical duplicates), never in neither.
    let state = ctx.node.read(|s| s.audit.entries().to_vec());
    let text = match tokio::fs::read_to_string(&path).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(ApiError::FailedPrecondition(format!(
                "cannot read the audit archive {}: {e}",
                path.display()
            )));
        }
    };
    let (archive, problems) = audit_chain::parse_jsonl(&text, 1);
    Ok(Held {
        archive,
        problems,
        state,
    })
}

fn record(e: &AuditEntry) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: e.seq,
        log_index: e.log_index,
        at_unix_ms: e.at_unix_ms,
        origin: e.origin.clone(),
        what: e.what.clone(),
        target: e.target.clone(),
        result: e.result.clone(),
        prev_hash: e.prev_hash.clone(),
        hash: e.hash.clone(),
    }
}

pub struct AuditApi {
    ctx: Arc<Ctx>,
}

impl AuditApi {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        AuditApi { ctx }
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::AuditChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for AuditApi {
    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        authorize(&self.ctx, &req, "ListAudit", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let req = req.into_inner();
        let limit = match req.limit {
            0 => 100,
            n => n as usize,
        };
        let all = held_entries(&self.ctx).await?.merged();
        let mut entries: Vec<pb::AuditRecord> = all
            .iter()
            .rev()
            .filter(|e| e.at_unix_ms >= req.since_unix_ms)
            .filter(|e| req.actor.is_empty() || e.origin.contains(&req.actor))
            .take(limit)
            .map(record)
            .collect();
        entries.reverse();
        let (head_seq, head_hash) = all
            .last()
            .map_or((0, String::new()), |e| (e.seq, e.hash.clone()));
        Ok(fresh.respond(pb::ListAuditResponse {
            entries,
            head_seq,
            head_hash,
        }))
    }

    type ExportAuditStream = ExportStream;

    async fn export_audit(
        &self,
        req: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        let who = authorize(&self.ctx, &req, "ExportAudit", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let since = req.get_ref().since_unix_ms;
        let all = held_entries(&self.ctx).await?.merged();
        info!(identity = %who, since, entries = all.len(), "audit export");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let selected: Vec<pb::AuditRecord> = all
                .iter()
                .filter(|e| e.at_unix_ms >= since)
                .map(record)
                .collect();
            for chunk in selected.chunks(EXPORT_CHUNK) {
                let msg = pb::AuditChunk {
                    entries: chunk.to_vec(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(fresh.respond(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let who = authorize(&self.ctx, &req, "VerifyAudit", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let mut anchors = Vec::new();
        for a in &req.get_ref().anchors {
            anchors.push(audit_chain::parse_anchor(a).map_err(Status::invalid_argument)?);
        }
        let held = held_entries(&self.ctx).await?;
        let report = audit_chain::verify(
            &held.as_stored(),
            &VerifyOptions {
                from_genesis: true,
                anchors,
            },
        );
        let mut problems: Vec<String> = held
            .problems
            .iter()
            .map(|p| format!("archive {p}"))
            .collect();
        problems.extend(report.problems.iter().map(ToString::to_string));
        let ok = problems.is_empty();
        info!(identity = %who, ok, problems = problems.len(), head_seq = report.head_seq, "audit verified");
        Ok(fresh.respond(pb::VerifyAuditResponse {
            ok,
            node_id: self.ctx.node.id(),
            entries: report.entries as u64,
            archived: held.archive.len() as u64,
            in_state: held.state.len() as u64,
            pre_chain: report.pre_chain as u64,
            duplicates: report.duplicates as u64,
            first_seq: report.first_seq,
            head_seq: report.head_seq,
            head_hash: report.head_hash,
            problems,
        }))
    }
}
