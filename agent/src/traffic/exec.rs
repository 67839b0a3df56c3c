//! Run an operator's command with the plan: the escape hatch for anything the other providers do
//! not speak (a cloud CLI, a vendor balancer, a script that repoints a locker-site gateway).
//!
//! The command gets the plan twice, so a shell one-liner and a real program both have it easy:
//! - on stdin, the same JSON body the webhook sends (`{"provider", "plan_digest", "plan"}`);
//! - in the environment: `DR_TRAFFIC_PROVIDER`, `DR_TRAFFIC_DIGEST`, `DR_TRAFFIC_PLAN` (compact
//!   JSON), `DR_TRAFFIC_ACTIVE_REGIONS` (comma-separated), and per region
//!   `DR_TRAFFIC_WEIGHT_<REGION>` (percent) and `DR_TRAFFIC_ENDPOINTS_<REGION>` (comma-separated),
//!   with the region upper-cased and `-` → `_`.
//!
//! Exit 0 is success; anything else is an error carrying the tail of stderr. The command is
//! killed with its whole process group when `timeout` passes (the command alone if the agent
//! drops the future). It must itself be
//! idempotent: we skip a re-apply of the plan this process last applied, but after a restart we
//! run it again with the same `DR_TRAFFIC_DIGEST`.
//!
//! The command inherits the agent's environment plus `env` from the config; the agent keeps no
//! secrets in its environment (they are read from files), so there is nothing to leak.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;
use tokio::sync::Mutex;
use tracing::{debug, info, instrument};

use super::error::{TrafficError, TrafficResult, tail};
use super::outcome::{Applied, Change, TrafficState};
use super::plan::TrafficPlan;
use super::webhook::WebhookBody;

const KIND: &str = "exec";

/// `[[traffic]] kind = "exec"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    pub name: String,
    pub program: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
    #[serde(default = "defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

mod defaults {
    use std::time::Duration;
    pub(super) fn timeout() -> Duration {
        Duration::from_secs(120)
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct ExecProvider {
    cfg: ExecConfig,
    last_applied: Mutex<Option<String>>,
}

impl ExecProvider {
    pub fn from_config(cfg: ExecConfig) -> TrafficResult<Self> {
        let ExecConfig {
            name,
            program,
            args,
            env,
            working_dir,
            timeout,
        } = cfg;
        if program.as_os_str().is_empty() {
            return Err(TrafficError::Config {
                provider: name,
                reason: "program is empty".into(),
            });
        }
        if let Some(k) = env.keys().find(|k| k.starts_with("DR_TRAFFIC_")) {
            return Err(TrafficError::Config {
                provider: name,
                reason: format!("env {k}: the DR_TRAFFIC_ prefix is reserved for the plan"),
            });
        }
        Ok(Self {
            cfg: ExecConfig {
                name,
                program,
                args,
                env,
                working_dir,
                timeout,
            },
            last_applied: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The `DR_TRAFFIC_*` variables for `plan`.
    pub fn plan_env(&self, plan: &TrafficPlan) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert("DR_TRAFFIC_PROVIDER".into(), self.cfg.name.clone());
        env.insert("DR_TRAFFIC_DIGEST".into(), plan.digest());
        env.insert(
            "DR_TRAFFIC_PLAN".into(),
            serde_json::to_string(plan).expect("a plan always serializes"),
        );
        let active: Vec<&str> = plan.active_regions().iter().map(|r| r.as_str()).collect();
        env.insert("DR_TRAFFIC_ACTIVE_REGIONS".into(), active.join(","));
        for (region, rt) in plan.regions() {
            let suffix = region.env_suffix();
            env.insert(
                format!("DR_TRAFFIC_WEIGHT_{suffix}"),
                rt.weight.get().to_string(),
            );
            let eps: Vec<&str> = rt.endpoints.iter().map(|e| e.as_str()).collect();
            env.insert(format!("DR_TRAFFIC_ENDPOINTS_{suffix}"), eps.join(","));
        }
        env
    }

    #[instrument(name = "traffic_apply", skip_all, fields(provider = %self.cfg.name, kind = KIND, program = %self.cfg.program.display(), digest = %plan.digest()))]
    pub(super) async fn apply_plan(&self, plan: &TrafficPlan) -> TrafficResult<Applied> {
        let digest = plan.digest();
        let mut last = self.last_applied.lock().await;
        let applied = |changed, changes| Applied {
            provider: self.cfg.name.clone(),
            kind: KIND.to_owned(),
            plan_digest: digest.clone(),
            changed,
            changes,
            notes: Vec::new(),
        };
        if last.as_deref() == Some(digest.as_str()) {
            debug!("plan already applied by this command");
            return Ok(applied(false, Vec::new()));
        }
        let program = self.cfg.program.clone();
        let stdin_json = serde_json::to_vec(&WebhookBody {
            provider: self.cfg.name.clone(),
            plan_digest: digest.clone(),
            plan: plan.clone(),
        })
        .expect("a plan body always serializes");

        let mut cmd = Command::new(&program);
        cmd.args(&self.cfg.args)
            .envs(&self.cfg.env)
            .envs(self.plan_env(plan))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Own process group, so a timeout kills the whole script, grandchildren included.
            .process_group(0);
        if let Some(dir) = &self.cfg.working_dir {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|source| TrafficError::ExecSpawn {
            program: program.clone(),
            source,
        })?;
        let pgid = child.id().and_then(|id| i32::try_from(id).ok());
        let mut stdin = child.stdin.take().expect("stdin was piped");
        let run = async move {
            // A command that ignores stdin may exit before reading it: a broken pipe is fine.
            let _ignored = stdin.write_all(&stdin_json).await;
            drop(stdin);
            child.wait_with_output().await
        };
        let output = match tokio::time::timeout(self.cfg.timeout, run).await {
            // Dropping the future dropped the child: kill_on_drop has killed it; the rest of
            // its process group goes here.
            Err(_) => {
                if let Some(pgid) = pgid {
                    let _ignored = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pgid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(TrafficError::ExecTimeout {
                    program,
                    timeout: self.cfg.timeout,
                });
            }
            Ok(Err(source)) => return Err(TrafficError::ExecSpawn { program, source }),
            Ok(Ok(out)) => out,
        };
        if !output.status.success() {
            return Err(TrafficError::ExecFailed {
                program,
                status: output.status.to_string(),
                stderr_tail: tail(&String::from_utf8_lossy(&output.stderr), 1000),
            });
        }
        info!("exec hook applied the plan");
        *last = Some(digest.clone());
        Ok(applied(
            true,
            vec![Change::Delivered {
                target: self.cfg.program.display().to_string(),
            }],
        ))
    }

    pub(super) async fn read_state(&self) -> TrafficResult<TrafficState> {
        Ok(TrafficState {
            provider: self.cfg.name.clone(),
            kind: KIND.to_owned(),
            endpoints: Vec::new(),
            last_applied: self.last_applied.lock().await.clone(),
        })
    }
}
