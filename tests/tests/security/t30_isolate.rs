//! `drctl isolate` / `drctl unisolate` end to end, with the agent INSIDE a network
//! namespace the test creates (and removes, also on failure).
//!
//! ```text
//!   root ns: coordinator 1 on 127.0.0.1:C
//!                ^ forwarder (socket in ns "peer", copies to 127.0.0.1:C)
//!   ns "peer" 10.204.N.2:7443 <── veth ──> ns "host" 10.204.N.1
//!                                            dr-agent (ip netns exec host ...)
//!                                            :8080 app    (refused while isolated)
//!                                            :2222 mgmt   (--allow-mgmt keeps it open)
//! ```
//! The agent's coordinator session crosses the veth, so it goes through the same nftables
//! rules that refuse the app port: it must stay up (the unisolate command travels on it).
//! The coordinator's certificate is re-issued with the peer address as an IP SAN (the
//! agent checks the server name) and picked up by its certificate reloader.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};
use dr_tests::TestCluster;
use dr_tests::harness::process::{ChildGuard, ChildSpec};
use serde_json::Value;
use tracing::info;

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn output(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Two namespaces joined by a veth pair; both deleted on drop.
pub struct Netns {
    pub host: String,
    pub peer: String,
    pub host_ip: String,
    pub peer_ip: String,
}

impl Netns {
    pub fn create() -> Netns {
        let id: u32 = rand::random::<u32>() % 0xffff;
        let subnet = 1 + (id % 250);
        let n = Netns {
            host: format!("dr-e2e-{id:04x}-h"),
            peer: format!("dr-e2e-{id:04x}-p"),
            host_ip: format!("10.204.{subnet}.1"),
            peer_ip: format!("10.204.{subnet}.2"),
        };
        run(&["ip", "netns", "add", &n.host]);
        run(&["ip", "netns", "add", &n.peer]);
        let (vh, vp) = (format!("dre{id:04x}h"), format!("dre{id:04x}p"));
        run(&[
            "ip", "link", "add", &vh, "netns", &n.host, "type", "veth", "peer", "name", &vp,
            "netns", &n.peer,
        ]);
        for (ns, dev, ip) in [(&n.host, &vh, &n.host_ip), (&n.peer, &vp, &n.peer_ip)] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        n
    }

    pub fn nft(&self, args: &[&str]) -> String {
        let mut argv = vec!["ip", "netns", "exec", &self.host, "nft"];
        argv.extend_from_slice(args);
        output(&argv)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.host, &self.peer] {
            let _already_gone = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns`; sockets it creates stay there.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Answers every connection with "hello\n". The thread ends with the process.
fn serve(listener: TcpListener) {
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let _peer_may_have_left = s.write_all(b"hello\n");
        }
    });
}

/// Copies both ways between every accepted connection and `to` (dialled from the root
/// namespace, whatever namespace the listener lives in).
fn forward(listener: TcpListener, to: SocketAddr) {
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(a) = s else { return };
            std::thread::spawn(move || {
                let Ok(b) = TcpStream::connect(to) else {
                    return;
                };
                let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else {
                    return;
                };
                let (mut a, mut b) = (a, b);
                let up = std::thread::spawn(move || {
                    let _closed = std::io::copy(&mut a2, &mut b2);
                    let _gone = b2.shutdown(std::net::Shutdown::Write);
                });
                let _closed = std::io::copy(&mut b, &mut a);
                let _gone = a.shutdown(std::net::Shutdown::Write);
                let _joined = up.join();
            });
        }
    });
}

/// Connects from inside `ns` and reads the greeting; `Err` when the flow is blocked.
fn try_connect(ns: &str, addr: SocketAddr) -> Result<(), String> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(700))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        (&buf == b"hello\n")
            .then_some(())
            .ok_or("bad greeting".into())
    })
}

const OPERATOR_RULES: &str = "table inet operator {
	chain input {
		type filter hook input priority 0; policy accept;
		tcp dport 9999 drop
	}
}
";

fn q(s: &str) -> String {
    format!("{s:?}")
}

async fn drctl_ok(cluster: &TestCluster, args: &[&str]) -> Result<String> {
    let out = cluster.drctl(args).await?;
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    anyhow::ensure!(out.status.success(), "drctl {args:?} failed:\n{so}\n{se}");
    Ok(so)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_isolate_through_drctl_keeps_the_session_and_restores_exactly() -> Result<()> {
    if Command::new("nft").arg("--version").output().is_err() {
        panic!("nftables is not installed on this machine: apt-get install -y nftables");
    }
    let ns = Netns::create();
    let cluster = TestCluster::builder().coordinators(1).start().await?;

    // --- the coordinator also answers to the peer address (re-issued, reloaded live)
    cluster
        .pki
        .issue(
            "coordinator",
            "1",
            &[
                "--ip",
                "127.0.0.1",
                "--ip",
                &ns.peer_ip,
                "--dns",
                "localhost",
            ],
        )
        .await?;
    let coord = cluster.coord_listen(1)?;
    let fwd_addr: SocketAddr = format!("{}:7443", ns.peer_ip).parse()?;
    let fwd = in_ns(&ns.peer, move || TcpListener::bind(fwd_addr).unwrap());
    forward(fwd, coord);

    // --- the host namespace: operator rules, an app and a management listener
    let app: SocketAddr = format!("{}:8080", ns.host_ip).parse()?;
    let mgmt: SocketAddr = format!("{}:2222", ns.host_ip).parse()?;
    let rules = cluster.dir().join("operator.nft");
    std::fs::write(&rules, OPERATOR_RULES)?;
    ns.nft(&["-f", rules.to_str().context("utf-8 path")?]);
    for a in [app, mgmt] {
        serve(in_ns(&ns.host, move || TcpListener::bind(a).unwrap()));
    }
    try_connect(&ns.peer, app).map_err(anyhow::Error::msg)?;
    let before = ns.nft(&["list", "ruleset"]);
    assert!(before.contains("table inet operator"), "{before}");

    // --- dr-agent inside the host namespace, dialling the coordinator across the veth
    let host = "iso-1";
    let certs = cluster.pki.agent(host).await?;
    let data = cluster.dir().join("agent-iso-1");
    std::fs::create_dir_all(&data)?;
    let config = cluster.dir().join("agent-iso-1.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\nhost_id = \"{host}\"\nregion = \"beijing\"\nsite = \"dc1\"\nroles = [\"app\"]\n\
             coordinators = [{}]\ndata_dir = {}\nlog_format = \"text\"\n\
             \n[tls]\nca = {}\ncert = {}\nkey = {}\nreload_interval = \"1s\"\n\
             \n[session]\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nconnect_timeout = \"2s\"\n",
            q(&fwd_addr.to_string()),
            q(&data.display().to_string()),
            q(&cluster.pki.ca().display().to_string()),
            q(&certs.cert.display().to_string()),
            q(&certs.key.display().to_string()),
        ),
    )?;
    let spec = ChildSpec::new("agent-iso-1", "ip", cluster.dir().log_path("agent-iso-1"))
        .args([
            "netns".to_string(),
            "exec".to_string(),
            ns.host.clone(),
            cluster.bins.agent.display().to_string(),
            "--config".to_string(),
            config.display().to_string(),
        ])
        .env("RUST_LOG", "info")
        .cwd(cluster.dir().path());
    let mut agent = ChildGuard::spawn(spec)?;
    cluster.wait_agents_connected(&[host.to_string()]).await?;
    info!("--- agent connected from inside the namespace");

    // --- isolate through drctl
    let allow = format!("{}/32:2222", ns.peer_ip);
    let out = drctl_ok(
        &cluster,
        &[
            "isolate",
            "--host",
            host,
            "--reason",
            "suspected breach",
            "--allow-mgmt",
            &allow,
        ],
    )
    .await?;
    info!(%out, "isolated");
    assert!(out.contains(host) && out.contains("ok"), "{out}");
    let isolated = ns.nft(&["list", "ruleset"]);
    assert!(isolated.contains("dr_isolation"), "{isolated}");

    // A new connection from elsewhere is refused; the named management source is not.
    let refused = try_connect(&ns.peer, app);
    assert!(refused.is_err(), "app port still reachable while isolated");
    try_connect(&ns.peer, mgmt).map_err(anyhow::Error::msg)?;

    // The coordinator session stays up: the agent is connected and runs a command.
    cluster.wait_agents_connected(&[host.to_string()]).await?;
    let checks = drctl_ok(&cluster, &["run", "--host", host, "checks"]).await?;
    info!(%checks, "command ran while isolated");

    // The isolation is committed and shown.
    let sec: Value = serde_json::from_str(
        &drctl_ok(&cluster, &["security", "status", "--output", "json"]).await?,
    )?;
    let iso = sec["isolated"].as_array().context("isolated list")?;
    assert_eq!(iso.len(), 1, "{sec}");
    assert_eq!(iso[0]["host_id"], host);
    assert_eq!(iso[0]["reason"], "suspected breach");
    let status = drctl_ok(&cluster, &["status"]).await?;
    assert!(
        status.contains("ISOLATED HOST") && status.contains(host),
        "{status}"
    );
    let shown = drctl_ok(&cluster, &["agents", "show", host]).await?;
    assert!(
        shown.contains("isolation: ISOLATED since") && shown.contains("suspected breach"),
        "{shown}"
    );

    // --- a selector that matches nothing and a missing selector are refused clearly
    let out = cluster.drctl(["isolate"]).await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--host"));

    // --- unisolate restores the ruleset byte for byte
    let out = drctl_ok(&cluster, &["unisolate", "--host", host]).await?;
    info!(%out, "unisolated");
    let after = ns.nft(&["list", "ruleset"]);
    assert_eq!(after, before, "ruleset not restored byte for byte");
    try_connect(&ns.peer, app).map_err(anyhow::Error::msg)?;
    let sec: Value = serde_json::from_str(
        &drctl_ok(&cluster, &["security", "status", "--output", "json"]).await?,
    )?;
    assert!(
        sec["isolated"].as_array().is_none_or(Vec::is_empty),
        "{sec}"
    );
    let shown = drctl_ok(&cluster, &["agents", "show", host]).await?;
    assert!(shown.contains("isolation: not isolated"), "{shown}");

    agent.stop().await?;
    cluster.shutdown().await?;
    Ok(())
}

/// The request id (`R-N`) named in a "needs approval" answer.
fn request_id(err: &str) -> Option<String> {
    let start = err.find("request R-")? + "request ".len();
    Some(
        err[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect(),
    )
}

/// With `isolate` gated, `drctl isolate` parks a request; a second admin's approval
/// launches it, and the isolation record follows the agent's result. The agent runs in the
/// root namespace but its `nft` is pointed into a test namespace (`[isolation] nft`), so the
/// machine's own ruleset is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_gated_isolation_runs_only_after_a_second_admin_approves() -> Result<()> {
    if Command::new("nft").arg("--version").output().is_err() {
        panic!("nftables is not installed on this machine: apt-get install -y nftables");
    }
    let ns = Netns::create();
    let host = "gated-1";
    let mut agent = dr_tests::harness::cluster::AgentSpec::new(host);
    agent.extra_toml = format!(
        "\n[isolation]\nnft = [\"ip\", \"netns\", \"exec\", {}, \"nft\"]\n",
        q(&ns.host)
    );
    let cluster = TestCluster::builder()
        .coordinators(1)
        .agent(agent)
        .start()
        .await?;
    let endpoints = vec![cluster.coord_listen(1)?.to_string()];
    let bob = cluster.pki.operator("bob", "admin").await?;
    let bob = cluster.write_drctl_config("bob", &endpoints, &bob)?;
    drctl_ok(
        &cluster,
        &["approvals", "policy", "set", "--require", "isolate"],
    )
    .await?;
    let before = ns.nft(&["list", "ruleset"]);

    // --- the request is parked: nothing is isolated
    let out = cluster
        .drctl(["isolate", "--host", host, "--reason", "INC-7"])
        .await?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "isolation ran without approval");
    let id = request_id(&err).with_context(|| format!("no request id in: {err}"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ns.nft(&["list", "ruleset"]),
        before,
        "isolated before approval"
    );

    // --- the requester cannot approve; a second admin can
    let own = cluster.drctl(["approve", &id]).await?;
    assert!(!own.status.success(), "self-approval accepted");
    let ok = cluster.drctl_with(&bob, ["approve", &id]).await?;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    dr_tests::harness::wait::wait_until(
        "the approved isolation is installed and recorded",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || async {
            let sec: Value = serde_json::from_str(
                &drctl_ok(&cluster, &["security", "status", "--output", "json"]).await?,
            )?;
            let recorded = sec["isolated"]
                .as_array()
                .is_some_and(|v| v.iter().any(|i| i["host_id"] == host));
            let installed = ns.nft(&["list", "ruleset"]).contains("dr_isolation");
            Ok((recorded && installed).then_some(()))
        },
    )
    .await?;

    // --- unisolate is not gated and restores the namespace's ruleset exactly
    drctl_ok(&cluster, &["unisolate", "--host", host]).await?;
    assert_eq!(ns.nft(&["list", "ruleset"]), before);
    cluster.shutdown().await?;
    Ok(())
}
