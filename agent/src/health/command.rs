//! `kind = "command"`: a site-specific script decides; exit code 0 is passing. The child is
//! killed (with its process group) when the check's timeout or the agent's shutdown comes.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Outcome;
use crate::exec::command::{self, CommandError};

pub async fn probe(argv: &[String], timeout: Duration, cancel: &CancellationToken) -> Outcome {
    match command::run(argv, timeout, cancel).await {
        Ok(out) if out.success() => Outcome::Pass(out.summary()),
        Ok(out) => Outcome::Fail(out.summary()),
        Err(e @ (CommandError::TimedOut { .. } | CommandError::Cancelled)) => {
            Outcome::Unknown(e.to_string())
        }
        Err(e) => Outcome::Fail(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn exit_code_decides() {
        let c = CancellationToken::new();
        assert!(matches!(
            probe(&argv(&["true"]), Duration::from_secs(5), &c).await,
            Outcome::Pass(_)
        ));
        assert!(matches!(
            probe(&argv(&["false"]), Duration::from_secs(5), &c).await,
            Outcome::Fail(_)
        ));
        assert!(matches!(
            probe(&argv(&["sleep", "10"]), Duration::from_millis(100), &c).await,
            Outcome::Unknown(_)
        ));
    }
}
