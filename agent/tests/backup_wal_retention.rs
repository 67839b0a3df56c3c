//! WAL retention against a real PostgreSQL 15 (issue "Backups"): two full backups with WAL
//! archived between them; after the first backup's manifest is removed (what retention does),
//! `dr-agent repo prune` deletes exactly the WAL below the remaining backup's start segment,
//! keeps history files and the rest, and `backup verify --all` (which checks the WAL chain)
//! still passes; deleting one needed segment makes verify name it.
#![allow(clippy::unwrap_used, clippy::let_underscore_must_use)]

mod backup_support;

use std::collections::HashMap;
use std::process::Command;

use backup_support::*;
use dr_agent::backup::basebackup::{BackupOptions, run_backup};
use dr_agent::backup::prune::{lsn_segment, segment_number};
use dr_agent::backup::{BackupKind, RepoConfig, Repository};
use tokio_util::sync::CancellationToken;

fn archived(repo_dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo_dir.join("wal/00000001"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_prune_keeps_exactly_the_wal_backups_need() {
    let tmp = test_dir();
    let root = tmp.path();
    let repo_dir = root.join("repo");
    let cfg_path = fs_repo_config(root, &repo_dir, "");
    let cfg = RepoConfig::load(&cfg_path, &HashMap::new()).unwrap();
    let repo = Repository::init(&cfg).await.unwrap();
    chown_postgres(root);
    let port = free_port();
    let pg = Pg::init(&root.join("data"), port, &archive_conf(&cfg_path));
    pg.start();
    let mut opts = BackupOptions {
        pg_url: pg.url(),
        data_dir: root.join("data"),
        kind: BackupKind::Full,
        fast_checkpoint: true,
    };
    let cancel = CancellationToken::new();
    let first = run_backup(&repo, &opts, &cancel).await.unwrap();
    // ~20 MB of WAL, then a switch: several segments between the two backups.
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.query_i64("select count(*) from (select pg_switch_wal()) s")
        .await;
    opts.kind = BackupKind::Full;
    let second = run_backup(&repo, &opts, &cancel).await.unwrap();
    let cut = lsn_segment(second.start_lsn);
    assert!(
        cut > lsn_segment(first.stop_lsn),
        "switches moved the WAL on"
    );
    // The `.backup` history file is archived right after pg_backup_stop returns.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let all = archived(&repo_dir);
    assert!(
        all.iter()
            .any(|n| segment_number(n).is_some_and(|s| s < cut)),
        "WAL older than the second backup exists: {all:?}"
    );

    // With both backups present, prune keeps the WAL from the first one's start on (what
    // initdb wrote before it is nobody's).
    run_ok(
        Command::new(agent_exe())
            .args(["repo", "prune", "--grace", "0s", "--repo-config"])
            .arg(&cfg_path),
    );
    let first_cut = lsn_segment(first.start_lsn);
    let before = archived(&repo_dir);
    let want: Vec<String> = all
        .iter()
        .filter(|n| segment_number(n).is_none_or(|s| s >= first_cut))
        .cloned()
        .collect();
    assert_eq!(before, want);

    // Retention removes the first manifest: its WAL goes, the second's stays.
    std::fs::remove_file(repo_dir.join(format!("backups/{}", first.id))).unwrap();
    let out = run_ok(
        Command::new(agent_exe())
            .args(["repo", "prune", "--grace", "0s", "--repo-config"])
            .arg(&cfg_path),
    );
    assert!(out.contains("\"wal\""), "{out}");
    let after = archived(&repo_dir);
    let want: Vec<String> = before
        .iter()
        .filter(|n| segment_number(n).is_none_or(|s| s >= cut))
        .cloned()
        .collect();
    assert_eq!(after, want);
    assert!(after.len() < before.len());
    run_ok(
        Command::new(agent_exe())
            .args(["backup", "verify", "--all", "--repo-config"])
            .arg(&cfg_path),
    );

    // A needed segment deleted: verify names it as missing.
    let needed = after
        .iter()
        .find(|n| n.len() == 24 && segment_number(n) == Some(cut))
        .unwrap()
        .clone();
    std::fs::remove_file(repo_dir.join("wal/00000001").join(&needed)).unwrap();
    let out = Command::new(agent_exe())
        .args(["backup", "verify", "--all", "--repo-config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("missing") && l.contains(&needed)),
        "{text}"
    );
    pg.stop();
}
