//! In-process end-to-end test of the Agent and Control APIs: one real coordinator
//! (`server::run`) on 127.0.0.1 with certificates made here, a hand-driven agent session
//! and drctl-like calls.

use std::time::{Duration, Instant};

use dr_proto::pb::agent_service_client::AgentServiceClient;
use dr_proto::pb::control_service_client::ControlServiceClient;
use dr_proto::pb::{self, agent_message::Msg as AMsg, coordinator_message::Msg as CMsg};
use dr_proto::tls::ClientTls;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::info;

use crate::config::Config;
use crate::raft::t20_cluster::TestCa;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Agent {
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: tonic::Streaming<pb::CoordinatorMessage>,
}

impl Agent {
    async fn connect(
        channel: tonic::transport::Channel,
        host_id: &str,
    ) -> Result<Agent, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::AgentMessage {
            msg: Some(AMsg::Hello(pb::Hello {
                host_id: host_id.into(),
                region: "beijing".into(),
                site: "bj-1".into(),
                roles: vec!["db".into()],
                version: "0.1.0".into(),
                incarnation: 42,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let rx = AgentServiceClient::new(channel)
            .session(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Agent { tx, rx })
    }

    async fn send(&self, msg: AMsg) {
        self.tx
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .unwrap();
    }

    /// The next Command, skipping leases (and cancels of earlier commands).
    async fn next_command(&mut self) -> pb::Command {
        loop {
            match self.recv().await.unwrap() {
                CMsg::Command(c) => return c,
                CMsg::Lease(_) | CMsg::Cancel(_) => {}
                other => panic!("expected command, got {other:?}"),
            }
        }
    }

    async fn recv(&mut self) -> Result<CMsg, tonic::Status> {
        let m = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("coordinator answers within 10s")?;
        Ok(m.expect("stream open").msg.expect("message set"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_agent_session_and_run_action() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "dr_coordinator=debug,openraft=warn",
        ))
        .with_test_writer()
        .try_init()
        .ok();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let paths = ca.issue("coordinator-1", "coordinator/1");
    let port = free_port();
    let text = format!(
        r#"
version = 1
node_id = 1
region = "beijing"
listen = "127.0.0.1:{port}"
data_dir = "data"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[agents]
heartbeat_interval = "200ms"
down_after = "1s"
command_timeout = "30s"
"#,
        ca = paths.ca.display(),
        cert = paths.cert.display(),
        key = paths.key.display(),
    );
    let config =
        Config::from_toml_str(&text, &dir.path().join("c.toml").display().to_string()).unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(crate::server::run(config, stop.clone().cancelled_owned()));
    let endpoint = format!("127.0.0.1:{port}");
    let client = |name: &str, path: &str| {
        ClientTls::load(&ca.issue(name, path))
            .unwrap()
            .channel(&endpoint)
            .unwrap()
    };
    let admin = ControlServiceClient::new(client("operator-root", "operator/root?role=admin"));
    let operator =
        ControlServiceClient::new(client("operator-alice", "operator/alice?role=operator"));
    let viewer = ControlServiceClient::new(client("operator-bob", "operator/bob?role=viewer"));

    info!("--- form a one-node cluster");
    {
        wait_until("cluster init", Duration::from_secs(20), || {
            let mut admin = admin.clone();
            async move {
                admin
                    .cluster_init(pb::ClusterInitRequest::default())
                    .await
                    .is_ok()
            }
        })
        .await;
        let who = viewer
            .clone()
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (who.kind.as_str(), who.name.as_str(), who.role.as_str()),
            ("operator", "bob", "viewer")
        );
    }

    info!("--- an agent certificate cannot speak for another host, nor call the control api");
    {
        let channel = client("agent-db-2", "agent/db-2");
        let mut imposter = Agent::connect(channel.clone(), "db-1").await.unwrap();
        let err = imposter.recv().await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message()
                .contains("may only speak for host db-2, not for host db-1"),
            "{}",
            err.message()
        );
        let err = ControlServiceClient::new(channel)
            .status(pb::StatusRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message().contains("this is an agent certificate"),
            "{}",
            err.message()
        );
    }

    info!("--- the agent says hello, heartbeats and gets leases");
    let stop_heartbeats = CancellationToken::new();
    let mut agent = Agent::connect(client("agent-db-1", "agent/db-1"), "db-1")
        .await
        .unwrap();
    {
        match agent.recv().await.unwrap() {
            CMsg::Welcome(w) => assert_eq!((w.leader_id, w.heartbeat_interval_ms), (1, 200)),
            other => panic!("expected welcome, got {other:?}"),
        }
        let failing = pb::CheckResult {
            name: "pg".into(),
            tier: pb::Tier::Critical as i32,
            state: pb::CheckState::Failing as i32,
            ..Default::default()
        };
        agent
            .send(AMsg::Heartbeat(pb::Heartbeat {
                seq: 1,
                checks: vec![failing],
                ..Default::default()
            }))
            .await;
        match agent.recv().await.unwrap() {
            CMsg::Lease(l) => assert_eq!((l.seq, l.lease_ms), (1, 600)),
            other => panic!("expected lease, got {other:?}"),
        }
        wait_until("check transition committed", Duration::from_secs(5), || {
            let mut v = viewer.clone();
            async move {
                let a = v
                    .get_agent(pb::GetAgentRequest {
                        host_id: "db-1".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                a.state == "up"
                    && a.connected
                    && a.checks
                        .iter()
                        .any(|c| c.state == pb::CheckState::Failing as i32)
            }
        })
        .await;
        // Keep heartbeating from here on, as a real agent does.
        let hb = agent.tx.clone();
        let hb_stop = stop_heartbeats.clone();
        tokio::spawn(async move {
            for seq in 2.. {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if hb_stop.is_cancelled() {
                    return;
                }
                let msg = pb::AgentMessage {
                    msg: Some(AMsg::Heartbeat(pb::Heartbeat {
                        seq,
                        ..Default::default()
                    })),
                };
                if hb.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let st = viewer
            .clone()
            .status(pb::StatusRequest { linearizable: true })
            .await
            .unwrap()
            .into_inner();
        assert!(st.linearizable);
        assert_eq!(st.failing_check_hosts, vec!["db-1"]);
        let err = viewer
            .clone()
            .get_agent(pb::GetAgentRequest {
                host_id: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(
            err.message().contains("known hosts: db-1"),
            "{}",
            err.message()
        );
    }

    info!("--- roles: a viewer cannot run actions");
    let run = |request_id: &str, wait: bool| pb::RunActionRequest {
        selector: Some(pb::Selector {
            hosts: vec!["db-1".into()],
            ..Default::default()
        }),
        action: Some(pb::Action {
            kind: Some(pb::action::Kind::RunChecks(pb::RunChecks::default())),
        }),
        timeout_ms: 20_000,
        wait,
        request_id: request_id.into(),
    };
    {
        let err = viewer
            .clone()
            .run_action(run("x", false))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message().contains("needs role operator"),
            "{}",
            err.message()
        );
        let mut bad = run("y", false);
        bad.selector = Some(pb::Selector {
            region: "mars".into(),
            ..Default::default()
        });
        let err = operator.clone().run_action(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(
            err.message().contains("regions: beijing"),
            "{}",
            err.message()
        );
    }

    info!("--- run an action and follow it to its result");
    {
        let mut events = operator
            .clone()
            .run_action(run("r1", true))
            .await
            .unwrap()
            .into_inner();
        let ev = events.message().await.unwrap().unwrap();
        assert_eq!(ev.key, "r1-db-1");
        assert!(
            matches!(ev.event, Some(pb::action_event::Event::Issued(_))),
            "{ev:?}"
        );
        let cmd = loop {
            match agent.recv().await.unwrap() {
                CMsg::Command(c) => break c,
                CMsg::Lease(_) => {}
                other => panic!("expected command, got {other:?}"),
            }
        };
        assert_eq!(cmd.key, "r1-db-1");
        agent
            .send(AMsg::Ack(pb::CommandAck {
                key: cmd.key.clone(),
            }))
            .await;
        agent
            .send(AMsg::Progress(pb::CommandProgress {
                key: cmd.key.clone(),
                message: "half".into(),
                done: 1,
                total: 2,
            }))
            .await;
        let result = pb::CommandResult {
            key: cmd.key.clone(),
            success: true,
            message: "ran 1 check".into(),
            ..Default::default()
        };
        agent.send(AMsg::Result(result.clone())).await;
        agent
            .send(AMsg::Result(pb::CommandResult {
                success: false,
                ..result
            }))
            .await;
        let mut kinds = Vec::new();
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .unwrap()
            .unwrap()
        {
            match ev.event.unwrap() {
                pb::action_event::Event::Acked(_) => kinds.push("acked"),
                pb::action_event::Event::Progress(_) => kinds.push("progress"),
                pb::action_event::Event::Result(r) => {
                    assert!(r.success, "the first result wins: {r:?}");
                    kinds.push("result");
                }
                pb::action_event::Event::Issued(_) => kinds.push("issued"),
            }
        }
        assert!(
            kinds.contains(&"acked") && kinds.last() == Some(&"result"),
            "{kinds:?}"
        );
    }

    info!("--- a retried request id issues nothing new");
    {
        let mut events = operator
            .clone()
            .run_action(run("r1", false))
            .await
            .unwrap()
            .into_inner();
        let ev = events.message().await.unwrap().unwrap();
        assert_eq!(ev.key, "r1-db-1");
        assert!(events.message().await.unwrap().is_none());
        let cmds = viewer
            .clone()
            .list_commands(pb::ListCommandsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(cmds.commands.len(), 1);
        assert_eq!(cmds.commands[0].state, "done");
    }

    info!("--- cancel reaches the agent; a second cancel reports the final state");
    {
        let mut events = operator
            .clone()
            .run_action(run("r2", false))
            .await
            .unwrap()
            .into_inner();
        while events.message().await.unwrap().is_some() {}
        let key = agent.next_command().await.key;
        assert_eq!(key, "r2-db-1");
        let cancel = pb::CancelActionRequest {
            key: key.clone(),
            reason: "changed my mind".into(),
        };
        let r = operator
            .clone()
            .cancel_action(cancel.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.cancelled, r.state.as_str()), (true, "cancelled"));
        loop {
            match agent.recv().await.unwrap() {
                CMsg::Cancel(c) => {
                    assert_eq!(
                        (c.key.as_str(), c.reason.as_str()),
                        ("r2-db-1", "changed my mind")
                    );
                    break;
                }
                CMsg::Lease(_) => {}
                other => panic!("expected cancel, got {other:?}"),
            }
        }
        let r = operator
            .clone()
            .cancel_action(cancel)
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.cancelled, r.state.as_str()), (false, "cancelled"));
    }

    info!("--- an ignored command expires and the waiting caller hears it");
    {
        let mut req = run("r3", true);
        req.timeout_ms = 300;
        let mut events = operator.clone().run_action(req).await.unwrap().into_inner();
        let mut last = None;
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .unwrap()
            .unwrap()
        {
            last = ev.event;
        }
        match last {
            Some(pb::action_event::Event::Result(r)) => {
                assert!(!r.success);
                assert!(r.message.starts_with("expired"), "{r:?}");
            }
            other => panic!("expected an expiry result, got {other:?}"),
        }
    }

    info!("--- the agent goes away: the failure detector commits it down");
    {
        stop_heartbeats.cancel();
        drop(agent);
        wait_until("host down", Duration::from_secs(10), || {
            let mut v = viewer.clone();
            async move {
                v.get_agent(pb::GetAgentRequest {
                    host_id: "db-1".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .state
                    == "down"
            }
        })
        .await;
    }

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
}
