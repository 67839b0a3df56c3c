//! dr-agent's PostgreSQL building blocks against real PostgreSQL 15 servers:
//! status/facts, a planned switchover with rewind, epoch refusal, reseed, lease fencing.
//! Run: `cargo test -p dr-agent --test pg_cluster`.
#![allow(clippy::unwrap_used)]

mod pg_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dr_agent::fence::{FenceConfig, FenceTask, Fencer};
use dr_agent::pg::{Epoch, Lsn, PgError, Role, StopMode};
use dr_agent::session::Lease;
use pg_common::{Node, init_tracing, wait_until};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// A running primary with a slot and a streaming replica made by `reseed` (pg_basebackup).
async fn primary_and_replica() -> (Node, Node) {
    let p = Node::init("beijing");
    p.pg.start().await.unwrap();
    p.pg.start().await.unwrap(); // idempotent
    p.pg.create_replication_slot("shanghai").await.unwrap();
    p.pg.create_replication_slot("shanghai").await.unwrap(); // idempotent
    p.exec("create table t (id serial primary key, v text)")
        .await;
    let r = Node::empty("shanghai");
    r.pg.reseed(&p.conninfo(), Some("shanghai")).await.unwrap();
    (p, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_switchover_rewind_and_epochs() {
    init_tracing();
    let t0 = Instant::now();
    let (old, new) = primary_and_replica().await;
    old.pg.promote(Epoch(1)).await.unwrap(); // already primary: records epoch 1

    info!("--- status and facts on both");
    {
        old.exec("insert into t (v) select 'a' from generate_series(1, 100)")
            .await;
        let target = old.pg.status().await.unwrap().current_lsn.unwrap();
        new.pg
            .wait_replay(target, Duration::from_secs(10), &CancellationToken::new())
            .await
            .unwrap();
        wait_until(
            "the primary to see its replica",
            Duration::from_secs(10),
            || async { old.pg.status().await.unwrap().replication.len() == 1 },
        )
        .await;
        let ps = old.pg.status().await.unwrap();
        assert_eq!(ps.role(), Role::Primary);
        assert_eq!(ps.timeline, Some(1));
        assert_eq!(ps.replication[0].application_name, "shanghai");
        let pf = ps.facts();
        assert_eq!(pf["role"], "primary");
        assert_eq!(pf["epoch"], "1");
        assert_eq!(pf["timeline"], "1");
        assert!(
            pf.contains_key("lsn")
                && pf.contains_key("lag_bytes")
                && pf.contains_key("lag_seconds")
        );

        let rs = new.pg.status().await.unwrap();
        assert_eq!(rs.role(), Role::Replica);
        assert_eq!(rs.system_identifier, ps.system_identifier);
        assert!(rs.replay_lsn.unwrap() >= target);
        let w = rs.wal_receiver.as_ref().unwrap();
        assert_eq!(w.status, "streaming");
        assert_eq!(w.slot_name, "shanghai");
        // The primary's end of WAL as the replica heard it: what a leader that never heard
        // the primary itself estimates a forced failover's loss from.
        let flushed = w.flushed_lsn.unwrap();
        assert!(flushed >= target, "flushed {flushed} < written {target}");
        let end = w.latest_end_lsn.unwrap();
        assert!(end >= flushed, "latest_end_lsn {end} < flushed {flushed}");
        assert!(w.latest_end_time.is_some());
        let rf = rs.facts();
        assert_eq!(rf["role"], "replica");
        assert!(rf.contains_key("replay_lsn") && rf.contains_key("lag_bytes"));
        assert_eq!(rf["primary_end_lsn"], end.to_string());
        assert!(rf.contains_key("primary_end_at"));
        assert!(!pf.contains_key("primary_end_lsn"));
        assert_eq!(new.count("t").await, 100);
    }

    info!("--- planned switchover: writes, clean stop, wait for the final LSN, promote");
    let final_lsn;
    {
        old.exec("insert into t (v) select 'b' from generate_series(1, 1000)")
            .await;
        let stop = old.pg.stop(StopMode::Fast).await.unwrap();
        assert!(stop.was_running && stop.clean, "{stop:?}");
        let again = old.pg.stop(StopMode::Fast).await.unwrap(); // idempotent
        assert!(!again.was_running);
        assert_eq!(again.checkpoint_lsn, stop.checkpoint_lsn);
        final_lsn = stop.checkpoint_lsn;
        assert_eq!(old.pg.status().await.unwrap().facts()["role"], "stopped");

        let replayed = new
            .pg
            .wait_replay(
                final_lsn,
                Duration::from_secs(10),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        assert!(replayed >= final_lsn);
        let tl = new.pg.promote(Epoch(2)).await.unwrap();
        assert_eq!(tl, 2);
        assert_eq!(
            new.pg.promote(Epoch(2)).await.unwrap(),
            2,
            "promote is idempotent"
        );
        assert_eq!(new.count("t").await, 1100, "nothing lost");
        let s = new.pg.status().await.unwrap();
        assert_eq!(s.role(), Role::Primary);
        assert_eq!(s.facts()["epoch"], "2");
    }

    info!("--- a deposed leader's older epoch is refused");
    {
        let e = new.pg.promote(Epoch(1)).await.unwrap_err();
        assert!(
            matches!(
                e,
                PgError::StaleEpoch {
                    given: Epoch(1),
                    current: Epoch(2)
                }
            ),
            "{e}"
        );
        assert!(e.is_permanent());
        assert!(new.pg.check_epoch(Epoch(1)).is_err());
        new.pg.check_epoch(Epoch(2)).unwrap();
    }

    info!("--- old primary: rewind onto the new timeline and stream from the new primary");
    {
        new.pg.create_replication_slot("beijing").await.unwrap();
        new.exec("insert into t (v) values ('after-promote')").await;
        // Make the old primary diverge (as after a failover where it kept running): the
        // write it takes on timeline 1 must be thrown away by the rewind.
        old.pg.start().await.unwrap();
        old.exec("insert into t (v) values ('split-brain write, lost')")
            .await;
        old.pg.observe_epoch(Epoch(2)).unwrap();
        old.pg
            .rewind(&new.conninfo(), Some("beijing"))
            .await
            .unwrap();
        assert_eq!(
            old.pg.epoch().unwrap(),
            Epoch(2),
            "the target keeps its own epoch across pg_rewind"
        );
        new.exec("insert into t (v) values ('new-write')").await;
        let target = new.pg.status().await.unwrap().current_lsn.unwrap();
        old.pg
            .wait_replay(target, Duration::from_secs(15), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(old.count("t").await, 1102);
        let mut c = old.conn().await;
        let lost: i64 = sqlx::query_scalar("select count(*) from t where v like 'split-brain%'")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(lost, 0, "the diverged write was rewound away");
        let s = old.pg.status().await.unwrap();
        assert_eq!(s.role(), Role::Replica);
        assert_eq!(s.timeline, Some(2));
        assert_eq!(s.wal_receiver.unwrap().slot_name, "beijing");
        // configure_standby on a running replica is idempotent (reload only)
        old.pg
            .configure_standby(&new.conninfo(), Some("beijing"))
            .await
            .unwrap();
        // the agent set wal_receiver_timeout (a partition must not look like "streaming"
        // for PostgreSQL's default minute)
        let mut c = old.conn().await;
        let t: String = sqlx::query_scalar("show wal_receiver_timeout")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(t, "5s");
        // the old primary, now a standby, refuses an old epoch too
        assert!(matches!(
            old.pg.promote(Epoch(1)).await,
            Err(PgError::StaleEpoch { .. })
        ));
        assert!(new.pg.switch_wal().await.unwrap() > Lsn::ZERO);
        new.pg.checkpoint().await.unwrap();
    }
    info!(elapsed = ?t0.elapsed(), "switchover test done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_lease_expiry_fences_primary() {
    init_tracing();
    let t0 = Instant::now();
    let p = Node::init("fenced");
    p.pg.start().await.unwrap();
    p.pg.promote(Epoch(3)).await.unwrap(); // primary already: records epoch 3
    p.exec("create table t (id int)").await;

    let hook_flag = p.dir.path().join("writes-stopped");
    let fencer = Arc::new(
        Fencer::new(
            p.pg.clone(),
            FenceConfig {
                fast_stop_bound: Duration::from_secs(5),
                stop_writes_hooks: vec![vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!(
                        "echo \"$DR_CLUSTER: $DR_FENCE_REASON\" > {}",
                        hook_flag.display()
                    ),
                ]],
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let lease = Duration::from_millis(400);
    // A lease that names a database cluster: only those arm the fence.
    let grant = |d: Duration| {
        Some(Lease {
            valid_until: Instant::now() + d,
            epoch: 1,
            db_cluster: "main".into(),
        })
    };
    let (tx, rx) = watch::channel(grant(lease));
    let cancel = CancellationToken::new();
    let task = tokio::spawn(FenceTask::new(fencer.clone(), rx).run(cancel.clone()));

    info!("--- renewals keep the primary up");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        tx.send(grant(lease)).unwrap();
    }
    assert!(p.pg.is_running().unwrap());

    info!("--- renewals stop: the fence stops postgres");
    {
        wait_until(
            "the fence to stop postgres",
            Duration::from_secs(15),
            || async { !p.pg.is_running().unwrap() },
        )
        .await;
        wait_until("the hook to run", Duration::from_secs(5), || async {
            hook_flag.is_file()
        })
        .await;
        let hook = std::fs::read_to_string(&hook_flag).unwrap();
        assert!(hook.starts_with("yeslocker: lease expired"), "{hook}");
        let m = p.pg.fence_marker().unwrap().unwrap();
        assert!(m.reason.contains("lease expired"));
        let s = p.pg.status().await.unwrap();
        assert_eq!(s.facts()["fenced"], "true");
        assert_eq!(s.role(), Role::Stopped);
        let e = p.pg.start().await.unwrap_err();
        assert!(matches!(e, PgError::Fenced { .. }), "{e}");
        assert!(e.to_string().contains("unfence"), "{e}");
        assert!(!p.pg.is_running().unwrap());
        assert!(matches!(
            p.pg.promote(Epoch(9)).await,
            Err(PgError::Fenced { .. })
        ));
    }

    info!("--- unfence needs the current epoch; then start works");
    {
        assert!(matches!(
            p.pg.unfence(Epoch(2)).await,
            Err(PgError::StaleEpoch { .. })
        ));
        assert!(p.pg.fence_marker().unwrap().is_some());
        p.pg.unfence(Epoch(3)).await.unwrap();
        p.pg.start().await.unwrap();
        assert_eq!(p.count("t").await, 0);
    }

    info!("--- explicit fence from the coordinator, while the lease is valid");
    {
        tx.send(grant(Duration::from_secs(60))).unwrap();
        let r = fencer.fence("coordinator: region isolated").await.unwrap();
        assert!(r.was_running);
        assert!(
            r.stop.unwrap().clean,
            "fast shutdown within the bound is clean"
        );
        assert!(r.hooks.iter().all(|h| h.ok));
        assert!(!p.pg.is_running().unwrap());
        assert!(
            fencer.fence("again").await.unwrap().stop.is_none(),
            "idempotent"
        );
        assert_eq!(
            p.pg.fence_marker().unwrap().unwrap().reason,
            "coordinator: region isolated"
        );
        assert!(p.pg.start().await.is_err());
    }
    cancel.cancel();
    task.await.unwrap().unwrap();
    info!(elapsed = ?t0.elapsed(), "fence test done");
}
