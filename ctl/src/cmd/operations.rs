//! `drctl operations list|show|watch|cancel`: durable plans (failover, switchover) and the
//! state of every step.
//!
//! Why a separate view from `commands`: an operation outlives any drctl call and any
//! coordinator leader; the operator follows the plan (steps, durations, measured RTO/RPO),
//! not the individual agent commands it issued.

use clap::Subcommand;
use dr_proto::pb;
use dr_proto::pb::operations_service_client::OperationsServiceClient;

use crate::client::Client;
use crate::output::{OutputFormat, Table, json, timestamp};

#[derive(Debug, Subcommand)]
pub enum OperationsCmd {
    /// Recent operations, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One operation with its steps.
    Show { id: u64 },
    /// Follow an operation until it finishes.
    Watch { id: u64 },
    /// Cancel a running operation (its running agent commands are cancelled too).
    Cancel {
        id: u64,
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
}

pub async fn run(client: &Client, cmd: OperationsCmd, format: OutputFormat) -> anyhow::Result<()> {
    match cmd {
        OperationsCmd::List { limit } => {
            let resp =
                client
                    .call_service(
                        "operations list",
                        OperationsServiceClient::new,
                        |mut c| async move {
                            c.list_operations(pb::ListOperationsRequest { limit }).await
                        },
                    )
                    .await?;
            match format {
                OutputFormat::Json => print!("{}", json(&resp)),
                OutputFormat::Text => print!("{}", render_list(&resp.operations)),
            }
        }
        OperationsCmd::Show { id } => {
            let op = client
                .call_service(
                    "operations show",
                    OperationsServiceClient::new,
                    |mut c| async move { c.get_operation(pb::GetOperationRequest { id }).await },
                )
                .await?;
            match format {
                OutputFormat::Json => print!("{}", json(&op)),
                OutputFormat::Text => print!("{}", render(&op)),
            }
        }
        OperationsCmd::Watch { id } => {
            let op = follow(client, id, format).await?;
            finished_ok(&op)?;
        }
        OperationsCmd::Cancel { id, reason } => {
            let op = client
                .call_service(
                    "operations cancel",
                    OperationsServiceClient::new,
                    |mut c| {
                        let reason = reason.clone();
                        async move {
                            c.cancel_operation(pb::CancelOperationRequest { id, reason })
                                .await
                        }
                    },
                )
                .await?;
            match format {
                OutputFormat::Json => print!("{}", json(&op)),
                OutputFormat::Text => print!("{}", render(&op)),
            }
        }
    }
    Ok(())
}

/// Streams the operation's changes until it finishes: text prints one line per step
/// transition, JSON one object per change (JSON lines). Returns the final state.
pub async fn follow(
    client: &Client,
    id: u64,
    format: OutputFormat,
) -> anyhow::Result<pb::OperationInfo> {
    let client = client
        .prefer_leader()
        .await
        .unwrap_or_else(|_| client.clone());
    let mut last: Option<pb::OperationInfo> = None;
    // The stream ends when the operation finishes or the answering node goes away (leader
    // change): reconnect and continue from the committed state.
    for _ in 0..100 {
        let mut stream = match client
            .call_service(
                "operations watch",
                OperationsServiceClient::new,
                |mut c| async move { c.watch_operation(pb::GetOperationRequest { id }).await },
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("watch interrupted ({e}), retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Ok(Some(op)) = stream.message().await {
            match format {
                OutputFormat::Json => {
                    println!("{}", serde_json::to_string(&op).unwrap_or_default())
                }
                OutputFormat::Text => print!("{}", transitions(last.as_ref(), &op)),
            }
            let done = op.finished_at_unix_ms != 0;
            last = Some(op);
            if done {
                if format == OutputFormat::Text
                    && let Some(op) = &last
                {
                    print!("{}", summary(op));
                }
                return last.ok_or_else(|| anyhow::anyhow!("no operation"));
            }
        }
    }
    anyhow::bail!("lost track of operation {id}; see `drctl operations show {id}`")
}

pub fn finished_ok(op: &pb::OperationInfo) -> anyhow::Result<()> {
    if op.state == "succeeded" {
        Ok(())
    } else {
        anyhow::bail!("operation {} ended {}: {}", op.id, op.state, op.reason)
    }
}

fn dur(start: i64, end: i64) -> String {
    if start == 0 {
        return String::new();
    }
    if end == 0 {
        return "…".into();
    }
    format!("{:.1}s", (end - start).max(0) as f64 / 1000.0)
}

fn transitions(prev: Option<&pb::OperationInfo>, op: &pb::OperationInfo) -> String {
    let mut out = String::new();
    if prev.is_none() {
        out.push_str(&format!(
            "operation {} {} of {} {} -> {}: {}\n",
            op.id, op.kind, op.cluster, op.from_region, op.to_region, op.state
        ));
    }
    for s in &op.steps {
        let before = prev.and_then(|p| p.steps.get(s.index as usize));
        let changed = before.is_none_or(|b| b.state != s.state || b.attempt != s.attempt);
        if changed && (prev.is_some() || s.state != "pending") {
            out.push_str(&format!(
                "  [{:>2}] {:<28} {:<8} {:>7}  {}\n",
                s.index,
                s.name,
                s.state,
                dur(s.started_at_unix_ms, s.finished_at_unix_ms),
                s.message
            ));
        }
    }
    if prev.is_some_and(|p| p.state != op.state) {
        out.push_str(&format!("operation {}: {}\n", op.id, op.state));
    }
    out
}

fn summary(op: &pb::OperationInfo) -> String {
    let mut out = format!("operation {} {}", op.id, op.state);
    let get = |k: &str| op.results.get(k).cloned();
    if let Some(v) = get("rto_ms") {
        out.push_str(&format!("  RTO {v} ms"));
    }
    if let Some(v) = get("rpo_bytes") {
        out.push_str(&format!("  RPO {v} bytes"));
    }
    if let Some(v) = get("write_unavailable_ms") {
        out.push_str(&format!("  writes unavailable {v} ms"));
    }
    out.push('\n');
    out
}

pub fn render_list(ops: &[pb::OperationInfo]) -> String {
    if ops.is_empty() {
        return "no operations\n".into();
    }
    let mut t = Table::new([
        "id", "kind", "cluster", "from", "to", "state", "created", "duration", "reason",
    ]);
    for o in ops {
        t.row([
            o.id.to_string(),
            o.kind.clone(),
            o.cluster.clone(),
            o.from_region.clone(),
            o.to_region.clone(),
            o.state.clone(),
            timestamp(o.created_at_unix_ms),
            dur(o.created_at_unix_ms, o.finished_at_unix_ms),
            o.reason.clone(),
        ]);
    }
    t.render()
}

pub fn render(op: &pb::OperationInfo) -> String {
    let mut out = format!(
        "operation {}  {}  cluster {}  {} -> {}  state {}\ncreated {} by {}\nreason: {}\n",
        if op.id == 0 {
            "(plan)".to_owned()
        } else {
            op.id.to_string()
        },
        op.kind,
        op.cluster,
        op.from_region,
        op.to_region,
        op.state,
        timestamp(op.created_at_unix_ms),
        op.created_by,
        op.reason
    );
    let mut t = Table::new([
        "#",
        "step",
        "kind",
        "on failure",
        "state",
        "try",
        "duration",
        "message",
    ]);
    for s in &op.steps {
        t.row([
            s.index.to_string(),
            s.name.clone(),
            s.kind.clone(),
            s.on_failure.clone(),
            s.state.clone(),
            s.attempt.to_string(),
            dur(s.started_at_unix_ms, s.finished_at_unix_ms),
            s.message.clone(),
        ]);
    }
    out.push_str(&t.render());
    if !op.results.is_empty() {
        let mut r: Vec<_> = op.results.iter().collect();
        r.sort();
        out.push_str("results:");
        for (k, v) in r {
            out.push_str(&format!(" {k}={v}"));
        }
        out.push('\n');
    }
    out
}
