//! `kind = "postgres"` (and the `sql` smoke test): connect, run the query, compare the first
//! column of the first row, as text, with `expect` (psql's rendering: booleans are `t`/`f`).
//!
//! The connection is kept between runs (a monitor that reconnects every second shows up in
//! `pg_stat_activity` churn and costs a backend fork each time); it is taken out of the state
//! while in use and dropped on any error, so a timed-out run never leaves a connection in an
//! unknown state. The URL may hold a password: it never appears in a detail or a log line.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sqlx::{Column, ConnectOptions, Connection, Row, TypeInfo};

use super::Outcome;

pub struct PgState {
    url: String,
    query: String,
    expect: Option<String>,
    conn: Option<PgConnection>,
}

impl PgState {
    pub fn new(url: &str, query: &str, expect: Option<&str>) -> Self {
        Self {
            url: url.to_string(),
            query: query.to_string(),
            expect: expect.map(str::to_string),
            conn: None,
        }
    }

    pub async fn probe(&mut self) -> Outcome {
        match self.exchange().await {
            Ok(got) => match &self.expect {
                Some(want) if *want != got => {
                    Outcome::Fail(format!("query returned {got:?}, expected {want:?}"))
                }
                _ => Outcome::Pass(format!("query returned {got:?}")),
            },
            Err(e) => Outcome::Fail(self.scrub(e)),
        }
    }

    async fn exchange(&mut self) -> Result<String, String> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let opts = PgConnectOptions::from_str(&self.url)
                    .map_err(|e| format!("invalid postgres url: {e}"))?
                    .application_name("dr-agent")
                    .disable_statement_logging();
                opts.connect()
                    .await
                    .map_err(|e| format!("cannot connect: {e}"))?
            }
        };
        // Unnamed statement: no prepared statement is left behind on the server.
        let row: Option<PgRow> = sqlx::query(&self.query)
            .persistent(false)
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| format!("query failed: {e}"))?;
        let text = match row {
            Some(row) => first_column_text(&row)?,
            None => String::new(),
        };
        self.conn = Some(conn);
        Ok(text)
    }

    fn scrub(&self, msg: String) -> String {
        scrub_password(&self.url, msg)
    }

    /// Closes the kept connection politely (at shutdown).
    pub async fn close(&mut self) {
        if let Some(c) = self.conn.take() {
            let _ignored = c.close().await;
        }
    }
}

/// Removes `url`'s password from a message, whatever the driver put in it.
pub fn scrub_password(url: &str, msg: String) -> String {
    match PgConnectOptions::from_str(url)
        .ok()
        .and_then(|_| password_of(url))
    {
        Some(pw) if !pw.is_empty() => msg.replace(&pw, "***"),
        _ => msg,
    }
}

fn password_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    Some(userinfo.split_once(':')?.1.to_string())
}

fn first_column_text(row: &PgRow) -> Result<String, String> {
    if row.columns().is_empty() {
        return Ok(String::new());
    }
    let ty = row.column(0).type_info().name().to_string();
    let text = match ty.as_str() {
        "BOOL" => row
            .try_get::<Option<bool>, _>(0)
            .map(|v| v.map(|b| if b { "t" } else { "f" }.to_string())),
        "INT2" => row
            .try_get::<Option<i16>, _>(0)
            .map(|v| v.map(|n| n.to_string())),
        "INT4" => row
            .try_get::<Option<i32>, _>(0)
            .map(|v| v.map(|n| n.to_string())),
        "INT8" => row
            .try_get::<Option<i64>, _>(0)
            .map(|v| v.map(|n| n.to_string())),
        "FLOAT4" => row
            .try_get::<Option<f32>, _>(0)
            .map(|v| v.map(|n| n.to_string())),
        "FLOAT8" => row
            .try_get::<Option<f64>, _>(0)
            .map(|v| v.map(|n| n.to_string())),
        _ => row.try_get::<Option<String>, _>(0),
    };
    match text {
        Ok(v) => Ok(v.unwrap_or_default()),
        Err(_) => Err(format!(
            "first column has type {ty}; cast it to text in the query (e.g. `::text`)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_password() {
        assert_eq!(
            password_of("postgres://u:s3cret@h/db").as_deref(),
            Some("s3cret")
        );
        assert_eq!(password_of("postgres://u@h/db"), None);
    }

    #[tokio::test]
    async fn unreachable_server_fails_without_leaking_the_password() {
        let mut st = PgState::new(
            "postgres://mon:s3cret@127.0.0.1:1/db",
            "select 1",
            Some("1"),
        );
        match st.probe().await {
            Outcome::Fail(d) => assert!(!d.contains("s3cret"), "{d}"),
            other => panic!("{other:?}"),
        }
    }

    /// Stops the postmaster by PID when the test ends, also on failure.
    struct Postmaster(std::process::Child);
    impl Drop for Postmaster {
        fn drop(&mut self) {
            if let Ok(pid) = i32::try_from(self.0.id()) {
                // SIGINT: fast shutdown.
                let _ignored = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGINT,
                );
            }
            let _ignored = self.0.wait();
        }
    }

    /// Against a real PostgreSQL 15 (initdb in a temp dir, free port); skipped when the
    /// binaries are not installed, or when running as root without a `postgres` user.
    #[tokio::test]
    async fn real_postgres_query_and_expect() {
        use std::os::unix::process::CommandExt;
        let bin = std::path::Path::new("/usr/lib/postgresql/15/bin");
        if std::fs::metadata(bin.join("initdb")).is_err() {
            eprintln!("skipped: no PostgreSQL 15 binaries");
            return;
        }
        let user = if nix::unistd::geteuid().is_root() {
            match nix::unistd::User::from_name("postgres") {
                Ok(Some(u)) => Some((u.uid, u.gid)),
                _ => {
                    eprintln!("skipped: running as root without a postgres user");
                    return;
                }
            }
        } else {
            None
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if let Some((uid, gid)) = user {
            nix::unistd::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let as_user = |c: &mut std::process::Command| {
            if let Some((uid, gid)) = user {
                c.uid(uid.as_raw()).gid(gid.as_raw());
            }
        };
        let mut initdb = std::process::Command::new(bin.join("initdb"));
        initdb.args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "dr_monitor",
            "--auth=trust",
            "-E",
            "UTF8",
        ]);
        initdb
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        as_user(&mut initdb);
        assert!(initdb.status().unwrap().success(), "initdb failed");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut pg = std::process::Command::new(bin.join("postgres"));
        pg.args([
            "-D",
            data.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
        ]);
        pg.args(["-k", dir.path().to_str().unwrap()]);
        pg.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        as_user(&mut pg);
        let _guard = Postmaster(pg.spawn().unwrap());

        let url = format!("postgres://dr_monitor@127.0.0.1:{port}/postgres?sslmode=disable");
        let mut st = PgState::new(&url, "select 1", Some("1"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match st.probe().await {
                Outcome::Pass(_) => break,
                other => assert!(
                    std::time::Instant::now() < deadline,
                    "postgres never answered: {other:?}"
                ),
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // The connection is kept and reused.
        assert!(st.conn.is_some());
        assert!(matches!(st.probe().await, Outcome::Pass(_)));
        let mut b = PgState::new(&url, "select 1 > 2", Some("t"));
        assert!(matches!(b.probe().await, Outcome::Fail(d) if d.contains("\"f\"")));
        let mut t = PgState::new(&url, "select current_user", Some("dr_monitor"));
        assert!(matches!(t.probe().await, Outcome::Pass(_)));
        st.close().await;
    }
}
