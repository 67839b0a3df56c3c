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
