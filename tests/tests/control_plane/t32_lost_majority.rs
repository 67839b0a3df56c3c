//! Issue 2, defect 6: a leader cut off from the other coordinators (only the coordinator
//! links are cut; agents still reach it) used to keep its agent sessions for minutes,
//! and writes sent to it hung. Once it has gone an election timeout without a quorum it
//! must redirect its agents (no known leader, so they roam to the majority side) and
//! refuse writes at once with a clear message.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use dr_tests::harness::cluster::{cli, get_str, is_connected, json_list};
use dr_tests::{TestCluster, wait_until};
use tracing::info;

#[tokio::test]
async fn cut_off_leader_sends_agents_to_the_majority_and_fails_writes_fast() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agents(["h1", "h2", "h3"])
        .start()
        .await?;
    let hosts = cluster.agent_hosts();

    let (old, majority) = {
        info!("--- cut the leader off from the other two coordinators");
        cluster.cut_leader_off().await?
    };

    let new = {
        info!("--- the agents roam to the majority's leader");
        let new = cluster.wait_for_leader_among(&majority, Some(old)).await?;
        wait_until(
            "every agent is connected to the majority leader",
            Duration::from_secs(60),
            Duration::from_millis(500),
            || async {
                let v = cluster.drctl_json_at(new, cli::AGENTS_LIST).await?;
                let agents = json_list(&v, "agents");
                let missing: Vec<&String> = hosts
                    .iter()
                    .filter(|h| {
                        !agents
                            .iter()
                            .any(|a| get_str(a, "host_id") == Some(h.as_str()) && is_connected(a))
                    })
                    .collect();
                if missing.is_empty() {
                    Ok(Some(()))
                } else {
                    bail!("not yet at node {new}: {missing:?}")
                }
            },
        )
        .await?;
        new
    };

    {
        info!("--- a write at the cut-off node fails fast and says why");
        let t = Instant::now();
        let out = cluster.drctl_at(old, cli::run_checks_no_wait("h1")).await?;
        let took = t.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "write at the cut-off node {old} succeeded"
        );
        assert!(
            stderr.contains("lost contact with the majority"),
            "unclear refusal: {stderr}"
        );
        // Generous bound for a loaded CI machine; the hang it replaces lasted minutes.
        assert!(took < Duration::from_secs(8), "refusal took {took:?}");
        info!(?took, %stderr, new, "refused as expected");
    }

    {
        info!("--- heal: one leader again, agents connected to it");
        cluster.net.heal();
        cluster.wait_for_leader(None).await?;
        cluster.wait_agents_connected(&hosts).await?;
    }
    cluster.shutdown().await
}
