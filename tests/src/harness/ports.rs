//! Free TCP ports on 127.0.0.1 for the processes a test starts.
//!
//! Ports are drawn at random from 15000..32000, below Linux's ephemeral range
//! (32768..60999), so the outgoing connections of other tests cannot grab a port between
//! the moment we pick it and the moment a child binds it. Each candidate is test-bound
//! first and never handed out twice by this process. Across test processes (nextest runs
//! each test in its own), a port is claimed with an `flock` on `<tmp>/dr-test-ports/<port>`
//! held until this process exits: without it, a port whose process a test had killed to
//! restart it could be drawn by a test running beside it, and the restart failed with
//! "address already in use" (seen once in CI: a coordinator's metrics port). Where the
//! harness itself listens (the fault proxies) it keeps the bound listener as well.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

use anyhow::{Result, bail};
use rand::Rng;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
/// The port claims of this process (see the module docs), released when it exits.
static CLAIMS: Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> = Mutex::new(Vec::new());

/// Claims `port` for this process against every other test process on the machine. False
/// when another one holds it. Best effort when the claim directory cannot be used: the bind
/// check alone decides then.
fn claim(port: u16) -> bool {
    let dir = std::env::temp_dir().join("dr-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
    else {
        return true;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            CLAIMS.lock().unwrap_or_else(|p| p.into_inner()).push(lock);
            true
        }
        Err(_) => false,
    }
}

/// A port on 127.0.0.1 that was free a moment ago and that this process never handed out.
pub fn free_port() -> Result<u16> {
    let mut rng = rand::rng();
    for _ in 0..500 {
        let port: u16 = rng.random_range(15000..32000);
        {
            let mut guard = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
            let set = guard.get_or_insert_with(HashSet::new);
            if set.contains(&port) {
                continue;
            }
            if TcpListener::bind(("127.0.0.1", port)).is_err() || !claim(port) {
                continue;
            }
            set.insert(port);
        }
        return Ok(port);
    }
    bail!("no free TCP port on 127.0.0.1 in 15000..32000 after 500 tries")
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// A port on 127.0.0.1 on which nothing listens (for "unreachable coordinator" tests).
pub fn closed_addr() -> Result<SocketAddr> {
    free_addr()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port claimed by this process cannot be claimed again through another open file
    /// description (which is what another test process would have).
    #[test]
    fn a_claimed_port_is_refused_to_other_claimants() {
        let p = free_port().unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(
                std::env::temp_dir()
                    .join("dr-test-ports")
                    .join(p.to_string()),
            )
            .unwrap();
        assert!(
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err(),
            "port {p} must stay claimed while this process runs"
        );
    }

    #[test]
    fn ports_are_distinct_and_bindable() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
        TcpListener::bind(("127.0.0.1", a)).unwrap();
    }
}
