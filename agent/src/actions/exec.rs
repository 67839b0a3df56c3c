//! `Exec`: run a named command from `[[actions]]`. Only names configured on this host run;
//! `args` from the wire are appended only where the action says `allow_args = true`.

use dr_proto::pb;

use super::{ActionCtx, ActionOutput};
use crate::config::ActionSpec;
use crate::exec::command;

pub async fn run(actions: &[ActionSpec], req: &pb::Exec, ctx: &ActionCtx) -> ActionOutput {
    let Some(spec) = actions.iter().find(|a| a.name == req.name) else {
        let known: Vec<&str> = actions.iter().map(|a| a.name.as_str()).collect();
        return ActionOutput::failed(format!(
            "no action named `{}` in this host's [[actions]] (configured: {})",
            req.name,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ));
    };
    if !req.args.is_empty() && !spec.allow_args {
        return ActionOutput::failed(format!(
            "action `{}` takes no arguments (set allow_args = true to allow them)",
            spec.name
        ));
    }
    let mut argv = spec.command.clone();
    argv.extend(req.args.iter().cloned());
    run_argv(&argv, spec.timeout, ctx).await
}

/// Runs one command line and turns its exit into an output (shared by the other actions).
pub async fn run_argv(
    argv: &[String],
    timeout: std::time::Duration,
    ctx: &ActionCtx,
) -> ActionOutput {
    match command::run(argv, timeout, &ctx.cancel).await {
        Ok(out) => {
            let code = out
                .code
                .map_or_else(|| "signal".to_string(), |c| c.to_string());
            let res = if out.success() {
                ActionOutput::ok(out.summary())
            } else {
                ActionOutput::failed(out.summary())
            };
            res.with_detail("exit_code", code)
                .with_detail("stdout_tail", tail(&out.stdout))
                .with_detail("duration_ms", out.duration.as_millis().to_string())
        }
        Err(e) => ActionOutput::failed(e.to_string()),
    }
}

fn tail(s: &str) -> String {
    const MAX: usize = 1024;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut start = s.len() - MAX;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}
