//! Helpers shared by the `traffic_*` integration tests (included with `#[path]`): free ports,
//! a guard that stops a child process by PID, polling, and plan builders.
//!
//! Built as its own (empty) test target too, hence the `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used, clippy::let_underscore_must_use)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dr_agent::traffic::{Endpoint, Percent, Region, RegionTraffic, TrafficPlan};

/// A port free on 127.0.0.1 for both TCP and UDP (named wants both).
pub fn free_port() -> u16 {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp 127.0.0.1:0");
        let port = tcp.local_addr().expect("local addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both tcp and udp");
}

/// Stops the child by PID on drop: SIGTERM (lets nginx's master take its workers down), then
/// SIGKILL after a grace period.
pub struct ChildGuard {
    pub name: &'static str,
    child: Child,
}

impl ChildGuard {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self { name, child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with the log if the child has already exited.
    pub fn assert_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{} exited early with {status}; log:\n{log}", self.name);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `pred` every `interval` until it yields `Some`, or panics with `what` at the deadline.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut pred: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = pred().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Panics with an install hint if `bin` is not on PATH.
pub fn require_binary(bin: &str, package: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]) {
        let p = dir.join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{bin}` not found: this test needs a real {bin} (apt-get install -y {package})");
}

pub fn region(name: &str) -> Region {
    Region::new(name).unwrap()
}

/// A two-region plan: beijing gets `bj` percent, shanghai the rest.
pub fn plan(bj_eps: &[&str], sh_eps: &[&str], bj: u8) -> TrafficPlan {
    let rt = |eps: &[&str], w: u8| RegionTraffic {
        endpoints: eps.iter().map(|e| Endpoint::new(*e).unwrap()).collect(),
        weight: Percent::new(w).unwrap(),
    };
    TrafficPlan::new(BTreeMap::from([
        (region("beijing"), rt(bj_eps, bj)),
        (region("shanghai"), rt(sh_eps, 100 - bj)),
    ]))
    .unwrap()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,dr_agent=debug".into()),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}
