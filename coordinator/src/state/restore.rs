//! Restore planning (issue 4): which base backup, which WAL, and whether the chain reaches
//! the target, decided BEFORE any file is written; plus the restore and drill step lists.
//!
//! Why pure: the same function answers `drctl restore --dry-run`, refuses an impossible
//! restore with the reachable range, and builds the plan the executor runs, so what the
//! operator was shown is what runs. Inputs are the catalog's backups (start/stop LSN,
//! timeline, times) and the archive as the target host's agent listed it
//! (`restore.wal-list`: contiguous runs of segments per timeline with their archive times,
//! and the timeline history files).
//!
//! Time targets: the archive time of a segment bounds the commit times it contains, so a
//! time T is reachable from backup B when B ended at or before T and the contiguous chain
//! from B's start segment contains a segment archived at or after T. LSN targets compare
//! with segment boundaries (16 MiB segments). xid and restore-point targets cannot be
//! located without reading WAL: the chain is checked through the end of the archive and
//! PostgreSQL reports an unreachable one (the restore then fails at recovery, before the
//! server is promoted or verified).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    ActionTemplate, InternalKind, OnFailure, Operation, StepKind, StepSpec, StepState, Target,
};
use crate::state::catalog::{BackupEntry, Kind};

/// 16 MiB WAL segments.
pub const SEG: u64 = 16 << 20;
/// The spec's criterion for the weekly restore test: a full restore within 30 minutes.
pub const DRILL_CRITERION_MS: u64 = 30 * 60 * 1000;

/// One contiguous run of archived segments (the agent's `restore.wal-list` detail `runs`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WalRun {
    pub timeline: u32,
    pub first: u64,
    pub last: u64,
    pub first_archived_unix_ms: i64,
    pub last_archived_unix_ms: i64,
}

/// The archive as listed by an agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WalArchive {
    pub runs: Vec<WalRun>,
    /// timeline -> history file text.
    pub histories: BTreeMap<u32, String>,
}

impl WalArchive {
    /// From the `runs` and `histories` details of `restore.wal-list`.
    pub fn from_details(details: &BTreeMap<String, String>) -> Result<Self, String> {
        let runs = match details.get("runs").map(String::as_str) {
            None | Some("") => vec![],
            Some(j) => serde_json::from_str(j).map_err(|e| format!("WAL listing: {e}"))?,
        };
        let histories: BTreeMap<u32, String> = match details.get("histories").map(String::as_str) {
            None | Some("") => BTreeMap::new(),
            Some(j) => serde_json::from_str(j).map_err(|e| format!("WAL history listing: {e}"))?,
        };
        Ok(WalArchive { runs, histories })
    }

    fn run_containing(&self, tl: u32, seg: u64) -> Option<&WalRun> {
        self.runs
            .iter()
            .find(|r| r.timeline == tl && r.first <= seg && seg <= r.last)
    }

    /// `(parent timeline, switch LSN)` of `tl`, from its history file's last line.
    fn parent_of(&self, tl: u32) -> Option<(u32, u64)> {
        let text = self.histories.get(&tl)?;
        text.lines().rev().find_map(|l| {
            let mut it = l.split_whitespace();
            let parent: u32 = it.next()?.parse().ok()?;
            let lsn = parse_lsn(it.next()?)?;
            Some((parent, lsn))
        })
    }
}

/// `X/Y` -> u64.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (a, b) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(a, 16).ok()? << 32) | u64::from_str_radix(b, 16).ok()?)
}

pub fn lsn_text(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xFFFF_FFFF)
}

fn seg_name(tl: u32, n: u64) -> String {
    format!("{tl:08X}{:08X}{:08X}", n / 256, n % 256)
}

fn time_text(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum RestoreTarget {
    Latest,
    /// Exactly this backup (recovery stops at consistency).
    Backup(String),
    TimeMs(i64),
    Lsn(u64),
    Xid(String),
    Name(String),
}

/// One leg of the WAL chain: segments `first..=last` of `timeline`.
#[derive(Clone, Debug, PartialEq)]
pub struct Leg {
    pub timeline: u32,
    pub first: u64,
    pub last: u64,
    pub last_archived_unix_ms: i64,
}

/// The chosen base backup and WAL.
#[derive(Clone, Debug, PartialEq)]
pub struct ChainPlan {
    pub backup_id: String,
    pub backup_kind: String,
    /// For the agent: `target_type` / `target_value`.
    pub target_type: String,
    pub target_value: String,
    pub legs: Vec<Leg>,
    pub lines: Vec<String>,
}

impl ChainPlan {
    /// `TL:FIRST-LAST;...` for `restore.pg-check`.
    pub fn wal_required(&self) -> String {
        self.legs
            .iter()
            .map(|l| format!("{}:{}-{}", l.timeline, l.first, l.last))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// The contiguous chain from `start` (timeline, LSN) through the archive, following child
/// timelines that fork inside it (the highest one, as `recovery_target_timeline = latest`),
/// or only toward `only_tl` when set. The first leg is empty (`first > last`) when the start
/// segment itself is missing.
pub fn chain_from(archive: &WalArchive, tl: u32, lsn: u64, only_tl: Option<u32>) -> Vec<Leg> {
    let mut legs = Vec::new();
    let mut cur_tl = tl;
    let mut cur_seg = lsn / SEG;
    for _ in 0..64 {
        let Some(run) = archive.run_containing(cur_tl, cur_seg) else {
            if legs.is_empty() {
                legs.push(Leg {
                    timeline: cur_tl,
                    first: cur_seg,
                    last: cur_seg.wrapping_sub(1),
                    last_archived_unix_ms: 0,
                });
            }
            break;
        };
        let mut leg = Leg {
            timeline: cur_tl,
            first: cur_seg,
            last: run.last,
            last_archived_unix_ms: run.last_archived_unix_ms,
        };
        // A child timeline forking inside this leg, whose own segments start at the fork.
        let child = archive
            .histories
            .keys()
            .rev()
            .copied()
            .filter(|c| only_tl.is_none_or(|o| *c <= o))
            .filter_map(|c| {
                let (parent, switch) = archive.parent_of(c)?;
                (parent == cur_tl
                    && switch / SEG >= cur_seg
                    && switch / SEG <= run.last + 1
                    && archive.run_containing(c, switch / SEG).is_some())
                .then_some((c, switch))
            })
            .next();
        if only_tl == Some(cur_tl) {
            legs.push(leg);
            break;
        }
        match child {
            Some((c, switch)) => {
                leg.last = (switch / SEG).saturating_sub(1).max(cur_seg);
                if switch / SEG > cur_seg {
                    legs.push(leg);
                }
                cur_tl = c;
                cur_seg = switch / SEG;
            }
            None => {
                legs.push(leg);
                break;
            }
        }
    }
    legs
}

fn physical<'a>(backups: &[&'a BackupEntry]) -> Vec<&'a BackupEntry> {
    let mut v: Vec<&BackupEntry> = backups
        .iter()
        .copied()
        .filter(|b| matches!(b.kind, Kind::Full | Kind::Incr))
        .filter(|b| parse_lsn(&b.start_lsn).is_some() && parse_lsn(&b.stop_lsn).is_some())
        .collect();
    v.sort_by_key(|b| (b.finished_at_unix_ms, b.id.clone()));
    v
}

/// The end of what can be reached from `b`: (last leg, end LSN, last archive time).
fn reach(archive: &WalArchive, b: &BackupEntry, only_tl: Option<u32>) -> Vec<Leg> {
    let start = parse_lsn(&b.start_lsn).unwrap_or(0);
    chain_from(archive, b.timeline, start, only_tl)
}

fn describe_reachable(archive: &WalArchive, bs: &[&BackupEntry], only_tl: Option<u32>) -> String {
    let (Some(oldest), Some(newest)) = (bs.first(), bs.last()) else {
        return "nothing is reachable: the catalog has no physical backup of this database".into();
    };
    let legs = reach(archive, newest, only_tl);
    let end = legs
        .iter()
        .rev()
        .find(|l| l.first <= l.last)
        .map(|l| {
            // The stop segment of the newest backup is archived a moment before the backup
            // is recorded as finished: never show an end before the start of the range.
            format!(
                "{} (newest archived WAL {} ends at LSN {})",
                time_text(l.last_archived_unix_ms.max(newest.finished_at_unix_ms)),
                seg_name(l.timeline, l.last),
                lsn_text((l.last + 1) * SEG)
            )
        })
        .unwrap_or_else(|| {
            format!(
                "{} (end of backup {}, whose WAL is not archived)",
                time_text(newest.finished_at_unix_ms),
                newest.id
            )
        });
    format!(
        "reachable range: from {} (end of the oldest backup {}, LSN {}) to {}",
        time_text(oldest.finished_at_unix_ms),
        oldest.id,
        oldest.stop_lsn,
        end
    )
}

/// Checks that `legs` start at the base backup's start and cover through `need_seg` (or any
/// segment archived at/after `need_ms`), naming the missing range otherwise.
fn covers(
    archive: &WalArchive,
    b: &BackupEntry,
    legs: &[Leg],
    need_seg: Option<u64>,
    need_ms: Option<i64>,
) -> Result<(), String> {
    let first = &legs[0];
    if first.first > first.last {
        let next = archive
            .runs
            .iter()
            .filter(|r| r.timeline == first.timeline && r.first > first.first)
            .map(|r| r.first)
            .min();
        return Err(format!(
            "the WAL chain of backup {} is broken: segment {} (its start, LSN {}) is missing from the archive{}",
            b.id,
            seg_name(first.timeline, first.first),
            b.start_lsn,
            next.map(|n| format!(
                "; missing range {}..{}",
                seg_name(first.timeline, first.first),
                seg_name(first.timeline, n - 1)
            ))
            .unwrap_or_default()
        ));
    }
    let last = &legs[legs.len() - 1];
    let ok = need_seg.is_none_or(|s| last.last >= s)
        && need_ms.is_none_or(|t| last.last_archived_unix_ms >= t);
    if ok {
        return Ok(());
    }
    // Is there archive beyond a gap? Then it is a missing range, not just the end.
    let later = archive
        .runs
        .iter()
        .filter(|r| r.timeline == last.timeline && r.first > last.last + 1)
        .map(|r| r.first)
        .min();
    match later {
        Some(n) => Err(format!(
            "the WAL chain from backup {} is incomplete: segments {}..{} are missing from the archive",
            b.id,
            seg_name(last.timeline, last.last + 1),
            seg_name(last.timeline, n - 1)
        )),
        None => Err("the target is after the newest archived WAL".into()),
    }
}

/// Picks the base backup and checks the chain. `backups` are the catalog entries of one
/// database; `base` forces a base backup (xid / name targets, or the operator's choice).
pub fn plan(
    backups: &[&BackupEntry],
    archive: &WalArchive,
    target: &RestoreTarget,
    base: Option<&str>,
    timeline: Option<u32>,
) -> Result<ChainPlan, String> {
    let bs = physical(backups);
    let reachable = || describe_reachable(archive, &bs, timeline);
    if bs.is_empty() {
        return Err(format!(
            "no physical backup of this database in the catalog; {}",
            reachable()
        ));
    }
    let forced = match base {
        Some(id) if !id.is_empty() => Some(
            *bs.iter()
                .find(|b| b.id == id)
                .ok_or_else(|| format!("backup {id} is not a physical backup of this database"))?,
        ),
        _ => None,
    };
    let refuse = |why: String| Err(format!("{why}; {}", reachable()));
    let (b, target_type, target_value, need_seg, need_ms) = match target {
        RestoreTarget::Latest => (
            forced.unwrap_or(bs[bs.len() - 1]),
            "latest",
            String::new(),
            None,
            None,
        ),
        RestoreTarget::Backup(id) => {
            let b = *bs
                .iter()
                .find(|b| b.id == *id)
                .ok_or_else(|| format!("backup {id} is not a physical backup of this database (see `drctl backup list`)"))?;
            let stop = parse_lsn(&b.stop_lsn).unwrap_or(0);
            (b, "immediate", String::new(), Some(stop / SEG), None)
        }
        RestoreTarget::TimeMs(t) => {
            let b = match forced {
                Some(b) if b.finished_at_unix_ms <= *t => b,
                Some(b) => {
                    return refuse(format!(
                        "backup {} ended at {}, after the target {}",
                        b.id,
                        time_text(b.finished_at_unix_ms),
                        time_text(*t)
                    ));
                }
                None => match bs.iter().rev().find(|b| b.finished_at_unix_ms <= *t) {
                    Some(b) => *b,
                    None => {
                        return refuse(format!(
                            "the target {} is before the end of the oldest backup",
                            time_text(*t)
                        ));
                    }
                },
            };
            (b, "time", t.to_string(), None, Some(*t))
        }
        RestoreTarget::Lsn(l) => {
            let b = match forced {
                Some(b) => b,
                None => match bs
                    .iter()
                    .rev()
                    .find(|b| parse_lsn(&b.stop_lsn).is_some_and(|s| s <= *l))
                {
                    Some(b) => *b,
                    None => {
                        return refuse(format!(
                            "the target LSN {} is before the end of the oldest backup",
                            lsn_text(*l)
                        ));
                    }
                },
            };
            (b, "lsn", lsn_text(*l), Some(*l / SEG), None)
        }
        RestoreTarget::Xid(x) => (
            forced.unwrap_or(bs[bs.len() - 1]),
            "xid",
            x.clone(),
            None,
            None,
        ),
        RestoreTarget::Name(n) => (
            forced.unwrap_or(bs[bs.len() - 1]),
            "name",
            n.clone(),
            None,
            None,
        ),
    };
    let legs = reach(archive, b, timeline);
    if let Err(why) = covers(archive, b, &legs, need_seg, need_ms) {
        return refuse(why);
    }
    // The backup's own WAL (start..stop) must be there whatever the target.
    let stop_seg = parse_lsn(&b.stop_lsn).unwrap_or(0) / SEG;
    if legs.iter().map(|l| l.last).max().unwrap_or(0) < stop_seg && legs[0].timeline == b.timeline {
        return refuse(format!(
            "the WAL of backup {} itself (through {}) is not all archived",
            b.id,
            seg_name(b.timeline, stop_seg)
        ));
    }
    // Only what the target needs: cut the chain at the target segment for LSN and backup
    // targets (the rest is not read).
    let mut legs = legs;
    if let Some(s) = need_seg
        && let Some(i) = legs.iter().position(|l| l.first <= s && s <= l.last)
    {
        legs[i].last = s;
        legs.truncate(i + 1);
    }
    let first = &legs[0];
    let last = &legs[legs.len() - 1];
    let lines = vec![
        format!(
            "base backup {} ({}, LSN {}..{} on timeline {}, ended {})",
            b.id,
            b.kind.as_str(),
            b.start_lsn,
            b.stop_lsn,
            b.timeline,
            time_text(b.finished_at_unix_ms)
        ),
        format!(
            "WAL {}..{} ({} segment(s){}), all archived",
            seg_name(first.timeline, first.first),
            seg_name(last.timeline, last.last),
            legs.iter().map(|l| l.last + 1 - l.first).sum::<u64>(),
            if legs.len() > 1 {
                format!(
                    ", across timelines {}",
                    legs.iter()
                        .map(|l| l.timeline.to_string())
                        .collect::<Vec<_>>()
                        .join("->")
                )
            } else {
                String::new()
            }
        ),
        format!(
            "target: {}",
            match target {
                RestoreTarget::Latest => "the end of the archive".to_owned(),
                RestoreTarget::Backup(id) => format!("the end of backup {id}"),
                RestoreTarget::TimeMs(t) => format!("time {}", time_text(*t)),
                RestoreTarget::Lsn(l) => format!("LSN {}", lsn_text(*l)),
                RestoreTarget::Xid(x) =>
                    format!("transaction {x} (located by PostgreSQL during recovery)"),
                RestoreTarget::Name(n) =>
                    format!("restore point {n:?} (located by PostgreSQL during recovery)"),
            }
        ),
        reachable(),
    ];
    Ok(ChainPlan {
        backup_id: b.id.clone(),
        backup_kind: b.kind.as_str().to_owned(),
        target_type: target_type.to_owned(),
        target_value,
        legs,
        lines,
    })
}

/// The `[restore]` section of the backup policy: verification after every restore, the
/// drill's scratch directory and drill schedules.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RestorePolicy {
    /// Where drills put their scratch instances on the drill host (one subdirectory each).
    #[serde(default = "default_scratch")]
    pub scratch_dir: String,
    #[serde(default)]
    pub verify: Vec<VerifyPolicy>,
    #[serde(default)]
    pub drills: Vec<DrillPolicy>,
}

fn default_scratch() -> String {
    "/var/tmp/dr-drill".into()
}

/// What "verified" means for one database after a restore.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VerifyPolicy {
    pub db: String,
    /// Tables whose rows are counted (`schema.table`, or `database.schema.table`).
    #[serde(default)]
    pub tables: Vec<String>,
    /// SQL run in database `postgres` that must return true.
    #[serde(default)]
    pub queries: Vec<String>,
}

/// A scheduled drill (the spec's weekly "Backup Restore Test").
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DrillPolicy {
    pub name: String,
    /// backup-restore
    #[serde(default = "default_drill_kind")]
    pub drill: String,
    pub db: String,
    /// The designated host for the scratch instance; empty: the database's backup host.
    #[serde(default)]
    pub host: String,
    /// cron (`min hour dom month dow`) in the policy's time zone; empty: on demand only.
    #[serde(default)]
    pub cron: String,
}

fn default_drill_kind() -> String {
    "backup-restore".into()
}

impl RestorePolicy {
    pub fn verify_for(&self, db: &str) -> VerifyPolicy {
        self.verify
            .iter()
            .find(|v| v.db == db)
            .cloned()
            .unwrap_or_default()
    }
}

/// Parameters of a restore or drill plan (all strings go to the agent verbs as arguments).
#[derive(Clone, Debug, Default)]
pub struct RestoreParams {
    pub host: String,
    pub repo_config: String,
    pub data_dir: String,
    pub port: u32,
    pub in_place: bool,
    pub scratch: bool,
    pub target_action: String,
    pub timeline: String,
    /// Verification: row counts of these tables, these SQL checks, pg_amcheck.
    pub tables: Vec<String>,
    pub queries: Vec<String>,
}

fn generic(verb: &str, args: Vec<(&str, String)>) -> ActionTemplate {
    ActionTemplate::Generic {
        verb: verb.to_owned(),
        args: args.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}

fn agent_step(
    name: &str,
    host: &str,
    action: ActionTemplate,
    timeout_s: u64,
    comp: bool,
) -> StepSpec {
    StepSpec {
        name: name.to_owned(),
        kind: StepKind::Agent {
            target: Target::Host {
                host: host.to_owned(),
            },
            action,
        },
        timeout_ms: timeout_s * 1000,
        retries: 0,
        // A failed step runs the compensation steps (discard a drill's scratch instance,
        // record the failure), then the operation ends failed.
        on_failure: if comp {
            OnFailure::Continue
        } else {
            OnFailure::Compensate
        },
        compensation: comp,
    }
}

fn record_step(name: &str, comp: bool) -> StepSpec {
    StepSpec {
        name: name.to_owned(),
        kind: StepKind::Internal {
            kind: InternalKind::RecordRestore,
        },
        timeout_ms: 0,
        retries: 0,
        on_failure: OnFailure::Continue,
        compensation: comp,
    }
}

/// Steps: check_chain, restore_files, recover_start, verify, [discard], record; on failure
/// [discard_after_failure], record_failure.
pub fn steps(plan: &ChainPlan, p: &RestoreParams) -> Vec<StepSpec> {
    let h = p.host.as_str();
    let dir = p.data_dir.clone();
    let mut v = vec![
        agent_step(
            "check_chain",
            h,
            generic(
                "restore.pg-check",
                vec![
                    ("repo_config", p.repo_config.clone()),
                    ("backup_id", plan.backup_id.clone()),
                    ("data_dir", dir.clone()),
                    ("in_place", p.in_place.to_string()),
                    ("wal_required", plan.wal_required()),
                ],
            ),
            600,
            false,
        ),
        agent_step(
            "restore_files",
            h,
            generic(
                "restore.pg-files",
                vec![
                    ("repo_config", p.repo_config.clone()),
                    ("backup_id", plan.backup_id.clone()),
                    ("data_dir", dir.clone()),
                    ("in_place", p.in_place.to_string()),
                    ("port", p.port.to_string()),
                    ("target_type", plan.target_type.clone()),
                    ("target_value", plan.target_value.clone()),
                    ("target_action", p.target_action.clone()),
                    ("timeline", p.timeline.clone()),
                    ("scratch", p.scratch.to_string()),
                    ("keep_archive", p.in_place.to_string()),
                ],
            ),
            6 * 3600,
            false,
        ),
        agent_step(
            "recover_start",
            h,
            generic(
                "restore.pg-start",
                vec![
                    ("data_dir", dir.clone()),
                    ("port", "${restore_files.port}".into()),
                    ("socket_dir", "${restore_files.socket_dir}".into()),
                    ("target_action", p.target_action.clone()),
                ],
            ),
            6 * 3600,
            false,
        ),
        agent_step(
            "verify",
            h,
            generic(
                "restore.pg-verify",
                vec![
                    ("data_dir", dir.clone()),
                    ("port", "${restore_files.port}".into()),
                    ("socket_dir", "${restore_files.socket_dir}".into()),
                    ("tables", p.tables.join(",")),
                    ("queries", p.queries.join(";;")),
                ],
            ),
            3600,
            false,
        ),
    ];
    if p.scratch {
        v.push(agent_step(
            "discard",
            h,
            generic("restore.pg-discard", vec![("data_dir", dir.clone())]),
            600,
            false,
        ));
    }
    v.push(record_step("record", false));
    if p.scratch {
        v.push(agent_step(
            "discard_after_failure",
            h,
            generic("restore.pg-discard", vec![("data_dir", dir)]),
            600,
            true,
        ));
    }
    v.push(record_step("record_failure", true));
    v
}

/// Steps of a logical (`pg_restore --clean --if-exists`) or file-set restore: the BACKUP
/// helper's agent verbs `restore.logical` / `restore.files` (docs/dev/team-contracts.md),
/// then `record`. `args` are that verb's arguments.
pub fn other_steps(
    host: &str,
    verb: &str,
    step_name: &str,
    args: Vec<(&str, String)>,
) -> Vec<StepSpec> {
    vec![
        agent_step(step_name, host, generic(verb, args), 6 * 3600, false),
        record_step("record", false),
        record_step("record_failure", true),
    ]
}

fn step<'a>(op: &'a Operation, name: &str) -> Option<&'a super::Step> {
    op.steps.iter().find(|s| s.spec.name == name)
}

/// The results a restore or drill records (shown by `drctl operations show`): duration,
/// recovery point reached, verification, and for drills pass/fail against the criterion.
pub fn results(op: &Operation, at: i64) -> BTreeMap<String, String> {
    let mut r = BTreeMap::new();
    let duration = (at - op.created_at_unix_ms).max(0);
    r.insert("duration_ms".into(), duration.to_string());
    for k in ["backup_id", "target"] {
        if let Some(v) = op.vars.get(k) {
            r.insert(k.into(), v.clone());
        }
    }
    for (var, key) in [
        ("recover_start.recovery_lsn", "recovery_lsn"),
        ("recover_start.recovery_time", "recovery_time"),
        ("recover_start.timeline", "timeline"),
        ("recover_start.state", "server_state"),
        ("recover_start.port", "port"),
        ("restore_files.bytes", "bytes_restored"),
        ("restore_files.data_dir", "data_dir"),
        ("restore_files.moved_aside", "previous_data_dir"),
        ("verify.amcheck", "amcheck"),
        ("verify.verify_ms", "verify_ms"),
    ] {
        if let Some(v) = op.vars.get(var).filter(|v| !v.is_empty()) {
            r.insert(key.into(), v.clone());
        }
    }
    for (k, v) in &op.vars {
        if let Some(t) = k.strip_prefix("verify.rows.") {
            r.insert(format!("rows.{t}"), v.clone());
        }
    }
    let verified = step(op, "verify").map(|s| s.state);
    r.insert(
        "verify".into(),
        match verified {
            Some(StepState::Done) => "passed",
            Some(StepState::Failed) => "failed",
            _ if step(op, "verify").is_none() => "not applicable",
            _ => "not run",
        }
        .into(),
    );
    // Logical and file-set restores have no verify step: they succeed when nothing failed.
    let has_verify = step(op, "verify").is_some();
    let ok = (!has_verify || verified == Some(StepState::Done)) && !op.compensating;
    for (var, key) in [
        ("restore_logical.dbname", "dbname"),
        ("restore_logical.bytes", "bytes_restored"),
        ("restore_file_set.files", "files"),
        ("restore_file_set.bytes", "bytes_restored"),
        ("restore_file_set.unchanged", "unchanged"),
    ] {
        if let Some(v) = op.vars.get(var).filter(|v| !v.is_empty()) {
            r.insert(key.into(), v.clone());
        }
    }
    if op.kind == super::OpKind::Drill {
        r.insert("criterion_ms".into(), DRILL_CRITERION_MS.to_string());
        let pass = ok && u64::try_from(duration).unwrap_or(u64::MAX) <= DRILL_CRITERION_MS;
        r.insert("drill".into(), if pass { "pass" } else { "fail" }.into());
    } else {
        r.insert(
            "restore".into(),
            if ok { "succeeded" } else { "failed" }.into(),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, start: &str, stop: &str, finished: i64) -> BackupEntry {
        BackupEntry {
            id: id.into(),
            db: "yeslocker".into(),
            kind: Kind::Full,
            parent: String::new(),
            host_id: "db-1".into(),
            files: 1,
            bytes_total: 1,
            bytes_added: 1,
            duration_ms: 1,
            start_lsn: start.into(),
            stop_lsn: stop.into(),
            timeline: 1,
            started_at_unix_ms: finished - 1,
            finished_at_unix_ms: finished,
            created_by: String::new(),
            command_key: String::new(),
            locations: Default::default(),
        }
    }

    fn run(tl: u32, first: u64, last: u64, t0: i64, t1: i64) -> WalRun {
        WalRun {
            timeline: tl,
            first,
            last,
            first_archived_unix_ms: t0,
            last_archived_unix_ms: t1,
        }
    }

    fn archive(runs: Vec<WalRun>) -> WalArchive {
        WalArchive {
            runs,
            histories: BTreeMap::new(),
        }
    }

    #[test]
    fn time_target_picks_newest_backup_before_it() {
        let b1 = b("b1", "0/2000028", "0/2000100", 1000);
        let b2 = b("b2", "0/5000028", "0/5000100", 5000);
        let a = archive(vec![run(1, 2, 9, 1100, 9000)]);
        let p = plan(&[&b1, &b2], &a, &RestoreTarget::TimeMs(4000), None, None).unwrap();
        assert_eq!(p.backup_id, "b1");
        assert_eq!(p.target_type, "time");
        assert_eq!(p.wal_required(), "1:2-9");
        let p = plan(&[&b1, &b2], &a, &RestoreTarget::TimeMs(6000), None, None).unwrap();
        assert_eq!(p.backup_id, "b2");
        assert_eq!(p.wal_required(), "1:5-9");
    }

    #[test]
    fn before_oldest_or_after_newest_is_refused_with_the_reachable_range() {
        let b1 = b("b1", "0/2000028", "0/2000100", 1000);
        let a = archive(vec![run(1, 2, 4, 1100, 3000)]);
        let e = plan(&[&b1], &a, &RestoreTarget::TimeMs(500), None, None).unwrap_err();
        assert!(e.contains("before the end of the oldest backup"), "{e}");
        assert!(
            e.contains("reachable range: from 1970-01-01T00:00:01.000Z"),
            "{e}"
        );
        assert!(e.contains("000000010000000000000004"), "{e}");
        let e = plan(&[&b1], &a, &RestoreTarget::TimeMs(4000), None, None).unwrap_err();
        assert!(e.contains("after the newest archived WAL"), "{e}");
        let e = plan(
            &[&b1],
            &a,
            &RestoreTarget::Lsn(parse_lsn("0/9000000").unwrap()),
            None,
            None,
        )
        .unwrap_err();
        assert!(
            e.contains("after the newest archived WAL") && e.contains("reachable"),
            "{e}"
        );
        let e = plan(
            &[&b1],
            &a,
            &RestoreTarget::Lsn(parse_lsn("0/1000000").unwrap()),
            None,
            None,
        )
        .unwrap_err();
        assert!(e.contains("before the end of the oldest backup"), "{e}");
    }

    #[test]
    fn a_gap_names_the_missing_range() {
        let b1 = b("b1", "0/2000028", "0/2000100", 1000);
        let a = archive(vec![run(1, 2, 4, 1100, 3000), run(1, 7, 9, 6000, 9000)]);
        let e = plan(&[&b1], &a, &RestoreTarget::TimeMs(8000), None, None).unwrap_err();
        assert!(
            e.contains("000000010000000000000005..000000010000000000000006"),
            "{e}"
        );
        let a = archive(vec![run(1, 3, 9, 1100, 9000)]);
        let e = plan(&[&b1], &a, &RestoreTarget::Latest, None, None).unwrap_err();
        assert!(
            e.contains("000000010000000000000002") && e.contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn lsn_and_backup_targets_cut_the_chain() {
        let b1 = b("b1", "0/2000028", "0/2000100", 1000);
        let a = archive(vec![run(1, 2, 9, 1100, 9000)]);
        let p = plan(
            &[&b1],
            &a,
            &RestoreTarget::Lsn(parse_lsn("0/4000010").unwrap()),
            None,
            None,
        )
        .unwrap();
        assert_eq!(p.wal_required(), "1:2-4");
        assert_eq!(p.target_value, "0/4000010");
        let p = plan(&[&b1], &a, &RestoreTarget::Backup("b1".into()), None, None).unwrap();
        assert_eq!(
            (p.target_type.as_str(), p.wal_required().as_str()),
            ("immediate", "1:2-2")
        );
    }

    #[test]
    fn the_chain_follows_a_later_timeline() {
        let b1 = b("b1", "0/2000028", "0/2000100", 1000);
        let mut a = archive(vec![run(1, 2, 5, 1100, 5000), run(2, 4, 8, 4000, 8000)]);
        a.histories
            .insert(2, "1\t0/40000A0\tno recovery target specified\n".into());
        let p = plan(&[&b1], &a, &RestoreTarget::Latest, None, None).unwrap();
        assert_eq!(p.wal_required(), "1:2-3;2:4-8");
        // Restoring onto the earlier timeline stays on it.
        let p = plan(&[&b1], &a, &RestoreTarget::Latest, None, Some(1)).unwrap();
        assert_eq!(p.wal_required(), "1:2-5");
    }

    #[test]
    fn steps_of_a_drill_discard_on_both_paths() {
        let b1 = b("b1", "0/2000028", "0/2000100", 1000);
        let a = archive(vec![run(1, 2, 2, 1100, 1100)]);
        let p = plan(&[&b1], &a, &RestoreTarget::Latest, None, None).unwrap();
        let s = steps(
            &p,
            &RestoreParams {
                host: "h".into(),
                scratch: true,
                ..Default::default()
            },
        );
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "check_chain",
                "restore_files",
                "recover_start",
                "verify",
                "discard",
                "record",
                "discard_after_failure",
                "record_failure"
            ]
        );
    }
}
