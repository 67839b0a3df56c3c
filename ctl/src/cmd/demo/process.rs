//! Child processes of the demo, stopped by PID whatever happens.
//!
//! Why a guard type: the demo starts eight long-running processes. If a step fails, the
//! operator presses Ctrl-C, or drctl panics, none of them may be left behind holding ports
//! and data directories. [`ChildGuard`] stops its child on `Drop` (SIGTERM, then SIGKILL
//! after a grace period), and only ever signals the PID it spawned, never a name.
//!
//! Children run in their own process group so that a Ctrl-C in the terminal reaches drctl
//! only; drctl then stops them in order (agents first, coordinators last).

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a child gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct ChildGuard {
    pub name: String,
    pub log: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl ChildGuard {
    /// Starts `program args...` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let mut g = Self {
            name: name.to_string(),
            log: log.to_path_buf(),
            program: program.to_path_buf(),
            args: args.to_vec(),
            child: None,
        };
        g.start()?;
        Ok(g)
    }

    /// (Re)starts the process with the same program, arguments and log.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open log {}", self.log.display()))?;
        let err = out.try_clone().context("duplicate the log handle")?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {} ({})", self.name, self.program.display()))?;
        tracing::info!(name = %self.name, pid = child.id(), "started");
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the child is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_)) | Err(_)) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// An error naming the exit and the log's tail if the child died on its own.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child = None;
            anyhow::bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 15)
            );
        }
        Ok(())
    }

    /// SIGKILL, as a crash would (used to kill the leader).
    pub fn crash(&mut self) -> anyhow::Result<()> {
        let child = self
            .child
            .as_mut()
            .with_context(|| format!("{} is not running", self.name))?;
        send(child.id(), Signal::SIGKILL).with_context(|| format!("SIGKILL {}", self.name))?;
        let status = child.wait().context("reap the killed process")?;
        tracing::info!(name = %self.name, %status, "killed");
        self.child = None;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Err(e) = send(child.id(), Signal::SIGTERM) {
            tracing::warn!(name = %self.name, error = %e, "sigterm failed");
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!(name = %self.name, "did not stop within the grace period, killing it");
        if let Err(e) = child.kill() {
            tracing::warn!(name = %self.name, error = %e, "sigkill failed");
        }
        if let Err(e) = child.wait() {
            tracing::warn!(name = %self.name, error = %e, "reap failed");
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
    }
}

fn send(pid: u32, sig: Signal) -> anyhow::Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    kill(Pid::from_raw(pid), sig).context("kill(2)")?;
    Ok(())
}

/// The last `n` lines of a log file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..]
                .iter()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("    (cannot read: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_stops_its_child_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let mut g =
            ChildGuard::spawn("sleep", Path::new("sleep"), &["30".to_string()], &log).unwrap();
        let pid = g.pid().unwrap();
        assert!(g.is_running());
        drop(g);
        // The PID is reaped: signalling it now fails (or hits nothing of ours).
        assert!(send(pid, Signal::SIGCONT).is_err());

        let mut g = ChildGuard::spawn("false", Path::new("false"), &[], &log).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(g.check_alive().is_err());
        g.start().unwrap();
    }
}
