//! `drctl isolate` / `drctl unisolate`: DRP scenario 3, "Immediate Containment".
//!
//! Why the coordinator and not the agents directly: the operator rarely knows which
//! addresses a region's hosts have, and the decision "this host is isolated" must outlive
//! the terminal it was typed in (it is committed, and `drctl status` shows it). The call
//! blocks until every selected agent answered (or its deadline passed) and prints one line
//! per host; it fails when any host failed, naming it.

use std::time::Duration;

use clap::Args;
use dr_proto::pb;
use dr_proto::pb::response_service_client::ResponseServiceClient;

use crate::client::Client;
use crate::cmd::UsageError;
use crate::output::{OutputFormat, Table, json};

/// Which hosts a security response applies to (at least one is required).
#[derive(Debug, Clone, Args)]
pub struct SelectorArgs {
    /// Host id (repeatable).
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Every host of a region.
    #[arg(long)]
    pub region: Option<String>,
    /// Every host with this role.
    #[arg(long)]
    pub role: Option<String>,
}

impl SelectorArgs {
    pub fn selector(&self) -> Result<pb::Selector, UsageError> {
        if self.hosts.is_empty() && self.region.is_none() && self.role.is_none() {
            return Err(UsageError(
                "name the hosts: --host HOST (repeatable), --region R or --role ROLE".into(),
            ));
        }
        Ok(pb::Selector {
            hosts: self.hosts.clone(),
            region: self.region.clone().unwrap_or_default(),
            role: self.role.clone().unwrap_or_default(),
            site: String::new(),
        })
    }
}

#[derive(Debug, Args)]
pub struct IsolateArgs {
    #[command(flatten)]
    pub select: SelectorArgs,
    /// Why (kept in the audit log and shown by `drctl status`).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// A management source kept reachable while isolated, CIDR[:port] (repeatable), on top
    /// of each host's `[isolation] allow`.
    #[arg(long = "allow-mgmt", value_name = "CIDR[:PORT]")]
    pub allow_mgmt: Vec<String>,
    /// How long each agent may take.
    #[arg(long = "wait", default_value = "60s", value_parser = crate::cli::parse_duration)]
    pub wait: Duration,
}

#[derive(Debug, Args)]
pub struct UnisolateArgs {
    #[command(flatten)]
    pub select: SelectorArgs,
    /// How long each agent may take.
    #[arg(long = "wait", default_value = "60s", value_parser = crate::cli::parse_duration)]
    pub wait: Duration,
}

/// A client whose per-RPC deadline covers `wait` (these calls block until agents answer).
pub fn waiting_client(client: &Client, wait: Duration) -> anyhow::Result<Client> {
    let mut cfg = client.config().clone();
    cfg.timeout = cfg.timeout.max(wait + Duration::from_secs(15));
    Ok(Client::new(cfg)?)
}

pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Prints per-host outcomes; fails naming the hosts that failed.
pub fn report(
    what: &str,
    outcomes: &[pb::HostOutcome],
    details: &[&str],
    format: OutputFormat,
) -> anyhow::Result<()> {
    if format == OutputFormat::Json {
        println!("{}", json(&outcomes));
    } else {
        let mut headers = vec!["HOST", "RESULT", "MESSAGE"];
        headers.extend_from_slice(details);
        let mut t = Table::new(headers);
        for o in outcomes {
            let mut row = vec![
                o.host_id.clone(),
                if o.success { "ok" } else { "FAILED" }.to_string(),
                o.message.clone(),
            ];
            for d in details {
                row.push(o.details.get(*d).cloned().unwrap_or_default());
            }
            t.row(row);
        }
        print!("{}", t.render());
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.success)
        .map(|o| o.host_id.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{what} failed on {} of {} host(s): {}",
            failed.len(),
            outcomes.len(),
            failed.join(", ")
        )
    }
}

pub async fn isolate(client: &Client, a: IsolateArgs, format: OutputFormat) -> anyhow::Result<()> {
    let req = pb::IsolateRequest {
        selector: Some(a.select.selector()?),
        reason: a.reason,
        allow_mgmt: a.allow_mgmt,
        timeout_ms: ms(a.wait),
    };
    let client = waiting_client(client, a.wait)?;
    let resp = client
        .call_service("isolate", ResponseServiceClient::new, move |mut c| {
            let req = req.clone();
            async move { c.isolate(req).await }
        })
        .await?;
    report(
        "isolation",
        &resp.hosts,
        &[
            "already_isolated",
            "saved_ruleset_bytes",
            "coordinators",
            "allow",
        ],
        format,
    )
}

pub async fn unisolate(
    client: &Client,
    a: UnisolateArgs,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let req = pb::IsolateRequest {
        selector: Some(a.select.selector()?),
        timeout_ms: ms(a.wait),
        ..Default::default()
    };
    let client = waiting_client(client, a.wait)?;
    let resp = client
        .call_service("unisolate", ResponseServiceClient::new, move |mut c| {
            let req = req.clone();
            async move { c.unisolate(req).await }
        })
        .await?;
    report(
        "unisolation",
        &resp.hosts,
        &["restored", "identical", "restored_bytes"],
        format,
    )
}
