//! Shared helpers of the backup integration tests: real PostgreSQL clusters (initdb in a temp
//! dir, run as the `postgres` OS user because postgres refuses root), free ports, waiting, and
//! child processes stopped by PID on drop — also when a test fails.
#![allow(dead_code, clippy::unwrap_used)] // test helpers: a failed setup step should panic the test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn agent_exe() -> &'static str {
    env!("CARGO_BIN_EXE_dr-agent")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A temp dir the `postgres` user can traverse.
pub fn test_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("dr-backup-test")
        .tempdir()
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Ensure the `postgres` OS user exists (Debian's postgresql package creates it).
pub fn ensure_postgres_user() {
    let ok = Command::new("id")
        .arg("postgres")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        let st = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", "postgres"])
            .status()
            .unwrap();
        assert!(st.success(), "create the postgres OS user");
    }
}

pub fn chown_postgres(p: &Path) {
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "chown {}", p.display());
}

pub fn as_postgres(prog: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", prog]);
    c
}

pub fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub async fn wait_until<F: FnMut() -> bool>(mut pred: F, deadline: Duration, what: &str) {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A PostgreSQL cluster run as `postgres`; stopped by PID on drop.
pub struct Pg {
    pub dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

impl Pg {
    /// initdb + postgresql.conf additions.
    pub fn init(dir: &Path, port: u16, extra_conf: &str) -> Pg {
        ensure_postgres_user();
        std::fs::create_dir_all(dir).unwrap();
        chown_postgres(dir);
        run_ok(
            as_postgres(&format!("{PG_BIN}/initdb"))
                .args(["-D"])
                .arg(dir)
                .args(["-U", "postgres", "--auth=trust", "-N"]),
        );
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = replica\nmax_wal_senders = 2\nshared_buffers = 64MB\n{extra_conf}\n",
            dir.display()
        );
        append(&dir.join("postgresql.conf"), &conf);
        Pg::existing(dir, port)
    }

    pub fn existing(dir: &Path, port: u16) -> Pg {
        Pg {
            dir: dir.to_path_buf(),
            port,
            log: dir.with_extension("log"),
        }
    }

    pub fn start(&self) {
        if let Some(parent) = self.log.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        std::fs::write(&self.log, b"").unwrap();
        chown_postgres(&self.log);
        let out = as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .args(["-D"])
            .arg(&self.dir)
            .args(["-l"])
            .arg(&self.log)
            .args(["-t", "300", "-w", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub async fn query_i64(&self, sql: &str) -> i64 {
        let mut c = PgConnection::connect(&self.url()).await.unwrap();
        let v: i64 = sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap();
        c.close().await.unwrap();
        v
    }

    pub async fn query_bool(&self, sql: &str) -> bool {
        let mut c = PgConnection::connect(&self.url()).await.unwrap();
        let v: bool = sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap();
        c.close().await.unwrap();
        v
    }

    pub fn pgbench(&self, args: &[&str]) {
        run_ok(
            Command::new(format!("{PG_BIN}/pgbench"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .args(args)
                .arg("postgres"),
        );
    }

    fn pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Fast shutdown by PID (SIGINT), waiting for the postmaster to exit.
    pub fn stop(&self) {
        let Some(pid) = self.pid() else { return };
        let pid = nix::unistd::Pid::from_raw(pid);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).is_err() {
            return;
        }
        let start = Instant::now();
        while nix::sys::signal::kill(pid, None).is_ok() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn append(p: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A child process killed by PID on drop.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sum of balances and row counts: what "the same data" means in these tests.
pub async fn fingerprint(pg: &Pg) -> (i64, i64, i64) {
    (
        pg.query_i64("select coalesce(sum(abalance),0)::bigint from pgbench_accounts")
            .await,
        pg.query_i64("select count(*) from pgbench_accounts").await,
        pg.query_i64("select count(*) from pgbench_history").await,
    )
}

/// Write a repository config (fs) with its key beside it.
pub fn fs_repo_config(dir: &Path, repo: &Path, extra: &str) -> PathBuf {
    let p = dir.join("repository.toml");
    std::fs::write(
        &p,
        format!(
            "version = 1\nkey_file = \"repo.key\"\nconcurrency = 4\n{extra}\n[location]\nkind = \"fs\"\npath = \"{}\"\n",
            repo.display()
        ),
    )
    .unwrap();
    p
}

/// postgresql.conf lines: WAL archived by `dr-agent wal-push` into the repository of `cfg`.
pub fn archive_conf(cfg: &Path) -> String {
    format!(
        "archive_mode = on\narchive_command = '{} wal-push %p --repo-config {}'\n",
        agent_exe(),
        cfg.display()
    )
}

/// Restore options for a server in `target` on `port`, WAL through `dr-agent wal-fetch` from
/// the repository of `cfg`, archiving off, plus `extra` settings (a recovery target).
pub fn restore_opts(
    cfg: &Path,
    target: &Path,
    port: u16,
    extra: &[&str],
) -> dr_agent::backup::restore::RestoreOptions {
    let mut extra_conf = vec![
        format!("port = {port}"),
        format!("unix_socket_directories = '{}'", target.display()),
        "archive_mode = off".to_owned(),
    ];
    extra_conf.extend(extra.iter().map(|s| (*s).to_owned()));
    dr_agent::backup::restore::RestoreOptions {
        restore_command: Some(format!(
            "{} wal-fetch %f %p --repo-config {}",
            agent_exe(),
            cfg.display()
        )),
        extra_conf,
    }
}

/// An fs repository in `<root>/repo` (config `<root>/repository.toml`) and a PostgreSQL in
/// `<root>/data` archiving into it, started and initialised with pgbench at `scale`. `root`
/// is handed to postgres: archive_command must read the key and write the repository.
pub async fn archiving_pg(root: &Path, scale: u32) -> (PathBuf, dr_agent::backup::Repository, Pg) {
    let cfg_path = fs_repo_config(root, &root.join("repo"), "");
    let cfg =
        dr_agent::backup::RepoConfig::load(&cfg_path, &std::collections::HashMap::new()).unwrap();
    let repo = dr_agent::backup::Repository::init(&cfg).await.unwrap();
    chown_postgres(root);
    let pg = Pg::init(&root.join("data"), free_port(), &archive_conf(&cfg_path));
    pg.start();
    pg.pgbench(&["-i", "-s", &scale.to_string(), "-q"]);
    (cfg_path, repo, pg)
}
