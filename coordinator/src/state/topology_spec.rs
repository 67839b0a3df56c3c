//! The declared topology (`drctl apply -f topology.toml`): regions, sites, hosts, database
//! clusters, services, traffic providers and the failover policy.
//!
//! Why in the Raft state: failover decisions (which region is primary, which replica may be
//! promoted, which tier's RPO applies, whether automatic failover is allowed at all) must be
//! taken on the same picture by whichever coordinator leads. The file is parsed and
//! validated by the API layer ([`TopologySpec::parse`]) and validated AGAIN in `apply`, so a
//! spec in the log is always valid; each apply bumps the version.
//!
//! Validation refuses, with the offending name: unknown regions/sites/hosts, duplicate
//! names, a database cluster whose members sit in one region only (a regional failure would
//! take all of them), an initial primary that is not a member, a traffic provider on an
//! unknown host.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Current topology file format.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    /// File format version, must be [`FORMAT_VERSION`].
    pub version: u32,
    pub name: String,
    #[serde(default)]
    pub regions: Vec<RegionSpec>,
    #[serde(default)]
    pub sites: Vec<SiteSpec>,
    #[serde(default)]
    pub hosts: Vec<HostSpec>,
    #[serde(default)]
    pub db_clusters: Vec<DbClusterSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub traffic: Vec<TrafficProviderSpec>,
    #[serde(default)]
    pub failover: FailoverPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionKind {
    Primary,
    Secondary,
    /// Holds a coordinator only: the third failure domain that breaks ties.
    Witness,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    pub name: String,
    pub kind: RegionKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub name: String,
    pub region: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub host_id: String,
    pub region: String,
    #[serde(default)]
    pub site: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    Critical,
    Important,
    NonCritical,
}

impl Tier {
    /// The DRP's defaults: critical RPO 5 min / RTO 2 h, important 15 min / 4 h,
    /// non-critical 1 h / 8 h.
    pub fn default_rpo(self) -> Duration {
        match self {
            Tier::Critical => Duration::from_secs(5 * 60),
            Tier::Important => Duration::from_secs(15 * 60),
            Tier::NonCritical => Duration::from_secs(60 * 60),
        }
    }
    pub fn default_rto(self) -> Duration {
        match self {
            Tier::Critical => Duration::from_secs(2 * 3600),
            Tier::Important => Duration::from_secs(4 * 3600),
            Tier::NonCritical => Duration::from_secs(8 * 3600),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSpec {
    /// Replication slot per member host (the slot the member streams from when a replica).
    #[serde(default)]
    pub slots: BTreeMap<String, String>,
    /// `application_name` the replicas use (synchronous_standby_names refers to it).
    #[serde(default)]
    pub application_name: String,
    /// Per member: the libpq conninfo replicas use to stream from it when it is primary
    /// (`pg.configure-standby {primary}`), e.g. "host=10.20.1.5 port=5432 user=replicator".
    #[serde(default)]
    pub conninfo: BTreeMap<String, String>,
    /// Wait for the candidate to replay this close to the primary before a planned switch.
    #[serde(default)]
    pub synchronous: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbClusterSpec {
    pub name: String,
    pub members: Vec<String>,
    pub primary: String,
    pub tier: Tier,
    #[serde(default, with = "humantime_serde")]
    pub rpo: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub rto: Option<Duration>,
    #[serde(default)]
    pub replication: ReplicationSpec,
}

impl DbClusterSpec {
    pub fn rpo(&self) -> Duration {
        self.rpo.unwrap_or_else(|| self.tier.default_rpo())
    }
    pub fn rto(&self) -> Duration {
        self.rto.unwrap_or_else(|| self.tier.default_rto())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub tier: Tier,
    #[serde(default, with = "humantime_serde")]
    pub rpo: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub rto: Option<Duration>,
    /// Hosts that run it (explicit) ...
    #[serde(default)]
    pub hosts: Vec<String>,
    /// ... or every host with one of these roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The agent's service name for start/stop (defaults to `name`).
    #[serde(default)]
    pub agent_service: String,
    /// Smoke tests (agent `[smoke]` names) run after a failover.
    #[serde(default)]
    pub smoke_tests: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficProviderSpec {
    pub name: String,
    /// Provider kind as the agent knows it: dns, nginx, webhook, exec.
    pub kind: String,
    /// The agent host that executes this provider.
    pub host: String,
    /// Per region: the endpoints that serve it.
    #[serde(default)]
    pub endpoints: BTreeMap<String, Vec<String>>,
    /// Passed through to the agent as-is.
    #[serde(default)]
    pub config: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverPolicy {
    #[serde(default = "d_true")]
    pub automatic: bool,
    #[serde(default = "d_detect_after", with = "humantime_serde")]
    pub detect_after: Duration,
    /// The primary's lease; the agent fences itself when it runs out.
    #[serde(default = "d_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// Clock-rate margin; default 10 % of the lease plus 200 ms.
    #[serde(default, with = "humantime_serde")]
    pub drift_margin: Option<Duration>,
    #[serde(default = "d_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
}

fn d_true() -> bool {
    true
}
fn d_detect_after() -> Duration {
    Duration::from_secs(3)
}
fn d_lease() -> Duration {
    Duration::from_secs(4)
}
fn d_cooldown() -> Duration {
    Duration::from_secs(600)
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        FailoverPolicy {
            automatic: true,
            detect_after: d_detect_after(),
            lease: d_lease(),
            drift_margin: None,
            cooldown: d_cooldown(),
        }
    }
}

impl FailoverPolicy {
    pub fn drift_margin(&self) -> Duration {
        self.drift_margin
            .unwrap_or_else(|| self.lease / 10 + Duration::from_millis(200))
    }
}

/// Why a topology was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot parse topology: {0}")]
    Parse(String),
    #[error("topology format version {0} is not supported (use version = {FORMAT_VERSION})")]
    Version(u32),
    #[error("{kind} `{name}` is declared twice")]
    Duplicate { kind: &'static str, name: String },
    #[error("{what} refers to unknown {kind} `{name}`")]
    Unknown {
        what: String,
        kind: &'static str,
        name: String,
    },
    #[error(
        "database cluster `{cluster}` has all its members in region {region}: a regional failure would take every copy; add a member in another region"
    )]
    OneRegion { cluster: String, region: String },
    #[error("database cluster `{cluster}`: primary `{primary}` is not one of its members")]
    PrimaryNotMember { cluster: String, primary: String },
    #[error("{0}")]
    Invalid(String),
}

impl TopologySpec {
    /// Parses and validates a topology file.
    pub fn parse(text: &str) -> Result<Self, TopologyError> {
        let spec: TopologySpec =
            toml::from_str(text).map_err(|e| TopologyError::Parse(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn region(&self, name: &str) -> Option<&RegionSpec> {
        self.regions.iter().find(|r| r.name == name)
    }
    pub fn host(&self, id: &str) -> Option<&HostSpec> {
        self.hosts.iter().find(|h| h.host_id == id)
    }
    pub fn cluster(&self, name: &str) -> Option<&DbClusterSpec> {
        self.db_clusters.iter().find(|c| c.name == name)
    }
    pub fn has_witness(&self) -> bool {
        self.regions.iter().any(|r| r.kind == RegionKind::Witness)
    }
    /// Region of a host per the spec (empty when unknown).
    pub fn region_of(&self, host: &str) -> &str {
        self.host(host).map(|h| h.region.as_str()).unwrap_or("")
    }
    /// Hosts that run `svc`, in host-id order.
    pub fn service_hosts(&self, svc: &ServiceSpec) -> Vec<&HostSpec> {
        let mut v: Vec<&HostSpec> = self
            .hosts
            .iter()
            .filter(|h| {
                svc.hosts.contains(&h.host_id) || h.roles.iter().any(|r| svc.roles.contains(r))
            })
            .collect();
        v.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        v
    }

    /// Warnings that do not stop an apply.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let data_regions = self
            .regions
            .iter()
            .filter(|r| r.kind != RegionKind::Witness)
            .count();
        if self.failover.automatic && !self.has_witness() && data_regions <= 2 {
            w.push(format!(
                "topology `{}` has {data_regions} region(s) and no witness: automatic failover is refused (no side can tell a dead peer from a cut link); only `drctl failover --force` is offered",
                self.name
            ));
        }
        w
    }

    pub fn validate(&self) -> Result<(), TopologyError> {
        if self.version != FORMAT_VERSION {
            return Err(TopologyError::Version(self.version));
        }
        if self.name.trim().is_empty() {
            return Err(TopologyError::Invalid("topology needs a name".into()));
        }
        let mut regions = BTreeSet::new();
        for r in &self.regions {
            if !regions.insert(r.name.as_str()) {
                return Err(dup("region", &r.name));
            }
        }
        if !self.regions.iter().any(|r| r.kind == RegionKind::Primary) {
            return Err(TopologyError::Invalid(
                "no region has kind = \"primary\"".into(),
            ));
        }
        let unknown = |what: String, kind: &'static str, name: &str| TopologyError::Unknown {
            what,
            kind,
            name: name.to_owned(),
        };
        let mut sites = BTreeMap::new();
        for s in &self.sites {
            if !regions.contains(s.region.as_str()) {
                return Err(unknown(format!("site `{}`", s.name), "region", &s.region));
            }
            if sites.insert(s.name.as_str(), s.region.as_str()).is_some() {
                return Err(dup("site", &s.name));
            }
        }
        let mut hosts = BTreeSet::new();
        for h in &self.hosts {
            if h.host_id.is_empty() {
                return Err(TopologyError::Invalid("a host has an empty host_id".into()));
            }
            if !hosts.insert(h.host_id.as_str()) {
                return Err(dup("host", &h.host_id));
            }
            if !regions.contains(h.region.as_str()) {
                return Err(unknown(
                    format!("host `{}`", h.host_id),
                    "region",
                    &h.region,
                ));
            }
            if !h.site.is_empty() {
                match sites.get(h.site.as_str()) {
                    None => return Err(unknown(format!("host `{}`", h.host_id), "site", &h.site)),
                    Some(r) if *r != h.region => {
                        return Err(TopologyError::Invalid(format!(
                            "host `{}` is in region {} but its site {} is in region {r}",
                            h.host_id, h.region, h.site
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        let mut clusters = BTreeSet::new();
        for c in &self.db_clusters {
            if !clusters.insert(c.name.as_str()) {
                return Err(dup("database cluster", &c.name));
            }
            if c.members.len() < 2 {
                return Err(TopologyError::Invalid(format!(
                    "database cluster `{}` needs at least two members (a primary and a replica)",
                    c.name
                )));
            }
            let mut member_regions = BTreeSet::new();
            for m in &c.members {
                let Some(h) = self.host(m) else {
                    return Err(unknown(format!("database cluster `{}`", c.name), "host", m));
                };
                member_regions.insert(h.region.as_str());
            }
            if !c.members.contains(&c.primary) {
                return Err(TopologyError::PrimaryNotMember {
                    cluster: c.name.clone(),
                    primary: c.primary.clone(),
                });
            }
            if member_regions.len() < 2 {
                return Err(TopologyError::OneRegion {
                    cluster: c.name.clone(),
                    region: member_regions.into_iter().next().unwrap_or("").to_owned(),
                });
            }
            for h in c.replication.slots.keys() {
                if !c.members.contains(h) {
                    return Err(TopologyError::Invalid(format!(
                        "database cluster `{}`: replication slot for `{h}`, which is not a member",
                        c.name
                    )));
                }
            }
        }
        let mut services = BTreeSet::new();
        for s in &self.services {
            if !services.insert(s.name.as_str()) {
                return Err(dup("service", &s.name));
            }
            for h in &s.hosts {
                if !hosts.contains(h.as_str()) {
                    return Err(unknown(format!("service `{}`", s.name), "host", h));
                }
            }
        }
        let mut providers = BTreeSet::new();
        for t in &self.traffic {
            if !providers.insert(t.name.as_str()) {
                return Err(dup("traffic provider", &t.name));
            }
            if !hosts.contains(t.host.as_str()) {
                return Err(unknown(
                    format!("traffic provider `{}`", t.name),
                    "host",
                    &t.host,
                ));
            }
            for r in t.endpoints.keys() {
                if !regions.contains(r.as_str()) {
                    return Err(unknown(
                        format!("traffic provider `{}`", t.name),
                        "region",
                        r,
                    ));
                }
            }
        }
        if self.failover.lease.is_zero() || self.failover.detect_after.is_zero() {
            return Err(TopologyError::Invalid(
                "failover.lease and failover.detect_after must be positive".into(),
            ));
        }
        Ok(())
    }
}

fn dup(kind: &'static str, name: &str) -> TopologyError {
    TopologyError::Duplicate {
        kind,
        name: name.to_owned(),
    }
}

/// Structural diff, one line per changed entity: `+` added, `-` removed, `~` changed.
pub fn diff(old: Option<&TopologySpec>, new: &TopologySpec) -> Vec<String> {
    fn keyed<T: Serialize>(items: &[T], key: impl Fn(&T) -> &str) -> BTreeMap<String, String> {
        items
            .iter()
            .map(|i| {
                (
                    key(i).to_owned(),
                    serde_json::to_string(i).unwrap_or_default(),
                )
            })
            .collect()
    }
    fn section(
        out: &mut Vec<String>,
        kind: &str,
        old: BTreeMap<String, String>,
        new: BTreeMap<String, String>,
    ) {
        for (k, v) in &new {
            match old.get(k) {
                None => out.push(format!("+ {kind} {k}")),
                Some(o) if o != v => out.push(format!("~ {kind} {k}: {o} -> {v}")),
                Some(_) => {}
            }
        }
        for k in old.keys().filter(|k| !new.contains_key(*k)) {
            out.push(format!("- {kind} {k}"));
        }
    }
    let empty = TopologySpec {
        version: FORMAT_VERSION,
        name: String::new(),
        regions: vec![],
        sites: vec![],
        hosts: vec![],
        db_clusters: vec![],
        services: vec![],
        traffic: vec![],
        failover: FailoverPolicy::default(),
    };
    let o = old.unwrap_or(&empty);
    let mut out = Vec::new();
    if old.is_some() && o.name != new.name {
        out.push(format!("~ name: {:?} -> {:?}", o.name, new.name));
    }
    section(
        &mut out,
        "region",
        keyed(&o.regions, |r| &r.name),
        keyed(&new.regions, |r| &r.name),
    );
    section(
        &mut out,
        "site",
        keyed(&o.sites, |r| &r.name),
        keyed(&new.sites, |r| &r.name),
    );
    section(
        &mut out,
        "host",
        keyed(&o.hosts, |r| &r.host_id),
        keyed(&new.hosts, |r| &r.host_id),
    );
    section(
        &mut out,
        "db_cluster",
        keyed(&o.db_clusters, |r| &r.name),
        keyed(&new.db_clusters, |r| &r.name),
    );
    section(
        &mut out,
        "service",
        keyed(&o.services, |r| &r.name),
        keyed(&new.services, |r| &r.name),
    );
    section(
        &mut out,
        "traffic",
        keyed(&o.traffic, |r| &r.name),
        keyed(&new.traffic, |r| &r.name),
    );
    if old.is_none() || o.failover != new.failover {
        out.push(format!(
            "{} failover policy: {}",
            if old.is_none() { "+" } else { "~" },
            serde_json::to_string(&new.failover).unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str =
        include_str!("../../../deploy/examples/yeslocker/topology.toml");

    #[test]
    fn example_parses_and_validates() {
        let t = TopologySpec::parse(EXAMPLE).expect("example topology is valid");
        assert!(t.has_witness());
        assert!(t.warnings().is_empty(), "{:?}", t.warnings());
        let c = t.cluster("yeslocker").expect("cluster");
        assert_eq!(c.rpo(), Duration::from_secs(300));
        assert_eq!(t.region_of(&c.primary), "beijing");
        assert!(diff(None, &t).iter().all(|l| l.starts_with('+')));
        assert!(diff(Some(&t), &t).is_empty());
    }

    #[test]
    fn refusals_name_the_culprit() {
        let mut t = TopologySpec::parse(EXAMPLE).expect("valid");
        t.db_clusters[0].members.push("ghost".into());
        let e = t.validate().unwrap_err();
        assert!(e.to_string().contains("unknown host `ghost`"), "{e}");

        let mut t = TopologySpec::parse(EXAMPLE).expect("valid");
        let bj: Vec<String> = t
            .hosts
            .iter()
            .filter(|h| h.region == "beijing")
            .map(|h| h.host_id.clone())
            .collect();
        t.db_clusters[0].members = bj.clone();
        t.db_clusters[0].primary = bj[0].clone();
        t.db_clusters[0].replication.slots.clear();
        assert!(matches!(t.validate(), Err(TopologyError::OneRegion { .. })));

        let e = TopologySpec::parse("version = 1\nname = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(matches!(e, TopologyError::Parse(_)));
    }

    #[test]
    fn two_regions_without_witness_warns() {
        let mut t = TopologySpec::parse(EXAMPLE).expect("valid");
        t.regions.retain(|r| r.kind != RegionKind::Witness);
        t.hosts
            .retain(|h| t.regions.iter().any(|r| r.name == h.region));
        t.sites
            .retain(|s| t.regions.iter().any(|r| r.name == s.region));
        t.validate().expect("still valid");
        assert!(t.warnings()[0].contains("no witness"));
    }
}
