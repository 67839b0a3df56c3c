//! Replacing the agent's own TLS certificate and key (`rotate-credentials scope=certs`).
//!
//! Why so many checks before writing: a wrong pair on disk cuts the agent off from every
//! coordinator at the next reload or restart, on a host that may already be isolated. The
//! new pair must parse, have a key that matches the certificate, carry the same SPIFFE
//! identity as the current certificate and chain to the CA bundle the agent trusts; only
//! then are key and certificate written, each atomically, and `dr_proto::tls` reloads them.
//! The key is made on this host: only the CSR and the signed certificate travel.
//!
//! Coordinators rotate their own certificates the same way, so the checks and writes live
//! once, in [`dr_proto::cert_rotation`]; this module is the agent's name for them.

pub use dr_proto::cert_rotation::{
    CertRequest, CertRotationError as CertError, Installed, PENDING_KEY, install, request,
};
