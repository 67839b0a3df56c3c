//! Host isolation (DRP scenario 3, "Immediate Containment": `isolate-systems`): verbs
//! `isolate` and `unisolate`.
//!
//! Why nftables and one table of our own: a breached host must stop talking to everything
//! except its coordinator session (so it can still be commanded, and later unisolated,
//! from `drctl`), loopback, and the management sources named in `[isolation] allow`. The
//! operator's ruleset is saved first and left loaded; our table `inet dr_isolation` drops
//! everything else ahead of it (see [`rules`]). `unisolate` does not trust that deleting our
//! table gives the old state back (someone may have changed rules meanwhile): it flushes the
//! ruleset, loads the saved copy in the same transaction and then proves, byte for byte,
//! that `nft list ruleset` equals what was saved.
//!
//! ```text
//!  isolate:   list ruleset ─(no saved copy yet)─> write <data_dir>/isolation/saved-ruleset.nft
//!             ─> nft -f isolation.nft  (add/delete/define table: atomic, idempotent)
//!  unisolate: nft -f restore.nft  ("flush ruleset" + saved copy, one transaction)
//!             ─> list ruleset == saved copy ? ─> saved copy renamed to last-restored-ruleset.nft
//! ```
//! Isolating twice keeps the FIRST saved ruleset (the second listing would contain our own
//! table). Coordinator names are resolved when isolating: DNS is cut afterwards, so a
//! coordinator that changes address while the host is isolated is not reachable.
//!
//! Every `nft` invocation goes through [`Nft`], whose argv can be prefixed (`ip netns exec
//! NS nft`), which is how the tests isolate a network namespace instead of the test machine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tracing::{Instrument, info, info_span, warn};

use crate::actions::{ActionCtx, ActionOutput, Registry};
use crate::config::Config;
use crate::rotate::atomic_file::{AtomicWriteError, write_atomic};

pub mod rules;

pub use rules::{AllowRule, Endpoint};

/// Directory under `data_dir` holding the saved ruleset and the scripts we load.
pub const STATE_DIR: &str = "isolation";
pub const SAVED_FILE: &str = "saved-ruleset.nft";
pub const RESTORED_FILE: &str = "last-restored-ruleset.nft";
/// At most this much of the saved ruleset is copied into a command result.
const RESULT_RULESET_LIMIT: usize = 32 * 1024;
const NFT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum IsolateError {
    #[error("nftables is not installed on {host}: apt-get install nftables; isolation not applied")]
    NotInstalled { host: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Nft {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` timed out after {}s", .after.as_secs())]
    Timeout { command: String, after: Duration },
    #[error("cannot resolve coordinator endpoint `{endpoint}`: {reason}; isolation not applied")]
    Resolve { endpoint: String, reason: String },
    #[error("{0}")]
    Write(#[from] AtomicWriteError),
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "table inet {table} is loaded but no saved ruleset exists at {saved}: the pre-isolation rules are unknown; inspect `nft list ruleset` and remove the table by hand (`nft delete table inet {table}`)",
        table = rules::TABLE
    )]
    OrphanTable { saved: PathBuf },
    #[error(
        "the restored ruleset differs from the saved one at line {line} (saved: {saved_line:?}, now: {now_line:?}); the isolation table is gone, the saved copy is kept at {saved}"
    )]
    Mismatch {
        saved: PathBuf,
        line: usize,
        saved_line: String,
        now_line: String,
    },
}

pub type IsolateResult<T> = Result<T, IsolateError>;

/// How to run `nft`: its full argv, possibly behind a prefix (`ip netns exec NS nft`).
#[derive(Debug, Clone)]
pub struct Nft {
    argv: Vec<String>,
}

impl Default for Nft {
    fn default() -> Self {
        Self::system()
    }
}

impl Nft {
    /// `nft` from PATH.
    pub fn system() -> Self {
        Self {
            argv: vec!["nft".into()],
        }
    }

    /// A custom command line that ends in `nft` (e.g. `["ip", "netns", "exec", "ns1", "nft"]`).
    pub fn with_argv(argv: Vec<String>) -> Self {
        debug_assert!(!argv.is_empty(), "nft argv must name a program");
        Self { argv }
    }

    /// Runs `nft ARGS` and returns its stdout (whole: a ruleset must not be truncated).
    ///
    /// Cancel safety: the child is killed when the future is dropped; callers do not drop
    /// a writing invocation (they never wrap it in `select!`).
    async fn run(&self, host: &str, args: &[&str]) -> IsolateResult<String> {
        let command = format!("{} {}", self.argv.join(" "), args.join(" "));
        let mut cmd = tokio::process::Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound && self.argv.len() == 1 {
                IsolateError::NotInstalled {
                    host: host.to_string(),
                }
            } else {
                IsolateError::Spawn {
                    command: command.clone(),
                    source,
                }
            }
        })?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut so = child.stdout.take().expect("stdout is piped");
        let mut se = child.stderr.take().expect("stderr is piped");
        let run = async {
            let (a, b, status) = tokio::join!(
                so.read_to_end(&mut out),
                se.read_to_end(&mut err),
                child.wait()
            );
            a.and(b).and(status)
        };
        let status = match tokio::time::timeout(NFT_TIMEOUT, run).await {
            Err(_) => {
                return Err(IsolateError::Timeout {
                    command,
                    after: NFT_TIMEOUT,
                });
            }
            Ok(Err(source)) => return Err(IsolateError::Spawn { command, source }),
            Ok(Ok(s)) => s,
        };
        let stderr = String::from_utf8_lossy(&err).trim().to_string();
        if !status.success() {
            // `ip netns exec NS nft` without nft installed.
            if stderr.contains("exec of \"nft\" failed") {
                return Err(IsolateError::NotInstalled {
                    host: host.to_string(),
                });
            }
            return Err(IsolateError::Nft {
                command,
                status: status.to_string(),
                stderr,
            });
        }
        String::from_utf8(out).map_err(|_| IsolateError::Nft {
            command,
            status: status.to_string(),
            stderr: "output is not UTF-8".into(),
        })
    }
}

/// What `isolate` did.
#[derive(Debug, Clone)]
pub struct IsolateReport {
    /// The host was already isolated; the first saved ruleset was kept.
    pub already_isolated: bool,
    pub saved_path: PathBuf,
    pub saved_ruleset: String,
    pub coordinators: Vec<Endpoint>,
    pub allow: Vec<AllowRule>,
    pub script: String,
}

/// What `unisolate` did.
#[derive(Debug, Clone)]
pub struct UnisolateReport {
    /// `false`: the host was not isolated, nothing was changed.
    pub restored: bool,
    pub restored_bytes: usize,
    /// Where the saved copy went after a successful restore.
    pub kept_at: Option<PathBuf>,
}

/// Installs and removes the isolation table of one host.
#[derive(Debug, Clone)]
pub struct Isolator {
    nft: Nft,
    dir: PathBuf,
    host: String,
}

impl Isolator {
    pub fn new(nft: Nft, data_dir: &Path, host: impl Into<String>) -> Self {
        Self {
            nft,
            dir: data_dir.join(STATE_DIR),
            host: host.into(),
        }
    }

    pub fn saved_path(&self) -> PathBuf {
        self.dir.join(SAVED_FILE)
    }

    /// The current ruleset, as `nft list ruleset` prints it.
    pub async fn list_ruleset(&self) -> IsolateResult<String> {
        self.nft.run(&self.host, &["list", "ruleset"]).await
    }

    async fn table_loaded(&self) -> IsolateResult<bool> {
        let tables = self.nft.run(&self.host, &["list", "tables"]).await?;
        Ok(tables
            .lines()
            .any(|l| l.trim() == format!("table inet {}", rules::TABLE)))
    }

    async fn load_script(&self, name: &str, script: &str) -> IsolateResult<()> {
        let path = self.dir.join(name);
        write_file(&path, script.as_bytes()).await?;
        let p = path.display().to_string();
        self.nft.run(&self.host, &["-f", &p]).await.map(|_| ())
    }

    /// Saves the current ruleset (unless a saved copy exists) and installs the isolation
    /// table. Idempotent.
    pub async fn isolate(
        &self,
        coordinators: &[Endpoint],
        allow: &[AllowRule],
    ) -> IsolateResult<IsolateReport> {
        let current = self.list_ruleset().await?;
        create_dir(&self.dir).await?;
        let saved_path = self.saved_path();
        let (already_isolated, saved_ruleset) = match read_opt(&saved_path).await? {
            Some(saved) => (true, saved),
            None => {
                if self.table_loaded().await? {
                    return Err(IsolateError::OrphanTable { saved: saved_path });
                }
                write_file(&saved_path, current.as_bytes()).await?;
                info!(path = %saved_path.display(), bytes = current.len(), "pre-isolation ruleset saved");
                (false, current)
            }
        };
        let script = rules::render(coordinators, allow);
        self.load_script("isolation.nft", &script).await?;
        if !self.table_loaded().await? {
            return Err(IsolateError::Nft {
                command: "nft list tables".into(),
                status: "ok".into(),
                stderr: format!("table inet {} missing after loading it", rules::TABLE),
            });
        }
        info!(
            coordinators = coordinators.len(),
            allow = allow.len(),
            already_isolated,
            "host isolated"
        );
        Ok(IsolateReport {
            already_isolated,
            saved_path,
            saved_ruleset,
            coordinators: coordinators.to_vec(),
            allow: allow.to_vec(),
            script,
        })
    }

    /// Re-installs the isolation table when a saved ruleset says the host is isolated but
    /// the table is gone (a reboot, or someone flushed the ruleset). Returns whether it did.
    /// Why: rebooting a breached host must not be a way out of isolation.
    pub async fn reapply_if_isolated(
        &self,
        coordinators: &[Endpoint],
        allow: &[AllowRule],
    ) -> IsolateResult<bool> {
        if read_opt(&self.saved_path()).await?.is_none() || self.table_loaded().await? {
            return Ok(false);
        }
        self.load_script("isolation.nft", &rules::render(coordinators, allow))
            .await?;
        warn!("host was isolated and the isolation table was gone: re-installed");
        Ok(true)
    }

    /// Restores the saved ruleset exactly and proves it. Idempotent (a host that is not
    /// isolated is left alone).
    pub async fn unisolate(&self) -> IsolateResult<UnisolateReport> {
        let saved_path = self.saved_path();
        let Some(saved) = read_opt(&saved_path).await? else {
            if self.table_loaded().await? {
                return Err(IsolateError::OrphanTable { saved: saved_path });
            }
            info!("host not isolated, nothing to restore");
            return Ok(UnisolateReport {
                restored: false,
                restored_bytes: 0,
                kept_at: None,
            });
        };
        // One transaction: there is no moment with neither ruleset loaded.
        self.load_script("restore.nft", &format!("flush ruleset\n{saved}"))
            .await?;
        let now = self.list_ruleset().await?;
        if now != saved {
            let (line, saved_line, now_line) = first_difference(&saved, &now);
            warn!(line, "restored ruleset differs from the saved copy");
            return Err(IsolateError::Mismatch {
                saved: saved_path,
                line,
                saved_line,
                now_line,
            });
        }
        let kept = self.dir.join(RESTORED_FILE);
        tokio::fs::rename(&saved_path, &kept)
            .await
            .map_err(|source| IsolateError::Read {
                path: saved_path.clone(),
                source,
            })?;
        info!(
            bytes = saved.len(),
            "pre-isolation ruleset restored, identical"
        );
        Ok(UnisolateReport {
            restored: true,
            restored_bytes: saved.len(),
            kept_at: Some(kept),
        })
    }
}

fn first_difference(a: &str, b: &str) -> (usize, String, String) {
    let (mut la, mut lb) = (a.lines(), b.lines());
    let mut n = 0;
    loop {
        n += 1;
        match (la.next(), lb.next()) {
            (None, None) => return (n, String::new(), "(trailing bytes differ)".into()),
            (x, y) if x != y => {
                return (
                    n,
                    x.unwrap_or("<end>").to_string(),
                    y.unwrap_or("<end>").to_string(),
                );
            }
            _ => {}
        }
    }
}

async fn create_dir(dir: &Path) -> IsolateResult<()> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|source| IsolateError::Read {
            path: dir.to_path_buf(),
            source,
        })
}

async fn read_opt(path: &Path) -> IsolateResult<Option<String>> {
    match tokio::fs::read_to_string(path).await {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IsolateError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

async fn write_file(path: &Path, content: &[u8]) -> IsolateResult<()> {
    let (p, c) = (path.to_path_buf(), content.to_vec());
    tokio::task::spawn_blocking(move || write_atomic(&p, &c, 0o600))
        .await
        .map_err(|e| IsolateError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })??;
    Ok(())
}

/// Resolves the coordinator endpoints of the config (`host:port`, `https://host:port`) to
/// addresses. Every endpoint must resolve: isolating without a coordinator path would cut
/// the host off for good.
pub async fn resolve_coordinators(endpoints: &[String]) -> IsolateResult<Vec<Endpoint>> {
    let mut out = Vec::new();
    for ep in endpoints {
        let (host, port) =
            dr_proto::tls::parse_endpoint(ep).map_err(|e| IsolateError::Resolve {
                endpoint: ep.clone(),
                reason: e.to_string(),
            })?;
        let addrs = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| IsolateError::Resolve {
                endpoint: ep.clone(),
                reason: e.to_string(),
            })?;
        let addrs: Vec<std::net::SocketAddr> = addrs.collect();
        if addrs.is_empty() {
            return Err(IsolateError::Resolve {
                endpoint: ep.clone(),
                reason: "no addresses".into(),
            });
        }
        for a in addrs {
            let e = Endpoint {
                addr: a.ip(),
                port: a.port(),
            };
            if !out.contains(&e) {
                out.push(e);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Run once at agent start (see [`Isolator::reapply_if_isolated`]). Hosts that were never
/// isolated are not touched (and need no `nft`).
pub async fn reapply_at_start(config: Arc<Config>) {
    let iso = Isolator::new(Nft::system(), &config.data_dir, config.host_id.clone());
    if !tokio::fs::try_exists(iso.saved_path())
        .await
        .unwrap_or(false)
    {
        return;
    }
    let result = match resolve_coordinators(&config.coordinators).await {
        Ok(c) => iso.reapply_if_isolated(&c, &config.isolation.allow).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(true) => info!("isolation re-applied at start"),
        Ok(false) => info!("host is isolated, isolation table present"),
        Err(e) => {
            tracing::error!("host should be isolated but isolation could not be re-applied: {e}")
        }
    }
}

fn refuse_args(
    verb: &str,
    args: &HashMap<String, String>,
    allowed: &[&str],
) -> Option<ActionOutput> {
    let mut keys: Vec<&str> = args
        .keys()
        .map(String::as_str)
        .filter(|k| !allowed.contains(k))
        .collect();
    (!keys.is_empty()).then(|| {
        keys.sort_unstable();
        let takes = if allowed.is_empty() {
            "takes no arguments".to_string()
        } else {
            format!("takes only {}", allowed.join(", "))
        };
        ActionOutput::failed(format!(
            "`{verb}` {takes} (got {}); allowed sources come from this host's [isolation] allow and `allow=CIDR[:port],...`",
            keys.join(", ")
        ))
    })
}

/// The `allow` argument of `isolate` (`CIDR[:port]`, comma-separated): management sources
/// named by the operator for this isolation, on top of `[isolation] allow`.
pub fn parse_allow_arg(arg: Option<&String>) -> Result<Vec<AllowRule>, String> {
    let Some(arg) = arg else {
        return Ok(Vec::new());
    };
    arg.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let rule =
                AllowRule::parse(s).map_err(|e| format!("allow: {e}; isolation not applied"))?;
            if rule.prefix == 0 {
                return Err(format!(
                    "allow: {s} admits every source, which would make the isolation a no-op; name the management network (e.g. 10.0.0.5/32:22); isolation not applied"
                ));
            }
            Ok(rule)
        })
        .collect()
}

/// The `isolate` verb.
pub async fn isolate_action(iso: &Isolator, config: &Config) -> ActionOutput {
    isolate_action_with(iso, config, &[]).await
}

/// The `isolate` verb with extra management sources (`allow=` argument).
pub async fn isolate_action_with(
    iso: &Isolator,
    config: &Config,
    extra_allow: &[AllowRule],
) -> ActionOutput {
    let coordinators = match resolve_coordinators(&config.coordinators).await {
        Ok(c) => c,
        Err(e) => return ActionOutput::failed(e.to_string()),
    };
    let mut allow = config.isolation.allow.clone();
    for a in extra_allow {
        if !allow.contains(a) {
            allow.push(*a);
        }
    }
    match iso.isolate(&coordinators, &allow).await {
        Err(e) => ActionOutput::failed(e.to_string()),
        Ok(r) => {
            let join = |v: Vec<String>| v.join(",");
            let mut ruleset = r.saved_ruleset.clone();
            if ruleset.len() > RESULT_RULESET_LIMIT {
                let mut cut = RESULT_RULESET_LIMIT;
                while !ruleset.is_char_boundary(cut) {
                    cut -= 1;
                }
                ruleset.truncate(cut);
                ruleset.push_str("\n# ... truncated, see saved_ruleset_path\n");
            }
            let msg = if r.already_isolated {
                "already isolated; isolation rules refreshed, the first saved ruleset is kept"
            } else {
                "isolated: only the coordinator session, loopback and [isolation] allow remain"
            };
            ActionOutput::ok(msg)
                .with_detail("already_isolated", r.already_isolated.to_string())
                .with_detail("saved_ruleset_path", r.saved_path.display().to_string())
                .with_detail("saved_ruleset_bytes", r.saved_ruleset.len().to_string())
                .with_detail(
                    "saved_ruleset_blake3",
                    blake3::hash(r.saved_ruleset.as_bytes())
                        .to_hex()
                        .to_string(),
                )
                .with_detail("saved_ruleset", ruleset)
                .with_detail(
                    "coordinators",
                    join(r.coordinators.iter().map(ToString::to_string).collect()),
                )
                .with_detail(
                    "allow",
                    join(r.allow.iter().map(ToString::to_string).collect()),
                )
                .with_detail("table", format!("inet {}", rules::TABLE))
                .with_detail("rules", r.script)
        }
    }
}

/// The `unisolate` verb.
pub async fn unisolate_action(iso: &Isolator) -> ActionOutput {
    match iso.unisolate().await {
        Err(e) => ActionOutput::failed(e.to_string()),
        Ok(r) if !r.restored => {
            ActionOutput::ok("not isolated; nothing restored").with_detail("restored", "false")
        }
        Ok(r) => ActionOutput::ok(
            "pre-isolation ruleset restored; `nft list ruleset` is byte for byte the saved copy",
        )
        .with_detail("restored", "true")
        .with_detail("identical", "true")
        .with_detail("restored_bytes", r.restored_bytes.to_string())
        .with_detail(
            "kept_at",
            r.kept_at
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ),
    }
}

/// Registers `isolate` and `unisolate`, running `nft` through `nft` (or through
/// `[isolation] nft` when the config names a command line).
pub fn register(reg: &mut Registry, config: Arc<Config>, nft: Nft) {
    let nft = match &config.isolation.nft {
        Some(argv) if !argv.is_empty() => Nft::with_argv(argv.clone()),
        _ => nft,
    };
    let iso = Arc::new(Isolator::new(nft, &config.data_dir, config.host_id.clone()));
    let (iso2, config2) = (iso.clone(), config.clone());
    reg.register(
        "isolate",
        move |args: HashMap<String, String>, ctx: ActionCtx| {
            let (iso, config) = (iso.clone(), config.clone());
            async move {
                if let Some(refused) = refuse_args("isolate", &args, &["allow"]) {
                    return refused;
                }
                let extra = match parse_allow_arg(args.get("allow")) {
                    Ok(a) => a,
                    Err(e) => return ActionOutput::failed(e),
                };
                isolate_action_with(&iso, &config, &extra)
                    .instrument(info_span!("isolate", key = %ctx.key, host = %config.host_id))
                    .await
            }
        },
    );
    reg.register(
        "unisolate",
        move |args: HashMap<String, String>, ctx: ActionCtx| {
            let (iso, host) = (iso2.clone(), config2.host_id.clone());
            async move {
                if let Some(refused) = refuse_args("unisolate", &args, &[]) {
                    return refused;
                }
                unisolate_action(&iso)
                    .instrument(info_span!("unisolate", key = %ctx.key, host = %host))
                    .await
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_nft_is_refused_with_install_hint() {
        let dir = tempfile::tempdir().unwrap();
        let iso = Isolator::new(
            Nft::with_argv(vec!["/nonexistent/nft".into()]),
            dir.path(),
            "bj-db-1",
        );
        let err = iso.isolate(&[], &[]).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "nftables is not installed on bj-db-1: apt-get install nftables; isolation not applied"
        );
        // Nothing was saved.
        assert!(std::fs::metadata(iso.saved_path()).is_err());
    }

    #[tokio::test]
    async fn resolves_literal_endpoints() {
        let eps = resolve_coordinators(&["https://127.0.0.1:7443".into(), "127.0.0.2:7444".into()])
            .await
            .unwrap();
        assert_eq!(
            eps.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["127.0.0.1:7443", "127.0.0.2:7444"]
        );
    }

    #[test]
    fn first_difference_names_the_line() {
        assert_eq!(
            first_difference("a\nb\nc\n", "a\nx\nc\n"),
            (2, "b".into(), "x".into())
        );
    }
}
