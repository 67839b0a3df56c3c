//! Mutual TLS for every port of the control plane.
//!
//! There is no plaintext mode: every server requires a client certificate chained to the
//! deployment's CA, every client checks that the server is a coordinator of the same trust
//! domain, and only TLS 1.3 is offered (rustls with the ring provider; no C++ toolchain).
//!
//! Certificates are re-read when their files change ([`ServerTls::spawn_reloader`],
//! [`ClientTls::spawn_reloader`]): a rotated certificate or CA bundle takes effect for the
//! next handshake, without a restart. Established connections keep the credentials they
//! were opened with; that is what lets a rotation run without dropping sessions.
//!
//! Tonic is given already-authenticated streams ([`TlsConn`]); the peer's [`SpiffeId`]
//! rides on each request as a [`PeerInfo`] extension, and [`peer_identity`] reads it.
//! Authorisation itself lives with each service, which knows what a call needs.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::identity::{Identity, IdentityError, SpiffeId};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes a server runs at once. A reconnect storm of thousands of agents (after a
/// leader change) would otherwise start thousands of handshakes together: each one costs
/// signature checks, and all of them together starve the Raft RPCs on the same runtime
/// until heartbeats miss and the leader steps down, which causes the next storm. Beyond
/// this many, new connections wait in the kernel's accept backlog.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 64;
/// How often certificate files are checked for change when the config names no interval.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Where a process's CA bundle, certificate and key live (the `[tls]` table of every config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// PEM bundle of trusted CA certificates (several during a CA rotation).
    pub ca: PathBuf,
    /// PEM certificate of this process (leaf first, intermediates after).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// How often the files are checked for change.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub reload_interval: Option<Duration>,
}

impl TlsPaths {
    /// Resolves relative paths against `base` (the directory of the config file).
    pub fn resolve_relative(&self, base: &Path) -> TlsPaths {
        let fix = |p: &PathBuf| {
            if p.is_relative() {
                base.join(p)
            } else {
                p.clone()
            }
        };
        TlsPaths {
            ca: fix(&self.ca),
            cert: fix(&self.cert),
            key: fix(&self.key),
            reload_interval: self.reload_interval,
        }
    }

    fn reload_interval(&self) -> Duration {
        self.reload_interval.unwrap_or(DEFAULT_RELOAD_INTERVAL)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // The io::Error is shown in the message and deliberately not chained as a source:
    // printed with `{:#}` it would otherwise appear twice.
    #[error("cannot read {what} file {path}: {error}")]
    Read {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{what} file {path} holds no PEM {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("certificate {path}: {error}")]
    Identity { path: PathBuf, error: IdentityError },
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("invalid endpoint `{endpoint}`: {reason}; expected host:port or https://host:port")]
    Endpoint { endpoint: String, reason: String },
    #[error("TLS handshake with {peer} failed: {error}")]
    Handshake { peer: String, error: io::Error },
    #[error("TLS handshake with {peer} timed out")]
    HandshakeTimeout { peer: String },
    #[error("peer {peer} refused: {reason}")]
    PeerRefused { peer: String, reason: String },
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("gRPC server: {0}")]
    Serve(String),
    #[error("listener: {0}")]
    Io(#[from] io::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_path_buf(),
        error,
    })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|error| TlsError::Read {
            what,
            path: path.to_path_buf(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("key", path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|error| TlsError::Read {
            what: "key",
            path: path.to_path_buf(),
            error,
        })?
        .ok_or_else(|| TlsError::Empty {
            what: "key",
            path: path.to_path_buf(),
            expected: "PRIVATE KEY",
        })
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("CA", path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Everything loaded from one [`TlsPaths`]: the parts both sides need.
struct Material {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    own: SpiffeId,
}

impl Material {
    fn load(paths: &TlsPaths) -> Result<Material, TlsError> {
        let roots = Arc::new(read_roots(&paths.ca)?);
        let chain = read_certs("certificate", &paths.cert)?;
        let key = read_key(&paths.key)?;
        let own = SpiffeId::from_cert_der(&chain[0]).map_err(|error| TlsError::Identity {
            path: paths.cert.clone(),
            error,
        })?;
        Ok(Material {
            roots,
            chain,
            key,
            own,
        })
    }
}

/// Modification stamps of the three files, to notice a rotation cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<(SystemTime, u64)>>);

impl Stamp {
    fn of(paths: &TlsPaths) -> Stamp {
        Stamp(
            [&paths.ca, &paths.cert, &paths.key]
                .iter()
                .map(|p| {
                    std::fs::metadata(p)
                        .ok()
                        .and_then(|m| Some((m.modified().ok()?, m.len())))
                })
                .collect(),
        )
    }
}

/// The shared "reload when the files change" machinery of both sides.
struct Reloading<C> {
    paths: TlsPaths,
    current: ArcSwap<C>,
    own: ArcSwap<SpiffeId>,
    stamp: Mutex<Stamp>,
    build: fn(&Material) -> Result<C, TlsError>,
}

impl<C: Send + Sync + 'static> Reloading<C> {
    fn load(
        paths: &TlsPaths,
        build: fn(&Material) -> Result<C, TlsError>,
    ) -> Result<Self, TlsError> {
        let stamp = Stamp::of(paths);
        let material = Material::load(paths)?;
        let config = build(&material)?;
        Ok(Reloading {
            paths: paths.clone(),
            current: ArcSwap::from_pointee(config),
            own: ArcSwap::from_pointee(material.own),
            stamp: Mutex::new(stamp),
            build,
        })
    }

    /// Rebuilds the config if a file changed. Returns whether it did. On error the
    /// previous config stays in force: a half-written rotation must not take a node down.
    fn reload(&self) -> Result<bool, TlsError> {
        let now = Stamp::of(&self.paths);
        {
            let seen = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return Ok(false);
            }
        }
        let material = Material::load(&self.paths)?;
        let config = (self.build)(&material)?;
        if material.own.trust_domain != self.own.load().trust_domain {
            warn!(
                old = %self.own.load(),
                new = %material.own,
                "rotated certificate changes the trust domain"
            );
        }
        self.current.store(Arc::new(config));
        self.own.store(Arc::new(material.own));
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = now;
        Ok(true)
    }

    fn spawn_reloader(self: &Arc<Self>, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.paths.reload_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match this.reload() {
                    Ok(true) => {
                        info!(identity = %this.own.load(), cert = %this.paths.cert.display(), "tls certificates reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e, "tls reload failed, keeping the previous certificates")
                    }
                }
            }
        })
    }
}

// ---------------------------------------------------------------- server side

/// Server half: requires a client certificate of our CA on every connection.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<Reloading<ServerConfig>>,
    stats: Arc<TlsStats>,
    guard: Arc<PeerGuard>,
}

/// Hex SHA-256 of a certificate's DER: the name revocations give a certificate.
pub fn cert_sha256_hex(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A connection this server refused during or right after the TLS handshake.
#[derive(Debug, Clone)]
pub struct RefusedHandshake {
    pub remote: SocketAddr,
    /// The presented identity when the certificate was readable (revoked, wrong domain).
    pub identity: Option<String>,
    pub reason: String,
}

/// At most this many refusals wait for [`ServerTls::drain_refusals`]; older ones are dropped.
const REFUSALS_BUFFERED: usize = 10_000;

/// Revoked certificates and the refusal record, shared by every clone of a [`ServerTls`].
///
/// Why here and not in the rustls verifier: the verifier does not know the peer's address,
/// and the refusal record is per source address. A revoked certificate completes the
/// handshake and is refused before any request is read, exactly like a peer of a foreign
/// trust domain.
#[derive(Debug, Default)]
struct PeerGuard {
    revoked: Arc<Revocations>,
    refusals: Mutex<std::collections::VecDeque<RefusedHandshake>>,
}

/// The revoked set plus every live connection's peer fingerprint, so that revoking a
/// certificate also CUTS the connections already open with it (on both sides: a server
/// cuts clients, a client cuts the coordinator it is connected to).
///
/// Why cut and not only refuse new handshakes: an attacker holding a stolen key keeps
/// an established session for as long as it likes; revocation must end it now.
#[derive(Debug, Default)]
struct Revocations {
    revoked: ArcSwap<std::collections::HashSet<String>>,
    live: Mutex<std::collections::HashMap<u64, (String, CancellationToken)>>,
    next: AtomicU64,
}

impl Revocations {
    fn is_revoked(&self, fingerprint: &str) -> bool {
        self.revoked.load().contains(fingerprint)
    }

    /// Stores the set and cuts every live connection whose peer is now revoked; returns
    /// how many were cut.
    fn set(&self, revoked: std::collections::HashSet<String>) -> usize {
        self.revoked.store(Arc::new(revoked));
        let set = self.revoked.load();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut cut = 0;
        for (fp, token) in live.values() {
            if set.contains(fp) && !token.is_cancelled() {
                token.cancel();
                cut += 1;
            }
        }
        cut
    }

    fn register(self: &Arc<Self>, fingerprint: String) -> LiveConn {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        // Revoked between the handshake check and here: born cut.
        if self.is_revoked(&fingerprint) {
            token.cancel();
        }
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (fingerprint, token.clone()));
        LiveConn {
            id,
            cut: Box::pin(token.cancelled_owned()),
            revs: Arc::clone(self),
        }
    }
}

/// One registered connection; unregisters itself when dropped.
struct LiveConn {
    id: u64,
    cut: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    revs: Arc<Revocations>,
}

impl LiveConn {
    /// Ready (with the error the I/O call returns) once the peer's certificate is revoked.
    /// Polling it registers the waker, so a connection idle in `poll_read` wakes up.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer's certificate was revoked: connection closed",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for LiveConn {
    fn drop(&mut self) {
        self.revs
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// A stream that fails every read and write once its peer's certificate is revoked.
pub struct Revocable<S> {
    inner: S,
    live: LiveConn,
}

impl<S: AsyncRead + Unpin> AsyncRead for Revocable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.live.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Revocable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.live.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.live.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.live.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl PeerGuard {
    fn record(&self, remote: SocketAddr, identity: Option<String>, reason: String) {
        let mut q = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= REFUSALS_BUFFERED {
            q.pop_front();
        }
        q.push_back(RefusedHandshake {
            remote,
            identity,
            reason,
        });
    }
}

/// Whether a failed handshake is a refusal worth recording: a TCP probe that closes
/// without speaking TLS (load balancers, `drctl`'s reachability probe) is not.
fn is_refusal(error: &io::Error) -> bool {
    !matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Counters a server exposes for metrics and security monitoring.
#[derive(Debug, Default)]
pub struct TlsStats {
    pub handshakes_ok: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub peers_refused: AtomicU64,
}

fn build_server(m: &Material) -> Result<ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl ServerTls {
    pub fn load(paths: &TlsPaths) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            inner: Arc::new(Reloading::load(paths, build_server)?),
            stats: Arc::default(),
            guard: Arc::default(),
        })
    }

    /// Replaces the set of revoked certificates (hex SHA-256 of the DER, see
    /// [`cert_sha256_hex`]). New connections presenting one are refused, and established
    /// connections of a now revoked client are closed. Returns how many were closed.
    pub fn set_revoked(&self, revoked: std::collections::HashSet<String>) -> usize {
        self.guard.revoked.set(revoked)
    }

    /// How many certificates are revoked now.
    pub fn revoked_count(&self) -> usize {
        self.guard.revoked.revoked.load().len()
    }

    /// Takes the refused handshakes recorded since the last call (oldest first).
    pub fn drain_refusals(&self) -> Vec<RefusedHandshake> {
        let mut q = self
            .guard
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        q.drain(..).collect()
    }

    /// An acceptor with the certificates in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.inner.current.load_full())
    }

    /// Re-reads the files if they changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        self.inner.reload()
    }

    pub fn spawn_reloader(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        self.inner.spawn_reloader(cancel)
    }

    /// This process's own identity, from its certificate.
    pub fn own_identity(&self) -> SpiffeId {
        (**self.inner.own.load()).clone()
    }

    pub fn trust_domain(&self) -> String {
        self.inner.own.load().trust_domain.clone()
    }

    pub fn stats(&self) -> &Arc<TlsStats> {
        &self.stats
    }

    /// Completes the TLS handshake on an accepted socket and reads the peer's identity.
    /// A peer whose certificate names no identity of our trust domain is refused here,
    /// before any RPC is parsed.
    pub async fn accept(&self, tcp: TcpStream, remote: SocketAddr) -> Result<TlsConn, TlsError> {
        let peer = remote.to_string();
        let stream =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor().accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(error)) => {
                    self.stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                    if is_refusal(&error) {
                        self.guard
                            .record(remote, None, format!("tls handshake failed: {error}"));
                    }
                    return Err(TlsError::Handshake { peer, error });
                }
                Err(_) => {
                    self.stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                    return Err(TlsError::HandshakeTimeout { peer });
                }
            };
        let refuse = |identity: Option<String>, reason: String| {
            self.stats.peers_refused.fetch_add(1, Ordering::Relaxed);
            self.guard.record(remote, identity, reason.clone());
            Err(TlsError::PeerRefused {
                peer: peer.clone(),
                reason,
            })
        };
        let (id, fingerprint) = {
            let (_, conn) = stream.get_ref();
            let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
                return refuse(None, "no client certificate".into());
            };
            match SpiffeId::from_cert_der(cert) {
                Ok(id) => (id, cert_sha256_hex(cert)),
                Err(e) => return refuse(None, e.to_string()),
            }
        };
        let ours = self.trust_domain();
        if id.trust_domain != ours {
            return refuse(
                Some(id.to_string()),
                format!("identity {id} is not of trust domain {ours}"),
            );
        }
        if self.guard.revoked.is_revoked(&fingerprint) {
            // Not a port scan: someone holds a certificate we revoked. Worth a log line.
            warn!(peer = %peer, identity = %id, sha256 = %&fingerprint[..16], "refused a revoked certificate");
            return refuse(
                Some(id.to_string()),
                format!(
                    "certificate sha256:{} of {id} is revoked; use the certificate issued by the last rotation",
                    &fingerprint[..16]
                ),
            );
        }
        self.stats.handshakes_ok.fetch_add(1, Ordering::Relaxed);
        let live = self.guard.revoked.register(fingerprint);
        Ok(TlsConn {
            stream: Revocable {
                inner: stream,
                live,
            },
            info: PeerInfo {
                remote_addr: remote,
                id,
            },
        })
    }
}

/// The authenticated peer of a connection; attached to every request on it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    pub id: SpiffeId,
}

/// A server-side TLS stream whose peer has been authenticated.
pub struct TlsConn {
    stream: Revocable<tokio_rustls::server::TlsStream<TcpStream>>,
    info: PeerInfo,
}

impl TlsConn {
    pub fn peer(&self) -> &PeerInfo {
        &self.info
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

/// The authenticated identity of the caller of an RPC.
///
/// Fails with `unauthenticated` only if the request did not come through [`serve`],
/// which is a wiring bug, not a client error.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<SpiffeId, tonic::Status> {
    req.extensions()
        .get::<PeerInfo>()
        .map(|p| p.id.clone())
        .ok_or_else(|| {
            tonic::Status::unauthenticated("no authenticated client certificate on this connection")
        })
}

/// The peer of an RPC with its address.
pub fn peer_info<T>(req: &tonic::Request<T>) -> Option<PeerInfo> {
    req.extensions().get::<PeerInfo>().cloned()
}

/// Serves `router` on `listener` with mutual TLS until `cancel` fires.
///
/// Handshakes run in their own tasks so a slow or hostile client cannot stall the accept
/// loop; failures are counted in [`ServerTls::stats`] and logged at debug level (a port
/// scan must not flood the log).
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: ServerTls,
    cancel: CancellationToken,
) -> Result<(), TlsError> {
    let incoming = incoming(listener, tls, cancel.clone());
    router
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
        .map_err(|e| TlsError::Serve(e.to_string()))
}

/// A stream of authenticated connections from `listener`, ending when `cancel` fires.
/// Useful for servers other than tonic (the /metrics endpoint).
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<TlsConn, io::Error>>(256);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break,
                p = handshakes.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => r,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                debug!(error = %e, "set_nodelay failed");
            }
            let tls = tls.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let accepted = tls.accept(tcp, remote).await;
                drop(permit);
                match accepted {
                    Ok(conn) => {
                        // The receiver is gone only while shutting down.
                        let _sent = tx.send(Ok(conn)).await;
                    }
                    Err(e) => debug!(error = %e, "connection refused"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

// ---------------------------------------------------------------- client side

/// Client half: presents our certificate and accepts only coordinators of our trust domain.
#[derive(Clone)]
pub struct ClientTls {
    inner: Arc<Reloading<ClientConfig>>,
    revoked: Arc<Revocations>,
}

/// Verifies the chain and name like any TLS client, then also requires the server's
/// certificate to name a coordinator of our trust domain: an agent's certificate, valid
/// as it is, must not be able to pose as a coordinator.
#[derive(Debug)]
struct CoordinatorVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    trust_domain: String,
}

impl ServerCertVerifier for CoordinatorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let id = SpiffeId::from_cert_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        match id.identity {
            Identity::Coordinator { .. } if id.trust_domain == self.trust_domain => {
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::General(format!(
                "server identity {id} is not a coordinator of trust domain {}",
                self.trust_domain
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn build_client(m: &Material) -> Result<ClientConfig, TlsError> {
    let webpki = WebPkiServerVerifier::builder_with_provider(m.roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(CoordinatorVerifier {
        webpki,
        trust_domain: m.own.trust_domain.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// `host:port` and `https://host:port` → (host, port).
pub fn parse_endpoint(endpoint: &str) -> Result<(String, u16), TlsError> {
    let bad = |reason: &str| TlsError::Endpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let rest = endpoint
        .strip_prefix("https://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    if rest.starts_with("http://") {
        return Err(bad("plaintext http is not supported"));
    }
    if rest.contains('/') {
        return Err(bad("no path allowed"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6.split_once("]:").ok_or_else(|| bad("missing port"))?;
        (h.to_string(), p)
    } else {
        let (h, p) = rest.rsplit_once(':').ok_or_else(|| bad("missing port"))?;
        (h.to_string(), p)
    };
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| bad("port is not a number"))?;
    Ok((host, port))
}

impl ClientTls {
    pub fn load(paths: &TlsPaths) -> Result<ClientTls, TlsError> {
        Ok(ClientTls {
            inner: Arc::new(Reloading::load(paths, build_client)?),
            revoked: Arc::default(),
        })
    }

    /// Replaces the set of coordinator certificates this client refuses (hex SHA-256 of
    /// the DER). A server presenting one is refused after the handshake, and established
    /// connections to it are closed (returns how many). Agents learn the set from their
    /// session, coordinators from the Raft state.
    pub fn set_revoked(&self, revoked: std::collections::HashSet<String>) -> usize {
        self.revoked.set(revoked)
    }

    /// How many certificates are revoked for this client now.
    pub fn revoked_count(&self) -> usize {
        self.revoked.revoked.load().len()
    }

    pub fn reload(&self) -> Result<bool, TlsError> {
        self.inner.reload()
    }

    pub fn spawn_reloader(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        self.inner.spawn_reloader(cancel)
    }

    pub fn own_identity(&self) -> SpiffeId {
        (**self.inner.own.load()).clone()
    }

    /// Opens one TLS stream to `endpoint` (the gRPC channel does this per connection).
    pub async fn connect_stream(
        &self,
        endpoint: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError> {
        let (host, port) = parse_endpoint(endpoint)?;
        connect_tls(self.inner.current.load_full(), &self.revoked, &host, port)
            .await
            .map(|s| s.inner)
    }

    /// A gRPC channel to `endpoint`. It connects lazily, and each new connection uses the
    /// certificates in force at that moment.
    pub fn channel(&self, endpoint: &str) -> Result<tonic::transport::Channel, TlsError> {
        Ok(self
            .endpoint(endpoint)?
            .connect_with_connector_lazy(self.connector()))
    }

    /// Like [`ClientTls::channel`] but connects now, so an unreachable endpoint is an
    /// error here, with the whole reason (refused, timed out, certificate refused...).
    pub async fn connect(
        &self,
        endpoint: &str,
        timeout: Duration,
    ) -> Result<tonic::transport::Channel, TlsError> {
        let ep = self.endpoint(endpoint)?.connect_timeout(timeout);
        ep.connect_with_connector(self.connector())
            .await
            .map_err(|e| TlsError::Connect {
                endpoint: endpoint.to_string(),
                reason: error_chain(&e),
            })
    }

    /// The tonic endpoint for `endpoint`, with keepalives that notice a dead peer within
    /// seconds (a cut link must not leave a session hanging for minutes).
    pub fn endpoint(&self, endpoint: &str) -> Result<tonic::transport::Endpoint, TlsError> {
        let (host, port) = parse_endpoint(endpoint)?;
        let uri = if host.contains(':') {
            format!("http://[{host}]:{port}")
        } else {
            format!("http://{host}:{port}")
        };
        let ep = tonic::transport::Endpoint::from_shared(uri).map_err(|e| TlsError::Endpoint {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
        Ok(ep
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true))
    }

    fn connector(
        &self,
    ) -> impl tower::Service<
        http::Uri,
        Response = ClientIo,
        Error = TlsError,
        Future = ConnectFuture,
    > + Clone
    + Send
    + 'static {
        let inner = Arc::clone(&self.inner);
        let revoked = Arc::clone(&self.revoked);
        tower::service_fn(move |uri: http::Uri| {
            let config = inner.current.load_full();
            let revoked = Arc::clone(&revoked);
            Box::pin(async move {
                let host = uri
                    .host()
                    .ok_or_else(|| TlsError::Endpoint {
                        endpoint: uri.to_string(),
                        reason: "no host".into(),
                    })?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                let port = uri.port_u16().unwrap_or(443);
                let stream = connect_tls(config, &revoked, &host, port).await?;
                Ok(hyper_util::rt::TokioIo::new(stream))
            }) as ConnectFuture
        })
    }
}

/// `e: cause: cause`, skipping repeats (tonic and hyper wrap the same message).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = err.source();
    }
    parts.join(": ")
}

type ClientIo = hyper_util::rt::TokioIo<Revocable<tokio_rustls::client::TlsStream<TcpStream>>>;
type ConnectFuture = Pin<Box<dyn std::future::Future<Output = Result<ClientIo, TlsError>> + Send>>;

async fn connect_tls(
    config: Arc<ClientConfig>,
    revoked: &Arc<Revocations>,
    host: &str,
    port: u16,
) -> Result<Revocable<tokio_rustls::client::TlsStream<TcpStream>>, TlsError> {
    let peer = format!("{host}:{port}");
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|error| TlsError::Handshake {
            peer: peer.clone(),
            error,
        })?;
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "set_nodelay failed");
    }
    let name = ServerName::try_from(host.to_string()).map_err(|e| TlsError::Endpoint {
        endpoint: peer.clone(),
        reason: e.to_string(),
    })?;
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    {
        Ok(Ok(s)) => {
            // The verifier has checked chain, name and coordinator identity; the
            // revocation set is checked here (it changes without a config rebuild).
            let fingerprint = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| cert_sha256_hex(c))
                .unwrap_or_default();
            if revoked.is_revoked(&fingerprint) {
                warn!(peer = %peer, sha256 = %&fingerprint[..16], "refused a coordinator presenting a revoked certificate");
                return Err(TlsError::PeerRefused {
                    peer,
                    reason: format!(
                        "the server's certificate sha256:{} is revoked",
                        &fingerprint[..16]
                    ),
                });
            }
            let live = revoked.register(fingerprint);
            Ok(Revocable { inner: s, live })
        }
        Ok(Err(error)) => Err(TlsError::Handshake { peer, error }),
        Err(_) => Err(TlsError::HandshakeTimeout { peer }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("127.0.0.1:7001").unwrap(),
            ("127.0.0.1".into(), 7001)
        );
        assert_eq!(parse_endpoint("https://a.b:1/").unwrap(), ("a.b".into(), 1));
        assert_eq!(parse_endpoint("[::1]:9").unwrap(), ("::1".into(), 9));
        for bad in ["127.0.0.1", "http://a:1", "a:b", ":1", "https://a:1/x"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
