//! Every example config under deploy/examples/ is accepted by the real binary that reads
//! it. The examples are what operators copy; a renamed key that the examples still use
//! would otherwise only show up in production.
//!
//! Preferred check: `BIN --config FILE --check-config` (validate, exit 0). While the
//! binaries have no such flag, the fallback starts them with a copy of the example whose
//! machine-touching values (listen addresses, data dirs, coordinator endpoints) point into
//! the test dir and 127.0.0.1 (keys unchanged, so parsing is fully exercised), and asserts
//! the process got past configuration: it either runs, or fails for another reason than a
//! configuration error (exit code 2 with "file, line and key" is the config-error
//! contract of both daemons).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dr_tests::harness::bins::Bins;
use dr_tests::harness::cluster::{cli, run_drctl};
use dr_tests::harness::ports::closed_addr;
use dr_tests::{ChildGuard, ChildSpec, TestDir, init_tracing, wait_until};
use tracing::{info, warn};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// Replaces the value of top-level or table keys named in `subst` (line-based: the
/// examples keep one key per line).
fn rewrite(text: &str, subst: &[(&str, String)]) -> String {
    text.lines()
        .map(|line| {
            let key = line.split('=').next().unwrap_or("").trim();
            match subst.iter().find(|(k, _)| *k == key && line.contains('=')) {
                Some((k, v)) => format!("{k} = {v}"),
                None => line.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `BIN --config FILE --check-config`; `Ok(None)` if the binary has no such flag.
async fn check_config_flag(
    dir: &TestDir,
    name: &str,
    bin: &Path,
    file: &Path,
) -> Result<Option<String>> {
    let mut g = ChildGuard::spawn(
        ChildSpec::new(
            format!("{name}-check"),
            bin,
            dir.log_path(&format!("{name}-check")),
        )
        .args(cli::check_config_args(file)),
    )?;
    let st = g.wait_exit(Duration::from_secs(60)).await?;
    let log = g.log();
    if log.contains("unexpected argument '--check-config'") {
        return Ok(None);
    }
    if !st.success() {
        bail!(
            "{} --check-config refused {}: {log}",
            bin.display(),
            file.display()
        );
    }
    Ok(Some(log))
}

/// Fallback: start the daemon with a sandboxed copy and see it get past configuration.
async fn start_with_example(dir: &TestDir, name: &str, bin: &Path, copy: &Path) -> Result<()> {
    let mut g = ChildGuard::spawn(
        ChildSpec::new(name, bin, dir.log_path(name))
            .args(cli::daemon_args(copy))
            .cwd(dir.path()),
    )?;
    // Logging starts after the config is loaded: any line past the harness header, or an
    // exit, means configuration is decided.
    wait_until(
        &format!("{name} gets past configuration"),
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let decided = g.log().lines().count() > 1;
            let exited = g.try_exit().is_some();
            async move { Ok((decided || exited).then_some(())) }
        },
    )
    .await?;
    let exit = g.try_exit();
    let log = g.log();
    if exit.and_then(|s| s.code()) == Some(2) || log.contains("invalid configuration") {
        bail!(
            "{name} refused the example config {}: {log}",
            copy.display()
        );
    }
    info!(
        name,
        ?exit,
        "example config accepted (process got past configuration)"
    );
    g.stop().await?;
    Ok(())
}

#[tokio::test]
async fn every_example_config_is_accepted_by_its_binary() -> Result<()> {
    init_tracing();
    let mut dir = TestDir::new()?;
    let bins = Bins::locate()?;
    let mut missing_flag = Vec::new();
    let mut seen = Vec::new();

    for entry in std::fs::read_dir(examples_dir()).context("read deploy/examples")? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        seen.push(file.clone());
        let text = std::fs::read_to_string(&path)?;
        info!("--- {file}");
        match file.as_str() {
            "coordinator.toml" | "agent.toml" => {
                let (name, bin) = if file == "agent.toml" {
                    ("dr-agent", &bins.agent)
                } else {
                    ("dr-coordinator", &bins.coordinator)
                };
                if check_config_flag(&dir, name, bin, &path).await?.is_some() {
                    continue;
                }
                missing_flag.push(name);
                let data = dir.join(format!("{name}-data"));
                let copy = dir.join(&file);
                let closed = closed_addr()?.to_string();
                let sandboxed = rewrite(
                    &text,
                    &[
                        ("listen", format!("\"127.0.0.1:{}\"", closed_addr()?.port())),
                        (
                            "metrics_listen",
                            format!("\"127.0.0.1:{}\"", closed_addr()?.port()),
                        ),
                        ("advertise", format!("\"{closed}\"")),
                        ("data_dir", format!("\"{}\"", data.display())),
                        ("coordinators", format!("[\"{closed}\"]")),
                        ("addr", format!("\"{closed}\"")),
                    ],
                );
                std::fs::write(&copy, sandboxed)?;
                start_with_example(&dir, name, bin, &copy).await?;
            }
            "drctl.toml" => {
                // drctl loads and validates its config before anything else; the example's
                // certificate files do not exist here, which must be the error, not parsing.
                let endpoint = closed_addr()?.to_string();
                let out = run_drctl(
                    &bins.drctl,
                    &path,
                    &["--endpoint".to_owned(), endpoint, "whoami".to_owned()],
                    dir.path(),
                )
                .await?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                if stderr.contains("drctl.toml") && stderr.contains("line") {
                    bail!("drctl refused the example config: {stderr}");
                }
                info!(%stderr, "drctl got past its configuration");
            }
            "repository.toml" => {
                // Read by `dr-agent ... --repo-config FILE`; covered by the backup suite.
                info!("repository.toml is validated by the backup suite");
            }
            "backup-policy.toml" => {
                // Applied with `drctl backup policy apply -f`; parsed and validated (time
                // zone, cron lines) by dr-coordinator's api::backup::tests::t10.
                info!("backup-policy.toml is validated by the coordinator's unit tests");
            }
            other => {
                bail!("no validator for deploy/examples/{other}: add it to t05_example_configs")
            }
        }
    }
    for required in ["coordinator.toml", "agent.toml", "drctl.toml"] {
        assert!(
            seen.iter().any(|s| s == required),
            "deploy/examples/{required} is missing"
        );
    }
    if !missing_flag.is_empty() {
        warn!(
            "{missing_flag:?} have no --check-config flag; the examples were checked by starting \
             the binaries (please add `--check-config`: validate and exit)"
        );
    }
    dir.passed();
    Ok(())
}
