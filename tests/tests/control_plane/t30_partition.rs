//! The leader cut off from the other two coordinators by the fault layer: the majority
//! elects a new leader, the cut-off node commits nothing, and after healing all converge.
//!
//! Writes use `drctl run --no-wait`: the agents may still be attached to the cut-off node
//! (only the coordinator links are cut), and a waiting `drctl run` would rightly wait for
//! them; what is tested here is whether the write commits.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use dr_tests::harness::cluster::{cli, get_str, get_u64, json_list};
use dr_tests::{TestCluster, wait_until};
use tracing::info;

#[tokio::test]
async fn cut_off_leader_loses_writes_majority_elects_and_all_converge_after_heal() -> Result<()> {
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

    {
        info!("--- the majority elects a new leader and still takes writes");
        let new = cluster.wait_for_leader_among(&majority, Some(old)).await?;
        info!(new, "majority leader");
        wait_until(
            "a write through the majority leader succeeds",
            Duration::from_secs(60),
            Duration::from_millis(500),
            || async {
                let out = cluster.drctl_at(new, cli::run_checks_no_wait("h1")).await?;
                if out.status.success() {
                    Ok(Some(()))
                } else {
                    bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
                }
            },
        )
        .await?;
    }

    {
        info!("--- the cut-off node accepts no writes");
        let out = cluster.drctl_at(old, cli::run_checks_no_wait("h2")).await?;
        assert!(
            !out.status.success(),
            "a write sent only to the cut-off node {old} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        info!(stderr = %String::from_utf8_lossy(&out.stderr).trim(), "write refused as expected");
    }

    {
        info!("--- heal: everybody converges on one leader, one commit index, one agents view");
        cluster.net.heal();
        let leader = cluster.wait_for_leader(None).await?;
        cluster.wait_agents_connected(&hosts).await?;
        wait_until(
            "all nodes have applied the same index and see the same agents",
            Duration::from_secs(90),
            Duration::from_millis(500),
            || async {
                let mut applied = BTreeMap::new();
                let mut views = BTreeMap::new();
                for id in cluster.coord_ids() {
                    let st = cluster.cluster_status_at(id).await?;
                    applied.insert(id, get_u64(&st, "applied_index").unwrap_or(0));
                    let agents = cluster.drctl_json_at(id, cli::AGENTS_LIST).await?;
                    let view: Vec<(String, String)> = json_list(&agents, "agents")
                        .iter()
                        .map(|a| {
                            (
                                get_str(a, "host_id").unwrap_or("").to_owned(),
                                get_str(a, "state").unwrap_or("").to_owned(),
                            )
                        })
                        .collect();
                    views.insert(id, view);
                }
                let same_index = applied.values().all(|a| Some(a) == applied.values().next());
                let same_view = views.values().all(|v| Some(v) == views.values().next());
                if same_index && same_view {
                    Ok(Some(()))
                } else {
                    bail!("leader {leader}; applied {applied:?}; agents {views:?}")
                }
            },
        )
        .await?;
    }
    cluster.shutdown().await
}
