//! What the agent can be asked to do: one handler per `pb::Action` variant, plus a registry
//! of `Generic` verbs.
//!
//! Why a closed set: the coordinator may only name what this host's config allows (checks,
//! services, hooks, smoke tests, `[[actions]]`), never send a command line, so a compromised
//! or confused coordinator cannot run arbitrary code here. `Generic{verb}` is the escape
//! hatch for capabilities that land before their typed proto message; verbs are registered
//! by the modules that implement them (e.g. `crate::backup` registers `backup`,
//! `wal-status`) through [`Registry::register`], and unknown verbs are refused by name.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use dr_proto::pb;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::Health;

pub mod exec;
pub mod maintenance;
pub mod run_checks;
pub mod service;
pub mod smoke;

/// What an action produced; becomes the `CommandResult` (key, host and duration are added by
/// the executor).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActionOutput {
    pub success: bool,
    pub message: String,
    pub details: HashMap<String, String>,
    pub checks: Vec<pb::CheckResult>,
}

impl ActionOutput {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            success: true,
            message: message.into(),
            ..Default::default()
        }
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            success: false,
            message: message.into(),
            ..Default::default()
        }
    }
    pub fn with_detail(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.details.insert(k.into(), v.into());
        self
    }
}

/// Sends `CommandProgress` for one command (dropped silently while no session is open:
/// progress is advisory, the result is what counts).
#[derive(Clone)]
pub struct Progress {
    key: String,
    tx: Option<tokio::sync::mpsc::Sender<pb::AgentMessage>>,
}

impl Progress {
    pub fn new(
        key: impl Into<String>,
        tx: Option<tokio::sync::mpsc::Sender<pb::AgentMessage>>,
    ) -> Self {
        Self {
            key: key.into(),
            tx,
        }
    }

    pub fn report(&self, message: impl Into<String>, done: u64, total: u64) {
        if let Some(tx) = &self.tx {
            let msg = pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Progress(pb::CommandProgress {
                    key: self.key.clone(),
                    message: message.into(),
                    done,
                    total,
                })),
            };
            let _dropped_when_full = tx.try_send(msg);
        }
    }
}

/// Everything one running command gets.
#[derive(Clone)]
pub struct ActionCtx {
    pub key: String,
    /// Fires on `CancelCommand`, on the deadline and at agent shutdown.
    pub cancel: CancellationToken,
    pub progress: Progress,
}

pub type ActionFuture = Pin<Box<dyn Future<Output = ActionOutput> + Send>>;

/// A handler for a `Generic` verb.
pub trait VerbHandler: Send + Sync {
    fn call(&self, args: HashMap<String, String>, ctx: ActionCtx) -> ActionFuture;
}

impl<F, Fut> VerbHandler for F
where
    F: Fn(HashMap<String, String>, ActionCtx) -> Fut + Send + Sync,
    Fut: Future<Output = ActionOutput> + Send + 'static,
{
    fn call(&self, args: HashMap<String, String>, ctx: ActionCtx) -> ActionFuture {
        Box::pin(self(args, ctx))
    }
}

/// `Generic` verbs known to this agent.
#[derive(Default, Clone)]
pub struct Registry {
    verbs: BTreeMap<String, Arc<dyn VerbHandler>>,
}

impl Registry {
    /// Registers `verb`; a second registration of the same verb replaces the first.
    pub fn register(
        &mut self,
        verb: impl Into<String>,
        handler: impl VerbHandler + 'static,
    ) -> &mut Self {
        self.verbs.insert(verb.into(), Arc::new(handler));
        self
    }

    pub fn verbs(&self) -> Vec<String> {
        self.verbs.keys().cloned().collect()
    }

    pub async fn call(
        &self,
        verb: &str,
        args: HashMap<String, String>,
        ctx: ActionCtx,
    ) -> ActionOutput {
        match self.verbs.get(verb) {
            Some(h) => h.call(args, ctx).await,
            None => {
                let known = if self.verbs.is_empty() {
                    "none".to_string()
                } else {
                    self.verbs().join(", ")
                };
                ActionOutput::failed(format!("unknown verb `{verb}`; this agent knows: {known}"))
            }
        }
    }
}

/// Registers the security-response verbs (DRP scenario 3): `isolate`, `unisolate`
/// ([`crate::isolate`]), `rotate-credentials` ([`crate::rotate`]), `security-monitoring`
/// ([`crate::integrity`]).
pub fn register_security(
    reg: &mut Registry,
    config: &Arc<Config>,
    integrity: crate::integrity::IntegrityMonitor,
) {
    crate::isolate::register(reg, config.clone(), crate::isolate::Nft::system());
    crate::rotate::register(reg, config);
    crate::integrity::register(reg, integrity);
}

/// Dispatches actions to their handlers.
#[derive(Clone)]
pub struct Actions {
    config: Arc<Config>,
    health: Health,
    registry: Arc<Registry>,
}

impl Actions {
    pub fn new(config: Arc<Config>, health: Health, registry: Registry) -> Self {
        Self {
            config,
            health,
            registry: Arc::new(registry),
        }
    }

    /// A short name of the action, for logs, metrics and the command record.
    pub fn name_of(action: Option<&pb::Action>) -> String {
        use pb::action::Kind;
        match action.and_then(|a| a.kind.as_ref()) {
            None => "unknown".into(),
            Some(Kind::RunChecks(_)) => "run_checks".into(),
            Some(Kind::Service(_)) => "service".into(),
            Some(Kind::Maintenance(_)) => "maintenance".into(),
            Some(Kind::SmokeTest(_)) => "smoke_test".into(),
            Some(Kind::Exec(_)) => "exec".into(),
            Some(Kind::Generic(g)) => format!("generic:{}", g.verb),
        }
    }

    pub async fn run(&self, action: Option<&pb::Action>, ctx: ActionCtx) -> ActionOutput {
        use pb::action::Kind;
        match action.and_then(|a| a.kind.as_ref()) {
            // An unset oneof is what a newer coordinator's unknown variant decodes to.
            None => ActionOutput::failed(
                "unknown action variant (not set or newer than this agent); upgrade the agent to run it",
            ),
            Some(Kind::RunChecks(rc)) => run_checks::run(&self.health, &rc.names, &ctx).await,
            Some(Kind::Service(sc)) => service::run(&self.config, sc, &ctx).await,
            Some(Kind::Maintenance(m)) => maintenance::run(&self.config.maintenance, m, &ctx).await,
            Some(Kind::SmokeTest(st)) => {
                smoke::run(&self.config.smoke_tests, &st.names, &ctx).await
            }
            Some(Kind::Exec(e)) => exec::run(&self.config.actions, e, &ctx).await,
            Some(Kind::Generic(g)) => self.registry.call(&g.verb, g.args.clone(), ctx).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ActionCtx {
        ActionCtx {
            key: "k".into(),
            cancel: CancellationToken::new(),
            progress: Progress::new("k", None),
        }
    }

    #[tokio::test]
    async fn registry_dispatches_and_refuses_unknown_verbs() {
        let mut reg = Registry::default();
        reg.register(
            "echo",
            |args: HashMap<String, String>, _ctx: ActionCtx| async move {
                ActionOutput::ok(args.get("say").cloned().unwrap_or_default())
            },
        );
        let mut args = HashMap::new();
        args.insert("say".to_string(), "hi".to_string());
        assert_eq!(reg.call("echo", args, ctx()).await, ActionOutput::ok("hi"));
        let out = reg.call("backup", HashMap::new(), ctx()).await;
        assert!(!out.success);
        assert!(
            out.message.contains("unknown verb `backup`"),
            "{}",
            out.message
        );
    }
}
