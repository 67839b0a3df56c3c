//! Who is on the other end of a connection.
//!
//! Every certificate of a deployment carries exactly one SPIFFE-style SAN URI, and that URI
//! is the only thing authorisation looks at (never the CN, never a DNS name):
//!
//! ```text
//! spiffe://<trust-domain>/coordinator/<node-id>
//! spiffe://<trust-domain>/agent/<host-id>
//! spiffe://<trust-domain>/operator/<name>?role=viewer|operator|admin
//! ```
//!
//! Parsing is strict: an identity we cannot read is refused, not defaulted, so a
//! certificate issued by some other tool for some other purpose never maps to a role.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Operator roles, ordered by what they may do: a higher role may do all a lower one may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads state.
    Viewer,
    /// Runs actions: checks, service control, backups, failover.
    Operator,
    /// Changes membership and policy.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(IdentityError::BadRole(other.to_string())),
        }
    }
}

/// The principal named by a certificate, without its trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Identity {
    Coordinator { node_id: u64 },
    Agent { host_id: String },
    Operator { name: String, role: Role },
}

impl Identity {
    /// `coordinator`, `agent` or `operator`.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Coordinator { .. } => "coordinator",
            Identity::Agent { .. } => "agent",
            Identity::Operator { .. } => "operator",
        }
    }

    /// The node id, host id or operator name.
    pub fn name(&self) -> String {
        match self {
            Identity::Coordinator { node_id } => node_id.to_string(),
            Identity::Agent { host_id } => host_id.clone(),
            Identity::Operator { name, .. } => name.clone(),
        }
    }

    pub fn role(&self) -> Option<Role> {
        match self {
            Identity::Operator { role, .. } => Some(*role),
            _ => None,
        }
    }
}

/// A full identity: trust domain plus principal. Displays as its `spiffe://` URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub identity: Identity,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("`{0}` is not a spiffe:// URI")]
    NotSpiffe(String),
    #[error("invalid trust domain `{0}`: use lowercase letters, digits, dots and dashes")]
    BadTrustDomain(String),
    #[error(
        "`{0}` names no known principal: expected /coordinator/<node-id>, /agent/<host-id> or /operator/<name>?role=<role>"
    )]
    BadPath(String),
    #[error("invalid name `{0}`: use 1-128 letters, digits, dots, dashes or underscores")]
    BadName(String),
    #[error("invalid coordinator node id `{0}`: must be a positive integer")]
    BadNodeId(String),
    #[error("unknown role `{0}`: expected viewer, operator or admin")]
    BadRole(String),
    #[error("operator identity `{0}` has no role: expected ?role=viewer|operator|admin")]
    MissingRole(String),
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate carries no spiffe:// SAN URI; issue it with `drctl cert issue`")]
    NoSpiffeUri,
    #[error("certificate carries more than one spiffe:// SAN URI")]
    ManySpiffeUris,
}

/// Checks a host id, operator name or similar path segment.
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadName(name.to_string()))
    }
}

/// Checks a trust domain (a DNS-like name).
pub fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadTrustDomain(td.to_string()))
    }
}

impl SpiffeId {
    pub fn new(trust_domain: impl Into<String>, identity: Identity) -> Result<Self, IdentityError> {
        let trust_domain = trust_domain.into();
        validate_trust_domain(&trust_domain)?;
        match &identity {
            Identity::Coordinator { node_id } if *node_id == 0 => {
                return Err(IdentityError::BadNodeId("0".into()));
            }
            Identity::Agent { host_id } => validate_name(host_id)?,
            Identity::Operator { name, .. } => validate_name(name)?,
            Identity::Coordinator { .. } => {}
        }
        Ok(SpiffeId {
            trust_domain,
            identity,
        })
    }

    /// The `spiffe://<td>` URI that names a trust domain itself (carried by the CA).
    pub fn trust_domain_uri(trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}")
    }

    /// Reads the single spiffe:// SAN URI of a DER certificate.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let uris = spiffe_uris(der)?;
        match uris.as_slice() {
            [] => Err(IdentityError::NoSpiffeUri),
            [one] => one.parse(),
            _ => Err(IdentityError::ManySpiffeUris),
        }
    }
}

/// Every spiffe:// SAN URI in a DER certificate.
pub fn spiffe_uris(der: &[u8]) -> Result<Vec<String>, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with("spiffe://")
            {
                out.push((*uri).to_string());
            }
        }
    }
    Ok(out)
}

/// The trust domain a CA certificate names with its `spiffe://<td>` SAN URI.
pub fn trust_domain_of_ca(der: &[u8]) -> Result<String, IdentityError> {
    for uri in spiffe_uris(der)? {
        let td = uri.trim_start_matches("spiffe://").trim_end_matches('/');
        if !td.contains('/') {
            validate_trust_domain(td)?;
            return Ok(td.to_string());
        }
    }
    Err(IdentityError::NoSpiffeUri)
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_string()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::BadPath(s.to_string()))?;
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let mut parts = path.split('/');
        let (kind, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(k), Some(n), None) => (k, n),
            _ => return Err(IdentityError::BadPath(s.to_string())),
        };
        let role = match query {
            None => None,
            Some(q) => match q.strip_prefix("role=") {
                Some(r) if !r.contains('&') => Some(r.parse::<Role>()?),
                _ => return Err(IdentityError::BadPath(s.to_string())),
            },
        };
        let identity = match kind {
            "coordinator" if role.is_none() => Identity::Coordinator {
                node_id: name
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| IdentityError::BadNodeId(name.to_string()))?,
            },
            "agent" if role.is_none() => Identity::Agent {
                host_id: name.to_string(),
            },
            "operator" => Identity::Operator {
                name: name.to_string(),
                role: role.ok_or_else(|| IdentityError::MissingRole(s.to_string()))?,
            },
            _ => return Err(IdentityError::BadPath(s.to_string())),
        };
        SpiffeId::new(td, identity)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let td = &self.trust_domain;
        match &self.identity {
            Identity::Coordinator { node_id } => write!(f, "spiffe://{td}/coordinator/{node_id}"),
            Identity::Agent { host_id } => write!(f, "spiffe://{td}/agent/{host_id}"),
            Identity::Operator { name, role } => {
                write!(f, "spiffe://{td}/operator/{name}?role={role}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            "spiffe://yeslocker.local/coordinator/3",
            "spiffe://yeslocker.local/agent/bj-db-1",
            "spiffe://yeslocker.local/operator/alice?role=admin",
            "spiffe://demo.yeslocker.local/operator/bob?role=viewer",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn refuses_malformed() {
        let cases = [
            (
                "https://x/agent/a",
                IdentityError::NotSpiffe("https://x/agent/a".into()),
            ),
            (
                "spiffe://x/agent",
                IdentityError::BadPath("spiffe://x/agent".into()),
            ),
            (
                "spiffe://x/coordinator/0",
                IdentityError::BadNodeId("0".into()),
            ),
            (
                "spiffe://x/coordinator/a",
                IdentityError::BadNodeId("a".into()),
            ),
            (
                "spiffe://x/operator/al",
                IdentityError::MissingRole("spiffe://x/operator/al".into()),
            ),
            (
                "spiffe://x/operator/al?role=root",
                IdentityError::BadRole("root".into()),
            ),
            (
                "spiffe://x/agent/a?role=admin",
                IdentityError::BadPath("spiffe://x/agent/a?role=admin".into()),
            ),
            (
                "spiffe://X/agent/a",
                IdentityError::BadTrustDomain("X".into()),
            ),
            ("spiffe://x/agent/a b", IdentityError::BadName("a b".into())),
            (
                "spiffe://x/agent/a/b",
                IdentityError::BadPath("spiffe://x/agent/a/b".into()),
            ),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<SpiffeId>(), Err(want), "{s}");
        }
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }
}
