//! Hosts as the cluster has decided them: where they are, what they do, whether they are
//! up, and the last committed state of each of their checks.
//!
//! Only transitions live here. A host that heartbeats with unchanged checks costs no log
//! entry; the live detail (last heartbeat, facts) is in [`crate::registry`].

use std::collections::BTreeMap;
use std::fmt;

use dr_proto::pb;
use serde::{Deserialize, Serialize};

/// Committed liveness of a host.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Known but never decided (kept for hosts registered by other means, e.g. topology
    /// imports in a later issue).
    #[default]
    Unknown,
    Up,
    Down,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Unknown => "unknown",
            HostState::Up => "up",
            HostState::Down => "down",
        }
    }
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Host {
    pub host_id: String,
    pub region: String,
    pub site: String,
    pub roles: Vec<String>,
    pub version: String,
    /// Random per agent process start, from its Hello.
    pub incarnation: u64,
    pub state: HostState,
    pub state_since_unix_ms: i64,
    /// Why the host went down (empty while up).
    pub down_reason: String,
    /// Committed check states by check name.
    pub checks: BTreeMap<String, CheckRecord>,
}

impl Host {
    /// Whether the host matches a selector: empty fields match everything, set fields must
    /// all match.
    pub fn matches(&self, sel: &pb::Selector) -> bool {
        (sel.hosts.is_empty() || sel.hosts.iter().any(|h| h == &self.host_id))
            && (sel.region.is_empty() || sel.region == self.region)
            && (sel.site.is_empty() || sel.site == self.site)
            && (sel.role.is_empty() || self.roles.iter().any(|r| r == &sel.role))
    }
}

/// The committed state of one check on one host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckRecord {
    pub name: String,
    pub service: String,
    pub tier: pb::Tier,
    pub state: pb::CheckState,
    pub detail: String,
    /// When the check entered `state` (the observation time reported by the agent, or the
    /// request time when the agent sent none).
    pub since_unix_ms: i64,
}

impl CheckRecord {
    pub fn from_result(r: &pb::CheckResult, at_unix_ms: i64) -> Self {
        CheckRecord {
            name: r.name.clone(),
            service: r.service.clone(),
            tier: pb::Tier::try_from(r.tier).unwrap_or(pb::Tier::Unspecified),
            state: check_state(r),
            detail: r.detail.clone(),
            since_unix_ms: if r.observed_at_unix_ms > 0 {
                r.observed_at_unix_ms
            } else {
                at_unix_ms
            },
        }
    }

    pub fn to_result(&self) -> pb::CheckResult {
        pb::CheckResult {
            name: self.name.clone(),
            service: self.service.clone(),
            tier: self.tier as i32,
            state: self.state as i32,
            detail: self.detail.clone(),
            duration_ms: 0,
            observed_at_unix_ms: self.since_unix_ms,
        }
    }
}

/// The state of a reported check; values this build does not know count as unknown.
pub fn check_state(r: &pb::CheckResult) -> pb::CheckState {
    pb::CheckState::try_from(r.state).unwrap_or(pb::CheckState::Unknown)
}
