//! Traffic switching: move users from one region to another during a failover.
//!
//! The DRP switches traffic three ways (`update-dns --target dr-site`,
//! `update-load-balancer --remove-region beijing`, `enable-traffic --percentage 100`), and every
//! site fronts its service differently. So the failover plan speaks one language, a
//! [`TrafficPlan`] (per region: endpoints and a percentage), and each host's agent runs the
//! providers its config lists (`[[traffic]]` entries, [`TrafficConfig`]):
//!
//! | kind      | target                                    | weights?                         |
//! |-----------|-------------------------------------------|----------------------------------|
//! | `dns`     | RFC 2136 UPDATE + TSIG of an A/AAAA set   | no: 0 removes, >0 includes       |
//! | `nginx`   | an `upstream` file + `nginx -t` + reload  | yes: percent → weight, 0 → down  |
//! | `webhook` | POST the plan as JSON (HMAC-signed)       | the receiver's business          |
//! | `exec`    | run a command, plan in env and on stdin   | the command's business           |
//!
//! The DRP's "locker-site gateways repointed" step needs no provider of its own: a gateway is
//! just another agent host, and its `[[traffic]]` entry is an `exec` hook (a local script that
//! rewrites the gateway's upstream) or a `webhook` to the gateway vendor's API.
//!
//! Contract of every provider ([`TrafficProvider`]):
//! - `apply` is idempotent: re-applying the plan the target already serves is a successful no-op
//!   (`Applied::changed == false`), so a new coordinator leader may re-run a half-done step;
//! - `apply` returns what changed ([`Applied`]) for the audit log and the plan's step record;
//! - applies to one provider are serialised by a lock inside the provider;
//! - secrets (TSIG keys, webhook secrets) come from files or the environment map, are never
//!   logged and never appear in errors;
//! - every network or child-process step is bounded by the provider's `timeout`.
//!
//! Cancel safety: dropping an `apply` future may leave the target switched without the
//! `Applied` record (for nginx: the new file written but not yet reloaded, which the next apply
//! repairs only if the plan differs). The caller should let it run to completion; each step is
//! bounded by its timeout.
//!
//! Suggested agent actions (wired by the action registry): `traffic.apply {plan json}` runs
//! [`TrafficProviders::apply_all`], `traffic.status` runs [`TrafficProviders::status_all`].

pub mod dns;
pub mod error;
pub mod exec;
pub mod nginx;
pub mod outcome;
pub mod plan;
pub mod secret;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use serde::{Deserialize, Serialize};
use tracing::error;

pub use dns::{DnsConfig, DnsProvider, TsigAlgorithmName, TsigConfig};
pub use error::{TrafficError, TrafficResult};
pub use exec::{ExecConfig, ExecProvider};
pub use nginx::{NginxConfig, NginxProvider};
pub use outcome::{Applied, Change, EndpointState, TrafficState};
pub use plan::{Endpoint, Percent, PlanError, Region, RegionTraffic, TrafficPlan};
pub use secret::SecretSource;
pub use webhook::{WebhookConfig, WebhookProvider};

/// One way of switching traffic. See the module docs for the contract.
pub trait TrafficProvider: Send + Sync {
    /// The `name` from the config, unique per agent.
    fn name(&self) -> &str;

    /// Makes the target serve `plan`; a no-op success if it already does.
    fn apply(&self, plan: &TrafficPlan) -> impl Future<Output = TrafficResult<Applied>> + Send;

    /// What the target serves now (read back where the target allows it).
    fn current(&self) -> impl Future<Output = TrafficResult<TrafficState>> + Send;
}

impl TrafficProvider for DnsProvider {
    fn name(&self) -> &str {
        DnsProvider::name(self)
    }
    async fn apply(&self, plan: &TrafficPlan) -> TrafficResult<Applied> {
        self.apply_plan(plan).await
    }
    async fn current(&self) -> TrafficResult<TrafficState> {
        self.read_state().await
    }
}

impl TrafficProvider for NginxProvider {
    fn name(&self) -> &str {
        NginxProvider::name(self)
    }
    async fn apply(&self, plan: &TrafficPlan) -> TrafficResult<Applied> {
        self.apply_plan(plan).await
    }
    async fn current(&self) -> TrafficResult<TrafficState> {
        self.read_state().await
    }
}

impl TrafficProvider for WebhookProvider {
    fn name(&self) -> &str {
        WebhookProvider::name(self)
    }
    async fn apply(&self, plan: &TrafficPlan) -> TrafficResult<Applied> {
        self.apply_plan(plan).await
    }
    async fn current(&self) -> TrafficResult<TrafficState> {
        self.read_state().await
    }
}

impl TrafficProvider for ExecProvider {
    fn name(&self) -> &str {
        ExecProvider::name(self)
    }
    async fn apply(&self, plan: &TrafficPlan) -> TrafficResult<Applied> {
        self.apply_plan(plan).await
    }
    async fn current(&self) -> TrafficResult<TrafficState> {
        self.read_state().await
    }
}

/// A `[[traffic]]` entry of the agent config.
///
/// ```toml
/// [[traffic]]
/// kind = "dns"
/// name = "app-dns"
/// server = "10.1.0.53:53"
/// zone = "yeslocker.test"
/// record = "app.yeslocker.test"
/// ttl = 60
/// tsig = { key_name = "dr-agent", secret = { file = "/etc/dr-agent/tsig.key" } }
///
/// [[traffic]]
/// kind = "nginx"
/// name = "edge-lb"
/// upstream_file = "/etc/nginx/dr/yeslocker-upstream.conf"
/// main_config = "/etc/nginx/nginx.conf"
/// pid_file = "/run/nginx.pid"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TrafficConfig {
    Dns(DnsConfig),
    Nginx(NginxConfig),
    Webhook(WebhookConfig),
    Exec(ExecConfig),
}

impl TrafficConfig {
    pub fn name(&self) -> &str {
        match self {
            TrafficConfig::Dns(c) => &c.name,
            TrafficConfig::Nginx(c) => &c.name,
            TrafficConfig::Webhook(c) => &c.name,
            TrafficConfig::Exec(c) => &c.name,
        }
    }
}

/// Any provider, chosen by config. An enum rather than `Box<dyn>`: the trait's futures are not
/// object-safe, and the set of kinds is closed.
#[derive(Debug)]
pub enum AnyTrafficProvider {
    Dns(DnsProvider),
    Nginx(NginxProvider),
    Webhook(WebhookProvider),
    Exec(ExecProvider),
}

impl AnyTrafficProvider {
    /// Builds a provider; reads its secret now, so a missing key fails at startup, not during
    /// the failover. `env` is the process environment as a map.
    pub fn from_config(cfg: TrafficConfig, env: &BTreeMap<String, String>) -> TrafficResult<Self> {
        Ok(match cfg {
            TrafficConfig::Dns(c) => Self::Dns(DnsProvider::from_config(c, env)?),
            TrafficConfig::Nginx(c) => Self::Nginx(NginxProvider::from_config(c)?),
            TrafficConfig::Webhook(c) => Self::Webhook(WebhookProvider::from_config(c, env)?),
            TrafficConfig::Exec(c) => Self::Exec(ExecProvider::from_config(c)?),
        })
    }
}

impl TrafficProvider for AnyTrafficProvider {
    fn name(&self) -> &str {
        match self {
            Self::Dns(p) => p.name(),
            Self::Nginx(p) => p.name(),
            Self::Webhook(p) => p.name(),
            Self::Exec(p) => p.name(),
        }
    }
    async fn apply(&self, plan: &TrafficPlan) -> TrafficResult<Applied> {
        match self {
            Self::Dns(p) => p.apply(plan).await,
            Self::Nginx(p) => p.apply(plan).await,
            Self::Webhook(p) => p.apply(plan).await,
            Self::Exec(p) => p.apply(plan).await,
        }
    }
    async fn current(&self) -> TrafficResult<TrafficState> {
        match self {
            Self::Dns(p) => p.current().await,
            Self::Nginx(p) => p.current().await,
            Self::Webhook(p) => p.current().await,
            Self::Exec(p) => p.current().await,
        }
    }
}

/// One provider's result inside [`TrafficProviders::apply_all`], shaped for JSON replies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderOutcome<T> {
    pub provider: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Retrying the same plan cannot help (see [`TrafficError::is_permanent`]).
    #[serde(default)]
    pub permanent: bool,
}

/// The agent's configured providers, in config order.
#[derive(Debug, Default)]
pub struct TrafficProviders {
    providers: Vec<AnyTrafficProvider>,
}

impl TrafficProviders {
    pub fn from_configs(
        cfgs: Vec<TrafficConfig>,
        env: &BTreeMap<String, String>,
    ) -> TrafficResult<Self> {
        let mut names = BTreeSet::new();
        let mut providers = Vec::with_capacity(cfgs.len());
        for cfg in cfgs {
            if !names.insert(cfg.name().to_owned()) {
                return Err(TrafficError::Config {
                    provider: cfg.name().to_owned(),
                    reason: "two [[traffic]] entries have this name".into(),
                });
            }
            providers.push(AnyTrafficProvider::from_config(cfg, env)?);
        }
        Ok(Self { providers })
    }

    pub fn get(&self, name: &str) -> Option<&AnyTrafficProvider> {
        self.providers.iter().find(|p| p.name() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &AnyTrafficProvider> {
        self.providers.iter()
    }

    /// Applies `plan` with every provider (or only `only`), in config order. A failing provider
    /// does not stop the others: during a failover, DNS switched and the webhook failed is
    /// better than nothing switched; the step fails if any outcome has an error.
    pub async fn apply_all(
        &self,
        plan: &TrafficPlan,
        only: Option<&str>,
    ) -> Vec<ProviderOutcome<Applied>> {
        let mut out = Vec::new();
        for p in self
            .providers
            .iter()
            .filter(|p| only.is_none_or(|n| n == p.name()))
        {
            // Each provider opens its own `traffic_apply` span.
            out.push(outcome(p.name(), p.apply(plan).await));
        }
        out
    }

    /// The current state of every provider.
    pub async fn status_all(&self) -> Vec<ProviderOutcome<TrafficState>> {
        let mut out = Vec::new();
        for p in &self.providers {
            out.push(outcome(p.name(), p.current().await));
        }
        out
    }
}

fn outcome<T>(provider: &str, res: TrafficResult<T>) -> ProviderOutcome<T> {
    match res {
        Ok(v) => ProviderOutcome {
            provider: provider.to_owned(),
            ok: Some(v),
            error: None,
            permanent: false,
        },
        Err(e) => {
            // Logged once here, where the error is turned into a reply.
            error!(provider, error = %e, "traffic provider failed");
            ProviderOutcome {
                provider: provider.to_owned(),
                ok: None,
                permanent: e.is_permanent(),
                error: Some(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        traffic: Vec<TrafficConfig>,
    }

    #[test]
    fn config_entries_parse_and_unknown_fields_are_refused() {
        let cfg: Cfg = toml::from_str(
            r#"
            [[traffic]]
            kind = "dns"
            name = "app-dns"
            server = "127.0.0.1:5353"
            zone = "yeslocker.test"
            record = "app.yeslocker.test"
            tsig = { key_name = "dr-agent", secret = { env = "DR_TSIG" } }
            timeout = "2s"

            [[traffic]]
            kind = "nginx"
            name = "lb"
            upstream_file = "/etc/nginx/dr/up.conf"
            main_config = "/etc/nginx/nginx.conf"

            [[traffic]]
            kind = "webhook"
            name = "cdn"
            url = "https://cdn.example/api/switch"
            secret = { file = "/etc/dr-agent/cdn.secret" }

            [[traffic]]
            kind = "exec"
            name = "gateway"
            program = "/usr/local/bin/repoint-gateway"
            args = ["--site", "locker-7"]
            "#,
        )
        .unwrap();
        assert_eq!(
            cfg.traffic
                .iter()
                .map(TrafficConfig::name)
                .collect::<Vec<_>>(),
            vec!["app-dns", "lb", "cdn", "gateway"]
        );
        let TrafficConfig::Dns(dns) = &cfg.traffic[0] else {
            panic!("first entry is dns")
        };
        assert_eq!(dns.ttl, 60);
        assert_eq!(dns.timeout, std::time::Duration::from_secs(2));

        let err = toml::from_str::<Cfg>(
            r#"
            [[traffic]]
            kind = "exec"
            name = "gateway"
            program = "/bin/true"
            progam = "/bin/false"
            "#,
        )
        .err()
        .expect("typo must be refused")
        .to_string();
        assert!(err.contains("unknown field"), "{err}");
        let err = toml::from_str::<Cfg>("[[traffic]]\nkind = \"carrier-pigeon\"\nname = \"x\"\n")
            .err()
            .expect("unknown kind must be refused")
            .to_string();
        assert!(err.contains("unknown variant"), "{err}");
    }

    #[test]
    fn duplicate_names_and_missing_secrets_fail_at_startup() {
        let exec = |name: &str| {
            TrafficConfig::Exec(ExecConfig {
                name: name.into(),
                program: "/bin/true".into(),
                args: vec![],
                env: BTreeMap::new(),
                working_dir: None,
                timeout: std::time::Duration::from_secs(1),
            })
        };
        let err = TrafficProviders::from_configs(vec![exec("a"), exec("a")], &BTreeMap::new())
            .unwrap_err();
        assert!(err.to_string().contains("two [[traffic]] entries"), "{err}");

        let dns = TrafficConfig::Dns(DnsConfig {
            name: "d".into(),
            server: "127.0.0.1:53".parse().unwrap(),
            zone: "yeslocker.test".into(),
            record: "app.yeslocker.test".into(),
            ttl: 60,
            tsig: TsigConfig {
                key_name: "k".into(),
                algorithm: TsigAlgorithmName::HmacSha256,
                secret: SecretSource::Env("DR_TSIG".into()),
            },
            timeout: std::time::Duration::from_secs(1),
        });
        let err = TrafficProviders::from_configs(vec![dns], &BTreeMap::new()).unwrap_err();
        assert!(err.is_permanent());
        assert!(err.to_string().contains("DR_TSIG: not set"), "{err}");
    }
}
