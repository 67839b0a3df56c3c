//! Only the primary agent's link to the coordinators cut (issue 5, acceptance 3): clients
//! still reach the beijing primary, replication still runs, beijing's coordinator is fine.
//! The agent cannot renew its lease, so it fences its own database; the candidate then sees
//! its WAL receiver go down, the leader declares the primary failed, waits the lease out
//! and promotes shanghai. The writer's log shows no write acknowledged by beijing after
//! the promotion was issued: no split brain.

use std::time::Duration;

use anyhow::{Context as _, Result};
use dr_tests::LinkMode;
use dr_tests::harness::cluster::agent_name;
use serde_json::Value;
use tracing::info;

use super::t30_region_cut::{
    Fixture, Topo, Writer, assert_no_write_after_promotion, ms, now_ms, step,
};

#[tokio::test]
async fn primary_agent_cut_fences_itself_and_fails_over() -> Result<()> {
    let fx = Fixture::start("t40", Topo::default()).await?;
    let r = scenario(&fx).await;
    fx.finish(r).await
}

async fn scenario(fx: &Fixture) -> Result<()> {
    let (bj, sh) = (&fx.bj, &fx.sh);
    let w = Writer::start(bj, sh, Duration::from_millis(50));
    w.wait_acks_on(bj.port, 20, "20 writes acknowledged by beijing")
        .await?;

    info!("--- cut only bj-db-1's agent from every coordinator");
    let cut_ms = now_ms();
    for id in fx.cluster.coord_ids() {
        fx.cluster.net.set_links_between(
            &agent_name("bj-db-1"),
            &dr_tests::harness::cluster::coord_name(id),
            LinkMode::Cut,
        );
    }

    let op = fx
        .wait_operation("failover", "succeeded", Duration::from_secs(90))
        .await?;
    info!(%op, "failover after the agent cut");
    w.wait_acks_on(sh.port, 5, "writes acknowledged by shanghai")
        .await?;
    let (acks, failures) = w.finish().await?;
    info!(total = acks.len(), failures, "writer done");

    let promoted_ms = ms(&step(&op, "promote")?["started_at_unix_ms"]);
    assert!(promoted_ms > cut_ms);
    assert_no_write_after_promotion(&acks, bj.port, sh.port, promoted_ms);
    assert!(
        op["reason"].as_str().is_some_and(|r| r.contains("bj-db-1")),
        "{op}"
    );

    info!("--- beijing fenced itself (its agent cut, its clients not) before the promotion");
    let marker: Value = serde_json::from_slice(
        &std::fs::read(bj.data_dir.join("dr_fenced")).context("no dr_fenced marker on beijing")?,
    )?;
    let fenced_at =
        chrono::DateTime::parse_from_rfc3339(marker["fenced_at"].as_str().context("fenced_at")?)?
            .timestamp_millis();
    assert!(
        fenced_at < promoted_ms,
        "fenced at {fenced_at}, promoted at {promoted_ms}"
    );
    if let Ok(mut c) = bj.connect().await {
        let r = sqlx::query("insert into writes (id) values (-1)")
            .execute(&mut c)
            .await;
        assert!(r.is_err(), "beijing accepted a write after fencing");
    }
    assert!(!sh.in_recovery().await?, "shanghai is not a primary");
    let c = fx.cluster_info().await?;
    assert_eq!(c["primary_host"], "sh-db-1", "{c}");
    assert_eq!(c["epoch"].as_u64(), Some(fx.epoch_before + 1), "{c}");

    info!("--- every write shanghai acknowledged is there");
    let mut conn = sh.connect().await?;
    let ids: Vec<i64> = sqlx::query_scalar("select id from writes")
        .fetch_all(&mut conn)
        .await?;
    let ids: std::collections::HashSet<i64> = ids.into_iter().collect();
    let lost: Vec<i64> = acks
        .iter()
        .filter(|a| a.port == sh.port && !ids.contains(&a.id))
        .map(|a| a.id)
        .collect();
    assert!(
        lost.is_empty(),
        "writes acknowledged by shanghai lost: {lost:?}"
    );
    Ok(())
}
