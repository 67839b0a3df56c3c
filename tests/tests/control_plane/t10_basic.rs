//! The smallest whole system: 3 coordinators (beijing, shanghai, witness) and 3 agents
//! start, elect a leader, and every agent is connected.

use anyhow::Result;
use dr_tests::TestCluster;
use dr_tests::harness::cluster::{get_str, get_u64, is_connected, json_list};
use tracing::info;

#[tokio::test]
async fn three_coordinators_three_agents_all_connected() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agents(["h1", "h2", "h3"])
        .start()
        .await?;

    info!("--- drctl agents list --output json shows all three connected");
    {
        let v = cluster.drctl_json(["agents", "list"]).await?;
        let agents = json_list(&v, "agents");
        // Whichever node drctl asked, the hosts are known; `connected` is the leader's view.
        for h in ["h1", "h2", "h3"] {
            assert!(
                agents.iter().any(|a| get_str(a, "host_id") == Some(h)),
                "{h} missing from {v}"
            );
        }
        let at_leader = cluster.agents_at_leader().await?;
        assert_eq!(
            at_leader.iter().filter(|a| is_connected(a)).count(),
            3,
            "{at_leader:?}"
        );
    }

    info!("--- cluster status: three voters, one leader, the same on every node");
    {
        let leader = cluster.leader_id().await?;
        for id in cluster.coord_ids() {
            let st = cluster.cluster_status_at(id).await?;
            assert_eq!(get_u64(&st, "leader_id"), Some(leader), "node {id}: {st}");
            let members = json_list(&st, "members");
            assert_eq!(members.len(), 3, "node {id} members: {st}");
        }
    }
    cluster.shutdown().await
}
