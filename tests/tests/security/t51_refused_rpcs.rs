//! Refused RPCs as a security signal: a viewer certificate calling a mutating RPC again
//! and again (each call refused with permission denied) raises ONE `refused-rpcs` alert
//! naming that identity, visible in `drctl security status` and in the audit log.

use std::time::Duration;

use anyhow::{Context as _, Result};
use dr_tests::TestCluster;
use dr_tests::harness::cluster::json_list;
use dr_tests::harness::wait::wait_until;
use tracing::info;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t51_repeated_refused_rpcs_raise_one_alert() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(1)
        .agents(["rpc-1"])
        .start()
        .await?;
    let sec = cluster
        .drctl_json([
            "security",
            "monitoring",
            "--level",
            "normal",
            "--refusal-threshold",
            "3",
            "--refusal-window",
            "60s",
        ])
        .await?;
    assert_eq!(sec["refusal_threshold"], 3);
    let viewer = cluster.pki.operator("victor", "viewer").await?;
    let endpoint = cluster.coord_listen(1)?.to_string();
    let cfg = cluster.write_drctl_config("victor", &[endpoint], &viewer)?;

    // Below the threshold: refused, no alert.
    for _ in 0..2 {
        let out = cluster
            .drctl_with(&cfg, ["isolate", "--host", "rpc-1", "--reason", "probe"])
            .await?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("viewer"), "the refusal names the role: {err}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sec = cluster.drctl_json(["security", "status"]).await?;
    let rpcs = |sec: &serde_json::Value| -> Vec<serde_json::Value> {
        json_list(sec, "alerts")
            .into_iter()
            .filter(|a| a["kind"] == "refused-rpcs")
            .collect()
    };
    assert!(rpcs(&sec).is_empty(), "2 refusals stay below 3: {sec}");

    // The third and fourth: one alert, naming the viewer's identity.
    for _ in 0..2 {
        let out = cluster
            .drctl_with(&cfg, ["isolate", "--host", "rpc-1", "--reason", "probe"])
            .await?;
        assert!(!out.status.success());
    }
    let alert = wait_until(
        "a refused-rpcs alert",
        Duration::from_secs(15),
        Duration::from_millis(300),
        || async {
            let sec = cluster.drctl_json(["security", "status"]).await?;
            Ok(rpcs(&sec).into_iter().next())
        },
    )
    .await?;
    info!(%alert, "refused-rpcs alert");
    let source = alert["source"].as_str().context("source")?;
    assert!(source.contains("operator/victor"), "{alert}");
    assert!(
        alert["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Isolate")),
        "{alert}"
    );
    // Nothing was isolated by the refused calls.
    let sec = cluster.drctl_json(["security", "status"]).await?;
    assert!(json_list(&sec, "isolated").is_empty(), "{sec}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sec = cluster.drctl_json(["security", "status"]).await?;
    assert_eq!(rpcs(&sec).len(), 1, "one alert per window: {sec}");
    // The alert is an audited decision.
    let audit = cluster.drctl(["audit", "export"]).await?;
    assert!(
        String::from_utf8_lossy(&audit.stdout).contains("security_alert"),
        "the alert is in the audit log"
    );
    cluster.shutdown().await?;
    Ok(())
}
