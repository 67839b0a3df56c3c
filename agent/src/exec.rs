//! Executes coordinator commands exactly once per idempotency key.
//!
//! ```text
//! Command{key} ─┬─ known, done    → resend the stored CommandResult
//!               ├─ known, running → CommandAck (the result follows when done)
//!               └─ new            → [epoch check] → persist `running` → CommandAck
//!                                   → run (deadline, CancelCommand, shutdown)
//!                                   → persist result → CommandResult
//! ```
//! Why persist before acking and before running: an ack tells the coordinator "this key is
//! mine now"; if the agent then dies, the record says it was running and the restarted agent
//! reports it failed instead of running it a second time (see [`idempotency`]).
//!
//! Outgoing messages go into one queue that the session drains; the queue outlives any single
//! session, so results produced while disconnected go out on the next one. Results are also
//! resent from the record after each reconnect until handed to a stream ([`Executor::unreported`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dr_proto::pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::actions::{ActionCtx, ActionOutput, Actions, Progress};
use crate::metrics::Metrics;

pub mod command;
pub mod idempotency;

use idempotency::{IdempotencyError, IdempotencyStore, Lookup, now_unix_ms};

/// Capacity of the outgoing queue. Progress is dropped when it is full; acks and results wait.
pub const OUTBOX_CAPACITY: usize = 1024;

struct Inner {
    store: Mutex<IdempotencyStore>,
    running: Mutex<HashMap<String, CancellationToken>>,
    actions: Actions,
    host_id: String,
    metrics: Arc<Metrics>,
    outbox: mpsc::Sender<pb::AgentMessage>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// Cheap to clone; all clones share one record and one set of running commands.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn msg(m: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

impl Executor {
    /// Opens the record in `data_dir` and returns the executor with the receiving end of its
    /// outgoing queue (for the session). Commands run on `tasks` and are cancelled by `cancel`.
    pub fn open(
        data_dir: &std::path::Path,
        host_id: &str,
        actions: Actions,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Result<(Self, mpsc::Receiver<pb::AgentMessage>), IdempotencyError> {
        let (store, interrupted) = IdempotencyStore::open(data_dir, host_id)?;
        for key in &interrupted {
            warn!(key = %key, "command was running when the agent stopped; reporting it failed, not re-running it");
        }
        let (outbox, rx) = mpsc::channel(OUTBOX_CAPACITY);
        let inner = Inner {
            store: Mutex::new(store),
            running: Mutex::new(HashMap::new()),
            actions,
            host_id: host_id.to_string(),
            metrics,
            outbox,
            tasks,
            cancel,
        };
        Ok((
            Self {
                inner: Arc::new(inner),
            },
            rx,
        ))
    }

    /// Keys for `Hello.known_keys`.
    pub fn known_keys(&self) -> Vec<String> {
        lock(&self.inner.store).known_keys()
    }

    /// Results not yet handed to a session stream (resent after a reconnect).
    pub fn unreported(&self) -> Vec<pb::CommandResult> {
        lock(&self.inner.store).unreported()
    }

    /// The session calls this once a result has been written to its stream.
    pub fn mark_reported(&self, key: &str) {
        lock(&self.inner.store).mark_reported(key);
    }

    async fn send(&self, m: pb::agent_message::Msg) {
        // The receiver lives as long as the agent; an error only means we are shutting down.
        let _closing = self.inner.outbox.send(msg(m)).await;
    }

    async fn send_result(&self, r: pb::CommandResult) {
        self.send(pb::agent_message::Msg::Result(r)).await;
    }

    fn failed(&self, key: &str, message: impl Into<String>) -> pb::CommandResult {
        pb::CommandResult {
            key: key.to_string(),
            success: false,
            message: message.into(),
            host_id: self.inner.host_id.clone(),
            ..Default::default()
        }
    }

    /// Handles one `Command` from the coordinator. Returns once the command is acknowledged
    /// (its work continues on the tracker).
    pub async fn handle_command(&self, cmd: pb::Command) {
        let key = cmd.key.clone();
        if key.is_empty() {
            warn!("command without an idempotency key refused");
            return;
        }
        let action_name = Actions::name_of(cmd.action.as_ref());
        // The decision and its fsync run on the blocking pool, under one lock, so two copies
        // of the same key arriving together cannot both start.
        let decided = {
            let this = self.clone();
            let (cmd, action_name) = (cmd.clone(), action_name.clone());
            tokio::task::spawn_blocking(move || this.decide(&cmd, &action_name)).await
        };
        let deadline = match decided {
            Ok(Decision::Reply(m)) => {
                self.send(*m).await;
                return;
            }
            Ok(Decision::Start { deadline }) => deadline,
            Err(e) => {
                error!(key = %key, "command decision task failed: {e}");
                return;
            }
        };
        self.send(pb::agent_message::Msg::Ack(pb::CommandAck {
            key: key.clone(),
        }))
        .await;

        let token = self.inner.cancel.child_token();
        lock(&self.inner.running).insert(key.clone(), token.clone());
        let this = self.clone();
        let span = info_span!("command", key = %key, action = %action_name);
        self.inner.tasks.spawn(
            async move {
                info!("command started");
                let started = Instant::now();
                let ctx = ActionCtx {
                    key: key.clone(),
                    cancel: token.clone(),
                    progress: Progress::new(key.clone(), Some(this.inner.outbox.clone())),
                };
                let work = this.inner.actions.run(cmd.action.as_ref(), ctx);
                let out = tokio::select! {
                    out = work => out,
                    () = sleep_opt(deadline) => {
                        token.cancel();
                        ActionOutput::failed("deadline exceeded; the command was stopped")
                    }
                };
                // A command stopped by agent shutdown says so (the coordinator may retry it
                // under a new key); other cancellations keep their handler's message.
                let was_cancelled = lock(&this.inner.running).remove(&key).is_some_and(|t| t.is_cancelled());
                let out = if was_cancelled && !out.success && this.inner.cancel.is_cancelled() {
                    ActionOutput::failed(format!("stopped by agent shutdown: {}", out.message))
                } else {
                    out
                };
                let elapsed = started.elapsed();
                this.inner.metrics.observe_command(&action_name, out.success, elapsed.as_secs_f64());
                let result = pb::CommandResult {
                    key: key.clone(),
                    success: out.success,
                    message: out.message,
                    details: out.details,
                    checks: out.checks,
                    duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                    host_id: this.inner.host_id.clone(),
                };
                if result.success {
                    info!(duration_ms = result.duration_ms, "command succeeded");
                } else {
                    warn!(duration_ms = result.duration_ms, message = %result.message, "command failed");
                }
                let recorded = {
                    let (this, result) = (this.clone(), result.clone());
                    tokio::task::spawn_blocking(move || lock(&this.inner.store).finish(result)).await
                };
                match recorded {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => error!("failed to record command result: {e}"),
                    Err(e) => error!("failed to record command result: {e}"),
                }
                this.send_result(result).await;
            }
            .instrument(span),
        );
    }

    /// Decides what to do with a command, recording whatever must be durable first. Blocking
    /// (fsync): call it on the blocking pool.
    fn decide(&self, cmd: &pb::Command, action_name: &str) -> Decision {
        let key = &cmd.key;
        let mut store = lock(&self.inner.store);
        match store.lookup(key) {
            Lookup::Done(result) => {
                info!(key = %key, "command already done, resending its result");
                return Decision::Reply(Box::new(pb::agent_message::Msg::Result(result)));
            }
            Lookup::Running => {
                return Decision::Reply(Box::new(pb::agent_message::Msg::Ack(pb::CommandAck {
                    key: key.clone(),
                })));
            }
            Lookup::New => {}
        }
        // Fencing epochs first: a stale command is recorded as refused, never run.
        let refusal = match store.check_epoch(&cmd.db_cluster, cmd.epoch) {
            Ok(Ok(())) => None,
            Ok(Err(seen)) => Some(format!(
                "refused: epoch {} of cluster {} is older than epoch {seen} already seen",
                cmd.epoch, cmd.db_cluster
            )),
            Err(e) => Some(format!("refused: cannot record the fencing epoch: {e}")),
        };
        let left = (cmd.deadline_unix_ms > 0).then(|| cmd.deadline_unix_ms - now_unix_ms());
        let refusal = refusal.or_else(|| match left {
            Some(ms) if ms <= 0 => {
                Some("refused: the command's deadline passed before it could start".to_string())
            }
            _ => None,
        });
        if let Some(reason) = refusal {
            warn!(key = %key, action = %action_name, reason = %reason, "command refused");
            let result = self.failed(key, reason);
            if let Err(e) = store.finish(result.clone()) {
                error!(key = %key, "failed to record refused command: {e}");
            }
            return Decision::Reply(Box::new(pb::agent_message::Msg::Result(result)));
        }
        if let Err(e) = store.begin(key, action_name) {
            // Not durable, so not started: the coordinator may retry the same key.
            error!(key = %key, "failed to record command start: {e}");
            return Decision::Reply(Box::new(pb::agent_message::Msg::Result(
                self.failed(key, format!("not started: {e}")),
            )));
        }
        Decision::Start {
            deadline: left.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        }
    }

    /// Handles `CancelCommand`: fires the command's token (its children are killed).
    pub fn cancel(&self, key: &str, reason: &str) {
        match lock(&self.inner.running).get(key) {
            Some(t) => {
                info!(key = %key, reason = %reason, "cancelling command");
                t.cancel();
            }
            None => info!(key = %key, "cancel for a command that is not running ignored"),
        }
    }
}

enum Decision {
    Reply(Box<pb::agent_message::Msg>),
    Start { deadline: Option<Duration> },
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::Registry;
    use crate::config::{ActionSpec, Config};
    use crate::health::Health;
    use pb::agent_message::Msg;

    fn config(dir: &std::path::Path) -> Config {
        let text = format!(
            r#"
version = 1
host_id = "h1"
region = "r"
site = "s"
coordinators = ["127.0.0.1:1"]
data_dir = "{}"
[tls]
ca = "ca.pem"
cert = "c.pem"
key = "c.key"
"#,
            dir.display()
        );
        let mut cfg = Config::parse(&text, std::path::Path::new("agent.toml")).unwrap();
        cfg.actions = vec![
            ActionSpec {
                name: "ok".into(),
                command: vec!["true".into()],
                timeout: Duration::from_secs(5),
                allow_args: false,
            },
            ActionSpec {
                name: "slow".into(),
                command: vec!["sleep".into(), "30".into()],
                timeout: Duration::from_secs(60),
                allow_args: false,
            },
        ];
        cfg
    }

    fn executor(
        dir: &std::path::Path,
    ) -> (Executor, mpsc::Receiver<pb::AgentMessage>, TaskTracker) {
        let cfg = Arc::new(config(dir));
        let metrics = Arc::new(Metrics::new());
        let health = Health::new(&cfg.checks, metrics.clone());
        let actions = Actions::new(cfg.clone(), health, Registry::default());
        let tasks = TaskTracker::new();
        let (ex, rx) = Executor::open(
            dir,
            "h1",
            actions,
            metrics,
            tasks.clone(),
            CancellationToken::new(),
        )
        .unwrap();
        (ex, rx, tasks)
    }

    fn exec_cmd(key: &str, name: &str) -> pb::Command {
        pb::Command {
            key: key.into(),
            action: Some(pb::Action {
                kind: Some(pb::action::Kind::Exec(pb::Exec {
                    name: name.into(),
                    args: vec![],
                })),
            }),
            ..Default::default()
        }
    }

    async fn next(rx: &mut mpsc::Receiver<pb::AgentMessage>) -> Msg {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
            .msg
            .unwrap()
    }

    #[tokio::test]
    async fn runs_once_and_resends_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let (ex, mut rx, _tasks) = executor(dir.path());
        ex.handle_command(exec_cmd("k1", "ok")).await;
        assert!(matches!(next(&mut rx).await, Msg::Ack(a) if a.key == "k1"));
        let Msg::Result(r) = next(&mut rx).await else {
            panic!("expected a result")
        };
        assert!(r.success, "{r:?}");
        ex.handle_command(exec_cmd("k1", "ok")).await;
        assert!(matches!(next(&mut rx).await, Msg::Result(again) if again == r));
    }

    #[tokio::test]
    async fn unknown_variant_and_unknown_name_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let (ex, mut rx, _tasks) = executor(dir.path());
        ex.handle_command(pb::Command {
            key: "k".into(),
            action: None,
            ..Default::default()
        })
        .await;
        let _ack = next(&mut rx).await;
        let Msg::Result(r) = next(&mut rx).await else {
            panic!()
        };
        assert!(
            !r.success && r.message.contains("unknown action variant"),
            "{r:?}"
        );

        ex.handle_command(exec_cmd("k2", "rm -rf /")).await;
        let _ack = next(&mut rx).await;
        let Msg::Result(r) = next(&mut rx).await else {
            panic!()
        };
        assert!(!r.success && r.message.contains("no action named"), "{r:?}");
    }

    #[tokio::test]
    async fn cancel_and_repeat_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let (ex, mut rx, _tasks) = executor(dir.path());
        ex.handle_command(exec_cmd("slow", "slow")).await;
        assert!(matches!(next(&mut rx).await, Msg::Ack(_)));
        ex.handle_command(exec_cmd("slow", "slow")).await;
        assert!(
            matches!(next(&mut rx).await, Msg::Ack(_)),
            "repeat while running is just acked"
        );
        ex.cancel("slow", "operator");
        let Msg::Result(r) = next(&mut rx).await else {
            panic!()
        };
        assert!(!r.success);
        assert!(r.message.contains("cancelled"), "{r:?}");
    }

    #[tokio::test]
    async fn stale_epoch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ex, mut rx, _tasks) = executor(dir.path());
        let mut c = exec_cmd("e1", "ok");
        c.epoch = 7;
        c.db_cluster = "main".into();
        ex.handle_command(c).await;
        let _ack = next(&mut rx).await;
        let _res = next(&mut rx).await;
        let mut c = exec_cmd("e2", "ok");
        c.epoch = 6;
        c.db_cluster = "main".into();
        ex.handle_command(c).await;
        let Msg::Result(r) = next(&mut rx).await else {
            panic!("refusal comes without an ack")
        };
        assert!(
            !r.success && r.message.contains("older than epoch 7"),
            "{r:?}"
        );
    }
}
