//! Runs one configured command line as a child process, bounded in time and cancellable.
//!
//! Why a module of its own: health checks, service control, maintenance hooks, smoke tests
//! and named actions all run host commands, and all need the same guarantees: no shell
//! (argv only, so nothing from the wire can be interpreted), stdin closed, output captured
//! but bounded, and a child that overstays its timeout or whose command is cancelled is
//! killed together with everything it spawned (it runs in its own process group, which is
//! sent SIGKILL). A child left running after its command "failed" would be a worse outcome
//! than either success or failure.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

/// At most this many bytes of each of stdout and stderr are kept (the tail).
const OUTPUT_LIMIT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("empty command line")]
    Empty,
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{program}` timed out after {}", humantime::format_duration(*.after))]
    TimedOut { program: String, after: Duration },
    #[error("cancelled")]
    Cancelled,
    #[error("waiting for `{program}`: {source}")]
    Wait {
        program: String,
        source: std::io::Error,
    },
}

/// What a finished child left behind.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub duration: Duration,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// One line for a result message: exit code and the last line of stderr (or stdout).
    pub fn summary(&self) -> String {
        let code = self.code.map_or_else(
            || "killed by a signal".to_string(),
            |c| format!("exit code {c}"),
        );
        let last = |s: &str| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        };
        match last(&self.stderr).or_else(|| last(&self.stdout)) {
            Some(line) => format!("{code}: {line}"),
            None => code,
        }
    }
}

/// Runs `argv` to completion, at most `timeout`, killing its process group on timeout or when
/// `cancel` fires.
///
/// Cancel safety: dropping the future kills the direct child (`kill_on_drop`); use `cancel`
/// to also reach its descendants.
pub async fn run(
    argv: &[String],
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<CommandOutput, CommandError> {
    let (program, args) = argv.split_first().ok_or(CommandError::Empty)?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: program.clone(),
            source,
        })?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    // Readers run beside the wait so a chatty child never blocks on a full pipe.
    let stdout = tokio::spawn(read_tail(child.stdout.take()));
    let stderr = tokio::spawn(read_tail(child.stderr.take()));

    let outcome = tokio::select! {
        r = child.wait() => Ok(r),
        () = tokio::time::sleep(timeout) => Err(CommandError::TimedOut { program: program.clone(), after: timeout }),
        () = cancel.cancelled() => Err(CommandError::Cancelled),
    };
    match outcome {
        Ok(status) => {
            // The leader exited. Anything it left in the background (a daemon started by a
            // `start` command) may keep the pipes open: collect what is there, do not wait on it,
            // and do not kill it.
            let stdout = collect(stdout).await;
            let stderr = collect(stderr).await;
            let status = status.map_err(|source| CommandError::Wait {
                program: program.clone(),
                source,
            })?;
            Ok(CommandOutput {
                code: status.code(),
                stdout,
                stderr,
                duration: started.elapsed(),
            })
        }
        Err(e) => {
            if let Some(pgid) = pgid {
                let _ignored = killpg(pgid, Signal::SIGKILL);
            }
            // Reap the direct child so it does not linger as a zombie.
            let _ignored = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            stdout.abort();
            stderr.abort();
            Err(e)
        }
    }
}

async fn collect(mut h: tokio::task::JoinHandle<String>) -> String {
    match tokio::time::timeout(Duration::from_millis(200), &mut h).await {
        Ok(Ok(s)) => s,
        _ => {
            h.abort();
            String::new()
        }
    }
}

async fn read_tail<R: AsyncRead + Unpin + Send + 'static>(r: Option<R>) -> String {
    let Some(mut r) = r else { return String::new() };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > OUTPUT_LIMIT * 2 {
                    kept.drain(..kept.len() - OUTPUT_LIMIT);
                }
            }
        }
    }
    if kept.len() > OUTPUT_LIMIT {
        kept.drain(..kept.len() - OUTPUT_LIMIT);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn captures_exit_code_and_output() {
        let out = run(
            &argv(&["sh", "-c", "echo hi; echo oops >&2; exit 3"]),
            Duration::from_secs(5),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout.trim(), "hi");
        assert_eq!(out.summary(), "exit code 3: oops");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("grandchild-ran");
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let err = run(
            &argv(&["sh", "-c", &script]),
            Duration::from_millis(200),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::TimedOut { .. }), "{err}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            std::fs::metadata(&marker).is_err(),
            "the grandchild survived the timeout"
        );
    }

    #[tokio::test]
    async fn cancel_stops_the_child() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.cancel();
        });
        let started = Instant::now();
        let err = run(&argv(&["sleep", "30"]), Duration::from_secs(60), &cancel)
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Cancelled));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = run(
            &argv(&["/nonexistent/dr-test"]),
            Duration::from_secs(1),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }
}
