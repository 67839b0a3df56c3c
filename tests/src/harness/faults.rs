//! The fault layer: a TCP proxy in front of every coordinator, with per-link rules.
//!
//! Why this shape: a Raft cluster agrees on ONE address per member, so "node 1 cannot
//! reach node 2 but node 3 can" cannot be built from per-source proxy addresses. Instead
//! there is one proxy per destination, every node (peers, agents) is configured with the
//! proxies' addresses, and each accepted connection is attributed to the child process
//! that opened it (its socket inode in `/proc/net/tcp` is looked up among the fds of the
//! registered child PIDs). A rule applies to the directed link `source -> destination`:
//!
//! ```text
//!   coord-1 ──► proxy(coord-2) ──► coord-2        rule (coord-1, coord-2): Forward
//!   agent-h1 ─► proxy(coord-2) ──► coord-2        rule (agent-h1, coord-2): Cut
//!   drctl ────► proxy(coord-2) ──► coord-2        unregistered source "client": Forward
//! ```
//!
//! Modes: `Forward`, `Delay(d)` (every chunk waits `d`), `Blackhole` (the connection stays
//! open but data is discarded: the peer sees silence, as in a real partition) and `Cut`
//! (existing connections are closed at once, new ones accepted and closed). Changing a rule
//! applies to connections already open, not only to new ones. Regions are groups: every
//! node is registered with its region, and [`FaultNet::cut_region`] cuts all links between
//! the region and the rest in both directions.
//!
//! Cutting a directed link closes the whole TCP connection (both directions): TCP has no
//! half-partition. Processes the harness did not start (drctl run by a test) are
//! `"client"` and always forwarded unless a rule names `"client"`.
//!
//! Distance: [`FaultNet::set_region_latency`] gives every link between two different
//! regions a one-way delay (15 ms = the 30 ms round trip of beijing-shanghai) wherever no
//! explicit rule says otherwise, and [`FaultNet::heal`] keeps it (healed regions are still
//! far apart). A delayed chunk is timestamped when read and written when its time comes,
//! so the delay is latency, not a throughput cap.
//!
//! Links of processes that are not the harness's children (PostgreSQL's WAL receiver
//! streaming from the primary) go through [`FaultNet::add_proxy_as`]: every connection to
//! that proxy counts as coming from one named node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Name used for connections from processes the harness did not start.
pub const CLIENT: &str = "client";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMode {
    Forward,
    Delay(Duration),
    Blackhole,
    Cut,
}

#[derive(Default)]
struct Tables {
    /// (source, destination) -> mode; absent = Forward.
    rules: HashMap<(String, String), LinkMode>,
    /// child PID -> node name.
    pids: HashMap<u32, String>,
    /// node name -> region.
    regions: HashMap<String, String>,
    /// One-way delay of links between different regions (absent a rule).
    region_latency: Option<Duration>,
}

struct Shared {
    tables: RwLock<Tables>,
    /// Bumped on every rule change so open connections re-check their mode.
    generation: watch::Sender<u64>,
}

impl Shared {
    fn mode(&self, src: &str, dst: &str) -> LinkMode {
        let t = self.tables.read().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = t.rules.get(&(src.to_owned(), dst.to_owned())) {
            return *m;
        }
        match (t.region_latency, t.regions.get(src), t.regions.get(dst)) {
            (Some(d), Some(a), Some(b)) if a != b => LinkMode::Delay(d),
            _ => LinkMode::Forward,
        }
    }
}

/// Owner of all proxies of one test; dropping it stops them.
pub struct FaultNet {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    proxies: HashMap<String, SocketAddr>,
}

impl Default for FaultNet {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultNet {
    pub fn new() -> Self {
        let (generation, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                tables: RwLock::new(Tables::default()),
                generation,
            }),
            cancel: CancellationToken::new(),
            proxies: HashMap::new(),
        }
    }

    /// Declares a node and its region (its group for [`FaultNet::cut_region`]).
    pub fn register_node(&self, name: &str, region: &str) {
        let mut t = self
            .shared
            .tables
            .write()
            .unwrap_or_else(|p| p.into_inner());
        t.regions.insert(name.to_owned(), region.to_owned());
    }

    /// Attributes connections opened by `pid` to `name` (call after every (re)start).
    pub fn register_pid(&self, pid: u32, name: &str) {
        let mut t = self
            .shared
            .tables
            .write()
            .unwrap_or_else(|p| p.into_inner());
        t.pids.retain(|_, n| n != name);
        t.pids.insert(pid, name.to_owned());
    }

    /// Starts a proxy for destination `name` that forwards to `target`; returns the address
    /// everybody should dial instead of `target`.
    pub async fn add_proxy(&mut self, name: &str, target: SocketAddr) -> Result<SocketAddr> {
        self.spawn_proxy(name, target, None).await
    }

    /// A proxy for destination `name` whose every connection counts as coming from node
    /// `source` (for a process the harness did not start, e.g. a PostgreSQL standby's WAL
    /// receiver: point its `primary_conninfo` at the returned address). Register both
    /// names with [`FaultNet::register_node`] so region cuts and latency apply.
    pub async fn add_proxy_as(
        &mut self,
        name: &str,
        source: &str,
        target: SocketAddr,
    ) -> Result<SocketAddr> {
        self.spawn_proxy(name, target, Some(source.to_owned()))
            .await
    }

    async fn spawn_proxy(
        &mut self,
        name: &str,
        target: SocketAddr,
        source: Option<String>,
    ) -> Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind a proxy port")?;
        let addr = listener.local_addr()?;
        info!(dest = name, %addr, %target, ?source, "proxy");
        tokio::spawn(accept_loop(
            listener,
            name.to_owned(),
            target,
            source,
            self.shared.clone(),
            self.cancel.child_token(),
        ));
        self.proxies.insert(name.to_owned(), addr);
        Ok(addr)
    }

    /// Every link between two different regions gets `one_way` delay, unless a rule for
    /// that link says otherwise (a cut stays a cut). `None` removes the distance.
    pub fn set_region_latency(&self, one_way: Option<Duration>) {
        info!(?one_way, "inter-region latency (one way)");
        {
            let mut t = self
                .shared
                .tables
                .write()
                .unwrap_or_else(|p| p.into_inner());
            t.region_latency = one_way;
        }
        self.changed();
    }

    /// The mode the link `from -> to` has now (rules, then region latency).
    pub fn link_mode(&self, from: &str, to: &str) -> LinkMode {
        self.shared.mode(from, to)
    }

    /// The proxy address in front of `name`.
    pub fn proxy_addr(&self, name: &str) -> Option<SocketAddr> {
        self.proxies.get(name).copied()
    }

    fn changed(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Sets the mode of the directed link `from -> to`.
    pub fn set_link(&self, from: &str, to: &str, mode: LinkMode) {
        info!(from, to, ?mode, "link");
        {
            let mut t = self
                .shared
                .tables
                .write()
                .unwrap_or_else(|p| p.into_inner());
            t.rules.insert((from.to_owned(), to.to_owned()), mode);
        }
        self.changed();
    }

    /// Sets both directions between `a` and `b`.
    pub fn set_links_between(&self, a: &str, b: &str, mode: LinkMode) {
        self.set_link(a, b, mode);
        self.set_link(b, a, mode);
    }

    /// Every registered node other than `node`.
    fn others(&self, node: &str) -> Vec<String> {
        let t = self.shared.tables.read().unwrap_or_else(|p| p.into_inner());
        t.regions.keys().filter(|n| *n != node).cloned().collect()
    }

    /// Applies `mode` to every link between `node` and every other registered node.
    pub fn isolate(&self, node: &str, mode: LinkMode) {
        info!(node, ?mode, "--- fault: isolate node");
        for other in self.others(node) {
            self.set_links_between(node, &other, mode);
        }
    }

    /// Cuts every link between the nodes of `region` and all other nodes.
    pub fn cut_region(&self, region: &str) {
        info!(region, "--- fault: cut region off");
        let (inside, outside): (Vec<String>, Vec<String>) = {
            let t = self.shared.tables.read().unwrap_or_else(|p| p.into_inner());
            let inside = t
                .regions
                .iter()
                .filter(|(_, r)| *r == region)
                .map(|(n, _)| n.clone());
            let outside = t
                .regions
                .iter()
                .filter(|(_, r)| *r != region)
                .map(|(n, _)| n.clone());
            (inside.collect(), outside.collect())
        };
        for a in &inside {
            for b in &outside {
                self.set_links_between(a, b, LinkMode::Cut);
            }
        }
    }

    /// Removes every rule: all links forward again (with the region latency, if set).
    pub fn heal(&self) {
        info!("--- fault: heal all links");
        {
            let mut t = self
                .shared
                .tables
                .write()
                .unwrap_or_else(|p| p.into_inner());
            t.rules.clear();
        }
        self.changed();
    }
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    dest: String,
    target: SocketAddr,
    source: Option<String>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let proxy_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else {
            continue;
        };
        let shared = shared.clone();
        let dest = dest.clone();
        let source = source.clone();
        let cancel = cancel.child_token();
        tokio::spawn(async move {
            if let Some(src) = source {
                if shared.mode(&src, &dest) == LinkMode::Cut {
                    debug!(%src, %dest, "connection refused by a cut link");
                    return;
                }
                let Ok(Ok(upstream)) =
                    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await
                else {
                    return;
                };
                stream.set_nodelay(true).ok();
                upstream.set_nodelay(true).ok();
                pump_both(stream, upstream, &src, &dest, &shared, cancel).await;
                return;
            }
            let pids: Vec<(u32, String)> = {
                let t = shared.tables.read().unwrap_or_else(|p| p.into_inner());
                t.pids.iter().map(|(p, n)| (*p, n.clone())).collect()
            };
            let src = tokio::task::spawn_blocking(move || owner_of(peer, proxy_port, &pids))
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| CLIENT.to_owned());
            if shared.mode(&src, &dest) == LinkMode::Cut {
                debug!(%src, %dest, "connection refused by a cut link");
                return;
            }
            let Ok(Ok(upstream)) =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await
            else {
                debug!(%src, %dest, "destination unreachable");
                return;
            };
            stream.set_nodelay(true).ok();
            upstream.set_nodelay(true).ok();
            pump_both(stream, upstream, &src, &dest, &shared, cancel).await;
        });
    }
}

async fn pump_both(
    client: TcpStream,
    upstream: TcpStream,
    src: &str,
    dest: &str,
    shared: &Arc<Shared>,
    cancel: CancellationToken,
) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let conn = cancel.child_token();
    let a = pump(cr, uw, src, dest, shared.clone(), conn.clone());
    let b = pump(ur, cw, src, dest, shared.clone(), conn.clone());
    tokio::join!(a, b);
}

/// Copies one direction of a connection, obeying the (src, dest) rule at every chunk and at
/// every rule change. A Cut cancels `conn`, which ends both directions. Chunks go through a
/// queue to a writer that holds each until its due time: a delay adds latency to every
/// chunk without making the next read wait.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    src: &str,
    dest: &str,
    shared: Arc<Shared>,
    conn: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let writer = {
        let conn = conn.clone();
        async move {
            while let Some((due, chunk)) = tokio::select! {
                _ = conn.cancelled() => None,
                c = rx.recv() => c,
            } {
                tokio::select! {
                    _ = conn.cancelled() => return,
                    _ = tokio::time::sleep_until(due) => {}
                }
                let write = to.write_all(&chunk);
                tokio::select! {
                    _ = conn.cancelled() => return,
                    r = write => if r.is_err() { conn.cancel(); return; },
                }
            }
            // The reader saw the end of the stream: pass it on once the data is out.
            to.shutdown().await.ok();
        }
    };
    let reader = async move {
        let mut gen_rx = shared.generation.subscribe();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if shared.mode(src, dest) == LinkMode::Cut {
                conn.cancel();
                return;
            }
            let n = tokio::select! {
                _ = conn.cancelled() => return,
                changed = gen_rx.changed() => {
                    if changed.is_err() { conn.cancel(); return; }
                    continue;
                }
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
            };
            let now = tokio::time::Instant::now();
            let due = match shared.mode(src, dest) {
                LinkMode::Forward => now,
                LinkMode::Delay(d) => now + d,
                LinkMode::Blackhole => continue,
                LinkMode::Cut => {
                    conn.cancel();
                    return;
                }
            };
            let send = tx.send((due, buf[..n].to_vec()));
            tokio::select! {
                _ = conn.cancelled() => return,
                r = send => if r.is_err() { return; },
            }
        }
        // Dropping `tx` here lets the writer finish the queue and shut down.
    };
    tokio::join!(reader, writer);
}

/// Which registered child opened the connection from `peer` to our `proxy_port`: find the
/// socket's inode in /proc/net/tcp{,6}, then the PID holding that inode among `pids`.
fn owner_of(peer: SocketAddr, proxy_port: u16, pids: &[(u32, String)]) -> Option<String> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|table| socket_inode(&table, peer.port(), proxy_port))?;
    let needle = format!("socket:[{inode}]");
    for (pid, name) in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == needle.as_str()) {
                return Some(name.clone());
            }
        }
    }
    None
}

/// Inode of the socket whose local port is `local` and remote port is `remote`.
fn socket_inode(table: &str, local: u16, remote: u16) -> Option<u64> {
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && port(f[1]) == Some(local) && port(f[2]) == Some(remote) {
            f[9].parse().ok().filter(|i| *i != 0)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_latency_applies_between_regions_unless_a_rule_says_otherwise() {
        let net = FaultNet::new();
        net.register_node("a1", "beijing");
        net.register_node("a2", "beijing");
        net.register_node("b1", "shanghai");
        let d = Duration::from_millis(15);
        assert_eq!(net.link_mode("a1", "b1"), LinkMode::Forward);
        net.set_region_latency(Some(d));
        assert_eq!(net.link_mode("a1", "b1"), LinkMode::Delay(d));
        assert_eq!(net.link_mode("b1", "a1"), LinkMode::Delay(d));
        assert_eq!(net.link_mode("a1", "a2"), LinkMode::Forward);
        assert_eq!(net.link_mode(CLIENT, "a1"), LinkMode::Forward);
        net.cut_region("beijing");
        assert_eq!(net.link_mode("a1", "b1"), LinkMode::Cut);
        net.heal();
        assert_eq!(
            net.link_mode("a1", "b1"),
            LinkMode::Delay(d),
            "heal keeps the distance"
        );
        net.set_region_latency(None);
        assert_eq!(net.link_mode("a1", "b1"), LinkMode::Forward);
    }

    /// A delayed link delays both directions of a proxied connection (an echo comes back
    /// after at least a round trip) and still delivers every byte in order.
    #[tokio::test]
    async fn delay_applies_to_both_directions() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut net = FaultNet::new();
        let proxy = net.add_proxy_as("dst", "src", target).await.unwrap();
        net.register_node("dst", "beijing");
        net.register_node("src", "shanghai");
        net.set_region_latency(Some(Duration::from_millis(100)));
        let mut c = TcpStream::connect(proxy).await.unwrap();
        let started = tokio::time::Instant::now();
        for _ in 0..20 {
            c.write_all(b"x").await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let first = loop {
            let n = c.read(&mut buf).await.unwrap();
            if n > 0 {
                got.extend_from_slice(&buf[..n]);
                break started.elapsed();
            }
        };
        while got.len() < 20 {
            let n = c.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert!(first >= Duration::from_millis(200), "echo after {first:?}");
        assert_eq!(got, vec![b'x'; 20]);
    }

    #[test]
    fn parses_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(socket_inode(table, 0x1F90, 0xA1B2), Some(4242));
        assert_eq!(socket_inode(table, 0xA1B2, 0x1F90), None);
    }
}
