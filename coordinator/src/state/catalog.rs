//! The backup catalog, the backup policy and the schedules' "last fired" marks.
//!
//! Why in the replicated state: which backups exist, where every copy lives and whether it
//! was verified are DECISIONS the operator and a restore rely on after any coordinator dies;
//! the policy (databases, locations with their jurisdiction, schedules, retention) is what
//! the leader-only scheduler acts on, so a new leader must read the same policy.
//!
//! Invariants kept by [`apply`]:
//! - an entry exists only for a `backup.run` command that FINISHED successfully (`Record`
//!   reads the committed command record itself, so a failed, cancelled or expired backup
//!   can never become an entry, whatever a buggy proposer sends);
//! - a command key is turned into catalog facts at most once (`recorded_keys`);
//! - a schedule's last fired slot only moves forward, so two leaders proposing the same slot
//!   fire it once (the second `FireSchedule` is `Unchanged`);
//! - a copy location of another jurisdiction is only ever recorded if the policy allowed it.
//!
//! ```text
//!  scheduler (leader) ──FireSchedule{slot}──► last_fired[name] = slot   (before issuing)
//!                     ──IssueCommands{key = sched/<name>/<slot>}──► agent runs backup.run
//!  recorder (leader)  ──Record{command_key}──► entry built from the committed result
//! ```

use std::collections::{BTreeMap, BTreeSet};

use dr_proto::pb;
use serde::{Deserialize, Serialize};

use super::commands::CommandState;
use super::{Refusal, Response, State};

/// Generic verbs run by agents for backups (see `agent/src/backup_verbs.rs`).
pub mod verbs {
    pub const RUN: &str = "backup.run";
    pub const COPY: &str = "backup.copy";
    pub const VERIFY: &str = "backup.verify";
    pub const PRUNE: &str = "backup.prune";
    pub const WAL_STATUS: &str = "wal.status";
}

/// Commands of the backup subsystem, one variant of [`super::Command`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum BackupCommand {
    /// Replace the policy (validated by the proposer with [`BackupPolicy::validate`], and
    /// again here).
    ApplyPolicy { policy: Box<BackupPolicy> },
    /// Turn a finished `backup.*` command into catalog facts.
    Record { command_key: String },
    /// A schedule is about to issue its command for `slot_unix_ms`.
    FireSchedule { schedule: String, slot_unix_ms: i64 },
    /// The schedule's command for `slot_unix_ms` was issued.
    ScheduleIssued { schedule: String, slot_unix_ms: i64 },
    /// Retention, phase one: mark backups at a location for deletion.
    MarkForDelete { location: String, ids: Vec<String> },
}

impl BackupCommand {
    pub fn target(&self) -> String {
        match self {
            BackupCommand::ApplyPolicy { .. } => "policy".into(),
            BackupCommand::Record { command_key } => command_key.clone(),
            BackupCommand::FireSchedule {
                schedule,
                slot_unix_ms,
            }
            | BackupCommand::ScheduleIssued {
                schedule,
                slot_unix_ms,
            } => format!("{schedule}@{slot_unix_ms}"),
            BackupCommand::MarkForDelete { location, ids } => {
                format!("{location}:{}", ids.join(","))
            }
        }
    }
}

/// Kinds of backup the catalog knows.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Full,
    Incr,
    Logical,
    Files,
    /// A tier copy (schedules only; a copy adds a location, not an entry).
    Copy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Incr => "incr",
            Kind::Logical => "logical",
            Kind::Files => "files",
            Kind::Copy => "copy",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "full" => Kind::Full,
            "incr" | "incremental" => Kind::Incr,
            "logical" => Kind::Logical,
            "files" => Kind::Files,
            "copy" => Kind::Copy,
            _ => return None,
        })
    }
}

/// One backup at one location.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Placement {
    pub stored_at_unix_ms: i64,
    pub verified_at_unix_ms: i64,
    pub verify_ok: bool,
    pub verify_problems: Vec<String>,
    pub marked_for_delete_at_unix_ms: i64,
}

/// One catalog entry (a backup that completed).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackupEntry {
    pub id: String,
    pub db: String,
    pub kind: Kind,
    pub parent: String,
    pub host_id: String,
    pub files: u64,
    pub bytes_total: u64,
    pub bytes_added: u64,
    pub duration_ms: u64,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub timeline: u32,
    pub started_at_unix_ms: i64,
    pub finished_at_unix_ms: i64,
    pub created_by: String,
    pub command_key: String,
    /// Location name -> placement.
    pub locations: BTreeMap<String, Placement>,
}

/// A database cluster the policy backs up.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatabasePolicy {
    pub name: String,
    /// The agent that runs its backups (the primary, or a replica).
    pub host: String,
    /// Connection URL on that host WITHOUT a password (peer auth or a passfile).
    pub pg_url: String,
    pub data_dir: String,
    /// Where new backups go (a location name); empty: the first location.
    #[serde(default)]
    pub location: String,
    /// Database a `logical` backup dumps (`pg_dump` dumps one database); empty: the one
    /// named in `pg_url`.
    #[serde(default)]
    pub dump_dbname: String,
}

/// A named file set (application data, configuration, certificates).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileSetPolicy {
    pub name: String,
    pub host: String,
    pub paths: Vec<String>,
    /// Globs left out (`*.tmp`, `cache/**`; see agent/src/backup/fileset.rs).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// When not empty, only files matching one of these globs are backed up.
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub location: String,
}

/// A repository location. `repo_config` is a path ON THE AGENTS that use it (the secrets
/// stay on those hosts; the coordinator never sees a storage credential).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocationPolicy {
    pub name: String,
    /// primary | secondary | nas | offsite
    pub tier: String,
    /// Legal jurisdiction of the stored bytes, e.g. "cn".
    pub jurisdiction: String,
    pub repo_config: String,
    /// Agent that copies INTO this location (it must hold both repo configs).
    #[serde(default)]
    pub copier_host: String,
    /// Agent that prunes this location with delete-capable credentials.
    #[serde(default)]
    pub prune_host: String,
    /// Repo config with delete rights, on `prune_host` (agents that back up may hold
    /// write-only credentials: the ransomware case).
    #[serde(default)]
    pub prune_repo_config: String,
}

/// A schedule: cron (`min hour dom month dow`) in the policy's time zone.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SchedulePolicy {
    pub name: String,
    pub cron: String,
    /// full | incr | logical | files | copy
    pub kind: String,
    /// Database (full/incr/logical) or file set (files).
    #[serde(default)]
    pub target: String,
    /// copy: destination location; others: override of the target's location.
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// Retention per kind.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    pub kind: String,
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
}

/// The whole backup policy (`drctl backup policy apply -f FILE`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackupPolicy {
    pub version: u32,
    #[serde(default = "default_tz")]
    pub timezone: String,
    /// Cross-jurisdiction copies the operators approved, as "from->to" (e.g. "cn->hk").
    #[serde(default)]
    pub allowed_transfers: Vec<String>,
    /// Seconds between retention's mark and the delete.
    #[serde(default = "default_grace")]
    pub prune_grace_secs: u64,
    #[serde(default)]
    pub databases: Vec<DatabasePolicy>,
    #[serde(default)]
    pub file_sets: Vec<FileSetPolicy>,
    #[serde(default)]
    pub locations: Vec<LocationPolicy>,
    #[serde(default)]
    pub schedules: Vec<SchedulePolicy>,
    #[serde(default)]
    pub retention: Vec<RetentionPolicy>,
    /// Verification after restores, drills and their schedules (issue 4).
    #[serde(default)]
    pub restore: super::operations::restore::RestorePolicy,
}

fn default_tz() -> String {
    "Asia/Shanghai".into()
}
fn default_grace() -> u64 {
    3600
}

impl BackupPolicy {
    pub fn location(&self, name: &str) -> Option<&LocationPolicy> {
        self.locations.iter().find(|l| l.name == name)
    }
    pub fn database(&self, name: &str) -> Option<&DatabasePolicy> {
        self.databases.iter().find(|d| d.name == name)
    }
    pub fn file_set(&self, name: &str) -> Option<&FileSetPolicy> {
        self.file_sets.iter().find(|d| d.name == name)
    }
    /// The location a new backup of `target` goes to.
    pub fn home_location(&self, target: &str) -> Option<&LocationPolicy> {
        let named = self
            .database(target)
            .map(|d| d.location.as_str())
            .or_else(|| self.file_set(target).map(|f| f.location.as_str()))
            .unwrap_or("");
        if named.is_empty() {
            self.locations.first()
        } else {
            self.location(named)
        }
    }

    /// Structural checks that need no clock or time-zone database (cron and time zone are
    /// checked by the proposer, which has chrono-tz).
    pub fn validate(&self) -> Result<(), String> {
        if self.version != 1 {
            return Err(format!(
                "policy version {} is not supported; use version = 1",
                self.version
            ));
        }
        let mut names = BTreeSet::new();
        for l in &self.locations {
            if !names.insert(("location", l.name.as_str())) {
                return Err(format!("location {} is defined twice", l.name));
            }
            if l.jurisdiction.is_empty() {
                return Err(format!(
                    "location {} needs a jurisdiction (e.g. \"cn\")",
                    l.name
                ));
            }
            if l.repo_config.is_empty() {
                return Err(format!(
                    "location {} needs repo_config (a path on its agents)",
                    l.name
                ));
            }
        }
        for d in &self.databases {
            if !names.insert(("target", d.name.as_str())) {
                return Err(format!("database {} is defined twice", d.name));
            }
            let userinfo = d
                .pg_url
                .split_once("://")
                .and_then(|(_, rest)| rest.split_once('@'))
                .map(|(u, _)| u);
            if userinfo.is_some_and(|u| u.contains(':')) || d.pg_url.contains("password=") {
                return Err(format!(
                    "database {}: pg_url must not carry a password (it is replicated and shown); use peer auth or a passfile on the host",
                    d.name
                ));
            }
            if !d.location.is_empty() && self.location(&d.location).is_none() {
                return Err(format!(
                    "database {}: unknown location {}",
                    d.name, d.location
                ));
            }
        }
        for f in &self.file_sets {
            if !names.insert(("target", f.name.as_str())) {
                return Err(format!(
                    "file set {} clashes with another database or file set name",
                    f.name
                ));
            }
            if f.paths.is_empty() {
                return Err(format!("file set {} needs at least one path", f.name));
            }
            if let Some(p) = f
                .paths
                .iter()
                .find(|p| !p.starts_with('/') || p.contains(','))
            {
                return Err(format!(
                    "file set {}: path {p:?} must be absolute and must not contain a comma",
                    f.name
                ));
            }
            if f.name.contains(':') {
                return Err(format!(
                    "file set {}: the name must not contain ':'",
                    f.name
                ));
            }
        }
        for s in &self.schedules {
            if !names.insert(("schedule", s.name.as_str())) {
                return Err(format!("schedule {} is defined twice", s.name));
            }
            let kind = Kind::parse(&s.kind).ok_or_else(|| {
                format!(
                    "schedule {}: unknown kind {} (full|incr|logical|files|copy)",
                    s.name, s.kind
                )
            })?;
            match kind {
                Kind::Copy => {
                    if self.location(&s.location).is_none() {
                        return Err(format!(
                            "schedule {}: a copy needs location = an existing location",
                            s.name
                        ));
                    }
                }
                Kind::Files => {
                    if self.file_set(&s.target).is_none() {
                        return Err(format!(
                            "schedule {}: unknown file set {}",
                            s.name, s.target
                        ));
                    }
                }
                _ => {
                    if self.database(&s.target).is_none() {
                        return Err(format!(
                            "schedule {}: unknown database {}",
                            s.name, s.target
                        ));
                    }
                }
            }
        }
        for t in &self.allowed_transfers {
            if t.split_once("->").is_none() {
                return Err(format!(
                    "allowed_transfers entry {t:?} must look like \"cn->hk\""
                ));
            }
        }
        for r in &self.retention {
            if Kind::parse(&r.kind).is_none() {
                return Err(format!("retention: unknown kind {}", r.kind));
            }
        }
        Ok(())
    }

    /// PIPL data localisation: may a copy go from `from` to `to`? Refused unless both have
    /// the same jurisdiction or the policy names the transfer.
    pub fn check_transfer(&self, from: &LocationPolicy, to: &LocationPolicy) -> Result<(), String> {
        if from.jurisdiction == to.jurisdiction {
            return Ok(());
        }
        let wanted = format!("{}->{}", from.jurisdiction, to.jurisdiction);
        if self
            .allowed_transfers
            .iter()
            .any(|t| t.replace(' ', "") == wanted)
        {
            return Ok(());
        }
        Err(format!(
            "copy from location {} (jurisdiction {}) to {} (jurisdiction {}) refused: data may not leave jurisdiction {} (PIPL data localisation) unless the backup policy lists allowed_transfers = [\"{wanted}\"]; nothing was copied",
            from.name, from.jurisdiction, to.name, to.jurisdiction, from.jurisdiction
        ))
    }
}

/// Per-schedule marks.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ScheduleMark {
    pub last_fired_slot_unix_ms: i64,
    /// The command for `last_fired_slot_unix_ms` was issued.
    pub issued: bool,
}

/// The catalog part of [`State`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Catalog {
    pub policy: Option<BackupPolicy>,
    pub backups: BTreeMap<String, BackupEntry>,
    /// Command keys already turned into catalog facts.
    pub recorded_keys: BTreeSet<String>,
    pub schedules: BTreeMap<String, ScheduleMark>,
    /// When each drill schedule ([`drill_schedule_key`]) first appeared in an applied policy
    /// (unix ms, the commit's time). The drill scheduler never starts a slot from before it:
    /// applying a policy at 04:30 must not start that day's 04:00 drill (as applying one at
    /// 10:00 does not start the 02:00 backup).
    #[serde(default)]
    pub drill_since: BTreeMap<String, i64>,
}

/// The identity of a drill schedule: its name and cron (a changed cron is a new schedule).
pub fn drill_schedule_key(d: &crate::state::operations::restore::DrillPolicy) -> String {
    format!("{}|{}", d.name, d.cron)
}

impl Catalog {
    /// Backups, oldest first (ids start with a UTC timestamp).
    pub fn list<'a>(&'a self, db: &'a str) -> impl Iterator<Item = &'a BackupEntry> + 'a {
        self.backups
            .values()
            .filter(move |b| db.is_empty() || b.db == db)
    }
}

fn refused(message: impl Into<String>) -> Response {
    Response::refused(Refusal::Invalid {
        message: message.into(),
    })
}

/// Applies one backup command. Pure.
pub fn apply(state: &mut State, at: i64, origin: &str, cmd: &BackupCommand) -> Response {
    match cmd {
        BackupCommand::ApplyPolicy { policy } => {
            if let Err(e) = policy.validate() {
                return refused(format!("backup policy: {e}"));
            }
            if state.catalog.policy.as_ref() == Some(&**policy) {
                return Response::Unchanged;
            }
            let since = policy
                .restore
                .drills
                .iter()
                .filter(|d| !d.cron.is_empty())
                .map(|d| {
                    let k = drill_schedule_key(d);
                    let t = state.catalog.drill_since.get(&k).copied().unwrap_or(at);
                    (k, t)
                })
                .collect();
            state.catalog.drill_since = since;
            state.catalog.policy = Some((**policy).clone());
            Response::Applied
        }
        BackupCommand::Record { command_key } => record(state, at, command_key),
        BackupCommand::FireSchedule {
            schedule,
            slot_unix_ms,
        } => {
            let known = state
                .catalog
                .policy
                .as_ref()
                .is_some_and(|p| p.schedules.iter().any(|s| &s.name == schedule));
            if !known {
                return refused(format!("no schedule named {schedule} in the backup policy"));
            }
            let mark = state.catalog.schedules.entry(schedule.clone()).or_default();
            if *slot_unix_ms <= mark.last_fired_slot_unix_ms {
                return Response::Unchanged;
            }
            mark.last_fired_slot_unix_ms = *slot_unix_ms;
            mark.issued = false;
            Response::Applied
        }
        BackupCommand::ScheduleIssued {
            schedule,
            slot_unix_ms,
        } => match state.catalog.schedules.get_mut(schedule) {
            Some(m) if m.last_fired_slot_unix_ms == *slot_unix_ms && !m.issued => {
                m.issued = true;
                Response::Applied
            }
            Some(_) => Response::Unchanged,
            None => refused(format!("schedule {schedule} never fired")),
        },
        BackupCommand::MarkForDelete { location, ids } => {
            let _ = origin;
            let mut changed = false;
            for id in ids {
                if let Some(p) = state
                    .catalog
                    .backups
                    .get_mut(id)
                    .and_then(|b| b.locations.get_mut(location))
                    && p.marked_for_delete_at_unix_ms == 0
                {
                    p.marked_for_delete_at_unix_ms = at;
                    changed = true;
                }
            }
            if changed {
                Response::Applied
            } else {
                Response::Unchanged
            }
        }
    }
}

fn num(details: &std::collections::HashMap<String, String>, k: &str) -> u64 {
    details.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}
fn text(details: &std::collections::HashMap<String, String>, k: &str) -> String {
    details.get(k).cloned().unwrap_or_default()
}

/// Builds catalog facts from a committed, finished command.
fn record(state: &mut State, at: i64, key: &str) -> Response {
    if state.catalog.recorded_keys.contains(key) {
        return Response::Unchanged;
    }
    let Some(c) = state.commands.get(key) else {
        return Response::refused(Refusal::UnknownCommand {
            key: key.to_owned(),
        });
    };
    if !c.state.is_finished() {
        return refused(format!("command {key} has not finished"));
    }
    let Some(pb::action::Kind::Generic(g)) = c.action.kind.as_ref() else {
        return refused(format!("command {key} is not a backup command"));
    };
    let verb = g.verb.clone();
    let args = g.args.clone();
    let host_id = c.host_id.clone();
    let issued_by = c.issued_by.clone();
    let ok = c.state == CommandState::Done && c.result.as_ref().is_some_and(|r| r.success);
    let details = c
        .result
        .as_ref()
        .map(|r| r.details.clone())
        .unwrap_or_default();
    state.catalog.recorded_keys.insert(key.to_owned());
    if !ok {
        // A failed or interrupted backup leaves no entry; remembering the key only stops the
        // recorder from looking at it again.
        return Response::Applied;
    }
    let location = text(&args, "location");
    match verb.as_str() {
        verbs::RUN => {
            let id = text(&details, "backup_id");
            if id.is_empty() {
                return Response::Applied;
            }
            let kind = Kind::parse(&text(&details, "kind")).unwrap_or(Kind::Full);
            let started = i64::try_from(num(&details, "started_at_unix_ms")).unwrap_or(0);
            let finished = i64::try_from(num(&details, "finished_at_unix_ms")).unwrap_or(0);
            let mut locations = BTreeMap::new();
            locations.insert(
                location,
                Placement {
                    stored_at_unix_ms: at,
                    ..Placement::default()
                },
            );
            state.catalog.backups.insert(
                id.clone(),
                BackupEntry {
                    id,
                    db: text(&args, "target"),
                    kind,
                    parent: text(&details, "parent"),
                    host_id,
                    files: num(&details, "files"),
                    bytes_total: num(&details, "bytes_total"),
                    bytes_added: num(&details, "bytes_added"),
                    duration_ms: u64::try_from(finished.saturating_sub(started)).unwrap_or(0),
                    start_lsn: text(&details, "start_lsn"),
                    stop_lsn: text(&details, "stop_lsn"),
                    timeline: u32::try_from(num(&details, "timeline")).unwrap_or(0),
                    started_at_unix_ms: started,
                    finished_at_unix_ms: finished,
                    created_by: issued_by,
                    command_key: key.to_owned(),
                    locations,
                },
            );
        }
        verbs::COPY => {
            let id = text(&args, "backup_id");
            let to = text(&args, "to_location");
            if let Some(b) = state.catalog.backups.get_mut(&id) {
                b.locations.insert(
                    to,
                    Placement {
                        stored_at_unix_ms: at,
                        // The copy re-read and hashed every object it wrote.
                        verified_at_unix_ms: at,
                        verify_ok: true,
                        ..Placement::default()
                    },
                );
            }
        }
        verbs::VERIFY => {
            // details: "verified" = comma-separated ids; "problems.<id>" = "; "-joined.
            for id in text(&details, "verified")
                .split(',')
                .filter(|s| !s.is_empty())
            {
                let problems: Vec<String> = text(&details, &format!("problems.{id}"))
                    .split("; ")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                if let Some(p) = state
                    .catalog
                    .backups
                    .get_mut(id)
                    .and_then(|b| b.locations.get_mut(&location))
                {
                    p.verified_at_unix_ms = at;
                    p.verify_ok = problems.is_empty();
                    p.verify_problems = problems;
                }
            }
        }
        verbs::PRUNE => {
            for id in text(&details, "deleted")
                .split(',')
                .filter(|s| !s.is_empty())
            {
                if let Some(b) = state.catalog.backups.get_mut(id) {
                    b.locations.remove(&location);
                    if b.locations.is_empty() {
                        state.catalog.backups.remove(id);
                    }
                }
            }
        }
        _ => {}
    }
    Response::Applied
}

/// The wire form of an entry, with location metadata from the policy.
pub fn to_info(b: &BackupEntry, policy: Option<&BackupPolicy>) -> pb::BackupInfo {
    pb::BackupInfo {
        id: b.id.clone(),
        db: b.db.clone(),
        kind: b.kind.as_str().into(),
        parent: b.parent.clone(),
        host_id: b.host_id.clone(),
        bytes_total: b.bytes_total,
        bytes_added: b.bytes_added,
        duration_ms: b.duration_ms,
        start_lsn: b.start_lsn.clone(),
        stop_lsn: b.stop_lsn.clone(),
        timeline: b.timeline,
        started_at_unix_ms: b.started_at_unix_ms,
        finished_at_unix_ms: b.finished_at_unix_ms,
        created_by: b.created_by.clone(),
        command_key: b.command_key.clone(),
        files: b.files,
        locations: b
            .locations
            .iter()
            .map(|(name, p)| {
                let l = policy.and_then(|p| p.location(name));
                pb::BackupLocationInfo {
                    name: name.clone(),
                    tier: l.map(|l| l.tier.clone()).unwrap_or_default(),
                    jurisdiction: l.map(|l| l.jurisdiction.clone()).unwrap_or_default(),
                    stored_at_unix_ms: p.stored_at_unix_ms,
                    verified_at_unix_ms: p.verified_at_unix_ms,
                    verify_ok: p.verify_ok,
                    verify_problems: p.verify_problems.clone(),
                    marked_for_delete_at_unix_ms: p.marked_for_delete_at_unix_ms,
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, NewCommand, Request, apply as apply_req};

    fn req(at: i64, cmd: Command) -> Request {
        Request {
            at_unix_ms: at,
            origin: "test".into(),
            cmd,
        }
    }

    fn run_backup(state: &mut State, key: &str, ok: bool) {
        let action = pb::Action {
            kind: Some(pb::action::Kind::Generic(pb::Generic {
                verb: verbs::RUN.into(),
                args: [
                    ("target".to_owned(), "db".to_owned()),
                    ("location".to_owned(), "primary".to_owned()),
                ]
                .into_iter()
                .collect(),
            })),
        };
        apply_req(
            state,
            1,
            &req(
                1,
                Command::HostUp {
                    host_id: "h".into(),
                    region: "r".into(),
                    site: "s".into(),
                    roles: vec![],
                    version: "v".into(),
                    incarnation: 1,
                },
            ),
        );
        apply_req(
            state,
            2,
            &req(
                2,
                Command::IssueCommands {
                    commands: vec![NewCommand {
                        key: key.into(),
                        host_id: "h".into(),
                        action,
                        deadline_unix_ms: 1_000_000,
                        request_id: String::new(),
                    }],
                },
            ),
        );
        let result = pb::CommandResult {
            key: key.into(),
            success: ok,
            details: [
                ("backup_id".to_owned(), format!("id-{key}")),
                ("kind".to_owned(), "full".to_owned()),
                ("stop_lsn".to_owned(), "0/3000100".to_owned()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        apply_req(
            state,
            3,
            &req(
                3,
                Command::CommandCompleted {
                    key: key.into(),
                    result,
                },
            ),
        );
    }

    #[test]
    fn t10_only_completed_backups_become_entries_once() {
        let mut s = State::default();
        run_backup(&mut s, "bad", false);
        let r = apply_req(
            &mut s,
            4,
            &req(
                4,
                Command::Backup(BackupCommand::Record {
                    command_key: "bad".into(),
                }),
            ),
        );
        assert_eq!(r, Response::Applied);
        assert!(
            s.catalog.backups.is_empty(),
            "a failed backup leaves no entry"
        );
        run_backup(&mut s, "good", true);
        apply_req(
            &mut s,
            5,
            &req(
                5,
                Command::Backup(BackupCommand::Record {
                    command_key: "good".into(),
                }),
            ),
        );
        let b = &s.catalog.backups["id-good"];
        assert_eq!(
            (b.db.as_str(), b.kind, b.stop_lsn.as_str()),
            ("db", Kind::Full, "0/3000100")
        );
        assert!(b.locations.contains_key("primary"));
        let again = apply_req(
            &mut s,
            6,
            &req(
                6,
                Command::Backup(BackupCommand::Record {
                    command_key: "good".into(),
                }),
            ),
        );
        assert_eq!(again, Response::Unchanged);
    }

    #[test]
    fn t20_a_slot_fires_once() {
        let mut s = State::default();
        s.catalog.policy = Some(BackupPolicy {
            version: 1,
            schedules: vec![SchedulePolicy {
                name: "f".into(),
                cron: "* * * * *".into(),
                kind: "full".into(),
                target: "db".into(),
                location: String::new(),
                enabled: None,
            }],
            ..Default::default()
        });
        let fire = |slot| {
            Command::Backup(BackupCommand::FireSchedule {
                schedule: "f".into(),
                slot_unix_ms: slot,
            })
        };
        assert_eq!(
            apply_req(&mut s, 1, &req(1, fire(60_000))),
            Response::Applied
        );
        assert_eq!(
            apply_req(&mut s, 2, &req(2, fire(60_000))),
            Response::Unchanged,
            "a second leader"
        );
        assert_eq!(
            apply_req(&mut s, 3, &req(3, fire(0))),
            Response::Unchanged,
            "never backwards"
        );
        assert!(!s.catalog.schedules["f"].issued);
        let issued = Command::Backup(BackupCommand::ScheduleIssued {
            schedule: "f".into(),
            slot_unix_ms: 60_000,
        });
        assert_eq!(
            apply_req(&mut s, 4, &req(4, issued.clone())),
            Response::Applied
        );
        assert_eq!(apply_req(&mut s, 5, &req(5, issued)), Response::Unchanged);
    }
}
