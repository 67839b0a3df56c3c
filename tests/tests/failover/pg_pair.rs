//! A PostgreSQL 15 primary and a streaming replica made for the failover tests.
//!
//! Unlike `harness::postgres`, these servers are started with `pg_ctl` (as user `postgres`
//! when the tests run as root), because the agents' pg.* verbs stop, promote and restart
//! them with `pg_ctl` too: whichever postmaster runs at the end is found through
//! `postmaster.pid` and stopped by its PID ([`PgNode::stop`], and on drop).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use dr_tests::harness::ports::free_port;
use dr_tests::harness::postgres::pg_bin_dir;
use dr_tests::wait_until;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid, User, chown};
use tokio::process::Command;

pub struct PgNode {
    pub port: u16,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub log_file: PathBuf,
}

fn postgres_user() -> Result<Option<(u32, u32)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    if User::from_name("postgres")?.is_none() {
        // Another test may create it at the same moment: only the lookup below decides.
        std::process::Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--shell", "/usr/sbin/nologin", "postgres"])
            .output()
            .ok();
    }
    let u = User::from_name("postgres")?.context("user postgres exists")?;
    Ok(Some((u.uid.as_raw(), u.gid.as_raw())))
}

/// Runs a PostgreSQL binary as `postgres` (root) or as ourselves; fails on a non-zero exit.
async fn run_pg(bin: &str, args: &[String]) -> Result<String> {
    let path = pg_bin_dir().join(bin);
    let mut cmd = if postgres_user()?.is_some() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    cmd.args(args)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .with_context(|| format!("{bin} took over 180 s"))?
        .with_context(|| format!("run {bin}"))?;
    if !out.status.success() {
        bail!(
            "{bin} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl PgNode {
    fn prepare(dir: &Path) -> Result<Self> {
        let socket_dir = dir.join("sock");
        std::fs::create_dir_all(&socket_dir)?;
        if let Some((uid, gid)) = postgres_user()? {
            for p in [dir, &socket_dir] {
                chown(p, Some(uid.into()), Some(gid.into()))
                    .with_context(|| format!("chown {}", p.display()))?;
            }
        }
        Ok(Self {
            port: free_port()?,
            data_dir: dir.join("data"),
            socket_dir,
            log_file: dir.join("pg_ctl.log"),
        })
    }

    /// initdb --data-checksums, replication settings, start; role `replicator`, `slots`.
    pub async fn primary(dir: &Path, slots: &[&str]) -> Result<Self> {
        let node = Self::prepare(dir)?;
        run_pg(
            "initdb",
            &[
                "-D".into(),
                node.data_dir.display().to_string(),
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
        let conf = format!(
            "\n# failover test\nport = {}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nwal_level = replica\nmax_wal_senders = 10\n\
             max_replication_slots = 10\nhot_standby = on\nfsync = off\nwal_keep_size = '256MB'\n",
            node.port,
            node.socket_dir.display()
        );
        append(&node.data_dir.join("postgresql.conf"), &conf)?;
        node.start().await?;
        let mut c = node.connect().await?;
        use sqlx::Connection as _;
        sqlx::query("create role replicator with replication login")
            .execute(&mut c)
            .await?;
        for s in slots {
            sqlx::query("select pg_create_physical_replication_slot($1)")
                .bind(*s)
                .execute(&mut c)
                .await?;
        }
        sqlx::query("create table writes (id bigint primary key, at timestamptz default now())")
            .execute(&mut c)
            .await?;
        c.close().await.ok();
        Ok(node)
    }

    /// pg_basebackup -R from `primary` using `slot`, own port, start, wait until streaming.
    pub async fn replica(dir: &Path, primary: &PgNode, slot: &str) -> Result<Self> {
        let node = Self::prepare(dir)?;
        run_pg(
            "pg_basebackup",
            &[
                "-h".into(),
                "127.0.0.1".into(),
                "-p".into(),
                primary.port.to_string(),
                "-U".into(),
                "replicator".into(),
                "-D".into(),
                node.data_dir.display().to_string(),
                "-R".into(),
                "-S".into(),
                slot.into(),
                "-X".into(),
                "stream".into(),
                "-c".into(),
                "fast".into(),
            ],
        )
        .await?;
        let conf = format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            node.port,
            node.socket_dir.display()
        );
        append(&node.data_dir.join("postgresql.auto.conf"), &conf)?;
        node.start().await?;
        let url = primary.url();
        wait_until(
            "the replica streams from the primary",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let url = url.clone();
                async move {
                    use sqlx::Connection as _;
                    let mut c = sqlx::PgConnection::connect(&url).await?;
                    let n: i64 = sqlx::query_scalar(
                        "select count(*) from pg_stat_replication where state = 'streaming'",
                    )
                    .fetch_one(&mut c)
                    .await?;
                    Ok((n > 0).then_some(()))
                }
            },
        )
        .await?;
        Ok(node)
    }

    pub async fn start(&self) -> Result<()> {
        run_pg(
            "pg_ctl",
            &[
                "-D".into(),
                self.data_dir.display().to_string(),
                "-l".into(),
                self.log_file.display().to_string(),
                "-w".into(),
                "-t".into(),
                "60".into(),
                "start".into(),
            ],
        )
        .await?;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub async fn connect(&self) -> Result<sqlx::PgConnection> {
        use sqlx::Connection as _;
        let url = self.url();
        let c = tokio::time::timeout(Duration::from_secs(3), sqlx::PgConnection::connect(&url))
            .await
            .context("connect timed out")??;
        Ok(c)
    }

    pub async fn in_recovery(&self) -> Result<bool> {
        let mut c = self.connect().await?;
        Ok(sqlx::query_scalar("select pg_is_in_recovery()")
            .fetch_one(&mut c)
            .await?)
    }

    /// The `[postgres]` table of the agent that manages this server.
    pub fn agent_toml(&self, cluster: &str) -> String {
        format!(
            "\n[postgres]\ncluster = \"{cluster}\"\ndata_dir = \"{}\"\nbin_dir = \"{}\"\n\
             listen_host = \"127.0.0.1\"\nport = {}\nsocket_dir = \"{}\"\nlog_file = \"{}\"\n",
            self.data_dir.display(),
            pg_bin_dir().display(),
            self.port,
            self.socket_dir.display(),
            self.log_file.display()
        )
    }

    fn postmaster_pid(&self) -> Option<Pid> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        Some(Pid::from_raw(pid))
    }

    /// Fast shutdown of whichever postmaster runs on this data dir, by its PID; SIGKILL
    /// after 30 s.
    pub fn stop(&self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        if kill(pid, Signal::SIGINT).is_err() {
            return;
        }
        for _ in 0..300 {
            if kill(pid, None).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        kill(pid, Signal::SIGKILL).ok();
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        self.stop();
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Knobs of the failover tests' (and dr-failover-bench's) topology: beijing primary with
/// bj-db-1, shanghai secondary with sh-db-1 streaming from it, a witness region unless
/// `witness` is false, one critical database cluster.
#[derive(Clone, Debug)]
pub struct Topo {
    pub witness: bool,
    pub automatic: bool,
    /// The cluster's RPO (`rpo = ...`); None: the tier's default.
    pub rpo: Option<&'static str>,
    /// `[failover] lease`.
    pub lease: String,
    /// `[failover] detect_after`.
    pub detect_after: String,
    /// More entries (hosts, services, traffic providers), placed after the two db hosts.
    pub extra: String,
}

impl Default for Topo {
    fn default() -> Self {
        Topo {
            witness: true,
            automatic: true,
            rpo: None,
            lease: "4s".into(),
            detect_after: "2s".into(),
            extra: String::new(),
        }
    }
}

/// The topology document (`drctl topology apply`) for `bj` and `sh` with the knobs `t`.
pub fn topology(bj: &PgNode, sh: &PgNode, t: &Topo) -> String {
    let witness = if t.witness {
        "\n[[regions]]\nname = \"witness\"\nkind = \"witness\"\n"
    } else {
        ""
    };
    let rpo = t
        .rpo
        .map(|r| format!("rpo = \"{r}\"\n"))
        .unwrap_or_default();
    format!(
        r#"version = 1
name = "yeslocker"

[[regions]]
name = "beijing"
kind = "primary"

[[regions]]
name = "shanghai"
kind = "secondary"
{witness}
[[sites]]
name = "beijing-dc1"
region = "beijing"

[[sites]]
name = "shanghai-dc1"
region = "shanghai"

[[hosts]]
host_id = "bj-db-1"
region = "beijing"
site = "beijing-dc1"
roles = ["db"]

[[hosts]]
host_id = "sh-db-1"
region = "shanghai"
site = "shanghai-dc1"
roles = ["db"]
{extra}
[[db_clusters]]
name = "yeslocker"
members = ["bj-db-1", "sh-db-1"]
primary = "bj-db-1"
tier = "critical"
{rpo}
[db_clusters.replication]
application_name = "yeslocker"
slots = {{ bj-db-1 = "dr_bj_db_1", sh-db-1 = "dr_sh_db_1" }}
conninfo = {{ bj-db-1 = "host=127.0.0.1 port={} user=replicator", sh-db-1 = "host=127.0.0.1 port={} user=replicator" }}

[failover]
automatic = {}
detect_after = "{}"
lease = "{}"
cooldown = "10m"
"#,
        bj.port,
        sh.port,
        t.automatic,
        t.detect_after,
        t.lease,
        extra = t.extra,
    )
}
