//! Issue 2, item 3: reads must not be answered silently from a cut-off coordinator.
//!
//! A leader cut off from the other coordinators still holds an applied state that looks
//! authoritative. Before the fix, `drctl topology show` / `operations list` pointed at it
//! answered from that old state with no hint; an operator during an incident would see
//! the topology as it was before the majority changed it. Now every read is confirmed
//! with a quorum first: the cut-off node refuses (`unavailable`), and a drctl with every
//! endpoint configured moves on and gets the majority's answer.

#![allow(clippy::unwrap_used)]

use anyhow::Result;
use dr_tests::TestCluster;
use dr_tests::harness::cluster::AgentSpec;
use tracing::info;

fn example() -> String {
    format!(
        "{}/../deploy/examples/yeslocker/topology.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[tokio::test]
async fn cut_off_node_refuses_reads_and_drctl_gets_the_majority_answer() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(AgentSpec::new("bj-db-1").region("beijing").roles(&["db"]))
        .agent(AgentSpec::new("sh-db-1").region("shanghai").roles(&["db"]))
        .start()
        .await?;

    let (old, majority) = cluster.cut_leader_off().await?;
    let new = cluster.wait_for_leader_among(&majority, Some(old)).await?;
    info!(old, new, "leader cut off; the majority elected another");

    info!("--- the majority commits a topology the cut-off node never sees");
    let file = example();
    let v = cluster.drctl_json(["apply", "-f", &file]).await?;
    assert_eq!(v["applied"], true, "{v}");

    info!("--- drctl pointed only at the cut-off node gets an error, not its old state");
    for args in [
        vec!["topology", "show", "--output", "json"],
        vec!["operations", "list", "--output", "json"],
    ] {
        let out = cluster.drctl_at(old, &args).await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} at cut-off node {old} answered: {stdout}"
        );
        assert!(
            stdout.trim().is_empty(),
            "{args:?} at cut-off node {old} printed data: {stdout}"
        );
        assert!(
            stderr.contains("unavailable"),
            "{args:?}: unclear refusal: {stderr}"
        );
        info!(?args, %stderr, "refused as expected");
    }

    info!("--- drctl with every endpoint gets the majority's answer");
    let t = cluster.drctl_json(["topology", "show"]).await?;
    assert_eq!(t["version"], 1, "stale topology from the cut-off node: {t}");
    cluster.drctl_json(["operations", "list"]).await?;
    let t = cluster.drctl_json_at(new, ["topology", "show"]).await?;
    assert_eq!(t["version"], 1, "{t}");

    cluster.net.heal();
    cluster.wait_for_leader(None).await?;
    cluster.shutdown().await
}
