//! `drctl demo`: a whole local deployment in one command, and a leader failover to watch.
//!
//! Why it lives in drctl: the demo is the first thing a newcomer runs, so it must use the
//! real binaries and the real operator path: it issues certificates with `drctl cert`
//! code, writes configs in the `deploy/examples` formats, and talks to the cluster
//! through the same [`Client`] as every drctl command. Nothing in it is a demo-only
//! shortcut, so when the demo works, the pieces work together.
//!
//! The scenario is a list of steps ([`steps`]), each an async function over [`Demo`],
//! printed as `==> step` with its duration. The PostgreSQL scenarios (primary and replica,
//! backup, planned switchover: [`pg`]; beijing cut off and the automatic failover with its
//! RTO and RPO: [`regional`]) are more functions in `cmd/demo/` and more entries in
//! [`scenario`].
//!
//! Invariant: every process the demo starts is owned by a [`ChildGuard`] in
//! [`Demo::procs`]; dropping the `Demo` (normal exit, error, panic, Ctrl-C) stops them
//! by PID before the temporary directory is removed.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::cli::DemoArgs;
use crate::client::Client;

pub mod layout;
pub mod pg;
pub mod process;
pub mod regional;
pub mod steps;

use layout::Layout;
use process::{ChildGuard, STOP_GRACE};

/// A running demo: its files, its processes, and a client to its cluster.
pub struct Demo {
    // Field order matters: processes are stopped (dropped) before the directory goes.
    pub procs: BTreeMap<String, ChildGuard>,
    /// The PostgreSQL servers, stopped by PID after the agents (which manage them).
    pub pg: Option<pg::PgPair>,
    pub layout: Layout,
    pub client: Client,
    pub coordinator_bin: PathBuf,
    pub agent_bin: PathBuf,
    /// Node killed by the failover step, restarted by the next one.
    pub killed: Option<u64>,
    /// PIDs frozen (SIGSTOP) by the regional cut; thawed before anything is stopped.
    pub frozen: Vec<i32>,
    /// Figures printed once more at the end (RTO, RPO of the automatic failover).
    pub results: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Demo {
    /// Stops agents first, then coordinators (so agents do not log a storm of reconnects).
    pub fn stop_all(&mut self) {
        // A stopped process ignores SIGTERM until continued.
        regional::thaw(&mut self.frozen);
        let mut names: Vec<String> = self.procs.keys().cloned().collect();
        names.sort_by_key(|n| !n.starts_with("agent-"));
        for name in names {
            if let Some(p) = self.procs.get_mut(&name) {
                p.stop(STOP_GRACE);
            }
        }
        if let Some(pg) = self.pg.take() {
            drop(pg);
        }
    }

    /// Fails if any process the demo expects to run has died.
    pub fn check_children(&mut self) -> anyhow::Result<()> {
        for p in self.procs.values_mut() {
            if Some(p.name.as_str()) == self.killed.map(|id| format!("coordinator-{id}")).as_deref()
            {
                continue;
            }
            p.check_alive()?;
        }
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop_all();
    }
}

type StepFn = for<'a> fn(&'a mut Demo) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// The steps of `drctl demo`, in order.
pub fn scenario() -> Vec<(&'static str, StepFn)> {
    vec![
        ("start 3 coordinators (beijing, shanghai, witness)", |d| {
            Box::pin(steps::start_coordinators(d))
        }),
        ("initialise the Raft cluster", |d| {
            Box::pin(steps::init_cluster(d))
        }),
        (
            "start PostgreSQL 15: primary in beijing, streaming replica in shanghai",
            |d| Box::pin(pg::start_pair(d)),
        ),
        ("start 5 agents", |d| Box::pin(steps::start_agents(d))),
        ("wait until all 5 agents are connected", |d| {
            Box::pin(steps::wait_agents_connected(d))
        }),
        ("status", |d| Box::pin(steps::print_status(d))),
        ("kill the leader (SIGKILL) and wait for a new one", |d| {
            Box::pin(steps::kill_leader(d))
        }),
        ("wait until all agents have reconnected", |d| {
            Box::pin(steps::wait_agents_connected(d))
        }),
        ("status after the failover", |d| {
            Box::pin(steps::print_status(d))
        }),
        (
            "restart the killed coordinator and wait until it caught up",
            |d| Box::pin(steps::restart_killed(d)),
        ),
        (
            "apply the topology (beijing primary, shanghai replica, witness)",
            |d| Box::pin(pg::apply_topology(d)),
        ),
        ("take a full backup of the beijing primary", |d| {
            Box::pin(pg::backup(d))
        }),
        (
            "planned switchover with a writer running: drctl failover --to shanghai",
            |d| Box::pin(pg::failover(d)),
        ),
        (
            "planned switchover back: drctl failover --to beijing",
            |d| Box::pin(regional::switch_back(d)),
        ),
        (
            "cut beijing off (its coordinator, agents and PostgreSQL) with a writer running: automatic failover",
            |d| Box::pin(regional::cut_beijing(d)),
        ),
        ("beijing back: the old primary stays fenced", |d| {
            Box::pin(regional::heal(d))
        }),
    ]
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (dir, tmp) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
            let d = std::fs::canonicalize(d).with_context(|| format!("resolve {}", d.display()))?;
            reuse_dir(&d)?;
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("drctl-demo-")
                .tempdir()
                .context("create a temporary directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let (coordinator_bin, agent_bin) = steps::find_binaries()?;

    println!("==> prepare {} (CA, certificates, configs)", dir.display());
    let t = Instant::now();
    let layout = Layout::new(&dir, args.base_port)?;
    layout.write()?;
    println!(
        "    done in {}; by-hand instructions: {}",
        secs(t.elapsed()),
        dir.join("README.txt").display()
    );

    let client = Client::new(layout.client_config())?;
    let mut demo = Demo {
        procs: BTreeMap::new(),
        pg: None,
        layout,
        client,
        coordinator_bin,
        agent_bin,
        killed: None,
        frozen: Vec::new(),
        results: Vec::new(),
        _tmp: tmp,
    };

    let outcome = tokio::select! {
        r = run_steps(&mut demo) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(e) = outcome {
        keep_dir_on_failure(&mut demo);
        demo.stop_all();
        return Err(e);
    }
    println!("==> all steps passed in {}", secs(started.elapsed()));
    for r in &demo.results {
        println!("    {r}");
    }

    if args.once {
        println!("==> stopping");
        demo.stop_all();
        return Ok(());
    }
    println!(
        "\nthe cluster keeps running; status every 5s, Ctrl-C to stop (config: {})",
        demo.layout.config_path("drctl").display()
    );
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            if let Err(e) = demo.check_children() {
                eprintln!("warning: {e:#}");
            }
            let client = match demo.client.prefer_leader().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("status: {e}");
                    continue;
                }
            };
            match crate::cmd::status::fetch_status(&client, false).await {
                Ok(s) => println!("\n{}", crate::cmd::status::render_status(&s)),
                Err(e) => eprintln!("status: {e}"),
            }
        }
    };
    tokio::select! {
        () = watch => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    println!("\n==> stopping every process");
    demo.stop_all();
    Ok(())
}

async fn run_steps(demo: &mut Demo) -> anyhow::Result<()> {
    for (name, step) in scenario() {
        println!("==> {name}");
        let t = Instant::now();
        step(demo)
            .await
            .with_context(|| format!("step '{name}' failed"))?;
        println!("    done in {}", secs(t.elapsed()));
    }
    Ok(())
}

/// Marks a directory as made by `drctl demo`, so a later run may wipe its state.
const MARKER: &str = ".drctl-demo";

/// A `--dir` is either empty, or an earlier demo's (then its Raft data and logs are removed
/// so the new cluster starts fresh on new ports). Anything else is refused: the demo never
/// deletes files it did not create.
fn reuse_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let marker = dir.join(MARKER);
    let mut entries = std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?;
    if std::fs::metadata(&marker).is_ok() {
        for sub in ["data", "logs"] {
            let p = dir.join(sub);
            if std::fs::metadata(&p).is_ok() {
                std::fs::remove_dir_all(&p)
                    .with_context(|| format!("remove the previous demo's {}", p.display()))?;
            }
        }
    } else if entries.next().is_some() {
        return Err(crate::cmd::UsageError(format!(
            "{} is not empty and was not made by `drctl demo`; pass an empty or new directory",
            dir.display()
        ))
        .into());
    }
    std::fs::write(
        &marker,
        "made by drctl demo; its data/ and logs/ are wiped by the next run\n",
    )
    .with_context(|| format!("write {}", marker.display()))
}

/// A failed run keeps its temporary directory so the logs can be read.
fn keep_dir_on_failure(demo: &mut Demo) {
    if let Some(t) = demo._tmp.take() {
        let dir = t.keep();
        eprintln!("demo failed; logs kept in {}", dir.join("logs").display());
    } else {
        eprintln!("demo failed; logs in {}", demo.layout.logs_dir().display());
    }
}

pub fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_empty_or_demo_dirs_are_used() {
        let dir = tempfile::tempdir().unwrap();
        reuse_dir(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("data/coordinator-1")).unwrap();
        reuse_dir(dir.path()).unwrap();
        assert!(
            std::fs::metadata(dir.path().join("data")).is_err(),
            "previous state is wiped"
        );

        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("precious"), "x").unwrap();
        let err = reuse_dir(other.path()).unwrap_err();
        assert_eq!(crate::exit_code(&err), 2);
        assert!(std::fs::metadata(other.path().join("precious")).is_ok());
    }
}
