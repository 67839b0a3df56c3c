//! A two-region topology without a witness (issue 5, acceptance 5): when beijing is cut
//! off, no side can tell a dead peer from a cut link, so automatic failover is refused and
//! raised to the operator; `drctl status` says why and what to do, and nothing is promoted.

use std::time::Duration;

use anyhow::Result;
use tracing::info;

use super::t30_region_cut::{Fixture, Topo};

#[tokio::test]
async fn two_regions_without_witness_refuse_automatic_failover() -> Result<()> {
    let fx = Fixture::start(
        "t60",
        Topo {
            witness: false,
            ..Topo::default()
        },
    )
    .await?;
    let r = scenario(&fx).await;
    fx.finish(r).await
}

async fn scenario(fx: &Fixture) -> Result<()> {
    info!("--- before any failure, drctl status already warns about the missing witness");
    let notes = fx.status_notes().await?;
    assert!(notes.iter().any(|n| n.contains("no witness")), "{notes:?}");

    info!("--- cut beijing off");
    fx.cut_region("beijing");
    let op = fx
        .wait_operation("failover", "needs_operator", Duration::from_secs(90))
        .await?;
    info!(%op, "refused");
    let reason = op["reason"].as_str().unwrap_or_default();
    for part in [
        "refused",
        "no witness",
        "drctl failover --to shanghai --force",
        "witness region",
    ] {
        assert!(
            reason.contains(part),
            "{part:?} missing from the reason: {reason}"
        );
    }

    info!("--- drctl status names the refusal, why and the command");
    let notes = fx.status_notes().await?;
    info!(?notes, "status notes");
    assert!(
        notes.iter().any(|n| n.contains("needs an operator")
            && n.contains("no witness")
            && n.contains("--force")),
        "{notes:?}"
    );
    let leader = fx.majority_leader().await?;
    let text = fx.cluster.drctl_at(leader, ["status"]).await?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("no witness"), "{text}");

    info!("--- nothing was promoted, the epoch did not move, and only one operation exists");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(fx.sh.in_recovery().await?, "shanghai was promoted");
    let c = fx.cluster_info().await?;
    assert_eq!(c["primary_host"], "bj-db-1", "{c}");
    assert_eq!(c["epoch"].as_u64(), Some(fx.epoch_before), "{c}");
    let ops = fx.operations().await?;
    assert_eq!(
        ops.len(),
        1,
        "one refusal, not one per detector round: {ops:?}"
    );
    Ok(())
}
