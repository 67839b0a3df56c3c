//! `SmokeTest`: the DRP's run-smoke-tests after a failover or restore, from the host's own
//! `[[smoke_tests]]` (all when none are named). Each test's outcome is returned as a
//! `CheckResult` so drctl can show them like checks.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dr_proto::pb;

use super::{ActionCtx, ActionOutput};
use crate::config::SmokeTestSpec;
use crate::health::Prober;

pub async fn run(tests: &[SmokeTestSpec], names: &[String], ctx: &ActionCtx) -> ActionOutput {
    let selected: Vec<&SmokeTestSpec> = if names.is_empty() {
        tests.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            match tests.iter().find(|t| &t.name == n) {
                Some(t) => v.push(t),
                None => {
                    return ActionOutput::failed(format!(
                        "no smoke test named `{n}` in this host's [[smoke_tests]]"
                    ));
                }
            }
        }
        v
    };
    if selected.is_empty() {
        return ActionOutput::failed("no smoke tests are configured on this host");
    }
    let total = selected.len() as u64;
    let mut results = Vec::with_capacity(selected.len());
    for (i, t) in selected.iter().enumerate() {
        ctx.progress
            .report(format!("smoke test {}", t.name), i as u64, total);
        let started = Instant::now();
        let mut prober = Prober::new(t.probe.clone(), Duration::ZERO);
        let outcome = prober.run(t.timeout, &ctx.cancel).await;
        prober.close().await;
        results.push(pb::CheckResult {
            name: t.name.clone(),
            service: String::new(),
            tier: pb::Tier::Unspecified as i32,
            state: outcome.state() as i32,
            detail: outcome.detail().to_string(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            observed_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        });
        if ctx.cancel.is_cancelled() {
            break;
        }
    }
    let failing: Vec<&str> = results
        .iter()
        .filter(|r| r.state != pb::CheckState::Passing as i32)
        .map(|r| r.name.as_str())
        .collect();
    let mut out = if failing.is_empty() {
        ActionOutput::ok(format!("{} smoke tests passed", results.len()))
    } else {
        ActionOutput::failed(format!("smoke tests failed: {}", failing.join(", ")))
    };
    out.checks = results;
    out
}
