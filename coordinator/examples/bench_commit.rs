//! bench_commit: committed state changes per second on in-process coordinator nodes.
//!
//! Why in-process: the target (issue 2) is the Raft write path itself: SQLite log with
//! `synchronous=FULL` (fsync on every append batch), JSON payloads, mutual-TLS gRPC
//! replication between the nodes. Running the nodes in one process over real loopback
//! sockets measures exactly that, without the Control API's per-call TLS client in front.
//! Concurrent proposals are group-committed (`raft/batcher.rs`: writes that arrive while
//! earlier entries are in flight share one entry), which is the "batching allowed" of the
//! target.
//!
//! ```text
//! cargo run --release -p dr-coordinator --example bench_commit -- \
//!     --tls-dir DIR --nodes 3 --concurrency 128 --writes 20000 --runs 5
//! ```
//! `DIR` holds `ca.pem` and `coordinator-N.{pem,key}` (scripts/bench-commit.sh makes it
//! with `drctl cert`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dr_coordinator::config::Config;
use dr_coordinator::metrics::Metrics;
use dr_coordinator::raft::RaftNode;
use dr_coordinator::raft::service::RaftApi;
use dr_coordinator::state::{Command, Request};
use dr_proto::pb;
use dr_proto::pb::raft_service_server::RaftServiceServer;
use dr_proto::tls::{ClientTls, ServerTls, TlsPaths};
use tokio_util::sync::CancellationToken;

struct Args {
    tls_dir: PathBuf,
    nodes: u64,
    concurrency: u64,
    writes: u64,
    runs: u64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        tls_dir: PathBuf::new(),
        nodes: 3,
        concurrency: 128,
        writes: 20_000,
        runs: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--tls-dir" => a.tls_dir = v.into(),
            "--nodes" => a.nodes = v.parse()?,
            "--concurrency" => a.concurrency = v.parse()?,
            "--writes" => a.writes = v.parse()?,
            "--runs" => a.runs = v.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    if a.tls_dir.as_os_str().is_empty() {
        bail!("--tls-dir DIR is required");
    }
    Ok(a)
}

struct Node {
    node: RaftNode,
    addr: String,
    cancel: CancellationToken,
}

async fn start_node(args: &Args, root: &std::path::Path, id: u64) -> Result<Node> {
    let paths = TlsPaths {
        ca: args.tls_dir.join("ca.pem"),
        cert: args.tls_dir.join(format!("coordinator-{id}.pem")),
        key: args.tls_dir.join(format!("coordinator-{id}.key")),
        reload_interval: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    // The election timings of deploy/examples/coordinator.toml.
    let text = format!(
        r#"
version = 1
node_id = {id}
region = "r{id}"
listen = "{addr}"
data_dir = "{data}"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[raft]
heartbeat_interval = "150ms"
election_timeout_min = "600ms"
election_timeout_max = "1200ms"
snapshot_every = 5000
"#,
        data = root.join(format!("node-{id}")).display(),
        ca = paths.ca.display(),
        cert = paths.cert.display(),
        key = paths.key.display(),
    );
    let config = Config::from_toml_str(&text, "<bench>")?;
    let cancel = CancellationToken::new();
    let node = RaftNode::start(&config, ClientTls::load(&paths)?, cancel.child_token()).await?;
    let router = tonic::transport::Server::builder().add_service(
        RaftServiceServer::new(RaftApi::new(node.clone(), Arc::new(Metrics::new())))
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20),
    );
    tokio::spawn(dr_proto::tls::serve(
        router,
        listener,
        ServerTls::load(&paths)?,
        cancel.child_token(),
    ));
    Ok(Node { node, addr, cancel })
}

fn request(i: u64) -> Request {
    // A host-up with a new incarnation every time: applied (not "unchanged"), one audit
    // entry, a realistic payload size (~250 bytes of JSON).
    Request {
        at_unix_ms: 1_700_000_000_000 + i as i64,
        origin: "spiffe://bench.dr/operator/bench?role=admin".into(),
        cmd: Command::HostUp {
            host_id: format!("bench-host-{:03}", i % 500),
            region: "beijing".into(),
            site: "bj-1".into(),
            roles: vec!["app".into()],
            version: "bench".into(),
            incarnation: i,
        },
    }
}

async fn one_run(args: &Args, run: u64) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    for id in 1..=args.nodes {
        nodes.push(start_node(args, dir.path(), id).await?);
    }
    let members: Vec<pb::Member> = nodes
        .iter()
        .map(|n| pb::Member {
            node_id: n.node.id(),
            addr: n.addr.clone(),
            region: format!("r{}", n.node.id()),
        })
        .collect();
    nodes[0].node.cluster_init(members).await?;
    let start = Instant::now();
    let leader = loop {
        if let Some(n) = nodes.iter().find(|n| n.node.is_leader()) {
            break n.node.clone();
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("no leader");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Warm up (connections, first appends).
    for i in 0..100 {
        leader.write(request(i)).await?;
    }
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (leader, next, total) = (leader.clone(), next.clone(), args.writes);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), anyhow::Error>(());
                }
                leader.write(request(1000 + i)).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t.elapsed().as_secs_f64();
    let rate = args.writes as f64 / secs;
    // Every node must have applied everything: the writes were committed by a majority,
    // and the third node is given a moment to catch up.
    let last = leader.applied().borrow().to_owned();
    for n in &nodes {
        let mut applied = n.node.applied();
        tokio::time::timeout(Duration::from_secs(30), applied.wait_for(|a| *a >= last))
            .await
            .context("a node did not catch up")??;
    }
    println!(
        "run {run}: {} writes, {} in flight, {secs:.2} s, {rate:.0} committed writes/s",
        args.writes, args.concurrency
    );
    for n in nodes {
        n.cancel.cancel();
        n.node.shutdown().await;
    }
    Ok(rate)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut rates = Vec::new();
        for run in 1..=args.runs {
            rates.push(one_run(&args, run).await?);
        }
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        println!(
            "median of {} runs: {median:.0} committed writes/s (min {:.0}, max {:.0})",
            rates.len(),
            rates[0],
            rates[rates.len() - 1]
        );
        Ok(())
    })
}
