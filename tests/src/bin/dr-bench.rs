//! dr-bench: control-plane benchmarks and soak drivers that talk to running coordinators
//! over the Control API (docs/benchmarks.md says which script calls which mode).
//!
//! Why a binary and not drctl: drctl deliberately asks the leader first, while these
//! modes must aim at one chosen node (a follower, for the soak of issue 2 defect 2) and
//! time individual calls precisely.
//!
//! Modes:
//! - `soak`: one `RunAction(run-checks)` per interval through one endpoint (typically a
//!   follower), following `unavailable` + `x-dr-leader` like drctl, printing per-minute
//!   counts of issued / finished / failed calls.
//! - `first-write`: waits until some coordinator commits a write (a RunAction with
//!   `--no-wait` semantics against an empty selector counts as refused, so it uses
//!   `WhoAmI`-free `CancelAction` of an unknown key, which is a committed write whose
//!   answer is a refusal) and prints the elapsed milliseconds since `--since-unix-ms`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dr_proto::pb;
use dr_proto::tls::{ClientTls, TlsPaths};

#[derive(Parser, Debug)]
#[command(about = "Control-plane benchmarks and soak drivers")]
struct Args {
    /// CA bundle.
    #[arg(long)]
    ca: PathBuf,
    /// Operator certificate (role operator or admin).
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// One RunAction per interval through `--endpoint`.
    Soak {
        #[arg(long)]
        endpoint: String,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Follow each action until its results arrive.
        #[arg(long)]
        wait: bool,
    },
    /// Polls every endpoint with a committed write until one succeeds; prints the
    /// milliseconds from `--since-unix-ms` to the first success.
    FirstWrite {
        #[arg(long, value_delimiter = ',', required = true)]
        endpoints: Vec<String>,
        #[arg(long)]
        since_unix_ms: i64,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        deadline: Duration,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    let tls = ClientTls::load(&TlsPaths {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
        reload_interval: None,
    })
    .context("load operator certificate")?;
    rt.block_on(async move {
        match args.mode {
            Mode::Soak {
                endpoint,
                interval,
                duration,
                wait,
            } => soak(&tls, &endpoint, interval, duration, wait).await,
            Mode::FirstWrite {
                endpoints,
                since_unix_ms,
                deadline,
            } => first_write(&tls, &endpoints, since_unix_ms, deadline).await,
        }
    })
}

type Client = pb::control_service_client::ControlServiceClient<tonic::transport::Channel>;

fn client(tls: &ClientTls, endpoint: &str) -> Result<Client> {
    Ok(pb::control_service_client::ControlServiceClient::new(
        tls.channel(endpoint)?,
    ))
}

fn leader_hint(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get("x-dr-leader")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn soak(
    tls: &ClientTls,
    endpoint: &str,
    interval: Duration,
    duration: Duration,
    wait: bool,
) -> Result<()> {
    let start = Instant::now();
    let mut tick = tokio::time::interval(interval);
    let (mut ok, mut failed, mut redirected) = (0u64, 0u64, 0u64);
    let mut last_report = Instant::now();
    let mut slowest = Duration::ZERO;
    while start.elapsed() < duration {
        tick.tick().await;
        let t = Instant::now();
        let mut target = endpoint.to_owned();
        let mut outcome = Err("not run".to_owned());
        for _ in 0..2 {
            let req = pb::RunActionRequest {
                selector: Some(pb::Selector::default()),
                action: Some(pb::Action {
                    kind: Some(pb::action::Kind::RunChecks(pb::RunChecks::default())),
                }),
                timeout_ms: 10_000,
                wait,
                request_id: format!("soak-{}", uuid::Uuid::new_v4()),
            };
            let mut c = client(tls, &target)?;
            let mut r = tonic::Request::new(req);
            r.set_timeout(Duration::from_secs(15));
            match c.run_action(r).await {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    let mut results = 0;
                    let mut events = 0;
                    let res = loop {
                        match tokio::time::timeout(Duration::from_secs(15), stream.message()).await
                        {
                            Ok(Ok(Some(ev))) => {
                                events += 1;
                                if matches!(ev.event, Some(pb::action_event::Event::Result(_))) {
                                    results += 1;
                                }
                            }
                            Ok(Ok(None)) => break Ok(()),
                            Ok(Err(s)) => break Err(format!("stream: {s}")),
                            Err(_) => break Err("stream silent for 15s".to_owned()),
                        }
                    };
                    outcome = match res {
                        Ok(()) if events == 0 => Err("stream ended without events".to_owned()),
                        Ok(()) if wait && results == 0 => Err("no results".to_owned()),
                        other => other,
                    };
                    break;
                }
                Err(s) => match leader_hint(&s) {
                    Some(l) if s.code() == tonic::Code::Unavailable => {
                        redirected += 1;
                        target = l;
                    }
                    _ => {
                        outcome = Err(format!("{}: {}", s.code(), s.message()));
                        break;
                    }
                },
            }
        }
        slowest = slowest.max(t.elapsed());
        match outcome {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                eprintln!("{:>6.0}s call failed: {e}", start.elapsed().as_secs_f64());
            }
        }
        if last_report.elapsed() >= Duration::from_secs(60) {
            println!(
                "{:>6.0}s ok {ok} failed {failed} redirected {redirected} slowest {} ms",
                start.elapsed().as_secs_f64(),
                slowest.as_millis()
            );
            slowest = Duration::ZERO;
            last_report = Instant::now();
        }
    }
    println!("done: ok {ok} failed {failed} redirected {redirected}");
    if failed > 0 {
        anyhow::bail!("{failed} calls failed");
    }
    Ok(())
}

async fn first_write(
    tls: &ClientTls,
    endpoints: &[String],
    since_unix_ms: i64,
    deadline: Duration,
) -> Result<()> {
    let start = Instant::now();
    loop {
        for ep in endpoints {
            let Ok(mut c) = client(tls, ep) else { continue };
            let mut r = tonic::Request::new(pb::CancelActionRequest {
                key: format!("bench-probe-{}", uuid::Uuid::new_v4()),
                reason: "election benchmark probe".into(),
            });
            r.set_timeout(Duration::from_millis(300));
            // A refusal (not_found / failed_precondition) is an answer that went through
            // the log: the leader committed the request and applied it.
            match c.cancel_action(r).await {
                Ok(_) => {}
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::NotFound | tonic::Code::FailedPrecondition
                    ) => {}
                Err(_) => continue,
            }
            let now = chrono::Utc::now().timestamp_millis();
            println!("{}", now - since_unix_ms);
            return Ok(());
        }
        if start.elapsed() > deadline {
            anyhow::bail!("no write committed within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
