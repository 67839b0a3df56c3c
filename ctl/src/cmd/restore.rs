//! `drctl restore`: full restore and point-in-time recovery of a database, onto a new host
//! (also in the other region) or in place (rollback), as a durable operation.
//!
//! Why the plan is printed first: the coordinator has already picked the base backup and
//! checked the WAL chain when it answers, so the operator sees what will be restored (and a
//! refusal names the reachable range) before any file is written. `--wait` follows the
//! operation step by step with a byte progress bar during the file restore; Ctrl-C cancels
//! the operation (the agent stops its work and never starts a server on a partial restore).
//!
//! Exit status: 0 when the restore succeeded (or the dry run was accepted), 1 when it was
//! refused or failed.

use std::time::Duration;

use dr_proto::pb;
use dr_proto::pb::operations_service_client::OperationsServiceClient;
use dr_proto::pb::restore_service_client::RestoreServiceClient;
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::Client;
use crate::output::{OutputFormat, json};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args([
    "latest", "backup", "to_time", "to_lsn", "to_xid", "to_name", "before_incident"
])))]
pub struct RestoreArgs {
    /// Database name in the backup policy.
    #[arg(long)]
    pub db: String,
    /// Everything up to the newest archived WAL.
    #[arg(long)]
    pub latest: bool,
    /// Exactly this backup (recovery stops where the backup is consistent).
    #[arg(long)]
    pub backup: Option<String>,
    /// Point in time, RFC 3339 with a zone (2026-11-28T10:15:00+08:00).
    #[arg(long)]
    pub to_time: Option<String>,
    /// WAL position (e.g. 0/3000060).
    #[arg(long)]
    pub to_lsn: Option<String>,
    /// Transaction id (recovery stops after it commits).
    #[arg(long)]
    pub to_xid: Option<String>,
    /// Named restore point (pg_create_restore_point).
    #[arg(long)]
    pub to_name: Option<String>,
    /// The instant before an incident: an incident (I-N, `drctl incident list`), an
    /// operation id (the failover it caused) or a time.
    #[arg(long)]
    pub before_incident: Option<String>,
    /// Host to restore on (any region); default with --in-place: the database's host.
    #[arg(long)]
    pub to_host: Option<String>,
    /// Target data directory on that host (absent or empty; in place: the database's).
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Port of the restored server (default: a free one; in place: the configured one).
    #[arg(long)]
    pub port: Option<u32>,
    /// What the server does at the target: promote (default) or pause (inspect first).
    #[arg(long, value_parser = ["promote", "pause"])]
    pub target_action: Option<String>,
    /// recovery_target_timeline: latest (default), current or a number (an earlier one).
    #[arg(long)]
    pub timeline: Option<String>,
    /// Base backup for --to-xid / --to-name (default: the newest).
    #[arg(long)]
    pub base_backup: Option<String>,
    /// Restore from this location instead of the database's home location.
    #[arg(long)]
    pub location: Option<String>,
    /// Replace the database's data directory (the database must be stopped; admin).
    #[arg(long, requires = "confirm")]
    pub in_place: bool,
    /// Confirms an in-place restore.
    #[arg(long)]
    pub confirm: bool,
    /// Show the plan (base backup, WAL range, reachable range) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Follow the restore to its end (progress bar; Ctrl-C cancels it).
    #[arg(long)]
    pub wait: bool,
}

fn target(a: &RestoreArgs) -> (String, String) {
    let pick: [(&str, &Option<String>); 6] = [
        ("backup", &a.backup),
        ("time", &a.to_time),
        ("lsn", &a.to_lsn),
        ("xid", &a.to_xid),
        ("name", &a.to_name),
        ("before_incident", &a.before_incident),
    ];
    for (k, v) in pick {
        if let Some(v) = v {
            return (k.to_owned(), v.clone());
        }
    }
    ("latest".into(), String::new())
}

pub async fn run(client: &Client, a: RestoreArgs, format: OutputFormat) -> anyhow::Result<()> {
    let (target_type, target_value) = target(&a);
    let req = pb::StartRestoreRequest {
        db: a.db.clone(),
        target_type,
        target_value,
        to_host: a.to_host.clone().unwrap_or_default(),
        data_dir: a.data_dir.clone().unwrap_or_default(),
        port: a.port.unwrap_or(0),
        target_action: a.target_action.clone().unwrap_or_default(),
        in_place: a.in_place,
        confirm: a.confirm,
        dry_run: a.dry_run,
        backup_id: a.base_backup.clone().unwrap_or_default(),
        location: a.location.clone().unwrap_or_default(),
        timeline: a.timeline.clone().unwrap_or_default(),
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    let resp = client
        .call_service("restore", RestoreServiceClient::new, |mut c| {
            let req = req.clone();
            async move { c.start_restore(req).await }
        })
        .await?;
    started(client, resp, a.wait, format).await
}

/// Prints the plan and, for a started operation, follows it when asked.
pub async fn started(
    client: &Client,
    resp: pb::StartRestoreResponse,
    wait: bool,
    format: OutputFormat,
) -> anyhow::Result<()> {
    if format == OutputFormat::Text
        && let Some(p) = &resp.plan
    {
        println!(
            "plan: {} on {} ({}) into {}",
            p.backup_id, p.to_host, p.to_region, p.data_dir
        );
        for l in &p.lines {
            println!("  {l}");
        }
    }
    let Some(op) = resp.operation.clone() else {
        if format == OutputFormat::Json {
            print!("{}", json(&resp));
        } else {
            println!("dry run: nothing was written");
        }
        return Ok(());
    };
    if !wait {
        if format == OutputFormat::Json {
            print!("{}", json(&resp));
        } else {
            println!(
                "operation {} started; follow it with `drctl operations watch {}`",
                op.id, op.id
            );
        }
        return Ok(());
    }
    let fin = follow(client, op.id, format).await?;
    if format == OutputFormat::Json {
        print!("{}", json(&fin));
    } else {
        print!("{}", crate::cmd::operations::render(&fin));
    }
    crate::cmd::operations::finished_ok(&fin)
}

async fn get(client: &Client, id: u64) -> anyhow::Result<pb::OperationInfo> {
    Ok(client
        .call_service(
            "operations show",
            OperationsServiceClient::new,
            |mut c| async move { c.get_operation(pb::GetOperationRequest { id }).await },
        )
        .await?)
}

/// Polls the operation until it finishes, printing step transitions; shows the agent's byte
/// progress while the files are restored; Ctrl-C cancels the operation (once).
pub async fn follow(
    client: &Client,
    id: u64,
    format: OutputFormat,
) -> anyhow::Result<pb::OperationInfo> {
    let client = client
        .prefer_leader()
        .await
        .unwrap_or_else(|_| client.clone());
    let mut seen: std::collections::BTreeMap<String, String> = Default::default();
    let mut bar_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut cancelled = false;
    let mut errors = 0;
    loop {
        let op = match get(&client, id).await {
            Ok(op) => {
                errors = 0;
                op
            }
            Err(e) => {
                errors += 1;
                if errors > 60 {
                    return Err(e.context(format!(
                        "lost track of operation {id}; see `drctl operations show {id}`"
                    )));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for s in &op.steps {
            if seen.get(&s.name) != Some(&s.state) {
                seen.insert(s.name.clone(), s.state.clone());
                if format == OutputFormat::Text && s.state != "pending" {
                    eprintln!("  step {:<22} {:<8} {}", s.name, s.state, s.message);
                }
                if s.name == "restore_files"
                    && s.state == "running"
                    && bar_task.is_none()
                    && format == OutputFormat::Text
                {
                    let c = client.clone();
                    bar_task = Some(tokio::spawn(async move {
                        progress(&c, id).await;
                    }));
                }
            }
        }
        if op.finished_at_unix_ms != 0 {
            if let Some(t) = bar_task.take() {
                t.abort();
            }
            return Ok(op);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            r = tokio::signal::ctrl_c(), if !cancelled => {
                if r.is_ok() {
                    cancelled = true;
                    eprintln!("Ctrl-C: cancelling operation {id} (the agent stops; no server is left running on a partial restore)");
                    let c = client.clone();
                    let cancel = c
                        .call_service("operations cancel", OperationsServiceClient::new, |mut c| async move {
                            c.cancel_operation(pb::CancelOperationRequest { id, reason: "cancelled with Ctrl-C in drctl restore --wait".into() }).await
                        })
                        .await;
                    if let Err(e) = cancel {
                        eprintln!("cancel failed: {e}; run `drctl operations cancel {id}`");
                    }
                }
            }
        }
    }
}

/// A byte progress bar fed by the agent's command progress of the `restore_files` step.
async fn progress(client: &Client, id: u64) {
    // The step's commands exist already (request id `op-<id>`), so this issues nothing; the
    // action is a harmless placeholder the API requires (it fails for lack of arguments if
    // it were ever sent).
    let req = pb::RunActionRequest {
        selector: None,
        action: Some(pb::Action {
            kind: Some(pb::action::Kind::Generic(pb::Generic {
                verb: "restore.pg-files".into(),
                args: Default::default(),
            })),
        }),
        timeout_ms: 0,
        wait: true,
        request_id: format!("op-{id}"),
    };
    let Ok(mut stream) = client
        .call("follow restore progress", |mut c| {
            let req = req.clone();
            async move { c.run_action(req).await }
        })
        .await
    else {
        return;
    };
    let mut bar: Option<ProgressBar> = None;
    while let Ok(Some(ev)) = stream.message().await {
        if let Some(pb::action_event::Event::Progress(p)) = ev.event {
            if p.total <= 1 {
                continue;
            }
            let b = bar.get_or_insert_with(|| {
                let b = ProgressBar::new(p.total);
                b.set_style(
                    ProgressStyle::with_template(
                        "  {msg:<12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b
            });
            b.set_length(p.total);
            b.set_position(p.done);
            b.set_message(p.message);
            if p.done >= p.total {
                break;
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
