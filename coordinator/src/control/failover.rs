//! Failover decisions that need the leader's live picture: who gets a lease (with which
//! epoch), when the old primary's lease has certainly run out, and which replica is the
//! best candidate.
//!
//! Why the lease book is in leader memory and under one lock with the decision: the plan
//! executor's `wait_lease` must see every grant the leader made to the old primary. A grant
//! is decided (from the committed state) and recorded while holding [`OpsMemory`]'s lock;
//! the executor reads the book under the same lock AFTER the operation that revokes the
//! lease is applied. So either the grant was recorded before the read, or its decision saw
//! the revocation and granted nothing (docs/failover.md, "Leases and fencing").

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::State;
use crate::state::operations::OpState;
use crate::state::topology_spec::TopologySpec;

/// Leader memory for failover: the instant of the last lease granted per host.
#[derive(Debug, Default)]
pub struct OpsMemory {
    grants: Mutex<HashMap<String, Instant>>,
}

impl OpsMemory {
    /// Runs `decide` under the lease-book lock and records a grant to `host` now when it
    /// returns a lease that counts for fencing.
    pub fn grant_for(&self, host: &str, decide: impl FnOnce() -> LeaseDecision) -> LeaseDecision {
        let mut g = self
            .grants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let d = decide();
        if matches!(d, LeaseDecision::Primary { .. }) {
            g.insert(host.to_owned(), Instant::now());
        }
        d
    }

    pub fn last_grant(&self, host: &str) -> Option<Instant> {
        self.grants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(host)
            .copied()
    }
}

/// What a heartbeat from a host earns.
#[derive(Clone, Debug, PartialEq)]
pub enum LeaseDecision {
    /// Not a database member: the plain session lease as before.
    Plain,
    /// The recorded primary of `cluster`: a lease carrying its epoch.
    Primary {
        cluster: String,
        epoch: u64,
        lease: Duration,
    },
    /// A member that must not hold a lease now (a replica, or a primary being failed over).
    Withheld,
}

/// Pure: the lease decision for `host` from the committed state.
pub fn lease_for(state: &State, host: &str) -> LeaseDecision {
    let Some(topo) = &state.ops.topology else {
        return LeaseDecision::Plain;
    };
    let mut member = false;
    for c in &topo.spec.db_clusters {
        if !c.members.iter().any(|m| m == host) {
            continue;
        }
        member = true;
        let Some(cs) = state.ops.clusters.get(&c.name) else {
            continue;
        };
        if cs.primary_host != host {
            continue;
        }
        let revoked = state.ops.operations.values().any(|o| {
            o.cluster == c.name && o.state == OpState::Running && o.kind.revokes_lease_at_start()
        });
        if revoked {
            return LeaseDecision::Withheld;
        }
        return LeaseDecision::Primary {
            cluster: c.name.clone(),
            epoch: cs.epoch,
            lease: topo.spec.failover.lease,
        };
    }
    if member {
        LeaseDecision::Withheld
    } else {
        LeaseDecision::Plain
    }
}

/// Parses a PostgreSQL LSN `X/Y` (hex) into a byte position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    Some((hi << 32) | lo)
}

/// A fact reported by the agent's pg module (accepts `pg.<key>` and `<key>`).
pub fn fact<'a>(facts: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    facts
        .get(&format!("pg.{key}"))
        .or_else(|| facts.get(key))
        .map(String::as_str)
}

/// What the leader knows live about one member.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemberFacts {
    pub host: String,
    pub region: String,
    pub connected: bool,
    pub replay_lsn: Option<u64>,
    pub lsn: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub wal_receiver: Option<String>,
    /// Replica: the primary's end of WAL as this replica last heard it (`pg_stat_wal_receiver
    /// .latest_end_lsn`, kept by the agent while its receiver is down).
    pub primary_end_lsn: Option<u64>,
    /// When the primary reported `primary_end_lsn` (RFC 3339, the primary's clock).
    pub primary_end_at: Option<String>,
}

impl MemberFacts {
    pub fn from_facts(
        host: &str,
        region: &str,
        connected: bool,
        f: &HashMap<String, String>,
    ) -> Self {
        MemberFacts {
            host: host.to_owned(),
            region: region.to_owned(),
            connected,
            replay_lsn: fact(f, "replay_lsn").and_then(parse_lsn),
            lsn: fact(f, "lsn").and_then(parse_lsn),
            lag_seconds: fact(f, "lag_seconds").and_then(|v| v.parse().ok()),
            wal_receiver: fact(f, "wal_receiver").map(str::to_owned),
            primary_end_lsn: fact(f, "primary_end_lsn").and_then(parse_lsn),
            primary_end_at: fact(f, "primary_end_at").map(str::to_owned),
        }
    }
}

/// Where a forced failover's data-loss estimate comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum LossBasis {
    /// The old primary's own last LSN, reported live to this leader.
    Primary,
    /// The old primary's end of WAL as the candidate's WAL receiver last heard it: used when
    /// this leader never heard the primary (elected after it was lost). Writes the primary
    /// made after that are not counted.
    SeenByCandidate { at: Option<String> },
    /// Neither position is known, or the candidate's replay position is not.
    Unknown,
}

/// Estimated bytes of WAL a forced failover loses: the old primary's last position minus the
/// candidate's replay position (WAL received but not yet replayed is counted, so this errs
/// high).
#[derive(Clone, Debug, PartialEq)]
pub struct LossEstimate {
    pub bytes: u64,
    pub basis: LossBasis,
}

impl LossEstimate {
    /// For operators: the number and what it rests on.
    pub fn describe(&self, primary: &str, candidate: &str) -> String {
        match &self.basis {
            LossBasis::Primary => format!(
                "estimated {} bytes of WAL: {primary}'s last reported position minus {candidate}'s replay position",
                self.bytes
            ),
            LossBasis::SeenByCandidate { at } => format!(
                "estimated {} bytes of WAL: {primary}'s last position as seen by {candidate}{}; writes after that are not counted ({primary} never reported to this coordinator leader)",
                self.bytes,
                at.as_deref()
                    .map(|t| format!(" at {t}"))
                    .unwrap_or_default()
            ),
            LossBasis::Unknown => format!(
                "data loss unknown: this coordinator leader lacks {candidate}'s replay position or any last position of {primary} (its own report or {candidate}'s view of it)"
            ),
        }
    }
}

/// Picks the best known position of the old primary: its own report when this leader has
/// one, else the candidate's last view of it. Pure.
pub fn estimate_loss(members: &[MemberFacts], primary: &str, candidate: &str) -> LossEstimate {
    let unknown = LossEstimate {
        bytes: 0,
        basis: LossBasis::Unknown,
    };
    let Some(cand) = members.iter().find(|m| m.host == candidate) else {
        return unknown;
    };
    let Some(replayed) = cand.replay_lsn else {
        return unknown;
    };
    let primary_lsn = members
        .iter()
        .find(|m| m.host == primary)
        .and_then(|m| m.lsn);
    match (primary_lsn, cand.primary_end_lsn) {
        (Some(p), _) => LossEstimate {
            bytes: p.saturating_sub(replayed),
            basis: LossBasis::Primary,
        },
        (None, Some(seen)) => LossEstimate {
            bytes: seen.saturating_sub(replayed),
            basis: LossBasis::SeenByCandidate {
                at: cand.primary_end_at.clone(),
            },
        },
        (None, None) => unknown,
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub host: String,
    pub replay_lsn: Option<u64>,
    pub lag_seconds: Option<f64>,
}

/// The most advanced connected replica of `cluster` outside the primary's region (in
/// `to_region` when given). Pure.
pub fn choose_candidate(
    spec: &TopologySpec,
    cluster: &str,
    primary: &str,
    to_region: Option<&str>,
    members: &[MemberFacts],
) -> Result<Candidate, String> {
    let Some(c) = spec.cluster(cluster) else {
        return Err(format!("cluster {cluster} is not in the topology"));
    };
    let primary_region = spec.region_of(primary);
    let best = members
        .iter()
        .filter(|m| c.members.contains(&m.host) && m.host != primary)
        .filter(|m| m.region != primary_region)
        .filter(|m| to_region.is_none_or(|r| m.region == r))
        .filter(|m| m.connected)
        .max_by(|a, b| {
            a.replay_lsn
                .cmp(&b.replay_lsn)
                .then_with(|| b.host.cmp(&a.host))
        });
    match best {
        Some(m) => Ok(Candidate {
            host: m.host.clone(),
            replay_lsn: m.replay_lsn,
            lag_seconds: m.lag_seconds,
        }),
        None => Err(format!(
            "no connected replica of {cluster} in {}",
            to_region.unwrap_or("a region other than the primary's")
        )),
    }
}

/// Lease-safe instant: the old primary's lease certainly ran out, counted from the later of
/// our last grant to it and our election (a predecessor's grants precede our election).
pub fn lease_safe_at(
    last_grant: Option<Instant>,
    elected_at: Instant,
    lease: Duration,
    drift: Duration,
) -> Instant {
    last_grant.map_or(elected_at, |g| g.max(elected_at)) + lease + drift
}

/// Notes for `drctl status` from the database members' live facts (leader only): which
/// member is fenced and what brings it back, and a loud warning when more than one member
/// reports itself writable. Pure: `facts` gives a connected host's last reported facts.
pub fn member_notes(
    state: &State,
    facts: impl Fn(&str) -> Option<HashMap<String, String>>,
) -> Vec<String> {
    let Some(topo) = &state.ops.topology else {
        return vec![];
    };
    let mut notes = Vec::new();
    for c in &topo.spec.db_clusters {
        let recorded = state
            .ops
            .clusters
            .get(&c.name)
            .map(|cs| cs.primary_host.as_str())
            .unwrap_or(c.primary.as_str());
        let mut writable = Vec::new();
        for m in &c.members {
            let Some(f) = facts(m) else { continue };
            let role = fact(&f, "role").unwrap_or("unknown");
            if role == "primary" {
                writable.push(m.as_str());
            }
            if fact(&f, "fenced") == Some("true") && m != recorded {
                notes.push(format!(
                    "database {}: {m} ({}) is fenced (role {role}): it stays stopped and will not \
                     start as a primary; {recorded} is the primary. Bring it back as a replica \
                     (rewound) and fail back with `drctl failover --to {} --cluster {}`",
                    c.name,
                    topo.spec.region_of(m),
                    topo.spec.region_of(m),
                    c.name
                ));
            } else if fact(&f, "fenced") == Some("true") {
                notes.push(format!(
                    "database {}: the primary {m} is fenced: it accepts no writes until it is \
                     unfenced with the current epoch (or fails over)",
                    c.name
                ));
            }
        }
        if writable.len() > 1 {
            notes.push(format!(
                "DANGER database {}: {} all report themselves primary (recorded primary: \
                 {recorded}); stop every one but {recorded} now",
                c.name,
                writable.join(", ")
            ));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../deploy/examples/yeslocker/topology.toml");

    #[test]
    fn candidate_is_most_advanced_connected_replica_outside() {
        let spec = TopologySpec::parse(EXAMPLE).expect("valid");
        let m = |h: &str, r: &str, c: bool, lsn: u64| MemberFacts {
            host: h.into(),
            region: r.into(),
            connected: c,
            replay_lsn: Some(lsn),
            ..Default::default()
        };
        let got = choose_candidate(
            &spec,
            "yeslocker",
            "bj-db-1",
            None,
            &[
                m("bj-db-1", "beijing", true, 9),
                m("sh-db-1", "shanghai", true, 5),
            ],
        );
        assert_eq!(got.map(|c| c.host), Ok("sh-db-1".to_owned()));
        let none = choose_candidate(
            &spec,
            "yeslocker",
            "bj-db-1",
            None,
            &[m("sh-db-1", "shanghai", false, 5)],
        );
        assert!(none.is_err());
    }

    #[test]
    fn loss_estimate_uses_the_primary_else_the_candidates_view_of_it() {
        let primary = |lsn: Option<u64>| MemberFacts {
            host: "bj-db-1".into(),
            lsn,
            ..Default::default()
        };
        let cand = |replay: Option<u64>, end: Option<u64>| MemberFacts {
            host: "sh-db-1".into(),
            connected: true,
            replay_lsn: replay,
            primary_end_lsn: end,
            primary_end_at: end.map(|_| "2026-11-28T16:30:00.000Z".into()),
            ..Default::default()
        };
        let est = |m: &[MemberFacts]| estimate_loss(m, "bj-db-1", "sh-db-1");

        // Both known: the primary's own report wins.
        let e = est(&[primary(Some(1000)), cand(Some(400), Some(900))]);
        assert_eq!((e.bytes, &e.basis), (600, &LossBasis::Primary));
        assert!(
            e.describe("bj-db-1", "sh-db-1")
                .contains("estimated 600 bytes")
        );

        // A new leader that never heard the primary: the candidate's view of it.
        let e = est(&[primary(None), cand(Some(400), Some(900))]);
        assert_eq!(e.bytes, 500);
        assert_eq!(
            e.basis,
            LossBasis::SeenByCandidate {
                at: Some("2026-11-28T16:30:00.000Z".into())
            }
        );
        let text = e.describe("bj-db-1", "sh-db-1");
        assert!(
            text.contains("estimated 500 bytes of WAL")
                && text.contains("as seen by sh-db-1 at 2026-11-28T16:30:00.000Z")
                && text.contains("writes after that are not counted"),
            "{text}"
        );
        // The primary's member absent from the facts altogether is the same case.
        assert_eq!(est(&[cand(Some(400), Some(900))]).bytes, 500);

        // Nothing to go on, or no replay position: unknown, never a silent 0.
        let e = est(&[primary(None), cand(Some(400), None)]);
        assert_eq!(e.basis, LossBasis::Unknown);
        assert!(e.describe("bj-db-1", "sh-db-1").contains("unknown"));
        assert_eq!(
            est(&[primary(Some(1000)), cand(None, Some(900))]).basis,
            LossBasis::Unknown
        );
        // Replay ahead of a stale view: 0, not an underflow.
        assert_eq!(est(&[primary(None), cand(Some(950), Some(900))]).bytes, 0);
    }

    #[test]
    fn member_notes_name_the_fenced_old_primary_and_split_brain() {
        use crate::state::operations::{ClusterState, TopologyRecord};
        let spec = TopologySpec::parse(EXAMPLE).expect("valid");
        let mut state = State::default();
        state.ops.topology = Some(TopologyRecord {
            version: 1,
            spec,
            applied_at_unix_ms: 0,
            applied_by: "t".into(),
        });
        state.ops.clusters.insert(
            "yeslocker".into(),
            ClusterState {
                primary_host: "sh-db-1".into(),
                epoch: 2,
                last_failover_unix_ms: 1,
            },
        );
        let f = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (format!("pg.{k}"), (*v).to_owned()))
                .collect::<HashMap<_, _>>()
        };
        let fenced = f(&[("role", "stopped"), ("fenced", "true")]);
        let primary = f(&[("role", "primary"), ("fenced", "false")]);
        let notes = member_notes(&state, |h| match h {
            "bj-db-1" => Some(fenced.clone()),
            "sh-db-1" => Some(primary.clone()),
            _ => None,
        });
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("bj-db-1 (beijing) is fenced"),
            "{notes:?}"
        );
        assert!(
            notes[0].contains("drctl failover --to beijing"),
            "{notes:?}"
        );
        let notes = member_notes(&state, |_| Some(primary.clone()));
        assert!(notes.iter().any(|n| n.starts_with("DANGER")), "{notes:?}");
        assert!(member_notes(&State::default(), |_| None).is_empty());
    }

    #[test]
    fn lsn_and_lease_math() {
        assert_eq!(parse_lsn("0/3000028"), Some(0x300_0028));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("zz"), None);
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(lease_safe_at(None, t0, s, s), t0 + 2 * s);
        assert_eq!(lease_safe_at(Some(t0 + s), t0, s, s), t0 + 3 * s);
    }
}
