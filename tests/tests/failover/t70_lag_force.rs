//! Candidate lag above the RPO (issue 5, acceptance 6): replay paused on shanghai while
//! beijing keeps writing, then beijing cut off. Automatic failover is refused and raised to
//! the operator with the reason and the estimated data loss; `drctl failover --force` needs
//! a confirmation (no prompt answer: nothing done), and with `--yes` it states the estimated
//! loss, fences what it can, waits the lease out and promotes the lagging replica.

use std::time::Duration;

use anyhow::{Context as _, Result};
use dr_tests::wait_until;
use tracing::info;

use super::t30_region_cut::{Fixture, Topo, Writer, ms, step};

#[tokio::test]
async fn lag_above_rpo_refused_then_forced() -> Result<()> {
    let mut fx = Fixture::start(
        "t70",
        Topo {
            rpo: Some("3s"),
            // The leadership is moved (kill -9 of coordinator 1) before the scenario; the
            // election and the agents' reconnection must fit in the beijing primary's lease
            // or it fences itself before the test begins.
            lease: "12s".into(),
            ..Topo::default()
        },
    )
    .await?;
    let r = match fx.lead_from_outside_beijing().await {
        Ok(()) => scenario(&fx).await,
        Err(e) => Err(e),
    };
    fx.finish(r).await
}

async fn scenario(fx: &Fixture) -> Result<()> {
    let (bj, sh) = (&fx.bj, &fx.sh);
    let w = Writer::start(bj, sh, Duration::from_millis(50));
    w.wait_acks_on(bj.port, 10, "writes acknowledged by beijing")
        .await?;

    info!("--- pause replay on shanghai: it receives but stops applying");
    let mut c = sh.connect().await?;
    sqlx::query("select pg_wal_replay_pause()")
        .execute(&mut c)
        .await?;
    wait_until(
        "shanghai reports a replay lag above the 3 s RPO",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let f = fx.facts("sh-db-1").await?;
            let lag: f64 = f
                .get("pg.lag_seconds")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0.0);
            Ok((lag > 5.0).then_some(()))
        },
    )
    .await?;

    info!("--- cut beijing off: automatic failover must be refused");
    fx.cut_region("beijing");
    let op = fx
        .wait_operation("failover", "needs_operator", Duration::from_secs(90))
        .await?;
    let reason = op["reason"].as_str().unwrap_or_default().to_owned();
    info!(%reason, "refused");
    for part in [
        "refused",
        "lags",
        "RPO",
        "Estimated data loss if forced",
        "bytes of WAL",
    ] {
        assert!(reason.contains(part), "{part:?} missing: {reason}");
    }
    let notes = fx.status_notes().await?;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("needs an operator") && n.contains("Estimated data loss")),
        "{notes:?}"
    );
    assert!(
        sh.in_recovery().await?,
        "shanghai promoted despite the refusal"
    );

    info!("--- --force without an answer (stdin closed): nothing done, and it says how");
    let leader = fx.majority_leader().await?;
    let out = fx
        .cluster
        .drctl_at(leader, ["failover", "--to", "shanghai", "--force"])
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("estimated loss"), "{stdout}");
    assert!(stderr.contains("--yes"), "{stderr}");
    assert!(
        !fx.operations()
            .await?
            .iter()
            .any(|o| o["kind"] == "forced_failover"),
        "an unconfirmed forced failover started"
    );

    info!("--- drctl failover --to shanghai --force --yes --wait");
    let leader = fx.majority_leader().await?;
    let out = fx
        .cluster
        .drctl_at(
            leader,
            ["failover", "--to", "shanghai", "--force", "--yes", "--wait"],
        )
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    info!(%stdout, %stderr, "forced failover");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("estimated loss") && stdout.contains("bytes of WAL"),
        "{stdout}"
    );
    let (acks, _) = w.finish().await?;

    let ops = fx.operations().await?;
    let forced = ops
        .iter()
        .rfind(|o| o["kind"] == "forced_failover")
        .context("a forced_failover operation")?;
    assert_eq!(forced["state"], "succeeded", "{forced}");
    let refused = ops
        .iter()
        .find(|o| o["id"] == op["id"])
        .context("the refused operation")?;
    assert_eq!(refused["state"], "cancelled", "superseded: {refused}");
    let rpo: u64 = forced["results"]["rpo_bytes"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .context("rpo_bytes")?;
    assert!(
        rpo > 0,
        "a lagging candidate loses data, rpo_bytes {rpo}: {forced}"
    );

    info!(
        "--- shanghai is the primary, beijing (cut off, fenced by its lease) wrote nothing after"
    );
    wait_until(
        "shanghai out of recovery",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || async { Ok((!sh.in_recovery().await?).then_some(())) },
    )
    .await?;
    let promoted_ms = ms(&step(forced, "promote")?["started_at_unix_ms"]);
    let late: Vec<_> = acks
        .iter()
        .filter(|a| a.port == bj.port && a.at_ms >= promoted_ms)
        .collect();
    assert!(
        late.is_empty(),
        "beijing acknowledged after the promotion: {late:?}"
    );
    let mut c = sh.connect().await?;
    sqlx::query("insert into writes (id) values (-7)")
        .execute(&mut c)
        .await?;
    let t = fx.cluster_info().await?;
    assert_eq!(t["primary_host"], "sh-db-1", "{t}");
    assert_eq!(t["epoch"].as_u64(), Some(fx.epoch_before + 1), "{t}");
    Ok(())
}
