//! `ServiceControl`: start/stop/restart/status of a configured service, through `systemctl`
//! for a systemd unit or through the service's own commands. Only `[[services]]` named in the
//! config can be touched.

use dr_proto::pb;
use pb::service_control::Op;

use super::exec::run_argv;
use super::{ActionCtx, ActionOutput};
use crate::config::{Config, ServiceControl};

pub async fn run(config: &Config, req: &pb::ServiceControl, ctx: &ActionCtx) -> ActionOutput {
    let Some(spec) = config.services.iter().find(|s| s.name == req.service) else {
        return ActionOutput::failed(format!(
            "no service named `{}` in this host's [[services]]",
            req.service
        ));
    };
    let op = match Op::try_from(req.op) {
        Ok(Op::Unspecified) | Err(_) => {
            return ActionOutput::failed(format!("unknown service operation {}", req.op));
        }
        Ok(op) => op,
    };
    let verb = match op {
        Op::Start => "start",
        Op::Stop => "stop",
        Op::Restart => "restart",
        Op::Status | Op::Unspecified => "status",
    };
    let out = match &spec.control {
        ServiceControl::Unit(unit) => {
            let argv = if op == Op::Status {
                vec![
                    "systemctl".to_string(),
                    "is-active".to_string(),
                    unit.clone(),
                ]
            } else {
                vec!["systemctl".to_string(), verb.to_string(), unit.clone()]
            };
            run_argv(&argv, spec.timeout, ctx).await
        }
        ServiceControl::Commands {
            start,
            stop,
            restart,
            status,
        } => match op {
            Op::Start => run_argv(start, spec.timeout, ctx).await,
            Op::Stop => run_argv(stop, spec.timeout, ctx).await,
            Op::Restart => match restart {
                Some(r) => run_argv(r, spec.timeout, ctx).await,
                None => {
                    let stopped = run_argv(stop, spec.timeout, ctx).await;
                    if !stopped.success {
                        return ActionOutput::failed(format!(
                            "restart {}: stop failed: {}",
                            spec.name, stopped.message
                        ));
                    }
                    run_argv(start, spec.timeout, ctx).await
                }
            },
            Op::Status | Op::Unspecified => match status {
                Some(s) => run_argv(s, spec.timeout, ctx).await,
                None => {
                    return ActionOutput::failed(format!(
                        "service `{}` has no status command",
                        spec.name
                    ));
                }
            },
        },
    };
    let message = format!("{verb} {}: {}", spec.name, out.message);
    ActionOutput { message, ..out }
        .with_detail("service", spec.name.clone())
        .with_detail("op", verb)
}
