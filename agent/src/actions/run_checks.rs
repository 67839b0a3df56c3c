//! `RunChecks`: run the named checks (all when none are named) now, not at their next tick;
//! used by plans to confirm a state before and after a step.

use dr_proto::pb;

use super::{ActionCtx, ActionOutput};
use crate::health::Health;

pub async fn run(health: &Health, names: &[String], ctx: &ActionCtx) -> ActionOutput {
    match health.run_now(names, &ctx.cancel).await {
        Err(e) => ActionOutput::failed(e.to_string()),
        Ok(checks) => {
            let failing: Vec<&str> = checks
                .iter()
                .filter(|c| c.state != pb::CheckState::Passing as i32)
                .map(|c| c.name.as_str())
                .collect();
            let mut out = if failing.is_empty() {
                ActionOutput::ok(format!("{} checks passing", checks.len()))
            } else {
                ActionOutput::failed(format!("not passing: {}", failing.join(", ")))
            };
            out.checks = checks;
            out
        }
    }
}
