//! `drctl backup ...`: the catalog, running/verifying/copying backups, and the policy.
//!
//! Why two calls per job: `BackupService.Start*` resolves the policy and issues the agent
//! command(s) under a request id; drctl then follows them with `ControlService.RunAction`
//! and the same request id (a retried RunAction streams what exists, it issues nothing), so
//! progress, leader redirects and "the stream broke, the command keeps running" behave like
//! `drctl run`.
//!
//! Exit status: 0 on success; 1 when a backup or verify failed (verify: any missing or
//! corrupt object), so scripts and cron can alert on it.

use std::path::PathBuf;

use dr_proto::pb;
use dr_proto::pb::backup_service_client::BackupServiceClient;
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{Client, map_status};
use crate::output::{OutputFormat, Table, json, timestamp};

#[derive(Debug, clap::Subcommand)]
pub enum BackupCmd {
    /// Take a backup now (full, incr, logical or files) and record it in the catalog.
    Run {
        /// Database (or file set, for --type files) named in the backup policy.
        #[arg(long)]
        db: String,
        #[arg(long = "type", default_value = "full", value_parser = ["full", "incr", "logical", "files"])]
        kind: String,
        /// Run on this host instead of the policy's backup host (e.g. a replica).
        #[arg(long)]
        host: Option<String>,
        /// Store at this location instead of the database's home location.
        #[arg(long)]
        location: Option<String>,
        /// Follow the backup to its end with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Catalog entries, oldest first.
    List {
        #[arg(long)]
        db: Option<String>,
    },
    /// One catalog entry in full.
    Show { id: String },
    /// Read every object of a backup back (hash and decryption) and name each missing or
    /// corrupt one; records when each location was verified.
    Verify {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[arg(long)]
        location: Option<String>,
    },
    /// Copy a backup to another location (refused across jurisdictions unless the policy
    /// allows it).
    Copy {
        id: String,
        #[arg(long)]
        to: String,
    },
    /// Delete backups at a location (admin; gated by the approvals policy, kind `prune`):
    /// marks them as retention does; the location's prune host deletes them after the
    /// policy's grace. Refused when a database would be left without a physical backup.
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Default: the one location the backups are stored at.
        #[arg(long)]
        location: Option<String>,
        /// Why (recorded in the approval request and the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The backup policy: databases, locations, schedules, retention.
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCmd {
    /// Validate and commit a policy file (TOML; see deploy/examples/backup-policy.toml).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print the committed policy.
    Show,
}

/// A backup or verify job failed (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JobFailed(pub String);

async fn backup_call<T, F, Fut>(client: &Client, what: &str, op: F) -> anyhow::Result<T>
where
    F: Fn(BackupServiceClient<tonic::transport::Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    Ok(client
        .call_service(what, BackupServiceClient::new, op)
        .await?)
}

pub async fn run(client: &Client, cmd: BackupCmd, format: OutputFormat) -> anyhow::Result<()> {
    match cmd {
        BackupCmd::Run {
            db,
            kind,
            host,
            location,
            wait,
        } => {
            let req = pb::StartBackupRequest {
                db,
                kind,
                host_id: host.unwrap_or_default(),
                location: location.unwrap_or_default(),
                request_id: uuid::Uuid::new_v4().to_string(),
                timeout_ms: 0,
            };
            let job = backup_call(client, "backup run", |mut c| {
                let req = req.clone();
                async move { c.start_backup(req).await }
            })
            .await?;
            if !wait {
                if format == OutputFormat::Json {
                    println!("{}", json(&job));
                } else {
                    println!(
                        "backup issued to {} (key {}); follow with `drctl commands list --pending`, then `drctl backup list`",
                        job.host_ids.join(","),
                        job.keys.join(",")
                    );
                }
                return Ok(());
            }
            let results = follow(client, &job, format, true).await?;
            let Some(r) = results.into_iter().next() else {
                anyhow::bail!("no result for backup job {}", job.request_id);
            };
            if !r.success {
                return Err(JobFailed(r.message).into());
            }
            let id = r.details.get("backup_id").cloned().unwrap_or_default();
            // The leader's recorder commits the entry right after the result; wait for it.
            let mut info = None;
            for _ in 0..50 {
                let id2 = id.clone();
                if let Ok(b) = backup_call(client, "backup show", |mut c| {
                    let id = id2.clone();
                    async move { c.get_backup(pb::GetBackupRequest { id }).await }
                })
                .await
                {
                    info = Some(b);
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            match (info, format) {
                (Some(b), OutputFormat::Json) => println!("{}", json(&b)),
                (Some(b), _) => print_entry(&b),
                (None, _) => println!(
                    "backup {id} stored; the catalog entry is not visible yet: `drctl backup show {id}`"
                ),
            }
            Ok(())
        }
        BackupCmd::List { db } => {
            let resp = backup_call(client, "backup list", |mut c| {
                let db = db.clone().unwrap_or_default();
                async move { c.list_backups(pb::ListBackupsRequest { db }).await }
            })
            .await?;
            if format == OutputFormat::Json {
                println!("{}", json(&resp.backups));
                return Ok(());
            }
            let mut t = Table::new([
                "ID",
                "KIND",
                "DB",
                "SIZE",
                "ADDED",
                "DURATION",
                "LSN RANGE",
                "LOCATIONS",
                "VERIFIED",
            ]);
            for b in &resp.backups {
                t.row([
                    b.id.clone(),
                    b.kind.clone(),
                    b.db.clone(),
                    bytes(b.bytes_total),
                    bytes(b.bytes_added),
                    format!("{:.1}s", b.duration_ms as f64 / 1000.0),
                    format!("{}..{}", b.start_lsn, b.stop_lsn),
                    b.locations
                        .iter()
                        .map(|l| format!("{}({})", l.name, l.jurisdiction))
                        .collect::<Vec<_>>()
                        .join(","),
                    verified(b),
                ]);
            }
            if t.is_empty() {
                println!("no backups in the catalog");
            } else {
                print!("{}", t.render());
            }
            Ok(())
        }
        BackupCmd::Show { id } => {
            let b = backup_call(client, "backup show", |mut c| {
                let id = id.clone();
                async move { c.get_backup(pb::GetBackupRequest { id }).await }
            })
            .await?;
            if format == OutputFormat::Json {
                println!("{}", json(&b));
            } else {
                print_entry(&b);
            }
            Ok(())
        }
        BackupCmd::Verify { id, all, location } => {
            let req = pb::StartVerifyRequest {
                id: id.unwrap_or_default(),
                all,
                location: location.unwrap_or_default(),
                request_id: uuid::Uuid::new_v4().to_string(),
                timeout_ms: 0,
            };
            let job = backup_call(client, "backup verify", |mut c| {
                let req = req.clone();
                async move { c.start_verify(req).await }
            })
            .await?;
            let results = follow(client, &job, format, false).await?;
            if format == OutputFormat::Json {
                println!("{}", json(&results));
            }
            let mut failed = Vec::new();
            for r in &results {
                if format == OutputFormat::Text {
                    println!(
                        "{:<14} {} {}",
                        r.host_id,
                        if r.success { "ok" } else { "PROBLEMS" },
                        r.message
                    );
                    let mut ps: Vec<_> = r
                        .details
                        .iter()
                        .filter(|(k, v)| k.starts_with("problems.") && !v.is_empty())
                        .collect();
                    ps.sort();
                    for (k, v) in ps {
                        for p in v.split("; ") {
                            println!("  {} {p}", k.trim_start_matches("problems."));
                        }
                    }
                }
                if !r.success {
                    failed.push(r.message.clone());
                }
            }
            if !failed.is_empty() {
                return Err(
                    JobFailed(format!("verify found problems: {}", failed.join(" | "))).into(),
                );
            }
            Ok(())
        }
        BackupCmd::Delete {
            ids,
            location,
            reason,
        } => {
            let req = pb::DeleteBackupsRequest {
                ids,
                location: location.unwrap_or_default(),
                reason,
            };
            let resp = backup_call(client, "backup delete", |mut c| {
                let req = req.clone();
                async move { c.delete_backups(req).await }
            })
            .await?;
            match format {
                OutputFormat::Json => println!("{}", json(&resp)),
                OutputFormat::Text => {
                    if !resp.marked.is_empty() {
                        println!(
                            "marked for deletion at {}: {}; the prune host deletes them after {} (until then they stay restorable)",
                            resp.location,
                            resp.marked.join(", "),
                            timestamp(resp.delete_after_unix_ms)
                        );
                    }
                    if !resp.already_marked.is_empty() {
                        println!("already marked: {}", resp.already_marked.join(", "));
                    }
                }
            }
            Ok(())
        }
        BackupCmd::Copy { id, to } => {
            let req = pb::StartCopyRequest {
                id,
                to_location: to,
                request_id: uuid::Uuid::new_v4().to_string(),
                timeout_ms: 0,
            };
            let job = backup_call(client, "backup copy", |mut c| {
                let req = req.clone();
                async move { c.start_copy(req).await }
            })
            .await?;
            let results = follow(client, &job, format, true).await?;
            if format == OutputFormat::Json {
                println!("{}", json(&results));
            }
            for r in &results {
                if format == OutputFormat::Text {
                    println!(
                        "{:<14} {} {}",
                        r.host_id,
                        if r.success { "ok" } else { "FAILED" },
                        r.message
                    );
                }
                if !r.success {
                    return Err(JobFailed(r.message.clone()).into());
                }
            }
            Ok(())
        }
        BackupCmd::Policy(PolicyCmd::Apply { file }) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("read policy file {}: {e}", file.display()))?;
            let r = backup_call(client, "backup policy apply", |mut c| {
                let toml = text.clone();
                async move { c.apply_policy(pb::ApplyPolicyRequest { toml }).await }
            })
            .await?;
            if format == OutputFormat::Json {
                println!("{}", json(&r));
            } else {
                println!(
                    "policy {}: {} database(s), {} location(s), {} schedule(s)",
                    if r.changed { "applied" } else { "unchanged" },
                    r.databases,
                    r.locations,
                    r.schedules
                );
            }
            Ok(())
        }
        BackupCmd::Policy(PolicyCmd::Show) => {
            let r = backup_call(client, "backup policy show", |mut c| async move {
                c.get_policy(pb::GetPolicyRequest {}).await
            })
            .await?;
            if format == OutputFormat::Json {
                println!("{}", r.json);
            } else {
                print!("{}", r.toml);
            }
            Ok(())
        }
    }
}

/// Follows a started job to its results, with a byte progress bar (rate, ETA). Prints no
/// JSON itself: each caller prints exactly one JSON document, so `--output json` parses.
async fn follow(
    client: &Client,
    job: &pb::StartJobResponse,
    format: OutputFormat,
    byte_bar: bool,
) -> anyhow::Result<Vec<pb::CommandResult>> {
    let client = client.prefer_leader().await?;
    let req = pb::RunActionRequest {
        selector: None,
        action: job.action.clone(),
        timeout_ms: 0,
        wait: true,
        request_id: job.request_id.clone(),
    };
    let mut stream = client
        .call("follow backup job", |mut c| {
            let req = req.clone();
            async move { c.run_action(req).await }
        })
        .await?;
    let mut bar: Option<ProgressBar> = None;
    let mut results = Vec::new();
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(status) => {
                if let Some(b) = bar.take() {
                    b.abandon();
                }
                let e = map_status("follow", "", &status);
                anyhow::bail!(
                    "lost the event stream ({e}); the job keeps running on the agent: check `drctl backup list` later"
                );
            }
        };
        use pb::action_event::Event;
        match ev.event {
            Some(Event::Progress(p)) if format == OutputFormat::Text && p.total > 0 => {
                let b = bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(p.total);
                    let tpl = if byte_bar {
                        "{msg:<12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
                    } else {
                        "{msg:<12} [{bar:30}] {pos}/{len} ETA {eta}"
                    };
                    b.set_style(
                        ProgressStyle::with_template(tpl)
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                    b
                });
                b.set_length(p.total);
                b.set_position(p.done);
                b.set_message(p.message);
            }
            Some(Event::Result(r)) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                results.push(r);
            }
            Some(Event::Issued(_)) | Some(Event::Acked(_)) if format == OutputFormat::Text => {}
            _ => {}
        }
    }
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
    if results.len() < job.keys.len() {
        anyhow::bail!(
            "{} of {} command(s) of job {} reported no result; follow with `drctl commands list`",
            job.keys.len() - results.len(),
            job.keys.len(),
            job.request_id
        );
    }
    Ok(results)
}

fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn verified(b: &pb::BackupInfo) -> String {
    let v: Vec<String> = b
        .locations
        .iter()
        .filter(|l| l.verified_at_unix_ms > 0)
        .map(|l| format!("{}:{}", l.name, if l.verify_ok { "ok" } else { "BAD" }))
        .collect();
    if v.is_empty() {
        "never".into()
    } else {
        v.join(",")
    }
}

fn print_entry(b: &pb::BackupInfo) {
    println!("backup     {}", b.id);
    println!("db         {}  kind {}  host {}", b.db, b.kind, b.host_id);
    if !b.parent.is_empty() {
        println!("parent     {}", b.parent);
    }
    println!(
        "size       {} in {} files, {} added",
        bytes(b.bytes_total),
        b.files,
        bytes(b.bytes_added)
    );
    println!(
        "duration   {:.1}s  ({} .. {})",
        b.duration_ms as f64 / 1000.0,
        timestamp(b.started_at_unix_ms),
        timestamp(b.finished_at_unix_ms)
    );
    println!(
        "lsn        {} .. {} (timeline {})",
        b.start_lsn, b.stop_lsn, b.timeline
    );
    println!("created by {}  (command {})", b.created_by, b.command_key);
    for l in &b.locations {
        let v = if l.verified_at_unix_ms == 0 {
            "never verified".to_string()
        } else if l.verify_ok {
            format!("verified {}", timestamp(l.verified_at_unix_ms))
        } else {
            format!(
                "verify FAILED {}: {}",
                timestamp(l.verified_at_unix_ms),
                l.verify_problems.join("; ")
            )
        };
        let mark = if l.marked_for_delete_at_unix_ms > 0 {
            format!(
                ", marked for deletion {}",
                timestamp(l.marked_for_delete_at_unix_ms)
            )
        } else {
            String::new()
        };
        println!(
            "location   {} [{} {}] stored {} {v}{mark}",
            l.name,
            l.tier,
            l.jurisdiction,
            timestamp(l.stored_at_unix_ms)
        );
    }
}
