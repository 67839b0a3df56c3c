//! In-process test of agent sessions across a leader change: three real coordinators
//! (`server::run`) on 127.0.0.1; a follower redirects, the leader stops, the agent follows
//! the new leader and is not declared down.

use std::time::{Duration, Instant};

use dr_proto::pb::agent_service_client::AgentServiceClient;
use dr_proto::pb::control_service_client::ControlServiceClient;
use dr_proto::pb::{self, agent_message::Msg as AMsg, coordinator_message::Msg as CMsg};
use dr_proto::tls::ClientTls;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
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

struct Node {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

fn start(dir: &std::path::Path, ca: &TestCa, id: u64, ports: &[u16; 3]) -> Node {
    let paths = ca.issue(&format!("coordinator-{id}"), &format!("coordinator/{id}"));
    let regions = ["beijing", "shanghai", "witness"];
    let mut peers = String::new();
    for (i, p) in ports.iter().enumerate() {
        let pid = i as u64 + 1;
        if pid != id {
            peers.push_str(&format!(
                "[[peers]]\nnode_id = {pid}\naddr = \"127.0.0.1:{p}\"\nregion = \"{}\"\n",
                regions[i]
            ));
        }
    }
    let port = ports[id as usize - 1];
    let text = format!(
        r#"
version = 1
node_id = {id}
region = "{region}"
listen = "127.0.0.1:{port}"
data_dir = "data-{id}"
{peers}
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[agents]
heartbeat_interval = "200ms"
down_after = "3s"
"#,
        region = regions[id as usize - 1],
        ca = paths.ca.display(),
        cert = paths.cert.display(),
        key = paths.key.display(),
    );
    let config = Config::from_toml_str(
        &text,
        &dir.join(format!("c{id}.toml")).display().to_string(),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(crate::server::run(config, stop.clone().cancelled_owned()));
    Node { stop, task }
}

/// Opens a session and returns the first message (or the error) plus the live stream.
async fn hello(
    tls: &ClientTls,
    endpoint: &str,
) -> (
    Result<CMsg, tonic::Status>,
    mpsc::Sender<pb::AgentMessage>,
    tonic::Streaming<pb::CoordinatorMessage>,
) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::AgentMessage {
        msg: Some(AMsg::Hello(pb::Hello {
            host_id: "db-1".into(),
            region: "beijing".into(),
            roles: vec!["db".into()],
            incarnation: 7,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = AgentServiceClient::new(tls.channel(endpoint).unwrap())
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("answer within 10s");
    (
        first.map(|m| m.expect("a message").msg.expect("set")),
        tx,
        stream,
    )
}

async fn leader_of(tls: &ClientTls, endpoints: &[String]) -> Option<(u64, String)> {
    for ep in endpoints {
        let mut c = ControlServiceClient::new(tls.channel(ep).unwrap());
        if let Ok(s) = c.cluster_status(pb::ClusterStatusRequest::default()).await {
            let s = s.into_inner();
            if s.leader_id != 0 && !s.leader_endpoint.is_empty() {
                return Some((s.leader_id, s.leader_endpoint));
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t51_follower_redirects_and_agent_follows_new_leader() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let ports = [free_port(), free_port(), free_port()];
    let mut nodes: Vec<Option<Node>> = (1..=3)
        .map(|id| Some(start(dir.path(), &ca, id, &ports)))
        .collect();
    let endpoints: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let admin = ClientTls::load(&ca.issue("operator-root", "operator/root?role=admin")).unwrap();
    let agent = ClientTls::load(&ca.issue("agent-db-1", "agent/db-1")).unwrap();

    info!("--- form the cluster from node 1's configured peers");
    let (leader_id, leader_ep) = {
        let start = Instant::now();
        loop {
            let mut c = ControlServiceClient::new(admin.channel(&endpoints[0]).unwrap());
            if c.cluster_init(pb::ClusterInitRequest::default())
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "cluster init never succeeded"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let start = Instant::now();
        loop {
            if let Some(l) = leader_of(&admin, &endpoints).await {
                break l;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    info!("--- a follower redirects the agent to the leader");
    {
        let follower = endpoints.iter().find(|e| **e != leader_ep).unwrap();
        let start = Instant::now();
        while leader_of(&admin, std::slice::from_ref(follower))
            .await
            .map(|l| l.0)
            != Some(leader_id)
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "follower never learned the leader"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (first, _tx, mut stream) = hello(&agent, follower).await;
        match first.unwrap() {
            CMsg::Redirect(r) => assert_eq!(
                (r.leader_id, r.leader_endpoint.as_str()),
                (leader_id, leader_ep.as_str())
            ),
            other => panic!("expected redirect, got {other:?}"),
        }
        assert!(
            stream.message().await.unwrap().is_none(),
            "the stream ends after a redirect"
        );
    }

    info!("--- the agent joins the leader, then the leader stops");
    {
        let (first, _tx, mut stream) = hello(&agent, &leader_ep).await;
        assert!(matches!(first.unwrap(), CMsg::Welcome(_)));
        let old = nodes[leader_id as usize - 1].take().unwrap();
        old.stop.cancel();
        // The session ends (with a Redirect or an error) rather than hanging.
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match stream.message().await {
                    Ok(Some(pb::CoordinatorMessage {
                        msg: Some(CMsg::Redirect(_)),
                    }))
                    | Ok(None)
                    | Err(_) => break,
                    Ok(Some(_)) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "session did not end when its leader stopped");
        tokio::time::timeout(Duration::from_secs(30), old.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    info!("--- the agent follows the new leader and is not declared down");
    {
        let rest: Vec<String> = endpoints
            .iter()
            .filter(|e| **e != leader_ep)
            .cloned()
            .collect();
        let start = Instant::now();
        let new_ep = loop {
            if let Some((id, ep)) = leader_of(&admin, &rest).await
                && id != leader_id
            {
                break ep;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no new leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (first, tx, _stream) = hello(&agent, &new_ep).await;
        assert!(matches!(first.unwrap(), CMsg::Welcome(_)));
        for seq in 1..=25 {
            tx.send(pb::AgentMessage {
                msg: Some(AMsg::Heartbeat(pb::Heartbeat {
                    seq,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let viewer = ClientTls::load(&ca.issue("operator-v", "operator/v?role=viewer")).unwrap();
        let a = ControlServiceClient::new(viewer.channel(&new_ep).unwrap())
            .get_agent(pb::GetAgentRequest {
                host_id: "db-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((a.state.as_str(), a.connected), ("up", true), "{a:?}");
    }

    for n in nodes.iter_mut().filter_map(Option::take) {
        n.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), n.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
