//! `drctl apply -f topology.toml [--dry-run]` and `drctl topology show`.
//!
//! Why the coordinator parses the file: validation and the diff must use the same rules as
//! the state machine that will hold it, so drctl sends the text and prints the answer.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use dr_proto::pb;
use dr_proto::pb::operations_service_client::OperationsServiceClient;

use crate::client::Client;
use crate::output::{OutputFormat, Table, json, timestamp};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Topology file (TOML); see deploy/examples/yeslocker/topology.toml.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Show the diff against the committed version without applying.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub enum TopologyCmd {
    /// The committed topology and each database cluster's primary and epoch.
    Show,
}

pub async fn apply(client: &Client, args: ApplyArgs, format: OutputFormat) -> anyhow::Result<()> {
    let toml = std::fs::read_to_string(&args.file)
        .with_context(|| format!("read topology file {}", args.file.display()))?;
    let req = pb::ApplyTopologyRequest {
        toml,
        dry_run: args.dry_run,
        expected_version: 0,
    };
    let resp = client
        .call_service("apply", OperationsServiceClient::new, |mut c| {
            let req = req.clone();
            async move { c.apply_topology(req).await }
        })
        .await?;
    match format {
        OutputFormat::Json => print!("{}", json(&resp)),
        OutputFormat::Text => {
            if resp.diff.is_empty() {
                println!("no changes (topology version {})", resp.version);
            }
            for l in &resp.diff {
                println!("{l}");
            }
            for w in &resp.warnings {
                println!("warning: {w}");
            }
            if resp.applied {
                println!("applied: topology version {}", resp.version);
            } else if args.dry_run && !resp.diff.is_empty() {
                println!(
                    "dry run: nothing applied (committed version {})",
                    resp.version
                );
            }
        }
    }
    Ok(())
}

pub async fn run(client: &Client, cmd: TopologyCmd, format: OutputFormat) -> anyhow::Result<()> {
    let TopologyCmd::Show = cmd;
    let resp = client
        .call_service(
            "topology show",
            OperationsServiceClient::new,
            |mut c| async move { c.get_topology(pb::GetTopologyRequest {}).await },
        )
        .await?;
    match format {
        OutputFormat::Json => print!("{}", json(&resp)),
        OutputFormat::Text => {
            if resp.version == 0 {
                println!("no topology applied yet (drctl apply -f topology.toml)");
                return Ok(());
            }
            println!(
                "topology version {} applied {} by {}",
                resp.version,
                timestamp(resp.applied_at_unix_ms),
                resp.applied_by
            );
            let mut t = Table::new(["cluster", "primary", "region", "epoch", "last failover"]);
            for c in &resp.clusters {
                t.row([
                    c.name.clone(),
                    c.primary_host.clone(),
                    c.primary_region.clone(),
                    c.epoch.to_string(),
                    if c.last_failover_unix_ms == 0 {
                        "never".into()
                    } else {
                        timestamp(c.last_failover_unix_ms)
                    },
                ]);
            }
            print!("{}", t.render());
            println!("{}", resp.json);
        }
    }
    Ok(())
}
