//! `drctl failover --to REGION [--cluster NAME] [--percentage N] [--dry-run] [--wait]
//! [--force [--yes]]`.
//!
//! Without `--force` this is a planned switchover (nothing lost); with it an emergency
//! failover that states the estimated data loss and asks for confirmation (unless `--yes`),
//! because acknowledged writes may be lost. The plan is always shown first.

use std::io::{BufRead as _, Write as _};

use clap::Args;
use dr_proto::pb;
use dr_proto::pb::operations_service_client::OperationsServiceClient;

use crate::client::Client;
use crate::cmd::UsageError;
use crate::cmd::operations::{finished_ok, follow, render};
use crate::output::{OutputFormat, json};

#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Region that gets the primary.
    #[arg(long = "to")]
    pub to: String,
    /// Database cluster (default: the only one in the topology).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Show the plan without running it.
    #[arg(long)]
    pub dry_run: bool,
    /// Follow the plan until it finishes.
    #[arg(long)]
    pub wait: bool,
    /// Emergency failover when the old region cannot be reached (admin; may lose data).
    #[arg(long)]
    pub force: bool,
    /// Do not ask for confirmation of a forced failover.
    #[arg(long)]
    pub yes: bool,
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Share of the traffic providers' traffic for the new region, 1-100 (default 100); the
    /// region being left keeps the rest. nginx maps it to upstream weights; DNS has no
    /// weights, so every region with a share keeps all its addresses (docs/failover.md).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub percentage: Option<u32>,
}

pub async fn run(client: &Client, args: FailoverArgs, format: OutputFormat) -> anyhow::Result<()> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let mk = |dry_run: bool| pb::StartFailoverRequest {
        to_region: args.to.clone(),
        cluster: args.cluster.clone().unwrap_or_default(),
        dry_run,
        force: args.force,
        request_id: request_id.clone(),
        reason: args.reason.clone(),
        traffic_percentage: args.percentage.unwrap_or(0),
    };
    let call = |req: pb::StartFailoverRequest| {
        client.call_service("failover", OperationsServiceClient::new, move |mut c| {
            let req = req.clone();
            async move { c.start_failover(req).await }
        })
    };
    // --- the plan first
    let plan = call(mk(true)).await?;
    if format == OutputFormat::Text {
        if let Some(op) = &plan.operation {
            print!("{}", render(op));
        }
        for w in &plan.warnings {
            println!("warning: {w}");
        }
    }
    if args.dry_run {
        if format == OutputFormat::Json {
            print!("{}", json(&plan));
        }
        return Ok(());
    }
    if args.force {
        // The coordinator says when it cannot estimate (no report of the old primary and no
        // view of it from the candidate): never state that as "0 bytes".
        let statement = if plan
            .warnings
            .iter()
            .any(|w| w.contains("data loss unknown"))
        {
            format!(
                "forced failover to {}: the data loss is UNKNOWN (see the warning above); writes \
                 the old primary acknowledged after the candidate's replay position are lost",
                args.to
            )
        } else {
            format!(
                "forced failover to {}: estimated loss {} bytes of WAL (writes the old primary \
                 acknowledged after the candidate's replay position are lost)",
                args.to, plan.estimated_loss_bytes
            )
        };
        if args.yes {
            // Stated even when confirmed up front; stderr keeps --output json one document.
            match format {
                OutputFormat::Json => eprintln!("{statement}; confirmed by --yes"),
                OutputFormat::Text => println!("{statement}; confirmed by --yes"),
            }
        } else {
            if format == OutputFormat::Json {
                return Err(UsageError(
                    "--force with --output json needs --yes (no prompt)".into(),
                )
                .into());
            }
            print!("{statement}. Type 'yes' to continue: ");
            std::io::stdout().flush().ok();
            let mut line = String::new();
            let n = std::io::stdin().lock().read_line(&mut line)?;
            if n == 0 {
                anyhow::bail!(
                    "no answer (standard input is closed), nothing done: pass --yes to confirm \
                     without a prompt"
                );
            }
            if line.trim() != "yes" {
                anyhow::bail!("not confirmed (the answer was not 'yes'), nothing done");
            }
        }
    }
    // --- run it
    let started = call(mk(false)).await?;
    let Some(op) = started.operation else {
        anyhow::bail!("the coordinator did not return the operation");
    };
    if !args.wait {
        match format {
            OutputFormat::Json => print!("{}", json(&op)),
            OutputFormat::Text => println!(
                "operation {} started; follow it with `drctl operations watch {}`",
                op.id, op.id
            ),
        }
        return Ok(());
    }
    let done = follow(client, op.id, format).await?;
    finished_ok(&done)
}
