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

    // Fetch: the original content; the next two are prefetched into the spool.
    let dest = root.join("RECOVERYXLOG");
    let out = agent(&["wal-fetch", names[0], dest.to_str().unwrap()], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&dest).unwrap() == segment(3));
    assert!(spool.join(names[1]).exists() && spool.join(names[2]).exists());
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

    // A wrong key is named as such.
    std::fs::write(root.join("repo.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let out = agent(&["wal-fetch", names[0], dest.to_str().unwrap()], &cfg);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
