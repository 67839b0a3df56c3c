//! `TestCluster`: real coordinators and agents on 127.0.0.1, wired through the fault layer.
//!
//! ```text
//! TestCluster::builder().coordinators(3).agents(["h1", "h2", "h3"]).start().await?
//!
//!   drctl cert init/issue ─► ca.pem, coordinator-N, agent-H, operator-admin (+ viewer)
//!   coordinator-N.toml     listen = real port, advertise = proxy(coord-N),
//!                          peers = proxies of the others           (so links can be cut)
//!   dr-coordinator --config coordinator-N.toml     x N
//!   drctl cluster init  (at node 1)  ─► wait for a leader that every node agrees on
//!   agent-H.toml           coordinators = the proxies
//!   dr-agent --config agent-H.toml                 x agents ─► wait until all connected
//! ```
//!
//! The file formats follow `deploy/examples/*.toml`; the command lines follow
//! docs/dev/team-contracts.md. Everything the tests assume about the binaries' CLI that
//! the contracts do not fix yet is in the `cli` module below, in one place.
//!
//! The cluster owns its [`TestDir`]. A test ends with `cluster.shutdown().await?`, which
//! stops every child, fails on a panic in any child log and removes the directory; a test
//! that fails before that keeps the directory and prints the log tails.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::process::Command;
use tracing::{info, warn};

use super::bins::Bins;
use super::certs::{CertPaths, Pki};
use super::faults::FaultNet;
use super::ports::free_addr;
use super::process::{ChildGuard, ChildSpec, panics_in_log};
use super::testdir::TestDir;
use super::wait::wait_until;

/// What the harness assumes about command lines beyond the written contracts.
pub mod cli {
    use std::path::Path;

    /// `dr-coordinator --config FILE` / `dr-agent --config FILE`.
    pub fn daemon_args(config: &Path) -> Vec<String> {
        vec!["--config".to_owned(), config.display().to_string()]
    }

    /// Validates a config file and exits: `BIN --config FILE --check-config`.
    pub fn check_config_args(config: &Path) -> Vec<String> {
        let mut v = daemon_args(config);
        v.push("--check-config".to_owned());
        v
    }

    /// drctl reads its config file from this variable (deploy/examples/drctl.toml header).
    pub const DRCTL_CONFIG_ENV: &str = "DRCTL_CONFIG";

    /// Appended to every drctl call whose stdout the harness parses.
    pub const JSON: [&str; 2] = ["--output", "json"];

    pub const CLUSTER_INIT: [&str; 2] = ["cluster", "init"];
    pub const CLUSTER_STATUS: [&str; 2] = ["cluster", "status"];
    pub const AGENTS_LIST: [&str; 2] = ["agents", "list"];

    /// `drctl commands list --host H` (ListCommands).
    pub fn commands_list(host: &str) -> Vec<String> {
        vec![
            "commands".into(),
            "list".into(),
            "--host".into(),
            host.into(),
        ]
    }

    /// `drctl run --host H exec NAME`.
    pub fn run_exec(host: &str, action: &str) -> Vec<String> {
        vec![
            "run".into(),
            "--host".into(),
            host.into(),
            "exec".into(),
            action.into(),
        ]
    }

    /// `drctl run --no-wait --host H checks`: returns once the command is committed.
    pub fn run_checks_no_wait(host: &str) -> Vec<String> {
        vec![
            "run".into(),
            "--no-wait".into(),
            "--host".into(),
            host.into(),
            "checks".into(),
        ]
    }

    /// `drctl run --host H checks`.
    pub fn run_checks(host: &str) -> Vec<String> {
        vec!["run".into(), "--host".into(), host.into(), "checks".into()]
    }
}

/// Regions of coordinator 1, 2, 3, 4, 5 (three failure domains, DESIGN.md).
pub const COORD_REGIONS: [&str; 5] = ["beijing", "shanghai", "witness", "beijing", "shanghai"];

/// Quotes a string for TOML.
fn q(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_owned()).to_string()
}

fn q_list<I: IntoIterator<Item = S>, S: AsRef<str>>(items: I) -> String {
    let v: Vec<String> = items.into_iter().map(q).collect();
    format!("[{}]", v.join(", "))
}

/// One `[[actions]]` entry of an agent.
#[derive(Clone, Debug)]
pub struct ActionSpec {
    pub name: String,
    pub command: Vec<String>,
    pub timeout: String,
}

/// One agent of the test cluster.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    pub host: String,
    pub region: String,
    pub site: String,
    pub roles: Vec<String>,
    /// Present the certificate of this host instead of its own (impersonation tests).
    pub cert_of: Option<String>,
    pub actions: Vec<ActionSpec>,
    /// Raw TOML appended to the generated config.
    pub extra_toml: String,
}

impl AgentSpec {
    pub fn new(host: &str) -> Self {
        Self {
            host: host.to_owned(),
            region: "beijing".to_owned(),
            site: "dc1".to_owned(),
            roles: vec!["app".to_owned()],
            cert_of: None,
            actions: Vec::new(),
            extra_toml: String::new(),
        }
    }

    pub fn region(mut self, region: &str) -> Self {
        self.region = region.to_owned();
        self.site = format!("{region}-dc1");
        self
    }

    pub fn roles(mut self, roles: &[&str]) -> Self {
        self.roles = roles.iter().map(|r| (*r).to_owned()).collect();
        self
    }

    pub fn cert_of(mut self, host: &str) -> Self {
        self.cert_of = Some(host.to_owned());
        self
    }

    pub fn action<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        name: &str,
        command: I,
    ) -> Self {
        self.actions.push(ActionSpec {
            name: name.to_owned(),
            command: command.into_iter().map(Into::into).collect(),
            timeout: "2m".to_owned(),
        });
        self
    }
}

impl From<&str> for AgentSpec {
    fn from(host: &str) -> Self {
        AgentSpec::new(host)
    }
}

pub struct ClusterBuilder {
    coordinators: usize,
    agents: Vec<AgentSpec>,
    snapshot_every: u64,
    init: bool,
    wait_agents: bool,
}

impl ClusterBuilder {
    pub fn coordinators(mut self, n: usize) -> Self {
        self.coordinators = n;
        self
    }

    /// Agents spread round-robin over the coordinator regions.
    pub fn agents<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, hosts: I) -> Self {
        for h in hosts {
            let i = self.agents.len();
            self.agents
                .push(AgentSpec::new(h.as_ref()).region(COORD_REGIONS[i % 3]));
        }
        self
    }

    pub fn agent(mut self, spec: AgentSpec) -> Self {
        self.agents.push(spec);
        self
    }

    /// `[raft] snapshot_every` of every coordinator (default 5000, as in the example).
    pub fn snapshot_every(mut self, n: u64) -> Self {
        self.snapshot_every = n;
        self
    }

    /// Do not run `drctl cluster init` (and so do not start agents either).
    pub fn no_init(mut self) -> Self {
        self.init = false;
        self
    }

    /// Start the agents but do not wait until they are connected (refusal tests).
    pub fn dont_wait_for_agents(mut self) -> Self {
        self.wait_agents = false;
        self
    }

    pub async fn start(self) -> Result<TestCluster> {
        crate::init_tracing();
        let dir = TestDir::new()?;
        info!(dir = %dir.path().display(), "--- test cluster: certificates");
        let bins = Bins::locate()?;
        let pki = Pki::init(&bins.drctl, &dir.join("pki"), "yeslocker.test").await?;
        let admin = pki.operator("admin", "admin").await?;

        let mut net = FaultNet::new();
        let mut coords = BTreeMap::new();
        for i in 0..self.coordinators {
            let id = (i + 1) as u64;
            let region = COORD_REGIONS[i % COORD_REGIONS.len()].to_owned();
            let listen = free_addr()?;
            let name = coord_name(id);
            let advertise = net.add_proxy(&name, listen).await?;
            net.register_node(&name, &region);
            let certs = pki.coordinator(id).await?;
            coords.insert(
                id,
                Coord {
                    id,
                    region,
                    listen,
                    advertise,
                    metrics: free_addr()?,
                    certs,
                    config: dir.join(format!("coordinator-{id}.toml")),
                    guard: None,
                },
            );
        }
        let mut agents = BTreeMap::new();
        for spec in self.agents {
            net.register_node(&agent_name(&spec.host), &spec.region);
            let certs = pki
                .agent(spec.cert_of.as_deref().unwrap_or(&spec.host))
                .await?;
            agents.insert(
                spec.host.clone(),
                Agent {
                    config: dir.join(format!("agent-{}.toml", spec.host)),
                    metrics: free_addr()?,
                    certs,
                    spec,
                    guard: None,
                },
            );
        }

        let mut cluster = TestCluster {
            bins,
            pki,
            net,
            coords,
            agents,
            admin,
            snapshot_every: self.snapshot_every,
            dir,
        };
        let endpoints: Vec<String> = cluster
            .coords
            .values()
            .map(|c| c.listen.to_string())
            .collect();
        let admin = cluster.admin.clone();
        cluster.write_drctl_config("admin", &endpoints, &admin)?;
        for id in cluster.coord_ids() {
            cluster.write_coord_config(id)?;
            let listen = cluster.coord(id)?.listen.to_string();
            cluster.write_drctl_config(&coord_name(id), &[listen], &admin)?;
        }
        for host in cluster.agent_hosts() {
            cluster.write_agent_config(&host)?;
        }

        info!(
            "--- test cluster: start {} coordinators",
            cluster.coords.len()
        );
        for id in cluster.coord_ids() {
            cluster.start_coord(id)?;
        }
        if !self.init {
            return Ok(cluster);
        }
        cluster.init().await?;
        info!("--- test cluster: start {} agents", cluster.agents.len());
        for host in cluster.agent_hosts() {
            cluster.start_agent(&host)?;
        }
        if self.wait_agents {
            let hosts = cluster.agent_hosts();
            cluster.wait_agents_connected(&hosts).await?;
        }
        info!("--- test cluster: ready");
        Ok(cluster)
    }
}

struct Coord {
    id: u64,
    region: String,
    listen: SocketAddr,
    advertise: SocketAddr,
    metrics: SocketAddr,
    certs: CertPaths,
    config: PathBuf,
    guard: Option<ChildGuard>,
}

struct Agent {
    spec: AgentSpec,
    config: PathBuf,
    metrics: SocketAddr,
    certs: CertPaths,
    guard: Option<ChildGuard>,
}

pub fn coord_name(id: u64) -> String {
    format!("coord-{id}")
}

pub fn agent_name(host: &str) -> String {
    format!("agent-{host}")
}

pub struct TestCluster {
    pub bins: Bins,
    pub pki: Pki,
    pub net: FaultNet,
    coords: BTreeMap<u64, Coord>,
    agents: BTreeMap<String, Agent>,
    admin: CertPaths,
    snapshot_every: u64,
    // Last: dropped after the children are stopped, so the failure report has full logs.
    dir: TestDir,
}

impl TestCluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            coordinators: 3,
            agents: Vec::new(),
            snapshot_every: 5000,
            init: true,
            wait_agents: true,
        }
    }

    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    pub fn coord_ids(&self) -> Vec<u64> {
        self.coords.keys().copied().collect()
    }

    pub fn agent_hosts(&self) -> Vec<String> {
        self.agents.keys().cloned().collect()
    }

    fn coord(&self, id: u64) -> Result<&Coord> {
        self.coords
            .get(&id)
            .with_context(|| format!("no coordinator {id} in this cluster"))
    }

    fn coord_mut(&mut self, id: u64) -> Result<&mut Coord> {
        self.coords
            .get_mut(&id)
            .with_context(|| format!("no coordinator {id} in this cluster"))
    }

    /// The address a coordinator really listens on (bypassing its proxy).
    pub fn coord_listen(&self, id: u64) -> Result<SocketAddr> {
        Ok(self.coord(id)?.listen)
    }

    pub fn coord_config_path(&self, id: u64) -> Result<PathBuf> {
        Ok(self.coord(id)?.config.clone())
    }

    pub fn agent_config_path(&self, host: &str) -> Result<PathBuf> {
        Ok(self
            .agents
            .get(host)
            .context("no such agent")?
            .config
            .clone())
    }

    pub fn admin_cert(&self) -> &CertPaths {
        &self.admin
    }

    // ---- configuration files ------------------------------------------------------------

    fn write_coord_config(&self, id: u64) -> Result<()> {
        let c = self.coord(id)?;
        let mut s = String::new();
        s += "version = 1\n";
        s += &format!("node_id = {id}\n");
        s += &format!("region = {}\n", q(&c.region));
        s += &format!("listen = {}\n", q(c.listen.to_string()));
        s += &format!("advertise = {}\n", q(c.advertise.to_string()));
        s += &format!(
            "data_dir = {}\n",
            q(self.dir.join(format!("coord-{id}")).display().to_string())
        );
        s += &format!("metrics_listen = {}\n", q(c.metrics.to_string()));
        s += "log_format = \"text\"\n";
        for p in self.coords.values().filter(|p| p.id != id) {
            s += &format!(
                "\n[[peers]]\nnode_id = {}\naddr = {}\nregion = {}\n",
                p.id,
                q(p.advertise.to_string()),
                q(&p.region)
            );
        }
        s += &format!(
            "\n[tls]\nca = {}\ncert = {}\nkey = {}\nreload_interval = \"1s\"\n",
            q(self.pki.ca().display().to_string()),
            q(c.certs.cert.display().to_string()),
            q(c.certs.key.display().to_string())
        );
        // Elections are slower than in the example: CI is a loaded 2-core machine and a
        // spurious election would make the tests flaky, not the product wrong.
        // Benchmarks (scripts/bench-failover.sh) ask for the example's timings instead:
        // DR_HARNESS_RAFT="HEARTBEAT,ELECTION_MIN,ELECTION_MAX", e.g. "100ms,500ms,1000ms".
        let timings = std::env::var("DR_HARNESS_RAFT").ok();
        let (hb, emin, emax) = match timings.as_deref().map(|t| t.split(',').collect::<Vec<_>>()) {
            Some(v) if v.len() == 3 => (v[0].trim(), v[1].trim(), v[2].trim()),
            _ => ("200ms", "1500ms", "3000ms"),
        };
        s += &format!(
            "\n[raft]\nheartbeat_interval = \"{hb}\"\nelection_timeout_min = \"{emin}\"\n\
             election_timeout_max = \"{emax}\"\nsnapshot_every = {}\n",
            self.snapshot_every
        );
        // A low snapshot_every is how a test asks for snapshot catch-up: keep few log
        // entries behind the snapshot too, or a lagging member would catch up by log.
        if self.snapshot_every < 1000 {
            s += &format!("keep_logs = {}\n", (self.snapshot_every / 2).max(1));
        }
        s += "\n[agents]\nheartbeat_interval = \"500ms\"\ndown_after = \"5s\"\ncommand_timeout = \"5m\"\n";
        std::fs::write(&c.config, s).with_context(|| format!("write {}", c.config.display()))
    }

    fn write_agent_config(&self, host: &str) -> Result<()> {
        let a = self.agents.get(host).context("no such agent")?;
        let data_dir = self.dir.join(format!("agent-{host}"));
        std::fs::create_dir_all(&data_dir)?;
        let coordinators: Vec<String> = self
            .coords
            .values()
            .map(|c| c.advertise.to_string())
            .collect();
        let mut s = String::new();
        s += "version = 1\n";
        s += &format!("host_id = {}\n", q(&a.spec.host));
        s += &format!("region = {}\n", q(&a.spec.region));
        s += &format!("site = {}\n", q(&a.spec.site));
        s += &format!("roles = {}\n", q_list(&a.spec.roles));
        s += &format!("coordinators = {}\n", q_list(&coordinators));
        s += &format!("data_dir = {}\n", q(data_dir.display().to_string()));
        s += &format!("metrics_listen = {}\n", q(a.metrics.to_string()));
        s += "log_format = \"text\"\n";
        s += &format!(
            "\n[tls]\nca = {}\ncert = {}\nkey = {}\nreload_interval = \"1s\"\n",
            q(self.pki.ca().display().to_string()),
            q(a.certs.cert.display().to_string()),
            q(a.certs.key.display().to_string())
        );
        s += "\n[session]\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nconnect_timeout = \"2s\"\n";
        s += &format!(
            "\n[[checks]]\nname = \"data-disk\"\nkind = \"disk\"\nservice = \"agent\"\ntier = \"important\"\n\
             interval = \"2s\"\ntimeout = \"1s\"\npath = {}\nmin_free_percent = 0.0\n",
            q(data_dir.display().to_string())
        );
        for act in &a.spec.actions {
            s += &format!(
                "\n[[actions]]\nname = {}\ncommand = {}\ntimeout = {}\n",
                q(&act.name),
                q_list(
                    act.command
                        .iter()
                        .map(|a| a.replace("{dir}", &self.dir.path().display().to_string()))
                ),
                q(&act.timeout)
            );
        }
        s += &a.spec.extra_toml;
        std::fs::write(&a.config, s).with_context(|| format!("write {}", a.config.display()))
    }

    /// Writes `drctl-NAME.toml` with these endpoints and this client certificate.
    pub fn write_drctl_config(
        &self,
        name: &str,
        endpoints: &[String],
        cert: &CertPaths,
    ) -> Result<PathBuf> {
        let path = self.dir.join(format!("drctl-{name}.toml"));
        let s = format!(
            "endpoints = {}\ntimeout = \"10s\"\n\n[tls]\nca = {}\ncert = {}\nkey = {}\n",
            q_list(endpoints),
            q(self.pki.ca().display().to_string()),
            q(cert.cert.display().to_string()),
            q(cert.key.display().to_string())
        );
        std::fs::write(&path, s).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    // ---- processes ----------------------------------------------------------------------

    pub fn start_coord(&mut self, id: u64) -> Result<()> {
        let log = self.dir.log_path(&coord_name(id));
        let c = self.coord(id)?;
        if c.guard.is_some() {
            bail!("coordinator {id} is already started");
        }
        let spec = ChildSpec::new(coord_name(id), &self.bins.coordinator, log)
            .args(cli::daemon_args(&c.config))
            .env("RUST_LOG", "info")
            .cwd(self.dir.path());
        let guard = ChildGuard::spawn(spec)?;
        self.net.register_pid(guard.pid(), &coord_name(id));
        self.coord_mut(id)?.guard = Some(guard);
        Ok(())
    }

    pub fn start_agent(&mut self, host: &str) -> Result<()> {
        let log = self.dir.log_path(&agent_name(host));
        let a = self.agents.get(host).context("no such agent")?;
        if a.guard.is_some() {
            bail!("agent {host} is already started");
        }
        let spec = ChildSpec::new(agent_name(host), &self.bins.agent, log)
            .args(cli::daemon_args(&a.config))
            .env("RUST_LOG", "info")
            .cwd(self.dir.path());
        let guard = ChildGuard::spawn(spec)?;
        self.net.register_pid(guard.pid(), &agent_name(host));
        self.agents.get_mut(host).context("no such agent")?.guard = Some(guard);
        Ok(())
    }

    /// The agent's child process (to read its log or check it is running).
    pub fn agent_guard(&mut self, host: &str) -> Option<&mut ChildGuard> {
        self.agents.get_mut(host).and_then(|a| a.guard.as_mut())
    }

    pub fn coord_guard(&mut self, id: u64) -> Option<&mut ChildGuard> {
        self.coords.get_mut(&id).and_then(|c| c.guard.as_mut())
    }

    /// `kill -9` a coordinator (its data dir stays).
    pub fn kill9(&mut self, id: u64) -> Result<()> {
        let mut g = self
            .coord_mut(id)?
            .guard
            .take()
            .with_context(|| format!("coordinator {id} is not running"))?;
        g.kill9()
    }

    /// Graceful stop (SIGTERM, SIGKILL after the grace).
    pub async fn stop(&mut self, id: u64) -> Result<()> {
        if let Some(mut g) = self.coord_mut(id)?.guard.take() {
            g.stop().await?;
        }
        Ok(())
    }

    /// Starts a stopped or killed coordinator again with the same config and data dir.
    pub fn restart(&mut self, id: u64) -> Result<()> {
        if self.coord(id)?.guard.is_some() {
            bail!("coordinator {id} is running; stop or kill9 it first");
        }
        self.start_coord(id)
    }

    pub fn kill9_agent(&mut self, host: &str) -> Result<()> {
        let a = self.agents.get_mut(host).context("no such agent")?;
        let mut g = a
            .guard
            .take()
            .with_context(|| format!("agent {host} is not running"))?;
        g.kill9()
    }

    pub async fn stop_agent(&mut self, host: &str) -> Result<()> {
        if let Some(mut g) = self
            .agents
            .get_mut(host)
            .context("no such agent")?
            .guard
            .take()
        {
            g.stop().await?;
        }
        Ok(())
    }

    pub fn running_coords(&self) -> Vec<u64> {
        self.coords
            .values()
            .filter(|c| c.guard.is_some())
            .map(|c| c.id)
            .collect()
    }

    /// Stops every agent and coordinator gracefully.
    pub async fn stop_all(&mut self) -> Result<()> {
        for host in self.agent_hosts() {
            self.stop_agent(&host).await?;
        }
        for id in self.coord_ids() {
            self.stop(id).await?;
        }
        Ok(())
    }

    /// Starts every coordinator and agent that is not running and waits for a leader.
    pub async fn start_all(&mut self) -> Result<u64> {
        for id in self.coord_ids() {
            if self.coord(id)?.guard.is_none() {
                self.start_coord(id)?;
            }
        }
        let leader = self.wait_for_leader(None).await?;
        for host in self.agent_hosts() {
            if self.agents.get(&host).is_some_and(|a| a.guard.is_none()) {
                self.start_agent(&host)?;
            }
        }
        Ok(leader)
    }

    // ---- drctl --------------------------------------------------------------------------

    fn drctl_config(&self, name: &str) -> PathBuf {
        self.dir.join(format!("drctl-{name}.toml"))
    }

    /// The drctl config with the admin certificate and every coordinator.
    pub fn admin_drctl_config(&self) -> PathBuf {
        self.drctl_config("admin")
    }

    /// The drctl config that reaches coordinator `id` only.
    pub fn drctl_config_at(&self, id: u64) -> PathBuf {
        self.drctl_config(&coord_name(id))
    }

    /// Starts drctl (admin config) in the background, e.g. a long `drctl run` that a test
    /// interrupts with a fault; its output goes to `logs/<name>.log`.
    pub fn spawn_drctl<I, S>(&self, name: &str, args: I) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let spec = ChildSpec::new(name, &self.bins.drctl, self.dir.log_path(name))
            .args(args)
            .env(
                cli::DRCTL_CONFIG_ENV,
                self.drctl_config("admin").display().to_string(),
            )
            .cwd(self.dir.path());
        ChildGuard::spawn(spec)
    }

    /// Runs drctl with the admin config (all coordinators) and returns its output, whatever
    /// the exit status.
    pub async fn drctl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.drctl_with(&self.drctl_config("admin"), args).await
    }

    /// Runs drctl against coordinator `id` only.
    pub async fn drctl_at<I, S>(&self, id: u64, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.drctl_with(&self.drctl_config(&coord_name(id)), args)
            .await
    }

    /// Runs drctl with the given config file.
    pub async fn drctl_with<I, S>(&self, config: &Path, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        run_drctl(&self.bins.drctl, config, &args, self.dir.path()).await
    }

    /// drctl (admin, all coordinators) `args --output json`; fails on a non-zero exit.
    pub async fn drctl_json<I, S>(&self, args: I) -> Result<Value>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let out = self.drctl(json_args(args)).await?;
        parse_json_output(&out)
    }

    /// drctl against coordinator `id` only, `--output json`; fails on a non-zero exit.
    pub async fn drctl_json_at<I, S>(&self, id: u64, args: I) -> Result<Value>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let out = self.drctl_at(id, json_args(args)).await?;
        parse_json_output(&out)
    }

    // ---- cluster-level helpers ----------------------------------------------------------

    /// `drctl cluster init` at node 1 (retried while the nodes start), then waits for a
    /// leader that every node agrees on.
    pub async fn init(&mut self) -> Result<u64> {
        info!("--- test cluster: drctl cluster init");
        let first = *self
            .coords
            .keys()
            .next()
            .context("a cluster needs a coordinator")?;
        wait_until(
            "drctl cluster init succeeds",
            Duration::from_secs(60),
            Duration::from_millis(500),
            || async {
                let out = self.drctl_at(first, cli::CLUSTER_INIT).await?;
                if out.status.success() {
                    return Ok(Some(()));
                }
                bail!(
                    "drctl cluster init: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            },
        )
        .await?;
        self.wait_for_leader(None).await
    }

    /// `drctl cluster status --output json` answered by node `id`.
    pub async fn cluster_status_at(&self, id: u64) -> Result<Value> {
        self.drctl_json_at(id, cli::CLUSTER_STATUS).await
    }

    /// Waits until every running coordinator (except `not`) names the same running leader,
    /// which is not `not`, and returns it.
    pub async fn wait_for_leader(&self, not: Option<u64>) -> Result<u64> {
        let running: Vec<u64> = self
            .running_coords()
            .into_iter()
            .filter(|id| Some(*id) != not)
            .collect();
        self.wait_for_leader_among(&running, not).await
    }

    /// Waits until the coordinators `among` name the same leader, one of them and not `not`
    /// (e.g. the majority side of a partition), and returns it.
    pub async fn wait_for_leader_among(&self, among: &[u64], not: Option<u64>) -> Result<u64> {
        let running = among.to_vec();
        let what = match not {
            Some(n) => format!("the coordinators {running:?} agree on a leader other than {n}"),
            None => format!("the coordinators {running:?} agree on a leader"),
        };
        let leader = wait_until(
            &what,
            Duration::from_secs(90),
            Duration::from_millis(500),
            || async {
                let mut seen = Vec::new();
                for id in &running {
                    let st = self.cluster_status_at(*id).await?;
                    seen.push(get_u64(&st, "leader_id").unwrap_or(0));
                }
                let l = seen[0];
                if l != 0 && Some(l) != not && running.contains(&l) && seen.iter().all(|s| *s == l)
                {
                    Ok(Some(l))
                } else {
                    bail!("leaders seen by {running:?}: {seen:?}")
                }
            },
        )
        .await?;
        info!(leader, "leader elected");
        Ok(leader)
    }

    /// The current leader according to the running coordinators (waits until they agree).
    pub async fn leader_id(&self) -> Result<u64> {
        self.wait_for_leader(None).await
    }

    /// Cuts every link between the current leader and the other coordinators (agents keep
    /// their links). Returns the old leader and the ids of the majority it was cut from.
    pub async fn cut_leader_off(&self) -> Result<(u64, Vec<u64>)> {
        let old = self.leader_id().await?;
        let majority: Vec<u64> = self
            .coord_ids()
            .into_iter()
            .filter(|id| *id != old)
            .collect();
        for other in &majority {
            self.net.set_links_between(
                &coord_name(old),
                &coord_name(*other),
                super::faults::LinkMode::Cut,
            );
        }
        Ok((old, majority))
    }

    /// The agents as the leader sees them (only the leader has the live `connected` facts).
    pub async fn agents_at_leader(&self) -> Result<Vec<Value>> {
        let leader = self.leader_id().await?;
        let v = self.drctl_json_at(leader, cli::AGENTS_LIST).await?;
        Ok(json_list(&v, "agents"))
    }

    /// Waits until the leader lists every host in `hosts` as connected.
    pub async fn wait_agents_connected(&self, hosts: &[String]) -> Result<()> {
        let what = format!("agents {hosts:?} are connected to the leader");
        wait_until(
            &what,
            Duration::from_secs(90),
            Duration::from_millis(500),
            || async {
                let agents = self.agents_at_leader().await?;
                let missing: Vec<&String> = hosts
                    .iter()
                    .filter(|h| {
                        !agents
                            .iter()
                            .any(|a| get_str(a, "host_id") == Some(h.as_str()) && is_connected(a))
                    })
                    .collect();
                if missing.is_empty() {
                    Ok(Some(()))
                } else {
                    bail!(
                        "not connected yet: {missing:?}; listed: {}",
                        Value::Array(agents.clone())
                    )
                }
            },
        )
        .await
    }

    /// `drctl commands list --host H --output json`, as a list.
    pub async fn commands(&self, host: &str) -> Result<Vec<Value>> {
        let v = self.drctl_json(cli::commands_list(host)).await?;
        Ok(json_list(&v, "commands"))
    }

    // ---- end of test --------------------------------------------------------------------

    /// Stops every child gracefully, fails if any child log shows a panic, and removes the
    /// test directory. Call it last in every test.
    pub async fn shutdown(mut self) -> Result<()> {
        info!("--- test cluster: shutdown");
        self.net.heal();
        for host in self.agent_hosts() {
            if let Err(e) = self.stop_agent(&host).await {
                warn!("stopping agent {host}: {e:#}");
            }
        }
        for id in self.coord_ids() {
            if let Err(e) = self.stop(id).await {
                warn!("stopping coordinator {id}: {e:#}");
            }
        }
        let panics: Vec<String> = self
            .dir
            .logs()
            .iter()
            .flat_map(|l| panics_in_log(l))
            .collect();
        if !panics.is_empty() {
            bail!("child processes panicked:\n{}", panics.join("\n"));
        }
        self.dir.passed();
        Ok(())
    }
}

fn json_args<I, S>(args: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut v: Vec<String> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    v.extend(cli::JSON.iter().map(|s| (*s).to_owned()));
    v
}

/// Runs `drctl args` with `DRCTL_CONFIG=config` in `cwd`, with a 120 s limit.
pub async fn run_drctl(drctl: &Path, config: &Path, args: &[String], cwd: &Path) -> Result<Output> {
    let shown = format!("drctl {}", args.join(" "));
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(drctl)
            .args(args)
            .env(cli::DRCTL_CONFIG_ENV, config)
            .env("NO_COLOR", "1")
            .current_dir(cwd)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{shown} did not finish within 120 s"))?
    .with_context(|| format!("run {}", drctl.display()))?;
    info!(
        cmd = %shown,
        config = %config.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        status = %out.status,
        stderr = %String::from_utf8_lossy(&out.stderr).trim(),
        "drctl"
    );
    Ok(out)
}

/// Parses drctl's `--output json` stdout: one JSON document, or one per line (streamed
/// events), which becomes an array. Fails on a non-zero exit with drctl's stderr.
pub fn parse_json_output(out: &Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "drctl failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        );
    }
    if let Ok(v) = serde_json::from_str::<Value>(&stdout) {
        return Ok(v);
    }
    let lines: Result<Vec<Value>, _> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str::<Value>)
        .collect();
    lines
        .map(Value::Array)
        .with_context(|| format!("drctl --output json printed no JSON: {stdout}"))
}

/// Looks a field up by its proto name, also accepting the camelCase JSON mapping.
pub fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).or_else(|| v.get(camel(key)))
}

fn camel(key: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in key.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A u64 field, as a JSON number or (proto3 JSON mapping) a string.
pub fn get_u64(v: &Value, key: &str) -> Option<u64> {
    match get(v, key)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

pub fn get_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    get(v, key)?.as_str()
}

pub fn get_bool(v: &Value, key: &str) -> bool {
    get(v, key).and_then(Value::as_bool).unwrap_or(false)
}

/// `v` itself if it is an array, else `v[key]` as an array (empty when absent).
pub fn json_list(v: &Value, key: &str) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        _ => get(v, key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    }
}

/// An agent entry of `agents list` that the leader sees connected.
pub fn is_connected(agent: &Value) -> bool {
    get_bool(agent, "connected")
}
