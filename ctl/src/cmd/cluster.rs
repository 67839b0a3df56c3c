//! `drctl cluster ...`: coordinator membership (admin role).
//!
//! Membership changes go through openraft's joint consensus on the coordinator; drctl
//! only names the change and then shows the resulting membership, so the operator sees
//! at once whether the new node is a voter and how far behind it is.

use dr_proto::pb;

use crate::cli::ClusterCmd;
use crate::client::Client;
use crate::cmd::status::members_table;
use crate::output::{OutputFormat, json};

pub async fn run(client: &Client, cmd: ClusterCmd, format: OutputFormat) -> anyhow::Result<()> {
    let resp = match cmd {
        ClusterCmd::Init { members } => {
            let members: Vec<pb::Member> = members
                .into_iter()
                .map(|m| pb::Member {
                    node_id: m.node_id,
                    addr: m.addr,
                    region: m.region,
                })
                .collect();
            init(client, members).await?
        }
        ClusterCmd::AddNode {
            node_id,
            addr,
            region,
            learner,
        } => {
            let req = pb::ClusterAddNodeRequest {
                member: Some(pb::Member {
                    node_id,
                    addr,
                    region,
                }),
                learner_only: learner,
            };
            client
                .call("cluster add-node", |mut c| {
                    let req = req.clone();
                    async move { c.cluster_add_node(req).await }
                })
                .await?
        }
        ClusterCmd::RemoveNode { node_id } => {
            client
                .call("cluster remove-node", |mut c| async move {
                    c.cluster_remove_node(pb::ClusterRemoveNodeRequest { node_id })
                        .await
                })
                .await?
        }
        ClusterCmd::Status { linearizable } => cluster_status(client, linearizable).await?,
    };
    match format {
        OutputFormat::Json => print!("{}", json(&resp)),
        OutputFormat::Text => print!("{}", render(&resp)),
    }
    Ok(())
}

pub async fn init(
    client: &Client,
    members: Vec<pb::Member>,
) -> Result<pb::ClusterStatusResponse, crate::client::ClientError> {
    let req = pb::ClusterInitRequest { members };
    client
        .call("cluster init", |mut c| {
            let req = req.clone();
            async move { c.cluster_init(req).await }
        })
        .await
}

pub async fn cluster_status(
    client: &Client,
    linearizable: bool,
) -> Result<pb::ClusterStatusResponse, crate::client::ClientError> {
    client
        .call("cluster status", |mut c| async move {
            c.cluster_status(pb::ClusterStatusRequest { linearizable })
                .await
        })
        .await
}

pub fn render(r: &pb::ClusterStatusResponse) -> String {
    let leader = if r.leader_id == 0 {
        "none".to_string()
    } else {
        r.leader_id.to_string()
    };
    let mut out = format!(
        "answered by {} ({}); leader {leader}; term {}\nlog: last {}, commit {}, applied {}, snapshot {}{}\n\n",
        r.cluster_node_id,
        if r.state.is_empty() {
            "-"
        } else {
            r.state.as_str()
        },
        r.term,
        r.last_log_index,
        r.commit_index,
        r.applied_index,
        r.snapshot_index,
        if r.linearizable {
            " (linearizable)"
        } else {
            ""
        },
    );
    out.push_str(&members_table(&r.members, r.leader_id).render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_screen() {
        let r = pb::ClusterStatusResponse {
            cluster_node_id: 2,
            leader_id: 1,
            term: 3,
            last_log_index: 12,
            commit_index: 12,
            applied_index: 11,
            state: "follower".into(),
            members: vec![pb::MemberStatus {
                node_id: 3,
                addr: "b:2".into(),
                region: "witness".into(),
                role: "learner".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let s = render(&r);
        assert!(s.starts_with("answered by 2 (follower); leader 1; term 3\nlog: last 12, commit 12, applied 11, snapshot 0\n"), "{s}");
        assert!(
            s.contains("3     b:2   witness  learner  no     -        -    no"),
            "{s}"
        );
    }
}
