//! `drctl drill run backup-restore --db NAME [--host HOST]` and `drctl drill list`: the
//! spec's weekly "Backup Restore Test".
//!
//! Why a drill is an operation like a restore: it is one (latest backup into a scratch
//! instance on a free port and temp directory, verified), plus a `discard` step that throws
//! the instance away on success and on failure, and a result (`drill=pass|fail`, duration
//! against the 30-minute criterion) recorded in the log, so `drctl drill list` is the
//! history the auditors ask for.

use dr_proto::pb;
use dr_proto::pb::restore_service_client::RestoreServiceClient;

use crate::client::Client;
use crate::output::{OutputFormat, Table, json, timestamp};

#[derive(Debug, clap::Subcommand)]
pub enum DrillCmd {
    /// Run a drill now.
    Run {
        /// backup-restore
        #[arg(value_parser = ["backup-restore"])]
        drill: String,
        #[arg(long)]
        db: String,
        /// Designated host for the scratch instance (default: the policy's drill host,
        /// else the database's backup host).
        #[arg(long)]
        host: Option<String>,
        /// Return once started instead of following the drill.
        #[arg(long)]
        no_wait: bool,
    },
    /// Past and running drills, newest first, with pass/fail and duration.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

pub async fn run(client: &Client, cmd: DrillCmd, format: OutputFormat) -> anyhow::Result<()> {
    match cmd {
        DrillCmd::Run {
            drill,
            db,
            host,
            no_wait,
        } => {
            let req = pb::RunDrillRequest {
                drill,
                db,
                host: host.unwrap_or_default(),
                request_id: uuid::Uuid::new_v4().to_string(),
            };
            let resp = client
                .call_service("drill run", RestoreServiceClient::new, |mut c| {
                    let req = req.clone();
                    async move { c.run_drill(req).await }
                })
                .await?;
            crate::cmd::restore::started(client, resp, !no_wait, format).await
        }
        DrillCmd::List { limit } => {
            let resp = client
                .call_service(
                    "drill list",
                    RestoreServiceClient::new,
                    |mut c| async move { c.list_drills(pb::ListDrillsRequest { limit }).await },
                )
                .await?;
            match format {
                OutputFormat::Json => print!("{}", json(&resp)),
                OutputFormat::Text => {
                    let mut t = Table::new([
                        "op", "db", "started", "state", "result", "duration", "backup", "host",
                    ]);
                    for d in &resp.drills {
                        let r = |k: &str| d.results.get(k).cloned().unwrap_or_default();
                        let dur = r("duration_ms")
                            .parse::<f64>()
                            .map(|ms| format!("{:.1}s", ms / 1000.0))
                            .unwrap_or_default();
                        t.row([
                            d.id.to_string(),
                            d.cluster.trim_start_matches("drill:").to_owned(),
                            timestamp(d.created_at_unix_ms),
                            d.state.clone(),
                            r("drill"),
                            dur,
                            r("backup_id"),
                            d.to_region.clone(),
                        ]);
                    }
                    print!("{}", t.render());
                }
            }
            Ok(())
        }
    }
}
