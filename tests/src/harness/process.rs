//! `ChildGuard`: one child process that is always stopped by its PID.
//!
//! DESIGN.md ("Tests"): every process a test starts is stopped by its PID when the test
//! ends, also when it fails. The guard sends SIGTERM on drop, waits a grace period, then
//! SIGKILLs and reaps, so no test leaves a coordinator running on a CI machine. Children
//! stay in the test's process group, so a test runner that kills the group on timeout
//! (nextest does) takes them along.
//!
//! stdout and stderr go to one log file (appended to across restarts, with a header per
//! start) that the harness tails on failure and scans for panics.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{info, warn};

use super::wait::wait_until;

/// What to start.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    /// Short name used in logs (`coord-1`, `agent-h1`, `postgres`).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub log: PathBuf,
    /// Run as this uid/gid (PostgreSQL refuses to run as root).
    pub user: Option<(u32, u32)>,
    /// How long SIGTERM may take before SIGKILL.
    pub grace: Duration,
}

impl ChildSpec {
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        log: impl Into<PathBuf>,
    ) -> Self {
        let mut env = BTreeMap::new();
        env.insert("RUST_BACKTRACE".to_owned(), "1".to_owned());
        Self {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env,
            cwd: None,
            log: log.into(),
            user: None,
            grace: Duration::from_secs(10),
        }
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    pub fn command_line(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A running (or exited) child; stopped by PID on drop.
pub struct ChildGuard {
    spec: ChildSpec,
    child: Option<Child>,
    pid: u32,
    exit: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn spawn(spec: ChildSpec) -> Result<Self> {
        if let Some(dir) = spec.log.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .with_context(|| format!("open log {}", spec.log.display()))?;
        writeln!(log, "==== harness: start {}", spec.command_line())?;
        let stderr = log.try_clone()?;
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        if let Some((uid, gid)) = spec.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} ({})", spec.name, spec.command_line()))?;
        let pid = child.id();
        info!(name = %spec.name, pid, "started child");
        Ok(Self {
            spec,
            child: Some(child),
            pid,
            exit: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn spec(&self) -> &ChildSpec {
        &self.spec
    }

    pub fn log_path(&self) -> &Path {
        &self.spec.log
    }

    /// The exit status if the child has exited (reaps it), `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(st)) = child.try_wait()
        {
            self.exit = Some(st);
        }
        self.exit
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_exit().is_none()
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.pid).expect("pids fit in i32"));
        kill(pid, sig).ok();
    }

    /// SIGKILL, then reap: a crash as far as the child is concerned.
    pub fn kill9(&mut self) -> Result<()> {
        if !self.is_running() {
            bail!("{} is not running", self.spec.name);
        }
        info!(name = %self.spec.name, pid = self.pid, "kill -9");
        self.signal(Signal::SIGKILL);
        if let Some(child) = self.child.as_mut() {
            self.exit = Some(child.wait().context("reap after SIGKILL")?);
        }
        Ok(())
    }

    /// Waits for the child to exit by itself (e.g. a config error) and returns its status.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Result<ExitStatus> {
        let name = self.spec.name.clone();
        wait_until(
            &format!("{name} exits"),
            deadline,
            Duration::from_millis(50),
            || {
                let st = self.try_exit();
                async move { Ok(st) }
            },
        )
        .await
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL. Returns the exit status.
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.try_exit() {
            return Ok(st);
        }
        self.signal(Signal::SIGTERM);
        let grace = self.spec.grace;
        match self.wait_exit(grace).await {
            Ok(st) => Ok(st),
            Err(_) => {
                warn!(name = %self.spec.name, pid = self.pid, "no exit after SIGTERM, sending SIGKILL");
                self.kill9()?;
                self.exit.context("exit status after SIGKILL")
            }
        }
    }

    /// Non-async stop for `Drop`: SIGTERM, poll for the grace, SIGKILL, reap.
    fn stop_blocking(&mut self) {
        if !self.is_running() {
            return;
        }
        self.signal(Signal::SIGTERM);
        let deadline = std::time::Instant::now() + self.spec.grace;
        while std::time::Instant::now() < deadline {
            if self.try_exit().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(Signal::SIGKILL);
        if let Some(child) = self.child.as_mut() {
            child.wait().ok();
        }
    }

    /// The child's log so far.
    pub fn log(&self) -> String {
        fs::read(&self.spec.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// Lines of a child log that show a Rust panic (`panicked at`), with the file name.
pub fn panics_in_log(path: &Path) -> Vec<String> {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("panicked at"))
        .map(|l| format!("{}: {l}", path.display()))
        .collect()
}
