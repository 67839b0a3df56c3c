//! Security monitoring end to end: `drctl security monitoring --level high` reaches the
//! agent (its reported level changes), a watched file changed on the host becomes an
//! integrity alert, and repeated handshakes with a certificate of ANOTHER CA become one
//! (rate-limited) refused-handshake alert; both alerts show in `drctl status` and in the
//! audit log.

use std::time::Duration;

use anyhow::{Context as _, Result};
use dr_tests::TestCluster;
use dr_tests::harness::certs::Pki;
use dr_tests::harness::cluster::{AgentSpec, json_list};
use dr_tests::harness::wait::wait_until;
use serde_json::Value;
use tracing::info;

async fn security_status(cluster: &TestCluster) -> Result<Value> {
    cluster.drctl_json(["security", "status"]).await
}

fn alerts(sec: &Value, kind: &str) -> Vec<Value> {
    json_list(sec, "alerts")
        .into_iter()
        .filter(|a| a["kind"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_monitoring_level_integrity_and_refused_handshake_alerts() -> Result<()> {
    let watched_dir = tempfile::tempdir()?;
    let watched = watched_dir.path().join("app.conf");
    std::fs::write(&watched, "listen = 8080\n")?;
    let host = "mon-1";
    let mut agent = AgentSpec::new(host);
    agent.extra_toml = format!(
        "\n[integrity]\npaths = [{:?}]\ninterval = \"1h\"\nhigh_interval = \"1s\"\n",
        watched.display().to_string()
    );
    let cluster = TestCluster::builder()
        .coordinators(1)
        .agent(agent)
        .start()
        .await?;

    // --- the level is committed and pushed to the agent
    let sec = cluster
        .drctl_json([
            "security",
            "monitoring",
            "--level",
            "high",
            "--refusal-threshold",
            "3",
            "--refusal-window",
            "60s",
        ])
        .await?;
    assert_eq!(sec["monitoring_level"], "high");
    assert_eq!(sec["refusal_threshold"], 3);
    wait_until(
        "the agent reports monitoring level high",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || async {
            let agents = cluster.agents_at_leader().await?;
            let a = agents
                .iter()
                .find(|a| a["host_id"] == host)
                .context("agent listed")?;
            Ok((a["facts"]["security_monitoring_level"] == "high").then_some(()))
        },
    )
    .await?;
    info!("--- level high reached the agent");

    // --- a changed watched file becomes an integrity alert (checked every 1s at high)
    std::fs::write(&watched, "listen = 8080\nbackdoor = true\n")?;
    let integrity = wait_until(
        "an integrity alert for the host",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || async {
            let a = alerts(&security_status(&cluster).await?, "integrity");
            Ok((!a.is_empty()).then_some(a))
        },
    )
    .await?;
    assert_eq!(integrity[0]["source"], host);
    let detail = integrity[0]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("app.conf") && detail.contains("changed"),
        "{detail}"
    );

    // --- a certificate of another CA, presented repeatedly
    let rogue = Pki::init(
        &cluster.bins.drctl,
        &cluster.dir().join("rogue-pki"),
        "yeslocker.test",
    )
    .await?;
    let mallory = rogue.operator("mallory", "admin").await?;
    let endpoint = cluster.coord_listen(1)?.to_string();
    let rogue_cfg = cluster.dir().join("drctl-mallory.toml");
    std::fs::write(
        &rogue_cfg,
        format!(
            "endpoints = [{endpoint:?}]\ntimeout = \"5s\"\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            cluster.pki.ca().display().to_string(),
            mallory.cert.display().to_string(),
            mallory.key.display().to_string()
        ),
    )?;
    for _ in 0..4 {
        let out = cluster.drctl_with(&rogue_cfg, ["status"]).await?;
        assert!(!out.status.success(), "a foreign certificate was accepted");
    }
    let refused = wait_until(
        "a refused-handshake alert",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || async {
            let a = alerts(&security_status(&cluster).await?, "refused-handshakes");
            Ok((!a.is_empty()).then_some(a))
        },
    )
    .await?;
    assert_eq!(refused[0]["source"], "127.0.0.1");
    assert!(
        refused[0]["count"].as_u64().unwrap_or(0) >= 3,
        "{}",
        refused[0]
    );
    // Rate limited: more refusals within the window raise no second alert.
    for _ in 0..4 {
        let _refused = cluster.drctl_with(&rogue_cfg, ["status"]).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sec = security_status(&cluster).await?;
    assert_eq!(
        alerts(&sec, "refused-handshakes").len(),
        1,
        "rate limit: {sec}"
    );

    // --- both alerts in `drctl status` and in the audit log
    let status = cluster.drctl(["status"]).await?;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("refused-handshakes") && text.contains("integrity"),
        "{text}"
    );
    let audit = cluster.drctl(["audit", "export"]).await?;
    assert!(audit.status.success(), "{audit:?}");
    let audit = String::from_utf8_lossy(&audit.stdout);
    let hits = audit
        .lines()
        .filter(|l| l.contains("security_alert"))
        .count();
    assert_eq!(hits, 2, "one audit entry per alert:\n{audit}");

    cluster.shutdown().await?;
    Ok(())
}
