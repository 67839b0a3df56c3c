//! The `wal_archive` health check against a real PostgreSQL 15: it keeps the archive lag
//! under the configured RPO by forcing segment switches (no `archive_timeout` set), and it
//! fails, naming the segment, when `archive_command` fails.
//! Run: `cargo test -p dr-agent --test wal_archive_check`.
#![allow(clippy::unwrap_used)]

mod pg_common;

use std::io::Write;
use std::time::{Duration, Instant};

use dr_agent::config::Probe;
use dr_agent::health::{Outcome, Prober};
use pg_common::{Node, chown, init_tracing};
use tokio_util::sync::CancellationToken;
use tracing::info;

fn configure(n: &Node, archive_command: &str) {
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(n.data_dir().join("postgresql.conf"))
        .unwrap();
    writeln!(
        conf,
        "archive_mode = on\narchive_command = '{archive_command}'\narchive_timeout = 0\n"
    )
    .unwrap();
}

fn prober(n: &Node, rpo: Duration, interval: Duration) -> Prober {
    Prober::new(
        Probe::WalArchive {
            url: format!("postgres://postgres@127.0.0.1:{}/postgres", n.port),
            rpo,
        },
        interval,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_held_under_the_rpo_by_forced_switches() {
    init_tracing();
    let n = Node::init("beijing");
    let archive = n.dir.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    chown(&archive);
    configure(&n, &format!("cp %p {}/%f", archive.display()));
    n.pg.start().await.unwrap();
    n.exec("create table t (id int); insert into t select generate_series(1, 1000)")
        .await;

    // RPO 6 s, checked every second: the switch comes at 3-4 s of lag.
    let rpo = Duration::from_secs(6);
    let mut p = prober(&n, rpo, Duration::from_secs(1));
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let mut forced = false;
    while start.elapsed() < Duration::from_secs(20) {
        let o = p.run(Duration::from_secs(5), &cancel).await;
        info!(?o, "wal_archive check");
        match &o {
            Outcome::Pass(d) => forced |= d.contains("segment switch forced"),
            other => panic!("the check must pass while archiving works: {other:?}"),
        }
        if forced {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(forced, "no segment switch forced within 20 s at RPO 6 s");
    // The switched segment reaches the archive, and the lag goes back to zero.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = p.run(Duration::from_secs(5), &cancel).await;
        let archived = std::fs::read_dir(&archive).unwrap().count();
        if archived > 0 && matches!(&o, Outcome::Pass(d) if d.contains("archive lag 0 s")) {
            info!(archived, ?o, "archived and caught up");
            break;
        }
        assert!(Instant::now() < deadline, "not archived: {o:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_archive_command_fails_the_check_naming_the_segment() {
    init_tracing();
    let n = Node::init("beijing");
    configure(&n, "false");
    n.pg.start().await.unwrap();
    n.exec("create table t (id int); insert into t select generate_series(1, 1000)")
        .await;
    let mut p = prober(&n, Duration::from_secs(4), Duration::from_secs(1));
    let cancel = CancellationToken::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = p.run(Duration::from_secs(5), &cancel).await;
        info!(?o, "wal_archive check");
        if let Outcome::Fail(d) = &o {
            assert!(
                d.contains("archive_command is failing") || d.contains("reached the RPO"),
                "{d}"
            );
            if d.contains("archive_command is failing") {
                assert!(d.contains("00000001"), "names the segment: {d}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never reported the failure: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    p.close().await;
}
