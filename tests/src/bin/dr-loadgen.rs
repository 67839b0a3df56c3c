//! dr-loadgen: the fan-in benchmark of the control plane.
//!
//! Opens N agent sessions over mutual TLS to a coordinator cluster, each with its own
//! certificate (an agent may only speak for its own host, so the load must be N distinct
//! identities), heartbeats every interval with K check results, and answers commands at
//! once. While the load runs it samples the CPU and RSS of the processes named with
//! `--watch-pid` and measures the command round trip drctl -> leader -> one agent -> back
//! through the Control API. Prints a summary (text or JSON) for docs/benchmarks.md.
//!
//! ```text
//! dr-loadgen --ca-dir DEMO/certs --endpoints 127.0.0.1:7001,... --sessions 10000 \
//!            --watch-pid $(cat DEMO/coordinator-1.pid) --duration 60s
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use dr_proto::pb;
use dr_proto::tls::{ClientTls, TlsPaths};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "Opens many agent sessions against a coordinator cluster and measures it")]
struct Args {
    /// Directory with ca.pem and ca.key (as made by `drctl cert init`).
    #[arg(long)]
    ca_dir: PathBuf,
    /// Coordinator endpoints, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Heartbeat interval of every session.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Check results per heartbeat.
    #[arg(long, default_value_t = 5)]
    checks: usize,
    /// How long to hold the full load after every session is connected.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// New sessions opened per second while ramping up.
    #[arg(long, default_value_t = 1000)]
    connect_rate: u32,
    /// Command round trips to measure during the steady state.
    #[arg(long, default_value_t = 200)]
    round_trips: usize,
    /// Processes whose CPU and RSS are sampled during the steady state (e.g. the leader).
    #[arg(long)]
    watch_pid: Vec<u32>,
    /// Where the generated certificates go (default: a temp dir, removed at exit).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Region the simulated agents claim.
    #[arg(long, default_value = "beijing")]
    region: String,
    #[arg(long, default_value = "text")]
    output: String,
}

#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    heartbeats: AtomicU64,
    commands: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
    /// The first few distinct session errors, so a failed ramp-up says why.
    error_samples: std::sync::Mutex<Vec<String>>,
    /// Why sessions ended (before the run's end), by kind, so churn says where it comes
    /// from: the server redirecting, the server ending the stream, or the transport.
    ended: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counters {
    fn record_error(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let text = format!("{e:#}");
        let mut samples = self.error_samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < 5 && !samples.contains(&text) {
            samples.push(text);
        }
    }

    fn record_end(&self, why: &str) {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        *ended.entry(why.to_owned()).or_default() += 1;
    }

    fn ended_summary(&self) -> String {
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.is_empty() {
            return "none".into();
        }
        ended
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn report(&self) -> String {
        let samples = self.error_samples.lock().unwrap_or_else(|p| p.into_inner());
        format!(
            "connected {}, reconnects {}, errors {}, ended ({}){}",
            self.connected.load(Ordering::Relaxed),
            self.reconnects.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.ended_summary(),
            if samples.is_empty() {
                String::new()
            } else {
                format!("; first errors: {}", samples.join(" | "))
            }
        )
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    rt.block_on(run(args))
}

struct CertFactory {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    trust_domain: String,
    ca_pem: PathBuf,
    dir: PathBuf,
}

impl CertFactory {
    fn new(ca_dir: &Path, dir: &Path) -> Result<CertFactory> {
        let ca_pem_path = ca_dir.join("ca.pem");
        let ca_pem = std::fs::read_to_string(&ca_pem_path)
            .with_context(|| format!("read {}", ca_pem_path.display()))?;
        let key_pem = std::fs::read_to_string(ca_dir.join("ca.key"))
            .with_context(|| format!("read {}", ca_dir.join("ca.key").display()))?;
        let key = rcgen::KeyPair::from_pem(&key_pem).context("parse ca.key")?;
        let der = rustls_der(&ca_pem)?;
        let trust_domain = dr_proto::identity::trust_domain_of_ca(&der)
            .context("read the trust domain from ca.pem")?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, key).context("load the CA")?;
        Ok(CertFactory {
            issuer,
            trust_domain,
            ca_pem: ca_pem_path,
            dir: dir.to_path_buf(),
        })
    }

    fn issue(&self, name: &str, uri: &str) -> Result<TlsPaths> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.to_string().try_into()?));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_path = self.dir.join(format!("{name}.pem"));
        let key_path = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(TlsPaths {
            ca: self.ca_pem.clone(),
            cert: cert_path,
            key: key_path,
            reload_interval: None,
        })
    }
}

fn rustls_der(pem: &str) -> Result<Vec<u8>> {
    let cert = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .context("ca.pem holds no certificate")?
        .context("ca.pem is not valid PEM")?;
    Ok(cert.to_vec())
}

async fn run(args: Args) -> Result<()> {
    let tmp;
    let cert_dir = match &args.cert_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let factory = CertFactory::new(&args.ca_dir, &cert_dir)?;
    eprintln!("==> issuing {} agent certificates", args.sessions);
    let t = Instant::now();
    let mut agent_tls = Vec::with_capacity(args.sessions);
    for i in 0..args.sessions {
        let host = format!("load-{i:05}");
        let uri = format!("spiffe://{}/agent/{host}", factory.trust_domain);
        agent_tls.push((host.clone(), factory.issue(&format!("agent-{host}"), &uri)?));
    }
    eprintln!("    {:.1}s", t.elapsed().as_secs_f64());
    let op_uri = format!(
        "spiffe://{}/operator/loadgen?role=operator",
        factory.trust_domain
    );
    let operator = ClientTls::load(&factory.issue("operator-loadgen", &op_uri)?)?;

    let counters = Arc::new(Counters::default());
    let cancel = CancellationToken::new();
    let endpoints = Arc::new(args.endpoints.clone());

    eprintln!(
        "==> opening {} sessions at {}/s",
        args.sessions, args.connect_rate
    );
    // Progress every 10 s on stderr: churn shows up as reconnects growing in the steady state.
    let monitor = {
        let counters = counters.clone();
        let cancel = cancel.clone();
        let t0 = Instant::now();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                eprintln!(
                    "    [{:>4.0}s] heartbeats {} commands {}; {}",
                    t0.elapsed().as_secs_f64(),
                    counters.heartbeats.load(Ordering::Relaxed),
                    counters.commands.load(Ordering::Relaxed),
                    counters.report()
                );
            }
        })
    };
    let t = Instant::now();
    let mut handles = Vec::new();
    let pause = Duration::from_secs_f64(1.0 / f64::from(args.connect_rate.max(1)));
    for (host, paths) in agent_tls {
        let tls = ClientTls::load(&paths)?;
        let sess = Session {
            host,
            region: args.region.clone(),
            tls,
            endpoints: endpoints.clone(),
            interval: args.interval,
            checks: args.checks,
            counters: counters.clone(),
        };
        handles.push(tokio::spawn(sess.run(cancel.clone())));
        tokio::time::sleep(pause).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while counters.connected.load(Ordering::Relaxed) < args.sessions {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} sessions connected after the ramp-up ({})",
                counters.connected.load(Ordering::Relaxed),
                args.sessions,
                counters.report()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ramp = t.elapsed();
    eprintln!("    all connected in {:.1}s", ramp.as_secs_f64());

    // Let the initial HostUp transitions settle before measuring the steady state.
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!("==> steady state for {:?}", args.duration);
    let hb0 = counters.heartbeats.load(Ordering::Relaxed);
    let rc0 = counters.reconnects.load(Ordering::Relaxed);
    let er0 = counters.errors.load(Ordering::Relaxed);
    let samplers: Vec<_> = args
        .watch_pid
        .iter()
        .map(|&pid| tokio::spawn(sample_process(pid, args.duration)))
        .collect();

    let rtts = measure_round_trips(
        &operator,
        &endpoints,
        args.sessions,
        args.round_trips,
        args.duration,
    )
    .await?;

    let mut procs = Vec::new();
    for (pid, s) in args.watch_pid.iter().zip(samplers) {
        procs.push((*pid, s.await??));
    }
    let hb = counters.heartbeats.load(Ordering::Relaxed) - hb0;
    let reconnects = counters.reconnects.load(Ordering::Relaxed) - rc0;
    let errors = counters.errors.load(Ordering::Relaxed) - er0;
    let ended = counters.ended_summary();
    cancel.cancel();
    monitor.await.ok();
    for h in handles {
        h.await.ok();
    }

    let pct = |p: f64| -> f64 {
        if rtts.is_empty() {
            return f64::NAN;
        }
        let i = ((rtts.len() as f64 - 1.0) * p).round() as usize;
        rtts[i].as_secs_f64() * 1000.0
    };
    let summary = serde_json::json!({
        "sessions": args.sessions,
        "interval_ms": args.interval.as_millis() as u64,
        "checks_per_heartbeat": args.checks,
        "ramp_s": ramp.as_secs_f64(),
        "steady_s": args.duration.as_secs_f64(),
        "heartbeats_per_s": hb as f64 / args.duration.as_secs_f64(),
        "reconnects": counters.reconnects.load(Ordering::Relaxed),
        "errors": counters.errors.load(Ordering::Relaxed),
        "steady_reconnects": reconnects,
        "steady_errors": errors,
        "sessions_ended": ended,
        "round_trips": rtts.len(),
        "rtt_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        "processes": procs.iter().map(|(pid, s)| serde_json::json!({
            "pid": pid, "cpu_cores_avg": s.cpu_cores, "rss_mb_max": s.rss_max_mb, "rss_mb_avg": s.rss_avg_mb,
        })).collect::<Vec<_>>(),
    });
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "sessions {}  ramp {:.1}s  heartbeats/s {:.0}  reconnects {} ({} in the steady state)  errors {} ({} in the steady state)",
            args.sessions,
            ramp.as_secs_f64(),
            summary["heartbeats_per_s"].as_f64().unwrap_or(0.0),
            summary["reconnects"],
            reconnects,
            summary["errors"],
            errors
        );
        println!("sessions ended early, by kind: {ended}");
        println!(
            "command round trip over {} runs: p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            rtts.len(),
            pct(0.5),
            pct(0.9),
            pct(0.99),
            pct(1.0)
        );
        for (pid, s) in &procs {
            println!(
                "pid {pid}: cpu {:.2} cores avg, rss {:.0} MB max ({:.0} MB avg)",
                s.cpu_cores, s.rss_max_mb, s.rss_avg_mb
            );
        }
    }
    Ok(())
}

struct Session {
    host: String,
    region: String,
    tls: ClientTls,
    endpoints: Arc<Vec<String>>,
    interval: Duration,
    checks: usize,
    counters: Arc<Counters>,
}

/// How one session ended.
enum End {
    /// The run is over.
    Cancelled,
    /// A Redirect: to the leader it names, or (None) to no known leader.
    Redirect(Option<String>),
    /// The coordinator ended the response stream without a status.
    ServerClosed,
    /// Our own send side closed (the stream's request body went away).
    SendClosed,
}

impl Session {
    async fn run(self, cancel: CancellationToken) {
        let incarnation: u64 = rand::random();
        let mut target: Option<String> = None;
        // Like dr-agent: a session that ends goes back to the coordinator that welcomed it
        // (the leader, as far as it knows) before trying the others.
        let mut home: Option<String> = None;
        // The first dial goes to the first endpoint (the script lists the leader first).
        let mut next = self.endpoints.len().saturating_sub(1);
        let mut first = true;
        // dr-agent's reconnect delays (agent/src/session/backoff.rs, defaults): exponential
        // from 100 ms to 5 s with full jitter, starting over after a Welcome. A flat short
        // retry made the load generator's own retry storm the bottleneck of the ramp-up.
        let mut attempt = 0u32;
        while !cancel.is_cancelled() {
            let endpoint = target.take().unwrap_or_else(|| {
                next = (next + 1) % self.endpoints.len();
                self.endpoints[next].clone()
            });
            if !first {
                self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            let mut welcomed = false;
            let ended = self
                .session(&endpoint, incarnation, &cancel, &mut welcomed)
                .await;
            if welcomed {
                home = Some(endpoint.clone());
                attempt = 0;
            }
            if cancel.is_cancelled() {
                return;
            }
            let pause = match ended {
                Ok(End::Cancelled) => return,
                Ok(End::Redirect(Some(to))) => {
                    self.counters.record_end("redirect to the leader");
                    target = Some(to);
                    continue;
                }
                Ok(other) => {
                    self.counters.record_end(match other {
                        End::Redirect(_) => "redirect, no leader known",
                        End::ServerClosed => "stream ended by the coordinator",
                        _ => "our send side closed",
                    });
                    // Closed without a leader to go to (e.g. the leader lost its
                    // quorum): pause, or 10,000 sessions would spin through endpoints.
                    target = home.take();
                    backoff(&mut attempt)
                }
                Err(e) => {
                    self.counters.record_end(&format!(
                        "error{}",
                        if welcomed {
                            " after welcome"
                        } else {
                            " before welcome"
                        }
                    ));
                    self.counters.record_error(&e);
                    target = home.take();
                    backoff(&mut attempt)
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One session; `welcomed` tells whether it got as far as Welcome.
    async fn session(
        &self,
        endpoint: &str,
        incarnation: u64,
        cancel: &CancellationToken,
        welcomed: &mut bool,
    ) -> Result<End> {
        let channel = self
            .tls
            .connect(endpoint, Duration::from_secs(10))
            .await
            .with_context(|| format!("connect {endpoint}"))?;
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                host_id: self.host.clone(),
                region: self.region.clone(),
                site: "load".into(),
                roles: vec!["load".into()],
                version: "loadgen".into(),
                incarnation,
                check_names: (0..self.checks).map(|i| format!("check-{i}")).collect(),
                ..Default::default()
            })),
        };
        tx.send(hello).await?;
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .context("open the session stream")?
            .into_inner();
        let mut connected = false;
        let mut tick = tokio::time::interval(self.interval);
        // Spread heartbeats over the interval instead of sending them all at once.
        tick.reset_after(Duration::from_millis(
            rand::random::<u64>() % self.interval.as_millis().max(1) as u64,
        ));
        let mut seq = 0u64;
        let result = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(End::Cancelled),
                _ = tick.tick() => {
                    seq += 1;
                    let now = chrono::Utc::now().timestamp_millis();
                    let checks = (0..self.checks).map(|i| pb::CheckResult {
                        name: format!("check-{i}"),
                        service: "load".into(),
                        tier: pb::Tier::Important as i32,
                        state: pb::CheckState::Passing as i32,
                        detail: String::new(),
                        duration_ms: 1,
                        observed_at_unix_ms: now,
                    }).collect();
                    let hb = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                        seq, checks, sent_at_unix_ms: now, ..Default::default()
                    }))};
                    if tx.send(hb).await.is_err() { break Ok(End::SendClosed); }
                    self.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                msg = inbound.message() => {
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => break Ok(End::ServerClosed),
                        Err(e) => break Err(anyhow::Error::from(e).context("session stream")),
                    };
                    match msg.msg {
                        Some(pb::coordinator_message::Msg::Welcome(_)) if !connected => {
                            connected = true;
                            *welcomed = true;
                            self.counters.connected.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(pb::coordinator_message::Msg::Redirect(r)) => {
                            break Ok(End::Redirect(Some(r.leader_endpoint).filter(|e| !e.is_empty())));
                        }
                        Some(pb::coordinator_message::Msg::Command(c)) => {
                            self.counters.commands.fetch_add(1, Ordering::Relaxed);
                            let ack = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Ack(pb::CommandAck { key: c.key.clone() })) };
                            let res = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Result(pb::CommandResult {
                                key: c.key, success: true, message: "ok".into(), host_id: self.host.clone(), ..Default::default()
                            }))};
                            if tx.send(ack).await.is_err() || tx.send(res).await.is_err() { break Ok(End::SendClosed); }
                        }
                        _ => {}
                    }
                }
            }
        };
        if connected {
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
        result
    }
}

/// The delay before reconnect attempt `attempt` (then counted): uniform in
/// `[100 ms, min(5 s, 100 ms * 2^attempt)]`, as dr-agent with its default settings.
fn backoff(attempt: &mut u32) -> Duration {
    const MIN_MS: u64 = 100;
    const MAX_MS: u64 = 5_000;
    let cap = MIN_MS
        .saturating_mul(1u64 << (*attempt).min(16))
        .min(MAX_MS);
    *attempt = attempt.saturating_add(1);
    Duration::from_millis(MIN_MS + rand::random::<u64>() % (cap - MIN_MS + 1))
}

/// Round trips of `RunAction(run_checks)` to one random loaded agent, one at a time.
async fn measure_round_trips(
    operator: &ClientTls,
    endpoints: &[String],
    sessions: usize,
    count: usize,
    within: Duration,
) -> Result<Vec<Duration>> {
    let mut client = None;
    for ep in endpoints {
        if let Ok(ch) = operator.connect(ep, Duration::from_secs(5)).await {
            client = Some(pb::control_service_client::ControlServiceClient::new(ch));
            break;
        }
    }
    let mut client = client.context("no coordinator reachable for round trips")?;
    let pause = within / (count.max(1) as u32);
    let mut out = Vec::with_capacity(count);
    let mut failures: HashMap<String, usize> = HashMap::new();
    for _ in 0..count {
        let host = format!(
            "load-{:05}",
            rand::random::<u64>() as usize % sessions.max(1)
        );
        let t = Instant::now();
        let req = pb::RunActionRequest {
            selector: Some(pb::Selector {
                hosts: vec![host],
                ..Default::default()
            }),
            action: Some(pb::Action {
                kind: Some(pb::action::Kind::RunChecks(pb::RunChecks::default())),
            }),
            timeout_ms: 10_000,
            wait: true,
            request_id: uuid_like(),
        };
        let mut answer = client.run_action(req.clone()).await;
        // Only the leader streams acks and results: a follower answers `unavailable`
        // naming the leader in `x-dr-leader` (as drctl does, follow it and stay there).
        if let Err(s) = &answer
            && s.code() == tonic::Code::Unavailable
            && let Some(leader) = s
                .metadata()
                .get("x-dr-leader")
                .and_then(|v| v.to_str().ok())
            && let Ok(ch) = operator.connect(leader, Duration::from_secs(5)).await
        {
            client = pb::control_service_client::ControlServiceClient::new(ch);
            answer = client.run_action(req).await;
        }
        match answer {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                let mut done = false;
                while let Ok(Some(ev)) = stream.message().await {
                    if let Some(pb::action_event::Event::Result(r)) = ev.event {
                        done = r.success;
                        break;
                    }
                }
                if done {
                    out.push(t.elapsed());
                } else {
                    *failures.entry("no successful result".into()).or_default() += 1;
                }
            }
            Err(e) => *failures.entry(e.code().to_string()).or_default() += 1,
        }
        tokio::time::sleep(pause.saturating_sub(t.elapsed())).await;
    }
    if !failures.is_empty() {
        eprintln!("    round-trip failures: {failures:?}");
    }
    out.sort();
    Ok(out)
}

fn uuid_like() -> String {
    format!("lg-{}", uuid::Uuid::new_v4())
}

struct ProcSample {
    cpu_cores: f64,
    rss_max_mb: f64,
    rss_avg_mb: f64,
}

/// Average CPU (in cores) and RSS of `pid` over `window`, from /proc.
async fn sample_process(pid: u32, window: Duration) -> Result<ProcSample> {
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = |pid: u32| -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let after = stat.rsplit_once(')').context("bad /proc stat")?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        let utime: f64 = f.get(11).context("no utime")?.parse()?;
        let stime: f64 = f.get(12).context("no stime")?.parse()?;
        Ok((utime + stime) / ticks)
    };
    let rss = |pid: u32| -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS")?;
        let kb: f64 = line
            .split_whitespace()
            .nth(1)
            .context("bad VmRSS")?
            .parse()?;
        Ok(kb / 1024.0)
    };
    let c0 = cpu(pid)?;
    let t0 = Instant::now();
    let mut max: f64 = 0.0;
    let mut sum = 0.0;
    let mut n = 0.0;
    while t0.elapsed() < window {
        let r = rss(pid)?;
        max = max.max(r);
        sum += r;
        n += 1.0;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let c1 = cpu(pid)?;
    Ok(ProcSample {
        cpu_cores: (c1 - c0) / t0.elapsed().as_secs_f64(),
        rss_max_mb: max,
        rss_avg_mb: if n > 0.0 { sum / n } else { 0.0 },
    })
}
