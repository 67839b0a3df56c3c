//! `drctl approvals list|show|reject|policy show|policy set`: the two-person rule.
//!
//! Why separate from `approve`: approving is the one act that runs something (as the
//! requester), so it is its own top-level verb an admin types deliberately; everything
//! else about approvals (reading requests, withdrawing or rejecting them, the policy of
//! which operations need them) lives here.

use clap::{Args, Subcommand};
use dr_proto::pb;
use dr_proto::pb::approval_service_client::ApprovalServiceClient;

use crate::client::Client;
use crate::output::{OutputFormat, Table, json, now_ms, timestamp};

#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// Requests, newest first (pending, expired, approved, rejected).
    List {
        /// Only requests still waiting for a decision.
        #[arg(long)]
        pending: bool,
    },
    /// One request with its stored payload (what runs on approval).
    Show { id: String },
    /// Reject a pending request (admin), or withdraw your own.
    Reject {
        id: String,
        /// Why (recorded in the request and the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Which operations need a second admin, and how long requests stay valid.
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// The current policy.
    Show,
    /// Replace the policy (admin).
    Set(PolicySetArgs),
}

#[derive(Debug, Args)]
pub struct PolicySetArgs {
    /// Operation kinds that need approval, comma-separated or repeated: failover,
    /// restore-in-place, isolate, prune, rotate-credentials; `none` gates nothing.
    #[arg(long, required = true, value_delimiter = ',')]
    pub require: Vec<String>,
    /// How long a request may wait for approval (e.g. 30m, 4h); default: unchanged.
    #[arg(long, value_parser = crate::cli::parse_duration)]
    pub ttl: Option<std::time::Duration>,
}

pub async fn run(client: &Client, cmd: ApprovalsCmd, format: OutputFormat) -> anyhow::Result<()> {
    match cmd {
        ApprovalsCmd::List { pending } => {
            let resp = client
                .call_service(
                    "approvals list",
                    ApprovalServiceClient::new,
                    |mut c| async move {
                        c.list_approvals(pb::ListApprovalsRequest {
                            pending_only: pending,
                        })
                        .await
                    },
                )
                .await?;
            match format {
                OutputFormat::Json => print!("{}", json(&resp)),
                OutputFormat::Text => print!("{}", render_list(&resp.approvals)),
            }
        }
        ApprovalsCmd::Show { id } => {
            let info = client
                .call_service("approvals show", ApprovalServiceClient::new, |mut c| {
                    let id = id.clone();
                    async move {
                        c.get_approval(pb::DecideApprovalRequest {
                            id,
                            reason: String::new(),
                        })
                        .await
                    }
                })
                .await?;
            match format {
                OutputFormat::Json => print!("{}", json(&info)),
                OutputFormat::Text => print!("{}", render_one(&info)),
            }
        }
        ApprovalsCmd::Reject { id, reason } => {
            let info = client
                .call_service("approvals reject", ApprovalServiceClient::new, |mut c| {
                    let req = pb::DecideApprovalRequest {
                        id: id.clone(),
                        reason: reason.clone(),
                    };
                    async move { c.reject(req).await }
                })
                .await?;
            match format {
                OutputFormat::Json => print!("{}", json(&info)),
                OutputFormat::Text => println!("{} rejected; nothing was run", info.id),
            }
        }
        ApprovalsCmd::Policy(PolicyCmd::Show) => {
            let p =
                client
                    .call_service(
                        "approvals policy",
                        ApprovalServiceClient::new,
                        |mut c| async move {
                            c.get_approval_policy(pb::GetApprovalPolicyRequest {}).await
                        },
                    )
                    .await?;
            print_policy(&p, format);
        }
        ApprovalsCmd::Policy(PolicyCmd::Set(a)) => {
            let require: Vec<String> = a
                .require
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty() && s != "none")
                .collect();
            let ttl_secs = a.ttl.map_or(0, |d| d.as_secs().max(1));
            let p = client
                .call_service(
                    "approvals policy set",
                    ApprovalServiceClient::new,
                    |mut c| {
                        let req = pb::SetApprovalPolicyRequest {
                            require: require.clone(),
                            ttl_secs,
                        };
                        async move { c.set_approval_policy(req).await }
                    },
                )
                .await?;
            print_policy(&p, format);
        }
    }
    Ok(())
}

fn print_policy(p: &pb::ApprovalPolicy, format: OutputFormat) {
    match format {
        OutputFormat::Json => print!("{}", json(p)),
        OutputFormat::Text => {
            let require = if p.require.is_empty() {
                "nothing (every operation runs without a second admin)".to_owned()
            } else {
                p.require.join(", ")
            };
            println!("needs approval:  {require}");
            println!("request ttl:     {}s", p.ttl_secs);
            if !p.set_by.is_empty() {
                println!(
                    "set by:          {} at {}",
                    p.set_by,
                    timestamp(p.set_at_unix_ms)
                );
            }
            println!("kinds:           {}", p.kinds.join(", "));
        }
    }
}

/// The requester's operator name (`alice`) from a SPIFFE id, or the id itself.
fn who(id: &str) -> String {
    id.parse::<dr_proto::identity::SpiffeId>()
        .map(|s| s.identity.name())
        .unwrap_or_else(|_| id.to_owned())
}

pub fn render_list(list: &[pb::ApprovalInfo]) -> String {
    if list.is_empty() {
        return "no approval requests\n".to_owned();
    }
    let now = now_ms();
    let mut t = Table::new([
        "id",
        "state",
        "kind",
        "target",
        "requester",
        "created",
        "expires/decided",
    ]);
    for a in list {
        let when = match a.state.as_str() {
            "pending" => format!("expires in {}s", (a.expires_at_unix_ms - now).max(0) / 1000),
            "expired" => format!("expired {}", timestamp(a.expires_at_unix_ms)),
            _ => format!("{} by {}", a.state, who(&a.decided_by)),
        };
        t.row([
            a.id.clone(),
            a.state.clone(),
            a.kind.clone(),
            a.target.clone(),
            who(&a.requester),
            timestamp(a.created_at_unix_ms),
            when,
        ]);
    }
    t.render()
}

pub fn render_one(a: &pb::ApprovalInfo) -> String {
    let mut s = String::new();
    s.push_str(&format!("request:    {} ({})\n", a.id, a.state));
    s.push_str(&format!("operation:  {} {}\n", a.kind, a.target));
    s.push_str(&format!("requester:  {}\n", a.requester));
    s.push_str(&format!(
        "created:    {}\n",
        timestamp(a.created_at_unix_ms)
    ));
    s.push_str(&format!(
        "expires:    {}\n",
        timestamp(a.expires_at_unix_ms)
    ));
    if !a.decided_by.is_empty() {
        s.push_str(&format!(
            "decided:    {} by {} at {}\n",
            a.state,
            a.decided_by,
            timestamp(a.decided_at_unix_ms)
        ));
    }
    if !a.reason.is_empty() {
        s.push_str(&format!("reason:     {}\n", a.reason));
    }
    if !a.launch_result.is_empty() {
        s.push_str(&format!("launched:   {}\n", a.launch_result));
    }
    s.push_str(&format!("payload:    {}\n", a.payload_json));
    if a.state == "pending" {
        s.push_str(&format!(
            "another admin approves with `drctl approve {}`, or rejects with `drctl approvals reject {}`\n",
            a.id, a.id
        ));
    }
    s
}
