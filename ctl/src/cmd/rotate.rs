//! `drctl rotate-credentials --emergency [--scope db|app|certs|all]`: DRP scenario 3.
//!
//! Order (why): secrets first, then certificates. A leaked database password is usable
//! from anywhere at once, a leaked agent key only against our coordinators (mutual TLS),
//! so the passwords die first.
//!
//! ```text
//!  db/app:  RotateCredentials ─> each agent: new password (CSPRNG, on the host) ─> ALTER ROLE
//!           with a SCRAM verifier ─> secret files atomically ─> reload ─> old password proven dead
//!  certs:   RequestCertificates ─> each agent makes a key HERE-ON-THE-HOST and returns a CSR
//!           ─> drctl signs each CSR with --ca-dir (identity checked against the host)
//!           ─> InstallCertificates ─> each agent installs, reloads without restart
//!           ─> the coordinators revoke the replaced certificates (SHA-256, Raft state)
//! ```
//! drctl prints names, paths, fingerprints and proofs; it never sees a password or a key.
//!
//! Approvals: when the policy requires rotate-credentials, the first call is refused with
//! "needs approval: request R-N". Secrets rotate when another admin approves; the
//! certificate flow cannot be launched by an approval (it needs this CA and this run), so
//! the approval grants it to the requester, who runs again with `--approved R-N`, passed
//! on every certificate RPC.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use dr_proto::pb;
use dr_proto::pb::response_service_client::ResponseServiceClient;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::isolate::{SelectorArgs, ms, report, waiting_client};
use crate::client::Client;
use crate::cmd::UsageError;
use crate::output::OutputFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scope {
    Db,
    App,
    Certs,
    All,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Required: this is the emergency procedure (every credential of the scope, now).
    #[arg(long)]
    pub emergency: bool,
    #[arg(long, value_enum, default_value_t = Scope::All)]
    pub scope: Scope,
    #[command(flatten)]
    pub select: SelectorArgs,
    /// CA directory (ca.pem, ca.key) that signs the agents' new certificates (scope certs
    /// or all). The CA key stays on this machine.
    #[arg(long = "ca-dir", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Validity of the new certificates.
    #[arg(long = "valid-for", default_value = "365d", value_parser = crate::cli::parse_duration)]
    pub valid_for: Duration,
    #[arg(long, default_value = "")]
    pub reason: String,
    /// How long each agent may take per step.
    #[arg(long = "wait", default_value = "120s", value_parser = crate::cli::parse_duration)]
    pub wait: Duration,
    /// With scope certs/all, leave the coordinators' own certificates alone (by default
    /// every coordinator of the cluster is re-issued too, one at a time).
    #[arg(long = "no-coordinators")]
    pub no_coordinators: bool,
    /// The approval (`R-N`) that granted this certificate rotation to you, when the
    /// approvals policy requires rotate-credentials (scope certs or all; with all, the
    /// secrets already rotated when R-N was approved, so only the certificates run).
    #[arg(long = "approved", value_name = "R-N")]
    pub approved: Option<String>,
}

/// Signs `csr_pem` for `host_id` with the CA in `ca_dir`, refusing a CSR whose identity is
/// not exactly this host's agent identity. Only the CSR's public key and its DNS/IP SANs
/// are taken from it; everything else (EKU, validity, serial) is decided here.
pub fn sign_csr(
    ca_dir: &Path,
    host_id: &str,
    csr_pem: &str,
    valid_for: Duration,
) -> anyhow::Result<String> {
    sign_csr_for(
        ca_dir,
        super::cert::Kind::Agent,
        host_id,
        csr_pem,
        valid_for,
    )
}

/// [`sign_csr`] for any kind: the CSR's only URI SAN must be exactly `kind`/`name` of the
/// CA's trust domain (a coordinator's CSR names `coordinator/<node id>`).
pub fn sign_csr_for(
    ca_dir: &Path,
    kind: super::cert::Kind,
    host_id: &str,
    csr_pem: &str,
    valid_for: Duration,
) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let ca_cert_path = ca_dir.join(super::cert::CA_CERT_FILE);
    let ca_key_path = ca_dir.join(super::cert::CA_KEY_FILE);
    let ca_pem = std::fs::read_to_string(&ca_cert_path)
        .with_context(|| format!("read {}", ca_cert_path.display()))?;
    let td = super::cert::trust_domain_of_ca(&ca_cert_path, &ca_pem)?;
    let expected = super::cert::identity_uri(&td, kind, host_id, None)?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .with_context(|| format!("read {}", ca_key_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| anyhow::anyhow!("{}: not a usable CA key: {e}", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| anyhow::anyhow!("{}: {e}", ca_cert_path.display()))?;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| anyhow::anyhow!("the CSR of {host_id} does not parse: {e}"))?;
    let uris: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_owned()),
            _ => None,
        })
        .collect();
    if uris != [expected.clone()] {
        anyhow::bail!(
            "the CSR of host {host_id} asks for identity {uris:?}, but this host's identity is {expected}: not signed"
        );
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, td.as_str());
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{kind}-{host_id}"));
    params.subject_alt_names = csr
        .params
        .subject_alt_names
        .iter()
        .filter(|s| {
            matches!(
                s,
                SanType::URI(_) | SanType::DnsName(_) | SanType::IpAddress(_)
            )
        })
        .cloned()
        .collect();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let (nb, na) = super::cert::validity(OffsetDateTime::now_utc(), valid_for, None, None)?;
    params.not_before = nb;
    params.not_after = na;
    let signed = CertificateSigningRequestParams {
        params,
        public_key: csr.public_key,
    }
    .signed_by(&issuer)
    .map_err(|e| anyhow::anyhow!("signing the certificate of {host_id}: {e}"))?;
    Ok(signed.pem())
}

pub async fn run(client: &Client, a: RotateArgs, format: OutputFormat) -> anyhow::Result<()> {
    if !a.emergency {
        return Err(UsageError(
            "only the emergency rotation exists: pass --emergency (every credential of the scope is replaced now)".into(),
        )
        .into());
    }
    let selector = a.select.selector()?;
    let want_certs = matches!(a.scope, Scope::Certs | Scope::All);
    let ca_dir = match (&a.ca_dir, want_certs) {
        (Some(d), true) => Some(d.clone()),
        (None, true) => {
            return Err(UsageError(
                "scope certs/all re-issues certificates: give --ca-dir DIR (the CA that signs them; its key stays here), or use --scope db|app".into(),
            )
            .into());
        }
        (Some(_), false) => {
            return Err(UsageError("--ca-dir is for scope certs or all".into()).into());
        }
        (None, false) => None,
    };
    if let Some(d) = &ca_dir {
        // Fail before anything rotates if the CA cannot sign.
        for f in [super::cert::CA_CERT_FILE, super::cert::CA_KEY_FILE] {
            if !d.join(f).is_file() {
                return Err(UsageError(format!("--ca-dir {}: {f} is missing", d.display())).into());
            }
        }
    }
    let approved = a.approved.clone().unwrap_or_default();
    if !approved.is_empty() && !want_certs {
        return Err(UsageError(
            "--approved is for the certificate steps (scope certs or all): a db/app rotation runs by itself when it is approved (`drctl approvals show R-N` shows what it did)".into(),
        )
        .into());
    }
    let client = waiting_client(client, a.wait)?;
    let mut failures = Vec::new();

    // 1. passwords and application secrets
    let secrets_scope = match a.scope {
        Scope::Db => Some("db"),
        Scope::App => Some("app"),
        Scope::All => Some("all"),
        Scope::Certs => None,
    };
    // With --approved, the secrets of scope all already rotated at the approval.
    let secrets_scope = secrets_scope.filter(|_| approved.is_empty());
    if !approved.is_empty() && a.scope == Scope::All && format == OutputFormat::Text {
        println!(
            "secrets (all): rotated when {approved} was approved (`drctl approvals show {approved}`)"
        );
    }
    if let Some(scope) = secrets_scope {
        let req = pb::RotateCredentialsRequest {
            selector: Some(selector.clone()),
            scope: scope.to_owned(),
            emergency: true,
            timeout_ms: ms(a.wait),
            reason: a.reason.clone(),
        };
        let resp = client
            .call_service(
                "rotate-credentials",
                ResponseServiceClient::new,
                move |mut c| {
                    let req = req.clone();
                    async move { c.rotate_credentials(req).await }
                },
            )
            .await?;
        if format == OutputFormat::Text {
            println!("secrets ({scope}):");
        }
        if let Err(e) = report(
            "secret rotation",
            &resp.hosts,
            &["roles", "app_secrets", "reloaded", "proof"],
            format,
        ) {
            failures.push(e.to_string());
        }
    }

    // 2. certificates
    if let Some(ca_dir) = ca_dir {
        let req = pb::RequestCertificatesRequest {
            selector: Some(selector.clone()),
            timeout_ms: ms(a.wait),
            approved_request: approved.clone(),
        };
        let csrs = client
            .call_service(
                "request-certificates",
                ResponseServiceClient::new,
                move |mut c| {
                    let req = req.clone();
                    async move { c.request_certificates(req).await }
                },
            )
            .await?;
        for f in &csrs.failed {
            failures.push(format!(
                "certificate request on {}: {}",
                f.host_id, f.message
            ));
        }
        let mut signed = Vec::new();
        for r in &csrs.requests {
            match sign_csr(&ca_dir, &r.host_id, &r.csr_pem, a.valid_for) {
                Ok(cert_pem) => signed.push(pb::SignedCertificate {
                    host_id: r.host_id.clone(),
                    cert_pem,
                    old_cert_sha256: r.old_cert_sha256.clone(),
                    approved_request: String::new(),
                }),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        if !signed.is_empty() {
            let req = pb::InstallCertificatesRequest {
                certificates: signed,
                timeout_ms: ms(a.wait),
                reason: a.reason.clone(),
                approved_request: approved.clone(),
            };
            let resp = client
                .call_service(
                    "install-certificates",
                    ResponseServiceClient::new,
                    move |mut c| {
                        let req = req.clone();
                        async move { c.install_certificates(req).await }
                    },
                )
                .await?;
            if format == OutputFormat::Text {
                println!("certificates (old ones revoked on every coordinator):");
            }
            if let Err(e) = report(
                "certificate rotation",
                &resp.hosts,
                &["identity", "replaced_cert_sha256", "new_cert_sha256"],
                format,
            ) {
                failures.push(e.to_string());
            }
        }
        // 3. the coordinators' own certificates, one node at a time (each reloads before
        //    its old certificate is revoked, so peers and agents never refuse it).
        if !a.no_coordinators {
            match rotate_coordinators(&client, &ca_dir, a.valid_for, &approved, format).await {
                Ok(f) => failures.extend(f),
                Err(e) => failures.push(format!("coordinator certificates: {e:#}")),
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", failures.join("; "))
    }
}

/// Re-issues every coordinator's certificate: CSR from the node itself (its key is made
/// there), signed here, installed on that node. Returns the per-node failures.
async fn rotate_coordinators(
    client: &Client,
    ca_dir: &Path,
    valid_for: Duration,
    approved: &str,
    format: OutputFormat,
) -> anyhow::Result<Vec<String>> {
    let status = client
        .call("cluster status", |mut c| async move {
            c.cluster_status(pb::ClusterStatusRequest {
                linearizable: false,
            })
            .await
        })
        .await?;
    let mut members: Vec<_> = status.members.clone();
    // The leader last: its rotation makes every agent reconnect once.
    members.sort_by_key(|m| (m.node_id == status.leader_id, m.node_id));
    let mut failures = Vec::new();
    let mut outcomes = Vec::new();
    for m in members {
        let mut cfg = client.config().clone();
        cfg.endpoints = vec![m.addr.clone()];
        let one = Client::new(cfg)?;
        let req = pb::RequestCoordinatorCertificateRequest {
            approved_request: approved.to_owned(),
        };
        let csr = match one
            .call_service(
                "coordinator certificate request",
                ResponseServiceClient::new,
                move |mut c| {
                    let req = req.clone();
                    async move { c.request_coordinator_certificate(req).await }
                },
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("coordinator {} ({}): {e}", m.node_id, m.addr));
                continue;
            }
        };
        if csr.host_id != m.node_id.to_string() {
            failures.push(format!(
                "{} answered as coordinator {}, expected {}: not signed",
                m.addr, csr.host_id, m.node_id
            ));
            continue;
        }
        let cert_pem = match sign_csr_for(
            ca_dir,
            super::cert::Kind::Coordinator,
            &csr.host_id,
            &csr.csr_pem,
            valid_for,
        ) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{e:#}"));
                continue;
            }
        };
        let req = pb::SignedCertificate {
            host_id: csr.host_id.clone(),
            cert_pem,
            old_cert_sha256: csr.old_cert_sha256.clone(),
            approved_request: approved.to_owned(),
        };
        match one
            .call_service(
                "coordinator certificate install",
                ResponseServiceClient::new,
                move |mut c| {
                    let req = req.clone();
                    async move { c.install_coordinator_certificate(req).await }
                },
            )
            .await
        {
            Ok(o) => outcomes.push(o),
            Err(e) => failures.push(format!("coordinator {} ({}): {e}", m.node_id, m.addr)),
        }
    }
    if format == OutputFormat::Text {
        println!("coordinator certificates (old ones revoked; agents and peers refuse them):");
    }
    if let Err(e) = report(
        "coordinator certificate rotation",
        &outcomes,
        &["identity", "replaced_cert_sha256", "new_cert_sha256"],
        format,
    ) {
        failures.push(e.to_string());
    }
    Ok(failures)
}
