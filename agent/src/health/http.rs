//! `kind = "http"`: GET a URL and compare the status code. https uses rustls (ring) with the
//! check's own `ca` bundle, or the webpki roots when none is given.
//!
//! The connection is kept open between runs (HTTP/1.1 keep-alive): a check every second must
//! not cost a TCP and TLS handshake every second. The sender is taken out of the state while
//! in use and put back only after a complete exchange, so a run cut short by its timeout
//! leaves no half-used connection behind (cancel-safe).

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::Outcome;

/// Bodies are drained (so the connection can be reused) up to this size.
const BODY_LIMIT: usize = 64 * 1024;

pub struct HttpState {
    url: String,
    ca: Option<PathBuf>,
    tls: Option<Arc<rustls::ClientConfig>>,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl HttpState {
    pub fn new(url: &str, ca: Option<PathBuf>) -> Self {
        Self {
            url: url.to_string(),
            ca,
            tls: None,
            sender: None,
        }
    }

    pub async fn probe(&mut self, expect_status: u16) -> Outcome {
        match self.exchange().await {
            Ok(status) if status == expect_status => Outcome::Pass(format!("status {status}")),
            Ok(status) => Outcome::Fail(format!("status {status}, expected {expect_status}")),
            Err(e) => Outcome::Fail(e),
        }
    }

    async fn exchange(&mut self) -> Result<u16, String> {
        let uri: http::Uri = self.url.parse().map_err(|e| format!("invalid url: {e}"))?;
        let mut sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect(&uri).await?,
        };
        if sender.ready().await.is_err() {
            sender = self.connect(&uri).await?;
            sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready: {e}"))?;
        }
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(
                http::header::USER_AGENT,
                concat!("dr-agent/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("building request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status().as_u16();
        let keep = Limited::new(resp.into_body(), BODY_LIMIT)
            .collect()
            .await
            .is_ok();
        if keep {
            self.sender = Some(sender);
        }
        Ok(status)
    }

    async fn connect(&mut self, uri: &http::Uri) -> Result<SendRequest<Empty<Bytes>>, String> {
        let https = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .ok_or("url has no host")?
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let _ignored = tcp.set_nodelay(true);
        if https {
            let config = self.tls_config()?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| format!("invalid server name {host}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {host}:{port} failed: {e}"))?;
            handshake(TokioIo::new(tls)).await
        } else {
            handshake(TokioIo::new(tcp)).await
        }
    }

    fn tls_config(&mut self) -> Result<Arc<rustls::ClientConfig>, String> {
        if let Some(c) = &self.tls {
            return Ok(c.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(ca) => {
                let certs = CertificateDer::pem_file_iter(ca)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("cannot read ca {}: {e}", ca.display()))?;
                let (added, _ignored) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!("ca {} holds no usable certificate", ca.display()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls config: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        self.tls = Some(config.clone());
        Ok(config)
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Empty<Bytes>>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    // The connection task ends when the sender is dropped or the peer closes.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "http check connection closed");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A tiny HTTP/1.1 server answering every request on a connection with `status`; counts
    /// accepted connections so the test can see keep-alive at work.
    async fn server(status: u16) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {
                                let resp =
                                    format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
                                if s.write_all(resp.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        (format!("http://{addr}/health"), conns)
    }

    #[tokio::test]
    async fn status_is_compared_and_connection_reused() {
        let (url, conns) = server(200).await;
        let mut st = HttpState::new(&url, None);
        for _ in 0..3 {
            assert!(matches!(st.probe(200).await, Outcome::Pass(_)));
        }
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "keep-alive"
        );
        assert!(matches!(st.probe(204).await, Outcome::Fail(_)));

        let (url, _) = server(503).await;
        assert!(matches!(
            HttpState::new(&url, None).probe(200).await,
            Outcome::Fail(_)
        ));
        assert!(matches!(
            HttpState::new("http://127.0.0.1:1/", None).probe(200).await,
            Outcome::Fail(_)
        ));
    }
}
