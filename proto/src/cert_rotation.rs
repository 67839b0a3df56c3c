//! Replacing a process's own certificate with a key made where it is used: a CSR out, a
//! signed certificate in, key then certificate written atomically.
//!
//! Why here: coordinators rotate their own server/peer certificates the same way agents
//! do (the key never leaves the host, only the CSR and the signed certificate travel), so
//! the checks live once, next to the TLS loader that will read the files. Before anything
//! is written the new pair must (1) parse, (2) have a key matching the certificate,
//! (3) carry the same SPIFFE identity as the current certificate and (4) chain to the CA
//! bundle in use: a wrong pair on disk would cut the process off at the next reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::atomic_file::write_atomic;
use crate::identity::SpiffeId;
use crate::tls::{TlsPaths, cert_sha256_hex};

/// The pending key's file name inside the rotation directory (mode 0600).
pub const PENDING_KEY: &str = "pending-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CertRotationError {
    #[error("cert_pem holds no PEM certificate")]
    NoCert,
    /// Deliberately without detail: a parser's message could quote key bytes.
    #[error("the pending key is not a usable PEM private key")]
    BadKey,
    #[error("the new key does not match the new certificate")]
    KeyMismatch,
    #[error("the new certificate's identity {new} differs from the current {current}")]
    IdentityChanged { new: String, current: String },
    #[error("the new certificate has no valid identity: {0}")]
    Identity(String),
    #[error("cannot read the current certificate or CA: {0}")]
    Current(String),
    #[error("the new certificate does not chain to the CA bundle in use: {0}")]
    Untrusted(String),
    #[error(
        "no pending certificate request ({0} is missing): request a CSR first (drctl rotate-credentials --scope certs)"
    )]
    NoPending(PathBuf),
    #[error("{0}")]
    Write(#[from] crate::atomic_file::AtomicWriteError),
    #[error("{0}")]
    Other(String),
}

/// A certificate signing request: public data only.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub csr_pem: String,
    pub identity: String,
    /// SHA-256 of the DER of the certificate in use now (the one to revoke).
    pub old_cert_sha256: String,
}

/// What [`install`] did.
#[derive(Debug, Clone)]
pub struct Installed {
    pub identity: String,
    pub replaced_cert_sha256: String,
    pub new_cert_sha256: String,
}

fn certs_of(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

fn current_leaf(tls: &TlsPaths) -> Result<CertificateDer<'static>, CertRotationError> {
    let pem = std::fs::read(&tls.cert)
        .map_err(|e| CertRotationError::Current(format!("{}: {e}", tls.cert.display())))?;
    certs_of(&pem).into_iter().next().ok_or_else(|| {
        CertRotationError::Current(format!("{} holds no certificate", tls.cert.display()))
    })
}

/// Makes a new ECDSA P-256 key HERE, keeps it in `dir/`[`PENDING_KEY`] (0600), and returns
/// a CSR for the current identity and SANs. A newer request replaces the pending key.
pub fn request(tls: &TlsPaths, dir: &Path) -> Result<CertRequest, CertRotationError> {
    let leaf = current_leaf(tls)?;
    let identity =
        SpiffeId::from_cert_der(&leaf).map_err(|e| CertRotationError::Current(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, identity.identity.name());
    params.subject_alt_names = current_sans(&leaf)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CertRotationError::Other(format!("key generation: {e}")))?;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| CertRotationError::Other(format!("building the CSR: {e}")))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| CertRotationError::Other(format!("{}: {e}", dir.display())))?;
    write_atomic(
        &dir.join(PENDING_KEY),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    Ok(CertRequest {
        csr_pem: csr,
        identity: identity.to_string(),
        old_cert_sha256: cert_sha256_hex(&leaf),
    })
}

/// Checks the new pair (see the module docs) and returns its identity.
fn validate(tls: &TlsPaths, cert_pem: &str, key_pem: &str) -> Result<String, CertRotationError> {
    let chain = certs_of(cert_pem.as_bytes());
    let leaf = chain.first().ok_or(CertRotationError::NoCert)?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| CertRotationError::BadKey)?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|_| CertRotationError::BadKey)?;
    CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|_| CertRotationError::KeyMismatch)?;
    let new_id =
        SpiffeId::from_cert_der(leaf).map_err(|e| CertRotationError::Identity(e.to_string()))?;
    let current = current_leaf(tls)?;
    let current_id =
        SpiffeId::from_cert_der(&current).map_err(|e| CertRotationError::Current(e.to_string()))?;
    if new_id != current_id {
        return Err(CertRotationError::IdentityChanged {
            new: new_id.to_string(),
            current: current_id.to_string(),
        });
    }
    let ca_pem = std::fs::read(&tls.ca)
        .map_err(|e| CertRotationError::Current(format!("{}: {e}", tls.ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs_of(&ca_pem) {
        roots
            .add(c)
            .map_err(|e| CertRotationError::Current(format!("CA bundle: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider))
        .build()
        .map_err(|e| CertRotationError::Untrusted(e.to_string()))?;
    verifier
        .verify_client_cert(leaf, &chain[1..], UnixTime::now())
        .map_err(|e| CertRotationError::Untrusted(e.to_string()))?;
    Ok(new_id.to_string())
}

/// Installs a certificate signed for the pending key of [`request`]: validates the pair,
/// writes key then certificate atomically, removes the pending key. Blocking.
pub fn install(tls: &TlsPaths, dir: &Path, cert_pem: &str) -> Result<Installed, CertRotationError> {
    let pending = dir.join(PENDING_KEY);
    let key_pem = match std::fs::read_to_string(&pending) {
        Ok(k) => k,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CertRotationError::NoPending(pending));
        }
        Err(e) => {
            return Err(CertRotationError::Current(format!(
                "{}: {e}",
                pending.display()
            )));
        }
    };
    let old_leaf = current_leaf(tls)?;
    let identity = validate(tls, cert_pem, &key_pem)?;
    let new_leaf = certs_of(cert_pem.as_bytes())
        .into_iter()
        .next()
        .ok_or(CertRotationError::NoCert)?;
    write_atomic(&tls.key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&tls.cert, cert_pem.as_bytes(), 0o644)?;
    if let Err(e) = std::fs::remove_file(&pending) {
        tracing::warn!(path = %pending.display(), error = %e, "pending key not removed");
    }
    Ok(Installed {
        identity,
        replaced_cert_sha256: cert_sha256_hex(&old_leaf),
        new_cert_sha256: cert_sha256_hex(&new_leaf),
    })
}

/// The current certificate's SANs (URI identity, DNS names, addresses), kept by a rotation.
fn current_sans(leaf: &CertificateDer<'_>) -> Result<Vec<rcgen::SanType>, CertRotationError> {
    use x509_parser::extensions::GeneralName;
    let bad = |e: String| CertRotationError::Current(format!("cannot read the current SANs: {e}"));
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
