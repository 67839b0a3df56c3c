//! `drctl security monitoring --level normal|high` and `drctl security status`.
//!
//! Why the level lives in the cluster and not on each agent: an agent that restarts or
//! connects later must come back at the level the incident response set; the coordinator
//! leader keeps pushing it until each agent reports it.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use dr_proto::pb;
use dr_proto::pb::response_service_client::ResponseServiceClient;

use crate::client::Client;
use crate::output::{OutputFormat, Table, json, timestamp};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Level {
    Normal,
    High,
}

#[derive(Debug, Subcommand)]
pub enum SecurityCmd {
    /// Set the monitoring level (high: integrity and health checks run more often) and the
    /// refused-handshake alert threshold.
    Monitoring(MonitoringArgs),
    /// Isolated hosts, revoked certificates, monitoring level, recent alerts.
    Status,
    /// Revoke certificates (a lost operator or agent key): every coordinator refuses them
    /// from now on and closes the connections already open with them (admin).
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// A PEM certificate file to revoke (repeatable).
    /// (The field is not named `cert`: clap ids are global, and `cert` is drctl's own
    /// `--cert`.)
    #[arg(long = "certificate", value_name = "FILE")]
    pub certificate: Vec<std::path::PathBuf>,
    /// A certificate's hex SHA-256 (of its DER) to revoke (repeatable).
    #[arg(long = "sha256", value_name = "HEX")]
    pub sha256: Vec<String>,
    #[arg(long, default_value = "")]
    pub reason: String,
}

/// (sha256, identity) of every certificate named by --cert and --sha256.
fn revocation_targets(a: &RevokeArgs) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    use anyhow::Context as _;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let (mut fps, mut ids) = (Vec::new(), Vec::new());
    for path in &a.certificate {
        let pem = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let leaf = CertificateDer::pem_slice_iter(&pem)
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| {
                crate::cmd::UsageError(format!(
                    "--certificate {}: no PEM certificate in the file",
                    path.display()
                ))
            })?;
        fps.push(dr_proto::tls::cert_sha256_hex(&leaf));
        ids.push(
            dr_proto::identity::SpiffeId::from_cert_der(&leaf)
                .map(|i| i.to_string())
                .unwrap_or_default(),
        );
    }
    for fp in &a.sha256 {
        fps.push(fp.to_ascii_lowercase());
    }
    if fps.is_empty() {
        return Err(crate::cmd::UsageError(
            "name the certificates to revoke: --certificate FILE or --sha256 HEX".into(),
        )
        .into());
    }
    Ok((fps, ids))
}

#[derive(Debug, Args)]
pub struct MonitoringArgs {
    #[arg(long, value_enum)]
    pub level: Level,
    /// Refused TLS handshakes from one source within the window that raise an alert.
    #[arg(long = "refusal-threshold")]
    pub refusal_threshold: Option<u32>,
    /// The window of the refusal threshold (e.g. 60s).
    #[arg(long = "refusal-window", value_parser = crate::cli::parse_duration)]
    pub refusal_window: Option<Duration>,
}

pub async fn run(client: &Client, cmd: SecurityCmd, format: OutputFormat) -> anyhow::Result<()> {
    let resp = match cmd {
        SecurityCmd::Monitoring(a) => {
            let req = pb::SetMonitoringRequest {
                level: match a.level {
                    Level::Normal => "normal",
                    Level::High => "high",
                }
                .into(),
                refusal_threshold: a.refusal_threshold.unwrap_or(0),
                refusal_window_s: a
                    .refusal_window
                    .map_or(0, |d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)),
            };
            client
                .call_service(
                    "security monitoring",
                    ResponseServiceClient::new,
                    move |mut c| {
                        let req = req.clone();
                        async move { c.set_monitoring(req).await }
                    },
                )
                .await?
        }
        SecurityCmd::Status => fetch(client).await?,
        SecurityCmd::Revoke(a) => {
            let (sha256, identity) = revocation_targets(&a)?;
            let req = pb::RevokeCertificatesRequest {
                sha256,
                identity,
                reason: a.reason,
            };
            client
                .call_service(
                    "security revoke",
                    ResponseServiceClient::new,
                    move |mut c| {
                        let req = req.clone();
                        async move { c.revoke_certificates(req).await }
                    },
                )
                .await?
        }
    };
    if format == OutputFormat::Json {
        println!("{}", json(&resp));
    } else {
        print!("{}", render(&resp, 20));
    }
    Ok(())
}

pub async fn fetch(client: &Client) -> anyhow::Result<pb::SecurityStatusResponse> {
    Ok(client
        .call_service(
            "security status",
            ResponseServiceClient::new,
            |mut c| async move { c.security_status(pb::SecurityStatusRequest {}).await },
        )
        .await?)
}

/// The security block of `drctl status` and `drctl security status`.
pub fn render(s: &pb::SecurityStatusResponse, max_alerts: usize) -> String {
    let mut out = format!(
        "security: monitoring level {}; alert after {} refused handshakes from one source within {}s; {} revoked certificate(s)\n",
        s.monitoring_level,
        s.refusal_threshold,
        s.refusal_window_s,
        s.revoked.len()
    );
    if s.isolated.is_empty() {
        out.push_str("isolated hosts: none\n");
    } else {
        let mut t = Table::new(["ISOLATED HOST", "SINCE", "BY", "REASON", "ALLOW-MGMT"]);
        for i in &s.isolated {
            t.row([
                i.host_id.clone(),
                timestamp(i.since_unix_ms),
                i.by.clone(),
                i.reason.clone(),
                i.allow_mgmt.join(","),
            ]);
        }
        out.push_str(&t.render());
    }
    if !s.alerts.is_empty() {
        let mut t = Table::new(["ALERT", "AT", "KIND", "SOURCE", "DETAIL"]);
        for a in s.alerts.iter().rev().take(max_alerts) {
            t.row([
                a.seq.to_string(),
                timestamp(a.at_unix_ms),
                a.kind.clone(),
                a.source.clone(),
                a.detail.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}
