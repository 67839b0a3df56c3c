//! Real PostgreSQL 15 clusters for the agent's pg tests.
//!
//! Each node is a temp dir holding `data/` (initdb'd with `--data-checksums`, which pg_rewind
//! needs in the absence of `wal_log_hints`) and `sock/`, listening on a free 127.0.0.1 port.
//! PostgreSQL refuses root, so when the tests run as root the binaries run as `postgres`
//! (created with useradd --system if missing), like the agent does. [`Node`]'s `Drop` stops the
//! postmaster by the PID in `postmaster.pid` (SIGQUIT, then SIGKILL), also when a test panics.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dr_agent::pg::{PgConfig, PgInstance};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn init_tracing() {
    // Another test in this binary may have installed it already.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_test_writer()
        .try_init()
        .ok();
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// (uid, gid) of `postgres` when running as root (creating the user if needed).
fn pg_owner() -> Option<(nix::unistd::Uid, nix::unistd::Gid)> {
    if !is_root() {
        return None;
    }
    if nix::unistd::User::from_name("postgres").unwrap().is_none() {
        let st = Command::new("useradd")
            .args(["--system", "--no-create-home", "postgres"])
            .status()
            .unwrap();
        assert!(st.success(), "useradd postgres");
    }
    let u = nix::unistd::User::from_name("postgres").unwrap().unwrap();
    Some((u.uid, u.gid))
}

pub fn chown(p: &Path) {
    if let Some((u, g)) = pg_owner() {
        nix::unistd::chown(p, Some(u), Some(g)).unwrap();
    }
}

/// Runs a PostgreSQL binary as the data owner; panics with its output on failure.
pub fn run_pg(prog: &str, args: &[&str]) -> String {
    let exe = format!("{BIN}/{prog}");
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &exe]);
        c
    } else {
        Command::new(&exe)
    };
    let out = cmd
        .args(args)
        .current_dir("/")
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One PostgreSQL data dir + its manager.
pub struct Node {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub pg: Arc<PgInstance>,
}

impl Node {
    /// A node whose data dir does not exist yet (for `reseed`).
    pub fn empty(name: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix(&format!("dr-pg-{name}-"))
            .tempdir()
            .unwrap();
        chown(dir.path());
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).unwrap();
        chown(&sock);
        let port = free_port();
        let mut cfg = PgConfig::new("yeslocker", dir.path().join("data"));
        cfg.bin_dir = BIN.into();
        cfg.port = port;
        cfg.socket_dir = sock;
        cfg.listen_host = Some("127.0.0.1".into());
        cfg.replication.user = "postgres".into();
        cfg.application_name = Some(name.into());
        cfg.start_timeout = Duration::from_secs(30);
        cfg.stop_timeout = Duration::from_secs(30);
        let pg = Arc::new(PgInstance::with_env(cfg, Default::default()).unwrap());
        Node {
            name: name.into(),
            dir,
            port,
            pg,
        }
    }

    /// initdb (checksums) + replication settings; not started.
    pub fn init(name: &str) -> Node {
        let n = Node::empty(name);
        let data = n.data_dir();
        run_pg(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--data-checksums",
                "--no-sync",
                "--no-instructions",
            ],
        );
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            conf,
            "wal_level = replica\nmax_wal_senders = 10\nmax_replication_slots = 10\nhot_standby = on\n\
             fsync = off\nshared_buffers = 16MB\nmax_connections = 30\nwal_keep_size = 64MB\n\
             log_min_messages = warning\n"
        )
        .unwrap();
        n
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Conninfo other nodes use to reach this one.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    pub async fn conn(&self) -> PgConnection {
        PgConnectOptions::new()
            .host(self.dir.path().join("sock").to_str().unwrap())
            .port(self.port)
            .username("postgres")
            .database("postgres")
            .disable_statement_logging()
            .connect()
            .await
            .unwrap()
    }

    pub async fn exec(&self, sql: &str) {
        let mut c = self.conn().await;
        sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        c.close().await.unwrap();
    }

    pub async fn count(&self, table: &str) -> i64 {
        let mut c = self.conn().await;
        let n: i64 = sqlx::query_scalar(&format!("select count(*) from {table}"))
            .fetch_one(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        n
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.data_dir().join("postmaster.pid")) else {
            return;
        };
        let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(pid);
        use nix::sys::signal::{Signal, kill};
        if kill(pid, Signal::SIGQUIT).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while kill(pid, None).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if kill(pid, None).is_ok() {
            kill(pid, Signal::SIGKILL).ok();
        }
    }
}

/// Polls `pred` every 50 ms until true or `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut pred: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !pred().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
