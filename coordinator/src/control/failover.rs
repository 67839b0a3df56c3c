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
        }
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
