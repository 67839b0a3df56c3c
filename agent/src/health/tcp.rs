//! `kind = "tcp"`: can a TCP connection to `addr` be opened? The cheapest liveness signal for
//! a port (PostgreSQL, the API); the connection is closed right away.

use super::Outcome;

pub async fn probe(addr: &str) -> Outcome {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(_stream) => Outcome::Pass(format!("connected to {addr}")),
        Err(e) => Outcome::Fail(format!("cannot connect to {addr}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_against_a_listener_and_fails_without() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        assert!(matches!(probe(&addr).await, Outcome::Pass(_)));
        drop(listener);
        assert!(matches!(probe(&addr).await, Outcome::Fail(_)));
    }
}
