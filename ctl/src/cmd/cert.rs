//! `drctl cert`: the private CA and every certificate of a deployment.
//!
//! Why drctl issues certificates itself: every port of the control plane is mutual TLS and
//! the *identity* of a process is the SPIFFE URI in its certificate's SAN
//! (`spiffe://<td>/coordinator/<node-id>`, `.../agent/<host-id>`,
//! `.../operator/<name>?role=<role>`). Getting that URI exactly right matters more than any
//! other field, so the shapes live in one place (here) instead of in an openssl recipe.
//!
//! Invariants:
//! - keys are ECDSA P-256 and written with mode 0600; certificates with 0644;
//! - files are written to a temporary name and renamed into place, so a coordinator or
//!   agent that re-reads its files on change (rotation without restart) never sees half a
//!   file;
//! - an existing CA is never overwritten without `--force` (that would orphan every
//!   certificate issued from it);
//! - the trust domain of a leaf always comes from the CA certificate, never from a flag, so
//!   a leaf cannot name a trust domain its CA does not vouch for.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dr_proto::identity::{Identity, Role, SpiffeId};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// CA lifetime: long enough to never surprise an operator, short enough to be finite.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default leaf lifetime (`--valid-for`).
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Leaves start this far in the past so that a host whose clock lags a little accepts them.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "a CA already exists in {dir} ({file}); refusing to overwrite it because every certificate \
         issued from it would stop working. Pass --force to replace it anyway"
    )]
    CaExists { dir: PathBuf, file: &'static str },
    #[error(
        "invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_' (e.g. dr.example.com)"
    )]
    BadTrustDomain(String),
    #[error("invalid name {name:?} for a {kind} certificate: {why}")]
    BadName {
        kind: Kind,
        name: String,
        why: String,
    },
    #[error("--role is required for operator certificates (viewer, operator or admin)")]
    RoleRequired,
    #[error("--role is only for operator certificates, not for {0} certificates")]
    RoleNotAllowed(Kind),
    #[error("unknown role {0:?}: expected viewer, operator or admin")]
    BadRole(String),
    #[error(
        "--dns/--ip are only for coordinator and agent certificates (servers), not for operators"
    )]
    SanNotAllowed,
    #[error("validity is empty: not-after {not_after} is not later than not-before {not_before}")]
    EmptyValidity {
        not_before: String,
        not_after: String,
    },
    #[error("time {0} is out of the range a certificate can hold")]
    TimeRange(String),
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("parse certificate {path}: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("{path} is not a drctl CA: no spiffe:// trust domain in its SAN or subject")]
    NoTrustDomain { path: PathBuf },
    #[error("the CA key {path} is not usable: {source}")]
    CaKey { path: PathBuf, source: rcgen::Error },
    #[error("generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

impl CertError {
    /// 2 for what the operator asked wrongly, 1 for what failed while doing it.
    pub fn exit_code(&self) -> u8 {
        match self {
            CertError::CaExists { .. }
            | CertError::BadTrustDomain(_)
            | CertError::BadName { .. }
            | CertError::RoleRequired
            | CertError::RoleNotAllowed(_)
            | CertError::BadRole(_)
            | CertError::SanNotAllowed
            | CertError::EmptyValidity { .. }
            | CertError::TimeRange(_) => 2,
            _ => 1,
        }
    }
}

pub type CertResult<T> = Result<T, CertError>;

/// What a certificate is for; decides its SAN URI path, EKUs and default SANs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Coordinator,
    Agent,
    Operator,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Coordinator => "coordinator",
            Kind::Agent => "agent",
            Kind::Operator => "operator",
        })
    }
}

/// Paths of one written certificate and its key.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenPair {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub identity: String,
}

/// Everything `cert issue` needs; `not_before`/`not_after` override `valid_for`.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub ca_dir: PathBuf,
    pub kind: Kind,
    pub name: String,
    pub role: Option<String>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub valid_for: Duration,
    pub not_before: Option<OffsetDateTime>,
    pub not_after: Option<OffsetDateTime>,
    pub out: Option<PathBuf>,
}

impl IssueRequest {
    /// A request with default validity and SANs, for callers such as `drctl demo`.
    pub fn new(ca_dir: &Path, kind: Kind, name: &str) -> Self {
        Self {
            ca_dir: ca_dir.to_path_buf(),
            kind,
            name: name.to_string(),
            role: None,
            dns: Vec::new(),
            ips: Vec::new(),
            valid_for: DEFAULT_LEAF_VALIDITY,
            not_before: None,
            not_after: None,
            out: None,
        }
    }
}

/// `drctl cert init`: a new self-signed CA for `trust_domain` in `out`.
pub fn init_ca(trust_domain: &str, out: &Path, force: bool) -> CertResult<WrittenPair> {
    validate_trust_domain(trust_domain)?;
    fs::create_dir_all(out).map_err(|source| CertError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    if !force {
        for file in [CA_CERT_FILE, CA_KEY_FILE] {
            if fs::symlink_metadata(out.join(file)).is_ok() {
                return Err(CertError::CaExists {
                    dir: out.to_path_buf(),
                    file,
                });
            }
        }
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "YesLocker DR CA");
    params
        .distinguished_name
        .push(DnType::CommonName, trust_domain);
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    // Path length 0: this CA signs leaves only, never an intermediate.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    let key_path = out.join(CA_KEY_FILE);
    let cert_path = out.join(CA_CERT_FILE);
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(trust_domain, dir = %out.display(), "created CA");
    Ok(WrittenPair {
        cert: cert_path,
        key: key_path,
        identity: format!("spiffe://{trust_domain}"),
    })
}

/// `drctl cert issue`: a leaf signed by the CA in `req.ca_dir`.
pub fn issue(req: &IssueRequest) -> CertResult<WrittenPair> {
    let ca_cert_path = req.ca_dir.join(CA_CERT_FILE);
    let ca_key_path = req.ca_dir.join(CA_KEY_FILE);
    let ca_pem = read_string(&ca_cert_path)?;
    let trust_domain = trust_domain_of_ca(&ca_cert_path, &ca_pem)?;
    let identity = identity_uri(&trust_domain, req.kind, &req.name, req.role.as_deref())?;

    let ca_key_pem = read_string(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| CertError::CaKey {
        path: ca_key_path.clone(),
        source,
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| CertError::Parse {
        path: ca_cert_path.clone(),
        why: e.to_string(),
    })?;

    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain.as_str());
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{}-{}", req.kind, req.name));
    params
        .subject_alt_names
        .push(SanType::URI(identity.clone().try_into()?));
    match req.kind {
        Kind::Coordinator | Kind::Agent => {
            let (dns, ips) = if req.dns.is_empty() && req.ips.is_empty() {
                (
                    vec!["localhost".to_string()],
                    vec![IpAddr::from([127, 0, 0, 1])],
                )
            } else {
                (req.dns.clone(), req.ips.clone())
            };
            for name in dns {
                params
                    .subject_alt_names
                    .push(SanType::DnsName(name.try_into()?));
            }
            for ip in ips {
                params.subject_alt_names.push(SanType::IpAddress(ip));
            }
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        Kind::Operator => {
            if !req.dns.is_empty() || !req.ips.is_empty() {
                return Err(CertError::SanNotAllowed);
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let (not_before, not_after) = validity(
        OffsetDateTime::now_utc(),
        req.valid_for,
        req.not_before,
        req.not_after,
    )?;
    params.not_before = not_before;
    params.not_after = not_after;

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    let out = req.out.clone().unwrap_or_else(|| req.ca_dir.clone());
    fs::create_dir_all(&out).map_err(|source| CertError::Write {
        path: out.clone(),
        source,
    })?;
    let stem = format!("{}-{}", req.kind, req.name);
    let key_path = out.join(format!("{stem}.key"));
    let cert_path = out.join(format!("{stem}.pem"));
    // Key first: a reloader that sees the new certificate finds its key already in place.
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(identity = %identity, cert = %cert_path.display(), "issued certificate");
    Ok(WrittenPair {
        cert: cert_path,
        key: key_path,
        identity,
    })
}

/// Decides the validity window. An explicit `not_after` in the past is allowed on purpose
/// (tests need expired certificates); then `not_before` moves back to keep the window sane.
pub fn validity(
    now: OffsetDateTime,
    valid_for: Duration,
    not_before: Option<OffsetDateTime>,
    not_after: Option<OffsetDateTime>,
) -> CertResult<(OffsetDateTime, OffsetDateTime)> {
    let default_start = now - CLOCK_SKEW;
    let (start, end) = match (not_before, not_after) {
        (Some(start), Some(end)) => (start, end),
        (Some(start), None) => (start, add(start, valid_for)?),
        (None, Some(end)) if end <= default_start => (sub(end, valid_for)?, end),
        (None, Some(end)) => (default_start, end),
        (None, None) => (default_start, add(default_start, valid_for)?),
    };
    if end <= start {
        return Err(CertError::EmptyValidity {
            not_before: rfc3339(start),
            not_after: rfc3339(end),
        });
    }
    Ok((start, end))
}

fn add(t: OffsetDateTime, d: Duration) -> CertResult<OffsetDateTime> {
    t.checked_add(time::Duration::try_from(d).map_err(|_| CertError::TimeRange(format!("{d:?}")))?)
        .ok_or_else(|| CertError::TimeRange(format!("{} + {d:?}", rfc3339(t))))
}

fn sub(t: OffsetDateTime, d: Duration) -> CertResult<OffsetDateTime> {
    t.checked_sub(time::Duration::try_from(d).map_err(|_| CertError::TimeRange(format!("{d:?}")))?)
        .ok_or_else(|| CertError::TimeRange(format!("{} - {d:?}", rfc3339(t))))
}

/// Parses an RFC 3339 timestamp for `--not-before/--not-after`.
pub fn parse_rfc3339(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("expected an RFC 3339 time such as 2030-01-31T00:00:00Z: {e}"))
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// The SAN URI for a certificate of `kind` named `name`, built and checked by
/// `dr_proto::identity` so that issuing and verifying can never disagree on its shape.
pub fn identity_uri(td: &str, kind: Kind, name: &str, role: Option<&str>) -> CertResult<String> {
    validate_trust_domain(td)?;
    let bad = |why: String| CertError::BadName {
        kind,
        name: name.to_string(),
        why,
    };
    let identity = match (kind, role) {
        (Kind::Operator, None) => return Err(CertError::RoleRequired),
        (Kind::Coordinator | Kind::Agent, Some(_)) => return Err(CertError::RoleNotAllowed(kind)),
        (Kind::Operator, Some(role)) => Identity::Operator {
            name: name.to_string(),
            role: role
                .parse::<Role>()
                .map_err(|_| CertError::BadRole(role.to_string()))?,
        },
        (Kind::Agent, None) => Identity::Agent {
            host_id: name.to_string(),
        },
        (Kind::Coordinator, None) => Identity::Coordinator {
            node_id: name
                .parse::<u64>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| {
                    bad("a coordinator is named by its node id, a positive number such as 1".into())
                })?,
        },
    };
    let id = SpiffeId::new(td, identity).map_err(|e| bad(e.to_string()))?;
    Ok(id.to_string())
}

fn validate_trust_domain(td: &str) -> CertResult<()> {
    let ok = dr_proto::identity::validate_trust_domain(td).is_ok()
        && !td.starts_with('.')
        && !td.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(CertError::BadTrustDomain(td.to_string()))
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and never with a leading zero byte: a canonical 16-byte DER INTEGER.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn read_string(path: &Path) -> CertResult<String> {
    fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode` set before
/// any byte is written (a key is never readable by others, not even for a moment).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> CertResult<()> {
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    // The mode passed to open() is filtered by the umask and ignored for an existing file.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)
}

/// A parsed certificate, for `cert show` and for tests.
#[derive(Debug, Clone, Serialize)]
pub struct CertSummary {
    pub path: PathBuf,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub identities: Vec<String>,
    pub dns: Vec<String>,
    pub ips: Vec<String>,
    pub not_before: String,
    pub not_after: String,
    /// valid | expired | not-yet-valid
    pub status: String,
    pub is_ca: bool,
    pub server_auth: bool,
    pub client_auth: bool,
}

/// Reads the first certificate of a PEM file.
pub fn show(path: &Path) -> CertResult<CertSummary> {
    let pem_text = fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let der = first_pem_der(path, &pem_text)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| CertError::Parse {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    summarize(path, &cert)
}

fn first_pem_der(path: &Path, pem_text: &[u8]) -> CertResult<Vec<u8>> {
    for pem in x509_parser::pem::Pem::iter_from_buffer(pem_text) {
        let pem = pem.map_err(|e| CertError::Parse {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        if pem.label == "CERTIFICATE" {
            return Ok(pem.contents);
        }
    }
    Err(CertError::NoCertificate {
        path: path.to_path_buf(),
    })
}

fn summarize(path: &Path, cert: &X509Certificate<'_>) -> CertResult<CertSummary> {
    let perr = |e: x509_parser::error::X509Error| CertError::Parse {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let mut identities = Vec::new();
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Some(san) = cert.subject_alternative_name().map_err(perr)? {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => identities.push((*uri).to_string()),
                GeneralName::DNSName(d) => dns.push((*d).to_string()),
                GeneralName::IPAddress(bytes) => ips.push(ip_to_string(bytes)),
                _ => {}
            }
        }
    }
    let (server_auth, client_auth) = match cert.extended_key_usage().map_err(perr)? {
        Some(eku) => (eku.value.server_auth, eku.value.client_auth),
        None => (false, false),
    };
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    let status = if now < validity.not_before {
        "not-yet-valid"
    } else if now > validity.not_after {
        "expired"
    } else {
        "valid"
    };
    Ok(CertSummary {
        path: path.to_path_buf(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        identities,
        dns,
        ips,
        not_before: asn1_rfc3339(validity.not_before),
        not_after: asn1_rfc3339(validity.not_after),
        status: status.to_string(),
        is_ca: cert.is_ca(),
        server_auth,
        client_auth,
    })
}

fn asn1_rfc3339(t: x509_parser::time::ASN1Time) -> String {
    OffsetDateTime::from_unix_timestamp(t.timestamp())
        .map(rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn ip_to_string(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()).to_string(),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default()).to_string(),
        _ => hex_string(bytes),
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The trust domain a CA vouches for: its `spiffe://<td>` SAN URI, else its subject CN.
pub fn trust_domain_of_ca(path: &Path, pem_text: &str) -> CertResult<String> {
    let der = first_pem_der(path, pem_text.as_bytes())?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| CertError::Parse {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Some(td) = uri.strip_prefix("spiffe://")
            {
                let td = td.trim_end_matches('/');
                if validate_trust_domain(td).is_ok() {
                    return Ok(td.to_string());
                }
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            let cn = cn.strip_prefix("spiffe://").unwrap_or(cn);
            if validate_trust_domain(cn).is_ok() {
                return Ok(cn.to_string());
            }
        }
    }
    Err(CertError::NoTrustDomain {
        path: path.to_path_buf(),
    })
}

/// `drctl cert ...`.
pub fn run(cmd: crate::cli::CertCmd, format: crate::output::OutputFormat) -> anyhow::Result<()> {
    use crate::cli::CertCmd;
    use crate::output::{OutputFormat, json};
    match cmd {
        CertCmd::Init {
            trust_domain,
            out,
            force,
        } => {
            let w = init_ca(&trust_domain, &out, force)?;
            match format {
                OutputFormat::Json => print!("{}", json(&w)),
                OutputFormat::Text => println!(
                    "created CA for {} in {} (key {}, mode 0600)",
                    w.identity,
                    w.cert.display(),
                    w.key.display()
                ),
            }
        }
        CertCmd::Issue(a) => {
            let req = IssueRequest {
                ca_dir: a.ca_dir,
                kind: a.kind,
                name: a.name,
                role: a.role,
                dns: a.dns,
                ips: a.ips,
                valid_for: a.valid_for,
                not_before: a.not_before,
                not_after: a.not_after,
                out: a.out,
            };
            let w = issue(&req)?;
            let summary = show(&w.cert)?;
            match format {
                OutputFormat::Json => print!("{}", json(&w)),
                OutputFormat::Text => {
                    println!(
                        "issued {} valid until {} ({})",
                        w.identity, summary.not_after, summary.status
                    );
                    println!(
                        "  cert {}\n  key  {} (mode 0600)",
                        w.cert.display(),
                        w.key.display()
                    );
                }
            }
            if summary.status != "valid" {
                eprintln!("note: this certificate is {} now", summary.status);
            }
        }
        CertCmd::Show { file } => {
            let s = show(&file)?;
            match format {
                OutputFormat::Json => print!("{}", json(&s)),
                OutputFormat::Text => print!("{}", render_summary(&s)),
            }
        }
    }
    Ok(())
}

/// Text for `cert show`.
pub fn render_summary(s: &CertSummary) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k:<12} {v}\n"));
    line("file", &s.path.display().to_string());
    line(
        "identity",
        &if s.identities.is_empty() {
            "(none)".to_string()
        } else {
            s.identities.join(", ")
        },
    );
    if !s.dns.is_empty() || !s.ips.is_empty() {
        line(
            "names",
            &s.dns
                .iter()
                .chain(s.ips.iter())
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    line("subject", &s.subject);
    line("issuer", &s.issuer);
    line("serial", &s.serial);
    line("not before", &s.not_before);
    line("not after", &s.not_after);
    line("status", &s.status);
    let mut usage = Vec::new();
    if s.is_ca {
        usage.push("CA");
    }
    if s.server_auth {
        usage.push("server");
    }
    if s.client_auth {
        usage.push("client");
    }
    line("usage", &usage.join(", "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(dir: &Path) {
        init_ca("test.example", dir, false).unwrap();
    }

    fn parse(path: &Path) -> (Vec<u8>, CertSummary) {
        let pem = fs::read(path).unwrap();
        let der = first_pem_der(path, &pem).unwrap();
        (der, show(path).unwrap())
    }

    #[test]
    fn ca_has_trust_domain_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        let (_, s) = parse(&dir.path().join(CA_CERT_FILE));
        assert!(s.is_ca);
        assert_eq!(s.identities, vec!["spiffe://test.example".to_string()]);
        let pem = fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
        assert_eq!(
            trust_domain_of_ca(dir.path(), &pem).unwrap(),
            "test.example"
        );
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = init_ca("test.example", dir.path(), false).unwrap_err();
        assert!(matches!(err, CertError::CaExists { .. }), "{err}");
        init_ca("test.example", dir.path(), true).unwrap();
    }

    #[test]
    fn coordinator_cert_has_uri_eku_and_default_sans() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        let w = issue(&IssueRequest::new(dir.path(), Kind::Coordinator, "2")).unwrap();
        assert_eq!(w.cert, dir.path().join("coordinator-2.pem"));
        let (der, s) = parse(&w.cert);
        assert_eq!(
            s.identities,
            vec!["spiffe://test.example/coordinator/2".to_string()]
        );
        assert_eq!(s.dns, vec!["localhost".to_string()]);
        assert_eq!(s.ips, vec!["127.0.0.1".to_string()]);
        assert!(s.server_auth && s.client_auth && !s.is_ca);
        assert_eq!(s.status, "valid");
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86400;
        assert_eq!(days, 365);
        // Signed by the CA: the signature verifies with the CA's public key.
        let ca_pem = fs::read(dir.path().join(CA_CERT_FILE)).unwrap();
        let ca_der = first_pem_der(dir.path(), &ca_pem).unwrap();
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        // Only the leaf in the file.
        let text = fs::read_to_string(&w.cert).unwrap();
        assert_eq!(text.matches("BEGIN CERTIFICATE").count(), 1);
        let mode = fs::metadata(&w.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn dr_proto_reads_what_we_issue() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        let ca_pem = fs::read(dir.path().join(CA_CERT_FILE)).unwrap();
        let ca_der = first_pem_der(dir.path(), &ca_pem).unwrap();
        assert_eq!(
            dr_proto::identity::trust_domain_of_ca(&ca_der).unwrap(),
            "test.example"
        );
        let mut op = IssueRequest::new(dir.path(), Kind::Operator, "alice");
        op.role = Some("operator".into());
        for (req, want) in [
            (
                IssueRequest::new(dir.path(), Kind::Coordinator, "3"),
                Identity::Coordinator { node_id: 3 },
            ),
            (
                IssueRequest::new(dir.path(), Kind::Agent, "site-gw-001"),
                Identity::Agent {
                    host_id: "site-gw-001".into(),
                },
            ),
            (
                op,
                Identity::Operator {
                    name: "alice".into(),
                    role: Role::Operator,
                },
            ),
        ] {
            let w = issue(&req).unwrap();
            let (der, _) = parse(&w.cert);
            let id = SpiffeId::from_cert_der(&der).unwrap();
            assert_eq!(id.trust_domain, "test.example");
            assert_eq!(id.identity, want);
            assert_eq!(id.to_string(), w.identity);
        }
        // And the TLS layer accepts the files as a server and a client.
        let coord = issue(&IssueRequest::new(dir.path(), Kind::Coordinator, "1")).unwrap();
        let paths = dr_proto::tls::TlsPaths {
            ca: dir.path().join(CA_CERT_FILE),
            cert: coord.cert,
            key: coord.key,
            reload_interval: None,
        };
        dr_proto::tls::ServerTls::load(&paths).unwrap();
        dr_proto::tls::ClientTls::load(&paths).unwrap();
    }

    #[test]
    fn agent_cert_with_explicit_names() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        let out = dir.path().join("out");
        let mut req = IssueRequest::new(dir.path(), Kind::Agent, "bj-db-1");
        req.dns = vec!["bj-db-1.internal".into()];
        req.ips = vec!["10.0.0.5".parse().unwrap()];
        req.out = Some(out.clone());
        let w = issue(&req).unwrap();
        assert_eq!(w.cert, out.join("agent-bj-db-1.pem"));
        let (_, s) = parse(&w.cert);
        assert_eq!(
            s.identities,
            vec!["spiffe://test.example/agent/bj-db-1".to_string()]
        );
        assert_eq!(s.dns, vec!["bj-db-1.internal".to_string()]);
        assert_eq!(s.ips, vec!["10.0.0.5".to_string()]);
        assert!(s.server_auth && s.client_auth);
    }

    #[test]
    fn operator_cert_needs_role_and_is_client_only() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        let mut req = IssueRequest::new(dir.path(), Kind::Operator, "alice");
        assert!(matches!(issue(&req), Err(CertError::RoleRequired)));
        req.role = Some("root".into());
        assert!(matches!(issue(&req), Err(CertError::BadRole(_))));
        req.role = Some("admin".into());
        let w = issue(&req).unwrap();
        let (_, s) = parse(&w.cert);
        assert_eq!(
            s.identities,
            vec!["spiffe://test.example/operator/alice?role=admin".to_string()]
        );
        assert!(s.client_auth && !s.server_auth);
        assert!(s.dns.is_empty() && s.ips.is_empty());

        let mut agent = IssueRequest::new(dir.path(), Kind::Agent, "h1");
        agent.role = Some("admin".into());
        assert!(matches!(
            issue(&agent),
            Err(CertError::RoleNotAllowed(Kind::Agent))
        ));
        let coord = IssueRequest::new(dir.path(), Kind::Coordinator, "one");
        assert!(matches!(issue(&coord), Err(CertError::BadName { .. })));
        let bad_host = IssueRequest::new(dir.path(), Kind::Agent, "a/b");
        assert!(matches!(issue(&bad_host), Err(CertError::BadName { .. })));
    }

    #[test]
    fn expired_certificate_can_be_issued() {
        let dir = tempfile::tempdir().unwrap();
        ca(dir.path());
        let mut req = IssueRequest::new(dir.path(), Kind::Operator, "old");
        req.role = Some("viewer".into());
        req.not_after = Some(parse_rfc3339("2020-01-02T00:00:00Z").unwrap());
        let w = issue(&req).unwrap();
        let (_, s) = parse(&w.cert);
        assert_eq!(s.status, "expired");
        assert_eq!(s.not_after, "2020-01-02T00:00:00Z");
        assert_eq!(s.not_before, "2019-01-02T00:00:00Z");
    }

    #[test]
    fn validity_rules() {
        let now = parse_rfc3339("2025-06-01T00:00:00Z").unwrap();
        let day = Duration::from_secs(86400);
        let (nb, na) = validity(now, day, None, None).unwrap();
        assert_eq!(nb, now - CLOCK_SKEW);
        assert_eq!(na, nb + day);
        let start = parse_rfc3339("2030-01-01T00:00:00Z").unwrap();
        assert_eq!(
            validity(now, day, Some(start), None).unwrap(),
            (start, start + day)
        );
        let err = validity(now, day, Some(start), Some(start)).unwrap_err();
        assert!(matches!(err, CertError::EmptyValidity { .. }));
        let late = parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        assert_eq!(
            validity(now, day, None, Some(late)).unwrap(),
            (now - CLOCK_SKEW, late)
        );
    }

    #[test]
    fn trust_domain_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            init_ca("Bad Domain", dir.path(), false),
            Err(CertError::BadTrustDomain(_))
        ));
        assert!(identity_uri("ok.td", Kind::Coordinator, "0", None).is_err());
        assert!(identity_uri("ok.td", Kind::Agent, "", None).is_err());
        assert_eq!(
            identity_uri("ok.td", Kind::Coordinator, "7", None).unwrap(),
            "spiffe://ok.td/coordinator/7"
        );
    }
}
