//! The demo's PostgreSQL part: a PostgreSQL 15 primary (beijing, bj-db-1) and its streaming
//! replica (shanghai, sh-db-1), a topology, a full backup, then a planned switchover to
//! shanghai with a writer running, followed live (the automatic failover after it is
//! [`super::regional`]).
//!
//! Why the servers are started by the demo and not by the agents: an agent manages an
//! existing server (start, stop, promote, re-attach) and never creates a cluster; creating
//! one is initdb and pg_basebackup, which an operator does once. The demo does that part
//! itself, the way `tests/tests/failover/pg_pair.rs` does, and from then on only the agents
//! touch the servers (through `drctl failover`).
//!
//! When the PostgreSQL binaries are missing the whole part is skipped with a message saying
//! where they were looked for (`DR_PG_BIN_DIR` overrides): the control-plane demo still runs.
//!
//! Invariant: the postmasters are stopped by their PID (from `postmaster.pid`, the agents
//! may have restarted them) when the [`PgPair`] is dropped, before the demo's directory goes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid, User, chown};
use tokio::process::Command;
use tokio::sync::Mutex;

use super::{Demo, secs};

const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
pub const CLUSTER: &str = "yeslocker";

/// Where the PostgreSQL 15 binaries are, if they are all there.
pub fn bin_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DR_PG_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN_DIR));
    ["initdb", "pg_ctl", "pg_basebackup", "psql", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
        .then_some(dir)
}

/// Why the PostgreSQL part is skipped, for the step output.
pub fn missing_reason() -> String {
    format!(
        "PostgreSQL 15 binaries not found in {} (set DR_PG_BIN_DIR): the database, backup and \
         failover steps are skipped",
        std::env::var("DR_PG_BIN_DIR").unwrap_or_else(|_| DEFAULT_BIN_DIR.into())
    )
}

/// One server of the pair, on paper (ports are chosen with the rest of the layout).
#[derive(Debug, Clone)]
pub struct PgServer {
    pub host_id: &'static str,
    pub port: u16,
    pub dir: PathBuf,
}

impl PgServer {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("postgresql.log")
    }
    pub fn slot(&self) -> String {
        format!("dr_{}", self.host_id.replace('-', "_"))
    }

    /// The agent's `[postgres]` table for this server.
    pub fn agent_toml(&self, bin_dir: &Path) -> String {
        format!(
            "\n[postgres]\ncluster = \"{CLUSTER}\"\ndata_dir = \"{}\"\nbin_dir = \"{}\"\n\
             listen_host = \"127.0.0.1\"\nport = {}\nsocket_dir = \"{}\"\nlog_file = \"{}\"\n",
            self.data_dir().display(),
            bin_dir.display(),
            self.port,
            self.socket_dir().display(),
            self.log_file().display()
        )
    }

    fn postmaster_pid(&self) -> Option<Pid> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok().map(Pid::from_raw)
    }

    /// Fast shutdown of whichever postmaster runs on this data dir (by PID); SIGKILL after
    /// 10 s.
    pub fn stop(&self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        if kill(pid, Signal::SIGINT).is_err() {
            return;
        }
        for _ in 0..100 {
            if kill(pid, None).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        kill(pid, Signal::SIGKILL).ok();
    }
}

/// The pair as laid out: beijing primary, shanghai replica.
#[derive(Debug, Clone)]
pub struct PgLayout {
    pub bin_dir: PathBuf,
    pub primary: PgServer,
    pub replica: PgServer,
}

impl PgLayout {
    pub fn server(&self, host_id: &str) -> Option<&PgServer> {
        [&self.primary, &self.replica]
            .into_iter()
            .find(|s| s.host_id == host_id)
    }

    /// The topology the demo applies (the format of deploy/examples/yeslocker/topology.toml).
    pub fn topology(&self) -> String {
        format!(
            r#"# The drctl demo's topology: written by the demo, applied with `drctl apply -f`.
version = 1
name = "yeslocker-demo"

[[regions]]
name = "beijing"
kind = "primary"

[[regions]]
name = "shanghai"
kind = "secondary"

[[regions]]
name = "witness"
kind = "witness"

[[sites]]
name = "bj-dc1"
region = "beijing"

[[sites]]
name = "sh-dc1"
region = "shanghai"

[[hosts]]
host_id = "bj-db-1"
region = "beijing"
site = "bj-dc1"
roles = ["db"]

[[hosts]]
host_id = "sh-db-1"
region = "shanghai"
site = "sh-dc1"
roles = ["db"]

[[db_clusters]]
name = "{CLUSTER}"
members = ["bj-db-1", "sh-db-1"]
primary = "bj-db-1"
tier = "critical"

[db_clusters.replication]
application_name = "{CLUSTER}"
slots = {{ bj-db-1 = "{}", sh-db-1 = "{}" }}
conninfo = {{ bj-db-1 = "host=127.0.0.1 port={} user=replicator", sh-db-1 = "host=127.0.0.1 port={} user=replicator" }}

# Automatic, with the example's lease and detection time. The cooldown against flapping
# (10m in production) is short here: the demo's planned switchovers come just before the cut.
[failover]
automatic = true
detect_after = "3s"
lease = "4s"
cooldown = "2s"
"#,
            self.primary.slot(),
            self.replica.slot(),
            self.primary.port,
            self.replica.port
        )
    }
}

/// The running pair; stops both postmasters on drop.
pub struct PgPair {
    pub layout: PgLayout,
}

impl Drop for PgPair {
    fn drop(&mut self) {
        self.layout.primary.stop();
        self.layout.replica.stop();
    }
}

/// uid/gid of `postgres` when we run as root (PostgreSQL refuses to run as root).
fn postgres_user() -> anyhow::Result<Option<(u32, u32)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let u = User::from_name("postgres")?
        .context("running as root, PostgreSQL needs the user `postgres`: create it (useradd --system postgres) or run the demo as a normal user")?;
    Ok(Some((u.uid.as_raw(), u.gid.as_raw())))
}

/// Runs a PostgreSQL program (as `postgres` when root); its output on failure.
async fn run_pg(bin_dir: &Path, program: &str, args: &[String]) -> anyhow::Result<String> {
    let path = bin_dir.join(program);
    let mut cmd = if postgres_user()?.is_some() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .with_context(|| format!("{program} took over 120 s"))?
        .with_context(|| format!("run {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) async fn psql(bin_dir: &Path, port: u16, sql: &str) -> anyhow::Result<String> {
    run_pg(
        bin_dir,
        "psql",
        &[
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-U".into(),
            "postgres".into(),
            "-d".into(),
            "postgres".into(),
            "-qAtX".into(),
            "-v".into(),
            "ON_ERROR_STOP=1".into(),
            "-c".into(),
            sql.into(),
        ],
    )
    .await
}

fn prepare_dir(s: &PgServer) -> anyhow::Result<()> {
    std::fs::create_dir_all(s.socket_dir())?;
    if let Some((uid, gid)) = postgres_user()? {
        let sock = s.socket_dir();
        let dirs: [&Path; 3] = [s.dir.parent().unwrap_or(&s.dir), &s.dir, &sock];
        for p in dirs {
            chown(p, Some(uid.into()), Some(gid.into()))
                .with_context(|| format!("chown {}", p.display()))?;
        }
    }
    Ok(())
}

async fn pg_ctl_start(bin_dir: &Path, s: &PgServer) -> anyhow::Result<()> {
    run_pg(
        bin_dir,
        "pg_ctl",
        &[
            "-D".into(),
            s.data_dir().display().to_string(),
            "-l".into(),
            s.log_file().display().to_string(),
            "-o".into(),
            format!(
                "-p {} -k '{}' -h 127.0.0.1",
                s.port,
                s.socket_dir().display()
            ),
            "-w".into(),
            "-t".into(),
            "60".into(),
            "start".into(),
        ],
    )
    .await
    .map(|_| ())
}

/// Step: initdb + start the primary, pg_basebackup + start the replica, wait for streaming.
pub async fn start_pair(demo: &mut Demo) -> anyhow::Result<()> {
    let Some(l) = demo.layout.pg.clone() else {
        println!("    skipped: {}", missing_reason());
        return Ok(());
    };
    let (p, r, bin) = (&l.primary, &l.replica, &l.bin_dir);
    if postgres_user()?.is_some() {
        // `postgres` must traverse the demo directory (a temp dir is 0700); its files keep
        // their own modes (keys are 0600).
        std::fs::set_permissions(
            &demo.layout.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )?;
    }
    if let Some(parent) = p.dir.parent() {
        std::fs::create_dir_all(parent)?;
        std::fs::set_permissions(parent, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    prepare_dir(p)?;
    prepare_dir(r)?;
    // Owned from here on: a failure below still stops whatever started.
    demo.pg = Some(PgPair { layout: l.clone() });
    run_pg(
        bin,
        "initdb",
        &[
            "-D".into(),
            p.data_dir().display().to_string(),
            "-U".into(),
            "postgres".into(),
            "--auth=trust".into(),
            "-E".into(),
            "UTF8".into(),
            "--data-checksums".into(),
            "--no-sync".into(),
            "--no-instructions".into(),
        ],
    )
    .await?;
    let conf = "\n# drctl demo\nlisten_addresses = '127.0.0.1'\nwal_level = replica\n\
                max_wal_senders = 10\nmax_replication_slots = 10\nhot_standby = on\n\
                wal_keep_size = '256MB'\nfsync = off\n\
                # A cut-off primary leaves the replica's connection open and silent: the\n\
                # receiver notices (and the region detector sees it down) only after this.\n\
                wal_receiver_timeout = '2s'\n";
    append(&p.data_dir().join("postgresql.conf"), conf)?;
    pg_ctl_start(bin, p).await?;
    psql(
        bin,
        p.port,
        &format!(
            "create role replicator with replication login; \
             select pg_create_physical_replication_slot('{}'); \
             create table writes (id bigint primary key, at timestamptz default now());",
            r.slot()
        ),
    )
    .await?;
    println!(
        "    beijing primary bj-db-1 on 127.0.0.1:{} ({})",
        p.port,
        p.data_dir().display()
    );
    run_pg(
        bin,
        "pg_basebackup",
        &[
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            p.port.to_string(),
            "-U".into(),
            "replicator".into(),
            "-D".into(),
            r.data_dir().display().to_string(),
            "-R".into(),
            "-S".into(),
            r.slot(),
            "-X".into(),
            "stream".into(),
            "-c".into(),
            "fast".into(),
        ],
    )
    .await?;
    pg_ctl_start(bin, r).await?;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let n = psql(
            bin,
            p.port,
            "select count(*) from pg_stat_replication where state = 'streaming'",
        )
        .await
        .unwrap_or_default();
        if n.trim() == "1" {
            break;
        }
        if Instant::now() > end {
            bail!(
                "the replica is not streaming after 60 s; see {}",
                r.log_file().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "    shanghai replica sh-db-1 on 127.0.0.1:{}, streaming through slot {}",
        r.port,
        r.slot()
    );
    Ok(())
}

/// Runs this drctl with the demo's config; its output indented; fails on a non-zero exit.
async fn drctl(demo: &Demo, args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("find the drctl executable")?;
    let out = Command::new(exe)
        .arg("--config")
        .arg(demo.layout.config_path("drctl"))
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

pub(super) fn indent(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

/// Step: `drctl apply -f topology.toml`, then wait until the replica's agent reports
/// streaming replication (the switchover needs its facts).
pub async fn apply_topology(demo: &mut Demo) -> anyhow::Result<()> {
    let Some(l) = demo.layout.pg.clone() else {
        println!("    skipped: no PostgreSQL");
        return Ok(());
    };
    let file = demo.layout.dir.join("topology.toml");
    std::fs::write(&file, l.topology()).with_context(|| format!("write {}", file.display()))?;
    let out = drctl(demo, &["apply", "-f", &file.display().to_string()]).await?;
    indent(&out);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let out = drctl(demo, &["agents", "show", "sh-db-1", "--output", "json"])
            .await
            .unwrap_or_default();
        if out.contains("streaming") {
            break;
        }
        if Instant::now() > end {
            bail!("sh-db-1 does not report streaming replication after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// Step: a full backup of the beijing primary into a local encrypted repository.
pub async fn backup(demo: &mut Demo) -> anyhow::Result<()> {
    let Some(l) = demo.layout.pg.clone() else {
        println!("    skipped: no PostgreSQL");
        return Ok(());
    };
    let dir = demo.layout.dir.join("backup");
    std::fs::create_dir_all(&dir)?;
    let repo_cfg = dir.join("repo.toml");
    std::fs::write(
        &repo_cfg,
        format!(
            "version = 1\nkey_file = \"repo.key\"\nconcurrency = 2\n\n[location]\nkind = \"fs\"\npath = \"{}\"\n",
            dir.join("repo").display()
        ),
    )?;
    let out = Command::new(&demo.agent_bin)
        .args(["repo", "init", "--repo-config"])
        .arg(&repo_cfg)
        .stdin(Stdio::null())
        .output()
        .await
        .context("run dr-agent repo init")?;
    if !out.status.success() {
        bail!(
            "dr-agent repo init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\ntimezone = \"Asia/Shanghai\"\nallowed_transfers = []\n\n\
             [[databases]]\nname = \"{CLUSTER}\"\nhost = \"bj-db-1\"\n\
             pg_url = \"postgres://postgres@127.0.0.1:{}/postgres\"\ndata_dir = \"{}\"\nlocation = \"local\"\n\n\
             [[locations]]\nname = \"local\"\ntier = \"primary\"\njurisdiction = \"cn\"\nrepo_config = \"{}\"\n",
            l.primary.port,
            l.primary.data_dir().display(),
            repo_cfg.display()
        ),
    )?;
    indent(
        &drctl(
            demo,
            &[
                "backup",
                "policy",
                "apply",
                "-f",
                &policy.display().to_string(),
            ],
        )
        .await?,
    );
    let t = Instant::now();
    let out = drctl(
        demo,
        &["backup", "run", "--db", CLUSTER, "--type", "full", "--wait"],
    )
    .await?;
    indent(&out);
    println!("    full backup in {}", secs(t.elapsed()));
    Ok(())
}

/// One acknowledged write: (seconds since the writer started, port).
type Acks = Arc<Mutex<Vec<(f64, u16, u64)>>>;

/// Inserts a row every 100 ms into whichever server accepts it (beijing first), with psql.
async fn writer(bin: PathBuf, ports: [u16; 2], acks: Acks, stop: Arc<AtomicBool>) {
    let t0 = Instant::now();
    let mut id = 0u64;
    while !stop.load(Ordering::SeqCst) {
        id += 1;
        for port in ports {
            let sql = format!("insert into writes (id) values ({id})");
            let ok = tokio::time::timeout(Duration::from_secs(2), psql(&bin, port, &sql))
                .await
                .is_ok_and(|r| r.is_ok());
            if ok {
                acks.lock()
                    .await
                    .push((t0.elapsed().as_secs_f64(), port, id));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Step: writer running, `drctl failover --to shanghai --wait` followed live, then what the
/// writer saw: acknowledged writes per server, lost ones, the longest gap.
pub async fn failover(demo: &mut Demo) -> anyhow::Result<()> {
    let Some(l) = demo.layout.pg.clone() else {
        println!("    skipped: no PostgreSQL");
        return Ok(());
    };
    let (bj, sh) = (l.primary.port, l.replica.port);
    let acks: Acks = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(
        l.bin_dir.clone(),
        [bj, sh],
        acks.clone(),
        stop.clone(),
    ));
    let end = Instant::now() + Duration::from_secs(20);
    while acks.lock().await.len() < 5 {
        if Instant::now() > end {
            stop.store(true, Ordering::SeqCst);
            bail!("the writer could not write to beijing");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("    writer running (a row every 100 ms, beijing first, then shanghai)");
    println!("    $ drctl failover --to shanghai --wait");
    let exe = std::env::current_exe().context("find the drctl executable")?;
    let status = Command::new(exe)
        .arg("--config")
        .arg(demo.layout.config_path("drctl"))
        .args(["failover", "--to", "shanghai", "--wait"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .context("run drctl failover")?;
    if !status.success() {
        stop.store(true, Ordering::SeqCst);
        bail!("drctl failover --to shanghai failed ({status})");
    }
    let end = Instant::now() + Duration::from_secs(30);
    while !acks.lock().await.iter().any(|(_, p, _)| *p == sh) {
        if Instant::now() > end {
            stop.store(true, Ordering::SeqCst);
            bail!("no write acknowledged by shanghai within 30 s of the switchover");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    w.await.ok();
    let acks = acks.lock().await.clone();
    let on_sh: Vec<u64> = psql(&l.bin_dir, sh, "select id from writes")
        .await?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let lost = acks.iter().filter(|(_, _, id)| !on_sh.contains(id)).count();
    let n_bj = acks.iter().filter(|(_, p, _)| *p == bj).count();
    let gap = acks.windows(2).map(|w| w[1].0 - w[0].0).fold(0.0, f64::max);
    println!(
        "    writer: {} writes acknowledged (beijing {n_bj}, shanghai {}), {lost} lost; \
         longest gap between acknowledged writes {gap:.2}s",
        acks.len(),
        acks.len() - n_bj
    );
    if lost > 0 {
        bail!("{lost} acknowledged writes are missing on shanghai");
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
