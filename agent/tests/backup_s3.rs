//! The repository on a real S3-compatible server (moto_server on 127.0.0.1).
//!
//! "S3 killed in the middle of a backup": moto keeps its objects in memory, so killing it would
//! also erase the repository and make "no manifest was written" vacuous. The connection is
//! therefore cut by killing a TCP forwarder in front of moto (from the client's side the
//! server is gone: resets, then connection refused); the bucket's content survives to be
//! checked, and the forwarder is restarted on the same port for the next backup. At the end
//! moto itself is killed by PID and `wal-push` must fail with a non-zero exit.
#![allow(
    clippy::unwrap_used,
    clippy::let_underscore_must_use,
    clippy::cloned_ref_to_slice_refs
)]

mod backup_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backup_support::*;
use dr_agent::backup::basebackup::{BackupOptions, run_backup};
use dr_agent::backup::repo_config::{Location, Secret};
use dr_agent::backup::restore::restore;
use dr_agent::backup::verify::verify;
use dr_agent::backup::{BackupKind, RepoConfig, Repository};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A TCP forwarder; `kill` drops the listener and every connection.
struct Forwarder {
    cancel: CancellationToken,
}

impl Forwarder {
    fn start(listen: SocketAddr, upstream: SocketAddr) -> Forwarder {
        let cancel = CancellationToken::new();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_reuseaddr(true).unwrap();
        sock.bind(listen).unwrap();
        let listener = sock.listen(64).unwrap();
        let c = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = c.cancelled() => return,
                    r = listener.accept() => {
                        let Ok((mut inbound, _)) = r else { continue };
                        let c2 = c.clone();
                        tokio::spawn(async move {
                            let Ok(mut out) = tokio::net::TcpStream::connect(upstream).await else { return };
                            tokio::select! {
                                () = c2.cancelled() => {}
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                            }
                        });
                    }
                }
            }
        });
        Forwarder { cancel }
    }

    fn kill(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn create_bucket(addr: SocketAddr, bucket: &str) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
}

fn s3_config(root: &std::path::Path, name: &str, port: u16) -> std::path::PathBuf {
    let p = root.join(name);
    std::fs::write(
        &p,
        format!(
            "version = 1\nkey_file = \"repo.key\"\nconcurrency = 4\n[location]\nkind = \"s3\"\nbucket = \"dr-backups\"\n\
             endpoint = \"http://127.0.0.1:{port}\"\nregion = \"us-east-1\"\nprefix = \"bj/db1/\"\n\
             credentials_file = \"s3.cred\"\n"
        ),
    )
    .unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_s3_killed_mid_backup_then_next_succeeds() {
    let tmp = test_dir();
    let root = tmp.path();
    std::fs::write(
        root.join("s3.cred"),
        "access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
    )
    .unwrap();

    // --- moto_server and a forwarder in front of it
    let moto_port = free_port();
    let moto_addr: SocketAddr = format!("127.0.0.1:{moto_port}").parse().unwrap();
    let mut moto = ChildGuard(
        Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &moto_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server on PATH"),
    );
    wait_until(
        || std::net::TcpStream::connect(moto_addr).is_ok(),
        Duration::from_secs(30),
        "moto_server",
    )
    .await;
    create_bucket(moto_addr, "dr-backups").await;
    let fwd_port = free_port();
    let fwd_addr: SocketAddr = format!("127.0.0.1:{fwd_port}").parse().unwrap();
    let mut fwd = Forwarder::start(fwd_addr, moto_addr);

    let cfg_path = s3_config(root, "repository.toml", fwd_port);
    let direct_path = s3_config(root, "direct.toml", moto_port);
    let env = HashMap::new();
    let cfg = RepoConfig::load(&cfg_path, &env).unwrap();
    if let Location::S3 { access_key_id, .. } = &cfg.location {
        assert_eq!(access_key_id.as_ref(), Some(&Secret("test".into())));
    }
    let repo = Repository::init(&cfg).await.unwrap();
    let direct = Repository::open(&RepoConfig::load(&direct_path, &env).unwrap())
        .await
        .unwrap();
    chown_postgres(root);

    let port = free_port();
    let data = root.join("data");
    let pg = Pg::init(&data, port, &archive_conf(&cfg_path));
    pg.start();
    pg.pgbench(&["-i", "-s", "3", "-q"]);
    let expected = fingerprint(&pg).await;
    let opts = BackupOptions {
        pg_url: pg.url(),
        data_dir: data.clone(),
        kind: BackupKind::Full,
        fast_checkpoint: true,
    };

    // --- the server dies in the middle of a backup
    {
        let r2 = repo.clone();
        let o2 = opts.clone();
        let task =
            tokio::spawn(async move { run_backup(&r2, &o2, &CancellationToken::new()).await });
        let start = Instant::now();
        loop {
            let n = direct.list_objects("data/").await.unwrap().len();
            if n >= 5 {
                break;
            }
            assert!(
                !task.is_finished(),
                "backup finished before the server could be killed"
            );
            assert!(start.elapsed() < Duration::from_secs(60));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fwd.kill();
        let killed_at = Instant::now();
        let err = task
            .await
            .unwrap()
            .expect_err("backup must fail when the server dies");
        eprintln!("backup error after kill ({:?}): {err}", killed_at.elapsed());
        assert!(
            matches!(err, dr_agent::backup::BackupError::Storage(_)),
            "{err:?}"
        );
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "the failure must be prompt"
        );
        assert!(
            direct.list_backups().await.unwrap().is_empty(),
            "no manifest may be written"
        );
        assert!(
            !direct.list_objects("data/").await.unwrap().is_empty(),
            "orphans stay for prune"
        );
    }

    // --- server back: the next backup succeeds and restores
    fwd = Forwarder::start(fwd_addr, moto_addr);
    let m = run_backup(&repo, &opts, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(repo.list_backups().await.unwrap(), vec![m.id.clone()]);
    let rep = verify(&repo, &[m.id.clone()], true).await.unwrap();
    assert!(rep.is_ok(), "{:?}", rep.problems);
    pg.stop();

    let target = root.join("restore");
    let rport = free_port();
    let ropts = restore_opts(
        &cfg_path,
        &target,
        rport,
        &[
            "recovery_target = 'immediate'",
            "recovery_target_action = 'promote'",
        ],
    );
    restore(&repo, &m.id, &target, &ropts, &CancellationToken::new())
        .await
        .unwrap();
    chown_postgres(&target);
    let restored = Pg::existing(&target, rport);
    restored.start();
    let start = Instant::now();
    while restored.query_bool("select pg_is_in_recovery()").await {
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fingerprint(&restored).await, expected);
    restored.stop();

    // --- wal-push through opendal: a repeat of the same segment succeeds, a different file
    // under that name is refused and changes nothing. An object the fs push wrote (whose
    // header hash is of the stored bytes), copied here as a tier copy would, is recognised
    // the same way.
    let segment = |fill: u8| -> Vec<u8> {
        (0..16usize << 20)
            .map(|i| {
                if i % 7 == 0 {
                    (i >> 10) as u8 ^ fill
                } else {
                    fill
                }
            })
            .collect()
    };
    let push = |p: &std::path::Path, cfg: &std::path::Path| {
        Command::new(agent_exe())
            .arg("wal-push")
            .arg(p)
            .arg("--repo-config")
            .arg(cfg)
            .output()
            .unwrap()
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let walsrc = root.join("walsrc");
    std::fs::create_dir_all(&walsrc).unwrap();
    let fs_side = root.join("fs-side");
    std::fs::create_dir_all(&fs_side).unwrap();
    std::fs::copy(root.join("repo.key"), fs_side.join("repo.key")).unwrap();
    let fs_cfg = fs_repo_config(&fs_side, &fs_side.join("repo"), "");
    Repository::init(&RepoConfig::load(&fs_cfg, &env).unwrap())
        .await
        .unwrap();
    for (seg, via_fs) in [
        ("0000000100000000000000A1", false),
        ("0000000100000000000000A2", true),
    ] {
        let name = format!("wal/00000001/{seg}");
        let wal = walsrc.join(seg);
        std::fs::write(&wal, segment(3)).unwrap();
        if via_fs {
            let out = push(&wal, &fs_cfg);
            assert!(out.status.success(), "fs push: {}", stderr(&out));
            let raw = std::fs::read(fs_side.join("repo").join(&name)).unwrap();
            assert_eq!(raw[4], 3, "zstd, hash of the stored bytes");
            direct.put_raw(&name, raw).await.unwrap();
        } else {
            let out = push(&wal, &cfg_path);
            assert!(out.status.success(), "s3 push: {}", stderr(&out));
        }
        let stored = direct.get_raw(&name).await.unwrap().unwrap();
        let out = push(&wal, &cfg_path);
        assert!(out.status.success(), "repeat of {seg}: {}", stderr(&out));
        let mut other = segment(3);
        other[(8 << 20) + 5] ^= 1;
        std::fs::write(&wal, &other).unwrap();
        let out = push(&wal, &cfg_path);
        assert!(!out.status.success(), "a different {seg} must be refused");
        assert!(
            stderr(&out).contains("different content"),
            "{}",
            stderr(&out)
        );
        assert!(direct.get_raw(&name).await.unwrap().unwrap() == stored);
    }

    // --- moto itself killed: wal-push exits non-zero so PostgreSQL retries
    drop(fwd);
    let _ = moto.0.kill();
    let _ = moto.0.wait();
    let direct_wal = root.join("000000010000000000000099");
    std::fs::write(&direct_wal, vec![1u8; 1 << 20]).unwrap();
    let out = Command::new(agent_exe())
        .args(["wal-push"])
        .arg(&direct_wal)
        .arg("--repo-config")
        .arg(&direct_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    eprintln!(
        "wal-push with the server down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
