//! The planned switchover switches REAL traffic (issue 5, acceptance 1 "DNS or nginx points to
//! shanghai", and item 6): the switchover plan's traffic steps run on the agents that own the
//! providers, against
//!
//! - a real BIND 9 (`named`, RFC 2136 UPDATE signed with TSIG): `api.yeslocker.test` A moves
//!   from beijing's address to shanghai's, as `dig` sees it;
//! - a real nginx whose upstream file the agent rewrites and reloads: HTTP requests through
//!   nginx reach the shanghai backend afterwards; the percentages of the plan (shanghai 100,
//!   beijing 0) become a weight and `down` in the file;
//! - a locker-site gateway (its own agent, an `exec` hook) repointed to shanghai.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use dr_tests::harness::cluster::{AgentSpec, json_list};
use dr_tests::harness::ports::free_port;
use dr_tests::harness::process::{ChildGuard, ChildSpec};
use dr_tests::{TestCluster, wait_until};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tracing::info;

use super::pg_pair::PgNode;
use super::t80_failback::topology;

const TSIG_B64: &str = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=";
const BJ_IP: &str = "127.0.0.10";
const SH_IP: &str = "127.0.0.20";

/// An HTTP server on 127.0.0.1 answering every request with `body`. Aborted on drop.
struct Backend {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(body: &'static str) -> Result<Backend> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
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
                sock.write_all(resp.as_bytes()).await.ok();
                sock.shutdown().await.ok();
            });
        }
    });
    Ok(Backend { addr, task })
}

/// GET / through nginx; the body when the status is 200.
async fn get(port: u16) -> Option<String> {
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

fn which(bin: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

struct Lb {
    _guard: ChildGuard,
    port: u16,
    upstream_file: PathBuf,
    main_conf: PathBuf,
    nginx: PathBuf,
    pid_file: PathBuf,
}

fn start_nginx(dir: &Path, bj: &str, sh: &str) -> Result<Lb> {
    let nginx = which("nginx").context("nginx is not installed (scripts/test.sh installs it)")?;
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let d = dir.display();
    let upstream_file = dir.join("upstream.conf");
    std::fs::write(
        &upstream_file,
        format!("upstream yeslocker {{\n    server {bj};\n    server {sh} down;\n}}\n"),
    )?;
    let main_conf = dir.join("nginx.conf");
    std::fs::write(
        &main_conf,
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
    )?;
    let guard = ChildGuard::spawn(
        ChildSpec::new("nginx", &nginx, dir.join("nginx.out"))
            .args(["-c".to_owned(), main_conf.display().to_string()]),
    )?;
    Ok(Lb {
        _guard: guard,
        port,
        upstream_file,
        main_conf,
        nginx,
        pid_file: dir.join("nginx.pid"),
    })
}

struct Named {
    _guard: ChildGuard,
    port: u16,
    key_file: PathBuf,
}

fn start_named(dir: &Path) -> Result<Named> {
    let named = which("named").context("BIND (named) is not installed")?;
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let d = dir.display();
    std::fs::write(
        dir.join("named.conf"),
        format!(
            r#"options {{
  directory "{d}";
  listen-on port {port} {{ 127.0.0.1; }};
  listen-on-v6 {{ none; }};
  pid-file "{d}/named.pid";
  session-keyfile "{d}/session.key";
  recursion no;
  dnssec-validation no;
  allow-transfer {{ none; }};
}};
controls {{ }};
key "dr-agent" {{ algorithm hmac-sha256; secret "{TSIG_B64}"; }};
zone "yeslocker.test" {{
  type primary;
  file "{d}/yeslocker.test.db";
  allow-update {{ key "dr-agent"; }};
}};
"#
        ),
    )?;
    std::fs::write(
        dir.join("yeslocker.test.db"),
        format!(
            "$TTL 60\n@ IN SOA ns.yeslocker.test. hostmaster.yeslocker.test. 1 3600 600 86400 60\n\
             @ IN NS ns.yeslocker.test.\nns IN A 127.0.0.1\napi IN A {BJ_IP}\n"
        ),
    )?;
    let key_file = dir.join("dr-agent.key");
    std::fs::write(
        &key_file,
        format!("key \"dr-agent\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{TSIG_B64}\";\n}};\n"),
    )?;
    let guard = ChildGuard::spawn(ChildSpec::new("named", named, dir.join("named.out")).args([
        "-g".to_owned(),
        "-n".to_owned(),
        "1".to_owned(),
        "-c".to_owned(),
        dir.join("named.conf").display().to_string(),
    ]))?;
    Ok(Named {
        _guard: guard,
        port,
        key_file,
    })
}

/// What an independent resolver client sees for api.yeslocker.test A.
async fn dig(port: u16) -> Result<Vec<String>> {
    let dig = which("dig").context("dig is not installed")?;
    let out = tokio::process::Command::new(dig)
        .args(["@127.0.0.1", "-p", &port.to_string(), "+short", "+tcp"])
        .args(["+time=2", "+tries=1", "api.yeslocker.test", "A"])
        .output()
        .await?;
    if !out.status.success() {
        bail!("dig failed: {out:?}");
    }
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    Ok(v)
}

#[tokio::test]
async fn switchover_switches_dns_nginx_and_gateways() -> Result<()> {
    dr_tests::init_tracing();
    let work = tempfile::Builder::new().prefix("dr-t25-").tempdir()?;
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let bj_http = backend("beijing").await?;
    let sh_http = backend("shanghai").await?;
    let lb = start_nginx(&work.path().join("nginx"), &bj_http.addr, &sh_http.addr)?;
    let named = start_named(&work.path().join("named"))?;
    info!("--- wait for nginx and named");
    wait_until(
        "nginx serves beijing",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async { Ok((get(lb.port).await.as_deref() == Some("beijing")).then_some(())) },
    )
    .await?;
    wait_until(
        "named answers",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            Ok(dig(named.port)
                .await
                .ok()
                .filter(|v| v == &[BJ_IP])
                .map(|_| ()))
        },
    )
    .await?;
    // The gateway's hook: rewrite its local upstream from the plan it is given.
    let gw_file = work.path().join("gw-pudong-upstream.txt");
    let hook = work.path().join("gw-repoint.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nset -e\nprintf 'active=%s\\nshanghai=%s %s\\nbeijing=%s %s\\n' \
             \"$DR_TRAFFIC_ACTIVE_REGIONS\" \"$DR_TRAFFIC_WEIGHT_SHANGHAI\" \
             \"$DR_TRAFFIC_ENDPOINTS_SHANGHAI\" \"$DR_TRAFFIC_WEIGHT_BEIJING\" \
             \"$DR_TRAFFIC_ENDPOINTS_BEIJING\" > {f}.tmp\nmv {f}.tmp {f}\n",
            f = gw_file.display()
        ),
    )?;
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    info!("--- PostgreSQL 15: primary (beijing), streaming replica (shanghai)");
    let pgdir = work.path().join("pg");
    std::fs::create_dir_all(&pgdir)?;
    std::fs::set_permissions(&pgdir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let bj = PgNode::primary(&pgdir.join("bj"), &["dr_sh_db_1"]).await?;
    let sh = PgNode::replica(&pgdir.join("sh"), &bj, "dr_sh_db_1").await?;

    let mut bj_spec = AgentSpec::new("bj-db-1").region("beijing").roles(&["db"]);
    bj_spec.extra_toml = bj.agent_toml("yeslocker");
    let mut sh_spec = AgentSpec::new("sh-db-1").region("shanghai").roles(&["db"]);
    sh_spec.extra_toml = sh.agent_toml("yeslocker");
    let mut app_spec = AgentSpec::new("sh-app-1")
        .region("shanghai")
        .roles(&["app"]);
    app_spec.extra_toml = format!(
        "\n[[traffic]]\nkind = \"nginx\"\nname = \"edge-lb\"\nupstream_file = \"{}\"\n\
         main_config = \"{}\"\nnginx_bin = \"{}\"\npid_file = \"{}\"\n\
         \n[[traffic]]\nkind = \"dns\"\nname = \"api-dns\"\nserver = \"127.0.0.1:{}\"\n\
         zone = \"yeslocker.test\"\nrecord = \"api.yeslocker.test\"\nttl = 30\n\
         tsig = {{ key_name = \"dr-agent\", secret = {{ file = \"{}\" }} }}\n",
        lb.upstream_file.display(),
        lb.main_conf.display(),
        lb.nginx.display(),
        lb.pid_file.display(),
        named.port,
        named.key_file.display()
    );
    let mut gw_spec = AgentSpec::new("gw-pudong")
        .region("shanghai")
        .roles(&["gateway"]);
    gw_spec.extra_toml = format!(
        "\n[[traffic]]\nkind = \"exec\"\nname = \"gw-pudong-repoint\"\nprogram = \"{}\"\n",
        hook.display()
    );
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(bj_spec)
        .agent(sh_spec)
        .agent(app_spec)
        .agent(gw_spec)
        .start()
        .await?;
    let extra = format!(
        r#"
[[hosts]]
host_id = "sh-app-1"
region = "shanghai"
site = "shanghai-dc1"
roles = ["app"]

[[hosts]]
host_id = "gw-pudong"
region = "shanghai"
site = "shanghai-dc1"
roles = ["gateway"]

[[traffic]]
name = "edge-lb"
kind = "nginx"
host = "sh-app-1"
endpoints = {{ beijing = ["{bj_ep}"], shanghai = ["{sh_ep}"] }}

[[traffic]]
name = "api-dns"
kind = "dns"
host = "sh-app-1"
endpoints = {{ beijing = ["{BJ_IP}"], shanghai = ["{SH_IP}"] }}

[[traffic]]
name = "gw-pudong-repoint"
kind = "exec"
host = "gw-pudong"
endpoints = {{ beijing = ["10.10.1.10:443"], shanghai = ["10.20.1.10:443"] }}
"#,
        bj_ep = bj_http.addr,
        sh_ep = sh_http.addr,
    );
    let result = scenario(
        &cluster,
        &bj,
        &sh,
        work.path(),
        &extra,
        (&bj_http.addr, &sh_http.addr),
        &lb,
        &named,
        &gw_file,
    )
    .await;
    if result.is_err() {
        for n in [&bj, &sh] {
            eprintln!(
                "---- {}\n{}",
                n.log_file.display(),
                dr_tests::harness::testdir::tail(&n.log_file, 40)
            );
        }
    }
    let down = cluster.shutdown().await;
    bj.stop();
    sh.stop();
    result?;
    down
}

#[allow(clippy::too_many_arguments)]
async fn scenario(
    cluster: &TestCluster,
    bj: &PgNode,
    sh: &PgNode,
    dir: &Path,
    extra: &str,
    (bj_backend, sh_backend): (&str, &str),
    lb: &Lb,
    named: &Named,
    gw_file: &Path,
) -> Result<()> {
    let file = dir.join("topology.toml");
    std::fs::write(&file, topology(bj, sh, extra))?;
    let file = file.to_string_lossy().into_owned();
    let v = cluster.drctl_json(["apply", "-f", &file]).await?;
    assert_eq!(v["applied"], true, "{v}");
    tokio::time::sleep(Duration::from_secs(3)).await;

    info!("--- drctl failover --to shanghai --wait");
    let out = cluster
        .drctl(["failover", "--to", "shanghai", "--wait"])
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    info!(%stdout, %stderr, "failover output");
    assert!(out.status.success(), "failover failed:\n{stdout}\n{stderr}");
    for step in [
        "traffic_edge-lb",
        "traffic_api-dns",
        "traffic_gw-pudong-repoint",
    ] {
        assert!(stdout.contains(step), "no step {step}:\n{stdout}");
    }
    assert!(!sh.in_recovery().await?, "shanghai is not primary");

    info!("--- nginx sends every request to shanghai");
    wait_until(
        "nginx serves shanghai",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async { Ok((get(lb.port).await.as_deref() == Some("shanghai")).then_some(())) },
    )
    .await?;
    for _ in 0..10 {
        assert_eq!(get(lb.port).await.as_deref(), Some("shanghai"));
    }
    let upstream = std::fs::read_to_string(&lb.upstream_file)?;
    info!(%upstream, "nginx upstream file");
    let bj_line = upstream
        .lines()
        .find(|l| l.contains(bj_backend))
        .unwrap_or_default();
    let sh_line = upstream
        .lines()
        .find(|l| l.contains(sh_backend))
        .unwrap_or_default();
    // Percentages became nginx weights: beijing 0 -> down, shanghai 100 -> weighted.
    assert!(bj_line.contains("down"), "beijing not down: {upstream}");
    assert!(
        sh_line.contains("weight=") && !sh_line.contains("down"),
        "shanghai not weighted: {upstream}"
    );

    info!("--- DNS (dig against BIND) answers shanghai");
    wait_until(
        "dig says shanghai",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            Ok(dig(named.port)
                .await
                .ok()
                .filter(|v| v == &[SH_IP])
                .map(|_| ()))
        },
    )
    .await?;

    info!("--- the locker-site gateway was repointed by its own agent");
    let gw = std::fs::read_to_string(gw_file).context("the gateway hook never ran")?;
    info!(%gw, "gateway upstream");
    assert!(gw.contains("active=shanghai\n"), "{gw}");
    assert!(gw.contains("shanghai=100 10.20.1.10:443"), "{gw}");
    assert!(gw.contains("beijing=0"), "{gw}");

    let ops = cluster.drctl_json(["operations", "list"]).await?;
    let op = json_list(&ops, "operations")
        .into_iter()
        .rfind(|o| o["kind"] == "switchover")
        .context("a switchover operation")?;
    assert_eq!(op["state"], "succeeded", "{op}");

    partial_switch_back(cluster, (bj_backend, sh_backend), lb, named, gw_file).await
}

/// `drctl failover --to beijing --percentage 75`: the database moves back entirely, traffic
/// splits 75 / 25. nginx weights the two servers (both up), DNS (no weights) keeps both
/// addresses, the gateway hook gets the percentages; a forced failover refuses a split.
async fn partial_switch_back(
    cluster: &TestCluster,
    (bj_backend, sh_backend): (&str, &str),
    lb: &Lb,
    named: &Named,
    gw_file: &Path,
) -> Result<()> {
    info!("--- a split is refused where the old region cannot keep a share");
    let out = cluster
        .drctl([
            "failover",
            "--to",
            "beijing",
            "--percentage",
            "75",
            "--force",
            "--yes",
            "--dry-run",
        ])
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "forced split accepted:\n{text}");
    assert!(text.contains("needs a planned switchover"), "{text}");
    let out = cluster
        .drctl([
            "failover",
            "--to",
            "beijing",
            "--percentage",
            "0",
            "--dry-run",
        ])
        .await?;
    assert!(!out.status.success(), "--percentage 0 accepted");

    info!("--- beijing streams again, then drctl failover --to beijing --percentage 75");
    wait_until(
        "bj-db-1 reports streaming",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || async {
            let agents = cluster.agents_at_leader().await?;
            Ok(agents
                .iter()
                .any(|a| a["host_id"] == "bj-db-1" && a.to_string().contains("streaming"))
                .then_some(()))
        },
    )
    .await?;
    let out = cluster
        .drctl([
            "failover",
            "--to",
            "beijing",
            "--percentage",
            "75",
            "--wait",
        ])
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    info!(%stdout, %stderr, "partial failover output");
    assert!(out.status.success(), "failover failed:\n{stdout}\n{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("beijing gets 75 %, shanghai keeps 25 %"),
        "no split warning:\n{stdout}\n{stderr}"
    );

    info!("--- nginx: both servers up, weighted 75 / 25 (reduced to 3 / 1), requests reach both");
    let upstream = std::fs::read_to_string(&lb.upstream_file)?;
    info!(%upstream, "nginx upstream file");
    let line = |b: &str| {
        upstream
            .lines()
            .find(|l| l.contains(b))
            .unwrap_or_default()
            .to_owned()
    };
    let (bj_line, sh_line) = (line(bj_backend), line(sh_backend));
    assert!(
        bj_line.contains("weight=3") && !bj_line.contains("down"),
        "{upstream}"
    );
    assert!(
        sh_line.contains("weight=1") && !sh_line.contains("down"),
        "{upstream}"
    );
    let (mut n_bj, mut n_sh) = (0, 0);
    for _ in 0..40 {
        match get(lb.port).await.as_deref() {
            Some("beijing") => n_bj += 1,
            Some("shanghai") => n_sh += 1,
            other => bail!("unexpected answer through nginx: {other:?}"),
        }
    }
    info!(n_bj, n_sh, "40 requests through nginx");
    // One worker, smooth weighted round robin: 30 / 10; a margin for a reload mid-count.
    assert!(n_bj >= 25 && n_sh >= 5, "beijing {n_bj}, shanghai {n_sh}");

    info!("--- DNS has no weights: both addresses in the record set");
    wait_until(
        "dig answers both regions",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            let mut v = dig(named.port).await.unwrap_or_default();
            v.sort();
            let mut want = vec![BJ_IP.to_owned(), SH_IP.to_owned()];
            want.sort();
            Ok((v == want).then_some(()))
        },
    )
    .await?;

    info!("--- the gateway hook got the percentages");
    let gw = std::fs::read_to_string(gw_file)?;
    info!(%gw, "gateway upstream");
    assert!(gw.contains("beijing=75"), "{gw}");
    assert!(gw.contains("shanghai=25"), "{gw}");
    Ok(())
}
