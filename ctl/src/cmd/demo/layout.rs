//! The demo's cluster on paper: nodes, hosts, ports, and the files that describe them.
//!
//! Everything the demo starts is written down here first (certificates, one config file
//! per process in the formats of `deploy/examples`, `drctl.toml`, `README.txt`), so that an
//! operator can start the very same processes by hand afterwards.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::cmd::cert::{self, IssueRequest, Kind};
use crate::config::ClientConfig;

/// `writeln!` into a String without a Result to discard.
macro_rules! wl {
    ($s:expr, $($arg:tt)*) => {{
        $s.push_str(&format!($($arg)*));
        $s.push('\n');
    }};
}

pub const TRUST_DOMAIN: &str = "demo.yeslocker.local";
pub const OPERATOR: &str = "demo-admin";

/// One coordinator of the demo cluster.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub node_id: u64,
    pub region: &'static str,
    pub port: u16,
}

impl NodeSpec {
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn name(&self) -> String {
        format!("coordinator-{}", self.node_id)
    }
}

/// One agent host of the demo.
#[derive(Debug, Clone)]
pub struct HostSpec {
    pub host_id: &'static str,
    pub region: &'static str,
    pub site: &'static str,
    pub roles: &'static [&'static str],
}

impl HostSpec {
    pub fn name(&self) -> String {
        format!("agent-{}", self.host_id)
    }
}

pub const HOSTS: [HostSpec; 5] = [
    HostSpec {
        host_id: "bj-db-1",
        region: "beijing",
        site: "bj-dc1",
        roles: &["db", "primary"],
    },
    HostSpec {
        host_id: "bj-app-1",
        region: "beijing",
        site: "bj-dc1",
        roles: &["app"],
    },
    HostSpec {
        host_id: "sh-db-1",
        region: "shanghai",
        site: "sh-dc1",
        roles: &["db", "replica"],
    },
    HostSpec {
        host_id: "sh-app-1",
        region: "shanghai",
        site: "sh-dc1",
        roles: &["app"],
    },
    HostSpec {
        host_id: "site-gw-001",
        region: "beijing",
        site: "locker-site-001",
        roles: &["gateway"],
    },
];

const REGIONS: [&str; 3] = ["beijing", "shanghai", "witness"];

/// The whole demo deployment.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    pub nodes: Vec<NodeSpec>,
    pub hosts: Vec<HostSpec>,
    /// The PostgreSQL pair, when the binaries are installed (`super::pg::bin_dir`).
    pub pg: Option<super::pg::PgLayout>,
}

impl Layout {
    /// Ports from `base_port` on, or free ports picked by the OS (bound to :0, then released:
    /// a tiny race with other programs, acceptable for a demo and reported clearly if lost).
    pub fn new(dir: &Path, base_port: Option<u16>) -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for (i, region) in REGIONS.iter().enumerate() {
            let port = match base_port {
                Some(p) => p.checked_add(i as u16).context("--base-port too high")?,
                None => free_port()?,
            };
            nodes.push(NodeSpec {
                node_id: i as u64 + 1,
                region,
                port,
            });
        }
        let pg = match super::pg::bin_dir() {
            None => None,
            Some(bin_dir) => {
                let server = |host_id: &'static str, i: u16| -> anyhow::Result<_> {
                    let port = match base_port {
                        Some(p) => p.checked_add(10 + i).context("--base-port too high")?,
                        None => free_port()?,
                    };
                    Ok(super::pg::PgServer {
                        host_id,
                        port,
                        dir: dir.join("pg").join(host_id),
                    })
                };
                Some(super::pg::PgLayout {
                    primary: server("bj-db-1", 0)?,
                    replica: server("sh-db-1", 1)?,
                    bin_dir,
                })
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            nodes,
            hosts: HOSTS.to_vec(),
            pg,
        })
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }
    pub fn config_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.toml"))
    }
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs_dir().join(format!("{name}.log"))
    }
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(NodeSpec::endpoint).collect()
    }
    pub fn node(&self, node_id: u64) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.node_id == node_id)
    }

    pub fn client_config(&self) -> ClientConfig {
        let tls = self.tls_dir();
        ClientConfig {
            endpoints: self.endpoints(),
            tls: dr_proto::tls::TlsPaths {
                ca: tls.join(cert::CA_CERT_FILE),
                cert: tls.join(format!("operator-{OPERATOR}.pem")),
                key: tls.join(format!("operator-{OPERATOR}.key")),
                reload_interval: None,
            },
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        }
    }

    /// Writes certificates, configs and README.txt.
    pub fn write(&self) -> anyhow::Result<()> {
        for d in [
            self.dir.clone(),
            self.tls_dir(),
            self.logs_dir(),
            self.dir.join("data"),
        ] {
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        }
        let tls = self.tls_dir();
        cert::init_ca(TRUST_DOMAIN, &tls, true).context("create the demo CA")?;
        for n in &self.nodes {
            cert::issue(&IssueRequest::new(
                &tls,
                Kind::Coordinator,
                &n.node_id.to_string(),
            ))?;
            self.write_file(&n.name(), &self.coordinator_toml(n))?;
        }
        for h in &self.hosts {
            cert::issue(&IssueRequest::new(&tls, Kind::Agent, h.host_id))?;
            self.write_file(&h.name(), &self.agent_toml(h))?;
        }
        let mut op = IssueRequest::new(&tls, Kind::Operator, OPERATOR);
        op.role = Some("admin".into());
        cert::issue(&op)?;
        self.write_file("drctl", &self.drctl_toml())?;
        let readme = self.readme();
        std::fs::write(self.dir.join("README.txt"), readme).context("write README.txt")?;
        Ok(())
    }

    fn write_file(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let p = self.config_path(name);
        std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))
    }

    fn tls_table(&self, name: &str) -> String {
        let tls = self.tls_dir();
        format!(
            "[tls]\nca = {}\ncert = {}\nkey = {}\nreload_interval = \"5s\"\n",
            q(&tls.join(cert::CA_CERT_FILE)),
            q(&tls.join(format!("{name}.pem"))),
            q(&tls.join(format!("{name}.key"))),
        )
    }

    pub fn coordinator_toml(&self, n: &NodeSpec) -> String {
        let mut s = String::new();
        wl!(
            s,
            "# dr-coordinator {} of the drctl demo (format: deploy/examples/coordinator.toml)",
            n.node_id
        );
        wl!(
            s,
            "version = 1\nnode_id = {}\nregion = \"{}\"",
            n.node_id,
            n.region
        );
        wl!(
            s,
            "listen = \"{}\"\nadvertise = \"{}\"",
            n.endpoint(),
            n.endpoint()
        );
        wl!(
            s,
            "data_dir = {}\nlog_format = \"text\"\n",
            q(&self.dir.join("data").join(n.name()))
        );
        for p in self.nodes.iter().filter(|p| p.node_id != n.node_id) {
            wl!(
                s,
                "[[peers]]\nnode_id = {}\naddr = \"{}\"\nregion = \"{}\"\n",
                p.node_id,
                p.endpoint(),
                p.region
            );
        }
        s.push_str(&self.tls_table(&n.name()));
        // A local demo has no WAN: shorter timers make the failover quick to watch.
        s.push_str(
            "\n[raft]\nheartbeat_interval = \"100ms\"\nelection_timeout_min = \"400ms\"\n\
             election_timeout_max = \"800ms\"\nsnapshot_every = 5000\n\n\
             [agents]\nheartbeat_interval = \"500ms\"\ndown_after = \"3s\"\ncommand_timeout = \"10m\"\n",
        );
        s
    }

    pub fn agent_toml(&self, h: &HostSpec) -> String {
        // The agent's own region's coordinator first: it dials that one first.
        let mut coords: Vec<&NodeSpec> = self.nodes.iter().collect();
        coords.sort_by_key(|n| n.region != h.region);
        let coords: Vec<String> = coords
            .iter()
            .map(|n| format!("\"{}\"", n.endpoint()))
            .collect();
        let roles: Vec<String> = h.roles.iter().map(|r| format!("\"{r}\"")).collect();
        let home = &self
            .nodes
            .iter()
            .find(|n| n.region == h.region)
            .unwrap_or(&self.nodes[0]);
        let mut s = String::new();
        wl!(
            s,
            "# dr-agent {} of the drctl demo (format: deploy/examples/agent.toml)",
            h.host_id
        );
        wl!(
            s,
            "version = 1\nhost_id = \"{}\"\nregion = \"{}\"\nsite = \"{}\"",
            h.host_id,
            h.region,
            h.site
        );
        wl!(
            s,
            "roles = [{}]\ncoordinators = [{}]",
            roles.join(", "),
            coords.join(", ")
        );
        wl!(
            s,
            "data_dir = {}\nlog_format = \"text\"\n",
            q(&self.dir.join("data").join(h.name()))
        );
        s.push_str(&self.tls_table(&h.name()));
        s.push_str("\n[session]\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nconnect_timeout = \"1s\"\n");
        wl!(
            s,
            "\n[[checks]]\nname = \"coordinator-port\"\nkind = \"tcp\"\nservice = \"dr\"\ntier = \"critical\"\n\
             interval = \"1s\"\ntimeout = \"1s\"\naddr = \"{}\"",
            home.endpoint()
        );
        wl!(
            s,
            "\n[[checks]]\nname = \"demo-disk\"\nkind = \"disk\"\nservice = \"dr\"\ntier = \"important\"\n\
             interval = \"5s\"\ntimeout = \"1s\"\npath = {}\nmin_free_percent = 1.0",
            q(&self.dir)
        );
        s.push_str(
            "\n[[checks]]\nname = \"always-true\"\nkind = \"command\"\nservice = \"dr\"\ntier = \"non-critical\"\n\
             interval = \"5s\"\ntimeout = \"2s\"\ncommand = [\"true\"]\n",
        );
        wl!(
            s,
            "\n[[actions]]\nname = \"hello\"\ncommand = [\"echo\", \"hello from {}\"]\ntimeout = \"10s\"",
            h.host_id
        );
        // Maintenance hooks that only say so: the switchover turns maintenance on and off in
        // the regions it moves between.
        s.push_str("\n[maintenance]\non = [[\"true\"]]\noff = [[\"true\"]]\n");
        if let Some(pg) = &self.pg
            && let Some(server) = pg.server(h.host_id)
        {
            s.push_str(&server.agent_toml(&pg.bin_dir));
        }
        s
    }

    pub fn drctl_toml(&self) -> String {
        self.drctl_toml_with(&self.endpoints())
    }

    /// drctl's config with only these coordinators (an operator outside a cut-off region).
    pub fn drctl_toml_with(&self, endpoints: &[String]) -> String {
        let tls = self.tls_dir();
        let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        format!(
            "# drctl configuration for the demo (format: deploy/examples/drctl.toml)\n\
             endpoints = [{}]\ntimeout = \"5s\"\n\n[tls]\nca = {}\ncert = {}\nkey = {}\n",
            eps.join(", "),
            q(&tls.join(cert::CA_CERT_FILE)),
            q(&tls.join(format!("operator-{OPERATOR}.pem"))),
            q(&tls.join(format!("operator-{OPERATOR}.key"))),
        )
    }

    pub fn init_members(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("{}={}@{}", n.node_id, n.endpoint(), n.region))
            .collect()
    }

    pub fn readme(&self) -> String {
        let d = self.dir.display();
        let mut s = format!(
            "YesLocker DR demo cluster in {d}\n\n\
             tls/      CA (trust domain {TRUST_DOMAIN}) and one certificate per process\n\
             *.toml    one config per process; drctl.toml for the operator CLI\n\
             logs/     one log per process; data/ their data directories\n\n\
             To start the same cluster by hand (binaries from `cargo build --workspace`, in target/debug/),\n\
             each in its own terminal:\n\n"
        );
        for n in &self.nodes {
            wl!(
                s,
                "  dr-coordinator --config {}",
                self.config_path(&n.name()).display()
            );
        }
        let members: Vec<String> = self
            .init_members()
            .iter()
            .map(|m| format!("--member {m}"))
            .collect();
        wl!(
            s,
            "\nthen, once, initialise the Raft cluster:\n\n  drctl --config {d}/drctl.toml cluster init {}\n",
            members.join(" ")
        );
        s.push_str("then start the agents:\n\n");
        for h in &self.hosts {
            wl!(
                s,
                "  dr-agent --config {}",
                self.config_path(&h.name()).display()
            );
        }
        wl!(
            s,
            "\nand look around:\n\n  export DRCTL_CONFIG={d}/drctl.toml\n  drctl status\n  drctl cluster status\n  \
             drctl agents list\n  drctl run checks\n  drctl run --region beijing exec hello\n"
        );
        s.push_str("Data directories keep Raft state: delete data/ before `cluster init` on a fresh start.\n");
        s
    }
}

/// A TOML basic string for a path.
fn q(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .context("bind 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr().context("read the bound port")?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path(), Some(17001)).unwrap();
        layout.write().unwrap();
        assert_eq!(
            layout.endpoints(),
            vec!["127.0.0.1:17001", "127.0.0.1:17002", "127.0.0.1:17003"]
        );
        // drctl.toml is our own format: it must load through the real config path.
        let cfg = crate::config::FileConfig::load(&layout.config_path("drctl")).unwrap();
        assert_eq!(cfg.endpoints.len(), 3);
        // Coordinator and agent configs are at least valid TOML with the example's keys.
        let c: toml::Table =
            toml::from_str(&std::fs::read_to_string(layout.config_path("coordinator-2")).unwrap())
                .unwrap();
        assert_eq!(c["region"].as_str(), Some("shanghai"));
        assert_eq!(c["peers"].as_array().unwrap().len(), 2);
        let a: toml::Table = toml::from_str(
            &std::fs::read_to_string(layout.config_path("agent-site-gw-001")).unwrap(),
        )
        .unwrap();
        assert_eq!(a["site"].as_str(), Some("locker-site-001"));
        assert_eq!(a["checks"].as_array().unwrap().len(), 3);
        for name in ["coordinator-3", "agent-bj-db-1", "operator-demo-admin"] {
            crate::cmd::cert::show(&layout.tls_dir().join(format!("{name}.pem"))).unwrap();
        }
        let readme = std::fs::read_to_string(dir.path().join("README.txt")).unwrap();
        assert!(
            readme.contains("--member 3=127.0.0.1:17003@witness"),
            "{readme}"
        );
    }
}
