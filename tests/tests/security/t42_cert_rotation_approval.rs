//! Certificate rotation under the two-person rule: the certificate flow is interactive (the
//! requester's drctl signs CSRs with its CA), so an approval cannot launch it; it GRANTS it
//! to the requester, who runs again with `--approved R-N`. Checked: without approval
//! nothing is made or revoked, the requester cannot approve, the grant is unusable before
//! the approval and by anyone else afterwards, and the approved run replaces and revokes
//! the certificates.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use dr_proto::pb;
use dr_proto::pb::control_service_client::ControlServiceClient;
use dr_proto::tls::{ClientTls, TlsPaths};
use dr_tests::TestCluster;
use dr_tests::harness::cluster::json_list;
use serde_json::Value;
use tracing::info;

fn sha_of(pem_path: &Path) -> Result<String> {
    let der = rustls_pemfile::certs(&mut std::fs::read(pem_path)?.as_slice())
        .next()
        .context("no certificate")??;
    Ok(dr_proto::tls::cert_sha256_hex(&der))
}

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

/// Runs drctl with `cfg`, expects failure, returns stderr.
async fn refused(cluster: &TestCluster, cfg: &Path, args: &[&str]) -> Result<String> {
    let out = cluster.drctl_with(cfg, args).await?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{args:?} should have been refused: {}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(stderr)
}

/// The request id (`R-N`) named in a "needs approval" answer.
fn request_id(err: &str) -> String {
    let start = err.find("request R-").expect("a request id") + "request ".len();
    err[start..]
        .chars()
        .take_while(|c| *c == 'R' || *c == '-' || c.is_ascii_digit())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t42_cert_rotation_needs_a_grant_from_a_second_admin() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(1)
        .agents(["ga-1"])
        .start()
        .await?;
    let leader = cluster.leader_id().await?;
    let ep = cluster.coord_listen(leader)?.to_string();
    let endpoints = vec![ep.clone()];
    let bob = cluster.pki.operator("bob", "admin").await?;
    let bob = cluster.write_drctl_config("bob", &endpoints, &bob)?;
    let carol = cluster.pki.operator("carol", "admin").await?;
    let carol = cluster.write_drctl_config("carol", &endpoints, &carol)?;
    let admin = cluster.admin_drctl_config();
    let pki_dir = cluster.pki.dir.clone();
    let ca_dir = pki_dir.display().to_string();
    let agent_pem = pki_dir.join("agent-ga-1.pem");
    let coord_pem = pki_dir.join(format!("coordinator-{leader}.pem"));
    let before = (sha_of(&agent_pem)?, sha_of(&coord_pem)?);
    let old_agent = TlsPaths {
        ca: cluster.pki.ca(),
        cert: cluster.dir().path().join("old-agent.pem"),
        key: cluster.dir().path().join("old-agent.key"),
        reload_interval: None,
    };
    std::fs::copy(&agent_pem, &old_agent.cert)?;
    std::fs::copy(pki_dir.join("agent-ga-1.key"), &old_agent.key)?;
    let rotate = |approved: Option<&str>| {
        let mut a = vec![
            "rotate-credentials",
            "--emergency",
            "--scope",
            "certs",
            "--host",
            "ga-1",
            "--ca-dir",
            &ca_dir,
        ];
        if let Some(id) = approved {
            a.extend(["--approved", id]);
        }
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let unchanged = |what: &str| -> Result<()> {
        assert_eq!(sha_of(&agent_pem)?, before.0, "{what}: agent certificate");
        assert_eq!(
            sha_of(&coord_pem)?,
            before.1,
            "{what}: coordinator certificate"
        );
        Ok(())
    };
    let revoked = || async {
        let sec = cluster.drctl_json(["security", "status"]).await?;
        Ok::<usize, anyhow::Error>(json_list(&sec, "revoked").len())
    };

    info!("--- policy: rotation needs a second admin");
    cluster
        .drctl_json([
            "approvals",
            "policy",
            "set",
            "--require",
            "rotate-credentials",
            "--ttl",
            "1h",
        ])
        .await?;

    info!("--- without approval: a request, no key made, nothing revoked");
    let args = rotate(None);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = refused(&cluster, &admin, &argv).await?;
    assert!(err.contains("needs approval: request R-"), "{err}");
    let id = request_id(&err);
    assert!(
        err.contains(&format!("another admin runs `drctl approve {id}`")),
        "{err}"
    );
    assert!(
        err.contains(&format!("run again with --approved {id}")),
        "{err}"
    );
    unchanged("gated run")?;
    assert_eq!(revoked().await?, 0);
    let pending_key = cluster
        .dir()
        .path()
        .join("agent-ga-1/rotation/pending-key.pem");
    assert!(!pending_key.exists(), "no key was made on the agent");

    info!("--- the grant does not exist before the approval; the requester cannot approve");
    let args = rotate(Some(&id));
    let approved_argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = refused(&cluster, &admin, &approved_argv).await?;
    assert!(
        err.contains(&format!("no certificate rotation was granted by {id}")),
        "{err}"
    );
    let err = refused(&cluster, &admin, &["approve", &id]).await?;
    assert!(err.contains("yourself"), "{err}");
    unchanged("before approval")?;

    info!("--- a second admin approves: a grant, still nothing rotated");
    let out = cluster
        .drctl_with(&bob, &["approve", &id, "--output", "json"])
        .await?;
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["state"], "approved", "{v}");
    assert!(
        v["launch_result"]
            .as_str()
            .unwrap_or_default()
            .contains("security_grant_cert_rotation"),
        "{v}"
    );
    unchanged("at approval")?;

    info!("--- someone else's grant is refused (the approver's too)");
    for (who, cfg) in [("carol", &carol), ("bob", &bob)] {
        let err = refused(&cluster, cfg, &approved_argv).await?;
        assert!(
            err.contains(&format!("granted by {id} belongs to"))
                && err.contains("only its requester"),
            "{who}: {err}"
        );
    }
    unchanged("someone else's grant")?;
    assert_eq!(revoked().await?, 0);

    info!("--- the requester runs the approved rotation");
    let out = cluster.drctl_with(&admin, &approved_argv).await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "approved rotation failed:\n{stdout}\n{stderr}"
    );
    assert_ne!(sha_of(&agent_pem)?, before.0, "agent certificate replaced");
    assert_ne!(
        sha_of(&coord_pem)?,
        before.1,
        "coordinator certificate replaced"
    );
    assert_eq!(revoked().await?, 2, "1 agent + 1 coordinator");
    // Each coordinator applies the committed revocations to its TLS layer on its next
    // security tick (500 ms): allow a few ticks, on a loaded machine, before judging.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let e = loop {
        match who_am_i(&ep, &old_agent).await {
            Err(e) => break e,
            Ok(id) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the old agent certificate ({id}) was still accepted 10 s after the rotation"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    info!(%e, "old agent certificate refused");

    info!("--- audited: the request, the approval and the grant");
    let a = cluster
        .drctl_json(["audit", "list", "--limit", "1000"])
        .await?;
    let entries = json_list(&a, "entries");
    let grant = entries
        .iter()
        .find(|e| e["what"] == "security_grant_cert_rotation")
        .context("no grant in the audit log")?;
    assert!(
        grant["origin"]
            .as_str()
            .unwrap_or_default()
            .contains("/operator/admin"),
        "the grant is applied as the requester: {grant}"
    );
    assert!(
        grant["target"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&id),
        "{grant}"
    );
    let v = cluster.drctl_json(["audit", "verify"]).await?;
    assert_eq!(v["ok"], true, "{v}");
    cluster.shutdown().await
}
