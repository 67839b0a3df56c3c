//! The `webhook` provider against local hyper servers (http, and https with a test CA over
//! rustls+ring): signed delivery, bounded retries, permanent 4xx, idempotent re-apply.
// Test helpers (outside #[test] fns) may unwrap and ignore best-effort cleanup results.
#![allow(clippy::unwrap_used, clippy::let_underscore_must_use)]

#[path = "traffic_common.rs"]
mod common;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{free_port, init_tracing, plan};
use dr_agent::traffic::webhook::{self, WebhookBody};
use dr_agent::traffic::{
    Change, SecretSource, TrafficError, TrafficProvider as _, WebhookConfig, WebhookProvider,
};
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::info;

#[derive(Debug, Clone)]
struct Seen {
    headers: http::HeaderMap,
    body: Bytes,
}

/// Records every request; answers with the scripted statuses, then 200.
#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<(u16, &'static str)>>>,
}

impl Receiver {
    fn script(&self, answers: &[(u16, &'static str)]) {
        self.script.lock().unwrap().extend(answers.iter().copied());
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

struct Server {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(rx: Receiver, tls: Option<tokio_rustls::TlsAcceptor>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let rx = rx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let rx = rx.clone();
                    async move {
                        let headers = req.headers().clone();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        rx.seen.lock().unwrap().push(Seen { headers, body });
                        let (status, text) =
                            rx.script.lock().unwrap().pop_front().unwrap_or((200, "ok"));
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(text.as_bytes())))
                                .unwrap(),
                        )
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(sock), svc).await;
                    }
                    Some(acc) => {
                        if let Ok(s) = acc.accept(sock).await {
                            let _ = http.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                }
            });
        }
    });
    Server { port, task }
}

fn provider(
    name: &str,
    url: String,
    secret_file: &Path,
    ca_file: Option<&Path>,
    max_attempts: u32,
) -> WebhookProvider {
    WebhookProvider::from_config(
        WebhookConfig {
            name: name.into(),
            url,
            secret: Some(SecretSource::File(secret_file.to_owned())),
            ca_file: ca_file.map(Path::to_owned),
            timeout: Duration::from_secs(5),
            max_attempts,
            backoff: Duration::from_millis(50),
        },
        &BTreeMap::new(),
    )
    .unwrap()
}

#[tokio::test]
async fn t10_webhook_delivers_signed_plan_with_retries() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, "wh-secret-for-tests\n").unwrap();
    let rx = Receiver::default();
    let server = serve(rx.clone(), None).await;
    // A token in the query string must not show up in errors.
    let url = format!("http://127.0.0.1:{}/switch?token=t0ps3cret", server.port);
    let hook = provider("cdn", url, &secret_file, None, 3);
    let shanghai = plan(&["10.1.0.5"], &["10.2.0.5"], 0);

    info!("--- a 503 is retried, then the signed plan is accepted");
    {
        rx.script(&[(503, "busy")]);
        let applied = hook.apply(&shanghai).await.unwrap();
        assert!(applied.changed);
        assert!(
            matches!(applied.changes.as_slice(), [Change::Delivered { target }] if !target.contains("t0ps3cret"))
        );
        let seen = rx.seen();
        assert_eq!(seen.len(), 2);
        let last = &seen[1];
        let h = |n: &str| last.headers.get(n).unwrap().to_str().unwrap().to_owned();
        assert_eq!(h("content-type"), "application/json");
        assert_eq!(h(webhook::IDEMPOTENCY_HEADER), shanghai.digest());
        let ts = h(webhook::TIMESTAMP_HEADER);
        assert_eq!(
            h(webhook::SIGNATURE_HEADER),
            webhook::signature(b"wh-secret-for-tests", &ts, &last.body)
        );
        let body: WebhookBody = serde_json::from_slice(&last.body).unwrap();
        assert_eq!(body.plan, shanghai);
        assert_eq!(body.provider, "cdn");
    }

    info!("--- the same plan again is a no-op: nothing is sent");
    {
        let applied = hook.apply(&shanghai).await.unwrap();
        assert!(!applied.changed);
        assert_eq!(rx.seen().len(), 2);
    }

    info!("--- a 400 is permanent: one attempt, the body in the error");
    {
        rx.script(&[(400, "unknown region beijing")]);
        let beijing = plan(&["10.1.0.5"], &["10.2.0.5"], 100);
        let err = hook.apply(&beijing).await.unwrap_err();
        assert!(
            matches!(
                err,
                TrafficError::WebhookStatus {
                    status: 400,
                    attempts: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_permanent());
        let msg = err.to_string();
        assert!(msg.contains("unknown region beijing"), "{msg}");
        assert!(!msg.contains("t0ps3cret"), "{msg}");
        assert_eq!(rx.seen().len(), 3);
    }

    info!("--- nobody listening: bounded retries, then a transport error");
    {
        let port = free_port();
        let dead = provider(
            "dead",
            format!("http://127.0.0.1:{port}/?token=t0ps3cret"),
            &secret_file,
            None,
            2,
        );
        let err = dead.apply(&shanghai).await.unwrap_err();
        assert!(
            matches!(err, TrafficError::WebhookTransport { attempts: 2, .. }),
            "{err:?}"
        );
        assert!(!err.to_string().contains("t0ps3cret"), "{err}");
        assert!(!err.to_string().contains("wh-secret"), "{err}");
    }
    drop(server);
}

#[tokio::test]
async fn t20_webhook_over_https_with_private_ca() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, "s").unwrap();

    // A CA and a server certificate for 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dr test ca");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let srv_key = rcgen::KeyPair::generate().unwrap();
    let srv_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let srv_cert = srv_params.signed_by(&srv_key, &issuer).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();

    let provider_arc = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider_arc)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![srv_cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(srv_key.serialize_der().into()),
        )
        .unwrap();
    let rx = Receiver::default();
    let server = serve(
        rx.clone(),
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))),
    )
    .await;
    let url = format!("https://127.0.0.1:{}/switch", server.port);
    let shanghai = plan(&["10.1.0.5"], &["10.2.0.5"], 0);

    info!("--- without the CA the certificate is refused");
    {
        let hook = provider("cdn", url.clone(), &secret_file, None, 1);
        let err = hook.apply(&shanghai).await.unwrap_err();
        assert!(
            matches!(err, TrafficError::WebhookTransport { .. }),
            "{err:?}"
        );
        assert!(rx.seen().is_empty());
    }

    info!("--- with ca_file the plan is delivered over TLS");
    {
        let hook = provider("cdn", url, &secret_file, Some(&ca_file), 1);
        let applied = hook.apply(&shanghai).await.unwrap();
        assert!(applied.changed);
        assert_eq!(rx.seen().len(), 1);
    }
    drop(server);
}
