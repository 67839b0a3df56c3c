//! The demo's steps. Each is `async fn(&mut Demo) -> anyhow::Result<()>`; each waits for
//! an observable condition with a deadline (never a bare sleep), and fails with what it
//! saw last and where the logs are.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dr_proto::pb;

use super::process::ChildGuard;
use super::{Demo, secs};
use crate::client::Client;
use crate::cmd::{agents, cluster, status};

const START_DEADLINE: Duration = Duration::from_secs(30);
const ELECTION_DEADLINE: Duration = Duration::from_secs(30);
const AGENTS_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);

/// `dr-coordinator` and `dr-agent` next to this executable (cargo puts all workspace
/// binaries in one target directory). Tests run from `target/debug/deps`, hence the parent.
pub fn find_binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context("find the drctl executable")?;
    let dir = exe.parent().context("drctl executable has no directory")?;
    let mut candidates = vec![dir.to_path_buf()];
    if dir.ends_with("deps")
        && let Some(parent) = dir.parent()
    {
        candidates.push(parent.to_path_buf());
    }
    for d in &candidates {
        let (c, a) = (d.join("dr-coordinator"), d.join("dr-agent"));
        if std::fs::metadata(&c).is_ok() && std::fs::metadata(&a).is_ok() {
            return Ok((c, a));
        }
    }
    anyhow::bail!(
        "dr-coordinator and dr-agent were not found next to drctl in {}; run `cargo build --workspace` first, \
         then `target/debug/drctl demo`",
        dir.display()
    )
}

/// Polls `probe` every [`POLL`] until it returns `Ok(Some(_))`, `deadline` passes, or a
/// child dies. `Ok(None)` means "not yet" and its last reason is kept for the error.
async fn wait_until<T, F, Fut>(
    demo: &mut Demo,
    what: &str,
    deadline: Duration,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut(Client) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let end = Instant::now() + deadline;
    loop {
        demo.check_children()?;
        let last = match probe(demo.client.clone()).await {
            Ok(v) => return Ok(v),
            Err(why) => why,
        };
        if Instant::now() >= end {
            anyhow::bail!(
                "{what}: not done after {}; last seen: {last}; logs in {}",
                secs(deadline),
                demo.layout.logs_dir().display()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn start_coordinators(demo: &mut Demo) -> anyhow::Result<()> {
    for n in demo.layout.nodes.clone() {
        let name = n.name();
        let args = vec![
            "--config".to_string(),
            demo.layout.config_path(&name).display().to_string(),
        ];
        let g = ChildGuard::spawn(
            &name,
            &demo.coordinator_bin,
            &args,
            &demo.layout.log_path(&name),
        )?;
        println!(
            "    {name} ({}) pid {} on {}",
            n.region,
            g.pid().unwrap_or(0),
            n.endpoint()
        );
        demo.procs.insert(name, g);
    }
    let endpoints = demo.layout.endpoints();
    wait_until(demo, "coordinators listening", START_DEADLINE, |_| {
        let endpoints = endpoints.clone();
        async move {
            for ep in &endpoints {
                crate::client::probe(ep, Duration::from_millis(500))
                    .await
                    .map_err(|e| format!("{ep}: {e}"))?;
            }
            Ok(())
        }
    })
    .await
}

pub async fn init_cluster(demo: &mut Demo) -> anyhow::Result<()> {
    let members: Vec<pb::Member> = demo
        .layout
        .nodes
        .iter()
        .map(|n| pb::Member {
            node_id: n.node_id,
            addr: n.endpoint(),
            region: n.region.to_string(),
        })
        .collect();
    let resp = cluster::init(&demo.client, members)
        .await
        .context("cluster init")?;
    tracing::info!(leader = resp.leader_id, "cluster initialised");
    let leader = wait_until(
        demo,
        "a leader with 3 voters",
        ELECTION_DEADLINE,
        |client| async move {
            let s = cluster::cluster_status(&client, false)
                .await
                .map_err(|e| e.to_string())?;
            let voters = s.members.iter().filter(|m| m.voter).count();
            if s.leader_id != 0 && voters == 3 {
                Ok(s.leader_id)
            } else {
                Err(format!("leader {}, {voters} voters", s.leader_id))
            }
        },
    )
    .await?;
    println!("    coordinator {leader} leads");
    Ok(())
}

pub async fn start_agents(demo: &mut Demo) -> anyhow::Result<()> {
    for h in demo.layout.hosts.clone() {
        let name = h.name();
        let args = vec![
            "--config".to_string(),
            demo.layout.config_path(&name).display().to_string(),
        ];
        let g = ChildGuard::spawn(&name, &demo.agent_bin, &args, &demo.layout.log_path(&name))?;
        println!(
            "    {name} ({}/{}) pid {}",
            h.region,
            h.site,
            g.pid().unwrap_or(0)
        );
        demo.procs.insert(name, g);
    }
    Ok(())
}

/// The current leader and its endpoint, as seen by whichever coordinator answers.
async fn leader(client: &Client) -> Result<(u64, String), String> {
    let s = cluster::cluster_status(client, false)
        .await
        .map_err(|e| e.to_string())?;
    if s.leader_id == 0 {
        return Err(format!("no leader (term {})", s.term));
    }
    let ep = s
        .members
        .iter()
        .find(|m| m.node_id == s.leader_id)
        .map(|m| m.addr.clone())
        .unwrap_or_default();
    Ok((s.leader_id, ep))
}

/// Live connection facts live in the leader's memory: ask the leader first.
fn leader_first(client: &Client, leader_ep: &str) -> anyhow::Result<Client> {
    let mut cfg = client.config().clone();
    cfg.endpoints.sort_by_key(|e| e != leader_ep);
    Ok(Client::new(cfg)?)
}

pub async fn wait_agents_connected(demo: &mut Demo) -> anyhow::Result<()> {
    let want = demo.layout.hosts.len();
    let start = Instant::now();
    wait_until(
        demo,
        "all agents connected",
        AGENTS_DEADLINE,
        |client| async move {
            let (_, ep) = leader(&client).await?;
            let client = leader_first(&client, &ep).map_err(|e| e.to_string())?;
            let r = agents::list(&client, pb::Selector::default())
                .await
                .map_err(|e| e.to_string())?;
            let connected: Vec<&str> = r
                .agents
                .iter()
                .filter(|a| a.connected)
                .map(|a| a.host_id.as_str())
                .collect();
            if connected.len() >= want {
                Ok(())
            } else {
                Err(format!(
                    "{}/{want} connected ({})",
                    connected.len(),
                    connected.join(", ")
                ))
            }
        },
    )
    .await?;
    println!(
        "    {want} agents connected after {}",
        secs(start.elapsed())
    );
    Ok(())
}

pub async fn print_status(demo: &mut Demo) -> anyhow::Result<()> {
    let s = status::fetch_status(&demo.client, false)
        .await
        .context("status")?;
    let text = status::render_status(&s);
    for line in text.lines() {
        println!("    {line}");
    }
    Ok(())
}

pub async fn kill_leader(demo: &mut Demo) -> anyhow::Result<()> {
    let (old, _) = leader(&demo.client)
        .await
        .map_err(|e| anyhow::anyhow!("find the leader: {e}"))?;
    let name = format!("coordinator-{old}");
    let p = demo
        .procs
        .get_mut(&name)
        .with_context(|| format!("{name} is not a demo process"))?;
    let pid = p.pid().unwrap_or(0);
    p.crash()?;
    demo.killed = Some(old);
    let killed_at = Instant::now();
    println!("    killed coordinator {old} (pid {pid})");
    let new = wait_until(
        demo,
        "a new leader",
        ELECTION_DEADLINE,
        |client| async move {
            match leader(&client).await? {
                (id, _) if id != old => Ok(id),
                (id, _) => Err(format!("still led by {id}")),
            }
        },
    )
    .await?;
    println!(
        "    coordinator {new} elected after {} (kill to new leader seen by drctl)",
        secs(killed_at.elapsed())
    );
    Ok(())
}

pub async fn restart_killed(demo: &mut Demo) -> anyhow::Result<()> {
    let id = demo.killed.context("no coordinator was killed")?;
    let name = format!("coordinator-{id}");
    let p = demo
        .procs
        .get_mut(&name)
        .with_context(|| format!("{name} is not a demo process"))?;
    p.start()?;
    println!("    restarted {name} (pid {})", p.pid().unwrap_or(0));
    demo.killed = None;
    let (lag, index) = wait_until(
        demo,
        "the restarted node to catch up",
        ELECTION_DEADLINE,
        |client| async move {
            let (_, ep) = leader(&client).await?;
            let client = leader_first(&client, &ep).map_err(|e| e.to_string())?;
            let s = cluster::cluster_status(&client, false)
                .await
                .map_err(|e| e.to_string())?;
            let m = s
                .members
                .iter()
                .find(|m| m.node_id == id)
                .ok_or_else(|| format!("node {id} is not a member"))?;
            match (m.lag, m.matched_index, m.reachable) {
                (Some(0), Some(matched), true) => Ok((0, matched)),
                (lag, matched, reachable) => Err(format!(
                    "node {id}: lag {lag:?}, matched {matched:?}, reachable {reachable}"
                )),
            }
        },
    )
    .await?;
    println!("    coordinator {id} is back: matched index {index}, lag {lag}");
    Ok(())
}
