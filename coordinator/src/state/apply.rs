//! `apply`: the one function that changes [`State`].
//!
//! Each command is validated first and refused as a whole (no partial application), then
//! applied; every request, refused or not, appends exactly one audit entry.

use dr_proto::pb;

use super::commands::{CommandRecord, CommandState};
use super::topology::{CheckRecord, Host, HostState, check_state};
use super::{Command, NewCommand, Refusal, Request, Response, State};

/// Applies one committed request. Deterministic: same state, index and request give the
/// same result on every node.
pub fn apply(state: &mut State, log_index: u64, req: &Request) -> Response {
    let at = req.at_unix_ms;
    // A command-specific audit outcome (used unless the request was refused or unchanged).
    let mut outcome: Option<String> = None;
    let (target, resp) = match &req.cmd {
        Command::HostUp {
            host_id,
            region,
            site,
            roles,
            version,
            incarnation,
        } => (
            host_id.clone(),
            host_up(
                state,
                at,
                host_id,
                region,
                site,
                roles,
                version,
                *incarnation,
            ),
        ),
        Command::HostDown { host_id, reason } => {
            (host_id.clone(), host_down(state, at, host_id, reason))
        }
        Command::CheckTransitions { host_id, changes } => (
            host_id.clone(),
            check_transitions(state, at, host_id, changes),
        ),
        Command::IssueCommands { commands } => (
            commands
                .iter()
                .map(|c| {
                    format!(
                        "{}@{} {}",
                        c.key,
                        c.host_id,
                        super::audit::describe_action(&c.action)
                    )
                })
                .collect::<Vec<_>>()
                .join(","),
            issue_commands(state, log_index, at, &req.origin, commands),
        ),
        Command::CommandAcked { key } => (key.clone(), command_acked(state, at, key)),
        Command::CommandCompleted { key, result } => {
            outcome = Some(if result.success {
                "applied: success".to_owned()
            } else {
                "applied: failed".to_owned()
            });
            (key.clone(), command_completed(state, at, key, result))
        }
        Command::CancelCommand { key, reason } => {
            (key.clone(), cancel_command(state, at, key, reason))
        }
        Command::Backup(b) => (b.target(), super::catalog::apply(state, at, &req.origin, b)),
        Command::Ops(o) => (
            o.target(),
            super::operations::apply_ops(state, log_index, at, &req.origin, o),
        ),
        Command::Approvals(c) => {
            let (resp, o) = super::approvals::apply(state, log_index, at, &req.origin, c);
            outcome = o;
            (c.target(), resp)
        }
        Command::Batch { requests } => return apply_batch(state, log_index, requests),
        Command::Security(c) => (
            c.target(),
            super::security::apply(state, log_index, at, &req.origin, c),
        ),
        Command::Incident(c) => (
            c.target(),
            super::incidents::apply(state, at, &req.origin, c),
        ),
        Command::ExpireCommands { now } => {
            let resp = expire_commands(state, *now);
            let target = match &resp {
                Response::Expired { keys } => keys.join(","),
                _ => String::new(),
            };
            (target, resp)
        }
    };
    // A finished command may finish a plan step (same entry: step and command agree).
    match (&req.cmd, &resp) {
        (
            Command::CommandCompleted { key, .. } | Command::CancelCommand { key, .. },
            Response::Applied,
        ) => {
            super::operations::on_command_finished(state, key, at);
        }
        (Command::ExpireCommands { .. }, Response::Expired { keys }) => {
            for k in keys {
                super::operations::on_command_finished(state, k, at);
            }
        }
        _ => {}
    }
    let result = match &resp {
        Response::Unchanged => "unchanged".to_owned(),
        Response::Refused { refusal: r } => format!("refused: {r}"),
        Response::Issued { issued, existing } if issued.is_empty() && !existing.is_empty() => {
            "unchanged".to_owned()
        }
        Response::Expired { keys } if keys.is_empty() => "unchanged".to_owned(),
        _ => "applied".to_owned(),
    };
    let result = outcome
        .filter(|_| !matches!(resp, Response::Refused { .. } | Response::Unchanged))
        .unwrap_or(result);
    state
        .audit
        .append(log_index, at, &req.origin, req.cmd.name(), target, result);
    resp
}

/// A group-committed entry: every request applied in order, each with its own origin, time
/// and audit entry. Only the leader's batcher builds batches, never nested ones.
fn apply_batch(state: &mut State, log_index: u64, requests: &[Request]) -> Response {
    let responses = requests
        .iter()
        .map(|r| match r.cmd {
            Command::Batch { .. } => Response::refused(Refusal::Invalid {
                message: "nested batch".to_owned(),
            }),
            _ => apply(state, log_index, r),
        })
        .collect();
    Response::Batch { responses }
}

#[allow(clippy::too_many_arguments)]
fn host_up(
    state: &mut State,
    at: i64,
    host_id: &str,
    region: &str,
    site: &str,
    roles: &[String],
    version: &str,
    incarnation: u64,
) -> Response {
    if host_id.is_empty() {
        return Response::refused(Refusal::Invalid {
            message: "host_up without a host id".to_owned(),
        });
    }
    let host = state
        .hosts
        .entry(host_id.to_owned())
        .or_insert_with(|| Host {
            host_id: host_id.to_owned(),
            ..Host::default()
        });
    let same = host.state == HostState::Up
        && host.incarnation == incarnation
        && host.region == region
        && host.site == site
        && host.roles == roles
        && host.version == version;
    if same {
        return Response::Unchanged;
    }
    // A restarted agent (new incarnation) starts a new "up" period, as does a host that
    // was down; a mere metadata change (new version, new role) does not.
    if host.state != HostState::Up || host.incarnation != incarnation {
        host.state = HostState::Up;
        host.state_since_unix_ms = at;
        host.down_reason.clear();
    }
    host.incarnation = incarnation;
    region.clone_into(&mut host.region);
    site.clone_into(&mut host.site);
    host.roles = roles.to_vec();
    version.clone_into(&mut host.version);
    Response::Applied
}

fn host_down(state: &mut State, at: i64, host_id: &str, reason: &str) -> Response {
    let Some(host) = state.hosts.get_mut(host_id) else {
        return Response::refused(Refusal::UnknownHost {
            host_id: host_id.to_owned(),
        });
    };
    if host.state == HostState::Down {
        return Response::Unchanged;
    }
    host.state = HostState::Down;
    host.state_since_unix_ms = at;
    reason.clone_into(&mut host.down_reason);
    Response::Applied
}

fn check_transitions(
    state: &mut State,
    at: i64,
    host_id: &str,
    changes: &[pb::CheckResult],
) -> Response {
    let Some(host) = state.hosts.get_mut(host_id) else {
        return Response::refused(Refusal::UnknownHost {
            host_id: host_id.to_owned(),
        });
    };
    if let Some(c) = changes.iter().find(|c| c.name.is_empty()) {
        return Response::refused(Refusal::Invalid {
            message: format!(
                "check of service `{}` on host {host_id} has no name",
                c.service
            ),
        });
    }
    let mut changed = false;
    for c in changes {
        let transitioned = host
            .checks
            .get(&c.name)
            .is_none_or(|old| old.state != check_state(c));
        if transitioned {
            host.checks
                .insert(c.name.clone(), CheckRecord::from_result(c, at));
            changed = true;
        }
    }
    if changed {
        Response::Applied
    } else {
        Response::Unchanged
    }
}

fn issue_commands(
    state: &mut State,
    log_index: u64,
    at: i64,
    origin: &str,
    commands: &[NewCommand],
) -> Response {
    if commands.is_empty() {
        return Response::refused(Refusal::Invalid {
            message: "issue_commands with no commands".to_owned(),
        });
    }
    // Validate everything first: the batch is all or nothing.
    let mut seen = std::collections::BTreeSet::new();
    for c in commands {
        if c.key.is_empty() {
            return Response::refused(Refusal::Invalid {
                message: format!("command for host {} has no key", c.host_id),
            });
        }
        if !seen.insert(c.key.as_str()) {
            return Response::refused(Refusal::Invalid {
                message: format!("key {} appears twice in one batch", c.key),
            });
        }
        if !state.hosts.contains_key(&c.host_id) {
            return Response::refused(Refusal::UnknownHost {
                host_id: c.host_id.clone(),
            });
        }
        if c.action.kind.is_none() {
            return Response::refused(Refusal::Invalid {
                message: format!("command {} has no action", c.key),
            });
        }
        if let Some(existing) = state.commands.get(&c.key)
            && existing.host_id != c.host_id
        {
            return Response::refused(Refusal::KeyConflict {
                key: c.key.clone(),
                host_id: existing.host_id.clone(),
            });
        }
    }
    let mut issued = Vec::new();
    let mut existing = Vec::new();
    for c in commands {
        if state.commands.get(&c.key).is_some() {
            // A retried proposal: the key is the identity, never issue it twice.
            existing.push(c.key.clone());
            continue;
        }
        state.commands.insert(CommandRecord {
            key: c.key.clone(),
            host_id: c.host_id.clone(),
            action: c.action.clone(),
            issued_index: log_index,
            issued_at_unix_ms: at,
            deadline_unix_ms: c.deadline_unix_ms,
            issued_by: origin.to_owned(),
            request_id: c.request_id.clone(),
            state: CommandState::Pending,
            acked_at_unix_ms: None,
            finished_at_unix_ms: None,
            reason: String::new(),
            result: None,
            epoch: 0,
            db_cluster: String::new(),
        });
        issued.push(c.key.clone());
    }
    Response::Issued { issued, existing }
}

fn command_acked(state: &mut State, at: i64, key: &str) -> Response {
    let Some(rec) = state.commands.get_mut(key) else {
        return Response::refused(Refusal::UnknownCommand {
            key: key.to_owned(),
        });
    };
    if rec.state != CommandState::Pending {
        // A repeated or late ack changes nothing.
        return Response::Unchanged;
    }
    rec.state = CommandState::Acked;
    rec.acked_at_unix_ms = Some(at);
    Response::Applied
}

fn command_completed(
    state: &mut State,
    at: i64,
    key: &str,
    result: &pb::CommandResult,
) -> Response {
    let Some(rec) = state.commands.get_mut(key) else {
        return Response::refused(Refusal::UnknownCommand {
            key: key.to_owned(),
        });
    };
    match rec.state {
        CommandState::Pending | CommandState::Acked => {
            let mut result = result.clone();
            key.clone_into(&mut result.key);
            rec.host_id.clone_into(&mut result.host_id);
            let final_state = if result.success {
                CommandState::Done
            } else {
                CommandState::Failed
            };
            if rec.acked_at_unix_ms.is_none() {
                // A result implies the agent had it; record the ack moment for latency.
                rec.acked_at_unix_ms = Some(at);
            }
            rec.result = Some(result);
            state.commands.finish(key, final_state, at);
            Response::Applied
        }
        // Exactly once: a second result for a finished key is ignored.
        CommandState::Done | CommandState::Failed => Response::Unchanged,
        // The agent ran it anyway (it did not see the cancel/deadline in time): keep the
        // final state but remember what happened, once.
        CommandState::Cancelled | CommandState::Expired => {
            if rec.result.is_some() {
                return Response::Unchanged;
            }
            let mut result = result.clone();
            key.clone_into(&mut result.key);
            rec.host_id.clone_into(&mut result.host_id);
            rec.result = Some(result);
            Response::Applied
        }
    }
}

fn cancel_command(state: &mut State, at: i64, key: &str, reason: &str) -> Response {
    let Some(rec) = state.commands.get_mut(key) else {
        return Response::refused(Refusal::UnknownCommand {
            key: key.to_owned(),
        });
    };
    if rec.state.is_finished() {
        return Response::refused(Refusal::AlreadyFinished {
            key: key.to_owned(),
            state: rec.state,
        });
    }
    reason.clone_into(&mut rec.reason);
    state.commands.finish(key, CommandState::Cancelled, at);
    Response::Applied
}

fn expire_commands(state: &mut State, now: i64) -> Response {
    let due: Vec<String> = state
        .commands
        .open()
        .filter(|c| c.deadline_unix_ms <= now)
        .map(|c| c.key.clone())
        .collect();
    let mut keys = Vec::with_capacity(due.len());
    for key in due {
        if let Some(rec) = state.commands.get_mut(&key) {
            rec.reason = format!("deadline {} passed", rec.deadline_unix_ms);
        }
        state.commands.finish(&key, CommandState::Expired, now);
        keys.push(key);
    }
    keys.sort();
    Response::Expired { keys }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::HISTORY_PER_HOST;

    const ORIGIN: &str = "spiffe://test/operator/alice?role=operator";

    fn req(at: i64, cmd: Command) -> Request {
        Request {
            at_unix_ms: at,
            origin: ORIGIN.to_owned(),
            cmd,
        }
    }

    fn up(host: &str, inc: u64) -> Command {
        Command::HostUp {
            host_id: host.into(),
            region: "beijing".into(),
            site: "bj-1".into(),
            roles: vec!["db".into()],
            version: "0.1.0".into(),
            incarnation: inc,
        }
    }

    #[test]
    fn a_batch_applies_each_request_with_its_own_origin_and_audit_entry() {
        let mut s = State::default();
        let mut other = req(2, up("h2", 1));
        other.origin = "spiffe://test/agent/h2".to_owned();
        let batch = req(
            3,
            Command::Batch {
                requests: vec![
                    req(1, up("h1", 1)),
                    other,
                    req(2, up("h1", 1)),
                    req(3, Command::Batch { requests: vec![] }),
                    req(3, Command::CommandAcked { key: "nope".into() }),
                ],
            },
        );
        let resp = apply(&mut s, 7, &batch);
        let Response::Batch { responses } = resp else {
            panic!("expected a batch response, got {resp:?}");
        };
        assert_eq!(responses.len(), 5);
        assert_eq!(responses[0], Response::Applied);
        assert_eq!(responses[1], Response::Applied);
        assert_eq!(
            responses[2],
            Response::Unchanged,
            "same as the first: a repeat"
        );
        assert!(
            matches!(&responses[3], Response::Refused { .. }),
            "nested batch refused"
        );
        assert!(matches!(&responses[4], Response::Refused { .. }));
        assert_eq!(
            s.host("h1").unwrap().state_since_unix_ms,
            1,
            "each keeps its own time"
        );
        let audit = s.audit.entries();
        assert_eq!(
            audit.len(),
            4,
            "one audit entry per request, none for the wrapper"
        );
        assert_eq!(audit[1].origin, "spiffe://test/agent/h2");
        assert!(audit.iter().all(|e| e.log_index == 7));
    }

    fn check(name: &str, st: pb::CheckState) -> pb::CheckResult {
        pb::CheckResult {
            name: name.into(),
            service: "postgres".into(),
            tier: pb::Tier::Critical as i32,
            state: st as i32,
            ..Default::default()
        }
    }

    fn action() -> pb::Action {
        pb::Action {
            kind: Some(pb::action::Kind::RunChecks(pb::RunChecks { names: vec![] })),
        }
    }

    fn new_cmd(key: &str, host: &str, deadline: i64) -> NewCommand {
        NewCommand {
            key: key.into(),
            host_id: host.into(),
            action: action(),
            deadline_unix_ms: deadline,
            request_id: String::new(),
        }
    }

    fn result(ok: bool) -> pb::CommandResult {
        pb::CommandResult {
            success: ok,
            message: if ok { "ok".into() } else { "boom".into() },
            ..Default::default()
        }
    }

    /// Feeds requests in order (log index = position + 1) and returns the responses.
    fn run(state: &mut State, cmds: Vec<(i64, Command)>) -> Vec<Response> {
        let start = state.audit.len() as u64;
        cmds.into_iter()
            .enumerate()
            .map(|(i, (at, c))| apply(state, start + i as u64 + 1, &req(at, c)))
            .collect()
    }

    fn cmd_state(s: &State, key: &str) -> CommandState {
        s.commands.get(key).expect("command exists").state
    }

    #[test]
    fn t10_host_transitions() {
        let mut s = State::default();
        let out = run(
            &mut s,
            vec![
                (100, up("h1", 7)),
                (110, up("h1", 7)),
                (
                    120,
                    Command::HostDown {
                        host_id: "h1".into(),
                        reason: "silent 5s".into(),
                    },
                ),
                (
                    130,
                    Command::HostDown {
                        host_id: "h1".into(),
                        reason: "again".into(),
                    },
                ),
                (140, up("h1", 7)),
                (150, up("h1", 8)),
                (
                    160,
                    Command::HostDown {
                        host_id: "nope".into(),
                        reason: "x".into(),
                    },
                ),
                (
                    170,
                    Command::HostUp {
                        host_id: String::new(),
                        region: String::new(),
                        site: String::new(),
                        roles: vec![],
                        version: String::new(),
                        incarnation: 0,
                    },
                ),
            ],
        );
        assert_eq!(
            out,
            vec![
                Response::Applied,
                Response::Unchanged,
                Response::Applied,
                Response::Unchanged,
                Response::Applied,
                Response::Applied,
                Response::refused(Refusal::UnknownHost {
                    host_id: "nope".into()
                }),
                Response::refused(Refusal::Invalid {
                    message: "host_up without a host id".into()
                }),
            ]
        );
        let h = s.host("h1").unwrap();
        assert_eq!(
            (h.state, h.state_since_unix_ms, h.incarnation),
            (HostState::Up, 150, 8)
        );
        assert_eq!(s.hosts.len(), 1);
    }

    #[test]
    fn t11_host_down_records_reason_and_since() {
        let mut s = State::default();
        run(
            &mut s,
            vec![
                (1, up("h1", 1)),
                (
                    9,
                    Command::HostDown {
                        host_id: "h1".into(),
                        reason: "session gone".into(),
                    },
                ),
            ],
        );
        let h = s.host("h1").unwrap();
        assert_eq!(
            (h.state, h.state_since_unix_ms, h.down_reason.as_str()),
            (HostState::Down, 9, "session gone")
        );
    }

    #[test]
    fn t12_version_change_keeps_up_since() {
        let mut s = State::default();
        let mut v2 = up("h1", 1);
        if let Command::HostUp { version, .. } = &mut v2 {
            *version = "0.2.0".into();
        }
        assert_eq!(
            run(&mut s, vec![(1, up("h1", 1)), (5, v2)]),
            vec![Response::Applied, Response::Applied]
        );
        let h = s.host("h1").unwrap();
        assert_eq!((h.version.as_str(), h.state_since_unix_ms), ("0.2.0", 1));
    }

    #[test]
    fn t20_check_transitions_only_write_changes() {
        use pb::CheckState::{Failing, Passing};
        let mut s = State::default();
        let ct = |changes: Vec<pb::CheckResult>| Command::CheckTransitions {
            host_id: "h1".into(),
            changes,
        };
        let out = run(
            &mut s,
            vec![
                (1, up("h1", 1)),
                (2, ct(vec![check("pg", Passing), check("disk", Passing)])),
                (3, ct(vec![check("pg", Passing)])),
                (4, ct(vec![check("pg", Failing), check("disk", Passing)])),
                (
                    5,
                    Command::CheckTransitions {
                        host_id: "ghost".into(),
                        changes: vec![check("pg", Passing)],
                    },
                ),
                (6, ct(vec![check("", Passing)])),
            ],
        );
        assert_eq!(
            out,
            vec![
                Response::Applied,
                Response::Applied,
                Response::Unchanged,
                Response::Applied,
                Response::refused(Refusal::UnknownHost {
                    host_id: "ghost".into()
                }),
                Response::refused(Refusal::Invalid {
                    message: "check of service `postgres` on host h1 has no name".into()
                }),
            ]
        );
        let h = s.host("h1").unwrap();
        assert_eq!(h.checks["pg"].state, Failing);
        assert_eq!(h.checks["pg"].since_unix_ms, 4);
        assert_eq!(
            h.checks["disk"].since_unix_ms, 2,
            "unchanged check keeps its since"
        );
    }

    #[test]
    fn t30_command_lifecycle_table() {
        // (name, steps after issuing k1 on h1, expected responses, expected final state)
        let done = |k: &str, ok| Command::CommandCompleted {
            key: k.into(),
            result: result(ok),
        };
        let ack = |k: &str| Command::CommandAcked { key: k.into() };
        let cancel = |k: &str| Command::CancelCommand {
            key: k.into(),
            reason: "operator".into(),
        };
        let cases: Vec<(&str, Vec<Command>, Vec<Response>, CommandState)> = vec![
            (
                "ack then done",
                vec![ack("k1"), done("k1", true)],
                vec![Response::Applied, Response::Applied],
                CommandState::Done,
            ),
            (
                "result without ack",
                vec![done("k1", false)],
                vec![Response::Applied],
                CommandState::Failed,
            ),
            (
                "duplicate ack",
                vec![ack("k1"), ack("k1")],
                vec![Response::Applied, Response::Unchanged],
                CommandState::Acked,
            ),
            (
                "duplicate completion ignored",
                vec![done("k1", true), done("k1", false)],
                vec![Response::Applied, Response::Unchanged],
                CommandState::Done,
            ),
            (
                "late ack after done",
                vec![done("k1", true), ack("k1")],
                vec![Response::Applied, Response::Unchanged],
                CommandState::Done,
            ),
            (
                "cancel pending",
                vec![cancel("k1")],
                vec![Response::Applied],
                CommandState::Cancelled,
            ),
            (
                "cancel done refused",
                vec![done("k1", true), cancel("k1")],
                vec![
                    Response::Applied,
                    Response::refused(Refusal::AlreadyFinished {
                        key: "k1".into(),
                        state: CommandState::Done,
                    }),
                ],
                CommandState::Done,
            ),
            (
                "result after cancel recorded once",
                vec![cancel("k1"), done("k1", true), done("k1", true)],
                vec![Response::Applied, Response::Applied, Response::Unchanged],
                CommandState::Cancelled,
            ),
            (
                "unknown key",
                vec![ack("zz"), done("zz", true), cancel("zz")],
                vec![
                    Response::refused(Refusal::UnknownCommand { key: "zz".into() }),
                    Response::refused(Refusal::UnknownCommand { key: "zz".into() }),
                    Response::refused(Refusal::UnknownCommand { key: "zz".into() }),
                ],
                CommandState::Pending,
            ),
        ];
        for (name, steps, expected, final_state) in cases {
            let mut s = State::default();
            run(&mut s, vec![(1, up("h1", 1))]);
            assert_eq!(
                run(
                    &mut s,
                    vec![(
                        2,
                        Command::IssueCommands {
                            commands: vec![new_cmd("k1", "h1", 1000)]
                        }
                    )]
                ),
                vec![Response::Issued {
                    issued: vec!["k1".into()],
                    existing: vec![]
                }],
                "{name}"
            );
            let out = run(&mut s, steps.into_iter().map(|c| (10, c)).collect());
            assert_eq!(out, expected, "{name}");
            assert_eq!(cmd_state(&s, "k1"), final_state, "{name}");
        }
    }

    #[test]
    fn t31_completion_keeps_first_result() {
        let mut s = State::default();
        run(
            &mut s,
            vec![
                (1, up("h1", 1)),
                (
                    2,
                    Command::IssueCommands {
                        commands: vec![new_cmd("k1", "h1", 1000)],
                    },
                ),
                (
                    3,
                    Command::CommandCompleted {
                        key: "k1".into(),
                        result: result(true),
                    },
                ),
                (
                    4,
                    Command::CommandCompleted {
                        key: "k1".into(),
                        result: result(false),
                    },
                ),
            ],
        );
        let rec = s.commands.get("k1").unwrap();
        let r = rec.result.as_ref().unwrap();
        assert!(r.success);
        assert_eq!((r.key.as_str(), r.host_id.as_str()), ("k1", "h1"));
        assert_eq!(rec.finished_at_unix_ms, Some(3));
        assert!(s.commands.open_for_host("h1").is_empty());
    }

    #[test]
    fn t32_issue_validation_is_all_or_nothing() {
        let mut s = State::default();
        run(&mut s, vec![(1, up("h1", 1))]);
        let no_action = NewCommand {
            action: pb::Action { kind: None },
            ..new_cmd("k3", "h1", 10)
        };
        let out = run(
            &mut s,
            vec![
                (
                    2,
                    Command::IssueCommands {
                        commands: vec![new_cmd("k1", "h1", 10), new_cmd("k2", "h2", 10)],
                    },
                ),
                (3, Command::IssueCommands { commands: vec![] }),
                (
                    4,
                    Command::IssueCommands {
                        commands: vec![new_cmd("k1", "h1", 10), new_cmd("k1", "h1", 10)],
                    },
                ),
                (
                    5,
                    Command::IssueCommands {
                        commands: vec![no_action],
                    },
                ),
                (
                    6,
                    Command::IssueCommands {
                        commands: vec![new_cmd("", "h1", 10)],
                    },
                ),
            ],
        );
        assert_eq!(
            out,
            vec![
                Response::refused(Refusal::UnknownHost {
                    host_id: "h2".into()
                }),
                Response::refused(Refusal::Invalid {
                    message: "issue_commands with no commands".into()
                }),
                Response::refused(Refusal::Invalid {
                    message: "key k1 appears twice in one batch".into()
                }),
                Response::refused(Refusal::Invalid {
                    message: "command k3 has no action".into()
                }),
                Response::refused(Refusal::Invalid {
                    message: "command for host h1 has no key".into()
                }),
            ]
        );
        assert!(s.commands.is_empty(), "refused batches change nothing");
    }

    #[test]
    fn t33_reissue_same_key_is_idempotent() {
        let mut s = State::default();
        run(&mut s, vec![(1, up("h1", 1)), (1, up("h2", 1))]);
        let out = run(
            &mut s,
            vec![
                (
                    2,
                    Command::IssueCommands {
                        commands: vec![new_cmd("r-h1", "h1", 10)],
                    },
                ),
                (
                    3,
                    Command::IssueCommands {
                        commands: vec![new_cmd("r-h1", "h1", 10), new_cmd("r-h2", "h2", 10)],
                    },
                ),
                (
                    4,
                    Command::IssueCommands {
                        commands: vec![new_cmd("r-h1", "h2", 10)],
                    },
                ),
            ],
        );
        assert_eq!(
            out,
            vec![
                Response::Issued {
                    issued: vec!["r-h1".into()],
                    existing: vec![]
                },
                Response::Issued {
                    issued: vec!["r-h2".into()],
                    existing: vec!["r-h1".into()]
                },
                Response::refused(Refusal::KeyConflict {
                    key: "r-h1".into(),
                    host_id: "h1".into()
                }),
            ]
        );
        assert_eq!(s.commands.get("r-h1").unwrap().issued_index, 3);
        assert_eq!(s.commands.get("r-h2").unwrap().issued_index, 4);
    }

    #[test]
    fn t40_expire_commands() {
        let mut s = State::default();
        run(
            &mut s,
            vec![
                (1, up("h1", 1)),
                (
                    2,
                    Command::IssueCommands {
                        commands: vec![
                            new_cmd("a", "h1", 100),
                            new_cmd("b", "h1", 200),
                            new_cmd("c", "h1", 100),
                        ],
                    },
                ),
                (
                    3,
                    Command::CommandCompleted {
                        key: "c".into(),
                        result: result(true),
                    },
                ),
            ],
        );
        let out = run(
            &mut s,
            vec![
                (50, Command::ExpireCommands { now: 50 }),
                (150, Command::ExpireCommands { now: 150 }),
                (250, Command::ExpireCommands { now: 250 }),
            ],
        );
        assert_eq!(
            out,
            vec![
                Response::Expired { keys: vec![] },
                Response::Expired {
                    keys: vec!["a".into()]
                },
                Response::Expired {
                    keys: vec!["b".into()]
                },
            ]
        );
        assert_eq!(
            (cmd_state(&s, "a"), cmd_state(&s, "b"), cmd_state(&s, "c")),
            (
                CommandState::Expired,
                CommandState::Expired,
                CommandState::Done
            )
        );
    }

    #[test]
    fn t50_history_is_bounded_per_host() {
        let mut s = State::default();
        run(&mut s, vec![(1, up("h1", 1)), (1, up("h2", 1))]);
        let n = HISTORY_PER_HOST + 5;
        for i in 0..n {
            let key = format!("k{i}");
            run(
                &mut s,
                vec![
                    (
                        2,
                        Command::IssueCommands {
                            commands: vec![new_cmd(&key, "h1", 100)],
                        },
                    ),
                    (
                        3,
                        Command::CommandCompleted {
                            key,
                            result: result(true),
                        },
                    ),
                ],
            );
        }
        run(
            &mut s,
            vec![(
                4,
                Command::IssueCommands {
                    commands: vec![new_cmd("open", "h1", 100), new_cmd("other", "h2", 100)],
                },
            )],
        );
        assert_eq!(
            s.commands.len(),
            HISTORY_PER_HOST + 2,
            "history + two open commands"
        );
        assert!(s.commands.get("k0").is_none(), "oldest finished aged out");
        assert!(s.commands.get(&format!("k{}", n - 1)).is_some());
        assert_eq!(s.commands.open_for_host("h1").len(), 1);
    }

    #[test]
    fn t60_audit_records_every_request() {
        let mut s = State::default();
        run(
            &mut s,
            vec![
                (1, up("h1", 1)),
                (2, up("h1", 1)),
                (
                    3,
                    Command::HostDown {
                        host_id: "zz".into(),
                        reason: "x".into(),
                    },
                ),
                (
                    4,
                    Command::IssueCommands {
                        commands: vec![new_cmd("k1", "h1", 10)],
                    },
                ),
            ],
        );
        let got: Vec<(u64, u64, i64, &str, &str, &str)> = s
            .audit
            .entries()
            .iter()
            .map(|e| {
                (
                    e.seq,
                    e.log_index,
                    e.at_unix_ms,
                    e.what.as_str(),
                    e.target.as_str(),
                    e.result.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 1, 1, "host_up", "h1", "applied"),
                (2, 2, 2, "host_up", "h1", "unchanged"),
                (
                    3,
                    3,
                    3,
                    "host_down",
                    "zz",
                    "refused: host zz is not known to the cluster"
                ),
                (4, 4, 4, "issue_commands", "k1@h1 run_checks", "applied"),
            ]
        );
        assert!(s.audit.entries().iter().all(|e| e.origin == ORIGIN));
    }

    #[test]
    fn t70_deterministic_and_serde_roundtrip() {
        let reqs = [
            req(1, up("h1", 1)),
            req(
                2,
                Command::CheckTransitions {
                    host_id: "h1".into(),
                    changes: vec![check("pg", pb::CheckState::Failing)],
                },
            ),
            req(
                3,
                Command::IssueCommands {
                    commands: vec![new_cmd("k1", "h1", 10)],
                },
            ),
            req(4, Command::CommandAcked { key: "k1".into() }),
        ];
        let mut a = State::default();
        let mut b = State::default();
        for (i, r) in reqs.iter().enumerate() {
            // The request travels through the log as JSON.
            let wire: Request = serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap();
            assert_eq!(
                apply(&mut a, i as u64 + 1, r),
                apply(&mut b, i as u64 + 1, &wire)
            );
        }
        assert_eq!(a, b);
        let snap: State = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!(snap, a);
        // Responses travel back from the leader as JSON too.
        for resp in [
            Response::Applied,
            Response::Unchanged,
            Response::Issued {
                issued: vec!["a".into()],
                existing: vec!["b".into()],
            },
            Response::Expired {
                keys: vec!["c".into()],
            },
            Response::refused(Refusal::AlreadyFinished {
                key: "k".into(),
                state: CommandState::Done,
            }),
            Response::refused(Refusal::Invalid {
                message: "m".into(),
            }),
        ] {
            let back: Response =
                serde_json::from_str(&serde_json::to_string(&resp).unwrap()).unwrap();
            assert_eq!(back, resp);
        }
    }

    #[test]
    fn t80_selector_matching() {
        let mut s = State::default();
        run(&mut s, vec![(1, up("h1", 1)), (1, up("h2", 1))]);
        let sel = |hosts: &[&str], region: &str, role: &str| pb::Selector {
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            region: region.into(),
            role: role.into(),
            site: String::new(),
        };
        let ids = |sel: &pb::Selector| s.select(sel).map(|h| h.host_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&sel(&[], "", "")), vec!["h1", "h2"]);
        assert_eq!(ids(&sel(&["h2"], "", "")), vec!["h2"]);
        assert_eq!(ids(&sel(&[], "beijing", "db")), vec!["h1", "h2"]);
        assert!(ids(&sel(&[], "shanghai", "")).is_empty());
        assert!(ids(&sel(&[], "", "app")).is_empty());
    }
}
