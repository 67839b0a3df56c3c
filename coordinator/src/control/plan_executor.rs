//! The plan executor: the leader-only loop that drives running operations.
//!
//! Why it holds no state of its own: everything about a plan is in the log
//! ([`crate::state::operations`]); this loop only looks at each running operation's
//! [`next_move`] and proposes it. A proposal names its step and attempt, so if two leaders
//! overlap (or this one retries after a timeout) the second proposal is `Unchanged`. A new
//! leader therefore resumes a half-done plan exactly where the log says.
//!
//! Internal steps that need the leader's live picture are computed here: the candidate (from
//! heartbeat facts) and the lease wait (from the lease book and this leader's election
//! instant, see [`super::failover`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::failover::{LossBasis, MemberFacts, choose_candidate, estimate_loss, lease_safe_at};
use crate::Ctx;
use crate::api::now_unix_ms;
use crate::state::operations::{
    InternalEffect, InternalKind, Move, OpState, Operation, OpsCommand, next_move,
};
use crate::state::{Command, Request, Response};

const TICK: Duration = Duration::from_millis(100);

pub struct PlanExecutor {
    ctx: Arc<Ctx>,
    elected_at: Instant,
}

impl PlanExecutor {
    pub fn new(ctx: Arc<Ctx>, elected_at: Instant) -> Self {
        PlanExecutor { ctx, elected_at }
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut applied = self.ctx.node.applied();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                changed = applied.changed() => if changed.is_err() { return Ok(()) },
                _ = tick.tick() => {}
            }
            let running: Vec<Operation> = self.ctx.node.read(|s| {
                s.ops
                    .operations
                    .values()
                    .filter(|o| o.state == OpState::Running)
                    .cloned()
                    .collect()
            });
            for op in running {
                if cancel.is_cancelled() {
                    return Ok(());
                }
                let span = info_span!("operation", id = op.id, kind = op.kind.as_str(), cluster = %op.cluster);
                if let Err(e) = self.step(&op).instrument(span).await {
                    if e.is_fatal() {
                        return Err(e.into());
                    }
                    debug!(op = op.id, error = %e, "plan step proposal failed, retrying");
                }
            }
        }
    }

    async fn step(&self, op: &Operation) -> Result<(), crate::raft::WriteError> {
        let cmd = match next_move(op) {
            Move::Nothing | Move::Wait => return Ok(()),
            Move::StartAgent {
                step,
                attempt,
                timeout_ms,
            } => {
                info!(step, name = %op.steps[step as usize].spec.name, attempt, "starting agent step");
                OpsCommand::StartStep {
                    op_id: op.id,
                    step,
                    attempt,
                    deadline_unix_ms: now_unix_ms()
                        .saturating_add(i64::try_from(timeout_ms).unwrap_or(i64::MAX)),
                }
            }
            Move::Internal { step, kind } => match self.internal(op, step, kind) {
                Some(cmd) => cmd,
                None => return Ok(()),
            },
        };
        let (index, resp) = self
            .ctx
            .node
            .write(Request {
                at_unix_ms: now_unix_ms(),
                origin: super::origin(&self.ctx, "plan_executor"),
                cmd: Command::Ops(cmd),
            })
            .await?;
        if let Response::Refused { refusal } = resp {
            warn!(index, reason = %refusal, "plan step refused");
        }
        Ok(())
    }

    /// The entry completing an internal step, or `None` when it must wait.
    fn internal(&self, op: &Operation, step: u32, kind: InternalKind) -> Option<OpsCommand> {
        let effect = match kind {
            InternalKind::RaiseEpoch => InternalEffect::EpochRaised,
            InternalKind::RecordMetrics => InternalEffect::MetricsRecorded,
            InternalKind::RecordRestore => InternalEffect::RestoreRecorded,
            InternalKind::WaitLease => {
                let old = op.vars.get("old_primary").cloned().unwrap_or_default();
                let policy = self.ctx.node.read(|s| {
                    s.ops
                        .topology
                        .as_ref()
                        .map(|t| t.spec.failover.clone())
                        .unwrap_or_default()
                });
                let safe = lease_safe_at(
                    self.ctx.ops.last_grant(&old),
                    self.elected_at,
                    policy.lease,
                    policy.drift_margin(),
                );
                let now = Instant::now();
                if now < safe {
                    debug!(old_primary = %old, remaining = ?(safe - now), "waiting out the old primary's lease");
                    return None;
                }
                let waited = now.saturating_duration_since(
                    self.elected_at
                        .max(self.ctx.ops.last_grant(&old).unwrap_or(self.elected_at)),
                );
                info!(old_primary = %old, ?waited, "old primary's lease has run out");
                InternalEffect::LeaseWaited {
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                }
            }
            InternalKind::DecideCandidate => {
                let (spec, primary) = self.ctx.node.read(|s| {
                    (
                        s.ops.topology.as_ref().map(|t| t.spec.clone()),
                        s.ops
                            .clusters
                            .get(&op.cluster)
                            .map(|c| c.primary_host.clone()),
                    )
                });
                let (Some(spec), Some(primary)) = (spec, primary) else {
                    return Some(OpsCommand::FailStep {
                        op_id: op.id,
                        step,
                        attempt: 0,
                        reason: "the cluster is no longer in the topology".into(),
                    });
                };
                let members = member_facts(&self.ctx, &spec, &op.cluster);
                match choose_candidate(&spec, &op.cluster, &primary, Some(&op.to_region), &members)
                {
                    Ok(c) => {
                        let estimate = estimate_loss(&members, &primary, &c.host);
                        let loss = estimate.bytes;
                        info!(candidate = %c.host, loss, basis = ?estimate.basis, "candidate decided");
                        InternalEffect::Decided {
                            estimated_loss_bytes: loss,
                            reason: format!(
                                "most advanced connected replica in {} (replay_lsn {}){}",
                                op.to_region,
                                c.replay_lsn.map_or("unknown".into(), lsn_string),
                                match estimate.basis {
                                    LossBasis::Primary => String::new(),
                                    _ => format!("; {}", estimate.describe(&primary, &c.host)),
                                }
                            ),
                            candidate: c.host,
                        }
                    }
                    Err(why) => {
                        // Keep trying while the replica reconnects; the operator can cancel.
                        debug!(reason = %why, "no candidate yet");
                        return None;
                    }
                }
            }
        };
        Some(OpsCommand::CompleteInternal {
            op_id: op.id,
            step,
            effect,
        })
    }
}

/// Live facts of a cluster's members from the registry (leader memory).
pub fn member_facts(
    ctx: &Ctx,
    spec: &crate::state::topology_spec::TopologySpec,
    cluster: &str,
) -> Vec<MemberFacts> {
    let Some(c) = spec.cluster(cluster) else {
        return vec![];
    };
    c.members
        .iter()
        .map(|h| match ctx.registry.view(h) {
            Some(v) => MemberFacts::from_facts(h, spec.region_of(h), v.connected, &v.facts),
            None => MemberFacts {
                host: h.clone(),
                region: spec.region_of(h).to_owned(),
                ..Default::default()
            },
        })
        .collect()
}

pub fn lsn_string(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xFFFF_FFFF)
}
