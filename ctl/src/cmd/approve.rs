//! `drctl approve R-N [--reason TEXT]`: the second admin's approval.
//!
//! Why it prints the request before anything else on failure: the admin approving must
//! see what they approve; the coordinator refuses their own requests, non-admins and
//! expired requests with the reason, and on success has already started the operation as
//! the requester (in the same Raft entry as the approval).

use clap::Args;
use dr_proto::pb;
use dr_proto::pb::approval_service_client::ApprovalServiceClient;

use crate::client::Client;
use crate::output::{OutputFormat, json};

#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The request id, as printed by the gated command or `drctl approvals list`.
    pub id: String,
    /// Why (recorded in the request and the audit log).
    #[arg(long, default_value = "")]
    pub reason: String,
}

pub async fn run(client: &Client, args: ApproveArgs, format: OutputFormat) -> anyhow::Result<()> {
    let info = client
        .call_service("approve", ApprovalServiceClient::new, |mut c| {
            let req = pb::DecideApprovalRequest {
                id: args.id.clone(),
                reason: args.reason.clone(),
            };
            async move { c.approve(req).await }
        })
        .await?;
    match format {
        OutputFormat::Json => print!("{}", json(&info)),
        OutputFormat::Text => {
            println!(
                "{} approved: {} {} launched as {} ({})",
                info.id, info.kind, info.target, info.requester, info.launch_result
            );
            if info.kind == "failover" {
                println!("follow it with `drctl operations list`");
            }
        }
    }
    Ok(())
}
