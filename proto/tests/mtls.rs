//! Real TLS 1.3 handshakes between our server and client halves: who gets in, who does not.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use dr_proto::identity::Identity;
use dr_proto::pb;
use dr_proto::tls::{ClientTls, ServerTls, TlsPaths};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use tokio_util::sync::CancellationToken;

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert: rcgen::Certificate,
}

fn make_ca(dir: &Path, td: &str) -> Ca {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{td} CA"));
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let key = KeyPair::generate().unwrap();
    let cert = params.clone().self_signed(&key).unwrap();
    std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
    Ca { params, key, cert }
}

fn issue(dir: &Path, ca: &Ca, name: &str, uri: &str, expired: bool) -> TlsPaths {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params
        .subject_alt_names
        .push(SanType::URI(uri.try_into().unwrap()));
    if expired {
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
        params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    }
    let key = KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let _ = &ca.cert;
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    TlsPaths {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        reload_interval: None,
    }
}

/// Answers `Forward` with the caller's identity, so the test sees what the server saw.
struct Echo;

#[tonic::async_trait]
impl pb::raft_service_server::RaftService for Echo {
    /// Echoes the payload reversed and the `x-big` request header back as a response header.
    async fn append_entries(
        &self,
        r: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        let big = r.metadata().get("x-big").cloned();
        let mut data = r.into_inner().data;
        data.reverse();
        let mut resp = tonic::Response::new(pb::RaftPayload { data });
        if let Some(v) = big {
            resp.metadata_mut().insert("x-big", v);
        }
        Ok(resp)
    }
    async fn vote(
        &self,
        _r: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        Err(tonic::Status::unimplemented("test"))
    }
    async fn install_snapshot(
        &self,
        _r: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        Err(tonic::Status::unimplemented("test"))
    }
    async fn forward(
        &self,
        r: tonic::Request<pb::ForwardRequest>,
    ) -> Result<tonic::Response<pb::ForwardResponse>, tonic::Status> {
        let id = dr_proto::tls::peer_identity(&r)?;
        Ok(tonic::Response::new(pb::ForwardResponse {
            response: id.to_string().into_bytes(),
            log_index: 0,
        }))
    }
}

async fn start_server(paths: &TlsPaths, cancel: CancellationToken) -> (String, ServerTls) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = ServerTls::load(paths).unwrap();
    let router = tonic::transport::Server::builder()
        .add_service(pb::raft_service_server::RaftServiceServer::new(Echo));
    tokio::spawn(dr_proto::tls::serve(router, listener, tls.clone(), cancel));
    (addr.to_string(), tls)
}

async fn call(client: &ClientTls, endpoint: &str) -> Result<String, String> {
    let channel = client
        .connect(endpoint, Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())?;
    let mut c = pb::raft_service_client::RaftServiceClient::new(channel);
    let r = c
        .forward(pb::ForwardRequest::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8(r.into_inner().response).unwrap())
}

#[tokio::test]
async fn who_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = make_ca(d, "test.local");
    let server = issue(d, &ca, "coord", "spiffe://test.local/coordinator/1", false);
    let agent = issue(d, &ca, "agent", "spiffe://test.local/agent/bj-db-1", false);
    let expired = issue(d, &ca, "old", "spiffe://test.local/agent/old", true);

    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = make_ca(other_dir.path(), "test.local");
    let mut foreign = issue(
        other_dir.path(),
        &other_ca,
        "x",
        "spiffe://test.local/agent/x",
        false,
    );
    // Trusts our CA (so it can verify the server) but its own cert is from the other CA.
    foreign.ca = d.join("ca.pem");

    let cancel = CancellationToken::new();
    let (endpoint, server_tls) = start_server(&server, cancel.clone()).await;

    // An agent of our CA gets in, and the server sees who it is.
    let seen = call(&ClientTls::load(&agent).unwrap(), &endpoint)
        .await
        .unwrap();
    assert_eq!(seen, "spiffe://test.local/agent/bj-db-1");

    // A certificate of another CA, and an expired one, are refused at the handshake.
    assert!(
        call(&ClientTls::load(&foreign).unwrap(), &endpoint)
            .await
            .is_err()
    );
    assert!(
        call(&ClientTls::load(&expired).unwrap(), &endpoint)
            .await
            .is_err()
    );

    // A client with no certificate at all never completes a handshake.
    {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(d.join("ca.pem")).unwrap();
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(&endpoint).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let r = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await;
        // TLS 1.3: the client may finish before the server's alert arrives; the first read fails.
        if let Ok(mut s) = r {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"PRI * HTTP/2.0\r\n\r\n").await.ok();
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf).await;
            assert!(
                matches!(n, Err(_) | Ok(0)),
                "server answered a client without certificate"
            );
        }
    }
    assert!(
        server_tls
            .stats()
            .handshakes_failed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );

    // An agent serving with its (valid) certificate cannot pose as a coordinator.
    let cancel2 = CancellationToken::new();
    let (agent_endpoint, _) = start_server(&agent, cancel2.clone()).await;
    let err = call(&ClientTls::load(&server).unwrap(), &agent_endpoint)
        .await
        .unwrap_err();
    assert!(err.contains("not a coordinator"), "{err}");

    cancel.cancel();
    cancel2.cancel();
}

#[tokio::test]
async fn rotated_certificate_is_picked_up_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = make_ca(d, "test.local");
    let server = issue(d, &ca, "coord", "spiffe://test.local/coordinator/1", false);
    let client_paths = issue(
        d,
        &ca,
        "op",
        "spiffe://test.local/operator/alice?role=admin",
        false,
    );
    let cancel = CancellationToken::new();
    let (endpoint, server_tls) = start_server(&server, cancel.clone()).await;
    let client = ClientTls::load(&client_paths).unwrap();
    assert_eq!(
        call(&client, &endpoint).await.unwrap(),
        "spiffe://test.local/operator/alice?role=admin"
    );

    // Re-issue the operator file in place with another identity; the client reloads.
    std::thread::sleep(Duration::from_millis(20));
    issue(
        d,
        &ca,
        "op",
        "spiffe://test.local/operator/alice?role=viewer",
        false,
    );
    assert!(client.reload().unwrap());
    assert!(matches!(
        client.own_identity().identity,
        Identity::Operator {
            role: dr_proto::identity::Role::Viewer,
            ..
        }
    ));
    assert_eq!(
        call(&client, &endpoint).await.unwrap(),
        "spiffe://test.local/operator/alice?role=viewer"
    );
    // Nothing changed on the server side: no reload.
    assert!(!server_tls.reload().unwrap());
    cancel.cancel();
}

/// Both directions of a revocation: a client refuses a coordinator whose certificate is
/// revoked and closes the channel it already had to it; a server closes a client's open
/// connection when the client's certificate is revoked, and refuses it afterwards.
#[tokio::test]
async fn revocation_cuts_open_connections_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = make_ca(d, "test.local");
    let coord = issue(d, &ca, "coord", "spiffe://test.local/coordinator/1", false);
    let agent = issue(d, &ca, "agent", "spiffe://test.local/agent/h1", false);
    let cancel = CancellationToken::new();
    let (ep, server) = start_server(&coord, cancel.clone()).await;
    let fp = |p: &TlsPaths| {
        let pem = std::fs::read(&p.cert).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .unwrap()
            .unwrap();
        dr_proto::tls::cert_sha256_hex(&der)
    };

    // Client side: an open channel to the coordinator, then its certificate is revoked.
    let client = ClientTls::load(&agent).unwrap();
    let channel = client.connect(&ep, Duration::from_secs(3)).await.unwrap();
    let mut c = pb::raft_service_client::RaftServiceClient::new(channel.clone());
    c.forward(pb::ForwardRequest::default()).await.unwrap();
    let cut = client.set_revoked([fp(&coord)].into_iter().collect());
    assert_eq!(
        cut, 1,
        "the open connection to the revoked coordinator is closed"
    );
    let again = c.forward(pb::ForwardRequest::default()).await;
    assert!(
        again.is_err(),
        "no call goes through the revoked server: {again:?}"
    );
    let err = call(&client, &ep).await.unwrap_err();
    assert!(err.contains("revoked"), "{err}");

    // Server side: a fresh client, its certificate revoked while connected.
    let client = ClientTls::load(&agent).unwrap();
    let mut raw = client.connect_stream(&ep).await.unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(raw.read(&mut buf).await.unwrap() > 0, "the server answers");
    assert_eq!(server.set_revoked([fp(&agent)].into_iter().collect()), 1);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server closed the revoked client's connection"
    );
    assert!(
        call(&client, &ep).await.is_err(),
        "and refuses it afterwards"
    );
    cancel.cancel();
}

/// vendor/h2 starts each connection with 2 KiB write and read buffers (upstream: 16 and
/// 8 KiB) and no Huffman buffer (PATCH.md): a header block bigger than the write buffer, DATA
/// much bigger than both, and many small frames at once must still cross intact, both ways,
/// over the real TLS stack.
#[tokio::test]
async fn big_frames_and_header_blocks_cross_small_h2_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = make_ca(d, "test.local");
    let server = issue(d, &ca, "coord", "spiffe://test.local/coordinator/1", false);
    let peer = issue(d, &ca, "peer", "spiffe://test.local/coordinator/2", false);
    let cancel = CancellationToken::new();
    let (endpoint, _tls) = start_server(&server, cancel.clone()).await;
    let client = ClientTls::load(&peer).unwrap();
    let channel = client
        .connect(&endpoint, Duration::from_secs(3))
        .await
        .unwrap();

    // 12 KiB header value (HPACK, Huffman-coded where shorter) and 3 MiB of DATA.
    let big: String = (0..12 * 1024)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    let data: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut c = pb::raft_service_client::RaftServiceClient::new(channel.clone());
    let mut req = tonic::Request::new(pb::RaftPayload { data: data.clone() });
    req.metadata_mut().insert("x-big", big.parse().unwrap());
    let resp = c.append_entries(req).await.unwrap();
    assert_eq!(
        resp.metadata().get("x-big").map(|v| v.to_str().unwrap()),
        Some(big.as_str()),
        "the big header block came back changed"
    );
    let mut back = resp.into_inner().data;
    back.reverse();
    assert!(back == data, "the 3 MiB payload came back changed");

    // 200 small calls at once on the same connection: many small frames queue up together.
    let calls = (0..200u32).map(|i| {
        let mut c = pb::raft_service_client::RaftServiceClient::new(channel.clone());
        async move {
            let data = i.to_be_bytes().repeat(1 + (i as usize % 50));
            let got = c
                .append_entries(pb::RaftPayload { data: data.clone() })
                .await
                .map(|r| r.into_inner().data);
            (data, got)
        }
    });
    for (mut sent, got) in futures::future::join_all(calls).await {
        sent.reverse();
        assert_eq!(got.unwrap(), sent);
    }
    cancel.cancel();
}
