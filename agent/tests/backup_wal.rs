//! `dr-agent wal-push` / `wal-fetch` through the real binary, as PostgreSQL calls them.
#![allow(
    clippy::unwrap_used,
    clippy::let_underscore_must_use,
    clippy::cloned_ref_to_slice_refs
)]

mod backup_support;

use std::process::Command;

use backup_support::*;

fn segment(seed: u8) -> Vec<u8> {
    // 16 MiB, WAL-like: compressible runs with some variety.
    (0..16usize << 20)
        .map(|i| ((i / 64) as u8).wrapping_mul(seed) ^ (i % 7) as u8)
        .collect()
}

fn agent(args: &[&str], cfg: &std::path::Path) -> std::process::Output {
    Command::new(agent_exe())
        .args(args)
        .arg("--repo-config")
        .arg(cfg)
        .output()
        .unwrap()
}

#[test]
fn t10_push_repeat_conflict_fetch_prefetch() {
    let tmp = test_dir();
    let root = tmp.path();
    let spool = root.join("spool");
    let cfg = fs_repo_config(
        root,
        &root.join("repo"),
        &format!("spool_dir = \"{}\"\nwal_prefetch = 2", spool.display()),
    );
    let out = agent(&["repo", "init"], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join("repo.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let wal = root.join("pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    let names = [
        "000000010000000000000001",
        "000000010000000000000002",
        "000000010000000000000003",
    ];
    for (i, n) in names.iter().enumerate() {
        std::fs::write(wal.join(n), segment(i as u8 + 3)).unwrap();
        let out = agent(&["wal-push", wal.join(n).to_str().unwrap()], &cfg);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let object = root.join("repo/wal/00000001").join(names[0]);
    let stored = std::fs::read(&object).unwrap();
    assert!(stored.len() < 16 << 20, "stored compressed");

    // The same segment again (PostgreSQL retries after a crash): success.
    let out = agent(&["wal-push", wal.join(names[0]).to_str().unwrap()], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A different file under an existing name: refused, nothing overwritten.
    let mut other = segment(3);
    other[12345] ^= 1;
    std::fs::write(wal.join(names[0]), &other).unwrap();
    let out = agent(&["wal-push", wal.join(names[0]).to_str().unwrap()], &cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different content"), "{err}");
    assert_eq!(
        std::fs::read(&object).unwrap(),
        stored,
        "archived segment must not change"
    );

    // Fetch: the original content; the background prefetcher it started spools the next two.
    let dest = root.join("RECOVERYXLOG");
    let out = agent(&["wal-fetch", names[0], dest.to_str().unwrap()], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&dest).unwrap() == segment(3));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(spool.join(names[1]).exists() && spool.join(names[2]).exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the prefetcher did not spool {} and {} within 60 s",
            names[1],
            names[2]
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = agent(&["wal-fetch", names[1], dest.to_str().unwrap()], &cfg);
    assert!(out.status.success());
    assert!(std::fs::read(&dest).unwrap() == segment(4));
    assert!(!spool.join(names[1]).exists(), "served from the spool");

    // End of the archive: exit 1, quietly.
    let out = agent(
        &[
            "wal-fetch",
            "000000010000000000000009",
            dest.to_str().unwrap(),
        ],
        &cfg,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent(
        &["wal-fetch", "00000002.history", dest.to_str().unwrap()],
        &cfg,
    );
    assert_eq!(out.status.code(), Some(1));

    // A wrong key is named as such, and is an error, not "not in the archive": above 125, so
    // PostgreSQL stops a restore instead of promoting without the segment.
    std::fs::write(root.join("repo.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let out = agent(&["wal-fetch", names[0], dest.to_str().unwrap()], &cfg);
    assert_eq!(out.status.code(), Some(200));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // In a standby's data directory (PostgreSQL's working directory) the same error is 1:
    // the standby retries and keeps streaming instead of shutting down.
    let standby = root.join("standby-data");
    std::fs::create_dir_all(&standby).unwrap();
    std::fs::write(standby.join("standby.signal"), "").unwrap();
    let out = Command::new(agent_exe())
        .args([
            "wal-fetch",
            names[0],
            dest.to_str().unwrap(),
            "--repo-config",
        ])
        .arg(&cfg)
        .current_dir(&standby)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // A repository config that cannot be read is an error too, not the end of the archive.
    let out = agent(
        &["wal-fetch", names[0], dest.to_str().unwrap()],
        &root.join("missing.toml"),
    );
    assert_eq!(out.status.code(), Some(200));
}

/// `--push-ahead`: the first call stores its segment and starts a pusher for the next `.ready`
/// ones; PostgreSQL's later call for one of them only verifies it; a different file under a
/// pushed-ahead name is still refused and nothing is overwritten.
#[test]
fn t10_push_ahead_then_verify_only() {
    let tmp = test_dir();
    let root = tmp.path();
    let spool = root.join("spool");
    let cfg = fs_repo_config(
        root,
        &root.join("repo"),
        &format!("spool_dir = \"{}\"", spool.display()),
    );
    assert!(agent(&["repo", "init"], &cfg).status.success());
    let wal = root.join("pg_wal");
    std::fs::create_dir_all(wal.join("archive_status")).unwrap();
    let names = [
        "000000010000000000000011",
        "000000010000000000000012",
        "000000010000000000000013",
        "000000010000000000000014",
    ];
    for (i, n) in names.iter().enumerate() {
        std::fs::write(wal.join(n), segment(i as u8 + 5)).unwrap();
        std::fs::write(wal.join("archive_status").join(format!("{n}.ready")), "").unwrap();
    }
    let push = |n: &str| {
        agent(
            &[
                "wal-push",
                wal.join(n).to_str().unwrap(),
                "--push-ahead",
                "2",
            ],
            &cfg,
        )
    };
    let out = push(names[0]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The pusher stores exactly the next two, each recorded once durable.
    let object = |n: &str| root.join("repo/wal/00000001").join(n);
    let marker = |n: &str| spool.join("pushed").join(n);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(marker(names[1]).exists() && marker(names[2]).exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "read-ahead did not push {} and {}",
            names[1],
            names[2]
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(object(names[1]).exists() && object(names[2]).exists());
    assert!(
        !object(names[3]).exists(),
        "only --push-ahead 2 segments ahead"
    );

    // A different file under a name pushed ahead: refused, the archived object unchanged.
    let stored = std::fs::read(object(names[2])).unwrap();
    let mut other = segment(7);
    other[999] ^= 1;
    std::fs::write(wal.join(names[2]), &other).unwrap();
    let out = push(names[2]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different content"), "{err}");
    assert_eq!(std::fs::read(object(names[2])).unwrap(), stored);

    // PostgreSQL's call for a segment pushed ahead: success, the record is used up.
    std::fs::remove_file(
        wal.join("archive_status")
            .join(format!("{}.ready", names[0])),
    )
    .unwrap();
    let out = push(names[1]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!marker(names[1]).exists());
    let dest = root.join("RECOVERYXLOG");
    let fetch = agent(&["wal-fetch", names[1], dest.to_str().unwrap()], &cfg);
    assert!(fetch.status.success());
    assert!(std::fs::read(&dest).unwrap() == segment(6));

    // Let the last pusher (started by names[1]'s call) finish before the dir is removed.
    let lock = spool.join(".push-ahead.lock");
    let f = std::fs::OpenOptions::new().write(true).open(&lock).unwrap();
    let held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).unwrap();
    drop(held);

    // Without spool_dir, --push-ahead says what is missing.
    let cfg2 = fs_repo_config(root, &root.join("repo"), "");
    let out = agent(
        &[
            "wal-push",
            wal.join(names[3]).to_str().unwrap(),
            "--push-ahead",
            "2",
        ],
        &cfg2,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spool_dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `archive_command` runs as postgres, backups as root, in one fs repository: a `.tmp` (or
/// `wal`) directory that root creates first must not lock wal-push out. Opening the repository
/// as root hands both to the owner of the repository directory, also when an older agent had
/// already made them root's.
#[test]
fn t20_root_opening_the_repository_first_does_not_lock_out_archive_command() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root (wal-push runs as the postgres user)");
        return;
    }
    ensure_postgres_user();
    let tmp = test_dir();
    let root = tmp.path();
    let repo = root.join("repo");
    let cfg = fs_repo_config(root, &repo, "");
    assert!(agent(&["repo", "init"], &cfg).status.success());
    chown_postgres(root);
    // As an agent before this fix left them: root's, and only root may write.
    for d in [".tmp", "wal"] {
        let _ = std::fs::remove_dir_all(repo.join(d));
        std::fs::create_dir(repo.join(d)).unwrap();
    }
    // Any command of the agent (root) opening the repository.
    let out = agent(&["backup", "list"], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(&repo).unwrap().uid();
    assert_ne!(owner, 0);
    for d in [".tmp", "wal"] {
        assert_eq!(std::fs::metadata(repo.join(d)).unwrap().uid(), owner, "{d}");
    }
    // Removed: opening creates them, again for the repository's owner.
    for d in [".tmp", "wal"] {
        std::fs::remove_dir_all(repo.join(d)).unwrap();
    }
    assert!(agent(&["backup", "list"], &cfg).status.success());
    for d in [".tmp", "wal"] {
        assert_eq!(std::fs::metadata(repo.join(d)).unwrap().uid(), owner, "{d}");
    }
    // And the server's user archives into it.
    let wal = root.join("pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    let seg = wal.join("000000010000000000000001");
    std::fs::write(&seg, segment(5)).unwrap();
    chown_postgres(&wal);
    let out = as_postgres(agent_exe())
        .args(["wal-push", seg.to_str().unwrap(), "--repo-config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(repo.join("wal/00000001/000000010000000000000001").exists());
}
