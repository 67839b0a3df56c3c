//! Restore API (issue 4): `drctl restore` and `drctl drill`.
//!
//! Why the chain is checked here, synchronously, before an operation exists: a restore that
//! cannot reach its target must be refused before any file is written, with the range that
//! can be reached, so the operator can pick another target at once. The target host's agent
//! lists the archive (`restore.wal-list`, a read-only command) and the pure planner
//! ([`crate::state::operations::restore::plan`]) picks the base backup and checks the WAL
//! chain. The restore itself then runs as a durable operation on the plan executor (steps
//! `check_chain`, `restore_files`, `recover_start`, `verify`, `record`), so a leader change
//! neither loses nor repeats it; `check_chain` re-checks on the host right before writing.
//!
//! `--before-incident ID`: `I-N` names an incident (`drctl incident open`) and the target is
//! the instant before it was opened; a plain number names an operation (e.g. the failover an
//! incident caused) and the target is the instant before it was created. An RFC 3339 time is
//! accepted as well.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dr_proto::identity::SpiffeId;
use dr_proto::pb;
use tonic::{Request, Response, Status};
use tracing::info;

use super::auth::{Permission, authorize};
use super::backup::{issue, write};
use super::error::{ApiError, ApiResult};
use super::now_unix_ms;
use crate::Ctx;
use crate::state::catalog::{BackupEntry, BackupPolicy, Kind};
use crate::state::commands::CommandState;
use crate::state::operations::restore::{
    self as plan, ChainPlan, RestoreParams, RestoreTarget, WalArchive, parse_lsn,
};
use crate::state::operations::{NewOperation, OpKind, Operation, OpsCommand};
use crate::state::{self, Command, NewCommand};

/// How long the archive listing may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

pub struct RestoreApi {
    ctx: Arc<Ctx>,
}

impl RestoreApi {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        RestoreApi { ctx }
    }
}

fn generic(verb: &str, args: Vec<(&str, String)>) -> pb::Action {
    pb::Action {
        kind: Some(pb::action::Kind::Generic(pb::Generic {
            verb: verb.to_owned(),
            args: args.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        })),
    }
}

/// Asks `host` to list the archive of `repo_config` and waits for the answer.
async fn wal_listing(
    ctx: &Ctx,
    origin: &str,
    host: &str,
    repo_config: &str,
) -> ApiResult<WalArchive> {
    let key = format!("wal-list-{}", uuid::Uuid::new_v4());
    let deadline = now_unix_ms() + i64::try_from(LIST_TIMEOUT.as_millis()).unwrap_or(60_000);
    issue(
        ctx,
        origin,
        vec![NewCommand {
            key: key.clone(),
            host_id: host.to_owned(),
            action: generic(
                "restore.wal-list",
                vec![("repo_config", repo_config.to_owned())],
            ),
            deadline_unix_ms: deadline,
            request_id: key.clone(),
        }],
    )
    .await?;
    let started = std::time::Instant::now();
    loop {
        let rec = ctx.node.read(|s| s.commands.get(&key).cloned());
        if let Some(r) = rec.filter(|r| r.state.is_finished()) {
            let res = r.result.unwrap_or_default();
            if r.state != CommandState::Done {
                let why = if res.message.is_empty() {
                    r.reason
                } else {
                    res.message
                };
                return Err(ApiError::FailedPrecondition(format!(
                    "{host} could not list the WAL archive ({}): {why}",
                    r.state.as_str()
                )));
            }
            let details: BTreeMap<String, String> = res.details.into_iter().collect();
            return WalArchive::from_details(&details).map_err(ApiError::Unexpected);
        }
        if started.elapsed() > LIST_TIMEOUT + Duration::from_secs(5) {
            return Err(ApiError::FailedPrecondition(format!(
                "{host} did not list the WAL archive within {}s: is its agent connected?",
                LIST_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn policy(ctx: &Ctx) -> ApiResult<BackupPolicy> {
    ctx.node.read(|s| s.catalog.policy.clone()).ok_or_else(|| {
        ApiError::FailedPrecondition(
            "no backup policy yet: apply one with `drctl backup policy apply -f FILE`".into(),
        )
    })
}

fn parse_time(v: &str) -> ApiResult<i64> {
    chrono::DateTime::parse_from_rfc3339(v.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            ApiError::InvalidArgument(format!(
                "{v:?} is not a time: use RFC 3339 with a zone, e.g. 2026-11-28T10:15:00Z or 2026-11-28T18:15:00+08:00"
            ))
        })
}

fn target_of(ctx: &Ctx, r: &pb::StartRestoreRequest) -> ApiResult<RestoreTarget> {
    let v = r.target_value.trim();
    Ok(match r.target_type.as_str() {
        "" | "latest" => RestoreTarget::Latest,
        "backup" => RestoreTarget::Backup(v.to_owned()),
        "time" => RestoreTarget::TimeMs(parse_time(v)?),
        "lsn" => RestoreTarget::Lsn(parse_lsn(v).ok_or_else(|| {
            ApiError::InvalidArgument(format!("{v:?} is not an LSN (e.g. 0/3000060)"))
        })?),
        "xid" if !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()) => {
            RestoreTarget::Xid(v.to_owned())
        }
        "xid" => {
            return Err(ApiError::InvalidArgument(format!(
                "{v:?} is not a transaction id"
            )));
        }
        "name" if !v.is_empty() => RestoreTarget::Name(v.to_owned()),
        "before_incident" => {
            if v.starts_with("I-") || v.starts_with("i-") {
                let id = crate::state::incidents::parse_id(v).map_err(ApiError::InvalidArgument)?;
                let at = ctx
                    .node
                    .read(|s| s.incidents.incidents.get(&id).map(|i| i.opened_at_unix_ms))
                    .ok_or_else(|| {
                        ApiError::NotFound(format!("no incident {v}; see `drctl incident list`"))
                    })?;
                RestoreTarget::TimeMs(at - 1)
            } else if let Ok(id) = v.parse::<u64>() {
                let at = ctx
                    .node
                    .read(|s| s.ops.operations.get(&id).map(|o| o.created_at_unix_ms))
                    .ok_or_else(|| {
                        ApiError::NotFound(format!(
                            "no operation {id} (see `drctl operations list`); name an incident as I-N (`drctl incident list`) or give an RFC 3339 time"
                        ))
                    })?;
                RestoreTarget::TimeMs(at - 1)
            } else {
                RestoreTarget::TimeMs(parse_time(v)? - 1)
            }
        }
        other => {
            return Err(ApiError::InvalidArgument(format!(
                "unknown target {other:?}: use latest, backup, time, lsn, xid, name or before_incident"
            )));
        }
    })
}

fn describe(t: &RestoreTarget) -> String {
    match t {
        RestoreTarget::Latest => "latest".into(),
        RestoreTarget::Backup(b) => format!("backup {b}"),
        RestoreTarget::TimeMs(ms) => chrono::DateTime::<chrono::Utc>::from_timestamp_millis(*ms)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        RestoreTarget::Lsn(l) => format!("lsn {}", plan::lsn_text(*l)),
        RestoreTarget::Xid(x) => format!("xid {x}"),
        RestoreTarget::Name(n) => format!("restore point {n}"),
    }
}

/// Everything a restore needs, validated; the operation is not committed.
pub(crate) async fn build_restore(
    ctx: &Ctx,
    origin: &str,
    r: &pb::StartRestoreRequest,
    kind: OpKind,
) -> ApiResult<(NewOperation, pb::RestorePlan)> {
    let policy = policy(ctx)?;
    if r.target_type == "backup" {
        let entry = ctx
            .node
            .read(|s| s.catalog.backups.get(r.target_value.trim()).cloned());
        if let Some(b) = entry.filter(|b| matches!(b.kind, Kind::Logical | Kind::Files)) {
            return build_other(ctx, r, &policy, &b);
        }
    }
    let db = policy.database(&r.db).cloned().ok_or_else(|| {
        let known: Vec<&str> = policy.databases.iter().map(|d| d.name.as_str()).collect();
        ApiError::NotFound(format!(
            "no database {} in the backup policy (known: {})",
            r.db,
            known.join(", ")
        ))
    })?;
    if r.in_place && !r.confirm {
        return Err(ApiError::InvalidArgument(format!(
            "an in-place restore replaces the data directory of {} (the current one is kept aside, not deleted); add --confirm",
            db.name
        )));
    }
    let host = if r.to_host.is_empty() {
        if r.in_place || kind == OpKind::Drill {
            db.host.clone()
        } else {
            return Err(ApiError::InvalidArgument(
                "name the host to restore on with --to-host (or restore in place with --in-place --confirm)".into(),
            ));
        }
    } else {
        r.to_host.clone()
    };
    let (to_region, from_region) = ctx.node.read(|s| {
        (
            s.hosts.get(&host).map(|h| h.region.clone()),
            s.hosts
                .get(&db.host)
                .map(|h| h.region.clone())
                .unwrap_or_default(),
        )
    });
    let to_region = to_region.ok_or_else(|| {
        ApiError::FailedPrecondition(format!(
            "host {host} is not known to the cluster (has its agent ever connected?)"
        ))
    })?;
    let location = if r.location.is_empty() {
        policy.home_location(&db.name)
    } else {
        policy.location(&r.location)
    }
    .cloned()
    .ok_or_else(|| {
        ApiError::FailedPrecondition(format!(
            "no location {:?} for {} in the backup policy",
            r.location, db.name
        ))
    })?;
    let scratch_root = if policy.restore.scratch_dir.is_empty() {
        "/var/tmp/dr-drill".to_owned()
    } else {
        policy.restore.scratch_dir.clone()
    };
    let data_dir = if kind == OpKind::Drill {
        format!(
            "{}/drill-{}-{}",
            scratch_root.trim_end_matches('/'),
            db.name,
            {
                let id: Vec<char> = r
                    .request_id
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric())
                    .collect();
                id[id.len().saturating_sub(12)..].iter().collect::<String>()
            }
        )
    } else if !r.data_dir.is_empty() {
        r.data_dir.clone()
    } else if r.in_place {
        db.data_dir.clone()
    } else {
        return Err(ApiError::InvalidArgument(
            "name the target directory with --data-dir (absent or empty)".into(),
        ));
    };
    if !data_dir.starts_with('/') {
        return Err(ApiError::InvalidArgument(format!(
            "--data-dir {data_dir} must be an absolute path on {host}"
        )));
    }
    let target = target_of(ctx, r)?;
    let timeline = match r.timeline.as_str() {
        "" | "latest" | "current" => None,
        n => Some(n.parse::<u32>().map_err(|_| {
            ApiError::InvalidArgument(format!("timeline {n:?}: use latest, current or a number"))
        })?),
    };
    let backups: Vec<BackupEntry> = ctx.node.read(|s| {
        s.catalog
            .list(&db.name)
            .filter(|b| b.locations.contains_key(&location.name))
            .cloned()
            .collect()
    });
    let archive = wal_listing(ctx, origin, &host, &location.repo_config).await?;
    let refs: Vec<&BackupEntry> = backups.iter().collect();
    let base = (!r.backup_id.is_empty()).then_some(r.backup_id.as_str());
    let chain: ChainPlan = plan::plan(&refs, &archive, &target, base, timeline).map_err(|e| {
        ApiError::FailedPrecondition(format!(
            "restore of {} refused, nothing was written: {e}",
            db.name
        ))
    })?;
    let verify = policy.restore.verify_for(&db.name);
    let params = RestoreParams {
        host: host.clone(),
        repo_config: location.repo_config.clone(),
        data_dir: data_dir.clone(),
        port: r.port,
        in_place: r.in_place,
        scratch: kind == OpKind::Drill,
        target_action: if r.target_action.is_empty() {
            "promote".into()
        } else {
            r.target_action.clone()
        },
        timeline: r.timeline.clone(),
        tables: verify.tables,
        queries: verify.queries,
    };
    if !matches!(params.target_action.as_str(), "promote" | "pause") {
        return Err(ApiError::InvalidArgument(format!(
            "--target-action {}: use promote or pause",
            params.target_action
        )));
    }
    let steps = plan::steps(&chain, &params);
    let mut vars = BTreeMap::new();
    vars.insert("backup_id".into(), chain.backup_id.clone());
    vars.insert("target".into(), describe(&target));
    vars.insert("db".into(), db.name.clone());
    vars.insert("host".into(), host.clone());
    let prefix = if kind == OpKind::Drill {
        "drill"
    } else {
        "restore"
    };
    let op = NewOperation {
        kind,
        cluster: format!("{prefix}:{}", db.name),
        from_region,
        to_region: to_region.clone(),
        reason: format!(
            "{} {} to {} on {host}:{data_dir} from backup {}",
            prefix,
            db.name,
            describe(&target),
            chain.backup_id
        ),
        request_id: r.request_id.clone(),
        vars,
        steps,
        needs_operator: None,
    };
    let info = pb::RestorePlan {
        backup_id: chain.backup_id.clone(),
        backup_kind: chain.backup_kind.clone(),
        target_type: chain.target_type.clone(),
        target_value: chain.target_value.clone(),
        wal_required: chain.wal_required(),
        lines: chain.lines.clone(),
        to_host: host,
        to_region,
        data_dir,
    };
    Ok((op, info))
}

/// A logical or file-set backup named with `--backup ID`: dispatched to the agent verbs
/// `restore.logical` (pg_restore --clean --if-exists into `--to-host`'s server, the policy's
/// `pg_url` and `dump_dbname`) or `restore.files` (below `--data-dir`, `/` = in place;
/// `--dry-run` lists what would be written, on the agent, as an operation that writes
/// nothing).
fn build_other(
    ctx: &Ctx,
    r: &pb::StartRestoreRequest,
    policy: &BackupPolicy,
    b: &BackupEntry,
) -> ApiResult<(NewOperation, pb::RestorePlan)> {
    let loc_name = if r.location.is_empty() {
        b.locations.keys().next().cloned().unwrap_or_default()
    } else {
        r.location.clone()
    };
    let location = policy.location(&loc_name).cloned().ok_or_else(|| {
        ApiError::FailedPrecondition(format!(
            "backup {} has no location {loc_name:?} in the policy",
            b.id
        ))
    })?;
    let host = if r.to_host.is_empty() {
        b.host_id.clone()
    } else {
        r.to_host.clone()
    };
    let to_region = ctx
        .node
        .read(|s| s.hosts.get(&host).map(|h| h.region.clone()))
        .ok_or_else(|| {
            ApiError::FailedPrecondition(format!(
                "host {host} is not known to the cluster (has its agent ever connected?)"
            ))
        })?;
    let (verb, step, args, what, dest) = match b.kind {
        Kind::Logical => {
            let db = policy.database(&b.db).ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "database {} of logical backup {} is no longer in the policy",
                    b.db, b.id
                ))
            })?;
            let mut args = vec![
                ("repo_config", location.repo_config.clone()),
                ("backup_id", b.id.clone()),
                ("pg_url", db.pg_url.clone()),
            ];
            if !db.dump_dbname.is_empty() {
                args.push(("dbname", db.dump_dbname.clone()));
            }
            (
                "restore.logical",
                "restore_logical",
                args,
                "logical restore (pg_restore --clean --if-exists)",
                db.pg_url.clone(),
            )
        }
        _ => {
            if r.data_dir.is_empty() || !r.data_dir.starts_with('/') {
                return Err(ApiError::InvalidArgument(format!(
                    "file-set backup {}: name the absolute directory to restore below with --data-dir (`/` puts the files back in place)",
                    b.id
                )));
            }
            (
                "restore.files",
                "restore_file_set",
                vec![
                    ("repo_config", location.repo_config.clone()),
                    ("backup_id", b.id.clone()),
                    ("target", r.data_dir.clone()),
                    ("dry_run", r.dry_run.to_string()),
                ],
                if r.dry_run {
                    "file-set restore, dry run (lists what would be written)"
                } else {
                    "file-set restore"
                },
                r.data_dir.clone(),
            )
        }
    };
    let steps = plan::other_steps(&host, verb, step, args);
    let mut vars = BTreeMap::new();
    vars.insert("backup_id".into(), b.id.clone());
    vars.insert("target".into(), format!("backup {}", b.id));
    let op = NewOperation {
        kind: OpKind::Restore,
        cluster: format!("restore:{}", b.db),
        from_region: String::new(),
        to_region: to_region.clone(),
        reason: format!("{what} of {} from backup {} on {host}", b.db, b.id),
        request_id: r.request_id.clone(),
        vars,
        steps,
        needs_operator: None,
    };
    let info = pb::RestorePlan {
        backup_id: b.id.clone(),
        backup_kind: b.kind.as_str().to_owned(),
        target_type: "backup".into(),
        target_value: b.id.clone(),
        wal_required: String::new(),
        lines: vec![format!(
            "{what}: backup {} ({}) on {host} into {dest}",
            b.id,
            b.kind.as_str()
        )],
        to_host: host,
        to_region,
        data_dir: r.data_dir.clone(),
    };
    Ok((op, info))
}

async fn commit(ctx: &Ctx, origin: &str, op: NewOperation) -> ApiResult<pb::OperationInfo> {
    let request_id = op.request_id.clone();
    match write(
        ctx,
        origin,
        Command::Ops(OpsCommand::CreateOperation { op }),
    )
    .await?
    {
        state::Response::Refused { refusal } => return Err(ApiError::Refused(refusal)),
        state::Response::Applied | state::Response::Unchanged => {}
        other => return Err(ApiError::Unexpected(format!("{other:?}"))),
    }
    ctx.node
        .read(|s| {
            s.ops
                .operations
                .values()
                .find(|o| o.request_id == request_id)
                .map(Operation::to_info)
        })
        .ok_or_else(|| ApiError::Unexpected("operation not found after create".into()))
}

fn request_id(r: &str) -> String {
    if r.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        r.to_owned()
    }
}

#[tonic::async_trait]
impl pb::restore_service_server::RestoreService for RestoreApi {
    async fn start_restore(
        &self,
        req: Request<pb::StartRestoreRequest>,
    ) -> Result<Response<pb::StartRestoreResponse>, Status> {
        // In place replaces a database's data directory: admin; elsewhere: operator.
        let perm = if req.get_ref().in_place {
            Permission::Admin
        } else {
            Permission::Act
        };
        let caller: SpiffeId = authorize(&self.ctx, &req, "StartRestore", perm)?;
        let mut r = req.into_inner();
        r.request_id = request_id(&r.request_id);
        let origin = caller.to_string();
        let (op, plan) = build_restore(&self.ctx, &origin, &r, OpKind::Restore).await?;
        let listing = op.steps.iter().any(|s| s.name == "restore_file_set");
        if r.dry_run && !listing {
            return Ok(Response::new(pb::StartRestoreResponse {
                plan: Some(plan),
                operation: None,
                started: false,
            }));
        }
        if r.in_place && !r.dry_run {
            // Two-person rule (api::security): parks the request when the policy gates it.
            super::security::gate(
                &self.ctx,
                &caller,
                super::security::ApprovalKind::RestoreInPlace,
                &format!("{} on {}", r.db, plan.to_host),
                &r,
            )
            .await?;
        }
        info!(identity = %caller, db = %r.db, host = %plan.to_host, backup = %plan.backup_id, in_place = r.in_place, "restore requested");
        let info = commit(&self.ctx, &origin, op).await?;
        Ok(Response::new(pb::StartRestoreResponse {
            plan: Some(plan),
            operation: Some(info),
            started: true,
        }))
    }

    async fn run_drill(
        &self,
        req: Request<pb::RunDrillRequest>,
    ) -> Result<Response<pb::StartRestoreResponse>, Status> {
        let caller = authorize(&self.ctx, &req, "RunDrill", Permission::Act)?;
        let d = req.into_inner();
        if !matches!(d.drill.as_str(), "" | "backup-restore") {
            return Err(ApiError::InvalidArgument(format!(
                "unknown drill {:?}: the drill is backup-restore",
                d.drill
            ))
            .into());
        }
        let info = start_drill(
            &self.ctx,
            &caller.to_string(),
            &d.db,
            &d.host,
            &d.request_id,
        )
        .await?;
        Ok(Response::new(info))
    }

    async fn list_drills(
        &self,
        req: Request<pb::ListDrillsRequest>,
    ) -> Result<Response<pb::ListDrillsResponse>, Status> {
        authorize(&self.ctx, &req, "ListDrills", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let limit = match req.get_ref().limit {
            0 => 50,
            n => n as usize,
        };
        let drills = self.ctx.node.read(|s| {
            s.ops
                .operations
                .values()
                .rev()
                .filter(|o| o.kind == OpKind::Drill)
                .take(limit)
                .map(Operation::to_info)
                .collect()
        });
        Ok(fresh.respond(pb::ListDrillsResponse { drills }))
    }
}

/// Starts a backup-restore drill of `db` (also used by the drill schedule).
pub(crate) async fn start_drill(
    ctx: &Ctx,
    origin: &str,
    db: &str,
    host: &str,
    request_id_: &str,
) -> ApiResult<pb::StartRestoreResponse> {
    let policy = policy(ctx)?;
    let host = if host.is_empty() {
        policy
            .restore
            .drills
            .iter()
            .find(|d| d.db == db && !d.host.is_empty())
            .map(|d| d.host.clone())
            .unwrap_or_default()
    } else {
        host.to_owned()
    };
    let r = pb::StartRestoreRequest {
        db: db.to_owned(),
        target_type: "latest".into(),
        to_host: host,
        request_id: request_id(request_id_),
        ..Default::default()
    };
    let (op, plan) = build_restore(ctx, origin, &r, OpKind::Drill).await?;
    info!(db, host = %plan.to_host, backup = %plan.backup_id, "restore drill requested");
    let info = commit(ctx, origin, op).await?;
    Ok(pb::StartRestoreResponse {
        plan: Some(plan),
        operation: Some(info),
        started: true,
    })
}
