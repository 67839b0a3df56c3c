//! Crash safety of the coordinators: kill -9 of the leader, a full stop/start, and a member
//! that fell so far behind that it must catch up through a snapshot.
//!
//! "Nothing committed is lost" is checked through commands: every `drctl run` is a Raft
//! entry, so commands listed before a crash must be listed after it.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Result, bail};
use dr_tests::harness::cluster::{cli, get_str, get_u64};
use dr_tests::{TestCluster, wait_until};
use serde_json::Value;
use tracing::info;

/// Keys of the commands the cluster lists for `host`.
async fn command_keys(cluster: &TestCluster, host: &str) -> Result<BTreeSet<String>> {
    Ok(cluster
        .commands(host)
        .await?
        .iter()
        .filter_map(|c| get_str(c, "key").map(str::to_owned))
        .collect())
}

/// `drctl run --host H checks` until it succeeds (a leader change may refuse one try).
async fn run_checks(cluster: &TestCluster, host: &str) -> Result<()> {
    wait_until(
        &format!("drctl run checks on {host} succeeds"),
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let out = cluster.drctl(cli::run_checks(host)).await?;
            if out.status.success() {
                Ok(Some(()))
            } else {
                bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
            }
        },
    )
    .await
}

/// Waits until node `id` has applied at least `index`.
async fn wait_applied(cluster: &TestCluster, id: u64, index: u64) -> Result<Value> {
    wait_until(
        &format!("node {id} applies index {index}"),
        Duration::from_secs(90),
        Duration::from_millis(500),
        || async {
            let st = cluster.cluster_status_at(id).await?;
            let applied = get_u64(&st, "applied_index").unwrap_or(0);
            if applied >= index {
                Ok(Some(st))
            } else {
                bail!("node {id} applied {applied}")
            }
        },
    )
    .await
}

#[tokio::test]
async fn leader_kill9_new_leader_agents_reconnect_nothing_lost_and_restart_catches_up() -> Result<()>
{
    let mut cluster = TestCluster::builder()
        .coordinators(3)
        .agents(["h1", "h2", "h3"])
        .start()
        .await?;
    let hosts = cluster.agent_hosts();

    let before = {
        info!("--- commit some commands");
        for h in &hosts {
            run_checks(&cluster, h).await?;
        }
        let keys = command_keys(&cluster, "h1").await?;
        assert!(!keys.is_empty(), "no command listed for h1 after drctl run");
        keys
    };

    let old = {
        info!("--- kill -9 the leader");
        let old = cluster.leader_id().await?;
        cluster.kill9(old)?;
        old
    };

    {
        info!("--- a new leader answers, the agents reconnect, nothing committed is lost");
        let new = cluster.wait_for_leader(Some(old)).await?;
        assert_ne!(new, old);
        cluster.wait_agents_connected(&hosts).await?;
        let after = command_keys(&cluster, "h1").await?;
        assert!(
            before.is_subset(&after),
            "lost commands: {:?}",
            before.difference(&after).collect::<Vec<_>>()
        );
        run_checks(&cluster, "h2").await?;
    }

    {
        info!("--- the killed node restarts and catches up");
        cluster.restart(old)?;
        let leader = cluster.wait_for_leader(None).await?;
        let commit =
            get_u64(&cluster.cluster_status_at(leader).await?, "commit_index").unwrap_or(0);
        wait_applied(&cluster, old, commit).await?;
    }
    cluster.shutdown().await
}

#[tokio::test]
async fn full_stop_and_start_restores_state_from_disk() -> Result<()> {
    let mut cluster = TestCluster::builder()
        .coordinators(3)
        .agents(["h1", "h2"])
        .start()
        .await?;
    let hosts = cluster.agent_hosts();

    let (keys, commit) = {
        info!("--- commit commands, note the commit index");
        run_checks(&cluster, "h1").await?;
        run_checks(&cluster, "h2").await?;
        let leader = cluster.leader_id().await?;
        let commit =
            get_u64(&cluster.cluster_status_at(leader).await?, "commit_index").unwrap_or(0);
        (command_keys(&cluster, "h1").await?, commit)
    };

    {
        info!("--- stop everything, start everything");
        cluster.stop_all().await?;
        cluster.start_all().await?;
    }

    {
        info!("--- state is back from disk: indexes, commands, agents");
        let leader = cluster.leader_id().await?;
        let st = wait_applied(&cluster, leader, commit).await?;
        assert!(get_u64(&st, "commit_index").unwrap_or(0) >= commit, "{st}");
        let after = command_keys(&cluster, "h1").await?;
        assert!(
            keys.is_subset(&after),
            "lost after restart: {:?}",
            keys.difference(&after).collect::<Vec<_>>()
        );
        cluster.wait_agents_connected(&hosts).await?;
    }
    cluster.shutdown().await
}

#[tokio::test]
async fn member_far_behind_catches_up_through_a_snapshot() -> Result<()> {
    // A snapshot every 10 entries: 40 commands while a follower is down put its next entry
    // in a purged part of the leader's log.
    let mut cluster = TestCluster::builder()
        .coordinators(3)
        .agents(["h1"])
        .snapshot_every(10)
        .start()
        .await?;

    let lagging = {
        info!("--- stop a follower");
        let leader = cluster.leader_id().await?;
        let follower = cluster
            .coord_ids()
            .into_iter()
            .find(|id| *id != leader)
            .expect("3 nodes have a follower");
        cluster.stop(follower).await?;
        follower
    };

    let commit = {
        info!("--- commit many entries while it is down");
        for i in 0..40 {
            let out = cluster.drctl(cli::run_checks_no_wait("h1")).await?;
            assert!(
                out.status.success(),
                "write {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let leader = cluster.leader_id().await?;
        let st = cluster.cluster_status_at(leader).await?;
        let snap = get_u64(&st, "snapshot_index").unwrap_or(0);
        assert!(
            snap > 0,
            "the leader took no snapshot with snapshot_every = 10: {st}"
        );
        get_u64(&st, "commit_index").unwrap_or(0)
    };

    {
        info!("--- restart it: it catches up, through a snapshot");
        cluster.restart(lagging)?;
        let st = wait_applied(&cluster, lagging, commit).await?;
        assert!(
            get_u64(&st, "snapshot_index").unwrap_or(0) > 0,
            "node {lagging} caught up from the leader's log, not through a snapshot (the \
             leader keeps its log after snapshotting: openraft's max_in_snapshot_log_to_keep \
             must be below the entries a lagging member misses): {st}"
        );
        let keys = command_keys(&cluster, "h1").await?;
        assert!(
            keys.len() >= 40,
            "only {} commands listed after catch-up",
            keys.len()
        );
    }
    cluster.shutdown().await
}
