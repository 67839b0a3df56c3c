//! The isolation ruleset, rendered as one `nft -f` script. Pure (no I/O) so the exact rules
//! are unit-tested.
//!
//! Why one table at priority -190: the operator's own rules stay loaded and untouched while
//! the host is isolated; our base chains simply see every packet first. -190 is after
//! conntrack (-200, so `ct state` is known in the output hook too) and before mangle (-150)
//! and filter (0). A `drop` in any base chain is final, so our `policy drop` wins, and an
//! `accept` here still leaves the operator's chains free to drop (isolation never opens
//! anything that was closed).
//!
//! The script replaces the table atomically (`add`, `delete`, define, in one transaction),
//! so isolating twice never leaves a moment without rules.

use std::fmt;
use std::net::IpAddr;

/// The table holding every isolation rule.
pub const TABLE: &str = "dr_isolation";
/// Base chain priority, see the module docs.
pub const PRIORITY: i32 = -190;

/// One coordinator endpoint the agent's session dials (resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// A management source kept reachable while isolated: `10.0.0.5/32:22`, `10.0.0.0/24`
/// (all ports), `[fd00::1]/128:22`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowRule {
    /// Network address (host bits cleared).
    pub net: IpAddr,
    pub prefix: u8,
    /// Local TCP port the source may reach; `None` means every port and protocol.
    pub port: Option<u16>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{input:?} is not an allowed source ({reason}); write ADDR[/PREFIX][:PORT], e.g. \"10.0.0.5/32:22\" or \"[fd00::1]/128:22\""
)]
pub struct AllowRuleError {
    input: String,
    reason: &'static str,
}

impl AllowRule {
    pub fn parse(s: &str) -> Result<AllowRule, AllowRuleError> {
        let err = |reason| AllowRuleError {
            input: s.to_string(),
            reason,
        };
        let s = s.trim();
        // Split off the port: after `]` for IPv6, after the only `:` for IPv4.
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (addr, tail) = rest.split_once(']').ok_or_else(|| err("missing `]`"))?;
            let (prefix, port) = match tail.split_once(':') {
                Some((p, port)) => (p, Some(port)),
                None => (tail, None),
            };
            (format!("{addr}{prefix}"), port)
        } else if s.matches(':').count() == 1 {
            let (a, p) = s.split_once(':').ok_or_else(|| err("bad port"))?;
            (a.to_string(), Some(p))
        } else {
            (s.to_string(), None)
        };
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| err("port is not a number from 1 to 65535"))?,
            ),
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (net.as_str(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| err("prefix length out of range"))?,
        };
        Ok(AllowRule {
            net: mask(addr, prefix),
            prefix,
            port,
        })
    }

    fn family(&self) -> &'static str {
        if self.net.is_ipv4() { "ip" } else { "ip6" }
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.net, self.port) {
            (IpAddr::V4(a), Some(p)) => write!(f, "{a}/{}:{p}", self.prefix),
            (IpAddr::V4(a), None) => write!(f, "{a}/{}", self.prefix),
            (IpAddr::V6(a), Some(p)) => write!(f, "[{a}]/{}:{p}", self.prefix),
            (IpAddr::V6(a), None) => write!(f, "{a}/{}", self.prefix),
        }
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

fn family_of(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "ip" } else { "ip6" }
}

/// The `nft -f` script that (re)installs the isolation table.
pub fn render(coordinators: &[Endpoint], allow: &[AllowRule]) -> String {
    let mut input = vec!["iif \"lo\" accept".to_string()];
    let mut output = vec!["oif \"lo\" accept".to_string()];
    // IPv6 neighbour discovery: without it no IPv6 peer (coordinator included) stays
    // reachable. ARP is not in the inet family and is not filtered.
    let nd = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept";
    input.push(nd.to_string());
    output.push(nd.to_string());
    for c in coordinators {
        let fam = family_of(c.addr);
        // The agent dials out: new flows only outward, answers only for those flows.
        output.push(format!(
            "{fam} daddr {} tcp dport {} accept",
            c.addr, c.port
        ));
        input.push(format!(
            "ct state established,related {fam} saddr {} tcp sport {} accept",
            c.addr, c.port
        ));
    }
    for a in allow {
        let fam = a.family();
        let net = format!("{}/{}", a.net, a.prefix);
        match a.port {
            Some(p) => {
                input.push(format!("{fam} saddr {net} tcp dport {p} accept"));
                output.push(format!(
                    "ct state established,related {fam} daddr {net} tcp sport {p} accept"
                ));
            }
            None => {
                input.push(format!("{fam} saddr {net} accept"));
                output.push(format!(
                    "ct state established,related {fam} daddr {net} accept"
                ));
            }
        }
    }
    let chain = |name: &str, hook: &str, rules: &[String]| {
        let mut s = format!(
            "\tchain {name} {{\n\t\ttype filter hook {hook} priority {PRIORITY}; policy drop;\n"
        );
        for r in rules {
            s.push_str("\t\t");
            s.push_str(r);
            s.push('\n');
        }
        s.push_str("\t}\n");
        s
    };
    format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{}{}{}}}\n",
        chain("input", "input", &input),
        chain("output", "output", &output),
        chain("forward", "forward", &[]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_allow_rules() {
        let r = AllowRule::parse("10.0.0.5/32:22").unwrap();
        assert_eq!(r.to_string(), "10.0.0.5/32:22");
        assert_eq!(
            AllowRule::parse("10.1.2.3/24").unwrap().to_string(),
            "10.1.2.0/24"
        );
        assert_eq!(
            AllowRule::parse("10.0.0.5:2222").unwrap().to_string(),
            "10.0.0.5/32:2222"
        );
        assert_eq!(
            AllowRule::parse("[fd00::1]/64:22").unwrap().to_string(),
            "[fd00::]/64:22"
        );
        assert_eq!(
            AllowRule::parse("fd00::1").unwrap().to_string(),
            "fd00::1/128"
        );
        for bad in [
            "10.0.0.5/33",
            "10.0.0.5:0",
            "host:22",
            "10.0.0.5:ssh",
            "[fd00::1",
        ] {
            assert!(AllowRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renders_coordinator_and_allowed_flows() {
        let script = render(
            &[Endpoint {
                addr: "10.203.0.2".parse().unwrap(),
                port: 7443,
            }],
            &[AllowRule::parse("10.0.0.5/32:22").unwrap()],
        );
        assert!(script.starts_with(
            "add table inet dr_isolation\ndelete table inet dr_isolation\ntable inet dr_isolation {\n"
        ));
        assert!(script.contains("\t\tip daddr 10.203.0.2 tcp dport 7443 accept\n"));
        assert!(script.contains(
            "\t\tct state established,related ip saddr 10.203.0.2 tcp sport 7443 accept\n"
        ));
        assert!(script.contains("\t\tip saddr 10.0.0.5/32 tcp dport 22 accept\n"));
        assert!(script.contains("type filter hook forward priority -190; policy drop;"));
        assert_eq!(script.matches("policy drop").count(), 3);
    }
}
