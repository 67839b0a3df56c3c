//! Planned switchover with real PostgreSQL 15 and a writer running (issue 5, acceptance 1):
//! primary in beijing (bj-db-1), streaming replica in shanghai (sh-db-1), three
//! coordinators; `drctl failover --to shanghai --wait` must lose no acknowledged write,
//! leave shanghai writable, beijing a replica, and the topology on the new primary with a
//! raised epoch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use dr_tests::harness::cluster::{AgentSpec, agent_name, coord_name, json_list};
use dr_tests::{LinkMode, TestCluster, wait_until};
use tracing::info;

use super::pg_pair::PgNode;
// The topology, the writer and its acknowledgement log are failback's (t80), which runs
// the same pair through a switchover and back.
use super::t80_failback::{Acks, topology, writer};

/// One acknowledged write: row id and the port of the server that committed it.

#[tokio::test]
async fn planned_switchover_with_writer_loses_nothing() -> Result<()> {
    dr_tests::init_tracing();
    let pgdir = tempfile::Builder::new().prefix("dr-t20-pg-").tempdir()?;
    std::fs::set_permissions(
        pgdir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    info!("--- PostgreSQL 15: primary (beijing), streaming replica (shanghai)");
    let bj = PgNode::primary(&pgdir.path().join("bj"), &["dr_sh_db_1"]).await?;
    let sh = PgNode::replica(&pgdir.path().join("sh"), &bj, "dr_sh_db_1").await?;
    assert!(!bj.in_recovery().await?);
    assert!(sh.in_recovery().await?);

    let mut bj_spec = AgentSpec::new("bj-db-1").region("beijing").roles(&["db"]);
    bj_spec.extra_toml = bj.agent_toml("yeslocker");
    let mut sh_spec = AgentSpec::new("sh-db-1").region("shanghai").roles(&["db"]);
    sh_spec.extra_toml = sh.agent_toml("yeslocker");
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(bj_spec)
        .agent(sh_spec)
        .start()
        .await?;
    let result = scenario(&cluster, &bj, &sh, &pgdir).await;
    if result.is_err() {
        for n in [&bj, &sh] {
            eprintln!(
                "---- {}\n{}",
                n.log_file.display(),
                dr_tests::harness::testdir::tail(&n.log_file, 40)
            );
        }
    }
    let down = cluster.shutdown().await;
    bj.stop();
    sh.stop();
    result?;
    down
}

async fn scenario(
    cluster: &TestCluster,
    bj: &PgNode,
    sh: &PgNode,
    pgdir: &tempfile::TempDir,
) -> Result<()> {
    info!("--- 30 ms round trip between beijing and shanghai (control plane links)");
    let bj_nodes = [coord_name(1), agent_name("bj-db-1")];
    let sh_nodes = [coord_name(2), agent_name("sh-db-1")];
    for a in &bj_nodes {
        for b in &sh_nodes {
            cluster
                .net
                .set_links_between(a, b, LinkMode::Delay(Duration::from_millis(15)));
        }
    }

    info!("--- apply the topology");
    let file = pgdir.path().join("topology.toml");
    std::fs::write(&file, topology(bj, sh, ""))?;
    let file = file.to_string_lossy().into_owned();
    let v = cluster.drctl_json(["apply", "-f", &file]).await?;
    assert_eq!(v["applied"], true, "{v}");
    let t = cluster.drctl_json(["topology", "show"]).await?;
    let c = &json_list(&t, "clusters")[0];
    assert_eq!(c["primary_host"], "bj-db-1", "{t}");
    let epoch_before = c["epoch"].as_u64().context("epoch")?;

    info!("--- wait until the candidate's agent reports replication facts");
    tokio::time::sleep(Duration::from_secs(3)).await;

    info!("--- writer running");
    let acks: Acks = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(
        vec![(bj.port, bj.url()), (sh.port, sh.url())],
        acks.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !acks.lock().await.is_empty(),
        "the writer wrote nothing to beijing"
    );

    info!("--- drctl failover --to shanghai --wait");
    let out = cluster
        .drctl(["failover", "--to", "shanghai", "--wait"])
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    info!(%stdout, %stderr, "failover output");
    assert!(out.status.success(), "failover failed:\n{stdout}\n{stderr}");

    info!("--- writes resume in shanghai");
    let sh_port = sh.port;
    let acks2 = acks.clone();
    wait_until(
        "a write acknowledged by shanghai",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let acks = acks2.clone();
            async move {
                let n = acks
                    .lock()
                    .await
                    .iter()
                    .filter(|(_, p)| *p == sh_port)
                    .count();
                Ok((n >= 5).then_some(()))
            }
        },
    )
    .await?;
    info!("--- shanghai keeps accepting writes past a lease (4 s): its agent holds the lease");
    let before = acks.lock().await.len();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let recent: Vec<u16> = acks.lock().await[before..]
        .iter()
        .map(|(_, p)| *p)
        .collect();
    assert!(
        recent.len() >= 30 && recent.iter().all(|p| *p == sh_port),
        "{} writes in 7 s after the switchover, servers {:?}",
        recent.len(),
        recent.iter().collect::<std::collections::BTreeSet<_>>()
    );
    stop.store(true, Ordering::SeqCst);
    let failures = w.await?;
    let acks = acks.lock().await.clone();
    let on_bj = acks.iter().filter(|(_, p)| *p == bj.port).count();
    let on_sh = acks.len() - on_bj;
    info!(on_bj, on_sh, failures, "writer done");

    info!("--- shanghai is primary and holds every acknowledged row");
    assert!(!sh.in_recovery().await?, "shanghai is still in recovery");
    let mut c = sh.connect().await?;
    let ids: Vec<i64> = sqlx::query_scalar("select id from writes")
        .fetch_all(&mut c)
        .await?;
    let ids: std::collections::HashSet<i64> = ids.into_iter().collect();
    let lost: Vec<i64> = acks
        .iter()
        .filter(|(id, _)| !ids.contains(id))
        .map(|(id, _)| *id)
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(on_bj > 0 && on_sh > 0, "{on_bj} {on_sh}");
    // No write acknowledged by beijing after the first one acknowledged by shanghai.
    let first_sh = acks.iter().find(|(_, p)| *p == sh.port).map(|(id, _)| *id);
    let last_bj = acks
        .iter()
        .filter(|(_, p)| *p == bj.port)
        .map(|(id, _)| *id)
        .max();
    assert!(
        last_bj < first_sh,
        "beijing acknowledged {last_bj:?} after shanghai's {first_sh:?}"
    );

    info!("--- beijing is a replica (not writable)");
    wait_until(
        "beijing in recovery",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || async { Ok(bj.in_recovery().await.ok().filter(|r| *r).map(|_| ())) },
    )
    .await?;
    let mut c = bj.connect().await?;
    let r = sqlx::query("insert into writes (id) values (-1)")
        .execute(&mut c)
        .await;
    assert!(r.is_err(), "beijing accepted a write after the switchover");
    info!("--- beijing streams from shanghai: a row written there replays on beijing");
    let mut c = sh.connect().await?;
    sqlx::query("insert into writes (id) values (1000000)")
        .execute(&mut c)
        .await?;
    wait_until(
        "shanghai's row replayed on beijing",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || async {
            let mut c = bj.connect().await?;
            let n: i64 = sqlx::query_scalar("select count(*) from writes where id = 1000000")
                .fetch_one(&mut c)
                .await?;
            Ok((n == 1).then_some(()))
        },
    )
    .await?;

    info!("--- topology and operations show the new primary and the raised epoch");
    let t = cluster.drctl_json(["topology", "show"]).await?;
    let c = &json_list(&t, "clusters")[0];
    assert_eq!(c["primary_host"], "sh-db-1", "{t}");
    let epoch = c["epoch"].as_u64().context("epoch")?;
    assert!(
        epoch > epoch_before,
        "epoch {epoch} not above {epoch_before}: {t}"
    );
    let ops = cluster.drctl_json(["operations", "list"]).await?;
    info!(%ops, "operations");
    let op = json_list(&ops, "operations")
        .into_iter()
        .rfind(|o| o["kind"] == "switchover")
        .context("a switchover operation")?;
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(op["to_region"], "shanghai", "{op}");
    assert_eq!(op["results"]["epoch"], epoch.to_string(), "{op}");
    assert_eq!(op["results"]["rpo_bytes"], "0", "{op}");
    Ok(())
}
