//! Backup API: the catalog, the policy, and starting backups, verifies and copies.
//!
//! Why Start* only issue: the work runs on agents as ordinary commands, so the command
//! machinery's idempotency (keys, request ids), re-delivery across leader changes and
//! progress events apply unchanged; drctl follows with `ControlService.RunAction` and the
//! returned request id. Catalog facts are written by the leader's recorder
//! ([`crate::control::scheduler`]) from committed command results, never from here, so a
//! failed backup cannot leave an entry whichever path started it.
//!
//! PIPL: `StartCopy` refuses a copy to another jurisdiction BEFORE anything is issued,
//! so no byte moves.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use dr_proto::identity::SpiffeId;
use dr_proto::pb;
use tonic::{Request, Response, Status};
use tracing::info;

use super::auth::{Permission, authorize};
use super::error::{ApiError, ApiResult};
use super::now_unix_ms;
use crate::Ctx;
use crate::state::catalog::{self, BackupCommand, BackupEntry, BackupPolicy, Kind, verbs};
use crate::state::{self, Command, NewCommand};

/// Default deadline of a backup command.
pub const BACKUP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// The BackupService implementation.
pub struct BackupApi {
    ctx: Arc<Ctx>,
}

impl BackupApi {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        BackupApi { ctx }
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

/// The `backup.run` command for `kind` of `target` under `policy`: (host, action).
pub fn backup_action(
    policy: &BackupPolicy,
    kind: Kind,
    target: &str,
    host_override: &str,
    location_override: &str,
) -> Result<(String, pb::Action), String> {
    let location = if location_override.is_empty() {
        policy.home_location(target)
    } else {
        policy.location(location_override)
    }
    .ok_or_else(|| {
        format!("no location for {target}: add a [[locations]] entry to the backup policy")
    })?;
    match kind {
        Kind::Full | Kind::Incr | Kind::Logical => {
            let db = policy.database(target).ok_or_else(|| {
                let known: Vec<&str> = policy.databases.iter().map(|d| d.name.as_str()).collect();
                format!(
                    "no database {target} in the backup policy (known: {})",
                    known.join(", ")
                )
            })?;
            let host = if host_override.is_empty() {
                db.host.clone()
            } else {
                host_override.to_owned()
            };
            Ok((
                host,
                generic(
                    verbs::RUN,
                    vec![
                        ("type", kind.as_str().to_owned()),
                        ("target", db.name.clone()),
                        ("location", location.name.clone()),
                        ("repo_config", location.repo_config.clone()),
                        ("pg_url", db.pg_url.clone()),
                        ("data_dir", db.data_dir.clone()),
                        ("dbname", db.dump_dbname.clone()),
                    ],
                ),
            ))
        }
        Kind::Files => {
            let fs = policy
                .file_set(target)
                .ok_or_else(|| format!("no file set {target} in the backup policy"))?;
            let host = if host_override.is_empty() {
                fs.host.clone()
            } else {
                host_override.to_owned()
            };
            Ok((
                host,
                generic(
                    verbs::RUN,
                    vec![
                        ("type", "files".to_owned()),
                        ("target", fs.name.clone()),
                        ("location", location.name.clone()),
                        ("repo_config", location.repo_config.clone()),
                        ("paths", fs.paths.join(",")),
                        ("exclude", fs.exclude.join(",")),
                        ("include", fs.include.join(",")),
                    ],
                ),
            ))
        }
        Kind::Copy => Err("a copy is started with StartCopy".into()),
    }
}

/// The `backup.copy` command of backup `b` into `to`: (host, action), or the PIPL refusal.
pub fn copy_action(
    policy: &BackupPolicy,
    b: &BackupEntry,
    to: &str,
) -> Result<(String, pb::Action), String> {
    let dst = policy
        .location(to)
        .ok_or_else(|| format!("no location {to} in the backup policy"))?;
    if b.locations.contains_key(to) {
        return Err(format!("backup {} is already stored at {to}", b.id));
    }
    // Copy from a location of the same jurisdiction when there is one.
    let mut sources: Vec<&catalog::LocationPolicy> = b
        .locations
        .keys()
        .filter_map(|l| policy.location(l))
        .collect();
    sources.sort_by_key(|l| l.jurisdiction != dst.jurisdiction);
    let src = sources
        .first()
        .ok_or_else(|| format!("backup {} has no location the policy still knows", b.id))?;
    policy.check_transfer(src, dst)?;
    let host = if dst.copier_host.is_empty() {
        b.host_id.clone()
    } else {
        dst.copier_host.clone()
    };
    Ok((
        host,
        generic(
            verbs::COPY,
            vec![
                ("backup_id", b.id.clone()),
                ("location", src.name.clone()),
                ("to_location", dst.name.clone()),
                ("from_repo_config", src.repo_config.clone()),
                ("to_repo_config", dst.repo_config.clone()),
            ],
        ),
    ))
}

/// Parses and validates a policy document (time zone and cron lines included).
pub fn parse_policy(text: &str) -> Result<BackupPolicy, String> {
    let p: BackupPolicy = toml::from_str(text).map_err(|e| format!("backup policy: {e}"))?;
    p.validate()?;
    chrono_tz::Tz::from_str(&p.timezone).map_err(|_| {
        format!(
            "unknown time zone {:?} (e.g. \"Asia/Shanghai\")",
            p.timezone
        )
    })?;
    for s in &p.schedules {
        crate::control::scheduler::cron::Cron::parse(&s.cron)
            .map_err(|e| format!("schedule {}: {e}", s.name))?;
    }
    Ok(p)
}

/// Commits `cmd` and waits until this node applied it.
pub(crate) async fn write(ctx: &Ctx, origin: &str, cmd: Command) -> ApiResult<state::Response> {
    super::propose(ctx, origin, cmd).await
}

/// Issues commands, returning their keys (new or existing).
pub(crate) async fn issue(
    ctx: &Ctx,
    origin: &str,
    commands: Vec<NewCommand>,
) -> ApiResult<Vec<String>> {
    match write(ctx, origin, Command::IssueCommands { commands }).await? {
        state::Response::Issued { issued, existing } => {
            Ok(issued.into_iter().chain(existing).collect())
        }
        state::Response::Refused { refusal } => Err(ApiError::Refused(refusal)),
        other => Err(ApiError::Unexpected(format!("{other:?}"))),
    }
}

async fn start(
    ctx: &Ctx,
    origin: &SpiffeId,
    jobs: Vec<(String, pb::Action)>,
    request_id: &str,
    timeout_ms: u64,
) -> Result<Response<pb::StartJobResponse>, Status> {
    let request_id = if request_id.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        request_id.to_owned()
    };
    // A retried call (same request id) issues nothing new.
    let existing: Vec<(String, String)> = ctx.node.read(|s| {
        s.commands
            .by_request_id(&request_id)
            .map(|c| (c.key.clone(), c.host_id.clone()))
            .collect()
    });
    let action = jobs.first().map(|(_, a)| a.clone());
    if !existing.is_empty() {
        return Ok(Response::new(pb::StartJobResponse {
            request_id,
            keys: existing.iter().map(|(k, _)| k.clone()).collect(),
            host_ids: existing.into_iter().map(|(_, h)| h).collect(),
            action,
        }));
    }
    let timeout = if timeout_ms == 0 {
        BACKUP_TIMEOUT
    } else {
        Duration::from_millis(timeout_ms)
    };
    let deadline = now_unix_ms() + i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 2);
    let known: Vec<String> = ctx.node.read(|s| s.hosts.keys().cloned().collect());
    for (h, _) in &jobs {
        if !known.contains(h) {
            return Err(ApiError::FailedPrecondition(format!(
                "host {h} named by the backup policy is not known to the cluster (has its agent ever connected?)"
            ))
            .into());
        }
    }
    let commands: Vec<NewCommand> = jobs
        .iter()
        .enumerate()
        .map(|(i, (host, action))| NewCommand {
            key: format!("{request_id}-{i}-{host}"),
            host_id: host.clone(),
            action: action.clone(),
            deadline_unix_ms: deadline,
            request_id: request_id.clone(),
        })
        .collect();
    let host_ids = commands.iter().map(|c| c.host_id.clone()).collect();
    let keys = issue(ctx, &origin.to_string(), commands).await?;
    info!(identity = %origin, request_id = %request_id, keys = keys.len(), "backup job issued");
    Ok(Response::new(pb::StartJobResponse {
        request_id,
        keys,
        host_ids,
        action,
    }))
}

/// What `DeleteBackups` would commit: validated against the policy and the catalog (the
/// approval launcher calls it again, on the state at approval time).
pub(crate) fn delete_command(
    state: &state::State,
    r: &pb::DeleteBackupsRequest,
) -> Result<(Command, pb::DeleteBackupsResponse), ApiError> {
    let policy = state.catalog.policy.as_ref().ok_or_else(|| {
        ApiError::FailedPrecondition("no backup policy yet: nothing can be deleted".into())
    })?;
    if r.ids.is_empty() {
        return Err(ApiError::InvalidArgument(
            "name the backups to delete (ids from `drctl backup list`)".into(),
        ));
    }
    let mut entries = Vec::new();
    for id in &r.ids {
        let b = state.catalog.backups.get(id).ok_or_else(|| {
            ApiError::NotFound(format!(
                "no backup {id} in the catalog; see `drctl backup list`"
            ))
        })?;
        entries.push(b);
    }
    let location = if r.location.is_empty() {
        let mut locs: Vec<&String> = entries.iter().flat_map(|b| b.locations.keys()).collect();
        locs.sort();
        locs.dedup();
        match locs.as_slice() {
            [one] => (*one).clone(),
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "the backups are stored at several locations ({}): choose one with --location",
                    locs.iter()
                        .map(|l| l.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    } else {
        r.location.clone()
    };
    let loc = policy
        .locations
        .iter()
        .find(|l| l.name == location)
        .ok_or_else(|| {
            ApiError::InvalidArgument(format!("no location {location} in the backup policy"))
        })?;
    if loc.prune_host.is_empty() || loc.prune_repo_config.is_empty() {
        return Err(ApiError::FailedPrecondition(format!(
            "location {location} has no prune_host / prune_repo_config in the policy: nothing would ever delete there; add them first"
        )));
    }
    let mut marked = Vec::new();
    let mut already = Vec::new();
    for b in &entries {
        match b.locations.get(&location) {
            None => {
                return Err(ApiError::InvalidArgument(format!(
                    "backup {} is not stored at {location}",
                    b.id
                )));
            }
            Some(p) if p.marked_for_delete_at_unix_ms != 0 => already.push(b.id.clone()),
            Some(_) => marked.push(b.id.clone()),
        }
    }
    // Never leave a database without a physical backup at this location.
    for b in &entries {
        if !matches!(b.kind, Kind::Full | Kind::Incr) {
            continue;
        }
        let remaining = state.catalog.backups.values().any(|o| {
            o.db == b.db
                && matches!(o.kind, Kind::Full | Kind::Incr)
                && !marked.contains(&o.id)
                && o.locations
                    .get(&location)
                    .is_some_and(|p| p.marked_for_delete_at_unix_ms == 0)
        });
        if !remaining {
            return Err(ApiError::FailedPrecondition(format!(
                "deleting these would leave database {} without a physical backup at {location}; take a new backup first or keep {}",
                b.db, b.id
            )));
        }
    }
    let grace_ms =
        i64::try_from(policy.prune_grace_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 4);
    let cmd = Command::Backup(BackupCommand::MarkForDelete {
        location: location.clone(),
        ids: marked.clone(),
    });
    Ok((
        cmd,
        pb::DeleteBackupsResponse {
            location,
            marked,
            already_marked: already,
            delete_after_unix_ms: now_unix_ms().saturating_add(grace_ms),
        },
    ))
}

/// The approval launcher of kind `prune`: the stored request, validated again now.
pub(crate) fn build_delete_launch(ctx: &Ctx, payload_json: &str) -> ApiResult<Command> {
    let r: pb::DeleteBackupsRequest = serde_json::from_str(payload_json).map_err(|e| {
        ApiError::InvalidArgument(format!("the stored delete request is unreadable: {e}"))
    })?;
    ctx.node.read(|s| delete_command(s, &r)).map(|(cmd, _)| cmd)
}

fn policy_or_refuse(ctx: &Ctx) -> Result<BackupPolicy, Status> {
    ctx.node.read(|s| s.catalog.policy.clone()).ok_or_else(|| {
        ApiError::FailedPrecondition(
            "no backup policy yet: apply one with `drctl backup policy apply -f deploy/examples/backup-policy.toml`".into(),
        )
        .into()
    })
}

#[tonic::async_trait]
impl pb::backup_service_server::BackupService for BackupApi {
    async fn list_backups(
        &self,
        req: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        authorize(&self.ctx, &req, "ListBackups", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let db = req.into_inner().db;
        let backups = self.ctx.node.read(|s| {
            s.catalog
                .list(&db)
                .map(|b| catalog::to_info(b, s.catalog.policy.as_ref()))
                .collect()
        });
        Ok(fresh.respond(pb::ListBackupsResponse { backups }))
    }

    async fn get_backup(
        &self,
        req: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::BackupInfo>, Status> {
        authorize(&self.ctx, &req, "GetBackup", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let id = req.into_inner().id;
        self.ctx
            .node
            .read(|s| {
                s.catalog
                    .backups
                    .get(&id)
                    .map(|b| catalog::to_info(b, s.catalog.policy.as_ref()))
            })
            .map(|b| fresh.respond(b))
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no backup {id} in the catalog; list them with `drctl backup list`"
                ))
                .into()
            })
    }

    async fn start_backup(
        &self,
        req: Request<pb::StartBackupRequest>,
    ) -> Result<Response<pb::StartJobResponse>, Status> {
        let origin = authorize(&self.ctx, &req, "StartBackup", Permission::Act)?;
        let r = req.into_inner();
        let policy = policy_or_refuse(&self.ctx)?;
        let kind = Kind::parse(&r.kind)
            .filter(|k| *k != Kind::Copy)
            .ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "backup type {:?}: use full, incr, logical or files",
                    r.kind
                ))
            })?;
        let (host, action) = backup_action(&policy, kind, &r.db, &r.host_id, &r.location)
            .map_err(ApiError::FailedPrecondition)?;
        start(
            &self.ctx,
            &origin,
            vec![(host, action)],
            &r.request_id,
            r.timeout_ms,
        )
        .await
    }

    async fn start_verify(
        &self,
        req: Request<pb::StartVerifyRequest>,
    ) -> Result<Response<pb::StartJobResponse>, Status> {
        let origin = authorize(&self.ctx, &req, "StartVerify", Permission::Act)?;
        let r = req.into_inner();
        let policy = policy_or_refuse(&self.ctx)?;
        if r.id.is_empty() && !r.all {
            return Err(ApiError::InvalidArgument("name a backup id or pass --all".into()).into());
        }
        let entries: Vec<BackupEntry> = self.ctx.node.read(|s| {
            s.catalog
                .backups
                .values()
                .filter(|b| r.all || b.id == r.id)
                .cloned()
                .collect()
        });
        if entries.is_empty() {
            return Err(ApiError::NotFound(format!("no backup {} in the catalog", r.id)).into());
        }
        // One command per (location, host): the agent that can read that location.
        let mut groups: std::collections::BTreeMap<(String, String), Vec<String>> =
            Default::default();
        for b in &entries {
            for loc in b.locations.keys() {
                if !r.location.is_empty() && *loc != r.location {
                    continue;
                }
                let host = match policy.location(loc) {
                    Some(l)
                        if !l.copier_host.is_empty()
                            && b.locations.keys().next().is_none_or(|first| first != loc) =>
                    {
                        l.copier_host.clone()
                    }
                    _ => b.host_id.clone(),
                };
                groups
                    .entry((loc.clone(), host))
                    .or_default()
                    .push(b.id.clone());
            }
        }
        if groups.is_empty() {
            return Err(
                ApiError::NotFound(format!("no backup stored at location {}", r.location)).into(),
            );
        }
        let mut jobs = Vec::new();
        for ((loc, host), ids) in groups {
            let l = policy.location(&loc).ok_or_else(|| {
                ApiError::FailedPrecondition(format!("location {loc} is no longer in the policy"))
            })?;
            jobs.push((
                host,
                generic(
                    verbs::VERIFY,
                    vec![
                        ("ids", ids.join(",")),
                        ("location", loc.clone()),
                        ("repo_config", l.repo_config.clone()),
                        ("include_wal", r.all.to_string()),
                    ],
                ),
            ));
        }
        start(&self.ctx, &origin, jobs, &r.request_id, r.timeout_ms).await
    }

    async fn start_copy(
        &self,
        req: Request<pb::StartCopyRequest>,
    ) -> Result<Response<pb::StartJobResponse>, Status> {
        let origin = authorize(&self.ctx, &req, "StartCopy", Permission::Act)?;
        let r = req.into_inner();
        let policy = policy_or_refuse(&self.ctx)?;
        let b = self
            .ctx
            .node
            .read(|s| s.catalog.backups.get(&r.id).cloned())
            .ok_or_else(|| ApiError::NotFound(format!("no backup {} in the catalog", r.id)))?;
        let job = copy_action(&policy, &b, &r.to_location).map_err(ApiError::FailedPrecondition)?;
        start(&self.ctx, &origin, vec![job], &r.request_id, r.timeout_ms).await
    }

    async fn apply_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        let origin = authorize(&self.ctx, &req, "ApplyPolicy", Permission::Admin)?;
        let policy = parse_policy(&req.into_inner().toml).map_err(ApiError::InvalidArgument)?;
        let counts = (
            policy.schedules.len(),
            policy.locations.len(),
            policy.databases.len(),
        );
        let resp = write(
            &self.ctx,
            &origin.to_string(),
            Command::Backup(BackupCommand::ApplyPolicy {
                policy: Box::new(policy),
            }),
        )
        .await?;
        let changed = match resp {
            state::Response::Applied => true,
            state::Response::Unchanged => false,
            state::Response::Refused { refusal } => return Err(ApiError::Refused(refusal).into()),
            other => return Err(ApiError::Unexpected(format!("{other:?}")).into()),
        };
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(Response::new(pb::ApplyPolicyResponse {
            changed,
            schedules: n(counts.0),
            locations: n(counts.1),
            databases: n(counts.2),
        }))
    }

    async fn delete_backups(
        &self,
        req: Request<pb::DeleteBackupsRequest>,
    ) -> Result<Response<pb::DeleteBackupsResponse>, Status> {
        let origin = authorize(&self.ctx, &req, "DeleteBackups", Permission::Admin)?;
        let r = req.into_inner();
        let (cmd, resp) = self.ctx.node.read(|s| delete_command(s, &r))?;
        if resp.marked.is_empty() {
            return Ok(Response::new(resp));
        }
        let target = format!("{} at {}", resp.marked.join(","), resp.location);
        super::security::gate(
            &self.ctx,
            &origin,
            super::security::ApprovalKind::Prune,
            &target,
            &r,
        )
        .await?;
        if let state::Response::Refused { refusal } =
            write(&self.ctx, &origin.to_string(), cmd).await?
        {
            return Err(ApiError::Refused(refusal).into());
        }
        info!(identity = %origin, location = %resp.location, ids = ?resp.marked, reason = %r.reason, "backups marked for deletion");
        Ok(Response::new(resp))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        authorize(&self.ctx, &req, "GetPolicy", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let policy = policy_or_refuse(&self.ctx)?;
        Ok(fresh.respond(pb::GetPolicyResponse {
            toml: toml::to_string(&policy).unwrap_or_default(),
            json: serde_json::to_string(&policy).unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> BackupPolicy {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/backup-policy.toml"
        ))
        .unwrap();
        parse_policy(&text).unwrap()
    }

    #[test]
    fn t10_example_policy_parses_with_the_spec_schedules() {
        let p = example();
        let cron = |n: &str| {
            p.schedules
                .iter()
                .find(|s| s.name == n)
                .unwrap()
                .cron
                .clone()
        };
        assert_eq!(cron("db-full"), "0 2 * * *");
        assert_eq!(cron("db-incr"), "0 8,14,20 * * *");
        assert_eq!(cron("certificates"), "0 1 * * *");
        assert_eq!(cron("app-data"), "0 3 * * *");
        assert_eq!(cron("configuration"), "0 */4 * * *");
        assert_eq!(p.timezone, "Asia/Shanghai");
    }

    /// A drill schedule remembers when it was first applied (so the drill scheduler never
    /// starts a slot from before it); re-applying keeps that time, a changed cron is new.
    #[test]
    fn t15_drill_schedules_remember_when_they_were_applied() {
        let apply = |s: &mut state::State, at: i64, p: &BackupPolicy| {
            state::apply(
                s,
                at as u64,
                &state::Request {
                    at_unix_ms: at,
                    origin: "test".into(),
                    cmd: Command::Backup(BackupCommand::ApplyPolicy {
                        policy: Box::new(p.clone()),
                    }),
                },
            )
        };
        let mut s = state::State::default();
        let mut p = example();
        let drill = p.restore.drills[0].clone();
        assert!(!drill.cron.is_empty());
        let key = catalog::drill_schedule_key(&drill);
        assert_eq!(apply(&mut s, 1_000, &p), state::Response::Applied);
        assert_eq!(s.catalog.drill_since.get(&key), Some(&1_000));
        p.prune_grace_secs += 1;
        assert_eq!(apply(&mut s, 2_000, &p), state::Response::Applied);
        assert_eq!(s.catalog.drill_since.get(&key), Some(&1_000), "kept");
        p.restore.drills[0].cron = "30 5 * * 0".into();
        assert_eq!(apply(&mut s, 3_000, &p), state::Response::Applied);
        let new_key = catalog::drill_schedule_key(&p.restore.drills[0]);
        assert_eq!(s.catalog.drill_since.get(&new_key), Some(&3_000));
        assert!(
            !s.catalog.drill_since.contains_key(&key),
            "old schedule dropped"
        );
    }

    #[test]
    fn t20_copy_to_another_jurisdiction_is_refused_unless_allowed() {
        let mut p = example();
        p.locations.push(catalog::LocationPolicy {
            name: "singapore".into(),
            tier: "offsite".into(),
            jurisdiction: "sg".into(),
            repo_config: "/etc/dr/sg.toml".into(),
            copier_host: String::new(),
            prune_host: String::new(),
            prune_repo_config: String::new(),
        });
        let mut b = BackupEntry {
            id: "b1".into(),
            db: "yeslocker".into(),
            kind: Kind::Full,
            parent: String::new(),
            host_id: "db-bj-1".into(),
            files: 0,
            bytes_total: 0,
            bytes_added: 0,
            duration_ms: 0,
            start_lsn: String::new(),
            stop_lsn: String::new(),
            timeline: 1,
            started_at_unix_ms: 0,
            finished_at_unix_ms: 0,
            created_by: String::new(),
            command_key: String::new(),
            locations: Default::default(),
        };
        b.locations.insert("primary".into(), Default::default());
        let e = copy_action(&p, &b, "singapore").unwrap_err();
        assert!(e.contains("PIPL") && e.contains("cn->sg"), "{e}");
        let (host, _) = copy_action(&p, &b, "secondary").unwrap();
        assert_eq!(host, "backup-bj-1");
        p.allowed_transfers.push("cn->sg".into());
        assert!(copy_action(&p, &b, "singapore").is_ok());
    }

    #[test]
    fn t30_password_in_pg_url_is_refused() {
        let mut p = example();
        p.databases[0].pg_url = "postgres://u:secret@db/x".into();
        assert!(p.validate().unwrap_err().contains("password"));
    }
}
