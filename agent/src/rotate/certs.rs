//! Replacing the agent's own TLS certificate and key (`rotate-credentials scope=certs`).
//!
//! Why so many checks before writing: a wrong pair on disk cuts the agent off from every
//! coordinator at the next reload or restart, on a host that may already be isolated. So
//! the new pair must (1) parse, (2) have a key that matches the certificate, (3) carry the
//! same SPIFFE identity as the current certificate (a rotation never changes who the agent
//! is) and (4) chain to the CA bundle the agent trusts. Only then is the key written, then
//! the certificate, each atomically; `dr_proto::tls` notices the change and reloads (a
//! reload that catches the new key with the old certificate fails and keeps the previous
//! config until the next tick sees both).

use std::sync::Arc;

use dr_proto::identity::SpiffeId;
use dr_proto::tls::TlsPaths;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;

use super::Secret;
use super::atomic_file::{AtomicWriteError, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cert_pem holds no PEM certificate")]
    NoCert,
    /// Deliberately without detail: the parser's message could quote key bytes.
    #[error("key_pem holds no usable PEM private key")]
    BadKey,
    #[error("the new key does not match the new certificate")]
    KeyMismatch,
    #[error("the new certificate's identity {new} differs from this agent's {current}")]
    IdentityChanged { new: String, current: String },
    #[error("the new certificate has no valid identity: {0}")]
    Identity(String),
    #[error("cannot read the current certificate or CA: {0}")]
    Current(String),
    #[error("the new certificate does not chain to this agent's CA bundle: {0}")]
    Untrusted(String),
    #[error("{0}")]
    Write(#[from] AtomicWriteError),
    #[error("writing certificates: {0}")]
    Task(String),
}

fn certs_of(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// Checks the new pair (see the module docs) and returns its identity.
pub fn validate(tls: &TlsPaths, cert_pem: &str, key_pem: &Secret) -> Result<String, CertError> {
    let chain = certs_of(cert_pem.as_bytes());
    let leaf = chain.first().ok_or(CertError::NoCert)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.expose().as_bytes())
        .map_err(|_| CertError::BadKey)?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|_| CertError::BadKey)?;
    CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|_| CertError::KeyMismatch)?;

    let new_id = SpiffeId::from_cert_der(leaf).map_err(|e| CertError::Identity(e.to_string()))?;
    let current_pem = std::fs::read(&tls.cert)
        .map_err(|e| CertError::Current(format!("{}: {e}", tls.cert.display())))?;
    let current = certs_of(&current_pem);
    let current_id = current
        .first()
        .ok_or_else(|| CertError::Current(format!("{} holds no certificate", tls.cert.display())))
        .and_then(|c| SpiffeId::from_cert_der(c).map_err(|e| CertError::Current(e.to_string())))?;
    if new_id != current_id {
        return Err(CertError::IdentityChanged {
            new: new_id.to_string(),
            current: current_id.to_string(),
        });
    }

    let ca_pem = std::fs::read(&tls.ca)
        .map_err(|e| CertError::Current(format!("{}: {e}", tls.ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs_of(&ca_pem) {
        roots
            .add(c)
            .map_err(|e| CertError::Current(format!("CA bundle: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider))
        .build()
        .map_err(|e| CertError::Untrusted(e.to_string()))?;
    verifier
        .verify_client_cert(leaf, &chain[1..], UnixTime::now())
        .map_err(|e| CertError::Untrusted(e.to_string()))?;
    Ok(new_id.to_string())
}

/// Validates and installs the new pair; returns the (unchanged) identity.
pub async fn replace(
    tls: &TlsPaths,
    cert_pem: &str,
    key_pem: &Secret,
) -> Result<String, CertError> {
    let (tls, cert_pem, key_pem) = (tls.clone(), cert_pem.to_string(), key_pem.clone());
    tokio::task::spawn_blocking(move || {
        let id = validate(&tls, &cert_pem, &key_pem)?;
        write_atomic(&tls.key, key_pem.expose().as_bytes(), 0o600)?;
        write_atomic(&tls.cert, cert_pem.as_bytes(), 0o644)?;
        Ok(id)
    })
    .await
    .map_err(|e| CertError::Task(e.to_string()))?
}

/// Where the key of a pending certificate request waits for its certificate
/// (`<data_dir>/rotation/pending-key.pem`, mode 0600).
pub const PENDING_KEY: &str = "pending-key.pem";

/// A certificate request made by [`request`]. Public data only.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub csr_pem: String,
    pub identity: String,
    /// SHA-256 of the DER of the certificate in use now (the one to revoke).
    pub old_cert_sha256: String,
}

fn current_leaf(tls: &TlsPaths) -> Result<(CertificateDer<'static>, String), CertError> {
    let pem = std::fs::read(&tls.cert)
        .map_err(|e| CertError::Current(format!("{}: {e}", tls.cert.display())))?;
    let leaf = certs_of(&pem).into_iter().next().ok_or_else(|| {
        CertError::Current(format!("{} holds no certificate", tls.cert.display()))
    })?;
    let pem_text = String::from_utf8_lossy(&pem).into_owned();
    Ok((leaf, pem_text))
}

/// Makes a new key pair HERE and returns a CSR for the agent's current identity and SANs.
///
/// Why the key is made on the agent: a key generated elsewhere has to travel to the host,
/// and anything that travels through the coordinators lands in their Raft log. The key is
/// written to `dir/`[`PENDING_KEY`] (0600) and used by [`install`]; a newer request
/// replaces it, so only the newest CSR can be completed.
pub fn request(tls: &TlsPaths, dir: &std::path::Path) -> Result<CertRequest, CertError> {
    let (leaf, _) = current_leaf(tls)?;
    let identity = SpiffeId::from_cert_der(&leaf).map_err(|e| CertError::Current(e.to_string()))?;
    let old_cert_sha256 = dr_proto::tls::cert_sha256_hex(&leaf);
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, identity.identity.name());
    params.subject_alt_names = current_sans(&leaf)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CertError::Task(format!("key generation: {e}")))?;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| CertError::Task(format!("building the CSR: {e}")))?;
    std::fs::create_dir_all(dir).map_err(|e| CertError::Task(format!("{}: {e}", dir.display())))?;
    let key_pem = Secret::new(key.serialize_pem());
    write_atomic(&dir.join(PENDING_KEY), key_pem.expose().as_bytes(), 0o600)?;
    Ok(CertRequest {
        csr_pem: csr,
        identity: identity.to_string(),
        old_cert_sha256,
    })
}

/// What [`install`] did.
#[derive(Debug, Clone)]
pub struct Installed {
    pub identity: String,
    pub replaced_cert_sha256: String,
    pub new_cert_sha256: String,
}

/// Installs a certificate signed for the pending key of [`request`]: validates the pair
/// (see [`validate`]), writes key then certificate atomically, removes the pending key.
pub fn install(
    tls: &TlsPaths,
    dir: &std::path::Path,
    cert_pem: &str,
) -> Result<Installed, CertError> {
    let pending = dir.join(PENDING_KEY);
    let key_pem = match std::fs::read_to_string(&pending) {
        Ok(k) => Secret::new(k),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CertError::Current(format!(
                "no pending certificate request ({} is missing): run the cert-request step first",
                pending.display()
            )));
        }
        Err(e) => return Err(CertError::Current(format!("{}: {e}", pending.display()))),
    };
    let (old_leaf, _) = current_leaf(tls)?;
    let identity = validate(tls, cert_pem, &key_pem)?;
    let new_leaf = certs_of(cert_pem.as_bytes())
        .into_iter()
        .next()
        .ok_or(CertError::NoCert)?;
    write_atomic(&tls.key, key_pem.expose().as_bytes(), 0o600)?;
    write_atomic(&tls.cert, cert_pem.as_bytes(), 0o644)?;
    if let Err(e) = std::fs::remove_file(&pending) {
        tracing::warn!(path = %pending.display(), error = %e, "pending key not removed");
    }
    Ok(Installed {
        identity,
        replaced_cert_sha256: dr_proto::tls::cert_sha256_hex(&old_leaf),
        new_cert_sha256: dr_proto::tls::cert_sha256_hex(&new_leaf),
    })
}

/// The current certificate's SANs (URI identity, DNS names, addresses), kept by a rotation.
fn current_sans(leaf: &CertificateDer<'_>) -> Result<Vec<rcgen::SanType>, CertError> {
    use x509_parser::extensions::GeneralName;
    let bad = |e: String| CertError::Current(format!("cannot read the current SANs: {e}"));
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    if let Some(ext) = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
    {
        for name in &ext.value.general_names {
            match name {
                GeneralName::URI(u) => out.push(rcgen::SanType::URI(
                    (*u).try_into()
                        .map_err(|e: rcgen::Error| bad(e.to_string()))?,
                )),
                GeneralName::DNSName(d) => out.push(rcgen::SanType::DnsName(
                    (*d).try_into()
                        .map_err(|e: rcgen::Error| bad(e.to_string()))?,
                )),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).map(std::net::IpAddr::from).ok(),
                        16 => <[u8; 16]>::try_from(*b).map(std::net::IpAddr::from).ok(),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        out.push(rcgen::SanType::IpAddress(ip));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}
