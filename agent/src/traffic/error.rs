//! The one error type of the traffic boundary.
//!
//! Messages are written for the operator who reads them in `drctl` during a failover: they say
//! which provider and target failed and what to check. They never contain secret material (TSIG
//! keys, webhook secrets); at most the *name* of a key or the path of a secret file.

use std::path::PathBuf;
use std::time::Duration;

use super::plan::PlanError;

pub type TrafficResult<T> = Result<T, TrafficError>;

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("invalid traffic plan: {0}")]
    Plan(#[from] PlanError),

    #[error("traffic provider {provider}: invalid configuration: {reason}")]
    Config { provider: String, reason: String },

    #[error("traffic provider {provider}: plan does not fit this provider: {reason}")]
    Unsupported { provider: String, reason: String },

    #[error("traffic provider {provider}: cannot read secret from {source_desc}: {reason}")]
    Secret {
        provider: String,
        source_desc: String,
        reason: String,
    },

    #[error("dns server {server}: {reason}")]
    DnsTransport { server: String, reason: String },

    #[error(
        "dns server {server} rejected TSIG key {key_name:?} ({tsig_error}): check that the key \
         name, algorithm and secret match the server's key statement and that clocks agree"
    )]
    DnsTsigRejected {
        server: String,
        key_name: String,
        tsig_error: String,
    },

    #[error("dns server {server} answered a {what} with {rcode}{hint}")]
    DnsRcode {
        server: String,
        what: &'static str,
        rcode: String,
        hint: &'static str,
    },

    #[error("dns server {server}: response failed TSIG verification: {reason}")]
    DnsBadResponseSignature { server: String, reason: String },

    #[error("dns {record}: after the update the server returns {found:?}, expected {expected:?}")]
    DnsVerifyMismatch {
        record: String,
        expected: Vec<String>,
        found: Vec<String>,
    },

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("nginx rejected the new upstream file {path} (previous file restored): {message}")]
    NginxInvalid { path: PathBuf, message: String },

    #[error("nginx reload failed (previous upstream file restored): {message}")]
    NginxReload { message: String },

    #[error("webhook {url}: {reason} (after {attempts} attempt(s))")]
    WebhookTransport {
        url: String,
        attempts: u32,
        reason: String,
    },

    #[error("webhook {url}: answered HTTP {status} (after {attempts} attempt(s)): {body_tail}")]
    WebhookStatus {
        url: String,
        status: u16,
        attempts: u32,
        body_tail: String,
    },

    #[error("exec {program}: cannot start: {source}")]
    ExecSpawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("exec {program}: {status}; stderr tail: {stderr_tail}")]
    ExecFailed {
        program: PathBuf,
        status: String,
        stderr_tail: String,
    },

    #[error("exec {program}: still running after {timeout:?}, killed")]
    ExecTimeout { program: PathBuf, timeout: Duration },
}

impl TrafficError {
    /// True when retrying the same plan cannot help (bad plan, bad config, wrong key, rejected
    /// file). The failover plan executor uses this to stop retrying a step early.
    pub fn is_permanent(&self) -> bool {
        match self {
            TrafficError::Plan(_)
            | TrafficError::Config { .. }
            | TrafficError::Unsupported { .. }
            | TrafficError::Secret { .. }
            | TrafficError::DnsTsigRejected { .. }
            | TrafficError::NginxInvalid { .. } => true,
            TrafficError::DnsRcode { rcode, .. } => rcode != "SERVFAIL",
            TrafficError::WebhookStatus { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
            TrafficError::ExecSpawn { .. } => true,
            TrafficError::DnsTransport { .. }
            | TrafficError::DnsBadResponseSignature { .. }
            | TrafficError::DnsVerifyMismatch { .. }
            | TrafficError::Io { .. }
            | TrafficError::NginxReload { .. }
            | TrafficError::WebhookTransport { .. }
            | TrafficError::ExecFailed { .. }
            | TrafficError::ExecTimeout { .. } => false,
        }
    }
}

/// The last `max` bytes of `s` (on a char boundary), trimmed, for error messages that quote a
/// child's stderr or a server's body.
pub(crate) fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}
