//! What traffic should look like: per region, which endpoints carry which share (percent).
//!
//! A [`TrafficPlan`] is the one input every provider understands, so the failover plan can say
//! "beijing 0, shanghai 100" once and have DNS, nginx, a webhook and an exec hook all agree. The
//! DRP's verbs map onto it as pure functions, so they are unit-tested without any provider:
//!
//! | DRP line                                   | plan operation                                   |
//! |--------------------------------------------|--------------------------------------------------|
//! | `update-dns --target dr-site`              | `plan.enable_traffic(&shanghai, Percent::FULL)`  |
//! | `update-load-balancer --remove-region bj`  | `plan.remove_region(&beijing)`                   |
//! | `enable-traffic --percentage 100`          | `plan.enable_traffic(&shanghai, Percent::FULL)`  |
//!
//! Invariants, enforced when a plan is built or deserialized (so a plan value is always valid):
//! weights sum to exactly 100, every region with a non-zero weight has at least one endpoint, and
//! no endpoint appears twice. A plan that sends traffic nowhere is refused: on DNS it would delete
//! the record set, which is an outage, not a failover.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A region name such as `beijing` or `shanghai`: lowercase ASCII letters, digits and `-`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Region(String);

impl Region {
    /// Validates a region name.
    pub fn new(name: impl Into<String>) -> Result<Self, PlanError> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(name))
        } else {
            Err(PlanError::BadRegion(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as it appears in environment variable names: `dr-site` → `DR_SITE`.
    pub fn env_suffix(&self) -> String {
        self.0.to_ascii_uppercase().replace('-', "_")
    }
}

impl TryFrom<String> for Region {
    type Error = PlanError;
    fn try_from(s: String) -> Result<Self, PlanError> {
        Self::new(s)
    }
}

impl From<Region> for String {
    fn from(r: Region) -> String {
        r.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An address traffic can be sent to. What it must look like depends on the provider: DNS needs a
/// bare IP address (`127.0.0.10`, `::1`), nginx a `host:port`. The plan only guarantees that it
/// is a single token that cannot break out of a config file (no whitespace, `;`, braces, quotes
/// or `#`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint(String);

impl Endpoint {
    pub fn new(addr: impl Into<String>) -> Result<Self, PlanError> {
        let addr = addr.into();
        let ok = !addr.is_empty()
            && addr.len() <= 300
            && addr.chars().all(|c| {
                c.is_ascii_graphic() && !matches!(c, ';' | '{' | '}' | '"' | '\'' | '#' | '\\')
            });
        if ok {
            Ok(Self(addr))
        } else {
            Err(PlanError::BadEndpoint(addr))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Endpoint {
    type Error = PlanError;
    fn try_from(s: String) -> Result<Self, PlanError> {
        Self::new(s)
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.0
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A share of traffic, 0..=100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Percent(u8);

impl Percent {
    pub const ZERO: Percent = Percent(0);
    pub const FULL: Percent = Percent(100);

    pub fn new(p: u8) -> Result<Self, PlanError> {
        if p <= 100 {
            Ok(Self(p))
        } else {
            Err(PlanError::BadPercent(p))
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for Percent {
    type Error = PlanError;
    fn try_from(p: u8) -> Result<Self, PlanError> {
        Self::new(p)
    }
}

impl From<Percent> for u8 {
    fn from(p: Percent) -> u8 {
        p.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

/// One region's part of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionTraffic {
    pub endpoints: Vec<Endpoint>,
    pub weight: Percent,
}

/// Why a plan was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid region name {0:?}: use lowercase letters, digits and '-'")]
    BadRegion(String),
    #[error("invalid endpoint {0:?}: use an address such as 10.0.0.5 or 10.0.0.5:8080")]
    BadEndpoint(String),
    #[error("invalid percentage {0}: must be 0..=100")]
    BadPercent(u8),
    #[error("plan has no regions")]
    Empty,
    #[error("weights sum to {0}%, must be exactly 100%")]
    BadSum(u32),
    #[error("region {0} has weight > 0 but no endpoints")]
    NoEndpoints(Region),
    #[error("endpoint {0} appears more than once in the plan")]
    DuplicateEndpoint(Endpoint),
    #[error("region {0} is not in the plan")]
    UnknownRegion(Region),
    #[error("cannot move {0}% away from {1}: no other region has endpoints to take it")]
    NowhereToGo(u8, Region),
}

/// Per region: which endpoints get which share. Always valid (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPlan", into = "RawPlan")]
pub struct TrafficPlan {
    regions: BTreeMap<Region, RegionTraffic>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    regions: BTreeMap<Region, RegionTraffic>,
}

impl TryFrom<RawPlan> for TrafficPlan {
    type Error = PlanError;
    fn try_from(raw: RawPlan) -> Result<Self, PlanError> {
        Self::new(raw.regions)
    }
}

impl From<TrafficPlan> for RawPlan {
    fn from(p: TrafficPlan) -> RawPlan {
        RawPlan { regions: p.regions }
    }
}

impl TrafficPlan {
    /// Builds and validates a plan.
    pub fn new(regions: BTreeMap<Region, RegionTraffic>) -> Result<Self, PlanError> {
        if regions.is_empty() {
            return Err(PlanError::Empty);
        }
        let sum: u32 = regions.values().map(|r| u32::from(r.weight.get())).sum();
        if sum != 100 {
            return Err(PlanError::BadSum(sum));
        }
        let mut seen = BTreeSet::new();
        for (region, rt) in &regions {
            if rt.weight.get() > 0 && rt.endpoints.is_empty() {
                return Err(PlanError::NoEndpoints(region.clone()));
            }
            for e in &rt.endpoints {
                if !seen.insert(e) {
                    return Err(PlanError::DuplicateEndpoint(e.clone()));
                }
            }
        }
        Ok(Self { regions })
    }

    /// All traffic to `target`, none elsewhere (`update-dns --target dr-site`).
    pub fn all_to(
        target: &Region,
        endpoints: &BTreeMap<Region, Vec<Endpoint>>,
    ) -> Result<Self, PlanError> {
        if !endpoints.contains_key(target) {
            return Err(PlanError::UnknownRegion(target.clone()));
        }
        let regions = endpoints
            .iter()
            .map(|(r, eps)| {
                let weight = if r == target {
                    Percent::FULL
                } else {
                    Percent::ZERO
                };
                (
                    r.clone(),
                    RegionTraffic {
                        endpoints: eps.clone(),
                        weight,
                    },
                )
            })
            .collect();
        Self::new(regions)
    }

    pub fn regions(&self) -> &BTreeMap<Region, RegionTraffic> {
        &self.regions
    }

    pub fn weight_of(&self, region: &Region) -> Option<Percent> {
        self.regions.get(region).map(|r| r.weight)
    }

    /// Regions that receive traffic, in name order.
    pub fn active_regions(&self) -> Vec<&Region> {
        self.regions
            .iter()
            .filter(|(_, r)| r.weight.get() > 0)
            .map(|(r, _)| r)
            .collect()
    }

    /// The region an endpoint belongs to.
    pub fn region_of(&self, endpoint: &Endpoint) -> Option<&Region> {
        self.regions
            .iter()
            .find(|(_, r)| r.endpoints.contains(endpoint))
            .map(|(r, _)| r)
    }

    /// Gives `region` exactly `pct` and shares the rest among the other regions in proportion to
    /// their current weights (evenly if they all have 0). `enable-traffic --percentage N`.
    pub fn enable_traffic(&self, region: &Region, pct: Percent) -> Result<Self, PlanError> {
        if !self.regions.contains_key(region) {
            return Err(PlanError::UnknownRegion(region.clone()));
        }
        let rest = 100 - pct.get();
        let others: Vec<(&Region, u8)> = self
            .regions
            .iter()
            .filter(|(r, rt)| *r != region && !rt.endpoints.is_empty())
            .map(|(r, rt)| (r, rt.weight.get()))
            .collect();
        if rest > 0 && others.is_empty() {
            return Err(PlanError::NowhereToGo(rest, region.clone()));
        }
        let shares = distribute(rest, &others.iter().map(|(_, w)| *w).collect::<Vec<_>>());
        let mut regions = self.regions.clone();
        for (rt_region, rt) in regions.iter_mut() {
            rt.weight = if rt_region == region {
                pct
            } else {
                match others.iter().position(|(r, _)| *r == rt_region) {
                    Some(i) => Percent(shares[i]),
                    None => Percent::ZERO,
                }
            };
        }
        Self::new(regions)
    }

    /// Takes all traffic away from `region` and shares it among the others in proportion to
    /// their weights (evenly if they all have 0). `update-load-balancer --remove-region R`.
    pub fn remove_region(&self, region: &Region) -> Result<Self, PlanError> {
        self.enable_traffic(region, Percent::ZERO)
    }

    /// Hex SHA-256 of the canonical JSON form: the idempotency key of this plan. Regions are in a
    /// `BTreeMap` and fields in declaration order, so equal plans hash equally.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).expect("a plan always serializes");
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &json).as_ref())
    }
}

/// Splits `total` percent over `weights` proportionally (evenly if all are 0), using the largest
/// remainder so the parts always sum to `total`.
fn distribute(total: u8, weights: &[u8]) -> Vec<u8> {
    if weights.is_empty() {
        return Vec::new();
    }
    let w: Vec<u32> = if weights.iter().all(|w| *w == 0) {
        vec![1; weights.len()]
    } else {
        weights.iter().map(|w| u32::from(*w)).collect()
    };
    let sum: u32 = w.iter().sum();
    let total = u32::from(total);
    let mut parts: Vec<u32> = w.iter().map(|wi| total * wi / sum).collect();
    let mut rems: Vec<(u32, usize)> = w
        .iter()
        .enumerate()
        .map(|(i, wi)| (total * wi % sum, i))
        .collect();
    // Largest remainder first; ties go to the earlier (name-ordered) region.
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut left = total - parts.iter().sum::<u32>();
    for (_, i) in rems {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    debug_assert_eq!(parts.iter().sum::<u32>(), total);
    parts
        .into_iter()
        .map(|p| u8::try_from(p).expect("a part of at most 100"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Region {
        Region::new(s).unwrap()
    }
    fn e(s: &str) -> Endpoint {
        Endpoint::new(s).unwrap()
    }

    fn two_regions(bj: u8, sh: u8) -> TrafficPlan {
        let mut m = BTreeMap::new();
        m.insert(
            r("beijing"),
            RegionTraffic {
                endpoints: vec![e("127.0.0.10")],
                weight: Percent::new(bj).unwrap(),
            },
        );
        m.insert(
            r("shanghai"),
            RegionTraffic {
                endpoints: vec![e("127.0.0.20")],
                weight: Percent::new(sh).unwrap(),
            },
        );
        TrafficPlan::new(m).unwrap()
    }

    #[test]
    fn drp_verbs_map_onto_weights() {
        let normal = two_regions(100, 0);
        let failed_over = normal
            .enable_traffic(&r("shanghai"), Percent::FULL)
            .unwrap();
        assert_eq!(failed_over, two_regions(0, 100));
        assert_eq!(
            normal.remove_region(&r("beijing")).unwrap(),
            two_regions(0, 100)
        );
        let canary = normal
            .enable_traffic(&r("shanghai"), Percent::new(10).unwrap())
            .unwrap();
        assert_eq!(canary, two_regions(90, 10));
        assert_eq!(canary.active_regions(), vec![&r("beijing"), &r("shanghai")]);
        let eps = BTreeMap::from([
            (r("beijing"), vec![e("127.0.0.10")]),
            (r("shanghai"), vec![e("127.0.0.20")]),
        ]);
        assert_eq!(
            TrafficPlan::all_to(&r("shanghai"), &eps).unwrap(),
            two_regions(0, 100)
        );
    }

    #[test]
    fn remainder_is_distributed_exactly() {
        assert_eq!(distribute(100, &[0, 0, 0]), vec![34, 33, 33]);
        assert_eq!(distribute(100, &[1, 1]), vec![50, 50]);
        assert_eq!(distribute(90, &[70, 30]), vec![63, 27]);
        assert_eq!(distribute(0, &[5]), vec![0]);
    }

    #[test]
    fn invalid_plans_are_refused() {
        let err = serde_json::from_str::<TrafficPlan>(
            r#"{"regions":{"beijing":{"endpoints":["a"],"weight":50}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("sum to 50%"), "{err}");
        let err = serde_json::from_str::<TrafficPlan>(
            r#"{"regions":{"beijing":{"endpoints":[],"weight":100}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("no endpoints"), "{err}");
        let err = serde_json::from_str::<TrafficPlan>(
            r#"{"regions":{"beijing":{"endpoints":["a"],"weight":101}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("0..=100"), "{err}");
        let err = serde_json::from_str::<TrafficPlan>(
            r#"{"regions":{"beijing":{"endpoints":["a;b"],"weight":100}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("invalid endpoint"), "{err}");
        let err = serde_json::from_str::<TrafficPlan>(
            r#"{"regions":{"bj":{"endpoints":["a"],"weight":50},"sh":{"endpoints":["a"],"weight":50}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("more than once"), "{err}");
        let err = serde_json::from_str::<TrafficPlan>(
            r#"{"regions":{"bj":{"endpoints":["a"],"weight":100}},"x":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let lone = TrafficPlan::new(BTreeMap::from([(
            r("beijing"),
            RegionTraffic {
                endpoints: vec![e("a")],
                weight: Percent::FULL,
            },
        )]))
        .unwrap();
        assert_eq!(
            lone.remove_region(&r("beijing")),
            Err(PlanError::NowhereToGo(100, r("beijing")))
        );
    }

    #[test]
    fn digest_is_stable_and_json_round_trips() {
        let p = two_regions(0, 100);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"regions":{"beijing":{"endpoints":["127.0.0.10"],"weight":0},"shanghai":{"endpoints":["127.0.0.20"],"weight":100}}}"#
        );
        let back: TrafficPlan = serde_json::from_str(&json).unwrap();
        assert_eq!(back.digest(), p.digest());
        assert_ne!(p.digest(), two_regions(100, 0).digest());
    }
}
