//! Leader-only backup scheduler: records finished backup commands in the catalog, fires
//! schedules, copies to the tiers, and runs retention.
//!
//! Exactly once across leader changes: for each schedule the leader computes the latest
//! slot at or before now (cron in the policy's time zone) and
//!
//! ```text
//!  slot > last_fired ──► commit FireSchedule{slot}      (last_fired = slot, issued = false)
//!                    ──► IssueCommands{key = sched-<name>-<slot label>}   (deterministic key)
//!                    ──► commit ScheduleIssued{slot}    (issued = true)
//!  slot == last_fired && !issued ──► (a leader died in between) issue the SAME key again:
//!                    the command book answers "existing" if it was issued, so it runs once
//! ```
//!
//! A second leader proposing the same slot gets `Unchanged`, and a slot missed while no
//! leader existed is the latest slot when the next leader starts, so it fires once (not once
//! per missed slot, and not never). When a schedule is first seen (policy just applied) its
//! current slot is marked without running, so applying a policy at 10:00 does not start
//! the 02:00 full backup.
//!
//! The recorder turns every finished `backup.*` command into catalog facts by proposing
//! `Record{key}`; the state machine reads the committed result itself (see
//! `state/catalog.rs`), so this loop can crash and restart at any point.

pub mod cron;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use chrono_tz::Tz;
use dr_proto::pb;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Ctx;
use crate::api::backup::{backup_action, copy_action, issue, write};
use crate::api::now_unix_ms;
use crate::state::catalog::{BackupCommand, BackupPolicy, Kind, verbs};
use crate::state::{Command, NewCommand, Response};

/// How often the scheduler looks.
const TICK: Duration = Duration::from_secs(1);
/// Deadline of a scheduled command.
const SCHEDULED_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

pub struct Scheduler {
    ctx: Arc<Ctx>,
    origin: String,
}

impl Scheduler {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        let origin = super::origin(&ctx, "scheduler");
        Scheduler { ctx, origin }
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            // A failed write (leadership moving, no quorum) is retried on the next tick;
            // every step is idempotent.
            if let Err(e) = self.record().await {
                debug!(error = %e, "catalog recorder step failed, retrying");
            }
            if let Err(e) = self.fire().await {
                warn!(error = %e, "scheduler step failed, retrying");
            }
            if let Err(e) = self.retention().await {
                warn!(error = %e, "retention step failed, retrying");
            }
        }
    }

    async fn record(&self) -> anyhow::Result<()> {
        let keys: Vec<String> = self.ctx.node.read(|s| {
            s.commands
                .iter()
                .filter(|c| c.state.is_finished() && !s.catalog.recorded_keys.contains(&c.key))
                .filter(|c| {
                    matches!(c.action.kind.as_ref(), Some(pb::action::Kind::Generic(g)) if g.verb.starts_with("backup."))
                })
                .map(|c| c.key.clone())
                .collect()
        });
        for key in keys {
            let resp = write(
                &self.ctx,
                &self.origin,
                Command::Backup(BackupCommand::Record {
                    command_key: key.clone(),
                }),
            )
            .await?;
            info!(key = %key, ?resp, "backup command recorded in the catalog");
        }
        Ok(())
    }

    async fn fire(&self) -> anyhow::Result<()> {
        let Some(policy) = self.ctx.node.read(|s| s.catalog.policy.clone()) else {
            return Ok(());
        };
        let tz = Tz::from_str(&policy.timezone).unwrap_or(chrono_tz::Asia::Shanghai);
        let now = Utc::now();
        for s in policy
            .schedules
            .iter()
            .filter(|s| s.enabled.unwrap_or(true))
        {
            let Ok(c) = cron::Cron::parse(&s.cron) else {
                continue;
            };
            let Some(slot) = c.latest_at_or_before(tz, now) else {
                continue;
            };
            let slot_ms = slot.timestamp_millis();
            let mark = self
                .ctx
                .node
                .read(|st| st.catalog.schedules.get(&s.name).cloned());
            let first_sight = mark.is_none();
            let mark = mark.unwrap_or_default();
            if slot_ms < mark.last_fired_slot_unix_ms
                || (slot_ms == mark.last_fired_slot_unix_ms && mark.issued)
            {
                continue;
            }
            if slot_ms > mark.last_fired_slot_unix_ms {
                let resp = write(
                    &self.ctx,
                    &self.origin,
                    Command::Backup(BackupCommand::FireSchedule {
                        schedule: s.name.clone(),
                        slot_unix_ms: slot_ms,
                    }),
                )
                .await?;
                if resp != Response::Applied {
                    // Another proposal got there first; look again next tick.
                    continue;
                }
            }
            let label = cron::slot_label(tz, slot);
            if first_sight {
                info!(schedule = %s.name, slot = %label, "schedule seen for the first time, current slot marked without running");
            } else {
                match self.jobs(&policy, s) {
                    Ok(jobs) => {
                        let deadline = now_unix_ms()
                            + i64::try_from(SCHEDULED_TIMEOUT.as_millis()).unwrap_or(i64::MAX / 2);
                        let commands: Vec<NewCommand> = jobs
                            .into_iter()
                            .enumerate()
                            .map(|(i, (host, action))| NewCommand {
                                key: format!("sched-{}-{label}-{i}", s.name),
                                host_id: host,
                                action,
                                deadline_unix_ms: deadline,
                                request_id: format!("sched-{}-{label}", s.name),
                            })
                            .collect();
                        let n = commands.len();
                        if n > 0 {
                            let keys = issue(&self.ctx, &self.origin, commands).await?;
                            info!(schedule = %s.name, slot = %label, keys = ?keys, "schedule fired");
                        }
                    }
                    Err(e) => {
                        warn!(schedule = %s.name, slot = %label, reason = %e, "schedule slot skipped")
                    }
                }
            }
            write(
                &self.ctx,
                &self.origin,
                Command::Backup(BackupCommand::ScheduleIssued {
                    schedule: s.name.clone(),
                    slot_unix_ms: slot_ms,
                }),
            )
            .await?;
        }
        Ok(())
    }

    /// The commands one firing of `s` issues.
    fn jobs(
        &self,
        policy: &BackupPolicy,
        s: &crate::state::catalog::SchedulePolicy,
    ) -> Result<Vec<(String, pb::Action)>, String> {
        let kind = Kind::parse(&s.kind).ok_or_else(|| format!("unknown kind {}", s.kind))?;
        if kind != Kind::Copy {
            return backup_action(policy, kind, &s.target, "", &s.location).map(|j| vec![j]);
        }
        // A tier copy: every backup not yet at the destination, within the policy's
        // jurisdictions (refused copies are logged, never issued).
        let entries = self.ctx.node.read(|st| {
            st.catalog
                .backups
                .values()
                .filter(|b| !b.locations.contains_key(&s.location))
                .cloned()
                .collect::<Vec<_>>()
        });
        let mut jobs = Vec::new();
        for b in entries
            .iter()
            .filter(|b| s.target.is_empty() || b.db == s.target)
        {
            match copy_action(policy, b, &s.location) {
                Ok(j) => jobs.push(j),
                Err(e) => {
                    warn!(backup = %b.id, to = %s.location, reason = %e, "tier copy not issued")
                }
            }
        }
        Ok(jobs)
    }

    async fn retention(&self) -> anyhow::Result<()> {
        let Some(policy) = self.ctx.node.read(|s| s.catalog.policy.clone()) else {
            return Ok(());
        };
        let tz = Tz::from_str(&policy.timezone).unwrap_or(chrono_tz::Asia::Shanghai);
        let now = now_unix_ms();
        // Phase one: mark.
        let marks: Vec<(String, Vec<String>)> = self.ctx.node.read(|s| {
            let mut out = Vec::new();
            for rule in &policy.retention {
                for loc in &policy.locations {
                    for db in policy
                        .databases
                        .iter()
                        .map(|d| d.name.as_str())
                        .chain(policy.file_sets.iter().map(|f| f.name.as_str()))
                    {
                        let es: Vec<_> = s
                            .catalog
                            .backups
                            .values()
                            .filter(|b| {
                                b.db == db
                                    && b.kind.as_str() == rule.kind
                                    && b.locations
                                        .get(&loc.name)
                                        .is_some_and(|p| p.marked_for_delete_at_unix_ms == 0)
                            })
                            .collect();
                        let ids = super::retention::expired(&es, rule, tz);
                        if !ids.is_empty() {
                            out.push((loc.name.clone(), ids));
                        }
                    }
                }
            }
            out
        });
        for (location, ids) in marks {
            info!(location = %location, ids = ?ids, "retention marks backups for deletion");
            write(
                &self.ctx,
                &self.origin,
                Command::Backup(BackupCommand::MarkForDelete { location, ids }),
            )
            .await?;
        }
        // Phase two: delete what was marked longer than the grace ago, one prune per
        // location at a time, on the location's prune host.
        let grace_ms =
            i64::try_from(policy.prune_grace_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        for loc in &policy.locations {
            if loc.prune_host.is_empty() || loc.prune_repo_config.is_empty() {
                continue;
            }
            let (due, busy) = self.ctx.node.read(|s| {
                let due: Vec<String> = s
                    .catalog
                    .backups
                    .values()
                    .filter(|b| b.locations.get(&loc.name).is_some_and(|p| p.marked_for_delete_at_unix_ms != 0 && p.marked_for_delete_at_unix_ms + grace_ms <= now))
                    .map(|b| b.id.clone())
                    .collect();
                let busy = s.commands.open().any(|c| matches!(c.action.kind.as_ref(), Some(pb::action::Kind::Generic(g)) if g.verb == verbs::PRUNE && g.args.get("location") == Some(&loc.name)));
                (due, busy)
            });
            if due.is_empty() || busy {
                continue;
            }
            let key = format!(
                "prune-{}-{}",
                loc.name,
                &blake3::hash(due.join(",").as_bytes()).to_hex()[..16]
            );
            let action = pb::Action {
                kind: Some(pb::action::Kind::Generic(pb::Generic {
                    verb: verbs::PRUNE.into(),
                    args: [
                        ("location".to_owned(), loc.name.clone()),
                        ("repo_config".to_owned(), loc.prune_repo_config.clone()),
                        ("delete".to_owned(), due.join(",")),
                        ("grace_secs".to_owned(), policy.prune_grace_secs.to_string()),
                    ]
                    .into_iter()
                    .collect(),
                })),
            };
            let deadline =
                now + i64::try_from(SCHEDULED_TIMEOUT.as_millis()).unwrap_or(i64::MAX / 2);
            issue(
                &self.ctx,
                &self.origin,
                vec![NewCommand {
                    key: key.clone(),
                    host_id: loc.prune_host.clone(),
                    action,
                    deadline_unix_ms: deadline,
                    request_id: key.clone(),
                }],
            )
            .await?;
            info!(location = %loc.name, count = due.len(), key = %key, "prune issued");
        }
        Ok(())
    }
}
