//! `kind = "process"`: is the process named by a pidfile alive? `kill(pid, 0)` asks the
//! kernel without sending anything; EPERM still means "exists" (owned by another user).

use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::Outcome;

pub async fn probe(pidfile: &Path) -> Outcome {
    let text = match tokio::fs::read_to_string(pidfile).await {
        Ok(t) => t,
        Err(e) => return Outcome::Fail(format!("cannot read pidfile {}: {e}", pidfile.display())),
    };
    let pid = match text.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => pid,
        _ => {
            return Outcome::Fail(format!(
                "pidfile {} does not hold a process id",
                pidfile.display()
            ));
        }
    };
    match kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(Errno::EPERM) => Outcome::Pass(format!("pid {pid} is alive")),
        Err(Errno::ESRCH) => Outcome::Fail(format!(
            "pid {pid} from {} is not running",
            pidfile.display()
        )),
        Err(e) => Outcome::Fail(format!("cannot probe pid {pid}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pidfile_states() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("app.pid");
        assert!(
            matches!(probe(&pidfile).await, Outcome::Fail(_)),
            "missing pidfile"
        );

        std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
        assert!(matches!(probe(&pidfile).await, Outcome::Pass(_)), "own pid");

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(&pidfile, dead.to_string()).unwrap();
        assert!(
            matches!(probe(&pidfile).await, Outcome::Fail(_)),
            "reaped pid"
        );

        std::fs::write(&pidfile, "garbage").unwrap();
        assert!(matches!(probe(&pidfile).await, Outcome::Fail(_)));
    }
}
