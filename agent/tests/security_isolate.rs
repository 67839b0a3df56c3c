//! Host isolation for real: two network namespaces joined by a veth pair, nftables run
//! inside the "host" namespace through `ip netns exec`, sockets opened in each namespace.
//!
//! ```text
//!   ns "host" 10.203.N.1                      ns "peer" 10.203.N.2
//!     :8080 app listener     <── peer ──       (blocked while isolated)
//!     :2222 management       <── peer ──       (allowed: [isolation] allow)
//!     agent dials out        ── host ──>  :7443 "coordinator" (allowed)
//! ```
//! Needs root, `ip` and `nft` (`apt-get install nftables`). The namespaces are deleted on
//! drop, also when the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dr_agent::actions::{ActionCtx, Progress, Registry};
use dr_agent::config::Config;
use dr_agent::isolate::{self, Nft};
use tokio_util::sync::CancellationToken;

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

/// Two namespaces and a veth pair; deleted on drop.
struct Netns {
    host: String,
    peer: String,
    host_ip: String,
    peer_ip: String,
}

impl Netns {
    fn create() -> Netns {
        let id: u32 = rand::random::<u32>() % 0xffff;
        let subnet = 1 + (id % 250);
        let n = Netns {
            host: format!("dr-test-{id:04x}-h"),
            peer: format!("dr-test-{id:04x}-p"),
            host_ip: format!("10.203.{subnet}.1"),
            peer_ip: format!("10.203.{subnet}.2"),
        };
        // From here on, Drop cleans up whatever was made.
        run(&["ip", "netns", "add", &n.host]);
        run(&["ip", "netns", "add", &n.peer]);
        let (vh, vp) = (format!("drv{id:04x}h"), format!("drv{id:04x}p"));
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

    fn nft(&self, args: &[&str]) -> String {
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

/// Runs `f` on a thread that has entered network namespace `ns` (sockets it creates stay
/// in that namespace whatever thread uses them later).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// A listener answering every connection with "hello\n" then echoing lines.
fn serve(listener: TcpListener) {
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _peer_may_have_left = s.write_all(b"hello\n");
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
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
            .unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        (&buf == b"hello\n")
            .then_some(())
            .ok_or("bad greeting".into())
    })
}

/// Sends one datagram from the peer to the host on `port`; whether it arrived.
fn udp_arrives(ns: &Netns, port: u16) -> bool {
    let to: SocketAddr = format!("{}:{port}", ns.host_ip).parse().unwrap();
    let sock = in_ns(&ns.host, move || std::net::UdpSocket::bind(to).unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    in_ns(&ns.peer, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"x", to).unwrap();
    });
    let mut buf = [0u8; 4];
    sock.recv_from(&mut buf).is_ok()
}

fn ctx() -> ActionCtx {
    ActionCtx {
        key: "t".into(),
        cancel: CancellationToken::new(),
        progress: Progress::new("t", None),
    }
}

const OPERATOR_RULES: &str = "table inet operator {
	set blocked { type ipv4_addr; elements = { 192.0.2.7, 198.51.100.9 } }
	chain input {
		type filter hook input priority 0; policy accept;
		ip saddr @blocked drop
		tcp dport 9999 drop
	}
}
table ip nat_like {
	chain post { type nat hook postrouting priority 100; policy accept; }
}
";

#[tokio::test]
async fn t10_isolate_blocks_new_flows_keeps_coordinator_and_restores_exactly() {
    if Command::new("nft").arg("--version").output().is_err() {
        panic!("nftables is not installed on this machine: apt-get install -y nftables");
    }
    let ns = Netns::create();
    let data = tempfile::tempdir().unwrap();
    let app: SocketAddr = format!("{}:8080", ns.host_ip).parse().unwrap();
    let mgmt: SocketAddr = format!("{}:2222", ns.host_ip).parse().unwrap();
    let coord: SocketAddr = format!("{}:7443", ns.peer_ip).parse().unwrap();

    // --- an operator ruleset in the host namespace, listeners in both namespaces
    {
        let rules = data.path().join("operator.nft");
        std::fs::write(&rules, OPERATOR_RULES).unwrap();
        ns.nft(&["-f", rules.to_str().unwrap()]);
        for a in [app, mgmt] {
            serve(in_ns(&ns.host, move || TcpListener::bind(a).unwrap()));
        }
        serve(in_ns(&ns.peer, move || TcpListener::bind(coord).unwrap()));
    }
    let before = ns.nft(&["list", "ruleset"]);
    assert!(before.contains("table inet operator"), "{before}");

    // --- before isolation everything connects
    try_connect(&ns.peer, app).unwrap();
    try_connect(&ns.peer, mgmt).unwrap();
    try_connect(&ns.host, coord).unwrap();
    // The agent's long-lived session: opened before isolation, must survive it.
    assert!(
        udp_arrives(&ns, 5355),
        "udp reaches the host before isolation"
    );
    let mut session = in_ns(&ns.host, move || {
        let mut s = TcpStream::connect_timeout(&coord, Duration::from_secs(1)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).unwrap();
        s
    });

    let text = format!(
        "version = 1\nhost_id = \"h1\"\nregion = \"r\"\nsite = \"s\"\ncoordinators = [\"https://{coord}\"]\ndata_dir = \"{}\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[isolation]\nallow = [\"{}/32:2222\"]\n",
        data.path().display(),
        ns.peer_ip
    );
    let config = Arc::new(Config::parse(&text, &data.path().join("agent.toml")).unwrap());
    let config_data_dir = config.data_dir.clone();
    let mut reg = Registry::default();
    isolate::register(
        &mut reg,
        config,
        Nft::with_argv(
            ["ip", "netns", "exec", &ns.host, "nft"]
                .map(String::from)
                .to_vec(),
        ),
    );

    // --- isolate
    {
        let out = reg.call("isolate", HashMap::new(), ctx()).await;
        assert!(out.success, "{out:?}");
        assert_eq!(out.details["already_isolated"], "false");
        let saved_path = &out.details["saved_ruleset_path"];
        assert_eq!(std::fs::read_to_string(saved_path).unwrap(), before);
        assert_eq!(out.details["saved_ruleset"], before);
        assert_eq!(out.details["coordinators"], coord.to_string());
        let now = ns.nft(&["list", "ruleset"]);
        assert!(now.contains("table inet dr_isolation"), "{now}");
        assert!(
            now.starts_with(before.trim_end()),
            "operator rules untouched:\n{now}"
        );

        let blocked = try_connect(&ns.peer, app);
        assert!(blocked.is_err(), "new flow to the app port must be dropped");
        try_connect(&ns.peer, mgmt).expect("[isolation] allow keeps the management port");
        try_connect(&ns.host, coord).expect("new coordinator session still dials out");
        session.write_all(b"ping\n").unwrap();
        let mut buf = [0u8; 5];
        session
            .read_exact(&mut buf)
            .expect("established session survives isolation");
        assert_eq!(&buf, b"ping\n");
        assert!(!udp_arrives(&ns, 5353), "udp from the peer is dropped too");
    }

    // --- isolating twice keeps the first saved ruleset
    {
        let out = reg.call("isolate", HashMap::new(), ctx()).await;
        assert!(out.success, "{out:?}");
        assert_eq!(out.details["already_isolated"], "true");
        assert_eq!(out.details["saved_ruleset"], before);
        let refused = reg
            .call(
                "isolate",
                HashMap::from([("allow".to_string(), "0.0.0.0/0".to_string())]),
                ctx(),
            )
            .await;
        assert!(
            !refused.success && refused.message.contains("admits every source"),
            "{refused:?}"
        );
        let unknown = reg
            .call(
                "isolate",
                HashMap::from([("ports".to_string(), "22".to_string())]),
                ctx(),
            )
            .await;
        assert!(
            !unknown.success && unknown.message.contains("takes only allow"),
            "{unknown:?}"
        );
    }

    // --- a reboot (ruleset back to the operator's) does not lift isolation
    {
        let boot = data.path().join("boot.nft");
        std::fs::write(&boot, format!("flush ruleset\n{OPERATOR_RULES}")).unwrap();
        ns.nft(&["-f", boot.to_str().unwrap()]);
        try_connect(&ns.peer, app).expect("after the 'reboot' the app port is open");
        let iso = isolate::Isolator::new(
            Nft::with_argv(
                ["ip", "netns", "exec", &ns.host, "nft"]
                    .map(String::from)
                    .to_vec(),
            ),
            &config_data_dir,
            "h1",
        );
        let coords = isolate::resolve_coordinators(&[coord.to_string()])
            .await
            .unwrap();
        assert!(iso.reapply_if_isolated(&coords, &[]).await.unwrap());
        assert!(try_connect(&ns.peer, app).is_err(), "isolated again");
        assert!(
            !iso.reapply_if_isolated(&coords, &[]).await.unwrap(),
            "idempotent"
        );
    }

    // --- unisolate restores byte for byte
    {
        let out = reg.call("unisolate", HashMap::new(), ctx()).await;
        assert!(out.success, "{out:?}");
        assert_eq!(out.details["identical"], "true");
        assert_eq!(ns.nft(&["list", "ruleset"]), before);
        try_connect(&ns.peer, app).expect("app port reachable again");
        assert!(udp_arrives(&ns, 5354), "udp flows again");
        let again = reg.call("unisolate", HashMap::new(), ctx()).await;
        assert!(
            again.success && again.details["restored"] == "false",
            "{again:?}"
        );
    }
}
