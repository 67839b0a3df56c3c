//! Leader-only controllers.
//!
//! Why leader-only: these loops turn what the leader HEARS (sessions in the registry) and
//! the clock into decisions (HostDown, ExpireCommands) and push decisions to agents. Only
//! the leader hears agents, and two nodes deciding at once would fight; so they start when
//! this node becomes leader and stop when it is not, and on the way out every agent
//! session is closed with a Redirect so agents follow the new leader.
//!
//! ```text
//!   follower ──(elected)──► leading: failure_detector, dispatcher, expiry, lease, gauges
//!      ▲                        │
//!      └──(deposed/term change)─┘  cancel loops, close sessions with Redirect
//! ```

pub mod dispatcher;
pub mod drill;
pub mod expiry;
pub mod failover;
pub mod failure_detector;
pub mod lease;
pub mod plan_executor;
pub mod region_detector;
pub mod retention;
pub mod scheduler;
pub mod security_alerts;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::Ctx;
use crate::metrics::CheckStateLabels;
use crate::state::HostState;

/// Runs the controllers whenever this node leads, until `cancel`.
pub async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) -> anyhow::Result<()> {
    // Server metrics notify only on a real change of role, term, leader or membership;
    // openraft's full metrics watch fires after every core pass (issue 2, defect 2).
    let mut metrics = ctx.node.server_metrics();
    let quorum_check_every = ctx
        .config
        .raft
        .heartbeat_interval
        .max(Duration::from_millis(20));
    loop {
        // --- wait for leadership
        while !ctx.node.is_leader() {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                changed = metrics.changed() => if changed.is_err() {
                    // Raft stopped: the server notices and shuts down.
                    return Ok(());
                },
            }
        }
        let term = metrics.borrow_and_update().vote.leader_id().get_term();
        let elected_at = Instant::now();
        info!(term, "leading, starting controllers");

        let leading = cancel.child_token();
        let mut tasks = JoinSet::new();
        tasks.spawn(
            failure_detector::FailureDetector::new(ctx.clone(), elected_at)
                .run(leading.clone())
                .instrument(info_span!("failure_detector", term)),
        );
        tasks.spawn(
            dispatcher::Dispatcher::new(ctx.clone())
                .run(leading.clone())
                .instrument(info_span!("dispatcher", term)),
        );
        tasks.spawn(
            expiry::Expiry::new(ctx.clone())
                .run(leading.clone())
                .instrument(info_span!("expiry", term)),
        );
        tasks.spawn(
            lease::LeaseConfirmer::new(ctx.clone())
                .run(leading.clone())
                .instrument(info_span!("lease", term)),
        );
        tasks.spawn(
            plan_executor::PlanExecutor::new(ctx.clone(), elected_at)
                .run(leading.clone())
                .instrument(info_span!("plan_executor", term)),
        );
        tasks.spawn(
            region_detector::RegionDetector::new(ctx.clone())
                .run(leading.clone())
                .instrument(info_span!("region_detector", term)),
        );
        tasks.spawn(gauges(ctx.clone(), leading.clone()).instrument(info_span!("gauges", term)));
        tasks.spawn(
            scheduler::Scheduler::new(ctx.clone())
                .run(leading.clone())
                .instrument(info_span!("backup_scheduler", term)),
        );
        tasks.spawn(
            drill::DrillScheduler::new(ctx.clone())
                .run(leading.clone())
                .instrument(info_span!("drill_scheduler", term)),
        );

        // --- lead until deposed, a new term, shutdown, or a controller failing
        let mut failure = None;
        let mut raft_stopped = false;
        let mut lost_majority = None;
        let mut quorum_tick = tokio::time::interval(quorum_check_every);
        quorum_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = metrics.changed() => {
                    if changed.is_err() || !ctx.node.is_leader() || metrics.borrow_and_update().vote.leader_id().get_term() != term {
                        break;
                    }
                }
                _ = quorum_tick.tick() => {
                    // Cut off from the majority (issue 2, defect 6): openraft keeps us
                    // "leader" until we hear a higher term, which may be minutes. Step
                    // back from agents now so they roam to the majority side; the loop
                    // restarts the controllers if the quorum comes back in this term.
                    if let Some(lost) = ctx.node.quorum_lost_for() {
                        lost_majority = Some(lost);
                        break;
                    }
                }
                Some(done) = tasks.join_next() => {
                    if cancel.is_cancelled() {
                        // Shutting down: controllers return as told.
                        break;
                    }
                    match done {
                        // Raft stopped under it (its watch closed): the server notices
                        // and shuts down; stop here too rather than restart in a loop.
                        Ok(Ok(())) => {
                            warn!("a controller stopped while leading, raft is probably stopping");
                            raft_stopped = true;
                        }
                        Ok(Err(e)) => failure = Some(e),
                        Err(e) => failure = Some(anyhow::Error::from(e).context("controller panicked")),
                    }
                    if let Some(e) = &failure {
                        error!(error = %format!("{e:#}"), "controller failed");
                    }
                    break;
                }
            }
        }
        leading.cancel();
        while tasks.join_next().await.is_some() {}
        let reason = if cancel.is_cancelled() {
            "this coordinator is shutting down"
        } else if lost_majority.is_some() {
            "this coordinator has lost contact with the majority"
        } else {
            "leadership moved"
        };
        // Cut off, we still see ourselves as leader, so the Redirect names no leader:
        // the agent tries its other endpoints, and only the majority side takes it.
        let closed = ctx
            .registry
            .close_all(&crate::api::agent::redirect(&ctx, reason));
        ctx.metrics.agents_connected.set(0);
        if let Some(lost) = lost_majority {
            // Expected in a partition, and the operator's first clue: a warning, once.
            warn!(
                term,
                closed,
                no_quorum_ms = u64::try_from(lost.as_millis()).unwrap_or(u64::MAX),
                "lost contact with the majority, agent sessions redirected"
            );
            // Stay out of the controllers until the quorum answers again or the role
            // changes; sessions are refused meanwhile (api::agent checks the same).
            let mut wait = tokio::time::interval(quorum_check_every);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    changed = metrics.changed() => if changed.is_err() { return Ok(()) },
                    _ = wait.tick() => {}
                }
                if !ctx.node.is_leader() || ctx.node.quorum_lost_for().is_none() {
                    break;
                }
            }
            info!(term, "quorum contact back or role changed");
            continue;
        }
        info!(
            term,
            closed, reason, "stopped leading, agent sessions redirected"
        );
        if let Some(e) = failure {
            return Err(e).context("leader controllers");
        }
        if cancel.is_cancelled() || raft_stopped {
            return Ok(());
        }
    }
}

/// Keeps the agent and check gauges current while leading.
async fn gauges(ctx: Arc<Ctx>, cancel: CancellationToken) -> anyhow::Result<()> {
    let every = ctx
        .config
        .agents
        .heartbeat_interval
        .max(Duration::from_millis(500));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        ctx.metrics
            .agents_connected
            .set(i64::try_from(ctx.registry.connected()).unwrap_or(i64::MAX));
        let counts = ctx.node.read(|s| {
            let mut counts = std::collections::BTreeMap::<(&'static str, &'static str), i64>::new();
            for h in s.hosts.values().filter(|h| h.state == HostState::Up) {
                for c in h.checks.values() {
                    *counts
                        .entry((check_state_label(c.state), tier_label(c.tier)))
                        .or_default() += 1;
                }
            }
            counts
        });
        // Set every combination so a count that drops to zero is exported as zero.
        for state in ["passing", "failing", "unknown"] {
            for tier in ["critical", "important", "non_critical", "unspecified"] {
                let v = counts.get(&(state, tier)).copied().unwrap_or(0);
                ctx.metrics
                    .check_states
                    .get_or_create(&CheckStateLabels {
                        state: state.to_owned(),
                        tier: tier.to_owned(),
                    })
                    .set(v);
            }
        }
    }
}

fn check_state_label(s: dr_proto::pb::CheckState) -> &'static str {
    match s {
        dr_proto::pb::CheckState::Passing => "passing",
        dr_proto::pb::CheckState::Failing => "failing",
        _ => "unknown",
    }
}

fn tier_label(t: dr_proto::pb::Tier) -> &'static str {
    match t {
        dr_proto::pb::Tier::Critical => "critical",
        dr_proto::pb::Tier::Important => "important",
        dr_proto::pb::Tier::NonCritical => "non_critical",
        dr_proto::pb::Tier::Unspecified => "unspecified",
    }
}

/// The origin recorded in the audit log for what this node's controllers propose.
pub(crate) fn origin(ctx: &Ctx, controller: &str) -> String {
    format!("coordinator/{}/{controller}", ctx.node.id())
}
