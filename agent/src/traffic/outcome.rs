//! What an apply changed ([`Applied`]) and what a provider currently serves ([`TrafficState`]).
//!
//! Both are serializable because they go straight into the audit log and into the failover
//! plan's step record. Weights here are the provider's own: nginx `weight=` (0 means `down`),
//! DNS 1 for "the address is in the record set" (DNS has no weights).

use serde::{Deserialize, Serialize};

use super::plan::{Endpoint, Region, TrafficPlan};

/// One endpoint as a provider serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    pub endpoint: Endpoint,
    /// Provider-native weight; 0 means present but receiving nothing (nginx `down`).
    pub weight: u32,
}

/// What a provider serves right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficState {
    pub provider: String,
    pub kind: String,
    /// Read back from the target (DNS server, upstream file); empty for webhook and exec, which
    /// cannot observe the far side.
    pub endpoints: Vec<EndpointState>,
    /// Digest of the last plan this process applied successfully, if any.
    pub last_applied: Option<String>,
}

/// One difference between the old and the new state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Added {
        region: Option<Region>,
        endpoint: Endpoint,
        weight: u32,
    },
    Removed {
        region: Option<Region>,
        endpoint: Endpoint,
        weight: u32,
    },
    Reweighted {
        region: Option<Region>,
        endpoint: Endpoint,
        from: u32,
        to: u32,
    },
    /// The plan was handed to a webhook or an exec hook, which accepted it. What it changed on
    /// its side is its own business.
    Delivered { target: String },
}

/// The result of [`super::TrafficProvider::apply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub provider: String,
    pub kind: String,
    pub plan_digest: String,
    /// False when the provider already served this plan: nothing was written or sent.
    pub changed: bool,
    pub changes: Vec<Change>,
    /// Caveats the operator should see, e.g. "dns has no weights".
    pub notes: Vec<String>,
}

/// The changes that turn `current` into `desired`, attributed to the plan's regions.
/// Output order: by endpoint.
pub(crate) fn diff(
    plan: &TrafficPlan,
    current: &[EndpointState],
    desired: &[EndpointState],
) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut all: Vec<&Endpoint> = current
        .iter()
        .chain(desired.iter())
        .map(|s| &s.endpoint)
        .collect();
    all.sort();
    all.dedup();
    for ep in all {
        let region = plan.region_of(ep).cloned();
        let cur = current.iter().find(|s| &s.endpoint == ep).map(|s| s.weight);
        let want = desired.iter().find(|s| &s.endpoint == ep).map(|s| s.weight);
        match (cur, want) {
            (None, Some(w)) => changes.push(Change::Added {
                region,
                endpoint: ep.clone(),
                weight: w,
            }),
            (Some(w), None) => changes.push(Change::Removed {
                region,
                endpoint: ep.clone(),
                weight: w,
            }),
            (Some(from), Some(to)) if from != to => changes.push(Change::Reweighted {
                region,
                endpoint: ep.clone(),
                from,
                to,
            }),
            _ => {}
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::plan::{Percent, RegionTraffic};
    use super::*;

    #[test]
    fn diff_names_regions_and_skips_equal() {
        let e = |s: &str| Endpoint::new(s).unwrap();
        let st = |s: &str, w| EndpointState {
            endpoint: e(s),
            weight: w,
        };
        let plan = TrafficPlan::new(BTreeMap::from([
            (
                Region::new("beijing").unwrap(),
                RegionTraffic {
                    endpoints: vec![e("a"), e("c")],
                    weight: Percent::ZERO,
                },
            ),
            (
                Region::new("shanghai").unwrap(),
                RegionTraffic {
                    endpoints: vec![e("b")],
                    weight: Percent::FULL,
                },
            ),
        ]))
        .unwrap();
        let changes = diff(
            &plan,
            &[st("a", 1), st("c", 5), st("z", 1)],
            &[st("b", 1), st("c", 0)],
        );
        let json = serde_json::to_string(&changes).unwrap();
        assert_eq!(
            json,
            r#"[{"change":"removed","region":"beijing","endpoint":"a","weight":1},{"change":"added","region":"shanghai","endpoint":"b","weight":1},{"change":"reweighted","region":"beijing","endpoint":"c","from":5,"to":0},{"change":"removed","region":null,"endpoint":"z","weight":1}]"#
        );
        assert!(diff(&plan, &[st("b", 1)], &[st("b", 1)]).is_empty());
    }
}
