//! `drctl rotate-credentials --emergency --scope all` end to end: real PostgreSQL 15, an
//! "application" whose secret files a reader loop checks the whole time, a reload hook, the
//! agent's certificate re-issued from an agent-made key, and the old certificate refused by
//! the coordinator afterwards. Then every log and output of the run (coordinator and agent
//! logs, drctl stdout/stderr, the coordinator's Raft SQLite files and snapshots, the audit
//! export) is searched for the secret values: none may appear.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use dr_proto::pb;
use dr_proto::pb::control_service_client::ControlServiceClient;
use dr_proto::tls::{ClientTls, TlsPaths};
use dr_tests::TestCluster;
use dr_tests::harness::cluster::AgentSpec;
use dr_tests::harness::postgres::Postgres;
use sqlx::{ConnectOptions as _, Connection as _, PgConnection};
use tracing::info;

const OLD: &str = "old-Pa55word-before-the-breach";

async fn login(port: u16, user: &str, pw: &str) -> Result<PgConnection, sqlx::Error> {
    let opts: sqlx::postgres::PgConnectOptions =
        format!("postgres://{user}:{pw}@127.0.0.1:{port}/postgres").parse()?;
    PgConnection::connect_with(&opts.disable_statement_logging()).await
}

/// WhoAmI with this certificate: the identity, or why the coordinator refused it.
async fn who_am_i(endpoint: &str, paths: &TlsPaths) -> Result<String, String> {
    let tls = ClientTls::load(paths).map_err(|e| e.to_string())?;
    let channel = tls.channel(endpoint).map_err(|e| e.to_string())?;
    let call = async {
        ControlServiceClient::new(channel)
            .who_am_i(pb::WhoAmIRequest {})
            .await
    };
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(s)) => Err(s.to_string()),
        Ok(Ok(r)) => Ok(r.into_inner().identity),
    }
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The base64 body of a PEM private key, joined (what a leak would show).
fn key_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_emergency_rotation_db_app_certs_and_no_secret_anywhere() -> Result<()> {
    // --- PostgreSQL with password checks for everything but the local admin
    let pg_dir = tempfile::tempdir()?;
    let mut pg =
        Postgres::start(&pg_dir.path().join("data"), &pg_dir.path().join("pg.log")).await?;
    std::fs::write(
        pg.data_dir.join("pg_hba.conf"),
        "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )?;
    let admin_opts: sqlx::postgres::PgConnectOptions = pg.url("postgres").parse()?;
    let mut admin = PgConnection::connect_with(&admin_opts.disable_statement_logging()).await?;
    sqlx::query("select pg_reload_conf()")
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("create role app login password '{OLD}'"))
        .execute(&mut admin)
        .await?;
    login(pg.port, "app", OLD)
        .await
        .context("old password works before")?;

    // --- the application's secret files and its reload hook
    let app_dir = tempfile::tempdir()?;
    let plain = app_dir.path().join("db-password");
    let envf = app_dir.path().join("app.env");
    let marker = app_dir.path().join("reloads");
    std::fs::write(&plain, format!("{OLD}\n"))?;
    std::fs::write(&envf, format!("A=1\nDB_PASSWORD=\"{OLD}\"\nB=2\n"))?;

    let host = "db-1";
    let mut agent = AgentSpec::new(host).roles(&["db"]);
    agent.extra_toml = format!(
        "\n[rotation]\ndb_admin_url = {url:?}\ntimeout = \"20s\"\n\
         [[rotation.roles]]\nname = \"app\"\n\
         files = [{{ path = {plain:?} }}, {{ path = {envf:?}, format = \"env\", key = \"DB_PASSWORD\" }}]\n\
         reload = [{{ command = [\"/bin/sh\", \"-c\", \"echo reloaded >> {marker}\"] }}]\n",
        url = pg.url("postgres"),
        plain = plain.display().to_string(),
        envf = envf.display().to_string(),
        marker = marker.display(),
    );
    let mut cluster = TestCluster::builder()
        .coordinators(1)
        // Snapshots are taken during the run, so they are searched too.
        .snapshot_every(10)
        .agent(agent)
        .start()
        .await?;
    let endpoint = cluster.coord_listen(1)?.to_string();

    // The agent's certificate as it is now (kept to prove it is refused afterwards).
    let agent_cert = cluster.pki.dir.join(format!("agent-{host}.pem"));
    let agent_key = cluster.pki.dir.join(format!("agent-{host}.key"));
    let old_copy = TlsPaths {
        ca: cluster.pki.ca(),
        cert: cluster.dir().join("old-agent.pem"),
        key: cluster.dir().join("old-agent.key"),
        reload_interval: None,
    };
    std::fs::copy(&agent_cert, &old_copy.cert)?;
    std::fs::copy(&agent_key, &old_copy.key)?;
    let old_key_pem = std::fs::read_to_string(&agent_key)?;
    assert_eq!(
        who_am_i(&endpoint, &old_copy)
            .await
            .map_err(anyhow::Error::msg)?,
        format!("spiffe://{}/agent/{host}", cluster.pki.trust_domain),
        "the old certificate works before the rotation"
    );

    // --- the application reads its secret files the whole time
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, plain, envf) = (stop.clone(), plain.clone(), envf.clone());
        std::thread::spawn(move || -> Result<u64, String> {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = std::fs::read_to_string(&plain).map_err(|e| e.to_string())?;
                let s = p.strip_suffix('\n').ok_or("plain file lost its newline")?;
                if !(s == OLD || (s.len() == 40 && s.chars().all(|c| c.is_ascii_alphanumeric()))) {
                    return Err("torn plain secret file".into());
                }
                let e = std::fs::read_to_string(&envf).map_err(|e| e.to_string())?;
                let lines: Vec<&str> = e.lines().collect();
                if lines.len() != 3
                    || lines[0] != "A=1"
                    || lines[2] != "B=2"
                    || !lines[1].starts_with("DB_PASSWORD=\"")
                    || !lines[1].ends_with('"')
                {
                    return Err(format!("torn env file: {} lines", lines.len()));
                }
                reads += 1;
            }
            Ok(reads)
        })
    };

    // --- the emergency rotation, through drctl
    let ca_dir = cluster.pki.dir.display().to_string();
    let out = cluster
        .drctl([
            "rotate-credentials",
            "--emergency",
            "--scope",
            "all",
            "--host",
            host,
            "--ca-dir",
            &ca_dir,
            "--reason",
            "breach drill",
            // The coordinators' own certificates are t41's subject.
            "--no-coordinators",
        ])
        .await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    info!(%stdout, %stderr, "rotation");
    assert!(out.status.success(), "rotation failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("old_rejected=true new_accepted=true"),
        "{stdout}"
    );
    stop.store(true, Ordering::Relaxed);
    let reads = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?
        .map_err(anyhow::Error::msg)?;
    assert!(reads > 0, "the reader ran");

    // --- database: old password dead, new one works; the application was reloaded
    let new_pw = std::fs::read_to_string(&plain)?.trim_end().to_string();
    assert_eq!(new_pw.len(), 40);
    assert_eq!(
        std::fs::read_to_string(&envf)?,
        format!("A=1\nDB_PASSWORD=\"{new_pw}\"\nB=2\n")
    );
    let err = login(pg.port, "app", OLD)
        .await
        .err()
        .context("the old password still logs in")?;
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );
    login(pg.port, "app", &new_pw)
        .await
        .context("new password")?;
    assert_eq!(std::fs::read_to_string(&marker)?, "reloaded\n");

    // --- certificates: a new agent-made key, the old certificate refused, the new accepted
    let new_key_pem = std::fs::read_to_string(&agent_key)?;
    assert_ne!(new_key_pem, old_key_pem, "the agent made a new key");
    let sec = cluster.drctl_json(["security", "status"]).await?;
    let revoked = sec["revoked"].as_array().context("revoked list")?;
    assert_eq!(revoked.len(), 1, "{sec}");
    let old_der = rustls_pemfile::certs(&mut std::fs::read(&old_copy.cert)?.as_slice())
        .next()
        .context("old cert")??;
    assert_eq!(
        revoked[0]["sha256"],
        dr_proto::tls::cert_sha256_hex(&old_der)
    );
    // Every coordinator applies the committed revocation set within its 500 ms tick.
    let refused = dr_tests::harness::wait::wait_until(
        "the coordinator refuses the old certificate",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async { Ok(who_am_i(&endpoint, &old_copy).await.err()) },
    )
    .await?;
    info!(%refused, "old certificate refused");
    let current = TlsPaths {
        ca: cluster.pki.ca(),
        cert: agent_cert.clone(),
        key: agent_key.clone(),
        reload_interval: None,
    };
    assert_eq!(
        who_am_i(&endpoint, &current)
            .await
            .map_err(anyhow::Error::msg)?,
        format!("spiffe://{}/agent/{host}", cluster.pki.trust_domain)
    );
    // Picked up without a restart: the agent's reloader saw the new pair.
    let agent_log = cluster.dir().log_path(&format!("agent-{host}"));
    dr_tests::harness::wait::wait_until(
        "the agent reloads its certificate",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || async {
            let log = std::fs::read_to_string(&agent_log)?;
            Ok(log.contains("tls certificates reloaded").then_some(()))
        },
    )
    .await?;
    // And its next session uses it: restart the agent, it must connect again.
    cluster.stop_agent(host).await?;
    cluster.start_agent(host)?;
    cluster.wait_agents_connected(&[host.to_string()]).await?;

    // --- no secret anywhere: every file of the run, drctl's output, the audit export
    let audit = cluster.drctl(["audit", "export"]).await?;
    assert!(audit.status.success(), "{audit:?}");
    let rotation_commands = cluster
        .drctl(["commands", "list", "--host", host, "--output", "json"])
        .await?;
    let mut outputs: Vec<(String, Vec<u8>)> = vec![
        ("drctl stdout".into(), out.stdout.clone()),
        ("drctl stderr".into(), out.stderr.clone()),
        ("audit export".into(), audit.stdout.clone()),
        ("commands list".into(), rotation_commands.stdout.clone()),
    ];
    cluster.stop_all().await?;
    // Logs are complete once the processes stopped.
    let log = std::fs::read_to_string(cluster.dir().log_path("coord-1"))?;
    assert!(
        log.contains("refused a revoked certificate"),
        "the refusal names the revocation"
    );
    let mut files = Vec::new();
    files_under(cluster.dir().path(), &mut files);
    let key_files = [agent_key.clone(), old_copy.key.clone()];
    let mut searched = 0usize;
    for f in files {
        // Only the key files themselves may hold a key.
        if key_files.contains(&f) || f.extension().is_some_and(|e| e == "key") {
            continue;
        }
        outputs.push((f.display().to_string(), std::fs::read(&f)?));
        searched += 1;
    }
    assert!(
        outputs
            .iter()
            .any(|(n, _)| n.ends_with(".sqlite") || n.contains("raft") || n.contains("coord-1/")),
        "the coordinator's Raft files were searched: {:?}",
        outputs.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    let secrets = [
        ("old password", OLD.to_string()),
        ("new password", new_pw.clone()),
        ("old agent key", key_body(&old_key_pem)),
        ("new agent key", key_body(&new_key_pem)),
    ];
    for (name, data) in &outputs {
        for (what, secret) in &secrets {
            // Key bodies are searched line by line too (a PEM leak keeps its line breaks).
            let needles: Vec<&str> = if what.contains("key") {
                secret
                    .as_bytes()
                    .chunks(64)
                    .filter_map(|c| std::str::from_utf8(c).ok())
                    .collect()
            } else {
                vec![secret.as_str()]
            };
            for n in needles {
                assert!(!contains(data, n.as_bytes()), "{what} found in {name}");
            }
        }
    }
    info!(
        searched,
        outputs = outputs.len(),
        "no secret in any log or output"
    );
    drop(admin);
    pg.stop().await?;
    cluster.shutdown().await?;
    Ok(())
}
