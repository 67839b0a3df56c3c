//! Certificates after a breach, end to end with 3 coordinators and 2 agents:
//! `drctl rotate-credentials --emergency --scope certs` re-issues the agents' AND the
//! coordinators' certificates (keys made where they are used, picked up without restart),
//! the cluster keeps its leader and its agents, and afterwards the old agent and old
//! coordinator certificates are refused. Connections that were OPEN with a now revoked
//! certificate are closed (not only new handshakes refused): proven with idle raw TLS
//! connections that the coordinator ends. `drctl security revoke --certificate` does the same for
//! a lost operator certificate. Agents receive the revocation set (so they refuse an old
//! coordinator certificate) and say so in their log.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use dr_proto::pb;
use dr_proto::pb::control_service_client::ControlServiceClient;
use dr_proto::tls::{ClientTls, TlsPaths};
use dr_tests::TestCluster;
use dr_tests::harness::cluster::json_list;
use dr_tests::harness::wait::wait_until;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::info;

/// WhoAmI with this certificate: the identity, or why it was refused.
async fn who_am_i(endpoint: &str, paths: &TlsPaths) -> Result<String, String> {
    let tls = ClientTls::load(paths).map_err(|e| e.to_string())?;
    let channel = tls.channel(endpoint).map_err(|e| e.to_string())?;
    let call = async {
        ControlServiceClient::new(channel)
            .who_am_i(pb::WhoAmIRequest {})
            .await
    };
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(s)) => Err(s.to_string()),
        Ok(Ok(r)) => Ok(r.into_inner().identity),
    }
}

/// An established HTTP/2 connection that stays idle: TLS done, preface and SETTINGS
/// exchanged, so the coordinator holds it as a live session of this certificate.
async fn open_idle(
    endpoint: &str,
    paths: &TlsPaths,
) -> Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + use<>> {
    let tls = ClientTls::load(paths)?;
    let mut s = tls.connect_stream(endpoint).await?;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
    s.flush().await?;
    let mut buf = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .context("the coordinator's SETTINGS within 5 s")??;
    assert_eq!(buf[3], 4, "the coordinator answers with SETTINGS");
    Ok(s)
}

/// Reads until the peer closes (EOF or error); how long that took, or None if still open.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {} // SETTINGS ack, pings: still open
        }
    }
}

fn copy_pair(
    cert: &std::path::Path,
    key: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
    ca: std::path::PathBuf,
) -> Result<TlsPaths> {
    let paths = TlsPaths {
        ca,
        cert: dir.join(format!("old-{name}.pem")),
        key: dir.join(format!("old-{name}.key")),
        reload_interval: None,
    };
    std::fs::copy(cert, &paths.cert)?;
    std::fs::copy(key, &paths.key)?;
    Ok(paths)
}

fn sha_of(pem_path: &std::path::Path) -> Result<String> {
    let der = rustls_pemfile::certs(&mut std::fs::read(pem_path)?.as_slice())
        .next()
        .context("no certificate")??;
    Ok(dr_proto::tls::cert_sha256_hex(&der))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t41_certs_rotated_on_agents_and_coordinators_old_ones_refused_open_sessions_cut()
-> Result<()> {
    let hosts = ["ra-1", "ra-2"];
    let mut cluster = TestCluster::builder()
        .coordinators(3)
        .agents(hosts)
        .start()
        .await?;
    let leader = cluster.leader_id().await?;
    let leader_ep = cluster.coord_listen(leader)?.to_string();
    let follower = cluster
        .coord_ids()
        .into_iter()
        .find(|i| *i != leader)
        .context("a follower")?;
    let follower_ep = cluster.coord_listen(follower)?.to_string();
    let ca = cluster.pki.ca();
    let dir = cluster.dir().path().to_path_buf();
    let term_before = cluster.cluster_status_at(leader).await?["term"].clone();

    // --- the certificates as they are now
    let pki_dir = cluster.pki.dir.clone();
    let old_agent = copy_pair(
        &pki_dir.join("agent-ra-1.pem"),
        &pki_dir.join("agent-ra-1.key"),
        &dir,
        "agent",
        ca.clone(),
    )?;
    let old_coord = copy_pair(
        &pki_dir.join(format!("coordinator-{follower}.pem")),
        &pki_dir.join(format!("coordinator-{follower}.key")),
        &dir,
        "coordinator",
        ca.clone(),
    )?;
    let mallory = cluster.pki.operator("mallory", "operator").await?;
    let mallory = TlsPaths {
        ca: ca.clone(),
        cert: mallory.cert,
        key: mallory.key,
        reload_interval: None,
    };
    let td = cluster.pki.trust_domain.clone();
    assert_eq!(
        who_am_i(&follower_ep, &old_agent)
            .await
            .map_err(anyhow::Error::msg)?,
        format!("spiffe://{td}/agent/ra-1")
    );
    assert_eq!(
        who_am_i(&follower_ep, &old_coord)
            .await
            .map_err(anyhow::Error::msg)?,
        format!("spiffe://{td}/coordinator/{follower}")
    );
    let coord_shas_before: Vec<String> = cluster
        .coord_ids()
        .into_iter()
        .map(|i| sha_of(&pki_dir.join(format!("coordinator-{i}.pem"))))
        .collect::<Result<_>>()?;

    // Sessions open BEFORE the revocation, on the leader and on a follower.
    let mut idle_agent = open_idle(&leader_ep, &old_agent).await?;
    let mut idle_coord = open_idle(&follower_ep, &old_coord).await?;
    let mut idle_mallory = open_idle(&leader_ep, &mallory).await?;
    assert!(
        closed_within(&mut idle_agent, Duration::from_secs(2))
            .await
            .is_none(),
        "an idle session stays open while its certificate is valid"
    );

    // --- the emergency rotation of every certificate
    let ca_dir = pki_dir.display().to_string();
    let out = cluster
        .drctl([
            "rotate-credentials",
            "--emergency",
            "--scope",
            "certs",
            "--host",
            "ra-1",
            "--host",
            "ra-2",
            "--ca-dir",
            &ca_dir,
            "--reason",
            "breach drill",
        ])
        .await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    info!(%stdout, %stderr, "rotation");
    assert!(out.status.success(), "rotation failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("coordinator certificates"), "{stdout}");

    // Every coordinator has a new certificate on disk (made from a key made there).
    for (i, before) in cluster.coord_ids().into_iter().zip(&coord_shas_before) {
        let now = sha_of(&pki_dir.join(format!("coordinator-{i}.pem")))?;
        assert_ne!(&now, before, "coordinator {i} got a new certificate");
    }
    let sec = cluster.drctl_json(["security", "status"]).await?;
    let revoked: Vec<String> = json_list(&sec, "revoked")
        .iter()
        .filter_map(|r| r["sha256"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(revoked.len(), 5, "2 agents + 3 coordinators: {sec}");
    for s in &coord_shas_before {
        assert!(
            revoked.contains(s),
            "old coordinator certificate {s} revoked"
        );
    }
    assert!(revoked.contains(&sha_of(&old_agent.cert)?));

    // --- open sessions of revoked certificates are closed by the coordinators
    let t = closed_within(&mut idle_agent, Duration::from_secs(10))
        .await
        .context("the leader did not close the open session of the revoked agent certificate")?;
    info!(?t, "open agent-certificate session closed");
    closed_within(&mut idle_coord, Duration::from_secs(10))
        .await
        .context(
            "the follower did not close the open session of the revoked coordinator certificate",
        )?;
    assert!(
        closed_within(&mut idle_mallory, Duration::from_secs(1))
            .await
            .is_none(),
        "a session of a certificate that was NOT revoked stays open"
    );

    // --- and new connections with them are refused, on every coordinator
    for ep in [&leader_ep, &follower_ep] {
        let e = who_am_i(ep, &old_agent)
            .await
            .err()
            .context("old agent certificate accepted")?;
        info!(%e, "old agent certificate refused");
        let e = who_am_i(ep, &old_coord)
            .await
            .err()
            .context("old coordinator certificate accepted")?;
        info!(%e, "old coordinator certificate refused");
    }

    // --- the cluster kept its leader, the agents reconnected, drctl works
    let st = cluster.cluster_status_at(leader).await?;
    assert_eq!(
        cluster.leader_id().await?,
        leader,
        "the leader is unchanged: {st}"
    );
    assert_eq!(st["term"], term_before, "no election happened: {st}");
    let host_list: Vec<String> = hosts.iter().map(|h| (*h).to_string()).collect();
    cluster.wait_agents_connected(&host_list).await?;
    // Every coordinator reloaded without a restart; agents know the revoked set.
    for i in cluster.coord_ids() {
        let log = std::fs::read_to_string(cluster.dir().log_path(&format!("coord-{i}")))?;
        assert!(
            log.contains("tls certificates reloaded")
                || log.contains("coordinator certificate rotated"),
            "coordinator {i}"
        );
    }
    for h in hosts {
        let path = cluster.dir().log_path(&format!("agent-{h}"));
        wait_until(
            "the agent applies the revocation set",
            Duration::from_secs(15),
            Duration::from_millis(300),
            || async {
                let log = std::fs::read_to_string(&path)?;
                Ok(log
                    .contains("coordinator certificate revocations applied")
                    .then_some(()))
            },
        )
        .await?;
    }

    // --- a lost operator certificate: revoked by an admin, its open session cut
    assert!(who_am_i(&leader_ep, &mallory).await.is_ok());
    let mallory_cert = mallory.cert.display().to_string();
    let out = cluster
        .drctl([
            "security",
            "revoke",
            "--certificate",
            &mallory_cert,
            "--reason",
            "laptop stolen",
        ])
        .await?;
    assert!(out.status.success(), "{out:?}");
    closed_within(&mut idle_mallory, Duration::from_secs(10))
        .await
        .context("the open session of the revoked operator certificate was not closed")?;
    let e = who_am_i(&leader_ep, &mallory)
        .await
        .err()
        .context("revoked operator accepted")?;
    info!(%e, "revoked operator refused");
    // The admin's own certificate still works.
    let st = cluster.drctl_json(["security", "status"]).await?;
    assert_eq!(json_list(&st, "revoked").len(), 6, "{st}");
    cluster.stop_all().await?;
    let log = std::fs::read_to_string(cluster.dir().log_path(&format!("coord-{leader}")))?;
    assert!(log.contains("closed open connections whose certificate is now revoked"));
    cluster.shutdown().await?;
    Ok(())
}
