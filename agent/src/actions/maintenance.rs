//! `MaintenanceMode`: run the `[maintenance] on` (or `off`) hooks in order, stopping at the
//! first failure (the DRP's enable-maintenance-mode: a half-applied maintenance mode must be
//! visible, not papered over by later hooks).

use dr_proto::pb;

use super::exec::run_argv;
use super::{ActionCtx, ActionOutput};
use crate::config::MaintenanceSpec;

pub async fn run(
    spec: &MaintenanceSpec,
    req: &pb::MaintenanceMode,
    ctx: &ActionCtx,
) -> ActionOutput {
    let (which, hooks) = if req.enabled {
        ("on", &spec.on)
    } else {
        ("off", &spec.off)
    };
    if hooks.is_empty() {
        return ActionOutput::failed(format!(
            "no [maintenance] {which} hooks are configured on this host"
        ));
    }
    let total = hooks.len() as u64;
    for (i, hook) in hooks.iter().enumerate() {
        ctx.progress.report(
            format!("maintenance {which}: hook {} of {total}", i + 1),
            i as u64,
            total,
        );
        let out = run_argv(hook, spec.timeout, ctx).await;
        if !out.success {
            return ActionOutput::failed(format!(
                "maintenance {which}: hook {} ({}) failed: {}",
                i + 1,
                hook[0],
                out.message
            ))
            .with_detail("failed_hook", (i + 1).to_string());
        }
    }
    ActionOutput::ok(format!("maintenance {which}: {total} hooks ran"))
        .with_detail("reason", req.reason.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::Progress;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn stops_at_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("third-ran");
        let spec = MaintenanceSpec {
            on: vec![
                vec!["true".into()],
                vec!["false".into()],
                vec!["touch".into(), marker.display().to_string()],
            ],
            off: vec![],
            timeout: std::time::Duration::from_secs(5),
        };
        let ctx = ActionCtx {
            key: "k".into(),
            cancel: CancellationToken::new(),
            progress: Progress::new("k", None),
        };
        let out = run(
            &spec,
            &pb::MaintenanceMode {
                enabled: true,
                reason: "drill".into(),
            },
            &ctx,
        )
        .await;
        assert!(!out.success);
        assert!(out.message.contains("hook 2"), "{}", out.message);
        assert!(std::fs::metadata(&marker).is_err());
        let out = run(
            &spec,
            &pb::MaintenanceMode {
                enabled: false,
                reason: String::new(),
            },
            &ctx,
        )
        .await;
        assert!(!out.success);
    }
}
