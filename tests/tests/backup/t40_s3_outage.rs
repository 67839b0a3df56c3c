//! The S3 server goes away in the middle of a backup started with `drctl backup run`: the
//! backup fails with a clear message, the catalog gets no entry and the bucket no manifest,
//! and the next backup (server back) succeeds and verifies.
//!
//! The repository is on a real moto_server. moto keeps objects in memory, so killing it would
//! also erase what we want to inspect; the agent therefore reaches it through a throttled TCP
//! forwarder owned by the test, which is torn down mid-backup (from the agent's side the server
//! is gone: connections reset, then refused) and started again on the same port. WAL is
//! archived straight to moto, so the archive is not part of the outage.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use dr_tests::harness::backup::{
    apply_policy, archiving_postgres, catalog_rows, full_backup, init_repo, last_doc, run_ok, text,
};
use dr_tests::harness::cluster::{AgentSpec, get_str};
use dr_tests::harness::ports::free_port;
use dr_tests::harness::postgres::pg_bin_dir;
use dr_tests::{ChildGuard, ChildSpec, TestCluster};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tracing::info;

const HOST: &str = "db-bj-1";

/// A TCP forwarder; client-to-server bytes limited to `rate` bytes/s (0: unlimited). Dropping
/// it aborts the listener and every connection.
struct Forwarder {
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Forwarder {
    async fn start(listen: SocketAddr, to: SocketAddr, rate: u64) -> Result<Forwarder> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let t = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            if rate > 0 {
                                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64))
                                    .await;
                            }
                        }
                        let _closed = sw.shutdown().await;
                    };
                    let down = async {
                        let _copied = tokio::io::copy(&mut sr, &mut cw).await;
                        let _closed = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
                if let Ok(mut v) = t.lock() {
                    v.push(conn);
                }
            }
        });
        if let Ok(mut v) = tasks.lock() {
            v.push(accept);
        }
        Ok(Forwarder { tasks })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(v) = self.tasks.lock() {
            for t in v.iter() {
                t.abort();
            }
        }
    }
}

async fn create_bucket(addr: SocketAddr, bucket: &str) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await?;
    ensure!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
    Ok(())
}

fn s3_config(dir: &Path, name: &str, port: u16) -> Result<std::path::PathBuf> {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "version = 1\nkey_file = \"repo.key\"\nconcurrency = 4\n[location]\nkind = \"s3\"\nbucket = \"dr-backups\"\n\
             endpoint = \"http://127.0.0.1:{port}\"\nregion = \"us-east-1\"\nprefix = \"bj/db1/\"\n\
             credentials_file = \"s3.cred\"\n"
        ),
    )?;
    Ok(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_mid_backup() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root (PostgreSQL runs as the postgres user)");
        return Ok(());
    }
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(AgentSpec::new(HOST).roles(&["db"]))
        .start()
        .await?;
    let agent = cluster.bins.agent.clone();
    let bk = cluster.dir().join("backup");
    std::fs::create_dir_all(&bk)?;

    info!("--- moto_server, and a throttled forwarder in front of it");
    let moto_port = free_port()?;
    let moto_addr: SocketAddr = format!("127.0.0.1:{moto_port}").parse()?;
    let mut moto = ChildGuard::spawn(
        ChildSpec::new("moto", "moto_server", cluster.dir().log_path("moto")).args([
            "-H".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            moto_port.to_string(),
        ]),
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(moto_addr).await.is_err() {
        ensure!(
            std::time::Instant::now() < deadline,
            "moto_server did not listen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    create_bucket(moto_addr, "dr-backups").await?;
    let fwd_port = free_port()?;
    let fwd_addr: SocketAddr = format!("127.0.0.1:{fwd_port}").parse()?;
    // 256 KiB/s: the full backup below adds ~3.6 MiB, so it is still uploading when the link
    // dies at 3 s. At 1 MiB/s it took 2.9 s and finished before the cut on a quiet machine.
    let fwd = Forwarder::start(fwd_addr, moto_addr, 256 << 10).await?;

    std::fs::write(
        bk.join("s3.cred"),
        "access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
    )?;
    let repo_cfg = s3_config(&bk, "repo.toml", fwd_port)?;
    let direct_cfg = s3_config(&bk, "direct.toml", moto_port)?;
    init_repo(&agent, &direct_cfg, &bk).await?;

    info!("--- PostgreSQL 15, WAL archived straight to moto");
    let mut pg = archiving_postgres(cluster.dir(), &agent, &direct_cfg).await?;
    let port = pg.port.to_string();
    run_ok(
        Command::new(pg_bin_dir().join("pgbench"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(["-i", "-s", "4", "-q", "postgres"]),
        "pgbench -i",
    )
    .await?;
    apply_policy(
        &cluster,
        &bk,
        &format!(
            r#"version = 1
[[databases]]
name = "yeslocker"
host = "{HOST}"
pg_url = "{}"
data_dir = "{}"

[[locations]]
name = "primary"
tier = "primary"
jurisdiction = "cn"
repo_config = "{}"
"#,
            pg.url("postgres"),
            pg.data_dir.display(),
            repo_cfg.display()
        ),
    )
    .await?;

    info!("--- backup through a 256 KiB/s link; the link dies after 3 s");
    let started = std::time::Instant::now();
    let run = cluster.drctl([
        "backup",
        "run",
        "--db",
        "yeslocker",
        "--type",
        "full",
        "--wait",
    ]);
    let cut = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(fwd);
        info!("forwarder to moto torn down");
    };
    let (out, ()) = tokio::join!(run, cut);
    let out = out?;
    let msg = text(&out);
    info!(%msg, elapsed_ms = started.elapsed().as_millis() as u64, "backup with S3 gone");
    ensure!(
        out.status.code() == Some(1),
        "the backup must fail (did it end before the cut?): {msg}"
    );
    ensure!(
        msg.contains("backup failed, nothing was recorded")
            && msg.contains("storage server could not be reached"),
        "clear message naming the storage failure: {msg}"
    );
    let list = catalog_rows(&cluster.drctl_json(["backup", "list"]).await?);
    ensure!(
        list.is_empty(),
        "no catalog entry for the failed backup: {list:?}"
    );
    let in_bucket = run_ok(
        Command::new(&agent)
            .args(["backup", "list", "--output", "json", "--repo-config"])
            .arg(&direct_cfg),
        "dr-agent backup list (direct)",
    )
    .await?;
    let in_bucket: Value = serde_json::from_str(&in_bucket)?;
    ensure!(
        in_bucket.as_array().is_some_and(Vec::is_empty),
        "no manifest in the bucket: {in_bucket}"
    );

    info!("--- server back: the next backup succeeds and verifies");
    let fwd = Forwarder::start(fwd_addr, moto_addr, 0).await?;
    let full = last_doc(full_backup(&cluster).await?);
    let id = get_str(&full, "id").context("backup id")?.to_owned();
    let list = catalog_rows(&cluster.drctl_json(["backup", "list"]).await?);
    ensure!(list.len() == 1, "one entry: {list:?}");
    let out = cluster.drctl(["backup", "verify", &id]).await?;
    ensure!(out.status.success(), "verify {id}: {}", text(&out));

    drop(fwd);
    pg.stop().await?;
    drop(pg);
    moto.stop().await?;
    cluster.shutdown().await
}
