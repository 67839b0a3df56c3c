//! Incidents: the DRP's P0-P3 classification as records in the replicated state.
//!
//! Why here: an incident outlives the coordinator that recorded it (it is opened during a
//! regional outage, when the leader may change), its timeline is compliance evidence next
//! to the audit log, and `drctl restore --before-incident I-N` needs its opening time on
//! every node. The response deadline and escalation follow from the level (the DRP's table),
//! so they are computed, never stored apart from the level.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Refusal, Response, State};

/// Incidents kept (the audit log keeps every change for good).
pub const INCIDENTS_KEPT: usize = 1000;
/// Timeline events kept per incident.
pub const EVENTS_KEPT: usize = 500;
/// Longest title / note accepted.
pub const TEXT_MAX: usize = 2000;

/// The DRP's incident levels.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    P0,
    P1,
    P2,
    P3,
}

impl Level {
    pub fn parse(s: &str) -> Result<Level, String> {
        match s.trim().to_ascii_uppercase().as_str() {
            "P0" => Ok(Level::P0),
            "P1" => Ok(Level::P1),
            "P2" => Ok(Level::P2),
            "P3" => Ok(Level::P3),
            other => Err(format!(
                "unknown incident level {other:?}: use P0 (complete outage), P1 (major functionality down), P2 (partial) or P3 (minor)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::P0 => "P0",
            Level::P1 => "P1",
            Level::P2 => "P2",
            Level::P3 => "P3",
        }
    }

    /// Response time from the DRP's classification table.
    pub fn response_ms(self) -> i64 {
        const MIN: i64 = 60_000;
        match self {
            Level::P0 => 15 * MIN,
            Level::P1 => 30 * MIN,
            Level::P2 => 120 * MIN,
            Level::P3 => 480 * MIN,
        }
    }

    pub fn escalation(self) -> &'static str {
        match self {
            Level::P0 => "CTO + all teams",
            Level::P1 => "engineering lead",
            Level::P2 => "on-call engineer",
            Level::P3 => "standard queue",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    pub at_unix_ms: i64,
    pub by: String,
    pub kind: String,
    pub text: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Incident {
    pub id: u64,
    pub level: Level,
    pub title: String,
    pub opened_by: String,
    pub opened_at_unix_ms: i64,
    /// 0 while open.
    pub resolved_at_unix_ms: i64,
    pub request_id: String,
    pub events: Vec<Event>,
}

impl Incident {
    pub fn is_open(&self) -> bool {
        self.resolved_at_unix_ms == 0
    }

    pub fn respond_by_unix_ms(&self) -> i64 {
        self.opened_at_unix_ms + self.level.response_ms()
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IncidentBook {
    pub next_id: u64,
    pub incidents: BTreeMap<u64, Incident>,
}

impl IncidentBook {
    /// The incident a retried open created, if any.
    pub fn by_request(&self, request_id: &str) -> Option<&Incident> {
        if request_id.is_empty() {
            return None;
        }
        self.incidents
            .values()
            .rev()
            .find(|i| i.request_id == request_id)
    }
}

/// Parses "I-3", "i-3" or "3".
pub fn parse_id(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let n = t
        .strip_prefix("I-")
        .or_else(|| t.strip_prefix("i-"))
        .unwrap_or(t);
    n.parse::<u64>()
        .map_err(|_| format!("{s:?} is not an incident id (I-N); see `drctl incident list`"))
}

pub fn id_text(id: u64) -> String {
    format!("I-{id}")
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum IncidentCommand {
    Open {
        level: Level,
        title: String,
        summary: String,
        request_id: String,
    },
    Note {
        id: u64,
        text: String,
    },
    SetLevel {
        id: u64,
        level: Level,
    },
    Resolve {
        id: u64,
        summary: String,
    },
}

impl IncidentCommand {
    pub fn name(&self) -> &'static str {
        match self {
            IncidentCommand::Open { .. } => "incident_open",
            IncidentCommand::Note { .. } => "incident_note",
            IncidentCommand::SetLevel { .. } => "incident_level",
            IncidentCommand::Resolve { .. } => "incident_resolve",
        }
    }

    /// Audit target. Texts stay out of it (they are in the incident's own timeline).
    pub fn target(&self) -> String {
        match self {
            IncidentCommand::Open { level, .. } => format!("new incident {}", level.as_str()),
            IncidentCommand::Note { id, .. } => id_text(*id),
            IncidentCommand::SetLevel { id, level } => {
                format!("{} -> {}", id_text(*id), level.as_str())
            }
            IncidentCommand::Resolve { id, .. } => id_text(*id),
        }
    }
}

fn invalid(message: String) -> Response {
    Response::refused(Refusal::Invalid { message })
}

fn check_text(what: &str, t: &str, required: bool) -> Result<(), Response> {
    if required && t.trim().is_empty() {
        return Err(invalid(format!("an incident needs a {what}")));
    }
    if t.len() > TEXT_MAX {
        return Err(invalid(format!(
            "the {what} is {} bytes; at most {TEXT_MAX}",
            t.len()
        )));
    }
    Ok(())
}

pub fn apply(state: &mut State, at: i64, origin: &str, cmd: &IncidentCommand) -> Response {
    let book = &mut state.incidents;
    match cmd {
        IncidentCommand::Open {
            level,
            title,
            summary,
            request_id,
        } => {
            if book.by_request(request_id).is_some() {
                return Response::Unchanged;
            }
            if let Err(r) = check_text("title", title, true) {
                return r;
            }
            if let Err(r) = check_text("summary", summary, false) {
                return r;
            }
            book.next_id += 1;
            let id = book.next_id;
            let mut text = format!("{} {}", level.as_str(), title.trim());
            if !summary.trim().is_empty() {
                text = format!("{text}: {}", summary.trim());
            }
            book.incidents.insert(
                id,
                Incident {
                    id,
                    level: *level,
                    title: title.trim().to_owned(),
                    opened_by: origin.to_owned(),
                    opened_at_unix_ms: at,
                    resolved_at_unix_ms: 0,
                    request_id: request_id.clone(),
                    events: vec![Event {
                        at_unix_ms: at,
                        by: origin.to_owned(),
                        kind: "opened".into(),
                        text,
                    }],
                },
            );
            while book.incidents.len() > INCIDENTS_KEPT {
                let Some(oldest) = book.incidents.keys().next().copied() else {
                    break;
                };
                book.incidents.remove(&oldest);
            }
            Response::Applied
        }
        IncidentCommand::Note { id, text } => {
            if let Err(r) = check_text("note", text, true) {
                return r;
            }
            let Some(i) = book.incidents.get_mut(id) else {
                return unknown(*id);
            };
            push(i, at, origin, "note", text.trim().to_owned());
            Response::Applied
        }
        IncidentCommand::SetLevel { id, level } => {
            let Some(i) = book.incidents.get_mut(id) else {
                return unknown(*id);
            };
            if !i.is_open() {
                return invalid(format!("{} is resolved; open a new incident", id_text(*id)));
            }
            if i.level == *level {
                return Response::Unchanged;
            }
            let text = format!("{} -> {}", i.level.as_str(), level.as_str());
            i.level = *level;
            push(i, at, origin, "level", text);
            Response::Applied
        }
        IncidentCommand::Resolve { id, summary } => {
            if let Err(r) = check_text("resolution summary", summary, false) {
                return r;
            }
            let Some(i) = book.incidents.get_mut(id) else {
                return unknown(*id);
            };
            if !i.is_open() {
                return Response::Unchanged;
            }
            i.resolved_at_unix_ms = at;
            push(i, at, origin, "resolved", summary.trim().to_owned());
            Response::Applied
        }
    }
}

fn unknown(id: u64) -> Response {
    invalid(format!(
        "no incident {}; see `drctl incident list`",
        id_text(id)
    ))
}

fn push(i: &mut Incident, at: i64, by: &str, kind: &str, text: String) {
    i.events.push(Event {
        at_unix_ms: at,
        by: by.to_owned(),
        kind: kind.to_owned(),
        text,
    });
    if i.events.len() > EVENTS_KEPT {
        // Keep the opening event; drop the oldest after it.
        i.events.remove(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(state: &mut State, at: i64, level: Level, req: &str) -> Response {
        apply(
            state,
            at,
            "spiffe://t/operator/alice?role=operator",
            &IncidentCommand::Open {
                level,
                title: "beijing down".into(),
                summary: String::new(),
                request_id: req.into(),
            },
        )
    }

    #[test]
    fn levels_parse_and_carry_the_drp_table() {
        assert_eq!(Level::parse("p0"), Ok(Level::P0));
        assert!(Level::parse("P5").unwrap_err().contains("P0"));
        assert_eq!(Level::P0.response_ms(), 15 * 60_000);
        assert_eq!(Level::P3.response_ms(), 8 * 3_600_000);
        assert_eq!(parse_id("I-12"), Ok(12));
        assert_eq!(parse_id("12"), Ok(12));
        assert!(parse_id("R-1").is_err());
    }

    #[test]
    fn open_note_level_resolve() {
        let mut s = State::default();
        assert_eq!(open(&mut s, 1000, Level::P1, "r1"), Response::Applied);
        // A retry with the same request id creates nothing.
        assert_eq!(open(&mut s, 1001, Level::P1, "r1"), Response::Unchanged);
        assert_eq!(s.incidents.incidents.len(), 1);
        let i = &s.incidents.incidents[&1];
        assert_eq!(i.respond_by_unix_ms(), 1000 + 30 * 60_000);
        let by = "spiffe://t/operator/bob?role=operator";
        let note = IncidentCommand::Note {
            id: 1,
            text: "database unreachable".into(),
        };
        assert_eq!(apply(&mut s, 2000, by, &note), Response::Applied);
        let up = IncidentCommand::SetLevel {
            id: 1,
            level: Level::P0,
        };
        assert_eq!(apply(&mut s, 3000, by, &up), Response::Applied);
        assert_eq!(apply(&mut s, 3001, by, &up), Response::Unchanged);
        assert_eq!(
            s.incidents.incidents[&1].respond_by_unix_ms(),
            1000 + 15 * 60_000
        );
        let res = IncidentCommand::Resolve {
            id: 1,
            summary: "failed over to shanghai".into(),
        };
        assert_eq!(apply(&mut s, 9000, by, &res), Response::Applied);
        let i = &s.incidents.incidents[&1];
        assert!(!i.is_open());
        assert_eq!(
            i.events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["opened", "note", "level", "resolved"]
        );
        // Resolved: no level change; resolving again changes nothing.
        assert!(matches!(
            apply(&mut s, 9100, by, &up),
            Response::Refused { .. }
        ));
        assert_eq!(apply(&mut s, 9200, by, &res), Response::Unchanged);
    }

    #[test]
    fn refusals_name_the_problem() {
        let mut s = State::default();
        let r = apply(
            &mut s,
            1,
            "x",
            &IncidentCommand::Open {
                level: Level::P2,
                title: "  ".into(),
                summary: String::new(),
                request_id: String::new(),
            },
        );
        assert!(
            matches!(r, Response::Refused { refusal: Refusal::Invalid { message } } if message.contains("title"))
        );
        let r = apply(
            &mut s,
            1,
            "x",
            &IncidentCommand::Note {
                id: 7,
                text: "hi".into(),
            },
        );
        assert!(
            matches!(r, Response::Refused { refusal: Refusal::Invalid { message } } if message.contains("I-7"))
        );
    }
}
