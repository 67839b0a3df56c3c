//! Free TCP ports on 127.0.0.1 for the processes a test starts.
//!
//! Ports are drawn at random from 15000..32000, below Linux's ephemeral range
//! (32768..60999), so the outgoing connections of other tests cannot grab a port between
//! the moment we pick it and the moment a child binds it. Each candidate is test-bound
//! first and never handed out twice by this process. Two test processes picking the same
//! port is possible but rare (two draws among 17 000); where the harness itself listens
//! (the fault proxies) it keeps the bound listener, which has no such window.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

use anyhow::{Result, bail};
use rand::Rng;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

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
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
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

    #[test]
    fn ports_are_distinct_and_bindable() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
        TcpListener::bind(("127.0.0.1", a)).unwrap();
    }
}
