//! `drctl whoami` and `drctl status`: the first two things an operator runs.
//!
//! `status` is designed to fit one screen during an incident: which regions have agents
//! down, which tiers have failing checks, who leads the coordinators, and the notes the
//! coordinator wants the operator to read (e.g. why automatic failover is off).

use dr_proto::pb;

use crate::client::Client;
use crate::output::{OutputFormat, Table, json, opt_u64, tier_name, yes_no};

pub async fn whoami(client: &Client, format: OutputFormat) -> anyhow::Result<()> {
    let resp = client
        .call("whoami", |mut c| async move {
            c.who_am_i(pb::WhoAmIRequest {}).await
        })
        .await?;
    match format {
        OutputFormat::Json => print!("{}", json(&resp)),
        OutputFormat::Text => print!("{}", render_whoami(&resp)),
    }
    Ok(())
}

pub fn render_whoami(r: &pb::WhoAmIResponse) -> String {
    let role = if r.role.is_empty() {
        "-"
    } else {
        r.role.as_str()
    };
    format!(
        "identity     {}\nkind         {}\nname         {}\nrole         {}\nanswered by  coordinator {}\n",
        r.identity, r.kind, r.name, role, r.answered_by
    )
}

pub async fn status(
    client: &Client,
    linearizable: bool,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let resp = fetch_status(client, linearizable).await?;
    match format {
        OutputFormat::Json => print!("{}", json(&resp)),
        OutputFormat::Text => {
            print!("{}", render_status(&resp));
            match crate::cmd::incident::fetch_open(client).await {
                Ok(open) if !open.is_empty() => {
                    print!(
                        "\nopen incidents:\n{}",
                        crate::cmd::incident::render_list(&open, crate::output::now_ms())
                    );
                }
                Ok(_) => {}
                Err(e) => println!("incidents: not available ({e:#})"),
            }
            match crate::cmd::security::fetch(client).await {
                Ok(sec) => print!("{}", crate::cmd::security::render(&sec, 5)),
                Err(e) => println!("security: not available ({e:#})"),
            }
        }
    }
    Ok(())
}

pub async fn fetch_status(
    client: &Client,
    linearizable: bool,
) -> Result<pb::StatusResponse, crate::client::ClientError> {
    client
        .call("status", |mut c| async move {
            c.status(pb::StatusRequest { linearizable }).await
        })
        .await
}

/// `passing/total` for a tier count, with the failing number called out.
fn tier_cell(t: Option<&pb::TierCount>) -> String {
    match t {
        None => "-".into(),
        Some(t) if t.checks_failing == 0 => format!(
            "{}/{}",
            t.checks_passing,
            t.checks_passing + t.checks_failing
        ),
        Some(t) => format!(
            "{}/{} ({} FAILING)",
            t.checks_passing,
            t.checks_passing + t.checks_failing,
            t.checks_failing
        ),
    }
}

pub fn render_status(r: &pb::StatusResponse) -> String {
    let mut out = String::new();
    let leader = if r.leader_id == 0 {
        "NONE (no leader elected)".to_string()
    } else if r.leader_endpoint.is_empty() {
        format!("coordinator {}", r.leader_id)
    } else {
        format!("coordinator {} ({})", r.leader_id, r.leader_endpoint)
    };
    out.push_str(&format!(
        "leader {leader}, term {}; answered by {}{}\n\n",
        r.term,
        r.answered_by,
        if r.linearizable {
            " (linearizable)"
        } else {
            ""
        }
    ));

    let mut regions = Table::new([
        "region",
        "agents up",
        "down",
        "critical",
        "important",
        "non-critical",
        "coordinators",
    ]);
    for reg in &r.regions {
        let tier = |t: pb::Tier| reg.tiers.iter().find(|c| c.tier == t as i32);
        let coords: Vec<String> = reg.coordinators.iter().map(u64::to_string).collect();
        regions.row([
            reg.name.clone(),
            reg.agents_up.to_string(),
            if reg.agents_down > 0 {
                format!("{} DOWN", reg.agents_down)
            } else {
                "0".into()
            },
            tier_cell(tier(pb::Tier::Critical)),
            tier_cell(tier(pb::Tier::Important)),
            tier_cell(tier(pb::Tier::NonCritical)),
            if coords.is_empty() {
                "-".into()
            } else {
                coords.join(",")
            },
        ]);
    }
    if regions.is_empty() {
        out.push_str("no regions known yet (no agent has connected)\n");
    } else {
        out.push_str(&regions.render());
    }

    if !r.members.is_empty() {
        out.push('\n');
        out.push_str(&members_table(&r.members, r.leader_id).render());
    }

    if !r.failing_checks.is_empty() {
        out.push_str("\nfailing checks:\n");
        let mut t = Table::new(["host", "check", "service", "tier", "detail"]);
        for (i, c) in r.failing_checks.iter().enumerate() {
            let host = r
                .failing_check_hosts
                .get(i)
                .cloned()
                .unwrap_or_else(|| "-".into());
            t.row([
                host,
                c.name.clone(),
                c.service.clone(),
                tier_name(c.tier).to_string(),
                c.detail.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    if !r.notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in &r.notes {
            out.push_str(&format!("  - {n}\n"));
        }
    }
    out
}

/// Coordinator members with the leader marked `*`.
pub fn members_table(members: &[pb::MemberStatus], leader_id: u64) -> Table {
    let mut t = Table::new([
        "node",
        "addr",
        "region",
        "role",
        "voter",
        "matched",
        "lag",
        "reachable",
    ]);
    for m in members {
        let node = if m.node_id == leader_id {
            format!("{}*", m.node_id)
        } else {
            m.node_id.to_string()
        };
        t.row([
            node,
            m.addr.clone(),
            m.region.clone(),
            m.role.clone(),
            yes_no(m.voter).to_string(),
            opt_u64(m.matched_index),
            opt_u64(m.lag),
            yes_no(m.reachable).to_string(),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_screen() {
        let r = pb::StatusResponse {
            leader_id: 1,
            leader_endpoint: "127.0.0.1:7001".into(),
            term: 4,
            answered_by: 2,
            regions: vec![pb::RegionStatus {
                name: "beijing".into(),
                agents_up: 2,
                agents_down: 1,
                tiers: vec![pb::TierCount {
                    tier: pb::Tier::Critical as i32,
                    checks_passing: 3,
                    checks_failing: 1,
                }],
                coordinators: vec![1],
            }],
            failing_checks: vec![pb::CheckResult {
                name: "pg-port".into(),
                service: "database".into(),
                tier: pb::Tier::Critical as i32,
                detail: "connection refused".into(),
                ..Default::default()
            }],
            failing_check_hosts: vec!["bj-db-1".into()],
            notes: vec!["only two regions: automatic failover is off".into()],
            members: vec![pb::MemberStatus {
                node_id: 1,
                addr: "127.0.0.1:7001".into(),
                region: "beijing".into(),
                role: "leader".into(),
                voter: true,
                matched_index: Some(10),
                lag: Some(0),
                reachable: true,
            }],
            ..Default::default()
        };
        let s = render_status(&r);
        assert!(
            s.starts_with("leader coordinator 1 (127.0.0.1:7001), term 4; answered by 2\n"),
            "{s}"
        );
        assert!(
            s.contains("beijing  2          1 DOWN  3/4 (1 FAILING)  -          -             1"),
            "{s}"
        );
        assert!(
            s.contains("1*    127.0.0.1:7001  beijing  leader  yes    10       0    yes"),
            "{s}"
        );
        assert!(
            s.contains("bj-db-1  pg-port  database  critical  connection refused"),
            "{s}"
        );
        assert!(s.contains("  - only two regions"), "{s}");
    }
}
