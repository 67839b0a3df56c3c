//! `drctl commands list` and `drctl cancel`: the durable record of commands sent to agents.
//!
//! Commands outlive the drctl call that issued them (an agent may be disconnected and get
//! its command when it comes back), so an operator needs to see and cancel them later.

use dr_proto::pb;

use crate::cli::CommandsCmd;
use crate::client::Client;
use crate::cmd::run::describe_action;
use crate::output::{OutputFormat, Table, json, timestamp};

pub async fn run(client: &Client, cmd: CommandsCmd, format: OutputFormat) -> anyhow::Result<()> {
    let CommandsCmd::List {
        host,
        pending,
        limit,
    } = cmd;
    let req = pb::ListCommandsRequest {
        host_id: host.unwrap_or_default(),
        pending_only: pending,
        limit,
    };
    let resp = client
        .call("commands list", |mut c| {
            let req = req.clone();
            async move { c.list_commands(req).await }
        })
        .await?;
    match format {
        OutputFormat::Json => print!("{}", json(&resp)),
        OutputFormat::Text => print!("{}", render(&resp)),
    }
    Ok(())
}

pub fn render(r: &pb::ListCommandsResponse) -> String {
    if r.commands.is_empty() {
        return "no commands\n".into();
    }
    let mut t = Table::new(["key", "host", "action", "state", "issued", "by", "result"]);
    for c in &r.commands {
        let result = c
            .result
            .as_ref()
            .map(|r| r.message.clone())
            .unwrap_or_default();
        t.row([
            c.key.clone(),
            c.host_id.clone(),
            describe_action(c.action.as_ref()),
            c.state.clone(),
            timestamp(c.issued_at_unix_ms),
            c.issued_by.clone(),
            result,
        ]);
    }
    t.render()
}

pub async fn cancel(
    client: &Client,
    key: String,
    reason: String,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let req = pb::CancelActionRequest {
        key: key.clone(),
        reason,
    };
    let resp = client
        .call("cancel", |mut c| {
            let req = req.clone();
            async move { c.cancel_action(req).await }
        })
        .await?;
    match format {
        OutputFormat::Json => print!("{}", json(&resp)),
        OutputFormat::Text if resp.cancelled => println!("cancelled {key} (state {})", resp.state),
        OutputFormat::Text => {}
    }
    if !resp.cancelled {
        anyhow::bail!(
            "command {key} was not cancelled: it is already {}",
            resp.state
        );
    }
    Ok(())
}
