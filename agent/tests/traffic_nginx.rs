//! The `nginx` provider against a real nginx on 127.0.0.1 with two tiny backends answering
//! "beijing" and "shanghai": the switch moves requests, a rejected file is rolled back while
//! nginx keeps serving, re-applying is a no-op.
// Test helpers (outside #[test] fns) may unwrap and ignore best-effort cleanup results.
#![allow(clippy::unwrap_used, clippy::let_underscore_must_use)]

#[path = "traffic_common.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{ChildGuard, free_port, init_tracing, plan, require_binary, wait_until};
use dr_agent::traffic::{Change, NginxConfig, NginxProvider, TrafficError, TrafficProvider as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tracing::info;

/// An HTTP/1.1 server on 127.0.0.1 that answers every request with `body`. Aborted on drop.
struct Backend {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(body: &'static str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Backend { addr, task }
}

fn write_main_conf(dir: &Path, port: u16, upstream_file: &Path) -> PathBuf {
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"worker_processes 1;
daemon off;
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  include {up};
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://yeslocker; }}
  }}
}}
"#,
            up = upstream_file.display()
        ),
    )
    .unwrap();
    conf
}

fn provider(dir: &Path, pid_file: bool, server_params: &str) -> NginxProvider {
    NginxProvider::from_config(NginxConfig {
        name: "edge-lb".into(),
        upstream_file: dir.join("upstream.conf"),
        upstream: "yeslocker".into(),
        main_config: dir.join("nginx.conf"),
        nginx_bin: require_binary("nginx", "nginx-light"),
        pid_file: pid_file.then(|| dir.join("nginx.pid")),
        server_params: server_params.into(),
        timeout: Duration::from_secs(20),
    })
    .unwrap()
}

async fn get(client: &reqwest::Client, port: u16) -> Option<String> {
    let resp = client
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.text().await.ok()
}

/// Waits until `want` answers, then checks that the next requests all come from it too (nginx
/// reloads asynchronously: old workers drain first).
async fn wait_served_by(client: &reqwest::Client, port: u16, want: &str) {
    wait_until(
        &format!("nginx to serve {want}"),
        Duration::from_secs(20),
        || async { (get(client, port).await.as_deref() == Some(want)).then_some(()) },
    )
    .await;
    for _ in 0..10 {
        assert_eq!(get(client, port).await.as_deref(), Some(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_nginx_switches_upstream_and_rolls_back_bad_files() {
    init_tracing();
    let nginx_bin = require_binary("nginx", "nginx-light");
    let dir = tempfile::tempdir().unwrap();
    let bj = backend("beijing").await;
    let sh = backend("shanghai").await;
    let beijing = plan(&[&bj.addr], &[&sh.addr], 100);
    let shanghai = plan(&[&bj.addr], &[&sh.addr], 0);
    let port = free_port();
    let upstream = dir.path().join("upstream.conf");
    let main_conf = write_main_conf(dir.path(), port, &upstream);
    let lb = provider(dir.path(), true, "");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    info!("--- start nginx on the beijing file the provider would write");
    std::fs::write(&upstream, lb.render(&beijing)).unwrap();
    let log = dir.path().join("nginx.stderr");
    let mut nginx = ChildGuard::spawn(
        "nginx",
        Command::new(&nginx_bin)
            .arg("-c")
            .arg(&main_conf)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    {
        let pid_file = dir.path().join("nginx.pid");
        let expected = nginx.pid().to_string();
        wait_until("nginx pid file", Duration::from_secs(20), || {
            nginx.assert_running(&log);
            let got = std::fs::read_to_string(&pid_file).unwrap_or_default();
            let ok = got.trim() == expected;
            async move { ok.then_some(()) }
        })
        .await;
        wait_served_by(&client, port, "beijing").await;
    }

    info!("--- applying the plan nginx already serves is a no-op");
    {
        let applied = lb.apply(&beijing).await.unwrap();
        assert!(!applied.changed, "{applied:?}");
    }

    info!("--- failover via SIGHUP: requests move to shanghai");
    {
        let applied = lb.apply(&shanghai).await.unwrap();
        assert!(applied.changed);
        let mut got: Vec<(String, String, u32, u32)> = applied
            .changes
            .iter()
            .map(|c| match c {
                Change::Reweighted {
                    region: Some(r),
                    endpoint,
                    from,
                    to,
                } => (r.to_string(), endpoint.to_string(), *from, *to),
                other => panic!("unexpected change {other:?}"),
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("beijing".to_owned(), bj.addr.clone(), 1, 0),
                ("shanghai".to_owned(), sh.addr.clone(), 0, 1),
            ]
        );
        wait_served_by(&client, port, "shanghai").await;
        let text = std::fs::read_to_string(&upstream).unwrap();
        assert!(
            text.contains(&format!("server {} down;", bj.addr)),
            "{text}"
        );
        let state = lb.current().await.unwrap();
        assert_eq!(state.last_applied, Some(shanghai.digest()));
        assert_eq!(
            state.endpoints.iter().map(|e| e.weight).sum::<u32>(),
            1,
            "{state:?}"
        );
        assert!(!lb.apply(&shanghai).await.unwrap().changed);
    }

    info!("--- a file nginx rejects is rolled back and nginx keeps serving");
    {
        let bad = provider(dir.path(), true, "bogus_param=1");
        let before = std::fs::read(&upstream).unwrap();
        let err = bad.apply(&beijing).await.unwrap_err();
        assert!(matches!(err, TrafficError::NginxInvalid { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("invalid parameter \"bogus_param=1\""), "{msg}");
        assert!(err.is_permanent());
        assert_eq!(std::fs::read(&upstream).unwrap(), before);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("dr-tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        nginx.assert_running(&log);
        wait_served_by(&client, port, "shanghai").await;
    }

    info!("--- switch back with `nginx -s reload` instead of a pid file");
    {
        let lb2 = provider(dir.path(), false, "");
        let applied = lb2.apply(&beijing).await.unwrap();
        assert!(applied.changed);
        wait_served_by(&client, port, "beijing").await;
    }

    nginx.assert_running(&log);
    drop(nginx);
}
