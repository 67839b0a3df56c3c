//! Backup benchmark: dr-agent beside the pgBackRest anchor (shared/bench/pgbackrest-results.md).
//!
//! Why a bench binary and not timed test assertions: this machine is shared and times drift by
//! up to 1.7x between runs, so figures are reported, never asserted (DESIGN.md "Tests").
//!
//! ```text
//! cargo build --release -p dr-agent
//! cargo bench -p dr-agent --bench backup_bench -- [SCALE [REPS [PGBENCH_SECONDS [WORKDIR]]]]
//!   defaults: 60 3 30 /tmp/dr-bench   (root; runs PostgreSQL 15 as the postgres user)
//! ```
//! Mirrors the anchor: `pgbench -i -s SCALE`, full backup into an empty repository, then REPS
//! rounds of `pgbench -c 4 -T PGBENCH_SECONDS` + incremental, a restore of the last
//! incremental, and `wal-push` of 10 real 16 MiB segments (fetched back from the archive)
//! into a second repository, timed as the wall time of the `dr-agent` process.
//! Peak RSS of the backup/restore process is read from /proc/<pid>/status (VmHWM).
#![allow(clippy::let_underscore_must_use, clippy::cloned_ref_to_slice_refs)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench that cannot set up should stop loudly

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn agent() -> PathBuf {
    // The bench runs from <target>/release/deps/; the agent binary is <target>/release/dr-agent.
    let exe = std::env::current_exe().unwrap();
    let here = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("dr-agent");
    assert!(
        std::fs::metadata(&here).is_ok(),
        "build it first: cargo build --release -p dr-agent"
    );
    here
}

fn sh(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn as_pg(prog: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", prog]);
    c
}

fn psql(port: u16, sql: &str) -> String {
    sh(Command::new(format!("{PG_BIN}/psql")).args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-Atc",
        sql,
    ]))
    .trim()
    .to_string()
}

/// Run a command, returning (wall time, peak RSS in KiB).
fn timed(c: &mut Command) -> (Duration, u64) {
    let start = Instant::now();
    let mut child = c.stdout(std::process::Stdio::null()).spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut hwm = 0u64;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status_path)
            && let Some(v) = s.lines().find_map(|l| l.strip_prefix("VmHWM:"))
        {
            hwm = hwm.max(v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0));
        }
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{c:?} failed");
            return (start.elapsed(), hwm);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn du(p: &Path) -> u64 {
    if std::fs::metadata(p).is_err() {
        return 0;
    }
    let out = sh(Command::new("du").args(["-sb"]).arg(p));
    out.split_whitespace().next().unwrap().parse().unwrap()
}

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:.3} / **{:.3}** / {:.3} (n={})",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1],
        v.len()
    )
}

fn repo_cfg(dir: &Path, repo: &Path) -> PathBuf {
    let p = dir.join(format!(
        "{}.toml",
        repo.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(
        &p,
        format!(
            "version = 1\nkey_file = \"repo.key\"\n[location]\nkind = \"fs\"\npath = \"{}\"\n",
            repo.display()
        ),
    )
    .unwrap();
    p
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let scale: u32 = args.first().map_or(60, |s| s.parse().unwrap());
    let reps: usize = args.get(1).map_or(3, |s| s.parse().unwrap());
    let secs: u32 = args.get(2).map_or(30, |s| s.parse().unwrap());
    let w = PathBuf::from(args.get(3).cloned().unwrap_or("/tmp/dr-bench".into()));
    assert!(w.starts_with("/tmp/"), "work dir must be under /tmp");
    let exe = agent();
    let _ = std::fs::remove_dir_all(&w);
    std::fs::create_dir_all(&w).unwrap();
    let port: u16 = 55532;
    let data = w.join("data");
    let repo = w.join("repo");
    let cfg = repo_cfg(&w, &repo);
    sh(Command::new(&exe)
        .args(["repo", "init", "--repo-config"])
        .arg(&cfg));
    sh(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&w));

    println!(
        "# dr-agent backup bench: scale {scale}, {reps} incr rounds of pgbench -c 4 -T {secs}"
    );
    sh(as_pg(&format!("{PG_BIN}/initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust"]));
    let conf = format!(
        "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{w}'\nshared_buffers = 1GB\n\
         max_wal_size = 4GB\ncheckpoint_timeout = 30min\nwal_level = replica\narchive_mode = on\n\
         archive_command = '{exe} wal-push %p --repo-config {cfg}'\n",
        w = w.display(),
        exe = exe.display(),
        cfg = cfg.display()
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
        .unwrap();
    sh(as_pg(&format!("{PG_BIN}/pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(w.join("pg.log"))
        .args(["-w", "-t", "300", "start"]));
    let stop = || {
        let _ = as_pg(&format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w", "stop"])
            .output();
    };
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sh(Command::new(format!("{PG_BIN}/pgbench")).args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-i",
            "-s",
            &scale.to_string(),
            "-q",
            "postgres",
        ]));
        let db_mb: f64 = psql(
            port,
            "select sum(pg_database_size(datname)) from pg_database",
        )
        .parse::<f64>()
        .unwrap()
            / 1e6;
        println!("database size: {db_mb:.1} MB");
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let backup = |kind: &str| {
            let before = du(&repo.join("data"));
            let (t, rss) = timed(
                Command::new(&exe)
                    .args([
                        "backup",
                        "run",
                        "--type",
                        kind,
                        "--pg-url",
                        &url,
                        "--data-dir",
                    ])
                    .arg(&data)
                    .arg("--repo-config")
                    .arg(&cfg),
            );
            let added = du(&repo.join("data")) - before;
            (t.as_secs_f64(), added as f64 / 1e6, rss as f64 / 1024.0)
        };
        let (ft, fadd, frss) = backup("full");
        println!(
            "| full backup | {ft:.2} s | {:.0} MB/s | repo +{fadd:.1} MB | peak RSS {frss:.0} MiB |",
            db_mb / ft
        );
        let (mut it, mut iadd, mut irss) = (vec![], vec![], vec![]);
        for _ in 0..reps {
            sh(Command::new(format!("{PG_BIN}/pgbench")).args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-c",
                "4",
                "-T",
                &secs.to_string(),
                "postgres",
            ]));
            let (t, a, r) = backup("incr");
            it.push(t);
            iadd.push(a);
            irss.push(r);
        }
        println!("| incr backup (s) | {} |", stats(it));
        println!("| incr bytes added to data/ (MB) | {} |", stats(iadd));
        println!("| incr peak RSS (MiB) | {} |", stats(irss));

        let mut rt = vec![];
        let mut rrss = vec![];
        for i in 0..reps {
            let target = w.join(format!("restore{i}"));
            let (t, r) = timed(
                Command::new(&exe)
                    .args(["restore", "--backup", "latest", "--no-recovery", "--target"])
                    .arg(&target)
                    .arg("--repo-config")
                    .arg(&cfg),
            );
            rt.push(t.as_secs_f64());
            rrss.push(r as f64 / 1024.0);
            let _ = std::fs::remove_dir_all(&target);
        }
        println!("| restore latest (s) | {} |", stats(rt));
        println!("| restore peak RSS (MiB) | {} |", stats(rrss));

        // wal-push: 10 real segments from the archive, pushed into a second repository.
        let mut segs: Vec<String> = std::fs::read_dir(repo.join("wal/00000001"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.len() == 24)
            .collect();
        segs.sort();
        let segs: Vec<String> = segs.into_iter().rev().skip(1).take(10).collect();
        let walcopy = w.join("walcopy");
        std::fs::create_dir_all(&walcopy).unwrap();
        let bench_repo = w.join("walbench");
        let bcfg = repo_cfg(&w, &bench_repo);
        sh(Command::new(&exe)
            .args(["repo", "init", "--repo-config"])
            .arg(&bcfg));
        let mut pt = vec![];
        let mut ratio = vec![];
        for s in &segs {
            let p = walcopy.join(s);
            sh(Command::new(&exe)
                .args(["wal-fetch", s])
                .arg(&p)
                .arg("--repo-config")
                .arg(&cfg));
            let (t, _) = timed(
                Command::new(&exe)
                    .arg("wal-push")
                    .arg(&p)
                    .arg("--repo-config")
                    .arg(&bcfg),
            );
            pt.push(t.as_secs_f64() * 1000.0);
            let stored = std::fs::metadata(bench_repo.join("wal/00000001").join(s))
                .unwrap()
                .len();
            ratio.push(stored as f64 / 1e6);
        }
        println!("| wal-push one 16 MiB segment, wall (ms) | {} |", stats(pt));
        println!("| stored segment size (MB) | {} |", stats(ratio));
    }));
    stop();
    if run.is_err() {
        std::process::exit(1);
    }
}
