//! An nginx upstream file, rewritten and reloaded: the `update-load-balancer` and
//! `enable-traffic --percentage N` steps of the DRP where the balancer is nginx.
//!
//! The agent owns one file that the operator `include`s from `http { }`:
//!
//! ```text
//! upstream yeslocker {
//!     server 10.1.0.5:8080 down;       # beijing
//!     server 10.2.0.5:8080 weight=1;   # shanghai
//! }
//! ```
//!
//! Percentages become weights, scaled so that a region's share survives uneven endpoint counts
//! (each endpoint of a region gets `pct * L / n`, `L` the lcm of the counts, reduced by the gcd);
//! 0 becomes `down`, which keeps the server in the file so the change is visible and reversible.
//!
//! Sequence, under a per-provider lock:
//! 1. render; identical to the file on disk → no-op (idempotent re-apply),
//! 2. write atomically (temp file in the same directory, fsync, rename, fsync the directory),
//! 3. `nginx -t -c <main conf>`; on failure restore the previous file and report nginx's words,
//! 4. reload (SIGHUP to the master from `pid_file`, or `nginx -s reload`); on failure restore.
//!
//! Invariant: after `apply` returns, the file on disk is what the running nginx was last told
//! to load. That is what makes "identical file → no-op" safe.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio::sync::Mutex;
use tracing::{debug, info, instrument, warn};

use super::error::{TrafficError, TrafficResult, tail};
use super::outcome::{Applied, EndpointState, TrafficState, diff};
use super::plan::{Endpoint, TrafficPlan};

const KIND: &str = "nginx";

/// `[[traffic]] kind = "nginx"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NginxConfig {
    pub name: String,
    /// The file this provider owns, included from the main config.
    pub upstream_file: PathBuf,
    /// The `upstream` block's name.
    #[serde(default = "defaults::upstream")]
    pub upstream: String,
    /// The main config passed to `nginx -t -c` and `nginx -s reload -c`.
    pub main_config: PathBuf,
    #[serde(default = "defaults::nginx_bin")]
    pub nginx_bin: PathBuf,
    /// If set, reload by SIGHUP to the pid in this file instead of running `nginx -s reload`.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// Extra parameters for every `server` line, e.g. `max_fails=3 fail_timeout=10s`.
    #[serde(default)]
    pub server_params: String,
    /// Bound on each `nginx` command.
    #[serde(default = "defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

mod defaults {
    use std::path::PathBuf;
    use std::time::Duration;
    pub(super) fn upstream() -> String {
        "yeslocker".into()
    }
    pub(super) fn nginx_bin() -> PathBuf {
        "nginx".into()
    }
    pub(super) fn timeout() -> Duration {
        Duration::from_secs(30)
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct NginxProvider {
    cfg: NginxConfig,
    last_applied: Mutex<Option<String>>,
}

impl NginxProvider {
    pub fn from_config(cfg: NginxConfig) -> TrafficResult<Self> {
        let NginxConfig {
            name,
            upstream_file,
            upstream,
            main_config,
            nginx_bin,
            pid_file,
            server_params,
            timeout,
        } = cfg;
        let bad = |reason: String| TrafficError::Config {
            provider: name.clone(),
            reason,
        };
        if upstream.is_empty()
            || !upstream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(bad(format!(
                "upstream name {upstream:?} is not a plain word"
            )));
        }
        if server_params
            .chars()
            .any(|c| matches!(c, ';' | '{' | '}' | '#' | '\n' | '\r'))
        {
            return Err(bad(
                "server_params must not contain ; { } # or newlines".into()
            ));
        }
        if upstream_file.file_name().is_none() {
            return Err(bad(format!(
                "upstream_file {} has no file name",
                upstream_file.display()
            )));
        }
        Ok(Self {
            cfg: NginxConfig {
                name,
                upstream_file,
                upstream,
                main_config,
                nginx_bin,
                pid_file,
                server_params,
                timeout,
            },
            last_applied: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Per endpoint, its nginx weight (0 = down), in plan order.
    fn weights(plan: &TrafficPlan) -> Vec<(String, EndpointState)> {
        let counts: Vec<u64> = plan
            .regions()
            .values()
            .filter(|rt| rt.weight.get() > 0)
            .map(|rt| rt.endpoints.len() as u64)
            .collect();
        let l = counts.iter().fold(1u64, |acc, n| lcm(acc, *n));
        let mut out = Vec::new();
        for (region, rt) in plan.regions() {
            for ep in &rt.endpoints {
                let w = u64::from(rt.weight.get()) * l / rt.endpoints.len() as u64;
                out.push((
                    region.to_string(),
                    EndpointState {
                        endpoint: ep.clone(),
                        weight: u32::try_from(w).unwrap_or(u32::MAX),
                    },
                ));
            }
        }
        let g = out
            .iter()
            .map(|(_, s)| u64::from(s.weight))
            .filter(|w| *w > 0)
            .fold(0u64, gcd);
        if g > 1 {
            for (_, s) in &mut out {
                s.weight = u32::try_from(u64::from(s.weight) / g).unwrap_or(u32::MAX);
            }
        }
        out
    }

    /// The upstream file `apply` would write for `plan` (also a dry run for operators).
    pub fn render(&self, plan: &TrafficPlan) -> String {
        let mut s = format!(
            "# managed by dr-agent (traffic provider {:?}); rewritten on every traffic switch\n\
             upstream {} {{\n",
            self.cfg.name, self.cfg.upstream
        );
        let params = self.cfg.server_params.trim();
        for (region, st) in Self::weights(plan) {
            let w = if st.weight == 0 {
                "down".to_owned()
            } else {
                format!("weight={}", st.weight)
            };
            let extra = if params.is_empty() {
                String::new()
            } else {
                format!(" {params}")
            };
            s.push_str(&format!(
                "    server {} {w}{extra};  # {region}\n",
                st.endpoint
            ));
        }
        s.push_str("}\n");
        s
    }

    async fn read_file(&self) -> TrafficResult<Option<Vec<u8>>> {
        match tokio::fs::read(&self.cfg.upstream_file).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TrafficError::Io {
                op: "read",
                path: self.cfg.upstream_file.clone(),
                source,
            }),
        }
    }

    /// Puts back what was there before (or removes our file if there was nothing).
    async fn restore(&self, previous: &Option<Vec<u8>>) {
        let res = match previous {
            Some(old) => atomic_write(&self.cfg.upstream_file, old).await,
            None => tokio::fs::remove_file(&self.cfg.upstream_file)
                .await
                .map_err(|source| TrafficError::Io {
                    op: "remove",
                    path: self.cfg.upstream_file.clone(),
                    source,
                }),
        };
        if let Err(e) = res {
            // Logged here because the caller returns the original error, which matters more.
            warn!(error = %e, "could not restore the previous upstream file");
        }
    }

    async fn run_nginx(&self, args: &[&std::ffi::OsStr]) -> Result<(), String> {
        let mut cmd = Command::new(&self.cfg.nginx_bin);
        cmd.args(args).kill_on_drop(true);
        let out = tokio::time::timeout(self.cfg.timeout, cmd.output())
            .await
            .map_err(|_| format!("`nginx` did not finish within {:?}", self.cfg.timeout))?
            .map_err(|e| format!("cannot run {}: {e}", self.cfg.nginx_bin.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if msg.is_empty() {
                msg = format!("nginx exited with {}", out.status);
            }
            Err(tail(&msg, 2000))
        }
    }

    async fn reload(&self) -> Result<(), String> {
        match &self.cfg.pid_file {
            Some(pid_file) => {
                let text = tokio::fs::read_to_string(pid_file)
                    .await
                    .map_err(|e| format!("read pid file {}: {e}", pid_file.display()))?;
                let pid: i32 = text
                    .trim()
                    .parse()
                    .map_err(|_| format!("pid file {} holds no pid", pid_file.display()))?;
                if pid <= 1 {
                    return Err(format!("pid file {} holds pid {pid}", pid_file.display()));
                }
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGHUP,
                )
                .map_err(|e| format!("SIGHUP to nginx master {pid}: {e}"))
            }
            None => {
                self.run_nginx(&[
                    "-s".as_ref(),
                    "reload".as_ref(),
                    "-c".as_ref(),
                    self.cfg.main_config.as_os_str(),
                ])
                .await
            }
        }
    }

    #[instrument(name = "traffic_apply", skip_all, fields(provider = %self.cfg.name, kind = KIND, file = %self.cfg.upstream_file.display(), digest = %plan.digest()))]
    pub(super) async fn apply_plan(&self, plan: &TrafficPlan) -> TrafficResult<Applied> {
        let mut last = self.last_applied.lock().await;
        let rendered = self.render(plan);
        let previous = self.read_file().await?;
        let current = previous
            .as_deref()
            .map(|b| parse_upstream(&String::from_utf8_lossy(b)))
            .unwrap_or_default();
        let desired: Vec<EndpointState> = Self::weights(plan).into_iter().map(|(_, s)| s).collect();
        let applied = |changed, changes| Applied {
            provider: self.cfg.name.clone(),
            kind: KIND.to_owned(),
            plan_digest: plan.digest(),
            changed,
            changes,
            notes: Vec::new(),
        };
        if previous.as_deref() == Some(rendered.as_bytes()) {
            debug!("upstream file already matches the plan");
            *last = Some(plan.digest());
            return Ok(applied(false, Vec::new()));
        }
        let changes = diff(plan, &current, &desired);

        atomic_write(&self.cfg.upstream_file, rendered.as_bytes()).await?;
        if let Err(message) = self
            .run_nginx(&[
                "-t".as_ref(),
                "-c".as_ref(),
                self.cfg.main_config.as_os_str(),
            ])
            .await
        {
            self.restore(&previous).await;
            return Err(TrafficError::NginxInvalid {
                path: self.cfg.upstream_file.clone(),
                message,
            });
        }
        if let Err(message) = self.reload().await {
            self.restore(&previous).await;
            return Err(TrafficError::NginxReload { message });
        }
        info!(
            changes = changes.len(),
            "upstream file written, nginx reloaded"
        );
        *last = Some(plan.digest());
        Ok(applied(true, changes))
    }

    #[instrument(name = "traffic_status", skip_all, fields(provider = %self.cfg.name, kind = KIND))]
    pub(super) async fn read_state(&self) -> TrafficResult<TrafficState> {
        let endpoints = self
            .read_file()
            .await?
            .map(|b| parse_upstream(&String::from_utf8_lossy(&b)))
            .unwrap_or_default();
        Ok(TrafficState {
            provider: self.cfg.name.clone(),
            kind: KIND.to_owned(),
            endpoints,
            last_applied: self.last_applied.lock().await.clone(),
        })
    }
}

/// Reads back the `server` lines of a file we rendered. Lines we do not understand are skipped:
/// the file is ours, so that only happens after someone edited it by hand.
fn parse_upstream(text: &str) -> Vec<EndpointState> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("server ") else {
            continue;
        };
        let rest = rest.trim_end_matches(';');
        let mut words = rest.split_whitespace();
        let Some(Ok(endpoint)) = words.next().map(Endpoint::new) else {
            continue;
        };
        let mut weight = 1;
        for w in words {
            if w == "down" {
                weight = 0;
            } else if let Some(n) = w.strip_prefix("weight=") {
                weight = n.parse().unwrap_or(1);
            }
        }
        out.push(EndpointState { endpoint, weight });
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u64, b: u64) -> u64 {
    if a == 0 || b == 0 {
        a.max(b)
    } else {
        a / gcd(a, b) * b
    }
}

/// Temp file in the same directory, fsync, rename over `path`, fsync the directory: a reader
/// (nginx) sees the old or the new file, never a torn one, also across a crash.
pub(crate) async fn atomic_write(path: &Path, bytes: &[u8]) -> TrafficResult<()> {
    let path = path.to_owned();
    let bytes = bytes.to_vec();
    tokio::task::spawn_blocking(move || {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{file_name}.dr-tmp.{}", std::process::id()));
        let io = |op: &'static str, p: &Path| {
            let p = p.to_owned();
            move |source| TrafficError::Io {
                op,
                path: p,
                source,
            }
        };
        let result = (|| {
            let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
            f.write_all(&bytes).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("fsync", &tmp))?;
            drop(f);
            std::fs::rename(&tmp, &path).map_err(io("rename onto", &path))?;
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io("fsync directory", &dir))
        })();
        if result.is_err() {
            // Best effort: the temp file may not exist if `create` failed.
            let _ignored = std::fs::remove_file(&tmp);
        }
        result
    })
    .await
    .map_err(|e| TrafficError::Io {
        op: "join writer task for",
        path: PathBuf::new(),
        source: std::io::Error::other(e),
    })?
}

/// For tests and docs: the weights a plan maps to, by endpoint.
pub fn plan_weights(plan: &TrafficPlan) -> BTreeMap<Endpoint, u32> {
    NginxProvider::weights(plan)
        .into_iter()
        .map(|(_, s)| (s.endpoint, s.weight))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::plan::{Percent, Region, RegionTraffic};
    use super::*;

    fn plan(bj: (u8, &[&str]), sh: (u8, &[&str])) -> TrafficPlan {
        let rt = |(w, eps): (u8, &[&str])| RegionTraffic {
            endpoints: eps.iter().map(|e| Endpoint::new(*e).unwrap()).collect(),
            weight: Percent::new(w).unwrap(),
        };
        TrafficPlan::new(BTreeMap::from([
            (Region::new("beijing").unwrap(), rt(bj)),
            (Region::new("shanghai").unwrap(), rt(sh)),
        ]))
        .unwrap()
    }

    #[test]
    fn percentages_become_weights_and_zero_is_down() {
        let p = plan((0, &["b:1"]), (100, &["s:1"]));
        assert_eq!(
            plan_weights(&p).into_values().collect::<Vec<_>>(),
            vec![0, 1]
        );
        // 25% over one endpoint vs 75% over three: each endpoint gets the same share.
        let p = plan((25, &["b:1"]), (75, &["s:1", "s:2", "s:3"]));
        assert_eq!(
            plan_weights(&p).into_values().collect::<Vec<_>>(),
            vec![1, 1, 1, 1]
        );
        let p = plan((10, &["b:1", "b:2"]), (90, &["s:1"]));
        assert_eq!(
            plan_weights(&p).into_values().collect::<Vec<_>>(),
            vec![1, 1, 18]
        );
    }

    #[test]
    fn rendered_file_parses_back() {
        let cfg = NginxConfig {
            name: "lb".into(),
            upstream_file: "/x/up.conf".into(),
            upstream: "yeslocker".into(),
            main_config: "/x/nginx.conf".into(),
            nginx_bin: "nginx".into(),
            pid_file: None,
            server_params: "max_fails=3".into(),
            timeout: Duration::from_secs(1),
        };
        let prov = NginxProvider::from_config(cfg).unwrap();
        let p = plan((0, &["127.0.0.1:8001"]), (100, &["127.0.0.1:8002"]));
        let text = prov.render(&p);
        assert_eq!(
            text,
            "# managed by dr-agent (traffic provider \"lb\"); rewritten on every traffic switch\n\
             upstream yeslocker {\n    server 127.0.0.1:8001 down max_fails=3;  # beijing\n    \
             server 127.0.0.1:8002 weight=1 max_fails=3;  # shanghai\n}\n"
        );
        let parsed = parse_upstream(&text);
        assert_eq!(parsed.len(), 2);
        assert_eq!((parsed[0].weight, parsed[1].weight), (0, 1));
    }
}
