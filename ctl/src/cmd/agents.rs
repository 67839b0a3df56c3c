//! `drctl agents list|show`: what the cluster knows about each host.
//!
//! The committed state (up/down and since when) comes from the Raft log; connection,
//! heartbeat and check results are live facts held by the leader, so a follower that
//! answers shows them as absent rather than stale.

use dr_proto::pb;

use crate::cli::AgentsCmd;
use crate::client::{Client, ClientError};
use crate::output::{
    OutputFormat, Table, ago, check_state_name, json, now_ms, tier_name, timestamp, yes_no,
};

pub async fn run(client: &Client, cmd: AgentsCmd, format: OutputFormat) -> anyhow::Result<()> {
    let client = &client.prefer_leader().await?;
    match cmd {
        AgentsCmd::List { region, role, site } => {
            let selector = pb::Selector {
                hosts: Vec::new(),
                region: region.unwrap_or_default(),
                role: role.unwrap_or_default(),
                site: site.unwrap_or_default(),
            };
            let resp = list(client, selector).await?;
            match format {
                OutputFormat::Json => print!("{}", json(&resp)),
                OutputFormat::Text => print!("{}", render_list(&resp, now_ms())),
            }
        }
        AgentsCmd::Show { host } => {
            let resp = client
                .call("agents show", |mut c| {
                    let host_id = host.clone();
                    async move { c.get_agent(pb::GetAgentRequest { host_id }).await }
                })
                .await?;
            match format {
                OutputFormat::Json => print!("{}", json(&resp)),
                OutputFormat::Text => {
                    print!("{}", render_agent(&resp, now_ms()));
                    // The isolation record lives with the security state, not the agent's.
                    match crate::cmd::security::fetch(client).await {
                        Ok(sec) => println!("{}", isolation_line(&sec, &host)),
                        Err(e) => println!("isolation: not known ({e:#})"),
                    }
                }
            }
        }
    }
    Ok(())
}

/// `isolation: ...` for one host, from the security status.
pub fn isolation_line(sec: &pb::SecurityStatusResponse, host: &str) -> String {
    match sec.isolated.iter().find(|i| i.host_id == host) {
        None => "isolation: not isolated".to_owned(),
        Some(i) => format!(
            "isolation: ISOLATED since {} by {} (reason: {}){}",
            crate::output::timestamp(i.since_unix_ms),
            i.by,
            if i.reason.is_empty() { "-" } else { &i.reason },
            if i.allow_mgmt.is_empty() {
                String::new()
            } else {
                format!("; management allowed from {}", i.allow_mgmt.join(", "))
            }
        ),
    }
}

pub async fn list(
    client: &Client,
    selector: pb::Selector,
) -> Result<pb::ListAgentsResponse, ClientError> {
    client
        .call("agents list", |mut c| {
            let selector = selector.clone();
            async move {
                c.list_agents(pb::ListAgentsRequest {
                    selector: Some(selector),
                })
                .await
            }
        })
        .await
}

/// `3/3` or `2/3 (failing: disk)`.
fn checks_cell(checks: &[pb::CheckResult]) -> String {
    if checks.is_empty() {
        return "-".into();
    }
    let passing = checks
        .iter()
        .filter(|c| c.state == pb::CheckState::Passing as i32)
        .count();
    let failing: Vec<&str> = checks
        .iter()
        .filter(|c| c.state == pb::CheckState::Failing as i32)
        .map(|c| c.name.as_str())
        .collect();
    if failing.is_empty() {
        format!("{passing}/{}", checks.len())
    } else {
        format!(
            "{passing}/{} (failing: {})",
            checks.len(),
            failing.join(", ")
        )
    }
}

pub fn render_list(r: &pb::ListAgentsResponse, now: i64) -> String {
    let mut t = Table::new([
        "host",
        "region",
        "site",
        "roles",
        "state",
        "connected",
        "heartbeat",
        "checks",
    ]);
    for a in &r.agents {
        t.row([
            a.host_id.clone(),
            a.region.clone(),
            a.site.clone(),
            a.roles.join(","),
            a.state.clone(),
            if a.connected {
                format!("yes ({})", a.connected_to)
            } else {
                "no".into()
            },
            ago(a.last_heartbeat_unix_ms, now),
            checks_cell(&a.checks),
        ]);
    }
    let mut out = if t.is_empty() {
        "no agents match\n".to_string()
    } else {
        t.render()
    };
    let up = r.agents.iter().filter(|a| a.state == "up").count();
    out.push_str(&format!(
        "{} agents, {up} up (answered by {})\n",
        r.agents.len(),
        r.answered_by
    ));
    out
}

pub fn render_agent(a: &pb::AgentInfo, now: i64) -> String {
    let mut out = String::new();
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
    kv("host", a.host_id.clone());
    kv("region", a.region.clone());
    kv("site", a.site.clone());
    kv("roles", a.roles.join(","));
    kv(
        "state",
        format!("{} since {}", a.state, timestamp(a.state_since_unix_ms)),
    );
    kv(
        "connected",
        if a.connected {
            format!("yes, to coordinator {}", a.connected_to)
        } else {
            yes_no(false).into()
        },
    );
    kv("heartbeat", ago(a.last_heartbeat_unix_ms, now));
    kv("version", a.version.clone());
    kv("incarnation", a.incarnation.to_string());
    if !a.checks.is_empty() {
        out.push('\n');
        let mut t = Table::new(["check", "service", "tier", "state", "ms", "detail"]);
        for c in &a.checks {
            t.row([
                c.name.clone(),
                c.service.clone(),
                tier_name(c.tier).to_string(),
                check_state_name(c.state).to_string(),
                c.duration_ms.to_string(),
                c.detail.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    if !a.facts.is_empty() {
        out.push_str("\nfacts:\n");
        let mut facts: Vec<_> = a.facts.iter().collect();
        facts.sort();
        for (k, v) in facts {
            out.push_str(&format!("  {k} = {v}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_screen() {
        let r = pb::ListAgentsResponse {
            agents: vec![pb::AgentInfo {
                host_id: "bj-db-1".into(),
                region: "beijing".into(),
                site: "bj-dc1".into(),
                roles: vec!["db".into(), "primary".into()],
                state: "up".into(),
                connected: true,
                connected_to: 1,
                last_heartbeat_unix_ms: 9_000,
                checks: vec![
                    pb::CheckResult {
                        name: "disk".into(),
                        state: pb::CheckState::Failing as i32,
                        ..Default::default()
                    },
                    pb::CheckResult {
                        name: "tcp".into(),
                        state: pb::CheckState::Passing as i32,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            answered_by: 1,
            ..Default::default()
        };
        let s = render_list(&r, 10_000);
        assert!(s.contains("bj-db-1  beijing  bj-dc1  db,primary  up     yes (1)    1s ago     1/2 (failing: disk)"), "{s}");
        assert!(s.ends_with("1 agents, 1 up (answered by 1)\n"), "{s}");
    }
}
