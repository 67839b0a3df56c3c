//! Failback, the whole round trip (issue 5, item 7 and the last acceptance line), with real
//! PostgreSQL 15 and a writer running throughout:
//!
//! 1. beijing (bj-db-1) is primary, shanghai (sh-db-1) streams from it;
//! 2. beijing is cut off (its coordinator and agent): its agent's lease runs out and it fences
//!    its server; `drctl failover --to shanghai --force --yes` promotes shanghai (unplanned:
//!    writes beijing acknowledged after shanghai's last received position may be lost);
//! 3. beijing comes back: `drctl failover --to beijing --wait` sees that bj-db-1 is not a
//!    streaming replica, rejoins it (pg_rewind onto shanghai's timeline, lifting its fence),
//!    lets it catch up, then runs the planned switchover.
//!
//! Asserted: nothing acknowledged in the planned part is lost (every write shanghai
//! acknowledged, and every write beijing acknowledged after the failback, is on beijing at
//! the end), beijing is primary again with a raised epoch, shanghai is its streaming replica.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use dr_tests::harness::cluster::{AgentSpec, json_list};
use dr_tests::{TestCluster, wait_until};
use tokio::sync::Mutex;
use tracing::info;

use super::pg_pair::PgNode;

/// The t20 topology: failover by hand (detect 3 s, lease 4 s), plus `extra` (more hosts,
/// services, traffic providers).
pub fn topology(bj: &PgNode, sh: &PgNode, extra: &str) -> String {
    super::pg_pair::topology(
        bj,
        sh,
        &super::pg_pair::Topo {
            automatic: false,
            detect_after: "3s".into(),
            extra: extra.to_owned(),
            ..super::pg_pair::Topo::default()
        },
    )
}

/// One acknowledged write: row id and the port of the server that committed it.
pub type Acks = Arc<Mutex<Vec<(i64, u16)>>>;

/// Inserts a row every ~50 ms into whichever server accepts it (in `urls` order).
pub async fn writer(urls: Vec<(u16, String)>, acks: Acks, stop: Arc<AtomicBool>) -> u64 {
    use sqlx::Connection as _;
    let mut conns: Vec<Option<sqlx::PgConnection>> = urls.iter().map(|_| None).collect();
    let mut id: i64 = 0;
    let mut failures = 0u64;
    while !stop.load(Ordering::SeqCst) {
        id += 1;
        let mut acked = false;
        for (i, (port, url)) in urls.iter().enumerate() {
            if conns[i].is_none()
                && let Ok(Ok(c)) = tokio::time::timeout(
                    Duration::from_millis(500),
                    sqlx::PgConnection::connect(url),
                )
                .await
            {
                conns[i] = Some(c);
            }
            let Some(c) = conns[i].as_mut() else { continue };
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                sqlx::query("insert into writes (id) values ($1)")
                    .bind(id)
                    .execute(&mut *c),
            )
            .await;
            match r {
                Ok(Ok(_)) => {
                    acks.lock().await.push((id, *port));
                    acked = true;
                    break;
                }
                // Read-only (a replica): keep the connection, try the other server.
                Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("25006") => {}
                _ => conns[i] = None,
            }
        }
        if !acked {
            failures += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    failures
}

/// Waits until `port` acknowledged at least `n` writes after index `from` of the log.
pub async fn wait_acks(acks: &Acks, port: u16, from: usize, n: usize, what: &str) -> Result<()> {
    wait_until(
        what,
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let acks = acks.clone();
            async move {
                let k = acks.lock().await[from..]
                    .iter()
                    .filter(|(_, p)| *p == port)
                    .count();
                Ok((k >= n).then_some(()))
            }
        },
    )
    .await
}

/// The ids in `writes` on `node`.
pub async fn ids_on(node: &PgNode) -> Result<std::collections::HashSet<i64>> {
    let mut c = node.connect().await?;
    let ids: Vec<i64> = sqlx::query_scalar("select id from writes")
        .fetch_all(&mut c)
        .await?;
    Ok(ids.into_iter().collect())
}

/// Runs drctl (against coordinator `at` only, if given) until it succeeds (the leader may be
/// changing, an agent reconnecting).
async fn drctl_until_ok(
    cluster: &TestCluster,
    at: Option<u64>,
    args: &[&str],
    within: Duration,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let out = match at {
            Some(id) => cluster.drctl_at(id, args).await?,
            None => cluster.drctl(args).await?,
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            info!(?args, %stdout, "drctl done");
            return Ok(stdout);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("drctl {args:?} kept failing:\n{stdout}\n{stderr}");
        }
        info!(?args, %stderr, "drctl failed; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn failback_round_trip_loses_nothing_in_the_planned_parts() -> Result<()> {
    dr_tests::init_tracing();
    let pgdir = tempfile::Builder::new().prefix("dr-t80-pg-").tempdir()?;
    std::fs::set_permissions(
        pgdir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    info!("--- PostgreSQL 15: primary (beijing), streaming replica (shanghai)");
    let bj = PgNode::primary(&pgdir.path().join("bj"), &["dr_sh_db_1"]).await?;
    let sh = PgNode::replica(&pgdir.path().join("sh"), &bj, "dr_sh_db_1").await?;

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
                dr_tests::harness::testdir::tail(&n.log_file, 60)
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
    let file = pgdir.path().join("topology.toml");
    std::fs::write(&file, topology(bj, sh, ""))?;
    let file = file.to_string_lossy().into_owned();
    let v = cluster.drctl_json(["apply", "-f", &file]).await?;
    assert_eq!(v["applied"], true, "{v}");
    info!("--- wait until the agents report replication facts");
    tokio::time::sleep(Duration::from_secs(3)).await;

    info!("--- writer running (beijing first, then shanghai)");
    let acks: Acks = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(
        vec![(bj.port, bj.url()), (sh.port, sh.url())],
        acks.clone(),
        stop.clone(),
    ));
    wait_acks(&acks, bj.port, 0, 10, "writes acknowledged by beijing").await?;

    info!("--- beijing cut off; forced failover to shanghai");
    cluster.net.cut_region("beijing");
    // Asked in shanghai: beijing's cut-off coordinator may still believe it leads (it cannot
    // commit anything) and would answer from its stale view.
    let out = drctl_until_ok(
        cluster,
        Some(2),
        &["failover", "--to", "shanghai", "--force", "--yes", "--wait"],
        Duration::from_secs(90),
    )
    .await?;
    assert!(out.contains("promote"), "{out}");
    let mark_unplanned = acks.lock().await.len();
    wait_acks(
        &acks,
        sh.port,
        mark_unplanned,
        5,
        "writes acknowledged by shanghai",
    )
    .await?;
    info!("--- the cut-off old primary fenced itself: it accepts no write");
    wait_until(
        "beijing refuses writes",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || async {
            let refused = match bj.connect().await {
                Err(_) => true,
                Ok(mut c) => sqlx::query("insert into writes (id) values (-2)")
                    .execute(&mut c)
                    .await
                    .is_err(),
            };
            Ok(refused.then_some(()))
        },
    )
    .await?;

    info!("--- beijing is back; failback: drctl failover --to beijing --wait");
    cluster.net.heal();
    let mark_failback = acks.lock().await.len();
    let out = drctl_until_ok(
        cluster,
        None,
        &["failover", "--to", "beijing", "--wait"],
        Duration::from_secs(240),
    )
    .await?;
    assert!(out.contains("rejoin_candidate"), "no rejoin step:\n{out}");
    let mark_done = acks.lock().await.len();
    wait_acks(
        &acks,
        bj.port,
        mark_done,
        10,
        "writes acknowledged by beijing after the failback",
    )
    .await?;
    stop.store(true, Ordering::SeqCst);
    let failures = w.await?;
    let acks = acks.lock().await.clone();

    info!("--- nothing acknowledged in the planned parts is lost");
    let first_sh = acks
        .iter()
        .position(|(_, p)| *p == sh.port)
        .context("shanghai acknowledged nothing")?;
    assert!(!bj.in_recovery().await?, "beijing is still in recovery");
    let on_bj = ids_on(bj).await?;
    let must_keep: Vec<i64> = acks[first_sh..].iter().map(|(id, _)| *id).collect();
    let lost: Vec<i64> = must_keep
        .iter()
        .copied()
        .filter(|id| !on_bj.contains(id))
        .collect();
    let unplanned_lost = acks[..first_sh]
        .iter()
        .filter(|(id, _)| !on_bj.contains(id))
        .count();
    info!(
        total = acks.len(),
        failures, mark_unplanned, mark_failback, unplanned_lost, "writer done"
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // After the failback's first write on beijing, shanghai acknowledged nothing more.
    let first_bj_after = acks[first_sh..]
        .iter()
        .position(|(_, p)| *p == bj.port)
        .map(|i| i + first_sh)
        .context("beijing acknowledged nothing after the failback")?;
    assert!(
        acks[first_bj_after..].iter().all(|(_, p)| *p == bj.port),
        "shanghai acknowledged writes after beijing took over again"
    );

    info!("--- shanghai is a replica of beijing again");
    wait_until(
        "shanghai in recovery",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || async { Ok(sh.in_recovery().await.ok().filter(|r| *r).map(|_| ())) },
    )
    .await?;
    let mut c = bj.connect().await?;
    sqlx::query("insert into writes (id) values (2000000)")
        .execute(&mut c)
        .await?;
    wait_until(
        "beijing's row replayed on shanghai",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || async {
            Ok(ids_on(sh)
                .await
                .ok()
                .filter(|ids| ids.contains(&2_000_000))
                .map(|_| ()))
        },
    )
    .await?;

    info!("--- the operations: a forced failover, then a failback switchover");
    let t = cluster.drctl_json(["topology", "show"]).await?;
    let c = &json_list(&t, "clusters")[0];
    assert_eq!(c["primary_host"], "bj-db-1", "{t}");
    let ops = cluster.drctl_json(["operations", "list"]).await?;
    let ops = json_list(&ops, "operations");
    let forced = ops
        .iter()
        .find(|o| o["to_region"] == "shanghai")
        .context("the forced failover")?;
    assert_eq!(forced["state"], "succeeded", "{forced}");
    let back = ops
        .iter()
        .rfind(|o| o["to_region"] == "beijing")
        .context("the failback")?;
    assert_eq!(back["state"], "succeeded", "{back}");
    assert_eq!(back["results"]["rpo_bytes"], "0", "{back}");
    info!(failback = %back["results"], "failback results");
    Ok(())
}
