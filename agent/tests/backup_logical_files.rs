//! Logical dumps and file sets through the standalone `dr-agent` CLI (issue "Backups"): a
//! `pg_dump` of a real PostgreSQL 15 database streamed into an fs repository and restored with
//! `pg_restore --clean --if-exists` over changed data; a file set with an exclude glob backed
//! up, restored into an empty directory with modes, mtimes and links, a dry run that writes
//! nothing, a refusal to replace changed files without --overwrite, and the overwrite.
#![allow(clippy::unwrap_used, clippy::let_underscore_must_use)]

mod backup_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use backup_support::*;

fn agent(cfg: &Path) -> Command {
    let mut c = Command::new(agent_exe());
    c.env("DR_REPO_CONFIG", cfg);
    c
}

fn run_fail(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "{c:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every file under `dir` (relative path, content), sorted; links as `-> target`.
fn tree(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                out.push((
                    rel,
                    format!("-> {}", std::fs::read_link(&p).unwrap().display()),
                ));
            } else if m.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    rel,
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_logical_dump_and_pg_restore_round_trip() {
    let tmp = test_dir();
    let root = tmp.path();
    let cfg = fs_repo_config(root, &root.join("repo"), "");
    run_ok(agent(&cfg).args(["repo", "init"]));
    let port = free_port();
    let pg = Pg::init(&root.join("pg"), port, "");
    pg.start();
    let url = pg.url();
    let psql = |db: &str, sql: &str| -> String {
        run_ok(
            Command::new(format!("{PG_BIN}/psql"))
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .args(["-d", db, "-c", sql]),
        )
        .trim()
        .to_owned()
    };
    psql("postgres", "create database app");
    psql(
        "app",
        "create table t(id int primary key, v text); \
         insert into t select g, md5(g::text) from generate_series(1, 200000) g; \
         create view big as select * from t where id > 100",
    );
    let before = psql(
        "app",
        "select count(*), md5(string_agg(v, ',' order by id)) from t",
    );

    // The dump is bigger than one 1 MiB chunk, so the stream is cut and reassembled.
    let out = run_ok(agent(&cfg).args([
        "backup", "run", "--type", "logical", "--pg-url", &url, "--dbname", "app",
    ]));
    let id = out.trim().to_owned();
    assert!(id.ends_with("-logical"), "{id}");
    let list = run_ok(agent(&cfg).args(["backup", "list", "--output", "json"]));
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    let row = &rows.as_array().unwrap()[0];
    assert_eq!(row["kind"], "logical");
    assert!(
        row["stats"]["bytes_total"].as_u64().unwrap() > 2 << 20,
        "{row}"
    );
    run_ok(agent(&cfg).args(["backup", "verify", &id]));

    // Damage the database: pg_restore --clean puts it back exactly.
    psql(
        "app",
        "delete from t where id % 3 = 0; drop view big; create table junk(x int)",
    );
    run_ok(agent(&cfg).args([
        "restore-logical",
        "--backup",
        "latest",
        "--source-db",
        "app",
        "--pg-url",
        &url,
        "--dbname",
        "app",
    ]));
    assert_eq!(
        psql(
            "app",
            "select count(*), md5(string_agg(v, ',' order by id)) from t"
        ),
        before
    );
    assert_eq!(psql("app", "select count(*) from big"), "199900");
    // --clean drops only what the dump has: junk stays (pg_restore semantics).
    assert_eq!(psql("app", "select count(*) from junk"), "0");

    // Into a new database, created by the restore.
    run_ok(agent(&cfg).args([
        "restore-logical",
        "--backup",
        &id,
        "--pg-url",
        &url,
        "--dbname",
        "app copy",
        "--create",
    ]));
    assert_eq!(
        psql(
            "app copy",
            "select count(*), md5(string_agg(v, ',' order by id)) from t"
        ),
        before
    );

    // A dump of a database that does not exist fails clearly and leaves no backup.
    let err = run_fail(agent(&cfg).args([
        "backup", "run", "--type", "logical", "--pg-url", &url, "--dbname", "nope",
    ]));
    assert!(err.contains("nope"), "{err}");
    let list = run_ok(agent(&cfg).args(["backup", "list", "--output", "json"]));
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");

    // A physical restore command refuses a logical backup by kind.
    let err = run_fail(agent(&cfg).args([
        "restore-files",
        "--backup",
        &id,
        "--target",
        &root.join("x").display().to_string(),
    ]));
    assert!(err.contains("not a file set"), "{err}");
    pg.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_file_set_backup_restore_dry_run_overwrite() {
    let tmp = test_dir();
    let root = tmp.path();
    let cfg = fs_repo_config(root, &root.join("repo"), "");
    run_ok(agent(&cfg).args(["repo", "init"]));
    let src = root.join("etc-app");
    std::fs::create_dir_all(src.join("tls/private")).unwrap();
    std::fs::create_dir_all(src.join("cache")).unwrap();
    std::fs::write(src.join("app.conf"), "listen = 443\n").unwrap();
    std::fs::write(src.join("tls/server.pem"), "CERT").unwrap();
    std::fs::write(src.join("tls/private/server.key"), "KEY").unwrap();
    std::fs::set_permissions(
        src.join("tls/private/server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(src.join("cache/blob"), vec![7u8; 3 << 20]).unwrap();
    std::fs::write(src.join("x.tmp"), "scratch").unwrap();
    std::os::unix::fs::symlink("tls/server.pem", src.join("current.pem")).unwrap();
    let big: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("data.bin"), &big).unwrap();
    let src_s = src.display().to_string();

    let id = run_ok(agent(&cfg).args([
        "backup",
        "run",
        "--type",
        "files",
        "--name",
        "config",
        "--path",
        &src_s,
        "--exclude",
        "*.tmp",
        "--exclude",
        "cache/**",
    ]))
    .trim()
    .to_owned();
    assert!(id.ends_with("-files"), "{id}");
    run_ok(agent(&cfg).args(["backup", "verify", &id]));

    // A file set is not a data directory: the physical restore refuses it before writing.
    let pg_target = root.join("pgdata");
    let err = run_fail(agent(&cfg).args([
        "restore",
        "--backup",
        &id,
        "--target",
        &pg_target.display().to_string(),
    ]));
    assert!(err.contains("not a physical one"), "{err}");
    assert!(!pg_target.exists(), "nothing written for a refused restore");

    // Dry run into an empty directory: lists, writes nothing.
    let target = root.join("restore");
    std::fs::create_dir_all(&target).unwrap();
    let t = target.display().to_string();
    let plan = run_ok(agent(&cfg).args([
        "restore-files",
        "--backup",
        "latest",
        "--set",
        "config",
        "--target",
        &t,
        "--dry-run",
    ]));
    assert!(
        plan.contains("create ") && plan.contains("server.key"),
        "{plan}"
    );
    assert!(
        !plan.contains("x.tmp") && !plan.contains("cache/blob"),
        "{plan}"
    );
    assert!(
        std::fs::read_dir(&target).unwrap().next().is_none(),
        "dry run wrote"
    );

    // Real restore: the same tree (without the excluded), modes and mtimes.
    run_ok(agent(&cfg).args(["restore-files", "--backup", &id, "--target", &t]));
    let restored = target.join(src.strip_prefix("/").unwrap());
    let mut want = tree(&src);
    want.retain(|(p, _)| p != "x.tmp" && !p.starts_with("cache/"));
    assert_eq!(tree(&restored), want);
    let key = std::fs::metadata(restored.join("tls/private/server.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    let orig = std::fs::metadata(src.join("data.bin")).unwrap();
    let back = std::fs::metadata(restored.join("data.bin")).unwrap();
    assert_eq!(
        (orig.mtime(), orig.mtime_nsec()),
        (back.mtime(), back.mtime_nsec())
    );

    // Changed file at the destination: refused without --overwrite, nothing written.
    std::fs::write(restored.join("app.conf"), "listen = 8443\n").unwrap();
    std::fs::remove_file(restored.join("tls/server.pem")).unwrap();
    let err = run_fail(agent(&cfg).args(["restore-files", "--backup", &id, "--target", &t]));
    assert!(
        err.contains("app.conf") && err.contains("overwrite"),
        "{err}"
    );
    assert!(
        !restored.join("tls/server.pem").exists(),
        "refused restore wrote"
    );
    let plan = run_ok(agent(&cfg).args([
        "restore-files",
        "--backup",
        &id,
        "--target",
        &t,
        "--dry-run",
    ]));
    assert!(
        plan.lines()
            .any(|l| l.starts_with("replace ") && l.contains("app.conf")),
        "{plan}"
    );
    assert!(
        plan.lines()
            .any(|l| l.starts_with("create ") && l.contains("server.pem")),
        "{plan}"
    );
    assert!(
        plan.lines()
            .any(|l| l.starts_with("unchanged ") && l.contains("data.bin")),
        "{plan}"
    );
    run_ok(agent(&cfg).args([
        "restore-files",
        "--backup",
        &id,
        "--target",
        &t,
        "--overwrite",
    ]));
    assert_eq!(tree(&restored), want);

    // A second backup of an unchanged set adds (almost) nothing.
    let list_before = std::fs::read_dir(root.join("repo/data")).unwrap().count();
    run_ok(agent(&cfg).args([
        "backup",
        "run",
        "--type",
        "files",
        "--name",
        "config",
        "--path",
        &src_s,
        "--exclude",
        "*.tmp",
        "--exclude",
        "cache/**",
    ]));
    let rows: serde_json::Value = serde_json::from_str(&run_ok(
        agent(&cfg).args(["backup", "list", "--output", "json"]),
    ))
    .unwrap();
    let second = &rows.as_array().unwrap()[1];
    assert_eq!(second["stats"]["bytes_added"], 0, "{second}");
    assert_eq!(second["parent"], serde_json::Value::String(id.clone()));
    assert_eq!(
        std::fs::read_dir(root.join("repo/data")).unwrap().count(),
        list_before
    );
}
