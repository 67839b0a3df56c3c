//! `drctl run ACTION`: issue one command per selected agent and follow each to its result.
//!
//! Why it streams: an action over fifty hosts must show progress as it happens (issued,
//! acknowledged, progress, result per host) rather than after the slowest host. Each
//! invocation carries a fresh `request_id`, so if drctl retries the call at another
//! coordinator (the first died mid-call) the cluster recognises it and does not issue the
//! commands twice.
//!
//! Exit status: 0 when every host succeeded, 1 when any failed or never reported.

use std::collections::{BTreeMap, HashMap};

use dr_proto::pb;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::cli::{ActionCmd, OnOff, RunArgs, ServiceOp};
use crate::client::{Client, map_status};
use crate::output::{OutputFormat, check_state_name};

/// Some host failed or did not report (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} hosts failed{}", if .missing.is_empty() { String::new() } else { format!("; no result from {}", .missing.join(", ")) })]
pub struct ActionFailed {
    pub failed: usize,
    pub total: usize,
    pub missing: Vec<String>,
}

pub fn action_of(cmd: &ActionCmd) -> pb::Action {
    use pb::action::Kind;
    let kind = match cmd {
        ActionCmd::Checks { names } => Kind::RunChecks(pb::RunChecks {
            names: names.clone(),
        }),
        ActionCmd::Service { op, name } => Kind::Service(pb::ServiceControl {
            service: name.clone(),
            op: match op {
                ServiceOp::Start => pb::service_control::Op::Start,
                ServiceOp::Stop => pb::service_control::Op::Stop,
                ServiceOp::Restart => pb::service_control::Op::Restart,
                ServiceOp::Status => pb::service_control::Op::Status,
            } as i32,
        }),
        ActionCmd::Maintenance { state, reason } => Kind::Maintenance(pb::MaintenanceMode {
            enabled: matches!(state, OnOff::On),
            reason: reason.clone(),
        }),
        ActionCmd::SmokeTest { names } => Kind::SmokeTest(pb::SmokeTest {
            names: names.clone(),
        }),
        ActionCmd::Exec { name, args } => Kind::Exec(pb::Exec {
            name: name.clone(),
            args: args.clone(),
        }),
        ActionCmd::Verb { name, args } => Kind::Generic(pb::Generic {
            verb: name.clone(),
            args: args.iter().cloned().collect(),
        }),
    };
    pb::Action { kind: Some(kind) }
}

/// One line naming an action: `checks`, `service restart app`, `exec flush-cache`.
pub fn describe_action(action: Option<&pb::Action>) -> String {
    use pb::action::Kind;
    let names = |n: &[String]| {
        if n.is_empty() {
            String::new()
        } else {
            format!(" {}", n.join(" "))
        }
    };
    match action.and_then(|a| a.kind.as_ref()) {
        None => "-".into(),
        Some(Kind::RunChecks(c)) => format!("checks{}", names(&c.names)),
        Some(Kind::Service(s)) => {
            let op = pb::service_control::Op::try_from(s.op)
                .map(|o| o.as_str_name().trim_start_matches("OP_").to_lowercase())
                .unwrap_or_else(|_| "?".into());
            format!("service {op} {}", s.service)
        }
        Some(Kind::Maintenance(m)) => {
            format!("maintenance {}", if m.enabled { "on" } else { "off" })
        }
        Some(Kind::SmokeTest(s)) => format!("smoke-test{}", names(&s.names)),
        Some(Kind::Exec(e)) => format!("exec {}{}", e.name, names(&e.args)),
        Some(Kind::Generic(g)) => {
            // Argument names only: values may be secrets (certificates, keys).
            let mut keys: Vec<&String> = g.args.keys().collect();
            keys.sort();
            let keys: Vec<String> = keys.into_iter().map(|k| format!("{k}=…")).collect();
            format!("{}{}", g.verb, names(&keys))
        }
    }
}

pub async fn run(client: &Client, args: RunArgs, format: OutputFormat) -> anyhow::Result<()> {
    let req = pb::RunActionRequest {
        selector: Some(pb::Selector {
            hosts: args.hosts,
            region: args.region.unwrap_or_default(),
            role: args.role.unwrap_or_default(),
            site: args.site.unwrap_or_default(),
        }),
        action: Some(action_of(&args.action)),
        timeout_ms: u64::try_from(args.timeout.as_millis()).unwrap_or(u64::MAX),
        wait: !args.no_wait,
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    let what = describe_action(req.action.as_ref());
    tracing::info!(request_id = %req.request_id, action = %what, "running action");
    // Only the leader sees the agents' acks, progress and results.
    let client = client.prefer_leader().await?;
    let mut stream = client
        .call("run", |mut c| {
            let req = req.clone();
            async move { c.run_action(req).await }
        })
        .await?;

    let mut follow = Follow::new(format, !args.no_wait, req.request_id.clone());
    loop {
        match stream.message().await {
            Ok(Some(event)) => follow.event(&event),
            Ok(None) => break,
            Err(status) => {
                follow.finish_bars();
                let e = map_status("run", "", &status);
                anyhow::bail!(
                    "lost the event stream ({e}); the commands keep running on the agents: \
                     follow them with `drctl commands list`"
                );
            }
        }
    }
    follow.finish(&what)
}

/// Per-host state of one `run`.
#[derive(Default)]
struct HostState {
    key: String,
    result: Option<bool>,
}

struct Follow {
    format: OutputFormat,
    wait: bool,
    request_id: String,
    hosts: BTreeMap<String, HostState>,
    bars: HashMap<String, ProgressBar>,
    multi: MultiProgress,
}

impl Follow {
    fn new(format: OutputFormat, wait: bool, request_id: String) -> Self {
        Self {
            format,
            wait,
            request_id,
            hosts: BTreeMap::new(),
            bars: HashMap::new(),
            multi: MultiProgress::new(),
        }
    }

    fn say(&self, line: String) {
        // Print above live progress bars so they are not torn; plainly otherwise (a hidden
        // MultiProgress, e.g. when stdout is not a terminal, would swallow the line).
        if self.bars.is_empty() || self.multi.is_hidden() || self.multi.println(&line).is_err() {
            println!("{line}");
        }
    }

    fn event(&mut self, ev: &pb::ActionEvent) {
        use pb::action_event::Event;
        let state = self.hosts.entry(ev.host_id.clone()).or_default();
        if state.key.is_empty() {
            state.key = ev.key.clone();
        }
        if self.format == OutputFormat::Json {
            if let Some(Event::Result(r)) = &ev.event {
                state.result = Some(r.success);
            }
            // One JSON object per line (NDJSON), so a script can follow the stream.
            println!("{}", serde_json::to_string(ev).unwrap_or_default());
            return;
        }
        let host = ev.host_id.as_str();
        match &ev.event {
            None => {}
            Some(Event::Issued(i)) => self.say(format!(
                "{host:<14} issued    {} (log index {})",
                ev.key, i.log_index
            )),
            Some(Event::Acked(_)) => self.say(format!("{host:<14} acked")),
            Some(Event::Progress(p)) if p.total > 0 => {
                let bar = self.bars.entry(host.to_string()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new(p.total));
                    let style =
                        ProgressStyle::with_template("{prefix:<14} [{bar:30}] {pos}/{len} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar());
                    bar.set_style(style.progress_chars("=> "));
                    bar.set_prefix(host.to_string());
                    bar
                });
                bar.set_length(p.total);
                bar.set_position(p.done);
                bar.set_message(p.message.clone());
            }
            Some(Event::Progress(p)) => self.say(format!("{host:<14} progress  {}", p.message)),
            Some(Event::Result(r)) => {
                state.result = Some(r.success);
                if let Some(bar) = self.bars.remove(host) {
                    bar.finish_and_clear();
                }
                let verdict = if r.success { "ok" } else { "FAILED" };
                self.say(format!(
                    "{host:<14} {verdict:<9} {} ({} ms)",
                    r.message, r.duration_ms
                ));
                for c in &r.checks {
                    self.say(format!(
                        "{:<14}   {:<8} {} {}",
                        "",
                        check_state_name(c.state),
                        c.name,
                        if c.detail.is_empty() {
                            String::new()
                        } else {
                            format!("- {}", c.detail)
                        }
                    ));
                }
                let mut details: Vec<_> = r.details.iter().collect();
                details.sort();
                for (k, v) in details {
                    self.say(format!("{:<14}   {k} = {v}", ""));
                }
            }
        }
    }

    fn finish_bars(&mut self) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
        }
    }

    fn finish(mut self, what: &str) -> anyhow::Result<()> {
        self.finish_bars();
        let total = self.hosts.len();
        if total == 0 {
            // The coordinator refuses an empty selection itself, so this is a stream that
            // ended before its first event.
            anyhow::bail!(
                "the coordinator sent no event for this run (request id {}); the commands may \
                 still have been issued: check `drctl commands list --pending`",
                self.request_id
            );
        }
        if !self.wait {
            if self.format == OutputFormat::Text {
                println!(
                    "issued {what} to {total} hosts; follow with `drctl commands list --pending`"
                );
            }
            return Ok(());
        }
        let failed = self
            .hosts
            .values()
            .filter(|h| h.result == Some(false))
            .count();
        let missing: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.result.is_none())
            .map(|(host, _)| host.clone())
            .collect();
        if self.format == OutputFormat::Text {
            println!(
                "{what}: {} of {total} hosts ok",
                total - failed - missing.len()
            );
        }
        if failed > 0 || !missing.is_empty() {
            return Err(ActionFailed {
                failed: failed + missing.len(),
                total,
                missing,
            }
            .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_become_generic_actions_described_without_values() {
        let a = action_of(&ActionCmd::Verb {
            name: "rotate-credentials".into(),
            args: vec![
                ("scope".into(), "db".into()),
                ("key_pem".into(), "SECRET".into()),
            ],
        });
        let Some(pb::action::Kind::Generic(g)) = &a.kind else {
            panic!("not generic")
        };
        assert_eq!(g.verb, "rotate-credentials");
        assert_eq!(g.args.get("scope").map(String::as_str), Some("db"));
        let text = describe_action(Some(&a));
        assert_eq!(text, "rotate-credentials key_pem=… scope=…");
        assert!(!text.contains("SECRET"));
    }

    #[test]
    fn actions_are_described() {
        let a = action_of(&ActionCmd::Service {
            op: ServiceOp::Restart,
            name: "app".into(),
        });
        assert_eq!(describe_action(Some(&a)), "service restart app");
        let a = action_of(&ActionCmd::Checks { names: vec![] });
        assert_eq!(describe_action(Some(&a)), "checks");
        let a = action_of(&ActionCmd::Exec {
            name: "flush".into(),
            args: vec!["--all".into()],
        });
        assert_eq!(describe_action(Some(&a)), "exec flush --all");
        let a = action_of(&ActionCmd::Maintenance {
            state: OnOff::On,
            reason: "drill".into(),
        });
        assert_eq!(describe_action(Some(&a)), "maintenance on");
    }

    #[test]
    fn failures_and_missing_results_fail_the_run() {
        use pb::action_event::Event;
        let mut f = Follow::new(OutputFormat::Text, true, "r".into());
        let result = |ok| {
            Some(Event::Result(pb::CommandResult {
                success: ok,
                ..Default::default()
            }))
        };
        f.event(&pb::ActionEvent {
            key: "k1".into(),
            host_id: "a".into(),
            event: result(true),
        });
        f.event(&pb::ActionEvent {
            key: "k2".into(),
            host_id: "b".into(),
            event: Some(Event::Issued(pb::Issued::default())),
        });
        let err = f.finish("checks").unwrap_err();
        assert_eq!(err.to_string(), "1 of 2 hosts failed; no result from b");
        let mut f = Follow::new(OutputFormat::Text, true, "r".into());
        f.event(&pb::ActionEvent {
            key: "k1".into(),
            host_id: "a".into(),
            event: result(true),
        });
        f.finish("checks").unwrap();
        assert!(
            Follow::new(OutputFormat::Text, true, "r".into())
                .finish("checks")
                .is_err()
        );
    }
}
