//! dr-failover-bench: our side of the "Failover vs Patroni" benchmark (issue 5, performance).
//!
//! Each repetition builds a fresh world with the real binaries, exactly as the failover
//! acceptance tests do: PostgreSQL 15 primary (beijing) and streaming replica (shanghai),
//! three coordinators (beijing, shanghai, witness), one agent per database host. Fresh worlds
//! cost setup time but make every repetition start from the same state, as Patroni's
//! `restore_topology` does on its side.
//!
//! - `unplanned`: host loss as in `patroni-anchor.sh`: one SIGKILL to beijing's postmaster and
//!   all its children, its agent and its coordinator; automatic failover. Measured: from the
//!   kill to the first write acknowledged by shanghai.
//! - `planned`: `drctl failover --to shanghai --wait`. Measured: from the request to the first
//!   write on shanghai, and the gap between the last write on beijing and the first on shanghai
//!   (the write-unavailable time); acknowledged rows missing afterwards.
//! - `rpo`: `unplanned` with a writer at `--rate` inserts/s (default 500); acknowledged writes
//!   missing on shanghai after the promotion, as a count and as seconds of writes.
//!
//! The writer mimics Patroni's: a fresh connection per attempt (connect timeout 1 s, statement
//! timeout 2 s), the server that answered last tried first, one attempt every `1/rate` s.
//! Above 20 writes/s one connection cannot keep up (a round trip plus commit is 2-7 ms on this
//! loaded 2-core machine: 146-383 writes/s in the first run), so the rate is split over
//! `--writers` tasks (default: one per 60 writes/s), each with its own kept connection per
//! server and its own interleaved sequence numbers; the achieved rate is reported.
//! Prints one CSV row per repetition (`--csv FILE` appends) and a summary.
//!
//! ```text
//! cargo build -p dr-agent -p dr-coordinator -p drctl -p dr-tests --bin dr-failover-bench
//! target/debug/dr-failover-bench --mode unplanned --reps 10 --csv /tmp/ours.csv
//! ```

#![allow(clippy::unwrap_used)]

#[path = "../../tests/failover/pg_pair.rs"]
#[allow(dead_code)]
mod pg_pair;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, ValueEnum};
use dr_tests::harness::cluster::AgentSpec;
use dr_tests::{TestCluster, wait_until};
use pg_pair::PgNode;
use tokio::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Unplanned,
    Planned,
    Rpo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LeaderAt {
    Elsewhere,
    Beijing,
}

#[derive(Parser, Debug)]
#[command(about = "Measures our regional failover the way patroni-anchor.sh measures Patroni")]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Writer attempts per second (10 = Patroni's writer; 500 for the RPO case).
    #[arg(long)]
    rate: Option<u32>,
    /// Concurrent writer tasks (default: 1 up to 20 writes/s, else one per 60 writes/s).
    #[arg(long)]
    writers: Option<u32>,
    /// The topology's failover lease (the old primary's self-fencing deadline).
    #[arg(long, default_value = "2s")]
    lease: String,
    /// The topology's detect_after.
    #[arg(long, default_value = "1s")]
    detect_after: String,
    /// Where the coordinator leader is when beijing is lost: `elsewhere` (moved off beijing's
    /// coordinator before the topology is applied; like Patroni's run, where etcd survives)
    /// or `beijing` (the leader dies with the region: an election comes first).
    #[arg(long, value_enum, default_value = "elsewhere")]
    leader: LeaderAt,
    /// Append one CSV row per repetition here.
    #[arg(long)]
    csv: Option<PathBuf>,
}

/// One writer log line: wall time (s), port that acknowledged (0: failed), sequence.
type Log = Arc<Mutex<Vec<(f64, u16, i64)>>>;

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// `n` writer tasks sharing `rate` (sequence numbers k*n + i, so they never collide).
fn start_writers(
    ports: &[u16],
    rate: u32,
    n: u32,
    log: &Log,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let n = n.max(1);
    (0..n)
        .map(|i| {
            tokio::spawn(writer(
                ports.to_vec(),
                f64::from(rate.max(1)) / f64::from(n),
                rate > 20,
                (i64::from(i), i64::from(n)),
                log.clone(),
                stop.clone(),
            ))
        })
        .collect()
}

async fn writer(
    ports: Vec<u16>,
    rate: f64,
    keep: bool,
    (first, step): (i64, i64),
    log: Log,
    stop: Arc<AtomicBool>,
) {
    use sqlx::Connection as _;
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut pref = 0usize;
    let mut seq = first - step + 1;
    // At high rates (`keep`) a fresh connection per write would measure connection setup:
    // keep one per server, drop it on any error (the failover closes them anyway).
    let mut conns: Vec<Option<sqlx::PgConnection>> = ports.iter().map(|_| None).collect();
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        seq += step;
        let mut ok_port = 0u16;
        let order: Vec<usize> = std::iter::once(pref)
            .chain((0..ports.len()).filter(|i| *i != pref))
            .collect();
        for i in order {
            let port = ports[i];
            if conns[i].is_none() {
                let url = format!(
                    "postgres://postgres@127.0.0.1:{port}/postgres?options=-c%20statement_timeout%3D2000"
                );
                if let Ok(Ok(c)) =
                    tokio::time::timeout(Duration::from_secs(1), sqlx::PgConnection::connect(&url))
                        .await
                {
                    conns[i] = Some(c);
                }
            }
            let Some(c) = conns[i].as_mut() else { continue };
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::query("insert into writes (id) values ($1)")
                    .bind(seq)
                    .execute(&mut *c),
            )
            .await;
            let ok = matches!(r, Ok(Ok(_)));
            if (!ok || !keep)
                && let Some(c) = conns[i].take()
            {
                c.close().await.ok();
            }
            if ok {
                ok_port = port;
                pref = i;
                break;
            }
        }
        log.lock().await.push((now_s(), ok_port, seq));
        next += period;
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        } else {
            next = now;
        }
    }
}

/// SIGKILL to the postmaster of `node` and all its children at once (host loss).
fn kill_postgres(node: &PgNode) -> Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let text = std::fs::read_to_string(node.data_dir.join("postmaster.pid"))?;
    let pm: i32 = text
        .lines()
        .next()
        .context("empty postmaster.pid")?
        .trim()
        .parse()?;
    let mut pids = vec![pm];
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces; split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pm) {
            pids.push(pid);
        }
    }
    for p in pids {
        kill(Pid::from_raw(p), Signal::SIGKILL).ok();
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Row {
    /// From the kill / request to the first write on shanghai.
    to_first_write_s: f64,
    /// From the last write on beijing to the first on shanghai.
    gap_s: f64,
    acked: usize,
    lost: usize,
    /// Span of the lost writes (last lost ack - first lost ack), plus one writer period.
    lost_s: f64,
    leader_was_beijing: bool,
    rate: f64,
}

async fn one_rep(args: &Args, rep: usize) -> Result<Row> {
    let pgdir = tempfile::Builder::new()
        .prefix("dr-failover-bench-")
        .tempdir()?;
    std::fs::set_permissions(
        pgdir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let bj = PgNode::primary(&pgdir.path().join("bj"), &["dr_sh_db_1"]).await?;
    let sh = PgNode::replica(&pgdir.path().join("sh"), &bj, "dr_sh_db_1").await?;
    let mut bj_spec = AgentSpec::new("bj-db-1").region("beijing").roles(&["db"]);
    bj_spec.extra_toml = bj.agent_toml("yeslocker");
    let mut sh_spec = AgentSpec::new("sh-db-1").region("shanghai").roles(&["db"]);
    sh_spec.extra_toml = sh.agent_toml("yeslocker");
    let mut cluster = TestCluster::builder()
        .coordinators(3)
        .agent(bj_spec)
        .agent(sh_spec)
        .start()
        .await?;
    let r = measure(args, rep, &mut cluster, &bj, &sh, &pgdir).await;
    if r.is_ok() {
        cluster.shutdown().await.ok();
    } else {
        // Dropping the cluster without shutdown() stops its processes and keeps its
        // directory (logs); keep the PostgreSQL logs too.
        let kept = pgdir.keep();
        eprintln!("rep {rep}: PostgreSQL dirs kept in {}", kept.display());
        drop(cluster);
    }
    bj.stop();
    sh.stop();
    r
}

async fn measure(
    args: &Args,
    rep: usize,
    cluster: &mut TestCluster,
    bj: &PgNode,
    sh: &PgNode,
    pgdir: &tempfile::TempDir,
) -> Result<Row> {
    if args.leader == LeaderAt::Elsewhere && cluster.leader_id().await? == 1 {
        // Before any topology (no primary lease yet, nothing to fence): hand leadership to
        // shanghai or the witness by restarting beijing's coordinator.
        cluster.stop(1).await?;
        cluster.wait_for_leader(Some(1)).await?;
        cluster.restart(1)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let file = pgdir.path().join("topology.toml");
    let topo = pg_pair::Topo {
        lease: args.lease.clone(),
        detect_after: args.detect_after.clone(),
        ..pg_pair::Topo::default()
    };
    std::fs::write(&file, pg_pair::topology(bj, sh, &topo))?;
    let file = file.to_string_lossy().into_owned();
    cluster.drctl_json(["apply", "-f", &file]).await?;
    // The candidate's agent must report streaming replication before anything is measured.
    wait_until(
        "sh-db-1 reports streaming",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || async {
            let agents = cluster.agents_at_leader().await?;
            let ok = agents
                .iter()
                .any(|a| a["host_id"] == "sh-db-1" && a.to_string().contains("streaming"));
            Ok(ok.then_some(()))
        },
    )
    .await?;
    let rate = args
        .rate
        .unwrap_or(if args.mode == Mode::Rpo { 500 } else { 10 });
    let log: Log = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = args
        .writers
        .unwrap_or(if rate > 20 { rate.div_ceil(60) } else { 1 });
    let ws = start_writers(&[bj.port, sh.port], rate, writers, &log, &stop);
    // Steady writes, and a random phase against the heartbeat/detector loops.
    let jitter = rand::random::<u64>() % 1000;
    tokio::time::sleep(Duration::from_millis(3000 + jitter)).await;
    let leader = cluster.leader_id().await.unwrap_or(0);
    let t0 = now_s();
    match args.mode {
        Mode::Unplanned | Mode::Rpo => {
            kill_postgres(bj)?;
            cluster.kill9_agent("bj-db-1")?;
            cluster.kill9(1)?;
        }
        Mode::Planned => {
            let out = cluster
                .drctl(["failover", "--to", "shanghai", "--wait"])
                .await?;
            if !out.status.success() {
                bail!(
                    "switchover failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    let sh_port = sh.port;
    let log2 = log.clone();
    wait_until(
        "a write acknowledged by shanghai",
        Duration::from_secs(90),
        Duration::from_millis(100),
        || {
            let log = log2.clone();
            async move {
                Ok(log
                    .lock()
                    .await
                    .iter()
                    .any(|(t, p, _)| *p == sh_port && *t > t0)
                    .then_some(()))
            }
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for w in ws {
        w.await?;
    }
    // The tasks append as they finish: order by time for the analysis below.
    let mut log = log.lock().await.clone();
    log.sort_by(|a, b| a.0.total_cmp(&b.0));
    let first_sh = log
        .iter()
        .find(|(t, p, _)| *p == sh.port && *t > t0)
        .map(|(t, _, _)| *t)
        .context("no write on shanghai")?;
    let last_bj = log
        .iter()
        .filter(|(t, p, _)| *p == bj.port && *t < first_sh)
        .map(|(t, _, _)| *t)
        .fold(f64::NAN, f64::max);
    let mut c = sh.connect().await?;
    let present: HashSet<i64> = sqlx::query_scalar::<_, i64>("select id from writes")
        .fetch_all(&mut c)
        .await?
        .into_iter()
        .collect();
    let acked: Vec<&(f64, u16, i64)> = log.iter().filter(|(_, p, _)| *p != 0).collect();
    let lost: Vec<f64> = acked
        .iter()
        .filter(|(_, _, s)| !present.contains(s))
        .map(|(t, _, _)| *t)
        .collect();
    let lost_s = match (lost.first(), lost.last()) {
        (Some(a), Some(b)) => b - a + 1.0 / f64::from(rate),
        _ => 0.0,
    };
    let start = log.first().map_or(t0, |l| l.0);
    let before: usize = log.iter().filter(|(t, p, _)| *p != 0 && *t < t0).count();
    let row = Row {
        to_first_write_s: first_sh - t0,
        gap_s: first_sh - last_bj,
        acked: acked.len(),
        lost: lost.len(),
        lost_s,
        leader_was_beijing: leader == 1,
        rate: before as f64 / (t0 - start).max(0.001),
    };
    eprintln!("rep {rep}: {row:?}");
    Ok(row)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mode = match (args.mode, args.leader) {
        (Mode::Planned, _) => "planned".to_owned(),
        (m, LeaderAt::Elsewhere) => format!("{m:?}").to_lowercase(),
        (m, LeaderAt::Beijing) => format!("{m:?}-leader-in-beijing").to_lowercase(),
    };
    let mut rows = Vec::new();
    let mut failed = 0usize;
    for rep in 1..=args.reps {
        match one_rep(&args, rep).await {
            Ok(r) => {
                if let Some(p) = &args.csv {
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .with_context(|| format!("open {}", p.display()))?;
                    writeln!(
                        f,
                        "ours-{mode},{rep},{:.3},{:.3},{},{},{:.3},{},{:.0}",
                        r.to_first_write_s,
                        r.gap_s,
                        r.acked,
                        r.lost,
                        r.lost_s,
                        r.leader_was_beijing,
                        r.rate
                    )?;
                }
                rows.push(r);
            }
            Err(e) => {
                failed += 1;
                eprintln!("rep {rep} failed: {e:#}");
            }
        }
    }
    let to_first = median(rows.iter().map(|r| r.to_first_write_s).collect());
    let gap = median(rows.iter().map(|r| r.gap_s).collect());
    let lost: usize = rows.iter().map(|r| r.lost).sum();
    let lost_s = median(rows.iter().map(|r| r.lost_s).collect());
    let max_lost_s = rows.iter().map(|r| r.lost_s).fold(0.0, f64::max);
    println!(
        "ours {mode}: n={} failed={failed} median to_first_write_s={to_first:.2} median gap_s={gap:.2} lost_total={lost} median lost_s={lost_s:.3} max lost_s={max_lost_s:.3}",
        rows.len()
    );
    if rows.is_empty() {
        bail!("every repetition failed");
    }
    Ok(())
}
