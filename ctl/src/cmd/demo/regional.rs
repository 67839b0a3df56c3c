//! The demo's automatic regional failover: beijing (its coordinator, its agents and its
//! PostgreSQL primary) is cut off while a writer runs; the coordinators in shanghai and the
//! witness declare the region failed and promote shanghai on their own; the writer's log
//! gives the RTO (cut to the first write acknowledged by shanghai) and the RPO (acknowledged
//! writes missing on shanghai).
//!
//! Why the cut is a freeze (SIGSTOP of every beijing process, by PID) and not a network cut:
//! the demo runs unprivileged on loopback, where no netns or nftables is at hand. A frozen
//! process keeps its sockets open and answers nothing, which is what a partitioned region
//! looks like from outside (unlike a kill, whose connection resets are a strong hint no
//! partition gives). The price: beijing cannot fence itself while frozen; it does so the
//! moment it is thawed (its lease ran out), which the heal step shows. The fault-layer cut
//! with a live, self-fencing beijing is tests/tests/failover/t30_region_cut.rs.
//!
//! Invariant: every PID frozen here is in [`super::Demo::frozen`], and `Demo::stop_all`
//! thaws them before stopping anything (a stopped process would ignore SIGTERM).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::Mutex;

use super::pg::{PgServer, indent, psql};
use super::{Demo, secs};

/// Rows of this writer start here (the switchover's writer used 1, 2, ...).
const FIRST_ID: u64 = 1_000_000;
/// One row offered every this often.
const EVERY: Duration = Duration::from_millis(100);
/// How long the automatic failover may take before the step fails.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(90);

/// Runs this drctl with `config`; stdout and stderr as one text; fails on a non-zero exit.
async fn drctl_with(config: &Path, args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("find the drctl executable")?;
    let out = Command::new(exe)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("run drctl")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("drctl {} failed:\n{text}", args.join(" "));
    }
    Ok(text)
}

/// Waits until `host`'s agent reports `fact` = `value` (through `drctl agents show`).
async fn wait_fact(
    config: &Path,
    host: &str,
    fact: &str,
    value: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let end = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < end {
        if let Ok(out) = drctl_with(config, &["agents", "show", host, "--output", "json"]).await
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&out)
        {
            let seen = v["facts"][fact].as_str().unwrap_or_default().to_owned();
            if seen == value {
                return Ok(());
            }
            last = seen;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!(
        "{host} does not report {fact} = {value} after {} (last: {last:?})",
        secs(within)
    )
}

/// Waits until `primary` has a streaming standby (pg_stat_replication, first-hand).
async fn wait_streaming(bin: &Path, primary: &PgServer, within: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + within;
    loop {
        let n = psql(
            bin,
            primary.port,
            "select count(*) from pg_stat_replication where state = 'streaming'",
        )
        .await
        .unwrap_or_default();
        if n.trim() == "1" {
            return Ok(());
        }
        if Instant::now() > end {
            bail!(
                "{} has no streaming standby after {}",
                primary.host_id,
                secs(within)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Step: `drctl failover --to beijing --wait` (planned), so that beijing is the primary
/// again before it is cut off.
pub async fn switch_back(demo: &mut Demo) -> anyhow::Result<()> {
    let Some(l) = demo.layout.pg.clone() else {
        println!("    skipped: no PostgreSQL");
        return Ok(());
    };
    let cfg = demo.layout.config_path("drctl");
    // The old primary re-attached by the switchover must stream before it can take over.
    wait_streaming(&l.bin_dir, &l.replica, Duration::from_secs(30)).await?;
    println!("    $ drctl failover --to beijing --wait");
    let t = Instant::now();
    let out = drctl_with(&cfg, &["failover", "--to", "beijing", "--wait"]).await?;
    for line in out.lines().filter(|l| l.starts_with("operation")) {
        println!("    {line}");
    }
    println!(
        "    beijing is the primary again after {}",
        secs(t.elapsed())
    );
    wait_streaming(&l.bin_dir, &l.primary, Duration::from_secs(30)).await?;
    Ok(())
}

/// PIDs of a postmaster and its children (the backends, walsender, checkpointer...).
fn postgres_pids(s: &PgServer) -> anyhow::Result<Vec<i32>> {
    let pid_file = s.data_dir().join("postmaster.pid");
    let text = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("read {}", pid_file.display()))?;
    let pm: i32 = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("no PID in {}", pid_file.display()))?;
    let mut pids = vec![pm];
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pm) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// SIGCONT to every frozen PID (idempotent; a PID that exited is skipped).
pub fn thaw(frozen: &mut Vec<i32>) {
    for pid in frozen.drain(..) {
        kill(Pid::from_raw(pid), Signal::SIGCONT).ok();
    }
}

/// One acknowledged row: when (since the writer started), which server, which id.
#[derive(Clone, Copy, Debug)]
struct Ack {
    at: Duration,
    port: u16,
    id: u64,
}

/// Offers every row to both servers at once (only a primary can take it) every [`EVERY`],
/// at most one attempt in flight per server (a frozen one then costs no pile-up); logs who
/// acknowledged what, and when. Offering to both keeps the RTO's resolution at [`EVERY`]
/// and catches a split brain (one id acknowledged by both).
async fn writer(
    bin: std::path::PathBuf,
    ports: [u16; 2],
    t0: Instant,
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
) {
    let busy: Arc<[AtomicBool; 2]> = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    let mut id = FIRST_ID;
    let mut tick = tokio::time::interval(EVERY);
    let mut tasks = tokio::task::JoinSet::new();
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        id += 1;
        for (i, port) in ports.into_iter().enumerate() {
            if busy[i].swap(true, Ordering::SeqCst) {
                continue;
            }
            let (bin, acks, busy) = (bin.clone(), acks.clone(), busy.clone());
            tasks.spawn(async move {
                let sql = format!("insert into writes (id) values ({id})");
                let ok = tokio::time::timeout(Duration::from_secs(2), psql(&bin, port, &sql))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if ok {
                    acks.lock().await.push(Ack {
                        at: t0.elapsed(),
                        port,
                        id,
                    });
                }
                busy[i].store(false, Ordering::SeqCst);
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    // Attempts still hanging on a frozen server are abandoned (their psql is killed).
    tasks.shutdown().await;
}

/// What the writer saw across the cut.
#[derive(Debug)]
pub struct Outcome {
    /// Cut to the first write acknowledged by shanghai.
    pub rto: Duration,
    /// Acknowledged (by beijing) and missing on shanghai.
    pub lost: usize,
    /// The acknowledged writes of the last this-long before the cut are lost.
    pub lost_span: Duration,
    pub acked_bj: usize,
    pub acked_sh: usize,
    /// Ids acknowledged by both servers (split brain): must be 0.
    pub both: usize,
    /// Writes acknowledged by beijing after the cut: must be 0.
    pub bj_after_cut: usize,
}

fn analyse(acks: &[Ack], cut: Duration, bj: u16, sh: u16, on_sh: &BTreeSet<u64>) -> Outcome {
    let first_sh = acks
        .iter()
        .filter(|a| a.port == sh && a.at > cut)
        .map(|a| a.at)
        .min()
        .unwrap_or_default();
    let lost: Vec<&Ack> = acks
        .iter()
        .filter(|a| a.port == bj && !on_sh.contains(&a.id))
        .collect();
    let lost_span = lost
        .iter()
        .map(|a| cut.saturating_sub(a.at) + EVERY)
        .max()
        .unwrap_or_default();
    let ids_bj: BTreeSet<u64> = acks.iter().filter(|a| a.port == bj).map(|a| a.id).collect();
    Outcome {
        rto: first_sh.saturating_sub(cut),
        lost: lost.len(),
        lost_span,
        acked_bj: ids_bj.len(),
        acked_sh: acks.iter().filter(|a| a.port == sh).count(),
        both: acks
            .iter()
            .filter(|a| a.port == sh && ids_bj.contains(&a.id))
            .count(),
        bj_after_cut: acks.iter().filter(|a| a.port == bj && a.at > cut).count(),
    }
}

/// Step: writer running, beijing frozen, the automatic failover followed live, then RTO and
/// RPO from the writer's log.
pub async fn cut_beijing(demo: &mut Demo) -> anyhow::Result<()> {
    let Some(l) = demo.layout.pg.clone() else {
        println!("    skipped: no PostgreSQL");
        return Ok(());
    };
    let (bj, sh) = (l.primary.port, l.replica.port);
    // The operator's drctl from outside beijing: only the coordinators that stay reachable.
    let outside = demo.layout.config_path("drctl-outside-beijing");
    let eps: Vec<String> = demo
        .layout
        .nodes
        .iter()
        .filter(|n| n.region != "beijing")
        .map(|n| n.endpoint())
        .collect();
    std::fs::write(&outside, demo.layout.drctl_toml_with(&eps))
        .with_context(|| format!("write {}", outside.display()))?;

    let t0 = Instant::now();
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(
        l.bin_dir.clone(),
        [bj, sh],
        t0,
        acks.clone(),
        stop.clone(),
    ));
    let result = cut_and_wait(demo, &outside, t0, &acks, sh).await;
    stop.store(true, Ordering::SeqCst);
    w.await.ok();
    let cut = result?;

    let acks = acks.lock().await.clone();
    let on_sh: BTreeSet<u64> = psql(&l.bin_dir, sh, "select id from writes")
        .await?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let o = analyse(&acks, cut, bj, sh, &on_sh);
    println!(
        "    writer: {} writes acknowledged by beijing before the cut, {} by shanghai after; \
         {} acknowledged by both, {} by beijing after the cut",
        o.acked_bj, o.acked_sh, o.both, o.bj_after_cut
    );
    let rto = format!(
        "RTO {} (beijing cut off -> first write acknowledged by shanghai, automatic)",
        secs(o.rto)
    );
    let rpo = format!(
        "RPO {} acknowledged writes lost ({} of writes, one every {} ms)",
        o.lost,
        secs(o.lost_span),
        EVERY.as_millis()
    );
    println!("    {rto}\n    {rpo}");
    demo.results.push(rto);
    demo.results.push(rpo);
    if o.both > 0 || o.bj_after_cut > 0 {
        bail!(
            "split brain: {} writes acknowledged by both servers, {} by beijing after the cut",
            o.both,
            o.bj_after_cut
        );
    }
    Ok(())
}

/// Freezes beijing once the writer is steady, waits for the automatic failover and the
/// first write on shanghai; returns when the cut happened (since `t0`).
async fn cut_and_wait(
    demo: &mut Demo,
    outside: &Path,
    t0: Instant,
    acks: &Mutex<Vec<Ack>>,
    sh: u16,
) -> anyhow::Result<Duration> {
    let Some(l) = demo.layout.pg.clone() else {
        bail!("no PostgreSQL");
    };
    let end = Instant::now() + Duration::from_secs(20);
    while acks.lock().await.len() < 20 {
        if Instant::now() > end {
            bail!("the writer could not write to beijing");
        }
        tokio::time::sleep(EVERY).await;
    }
    println!(
        "    writer running (a row every {} ms, offered to both servers; beijing accepts)",
        EVERY.as_millis()
    );

    // Everything beijing runs: its coordinator(s), its agents, its PostgreSQL.
    let mut targets: Vec<(String, i32)> = Vec::new();
    for n in demo.layout.nodes.iter().filter(|n| n.region == "beijing") {
        if let Some(pid) = demo.procs.get(&n.name()).and_then(|p| p.pid()) {
            targets.push((n.name(), i32::try_from(pid)?));
        }
    }
    for h in demo.layout.hosts.iter().filter(|h| h.region == "beijing") {
        if let Some(pid) = demo.procs.get(&h.name()).and_then(|p| p.pid()) {
            targets.push((h.name(), i32::try_from(pid)?));
        }
    }
    let pg_pids = postgres_pids(&l.primary)?;
    let cut = t0.elapsed();
    for pid in pg_pids
        .iter()
        .copied()
        .chain(targets.iter().map(|(_, p)| *p))
    {
        // Recorded first: even a failed SIGSTOP is thawed later, harmlessly.
        demo.frozen.push(pid);
        kill(Pid::from_raw(pid), Signal::SIGSTOP).with_context(|| format!("SIGSTOP pid {pid}"))?;
    }
    let names: Vec<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "    beijing cut off: froze {} and PostgreSQL bj-db-1 ({} processes, SIGSTOP)",
        names.join(", "),
        pg_pids.len()
    );
    println!("    waiting for the coordinators in shanghai and the witness to act…");

    // The operation the region detector starts (it is not ours to request).
    let end = Instant::now() + FAILOVER_DEADLINE;
    let cut_unix_ms =
        chrono::Utc::now().timestamp_millis() - (t0.elapsed() - cut).as_millis() as i64;
    let id = loop {
        if Instant::now() > end {
            bail!(
                "no automatic failover {} after the cut; logs in {}",
                secs(FAILOVER_DEADLINE),
                demo.layout.logs_dir().display()
            );
        }
        if let Ok(out) = drctl_with(outside, &["operations", "list", "--output", "json"]).await
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&out)
            && let Some(op) = v["operations"].as_array().and_then(|ops| {
                ops.iter().find(|o| {
                    o["kind"] == "failover"
                        && o["created_at_unix_ms"]
                            .as_i64()
                            .or_else(|| o["created_at_unix_ms"].as_str()?.parse().ok())
                            .is_some_and(|c| c >= cut_unix_ms)
                })
            })
        {
            let id = op["id"]
                .as_u64()
                .or_else(|| op["id"].as_str()?.parse().ok())
                .context("operation without id")?;
            break id;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "    {} after the cut the coordinators declared beijing failed: operation {id}",
        secs(t0.elapsed().saturating_sub(cut))
    );
    let exe = std::env::current_exe().context("find the drctl executable")?;
    let watch = Command::new(exe)
        .arg("--config")
        .arg(outside)
        .args(["operations", "watch", &id.to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(FAILOVER_DEADLINE, watch)
        .await
        .context("the automatic failover did not finish in time")?
        .context("run drctl operations watch")?;
    indent(&String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "automatic failover (operation {id}) did not succeed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    while !acks.lock().await.iter().any(|a| a.port == sh && a.at > cut) {
        if Instant::now() > end {
            bail!("no write acknowledged by shanghai after the failover");
        }
        tokio::time::sleep(EVERY).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(cut)
}

/// Step: beijing comes back (thawed): its agent finds its lease gone and fences the old
/// primary; one primary, in shanghai, and `drctl status` says so.
pub async fn heal(demo: &mut Demo) -> anyhow::Result<()> {
    let Some(l) = demo.layout.pg.clone() else {
        println!("    skipped: no PostgreSQL");
        return Ok(());
    };
    thaw(&mut demo.frozen);
    println!("    beijing thawed (SIGCONT)");
    let cfg = demo.layout.config_path("drctl");
    wait_fact(
        &cfg,
        "bj-db-1",
        "pg.fenced",
        "true",
        Duration::from_secs(60),
    )
    .await?;
    let refused = psql(
        &l.bin_dir,
        l.primary.port,
        &format!("insert into writes (id) values ({})", FIRST_ID - 1),
    )
    .await
    .is_err();
    if !refused {
        bail!("the old beijing primary accepted a write after the heal");
    }
    println!("    bj-db-1 fenced itself (its lease ran out while cut off) and refuses writes");
    // Live agent facts (and so the fenced note) are on the leader: ask it.
    let client = demo.client.prefer_leader().await?;
    let s = crate::cmd::status::fetch_status(&client, false).await?;
    indent(&crate::cmd::status::render_status(&s));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(ms: u64, port: u16, id: u64) -> Ack {
        Ack {
            at: Duration::from_millis(ms),
            port,
            id,
        }
    }

    #[test]
    fn rto_and_rpo_from_the_log() {
        let acks = [
            ack(100, 1, 1),
            ack(200, 1, 2),
            ack(300, 1, 3),
            ack(2900, 2, 30),
            ack(3000, 2, 31),
        ];
        let on_sh: BTreeSet<u64> = [1, 30, 31].into();
        let o = analyse(&acks, Duration::from_millis(350), 1, 2, &on_sh);
        assert_eq!(o.rto, Duration::from_millis(2550));
        assert_eq!(o.lost, 2);
        assert_eq!(o.lost_span, Duration::from_millis(250));
        assert_eq!(
            (o.acked_bj, o.acked_sh, o.both, o.bj_after_cut),
            (3, 2, 0, 0)
        );

        let split = [ack(100, 1, 1), ack(500, 1, 5), ack(600, 2, 5)];
        let o = analyse(&split, Duration::from_millis(350), 1, 2, &[1, 5].into());
        assert_eq!((o.lost, o.both, o.bj_after_cut), (0, 1, 1));
    }
}
