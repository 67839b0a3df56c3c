//! The connection to the coordinators, and the one place that turns failures into words.
//!
//! Why this module matters more than its size suggests: drctl is used during incidents,
//! when some coordinators are down and the operator is stressed. So it
//!
//! 1. tries every configured endpoint in order, with a short TCP connect timeout each, and
//!    when all fail says *which endpoint failed how* (refused, timed out, TLS refused);
//! 2. follows a non-leader's `unavailable` answer that names the leader in the
//!    `x-dr-leader` metadata, once (openraft's leader-forward pattern);
//! 3. maps gRPC codes to messages that say what to check, and to exit codes
//!    (see [`ClientError::exit_code`]): 1 operation failed, 2 usage or config, 3 cannot
//!    reach or authenticate.
//!
//! ```text
//! for endpoint in endpoints:            attempts: [(endpoint, why)]
//!   tcp connect (connect_timeout)  --x-> record "connection refused" / "timed out", next
//!   rpc (timeout) ---- ok ------------> return
//!        |--- unavailable + x-dr-leader: L --> same rpc at L (once)
//!        |--- TLS alert / bad certificate ---> CertRefused (same for every endpoint: stop)
//!        |--- transport error / timeout -----> record, next
//!        `--- any other status --------------> mapped error (the server answered)
//! all failed -> Unreachable { attempts }
//! ```
//!
//! Retrying a write at another endpoint is safe because writes either carry a request id
//! (`RunActionRequest.request_id`) or are naturally idempotent (membership changes).

use std::future::Future;
use std::time::Duration;

use dr_proto::pb::control_service_client::ControlServiceClient;
use dr_proto::tls::{ClientTls, TlsError};
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tracing::debug;

use crate::config::ClientConfig;

pub type ControlClient = ControlServiceClient<Channel>;

/// Metadata key a follower sets on `unavailable` to name the leader's endpoint.
pub const LEADER_HEADER: &str = "x-dr-leader";

/// One endpoint tried and why it did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub endpoint: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // The cause is in the message and deliberately not a `source`, so `{:#}` does not
    // print it twice.
    #[error("load TLS credentials (--ca/--cert/--key or [tls] in the config file): {0}")]
    TlsFiles(TlsError),
    #[error("{}", unreachable_message(.attempts))]
    Unreachable { attempts: Vec<Attempt> },
    #[error(
        "{endpoint} refused the TLS connection: {detail}. Check that --ca is the cluster's ca.pem, \
         that --cert is an operator certificate issued by that CA and not expired \
         (`drctl cert show FILE`), and that --key belongs to it"
    )]
    CertRefused { endpoint: String, detail: String },
    #[error(
        "{endpoint} did not accept your certificate: {message}. An operator certificate \
         (spiffe://<td>/operator/<name>?role=...) is needed; check it with `drctl cert show FILE`"
    )]
    Unauthenticated { endpoint: String, message: String },
    #[error("permission denied: {message}")]
    PermissionDenied { message: String },
    #[error("{what}: {}: {message}", code_words(*.code))]
    Rpc {
        what: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{what}: {message}")]
    Stream { what: String, message: String },
}

impl ClientError {
    /// 1 operation failed, 2 usage or config error, 3 cannot reach or authenticate.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::TlsFiles(_) => 2,
            ClientError::Unreachable { .. }
            | ClientError::CertRefused { .. }
            | ClientError::Unauthenticated { .. } => 3,
            ClientError::Rpc {
                code: tonic::Code::InvalidArgument,
                ..
            } => 2,
            ClientError::PermissionDenied { .. }
            | ClientError::Rpc { .. }
            | ClientError::Stream { .. } => 1,
        }
    }
}

pub type ClientResult<T> = Result<T, ClientError>;

fn unreachable_message(attempts: &[Attempt]) -> String {
    let tried: Vec<String> = attempts
        .iter()
        .map(|a| format!("{}: {}", a.endpoint, a.reason))
        .collect();
    format!(
        "could not reach any coordinator: {}. Check --endpoint/DRCTL_ENDPOINTS and that dr-coordinator is running",
        tried.join("; ")
    )
}

fn code_words(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown error",
        InvalidArgument => "invalid request",
        DeadlineExceeded => "deadline exceeded",
        NotFound => "not found",
        AlreadyExists => "already exists",
        PermissionDenied => "permission denied",
        ResourceExhausted => "resource exhausted",
        FailedPrecondition => "refused",
        Aborted => "aborted",
        OutOfRange => "out of range",
        Unimplemented => "not implemented by this coordinator",
        Internal => "internal error",
        Unavailable => "unavailable",
        DataLoss => "data loss",
        Unauthenticated => "unauthenticated",
    }
}

/// What one endpoint's attempt came to.
enum Step<T> {
    Done(T),
    /// Try the next endpoint; the reason goes into the final message.
    Next(String),
    /// Stop: the answer would be the same everywhere.
    Fail(ClientError),
}

/// A connection policy over the configured endpoints.
#[derive(Clone)]
pub struct Client {
    cfg: ClientConfig,
    tls: ClientTls,
}

impl Client {
    pub fn new(cfg: ClientConfig) -> ClientResult<Self> {
        let tls = ClientTls::load(&cfg.tls).map_err(ClientError::TlsFiles)?;
        Ok(Self { cfg, tls })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// The identity our certificate carries (what the server will see).
    pub fn own_identity(&self) -> dr_proto::identity::SpiffeId {
        self.tls.own_identity()
    }

    /// This client with the current leader's endpoint tried first. Live facts (agent
    /// connections, heartbeats, the events of a running action) are held in the leader's
    /// memory only, so commands that show them ask the leader; any endpoint still works
    /// as a fallback.
    pub async fn prefer_leader(&self) -> ClientResult<Client> {
        let s = self
            .call("cluster status", |mut c| async move {
                c.cluster_status(dr_proto::pb::ClusterStatusRequest {
                    linearizable: false,
                })
                .await
            })
            .await?;
        let leader = if s.leader_endpoint.is_empty() {
            s.members
                .iter()
                .find(|m| m.node_id == s.leader_id && s.leader_id != 0)
                .map(|m| m.addr.clone())
        } else {
            Some(s.leader_endpoint.clone())
        };
        let mut cfg = self.cfg.clone();
        if let Some(leader) = leader {
            cfg.endpoints.retain(|e| *e != leader);
            cfg.endpoints.insert(0, leader);
        }
        Ok(Client {
            cfg,
            tls: self.tls.clone(),
        })
    }

    /// Runs `op` against the first endpoint that answers (see the module docs).
    pub async fn call<T, F, Fut>(&self, what: &str, op: F) -> ClientResult<T>
    where
        F: Fn(ControlClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_service(what, ControlServiceClient::new, op).await
    }

    /// [`Client::call`] for another service on the same endpoints (`make` builds its
    /// client from a channel, e.g. `BackupServiceClient::new`).
    pub async fn call_service<C, T, F, Fut>(
        &self,
        what: &str,
        make: fn(Channel) -> C,
        op: F,
    ) -> ClientResult<T>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut attempts = Vec::new();
        for endpoint in &self.cfg.endpoints {
            match self.try_endpoint(what, endpoint, make, &op).await {
                Step::Done(v) => return Ok(v),
                Step::Next(reason) => {
                    debug!(endpoint = %endpoint, reason = %reason, "endpoint failed, trying the next");
                    attempts.push(Attempt {
                        endpoint: endpoint.clone(),
                        reason,
                    });
                }
                Step::Fail(e) => return Err(e),
            }
        }
        Err(ClientError::Unreachable { attempts })
    }

    async fn try_endpoint<C, T, F, Fut>(
        &self,
        what: &str,
        first: &str,
        make: fn(Channel) -> C,
        op: &F,
    ) -> Step<T>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut endpoint = first.to_string();
        let mut redirected = false;
        loop {
            let prefix = if redirected {
                format!("leader {endpoint}: ")
            } else {
                String::new()
            };
            if let Err(why) = probe(&endpoint, self.cfg.connect_timeout).await {
                return Step::Next(format!("{prefix}{why}"));
            }
            let channel = match self.tls.channel(&endpoint) {
                Ok(c) => c,
                Err(e) => return Step::Next(format!("{prefix}{e}")),
            };
            let status = match tokio::time::timeout(self.cfg.timeout, op(make(channel))).await {
                Err(_) => {
                    return Step::Next(format!(
                        "{prefix}no answer within {}",
                        humantime::format_duration(self.cfg.timeout)
                    ));
                }
                Ok(Ok(resp)) => return Step::Done(resp.into_inner()),
                Ok(Err(status)) => status,
            };
            match classify(&status) {
                Class::Tls(detail) => {
                    return Step::Fail(ClientError::CertRefused { endpoint, detail });
                }
                Class::Transport(detail) => {
                    // TLS 1.3: our handshake completes before the server has checked our
                    // certificate, so a refusal may reach hyper only as "connection closed".
                    // Ask the server once more, on a bare TLS stream, to read its alert.
                    if let Some(alert) = self.tls_refusal(&endpoint).await {
                        return Step::Fail(ClientError::CertRefused {
                            endpoint,
                            detail: alert,
                        });
                    }
                    return Step::Next(format!("{prefix}{detail}"));
                }
                Class::Answer => {}
            }
            if status.code() == tonic::Code::Unavailable {
                match leader_hint(&status) {
                    Some(leader) if !redirected && leader != endpoint => {
                        debug!(from = %endpoint, to = %leader, "not the leader, retrying at the leader");
                        endpoint = leader;
                        redirected = true;
                        continue;
                    }
                    _ => return Step::Next(format!("{prefix}unavailable: {}", status.message())),
                }
            }
            return Step::Fail(map_status(what, &endpoint, &status));
        }
    }
}

impl Client {
    /// The TLS refusal `endpoint` answers our certificate with, if it refuses it: a bare TLS
    /// handshake, then the HTTP/2 preface, then one read. A server that accepted us answers
    /// with its SETTINGS frame; one that refused us sends an alert (expired, unknown CA...).
    async fn tls_refusal(&self, endpoint: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let attempt = async {
            let mut stream = match self.tls.connect_stream(endpoint).await {
                Ok(s) => s,
                Err(e) => {
                    let text = e.to_string();
                    return looks_like_tls_refusal(&text).then_some(text);
                }
            };
            if let Err(e) = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await {
                let text = e.to_string();
                return looks_like_tls_refusal(&text).then_some(text);
            }
            let mut buf = [0u8; 64];
            match stream.read(&mut buf).await {
                Err(e) => {
                    let text = e.to_string();
                    looks_like_tls_refusal(&text).then_some(text)
                }
                Ok(_) => None,
            }
        };
        tokio::time::timeout(self.cfg.connect_timeout, attempt)
            .await
            .ok()
            .flatten()
    }
}

/// Whether `endpoint` accepts a TCP connection within `timeout`; the error is the operator's
/// wording ("connection refused", "timed out after 3s").
pub async fn probe(endpoint: &str, timeout: Duration) -> Result<(), String> {
    let (host, port) = dr_proto::tls::parse_endpoint(endpoint).map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port))).await {
        Err(_) => Err(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        )),
        Ok(Err(e)) => Err(io_words(&e)),
        Ok(Ok(_)) => Ok(()),
    }
}

fn io_words(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        TimedOut => "timed out".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        _ => e.to_string(),
    }
}

enum Class {
    /// The server answered with this status.
    Answer,
    /// The TLS layer refused (wrong CA, expired or foreign certificate).
    Tls(String),
    /// The connection failed below gRPC (reset, closed, DNS...).
    Transport(String),
}

/// Tells a status the server sent from one tonic made up for a failed connection:
/// the latter carries the transport error as its source.
fn classify(status: &tonic::Status) -> Class {
    let Some(source) = std::error::Error::source(status) else {
        return Class::Answer;
    };
    let chain = dr_proto::tls::error_chain(source);
    if looks_like_tls_refusal(&chain) {
        Class::Tls(chain)
    } else {
        Class::Transport(chain)
    }
}

/// Heuristic over the error text: rustls reports refusals as alerts or certificate errors.
pub fn looks_like_tls_refusal(chain: &str) -> bool {
    let lower = chain.to_ascii_lowercase();
    if lower.contains("connection refused") {
        return false;
    }
    [
        "certificate",
        "alert",
        "not a coordinator",
        "unknownissuer",
        "handshake",
        "peer ",
    ]
    .iter()
    .any(|k| lower.contains(k))
}

/// Also set by the coordinator's Raft layer; read as a fallback.
const LEADER_ENDPOINT_HEADER: &str = "x-dr-leader-endpoint";

fn leader_hint(status: &tonic::Status) -> Option<String> {
    [LEADER_HEADER, LEADER_ENDPOINT_HEADER]
        .iter()
        .find_map(|key| {
            status
                .metadata()
                .get(*key)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
        })
}

/// The server's answer as an operator message.
pub fn map_status(what: &str, endpoint: &str, status: &tonic::Status) -> ClientError {
    let message = if status.message().is_empty() {
        code_words(status.code()).to_string()
    } else {
        status.message().to_string()
    };
    match status.code() {
        tonic::Code::PermissionDenied => ClientError::PermissionDenied { message },
        tonic::Code::Unauthenticated => ClientError::Unauthenticated {
            endpoint: endpoint.to_string(),
            message,
        },
        code => ClientError::Rpc {
            what: what.to_string(),
            code,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn client_for(dir: &Path, endpoints: Vec<String>) -> Client {
        use crate::cmd::cert::{IssueRequest, Kind, init_ca, issue};
        init_ca("test.example", dir, true).unwrap();
        let mut req = IssueRequest::new(dir, Kind::Operator, "t");
        req.role = Some("viewer".into());
        let w = issue(&req).unwrap();
        Client::new(ClientConfig {
            endpoints,
            tls: dr_proto::tls::TlsPaths {
                ca: dir.join("ca.pem"),
                cert: w.cert,
                key: w.key,
                reload_interval: None,
            },
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn every_endpoint_is_named_when_none_answers() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (closed_port(), closed_port());
        let c = client_for(
            dir.path(),
            vec![format!("127.0.0.1:{a}"), format!("127.0.0.1:{b}")],
        );
        let err = c
            .call("status", |mut c| async move {
                c.status(dr_proto::pb::StatusRequest::default()).await
            })
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.exit_code(), 3);
        assert!(
            msg.starts_with("could not reach any coordinator: "),
            "{msg}"
        );
        assert!(
            msg.contains(&format!(
                "127.0.0.1:{a}: connection refused; 127.0.0.1:{b}: connection refused"
            )),
            "{msg}"
        );
        assert!(msg.contains("DRCTL_ENDPOINTS"), "{msg}");
    }

    #[tokio::test]
    async fn tls_refusal_is_reported_as_certificate_problem() {
        // A server whose certificate comes from another CA: our client must refuse it and
        // say so, instead of "unreachable".
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        use crate::cmd::cert::{IssueRequest, Kind, init_ca, issue};
        init_ca("test.example", theirs.path(), false).unwrap();
        let server_pair = issue(&IssueRequest::new(theirs.path(), Kind::Coordinator, "1")).unwrap();
        let server = dr_proto::tls::ServerTls::load(&dr_proto::tls::TlsPaths {
            ca: theirs.path().join("ca.pem"),
            cert: server_pair.cert,
            key: server_pair.key,
            reload_interval: None,
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, remote)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let _conn = server.accept(tcp, remote).await;
                });
            }
        });
        let c = client_for(ours.path(), vec![format!("127.0.0.1:{port}")]);
        let err = c
            .call("status", |mut c| async move {
                c.status(dr_proto::pb::StatusRequest::default()).await
            })
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::CertRefused { .. }), "{err}");
        assert_eq!(err.exit_code(), 3);
        assert!(err.to_string().contains("--ca"), "{err}");
    }

    #[test]
    fn statuses_map_to_operator_messages() {
        let e = map_status(
            "run",
            "a:1",
            &tonic::Status::permission_denied(
                "spiffe://x/operator/bob?role=viewer needs role operator",
            ),
        );
        assert_eq!(
            e.to_string(),
            "permission denied: spiffe://x/operator/bob?role=viewer needs role operator"
        );
        assert_eq!(e.exit_code(), 1);
        let e = map_status(
            "agents show",
            "a:1",
            &tonic::Status::not_found("no agent h9"),
        );
        assert_eq!(e.to_string(), "agents show: not found: no agent h9");
        let e = map_status(
            "x",
            "a:1",
            &tonic::Status::unauthenticated("no client certificate"),
        );
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("operator certificate"));
    }

    #[test]
    fn leader_header_is_read() {
        let mut s = tonic::Status::unavailable("not the leader");
        s.metadata_mut()
            .insert(LEADER_HEADER, "127.0.0.1:7002".parse().unwrap());
        assert_eq!(leader_hint(&s).as_deref(), Some("127.0.0.1:7002"));
        assert!(matches!(classify(&s), Class::Answer));
    }
}
