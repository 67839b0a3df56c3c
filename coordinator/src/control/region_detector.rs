//! The region detector: declares a database cluster's primary region failed and starts the
//! unplanned failover (docs/failover.md, "Failure detection").
//!
//! Why these four conditions, all continuously for `detect_after`: a region is declared
//! failed only when (1) this leader is outside it and a quorum confirmed its leadership
//! recently (a majority, mostly outside the region, sees the cluster live); (2) no agent of
//! the region has a live session (open and heard from within `agents.down_after`: a
//! partitioned or frozen host keeps its stream open and silent; seen in the demo's cut); (3) the region's coordinators are unreachable; (4) the
//! candidate replica reports its WAL receiver is not streaming. Any one of them alone is
//! ambiguous (an agent restart, a slow link, a replica restart).
//!
//! The primary's host alone fails the same way (spec scenario 2, or only its agent's link
//! cut): a confirmed leader, no session of the primary's agent, and the candidate's WAL
//! receiver down. That is safe for the same reason a region failover is: a primary whose
//! agent has no session holds no lease, fences itself, and the plan waits the lease out
//! before promoting; the receiver condition keeps an agent restart from failing over a
//! primary that still streams.
//!
//! A newly elected leader judges nothing until the candidate's agent has sent it a heartbeat
//! (or `lease + drift_margin` has passed): until the agents have reconnected to it, every
//! agent looks gone and every replica looks disconnected (seen in t30: a refusal "no
//! connected replica" raised 2.4 s after the election, with the healthy shanghai agent still
//! reconnecting).
//!
//! Refusals become an operation in state `needs_operator` with the reason (once per
//! cluster until an operator acts): no witness in a two-region topology, automatic off,
//! within the cooldown, no candidate, or the candidate's lag above the tier's RPO.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::failover::{LossBasis, choose_candidate, estimate_loss};
use super::plan_executor::{lsn_string, member_facts};
use crate::Ctx;
use crate::api::now_unix_ms;
use crate::state::operations::plans::unplanned_failover;
use crate::state::operations::{NewOperation, OpState, OpsCommand};
use crate::state::topology_spec::RegionKind;
use crate::state::{Command, Request};

const TICK: Duration = Duration::from_millis(200);

pub struct RegionDetector {
    ctx: Arc<Ctx>,
    /// When this leader started detecting (its election, give or take a tick).
    started: Instant,
    /// Per cluster: since when (monotonic, unix ms) every condition has held.
    suspect_since: HashMap<String, (Instant, i64)>,
}

impl RegionDetector {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        RegionDetector {
            ctx,
            started: Instant::now(),
            suspect_since: HashMap::new(),
        }
    }

    pub async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            if let Err(e) = self.round().await {
                if e.is_fatal() {
                    return Err(e.into());
                }
                debug!(error = %e, "region detector proposal failed");
            }
        }
    }

    async fn round(&mut self) -> Result<(), crate::raft::WriteError> {
        let Some((spec, clusters)) = self.ctx.node.read(|s| {
            s.ops
                .topology
                .as_ref()
                .map(|t| (t.spec.clone(), s.ops.clusters.clone()))
        }) else {
            return Ok(());
        };
        let Ok(status) = self.ctx.node.cluster_status(false).await else {
            return Ok(());
        };
        let now = Instant::now();
        let confirmed = self
            .ctx
            .registry
            .leadership_confirmed_within(now, self.ctx.config.raft.election_timeout_min);
        // An open session is not a live agent: a partitioned (or frozen) host keeps its TCP
        // stream open and silent, and the stream only breaks when keepalives give up. Live
        // means heard from within `down_after`, as the failure detector judges hosts.
        let down_after = self.ctx.config.agents.down_after;
        let live = |connected: bool, last_heartbeat: Instant| {
            connected && now.saturating_duration_since(last_heartbeat) < down_after
        };
        // The regions with a live agent, and the hosts that are live, in one pass over the
        // registry without copying it (this runs every TICK on a leader with 10,000 agents).
        let mut live_regions: HashSet<String> = HashSet::new();
        self.ctx.registry.for_each(|e| {
            if live(e.connected, e.last_heartbeat) && !live_regions.contains(&e.info.region) {
                live_regions.insert(e.info.region.clone());
            }
        });
        let host_live = |host: &str| {
            self.ctx
                .registry
                .view(host)
                .is_some_and(|v| live(v.connected, v.last_heartbeat))
        };
        for (name, cs) in &clusters {
            let region = spec.region_of(&cs.primary_host).to_owned();
            let members = member_facts(&self.ctx, &spec, name);
            let candidate = choose_candidate(&spec, name, &cs.primary_host, None, &members);
            let leader_outside = self.ctx.config.region != region && confirmed;
            let agents_gone = !live_regions.contains(&region);
            let coordinators_gone = status
                .members
                .iter()
                .filter(|m| m.region == region)
                .all(|m| !m.reachable);
            let primary_gone = !host_live(&cs.primary_host);
            let receiver_down = match &candidate {
                Ok(c) => members
                    .iter()
                    .find(|m| m.host == c.host)
                    .is_some_and(|m| m.wal_receiver.as_deref() != Some("streaming")),
                Err(_) => true,
            };
            let region_failed = leader_outside && agents_gone && coordinators_gone && receiver_down;
            // The primary's host alone (spec scenario 2): its agent has no session (so it
            // holds no lease and fences itself) and the candidate no longer streams from it.
            let host_failed = confirmed && primary_gone && receiver_down;
            // A new leader has no sessions yet: every agent is "gone" and every replica
            // "not streaming" until it reconnects and reports. Judge once the candidate has
            // reported to this leader (its receiver state is then first-hand), or, if it
            // never does, after lease + drift (the plan's lease wait could not end sooner).
            let candidate_fresh = candidate.as_ref().is_ok_and(|c| {
                self.ctx.registry.view(&c.host).is_some_and(|v| {
                    v.connected
                        && v.last_heartbeat > self.started
                        && super::failover::fact(&v.facts, "role").is_some()
                })
            });
            let settled = candidate_fresh
                || now.saturating_duration_since(self.started)
                    >= spec.failover.lease + spec.failover.drift_margin();
            if !settled || !(region_failed || host_failed) {
                if self.suspect_since.remove(name).is_some() {
                    info!(cluster = %name, %region, "region recovered before failover was declared");
                }
                continue;
            }
            let (since, since_unix) = *self
                .suspect_since
                .entry(name.clone())
                .or_insert_with(|| (now, now_unix_ms()));
            if now.saturating_duration_since(since) < spec.failover.detect_after {
                continue;
            }
            // Declared. Anything already decided for this cluster?
            let busy = self.ctx.node.read(|s| {
                s.ops.operations.values().any(|o| {
                    o.cluster == *name
                        && (o.state == OpState::Running
                            || (o.state == OpState::NeedsOperator
                                && o.created_at_unix_ms >= cs.last_failover_unix_ms))
                })
            });
            if busy {
                continue;
            }
            let to_region = candidate
                .as_ref()
                .map(|c| spec.region_of(&c.host).to_owned())
                .unwrap_or_default();
            let cand_host = candidate
                .as_ref()
                .map(|c| c.host.clone())
                .unwrap_or_default();
            let reason = if region_failed {
                format!(
                    "region {region} failed: no agent session, coordinators unreachable, candidate's WAL receiver down, for {}",
                    humantime::format_duration(spec.failover.detect_after)
                )
            } else {
                format!(
                    "primary {} failed: its agent has no session with the coordinators and the candidate's WAL receiver is down, for {}",
                    cs.primary_host,
                    humantime::format_duration(spec.failover.detect_after)
                )
            };
            let mut op = unplanned_failover(
                &spec,
                cs,
                name,
                &to_region,
                &cand_host,
                false,
                &reason,
                &format!("auto-{name}-{}", cs.last_failover_unix_ms),
                Some(since_unix),
            );
            op.needs_operator = refusal(&spec, cs, &candidate, name, now_unix_ms()).map(|why| {
                // What forcing would cost, from the last facts each side reported.
                let primary_lsn = members
                    .iter()
                    .find(|m| m.host == cs.primary_host)
                    .and_then(|m| m.lsn);
                let replayed = candidate.as_ref().ok().and_then(|c| c.replay_lsn);
                let estimate = estimate_loss(&members, &cs.primary_host, &cand_host);
                match (primary_lsn, replayed, &estimate.basis) {
                    (Some(p), Some(r), LossBasis::Primary) => format!(
                        "{why}. Estimated data loss if forced: {} bytes of WAL ({cand_host} replayed {}, {} last reported {})",
                        estimate.bytes,
                        lsn_string(r),
                        cs.primary_host,
                        lsn_string(p)
                    ),
                    (_, _, LossBasis::SeenByCandidate { .. }) => format!(
                        "{why}. Data loss if forced: {}",
                        estimate.describe(&cs.primary_host, &cand_host)
                    ),
                    _ => format!("{why}. Estimated data loss if forced: unknown (no LSN facts)"),
                }
            });
            match &op.needs_operator {
                Some(why) => {
                    warn!(cluster = %name, %region, reason = %why, "automatic failover refused, raised to the operator")
                }
                None => {
                    warn!(cluster = %name, %region, candidate = %cand_host, "region failed, starting automatic failover")
                }
            }
            self.propose(op).await?;
        }
        Ok(())
    }

    async fn propose(&self, op: NewOperation) -> Result<(), crate::raft::WriteError> {
        let (_, resp) = self
            .ctx
            .node
            .write(Request {
                at_unix_ms: now_unix_ms(),
                origin: super::origin(&self.ctx, "region_detector"),
                cmd: Command::Ops(OpsCommand::CreateOperation { op }),
            })
            .await?;
        debug!(?resp, "failover operation proposed");
        Ok(())
    }
}

/// Why automatic failover must not run (None: it may). Pure.
pub fn refusal(
    spec: &crate::state::topology_spec::TopologySpec,
    cs: &crate::state::operations::ClusterState,
    candidate: &Result<super::failover::Candidate, String>,
    cluster: &str,
    now_unix_ms: i64,
) -> Option<String> {
    let data_regions = spec
        .regions
        .iter()
        .filter(|r| r.kind != RegionKind::Witness)
        .count();
    if !spec.has_witness() && data_regions <= 2 {
        let to = match candidate {
            Ok(c) => spec.region_of(&c.host).to_owned(),
            Err(_) => "REGION".to_owned(),
        };
        return Some(format!(
            "automatic failover refused: the topology has two data regions and no witness, so \
             no side can tell a dead peer from a cut link. If {} is really down, fail over by \
             hand with `drctl failover --to {to} --force` (it states the estimated data loss \
             and asks to confirm); to allow automatic failover, add a witness region with a \
             third coordinator to the topology",
            spec.region_of(&cs.primary_host)
        ));
    }
    if !spec.failover.automatic {
        return Some("automatic failover is off in the topology's failover policy".into());
    }
    let cooldown_ms = i64::try_from(spec.failover.cooldown.as_millis()).unwrap_or(i64::MAX);
    if cs.last_failover_unix_ms > 0 && now_unix_ms - cs.last_failover_unix_ms < cooldown_ms {
        return Some(format!(
            "the cluster failed over less than {} ago (cooldown against flapping)",
            humantime::format_duration(spec.failover.cooldown)
        ));
    }
    let c = match candidate {
        Ok(c) => c,
        Err(why) => return Some(why.clone()),
    };
    let rpo = spec
        .cluster(cluster)
        .map_or(Duration::from_secs(300), |c| c.rpo());
    if let Some(lag) = c.lag_seconds
        && lag > rpo.as_secs_f64()
    {
        return Some(format!(
            "automatic failover refused: candidate {} lags {lag:.1}s, above the RPO of {} of {cluster}; \
             `drctl failover --to {} --force` accepts the loss",
            c.host,
            humantime::format_duration(rpo),
            spec.region_of(&c.host)
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::operations::ClusterState;
    use crate::state::topology_spec::TopologySpec;

    const EXAMPLE: &str = include_str!("../../../deploy/examples/yeslocker/topology.toml");

    #[test]
    fn refusals() {
        let spec = TopologySpec::parse(EXAMPLE).expect("valid");
        let cs = ClusterState {
            primary_host: "bj-db-1".into(),
            epoch: 1,
            last_failover_unix_ms: 0,
        };
        let cand = |lag| {
            Ok(super::super::failover::Candidate {
                host: "sh-db-1".into(),
                replay_lsn: Some(1),
                lag_seconds: Some(lag),
            })
        };
        assert_eq!(
            refusal(&spec, &cs, &cand(1.0), "yeslocker", 1_000_000),
            None
        );
        assert!(
            refusal(&spec, &cs, &cand(400.0), "yeslocker", 1_000_000)
                .is_some_and(|r| r.contains("RPO"))
        );
        let recent = ClusterState {
            last_failover_unix_ms: 999_000,
            ..cs.clone()
        };
        assert!(
            refusal(&spec, &recent, &cand(1.0), "yeslocker", 1_000_000)
                .is_some_and(|r| r.contains("cooldown"))
        );
        let mut two = spec.clone();
        two.regions.retain(|r| r.kind != RegionKind::Witness);
        assert!(
            refusal(&two, &cs, &cand(1.0), "yeslocker", 1_000_000)
                .is_some_and(|r| r.contains("witness"))
        );
    }
}
