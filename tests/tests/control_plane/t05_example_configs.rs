//! Every example config under deploy/examples/ is accepted by the real binary that reads
//! it. The examples are what operators copy; a renamed key that the examples still use
//! would otherwise only show up in production.
//!
//! The check is `BIN --config FILE --check-config` (validate the file and its TLS files,
//! exit 0; or exit 2 naming file, line and key). The example's `[tls]` paths point at
//! /etc/dr/tls, so the test checks a copy whose `ca`/`cert`/`key` name certificates
//! issued here for the example's own identity; every other key is unchanged. A copy with
//! an unknown key and one with a missing certificate must be refused with exit code 2.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dr_tests::harness::bins::Bins;
use dr_tests::harness::certs::Pki;
use dr_tests::harness::cluster::{cli, run_drctl};
use dr_tests::harness::ports::closed_addr;
use dr_tests::{ChildGuard, ChildSpec, TestDir, init_tracing};
use tracing::info;

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

/// Runs `BIN --config FILE --check-config` and returns its exit code and output.
async fn check_config(dir: &TestDir, name: &str, bin: &Path, file: &Path) -> Result<(i32, String)> {
    let mut g = ChildGuard::spawn(
        ChildSpec::new(
            format!("{name}-check"),
            bin,
            dir.log_path(&format!("{name}-check")),
        )
        .args(cli::check_config_args(file)),
    )?;
    let st = g.wait_exit(Duration::from_secs(60)).await?;
    Ok((st.code().unwrap_or(-1), g.log()))
}

#[tokio::test]
async fn every_example_config_is_accepted_by_its_binary() -> Result<()> {
    init_tracing();
    let mut dir = TestDir::new()?;
    let bins = Bins::locate()?;
    let mut seen = Vec::new();
    let pki = Pki::init(&bins.drctl, &dir.join("pki"), "examples.test").await?;

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
                let (name, bin, certs) = if file == "agent.toml" {
                    ("dr-agent", &bins.agent, pki.agent("bj-db-1").await?)
                } else {
                    (
                        "dr-coordinator",
                        &bins.coordinator,
                        pki.coordinator(1).await?,
                    )
                };
                let tls = [
                    ("ca", format!("\"{}\"", pki.ca().display())),
                    ("cert", format!("\"{}\"", certs.cert.display())),
                    ("key", format!("\"{}\"", certs.key.display())),
                ];
                let copy = dir.join(&file);
                std::fs::write(&copy, rewrite(&text, &tls))?;
                let (code, log) = check_config(&dir, name, bin, &copy).await?;
                if code != 0 {
                    bail!("{name} --check-config refused the example {file} (exit {code}): {log}");
                }
                info!(name, "example config accepted by --check-config");

                info!("--- {file} with an unknown key is refused with file, line and key");
                let bad = dir.join(format!("bad-key-{file}"));
                let mut lines: Vec<String> =
                    rewrite(&text, &tls).lines().map(str::to_owned).collect();
                lines.insert(2, "colour = \"blue\"".to_owned());
                std::fs::write(&bad, lines.join("\n"))?;
                let (code, log) = check_config(&dir, name, bin, &bad).await?;
                assert_eq!(code, 2, "{log}");
                let shown = bad.display().to_string();
                assert!(
                    log.contains(&format!("{shown}:3")) && log.contains("colour"),
                    "expected {shown}:3 and the key in: {log}"
                );

                info!("--- {file} naming a missing certificate is refused");
                let missing = dir.join(format!("missing-cert-{file}"));
                let mut tls2 = tls.clone();
                tls2[1].1 = format!("\"{}\"", dir.join("nope.pem").display());
                std::fs::write(&missing, rewrite(&text, &tls2))?;
                let (code, log) = check_config(&dir, name, bin, &missing).await?;
                assert_eq!(code, 2, "{log}");
                assert!(log.contains("nope.pem"), "{log}");
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
    dir.passed();
    Ok(())
}
