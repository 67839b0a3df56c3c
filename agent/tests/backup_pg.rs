//! Physical backups against a real PostgreSQL 15 and an fs repository (issue "Backups"):
//! full → pgbench writes → incremental; each restores alone to exactly its own data through
//! `restore_command = dr-agent wal-fetch`; then verify names a corrupted and a deleted chunk,
//! and prune removes an orphan.
#![allow(
    clippy::unwrap_used,
    clippy::let_underscore_must_use,
    clippy::cloned_ref_to_slice_refs
)]

mod backup_support;

use std::process::Command;
use std::time::Duration;

use backup_support::*;
use dr_agent::backup::basebackup::{BackupOptions, run_backup};
use dr_agent::backup::restore::{RestoreOptions, restore};
use dr_agent::backup::verify::verify;
use dr_agent::backup::{BackupKind, Repository};
use tokio_util::sync::CancellationToken;

async fn restore_and_check(
    repo: &Repository,
    id: &dr_agent::backup::BackupId,
    cfg_path: &std::path::Path,
    target: &std::path::Path,
    expected: (i64, i64, i64),
) {
    let port = free_port();
    // Exactly this backup's data: stop replay at the end-of-backup consistency point.
    let opts = restore_opts(
        cfg_path,
        target,
        port,
        &[
            "recovery_target = 'immediate'",
            "recovery_target_action = 'promote'",
        ],
    );
    restore(repo, id, target, &opts, &CancellationToken::new())
        .await
        .unwrap();
    assert!(!dr_agent::backup::restore::partial_path(target).exists());
    chown_postgres(target);
    let pg = Pg::existing(target, port);
    pg.start();
    let start = std::time::Instant::now();
    while pg.query_bool("select pg_is_in_recovery()").await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "restored server never promoted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fingerprint(&pg).await,
        expected,
        "restored {id} has different data"
    );
    pg.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_full_incr_restore_verify_prune() {
    let tmp = test_dir();
    let root = tmp.path();
    let repo_dir = root.join("repo");
    let (cfg_path, repo, pg) = archiving_pg(root, 1).await;
    let data = root.join("data");

    // --- full backup
    let cancel = CancellationToken::new();
    let mut opts = BackupOptions {
        pg_url: pg.url(),
        data_dir: data.clone(),
        kind: BackupKind::Full,
        fast_checkpoint: true,
    };
    let full_expected = fingerprint(&pg).await;
    let full = run_backup(&repo, &opts, &cancel).await.unwrap();
    assert_eq!(full.kind, BackupKind::Full);
    assert!(full.stop_lsn >= full.start_lsn);
    assert_eq!(full.timeline, 1);
    assert!(full.backup_label.contains("START WAL LOCATION"));
    assert!(
        !full
            .entries
            .iter()
            .any(|e| e.path == "postmaster.pid" || e.path.starts_with("pg_wal/0"))
    );
    assert!(full.stats.chunks_new > 0);

    // --- writes, then incremental
    pg.pgbench(&["-c", "2", "-T", "5"]);
    let incr_expected = fingerprint(&pg).await;
    assert_ne!(incr_expected, full_expected);
    opts.kind = BackupKind::Incr;
    let incr = run_backup(&repo, &opts, &cancel).await.unwrap();
    assert_eq!(incr.kind, BackupKind::Incr);
    assert_eq!(incr.parent.as_ref(), Some(&full.id));
    eprintln!(
        "full: total {} B, added {} B, {} chunks new; incr: read {} of {} B, added {} B, {}/{} chunks new",
        full.stats.bytes_total,
        full.stats.bytes_added,
        full.stats.chunks_new,
        incr.stats.bytes_read,
        incr.stats.bytes_total,
        incr.stats.bytes_added,
        incr.stats.chunks_new,
        incr.stats.chunks_total
    );
    assert!(
        incr.stats.bytes_read < incr.stats.bytes_total,
        "unchanged files must be skipped"
    );
    assert!(
        incr.stats.chunks_new < incr.stats.chunks_total,
        "unchanged chunks must be reused"
    );
    assert!(incr.stats.bytes_added < full.stats.bytes_added);

    // The catalog through the CLI.
    let listed = run_ok(
        Command::new(agent_exe())
            .args(["backup", "list", "--output", "json", "--repo-config"])
            .arg(&cfg_path),
    );
    let rows: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    pg.stop();

    // --- each backup restores alone to exactly its own data
    restore_and_check(
        &repo,
        &full.id,
        &cfg_path,
        &root.join("restore-full"),
        full_expected,
    )
    .await;
    restore_and_check(
        &repo,
        &incr.id,
        &cfg_path,
        &root.join("restore-incr"),
        incr_expected,
    )
    .await;

    // A non-empty target is refused.
    let err = restore(
        &repo,
        &incr.id,
        &root.join("restore-incr"),
        &RestoreOptions::default(),
        &cancel,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");

    // --- verify: everything fine, then one chunk corrupted and one deleted are named
    let rep = verify(&repo, &[full.id.clone(), incr.id.clone()], true)
        .await
        .unwrap();
    assert!(rep.is_ok(), "{:?}", rep.problems);
    let ids = incr.chunk_ids();
    let (bad, gone) = (ids[0], ids[1]);
    let bad_path = repo_dir.join(bad.object_name());
    let mut bytes = std::fs::read(&bad_path).unwrap();
    let n = bytes.len() / 2;
    bytes[n] ^= 0x40;
    std::fs::write(&bad_path, bytes).unwrap();
    std::fs::remove_file(repo_dir.join(gone.object_name())).unwrap();
    let rep = verify(&repo, &[incr.id.clone()], false).await.unwrap();
    let named: Vec<(String, &str)> = rep
        .problems
        .iter()
        .map(|p| (p.object.clone(), p.status))
        .collect();
    assert!(named.contains(&(bad.object_name(), "corrupt")), "{named:?}");
    assert!(
        named.contains(&(gone.object_name(), "missing")),
        "{named:?}"
    );
    assert_eq!(named.len(), 2, "{named:?}");
    let out = Command::new(agent_exe())
        .args(["backup", "verify", &incr.id.0, "--repo-config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&bad.object_name()) && text.contains(&gone.object_name()),
        "{text}"
    );

    // A restore that meets them fails naming one, and its target never appears: the file
    // creator that runs beside the chunk pipeline is stopped and waited for before the error
    // returns, and a second attempt starts by clearing the leftover `.partial`.
    let failed = root.join("restore-corrupt");
    for attempt in 0..2 {
        let err = restore(
            &repo,
            &incr.id,
            &failed,
            &RestoreOptions::default(),
            &cancel,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&bad.object_name()) || err.contains(&gone.object_name()),
            "attempt {attempt}: {err}"
        );
        assert!(!failed.exists(), "attempt {attempt}: {err}");
    }

    // --- prune: an orphan chunk (as a failed backup leaves) goes, live chunks stay
    let orphan_id = repo.key().hash(b"orphan chunk of an interrupted backup");
    repo.put_chunk(
        orphan_id,
        b"orphan chunk of an interrupted backup".to_vec(),
        false,
    )
    .await
    .unwrap();
    let rep = dr_agent::backup::prune::prune(&repo, Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(rep.deleted, 1, "{rep:?}");
    assert!(!repo_dir.join(orphan_id.object_name()).exists());
    assert!(repo_dir.join(ids[2].object_name()).exists());
}

/// A WAL segment the archive holds but cannot serve (corrupt object) during a restore to the
/// end of the archive: recovery stops and the server does not start, instead of taking the
/// failed fetch as the end of the archive and promoting without the later commits (which is
/// what an exit status of 1 from restore_command makes PostgreSQL do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_corrupt_wal_segment_stops_recovery_instead_of_promoting() {
    let tmp = test_dir();
    let root = tmp.path();
    let repo_dir = root.join("repo");
    let (cfg_path, repo, pg) = archiving_pg(root, 1).await;
    let data = root.join("data");
    let opts = BackupOptions {
        pg_url: pg.url(),
        data_dir: data.clone(),
        kind: BackupKind::Full,
        fast_checkpoint: true,
    };
    let full = run_backup(&repo, &opts, &CancellationToken::new())
        .await
        .unwrap();
    // Two more archived segments with commits in them.
    for _ in 0..2 {
        pg.pgbench(&["-c", "2", "-t", "300"]);
        pg.query_i64("select 1::bigint from pg_switch_wal()").await;
    }
    let last = pg
        .query_i64("select ((pg_current_wal_lsn() - '0/0') / 16777216)::bigint")
        .await
        - 1;
    wait_until(
        || {
            std::fs::read_dir(repo_dir.join("wal/00000001"))
                .map(|d| d.count() as i64)
                .unwrap_or(0)
                > last
        },
        Duration::from_secs(120),
        "the archiver stores every segment up to the last switch",
    )
    .await;
    pg.stop();

    // The first segment after the backup's end: commits that a restore to the latest point
    // must not silently drop.
    let seg = (full.stop_lsn.0 - 1) / (16 << 20) + 1;
    assert!(
        (seg as i64) < last,
        "segment {seg:X} after the backup is archived"
    );
    let object = repo_dir.join(format!(
        "wal/00000001/00000001{:08X}{:08X}",
        seg >> 8,
        seg & 0xff
    ));
    let mut bytes = std::fs::read(&object).unwrap();
    let n = bytes.len() / 2;
    bytes[n] ^= 0x01;
    std::fs::write(&object, bytes).unwrap();

    let target = root.join("restore-latest");
    let rport = free_port();
    let ropts = restore_opts(&cfg_path, &target, rport, &[]);
    restore(&repo, &full.id, &target, &ropts, &CancellationToken::new())
        .await
        .unwrap();
    chown_postgres(&target);
    let restored = Pg::existing(&target, rport);
    let log = target.with_extension("log");
    std::fs::write(&log, b"").unwrap();
    chown_postgres(&log);
    let out = as_postgres(&format!("{PG_BIN}/pg_ctl"))
        .args(["-D"])
        .arg(&target)
        .args(["-l"])
        .arg(&log)
        .args(["-t", "120", "-w", "start"])
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if out.status.success() {
        restored.stop();
        panic!("the server started (promoted) without segment {seg:X}; log:\n{text}");
    }
    assert!(
        text.contains("exit code 200"),
        "recovery stopped on wal-fetch's error status; log:\n{text}"
    );
    let name = object.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        text.lines()
            .any(|l| l.contains("dr-agent:") && l.contains(&name)),
        "wal-fetch's error names the segment; log:\n{text}"
    );
    assert!(
        !target.join("postmaster.pid").exists(),
        "no server left running"
    );
}
