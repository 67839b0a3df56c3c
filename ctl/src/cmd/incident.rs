//! `drctl incident open|list|show|note|level|resolve`: the DRP's incident classification
//! (`activate-incident --level P0`) as a record the whole team sees: the response deadline
//! and escalation come from the level, the timeline holds notes and level changes, and the
//! DR operations run while it was open are listed with it. Resolving records the measured
//! time from opening to resolution (the DRP's "measure-recovery-time").

use clap::Subcommand;
use dr_proto::pb;
use dr_proto::pb::incident_service_client::IncidentServiceClient;

use crate::client::Client;
use crate::output::{OutputFormat, Table, ago, json, now_ms, timestamp};

#[derive(Debug, Subcommand)]
pub enum IncidentCmd {
    /// Open an incident (operator): P0 complete outage (respond within 15 min, CTO + all
    /// teams), P1 major functionality down (30 min), P2 partial (2 h), P3 minor (8 h).
    Open {
        #[arg(long)]
        level: String,
        #[arg(long)]
        title: String,
        /// What is known so far.
        #[arg(long, default_value = "")]
        summary: String,
    },
    /// Incidents, newest first.
    List {
        /// Only incidents not resolved yet.
        #[arg(long)]
        open: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One incident: deadline, escalation, timeline, the DR operations run while it was open.
    Show { id: String },
    /// Add a note to the timeline.
    Note { id: String, text: String },
    /// Raise or lower the level (the response deadline follows, from the opening time).
    Level { id: String, level: String },
    /// Resolve: records the time from opening to resolution.
    Resolve {
        id: String,
        /// How it was resolved.
        #[arg(long, default_value = "")]
        summary: String,
    },
}

pub async fn run(client: &Client, cmd: IncidentCmd, format: OutputFormat) -> anyhow::Result<()> {
    let update =
        |id: String, note: String, level: String, resolve: bool| pb::UpdateIncidentRequest {
            id,
            note,
            level,
            resolve,
        };
    let info = match cmd {
        IncidentCmd::Open {
            level,
            title,
            summary,
        } => {
            // One id for every retry of this invocation: a retried open is not a second incident.
            let request_id = uuid::Uuid::new_v4().to_string();
            client
                .call_service("incident open", IncidentServiceClient::new, |mut c| {
                    let req = pb::OpenIncidentRequest {
                        level: level.clone(),
                        title: title.clone(),
                        summary: summary.clone(),
                        request_id: request_id.clone(),
                    };
                    async move { c.open_incident(req).await }
                })
                .await?
        }
        IncidentCmd::List { open, limit } => {
            let resp = client
                .call_service(
                    "incident list",
                    IncidentServiceClient::new,
                    |mut c| async move {
                        c.list_incidents(pb::ListIncidentsRequest {
                            open_only: open,
                            limit,
                        })
                        .await
                    },
                )
                .await?;
            match format {
                OutputFormat::Json => print!("{}", json(&resp)),
                OutputFormat::Text => print!("{}", render_list(&resp.incidents, now_ms())),
            }
            return Ok(());
        }
        IncidentCmd::Show { id } => {
            client
                .call_service("incident show", IncidentServiceClient::new, |mut c| {
                    let id = id.clone();
                    async move { c.get_incident(pb::GetIncidentRequest { id }).await }
                })
                .await?
        }
        IncidentCmd::Note { id, text } => {
            let req = update(id, text, String::new(), false);
            call_update(client, "incident note", req).await?
        }
        IncidentCmd::Level { id, level } => {
            let req = update(id, String::new(), level, false);
            call_update(client, "incident level", req).await?
        }
        IncidentCmd::Resolve { id, summary } => {
            let req = update(id, summary, String::new(), true);
            call_update(client, "incident resolve", req).await?
        }
    };
    match format {
        OutputFormat::Json => print!("{}", json(&info)),
        OutputFormat::Text => print!("{}", render_one(&info, now_ms())),
    }
    Ok(())
}

/// Open incidents, for `drctl status`.
pub async fn fetch_open(client: &Client) -> anyhow::Result<Vec<pb::IncidentInfo>> {
    let resp = client
        .call_service(
            "incident list",
            IncidentServiceClient::new,
            |mut c| async move {
                c.list_incidents(pb::ListIncidentsRequest {
                    open_only: true,
                    limit: 20,
                })
                .await
            },
        )
        .await?;
    Ok(resp.incidents)
}

async fn call_update(
    client: &Client,
    what: &'static str,
    req: pb::UpdateIncidentRequest,
) -> anyhow::Result<pb::IncidentInfo> {
    client
        .call_service(what, IncidentServiceClient::new, |mut c| {
            let req = req.clone();
            async move { c.update_incident(req).await }
        })
        .await
        .map_err(Into::into)
}

fn deadline(i: &pb::IncidentInfo, now: i64) -> String {
    if i.state != "open" {
        return format!("resolved in {}", human_ms(i.duration_ms));
    }
    if now > i.respond_by_unix_ms {
        format!(
            "response OVERDUE by {}",
            human_ms(now - i.respond_by_unix_ms)
        )
    } else {
        format!("respond within {}", human_ms(i.respond_by_unix_ms - now))
    }
}

fn human_ms(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn render_list(items: &[pb::IncidentInfo], now: i64) -> String {
    if items.is_empty() {
        return "no incidents\n".into();
    }
    let mut t = Table::new(["ID", "LEVEL", "STATE", "OPENED", "DEADLINE", "TITLE"]);
    for i in items {
        t.row([
            i.id.clone(),
            i.level.clone(),
            i.state.clone(),
            ago(i.opened_at_unix_ms, now),
            deadline(i, now),
            i.title.clone(),
        ]);
    }
    t.render()
}

fn render_one(i: &pb::IncidentInfo, now: i64) -> String {
    let mut out = format!(
        "{} {} {} ({})\n  opened   {} by {}\n  {}; escalation: {}\n",
        i.id,
        i.level,
        i.title,
        i.state,
        timestamp(i.opened_at_unix_ms),
        i.opened_by,
        deadline(i, now),
        i.escalation
    );
    out.push_str("timeline:\n");
    for e in &i.events {
        out.push_str(&format!(
            "  {}  {:<8} {}  ({})\n",
            timestamp(e.at_unix_ms),
            e.kind,
            e.text,
            e.by
        ));
    }
    if !i.operations.is_empty() {
        out.push_str("DR operations while open:\n");
        for o in &i.operations {
            out.push_str(&format!("  {o}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(state: &str) -> pb::IncidentInfo {
        pb::IncidentInfo {
            id: "I-1".into(),
            level: "P0".into(),
            title: "beijing down".into(),
            state: state.into(),
            opened_by: "spiffe://t/operator/alice?role=operator".into(),
            opened_at_unix_ms: 1_000_000,
            respond_by_unix_ms: 1_000_000 + 900_000,
            escalation: "CTO + all teams".into(),
            resolved_at_unix_ms: if state == "open" {
                0
            } else {
                1_000_000 + 4_000_000
            },
            duration_ms: if state == "open" { 0 } else { 4_000_000 },
            events: vec![pb::IncidentEvent {
                at_unix_ms: 1_000_000,
                by: "alice".into(),
                kind: "opened".into(),
                text: "P0 beijing down".into(),
            }],
            operations: vec!["3 failover succeeded".into()],
        }
    }

    #[test]
    fn deadlines_and_rendering() {
        let open = sample("open");
        assert_eq!(deadline(&open, 1_000_000 + 60_000), "respond within 14m00s");
        assert_eq!(
            deadline(&open, 1_000_000 + 1_000_000),
            "response OVERDUE by 1m40s"
        );
        assert_eq!(deadline(&sample("resolved"), 0), "resolved in 1h06m");
        let one = render_one(&open, 1_000_000);
        assert!(one.contains("escalation: CTO + all teams"), "{one}");
        assert!(one.contains("3 failover succeeded"), "{one}");
        assert!(render_list(&[open], 1_000_000).contains("I-1"));
    }
}
