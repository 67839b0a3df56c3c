//! What must be refused, each with a clear message and in its own test: missing, foreign,
//! expired and wrong-kind certificates, an agent speaking for another host, a viewer
//! acting, malformed configs, and unreachable coordinators.
//!
//! Messages are matched on their essential words (case-insensitive), not whole sentences,
//! so rewording stays possible while a vague "error" would fail.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result};
use dr_tests::harness::cluster::{AgentSpec, cli, get_str, is_connected};
use dr_tests::harness::ports::closed_addr;
use dr_tests::{ChildGuard, ChildSpec, Pki, TestCluster, wait_until};
use tracing::info;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts drctl failed and its stderr names at least one of `words`.
fn assert_refused(out: &Output, what: &str, words: &[&str]) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "{what}: drctl succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lower = err.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(w)),
        "{what}: message names none of {words:?}: {err}"
    );
    info!(what, message = %err.trim(), "refused as expected");
}

async fn one_coordinator() -> Result<TestCluster> {
    TestCluster::builder().coordinators(1).start().await
}

#[tokio::test]
async fn connection_without_client_certificate_is_refused() -> Result<()> {
    let cluster = one_coordinator().await?;
    let addr = cluster.coord_listen(1)?;
    info!("--- raw TLS + HTTP/2 request without a client certificate (curl)");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "20", "--cacert"])
        .arg(cluster.pki.ca())
        .args([
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "",
        ])
        .arg(format!("https://{addr}/dr.v1.ControlService/WhoAmI"))
        .output()
        .await
        .context("run curl (scripts/test.sh installs it)")?;
    assert!(
        !out.status.success(),
        "the coordinator answered a client without a certificate"
    );
    // The server drops the connection at the TLS layer; depending on timing curl reports the
    // alert ("certificate required"), a handshake failure, or a connection the server already
    // closed ("recv failure", "getpeername ... not connected"). What must NOT happen is an
    // answer, or a failure before TLS (nothing listening, timeout).
    let err = stderr(&out).to_lowercase();
    for before_tls in [
        "couldn't connect",
        "connection refused",
        "timed out",
        "resolve host",
    ] {
        assert!(
            !err.contains(before_tls),
            "curl failed before TLS ({before_tls}), so the test proves nothing: {err}"
        );
    }
    assert!(
        [
            "certificate required",
            "alert",
            "handshake",
            "ssl",
            "tls",
            "recv failure",
            "not connected",
            "reset",
            "empty reply"
        ]
        .iter()
        .any(|k| err.contains(k)),
        "no TLS-level refusal in curl's message: {err}"
    );
    info!(message = %err.trim(), "refused");
    cluster.shutdown().await
}

#[tokio::test]
async fn certificate_of_another_ca_is_refused() -> Result<()> {
    let cluster = one_coordinator().await?;
    let other = Pki::init(
        &cluster.bins.drctl,
        &cluster.dir().join("pki-other"),
        "yeslocker.test",
    )
    .await?;
    let cert = other.operator("mallory", "admin").await?;
    let cfg =
        cluster.write_drctl_config("other-ca", &[cluster.coord_listen(1)?.to_string()], &cert)?;
    let out = cluster.drctl_with(&cfg, ["whoami"]).await?;
    assert_refused(
        &out,
        "operator certificate from another CA",
        &["certificate", "unknown ca", "tls"],
    );
    cluster.shutdown().await
}

#[tokio::test]
async fn expired_certificate_is_refused() -> Result<()> {
    let cluster = one_coordinator().await?;
    let cert = cluster
        .pki
        .issue(
            "operator",
            "expired",
            &[
                "--role",
                "admin",
                "--not-before",
                "2020-01-01T00:00:00Z",
                "--not-after",
                "2020-01-02T00:00:00Z",
            ],
        )
        .await?;
    let cfg =
        cluster.write_drctl_config("expired", &[cluster.coord_listen(1)?.to_string()], &cert)?;
    let out = cluster.drctl_with(&cfg, ["whoami"]).await?;
    assert_refused(&out, "expired operator certificate", &["expired"]);
    cluster.shutdown().await
}

#[tokio::test]
async fn agent_certificate_used_by_drctl_is_refused() -> Result<()> {
    let cluster = one_coordinator().await?;
    let cert = cluster.pki.agent("h1").await?;
    let cfg =
        cluster.write_drctl_config("agent-cert", &[cluster.coord_listen(1)?.to_string()], &cert)?;
    let out = cluster.drctl_with(&cfg, ["agents", "list"]).await?;
    assert_refused(
        &out,
        "agent certificate on the Control API",
        &["permission", "denied", "not an operator", "operator"],
    );
    cluster.shutdown().await
}

#[tokio::test]
async fn agent_cannot_speak_for_another_host() -> Result<()> {
    let mut cluster = TestCluster::builder()
        .coordinators(1)
        .agent(AgentSpec::new("host-b").cert_of("host-a"))
        .dont_wait_for_agents()
        .start()
        .await?;
    info!("--- dr-agent with host_id host-b and the certificate of host-a is refused");
    let log = {
        let agent = cluster.agent_guard("host-b").context("agent started")?;
        let log_path = agent.log_path().to_path_buf();
        wait_until(
            "the agent logs its refusal",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                async move {
                    let l = log.to_lowercase();
                    Ok((l.contains("permission")
                        || l.contains("denied")
                        || l.contains("does not match")
                        || l.contains("refused"))
                    .then_some(log))
                }
            },
        )
        .await?
    };
    assert!(
        log.contains("host-a") || log.contains("host-b"),
        "the refusal does not name the host: {log}"
    );
    let agents = cluster.agents_at_leader().await?;
    assert!(
        !agents
            .iter()
            .any(|a| get_str(a, "host_id") == Some("host-b") && is_connected(a)),
        "host-b is connected with host-a's certificate: {agents:?}"
    );
    cluster.shutdown().await
}

#[tokio::test]
async fn viewer_cannot_run_mutating_commands() -> Result<()> {
    let cluster = one_coordinator().await?;
    let cert = cluster.pki.operator("vera", "viewer").await?;
    let cfg =
        cluster.write_drctl_config("viewer", &[cluster.coord_listen(1)?.to_string()], &cert)?;
    info!("--- a viewer reads");
    let out = cluster.drctl_with(&cfg, ["agents", "list"]).await?;
    assert!(
        out.status.success(),
        "a viewer cannot read: {}",
        stderr(&out)
    );
    info!("--- a viewer cannot act");
    let out = cluster.drctl_with(&cfg, cli::run_checks("h1")).await?;
    assert_refused(
        &out,
        "viewer running an action",
        &["viewer", "role", "permission"],
    );
    let out = cluster
        .drctl_with(&cfg, ["cluster", "remove-node", "--node-id", "1"])
        .await?;
    assert_refused(
        &out,
        "viewer changing membership",
        &["viewer", "role", "permission", "admin"],
    );
    cluster.shutdown().await
}

/// Starts `bin --config file`, expects exit code 2 with a message naming file, line and key.
async fn assert_config_refused(
    cluster: &TestCluster,
    bin: &Path,
    file: &Path,
    line: usize,
    key: &str,
) -> Result<()> {
    let name = format!(
        "bad-{}",
        file.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let mut g = ChildGuard::spawn(
        ChildSpec::new(&name, bin, cluster.dir().log_path(&name)).args(cli::daemon_args(file)),
    )?;
    let st = g.wait_exit(Duration::from_secs(60)).await?;
    let log = g.log();
    assert!(
        !st.success(),
        "{} accepted {}",
        bin.display(),
        file.display()
    );
    let fname = file
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        log.contains(&fname),
        "message does not name the file {fname}: {log}"
    );
    assert!(
        log.contains(key),
        "message does not name the key {key}: {log}"
    );
    assert!(
        log.contains(&format!("line {line}")) || log.contains(&format!(":{line}")),
        "message does not name line {line}: {log}"
    );
    info!(file = %fname, "refused: {}", log.lines().last().unwrap_or(""));
    Ok(())
}

/// Rewrites the line `key = ...` (first occurrence) to `key = value`; returns its 1-based line.
fn set_value(text: &str, key: &str, value: &str) -> Result<(String, usize)> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let idx = lines
        .iter()
        .position(|l| l.split('=').next().is_some_and(|k| k.trim() == key))
        .with_context(|| format!("no {key} in the generated config"))?;
    lines[idx] = format!("{key} = {value}");
    Ok((lines.join("\n") + "\n", idx + 1))
}

#[tokio::test]
async fn config_with_unknown_key_or_malformed_value_is_refused_naming_file_line_key() -> Result<()>
{
    let cluster = TestCluster::builder()
        .coordinators(1)
        .agents(["h1"])
        .no_init()
        .start()
        .await?;
    let coord = std::fs::read_to_string(cluster.coord_config_path(1)?)?;
    let agent = std::fs::read_to_string(cluster.agent_config_path("h1")?)?;

    info!("--- coordinator: unknown key");
    {
        let text = format!(
            "version = 1\nbogus_knob = 3\n{}",
            coord.replacen("version = 1\n", "", 1)
        );
        let f = cluster.dir().join("coordinator-unknown.toml");
        std::fs::write(&f, text)?;
        assert_config_refused(&cluster, &cluster.bins.coordinator, &f, 2, "bogus_knob").await?;
    }
    info!("--- coordinator: malformed duration");
    {
        let (text, line) = set_value(&coord, "election_timeout_min", "\"soon\"")?;
        let f = cluster.dir().join("coordinator-malformed.toml");
        std::fs::write(&f, text)?;
        assert_config_refused(
            &cluster,
            &cluster.bins.coordinator,
            &f,
            line,
            "election_timeout_min",
        )
        .await?;
    }
    info!("--- agent: unknown key");
    {
        let text = format!(
            "version = 1\nhots_id = \"typo\"\n{}",
            agent.replacen("version = 1\n", "", 1)
        );
        let f = cluster.dir().join("agent-unknown.toml");
        std::fs::write(&f, text)?;
        assert_config_refused(&cluster, &cluster.bins.agent, &f, 2, "hots_id").await?;
    }
    info!("--- agent: malformed value");
    {
        let (text, line) = set_value(&agent, "reconnect_max", "\"forever\"")?;
        let f = cluster.dir().join("agent-malformed.toml");
        std::fs::write(&f, text)?;
        assert_config_refused(&cluster, &cluster.bins.agent, &f, line, "reconnect_max").await?;
    }
    info!("--- drctl: unknown key");
    {
        let admin = std::fs::read_to_string(cluster.admin_drctl_config())?;
        let f = cluster.dir().join("drctl-unknown.toml");
        std::fs::write(&f, format!("endpoint = \"127.0.0.1:1\"\n{admin}"))?;
        let out = cluster.drctl_with(&f, ["whoami"]).await?;
        let err = stderr(&out);
        assert!(!out.status.success());
        assert!(
            err.contains("drctl-unknown.toml") && err.contains("endpoint") && err.contains('1'),
            "{err}"
        );
    }
    cluster.shutdown().await
}

#[tokio::test]
async fn unreachable_coordinators_are_named() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(1)
        .no_init()
        .start()
        .await?;
    let a = closed_addr()?.to_string();
    let b = closed_addr()?.to_string();
    let cfg =
        cluster.write_drctl_config("unreachable", &[a.clone(), b.clone()], cluster.admin_cert())?;
    let out = cluster.drctl_with(&cfg, ["cluster", "status"]).await?;
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "drctl succeeded against closed ports"
    );
    assert!(
        err.contains(&a) && err.contains(&b),
        "drctl does not say which endpoints it tried: {err}"
    );
    cluster.shutdown().await
}
