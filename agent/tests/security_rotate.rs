//! `rotate-credentials` against a real PostgreSQL 15 (run as the `postgres` OS user) and a
//! real CA: the old password stops working, the new one works, readers never see a torn
//! secret file, reload commands run, and nothing the test captured (results, every tracing
//! line at TRACE, the server's `log_statement = 'all'` log) contains a password or key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(clippy::let_underscore_must_use)]
#[path = "backup_support/mod.rs"]
mod backup_support;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use backup_support::{Pg, free_port, test_dir};
use dr_agent::actions::{ActionCtx, ActionOutput, Progress, Registry};
use dr_agent::config::Config;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio_util::sync::CancellationToken;

/// Every tracing line of this test binary, at TRACE.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(sub).unwrap();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);
impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn ctx() -> ActionCtx {
    ActionCtx {
        key: "t".into(),
        cancel: CancellationToken::new(),
        progress: Progress::new("t", None),
    }
}

fn as_json(out: &ActionOutput) -> String {
    serde_json::json!({"success": out.success, "message": out.message, "details": out.details})
        .to_string()
}

fn args(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn login(port: u16, user: &str, pw: &str) -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect(&format!("postgres://{user}:{pw}@127.0.0.1:{port}/postgres")).await
}

const OLD: &str = "old-Pa55word-before-the-breach";

#[tokio::test]
async fn t10_rotate_db_and_app_secrets() {
    let logs = captured_logs();
    let dir = test_dir();
    let port = free_port();
    let pg = Pg::init(
        &dir.path().join("pg"),
        port,
        "password_encryption = 'scram-sha-256'\nlog_statement = 'all'\n",
    );
    std::fs::write(
        dir.path().join("pg/pg_hba.conf"),
        "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    pg.start();
    // Statement logging off: sqlx would otherwise log this very statement, password and
    // all, at DEBUG (the trap the agent's own connections avoid the same way).
    let admin_opts: sqlx::postgres::PgConnectOptions = pg.url().parse().unwrap();
    let mut admin = PgConnection::connect_with(&admin_opts.disable_statement_logging())
        .await
        .unwrap();
    sqlx::query(&format!("create role app login password '{OLD}'"))
        .execute(&mut admin)
        .await
        .unwrap();

    // --- secret files as the application has them
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let plain = secrets.join("db-password");
    let envf = secrets.join("app.env");
    let session_key = secrets.join("session.key");
    let marker = secrets.join("reloads");
    std::fs::write(&plain, format!("{OLD}\n")).unwrap();
    std::fs::write(&envf, format!("A=1\nDB_PASSWORD=\"{OLD}\"\nB=2\n")).unwrap();
    std::fs::write(&session_key, "old-session-key").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o640)).unwrap();

    let text = format!(
        r#"version = 1
host_id = "h1"
region = "r"
site = "s"
coordinators = ["127.0.0.1:1"]
data_dir = "{d}/data"
[tls]
ca = "ca.pem"
cert = "c.pem"
key = "k.pem"
[rotation]
db_admin_url = "{url}"
timeout = "20s"
[[rotation.roles]]
name = "app"
files = [{{ path = "{plain}" }}, {{ path = "{envf}", format = "env", key = "DB_PASSWORD" }}]
reload = [{{ command = ["/bin/sh", "-c", "echo app >> {marker}"] }}]
[[rotation.app_secrets]]
name = "session-key"
files = [{{ path = "{sk}" }}]
reload = [{{ command = ["/bin/sh", "-c", "echo session >> {marker}"] }}]
"#,
        d = dir.path().display(),
        url = pg.url(),
        plain = plain.display(),
        envf = envf.display(),
        marker = marker.display(),
        sk = session_key.display(),
    );
    let config = Arc::new(Config::parse(&text, &dir.path().join("agent.toml")).unwrap());
    let mut reg = Registry::default();
    dr_agent::rotate::register(&mut reg, &config);

    // An attacker's session opened with the old password.
    let mut intruder = login(port, "app", OLD)
        .await
        .expect("old password works before");

    // --- readers never see a torn file
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, plain, envf) = (stop.clone(), plain.clone(), envf.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = std::fs::read_to_string(&plain).unwrap();
                let secret = p.strip_suffix('\n').expect("plain file keeps its newline");
                assert!(
                    secret == OLD
                        || (secret.len() == 40
                            && secret.chars().all(|c| c.is_ascii_alphanumeric())),
                    "torn plain secret file"
                );
                let e = std::fs::read_to_string(&envf).unwrap();
                let lines: Vec<&str> = e.lines().collect();
                assert_eq!(lines.len(), 3, "torn env file");
                assert_eq!((lines[0], lines[2]), ("A=1", "B=2"));
                assert!(lines[1].starts_with("DB_PASSWORD=\"") && lines[1].ends_with('"'));
                reads += 1;
            }
            reads
        })
    };

    let mut captured = String::new();
    let new_pw;
    // --- rotate the database role
    {
        let out = reg
            .call("rotate-credentials", args(&[("scope", "db")]), ctx())
            .await;
        captured.push_str(&as_json(&out));
        assert!(out.success, "{out:?}");
        assert_eq!(out.details["roles"], "app");
        assert_eq!(
            out.details["proof"],
            "app: old_rejected=true new_accepted=true sessions_terminated=1"
        );
        assert!(
            out.details["files"].contains("db-password")
                && out.details["files"].contains("app.env")
        );
        new_pw = std::fs::read_to_string(&plain)
            .unwrap()
            .trim_end()
            .to_string();
        assert_eq!(new_pw.len(), 40);
        assert_ne!(new_pw, OLD);
        assert_eq!(
            std::fs::read_to_string(&envf).unwrap(),
            format!("A=1\nDB_PASSWORD=\"{new_pw}\"\nB=2\n")
        );
        assert_eq!(
            std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777,
            0o640,
            "mode kept"
        );
        // Independent proof, outside the agent's own.
        let err = login(port, "app", OLD)
            .await
            .expect_err("old password refused");
        assert!(
            err.to_string().contains("password authentication failed"),
            "{err}"
        );
        login(port, "app", &new_pw)
            .await
            .expect("new password works");
        assert!(
            sqlx::query("select 1")
                .execute(&mut intruder)
                .await
                .is_err(),
            "the old-password session was terminated"
        );
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap(),
            "app\n",
            "reload ran"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reader saw only whole files");
    assert!(reads > 0);

    // --- rotate the application secret
    {
        let out = reg
            .call("rotate-credentials", args(&[("scope", "app")]), ctx())
            .await;
        captured.push_str(&as_json(&out));
        assert!(out.success, "{out:?}");
        assert_eq!(out.details["app_secrets"], "session-key");
        let k = std::fs::read_to_string(&session_key).unwrap();
        assert_eq!(k.len(), 40);
        assert!(!captured.contains(&k));
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "app\nsession\n");
        let refused = reg
            .call("rotate-credentials", args(&[("scope", "certs")]), ctx())
            .await;
        assert!(
            !refused.success && refused.message.contains("cert-request"),
            "{refused:?}"
        );
        let bad = reg
            .call(
                "rotate-credentials",
                args(&[("scope", "db"), ("password", "x")]),
                ctx(),
            )
            .await;
        assert!(!bad.success && bad.message.contains("unknown argument"));
    }

    // --- nothing captured holds a password
    {
        let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        assert!(
            logs.contains("role password changed"),
            "tracing was captured"
        );
        let server_log = std::fs::read_to_string(&pg.log).unwrap();
        assert!(
            server_log.contains("ALTER ROLE"),
            "log_statement = all is on"
        );
        for (what, text) in [
            ("result", &captured),
            ("tracing", &logs),
            ("server log", &server_log),
        ] {
            assert!(!text.contains(&new_pw), "{what} holds the new password");
            if what != "server log" {
                let hits: Vec<&str> = text.lines().filter(|l| l.contains(OLD)).collect();
                assert!(hits.is_empty(), "{what} holds the old password: {hits:#?}");
            }
        }
    }
    drop(admin);
    pg.stop();
}

/// CA + an agent leaf for `spiffe://td/agent/<host>`.
fn leaf(ca: &rcgen::Issuer<'_, rcgen::KeyPair>, host: &str) -> (String, String) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://td/agent/{host}").try_into().unwrap(),
    )];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(p: &Path, s: &str) {
    std::fs::write(p, s).unwrap();
}

#[tokio::test]
async fn t20_rotate_certs() {
    let logs = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.subject_alt_names = vec![rcgen::SanType::URI("spiffe://td".try_into().unwrap())];
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca_pem = ca_cert.pem();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    write(&dir.path().join("ca.pem"), &ca_pem);
    let (old_cert, old_key) = leaf(&ca, "h1");
    write(&c, &old_cert);
    write(&k, &old_key);

    let text = "version = 1\nhost_id = \"h1\"\nregion = \"r\"\nsite = \"s\"\ncoordinators = [\"127.0.0.1:1\"]\ndata_dir = \"data\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
    let config = Arc::new(Config::parse(text, &dir.path().join("agent.toml")).unwrap());
    let mut reg = Registry::default();
    dr_agent::rotate::register(&mut reg, &config);
    let mut captured = String::new();

    // --- a key in a command is refused, whatever the verb
    for (verb, a) in [
        (
            "rotate-credentials",
            args(&[
                ("scope", "certs"),
                ("cert_pem", &old_cert),
                ("key_pem", &old_key),
            ]),
        ),
        (
            "cert-install",
            args(&[("cert_pem", &old_cert), ("key_pem", &old_key)]),
        ),
    ] {
        let out = reg.call(verb, a, ctx()).await;
        captured.push_str(&as_json(&out));
        assert!(
            !out.success && out.message.contains("never accepted in a command"),
            "{verb}: {out:?}"
        );
    }
    // --- install without a request
    let out = reg
        .call("cert-install", args(&[("cert_pem", &old_cert)]), ctx())
        .await;
    assert!(
        !out.success && out.message.contains("no pending certificate request"),
        "{out:?}"
    );

    // --- step 1: the agent makes the key and a CSR
    let out = reg.call("cert-request", args(&[]), ctx()).await;
    captured.push_str(&as_json(&out));
    assert!(out.success, "{out:?}");
    assert_eq!(out.details["identity"], "spiffe://td/agent/h1");
    let old_der = rustls_pki_types::pem::PemObject::from_pem_slice(old_cert.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    assert_eq!(
        out.details["old_cert_sha256"],
        dr_proto::tls::cert_sha256_hex(&old_der)
    );
    let csr_pem = out.details["csr_pem"].clone();
    assert!(csr_pem.contains("BEGIN CERTIFICATE REQUEST"));
    let pending = dir.path().join("data/rotation/pending-key.pem");
    let pending_key = std::fs::read_to_string(&pending).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&pending).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let csr = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
    assert!(
        csr.params.subject_alt_names.contains(&rcgen::SanType::URI(
            "spiffe://td/agent/h1".try_into().unwrap()
        )),
        "the CSR keeps the identity"
    );

    // --- refusals leave the files alone
    let (wrong_key_cert, _) = leaf(&ca, "h1");
    let (other_cert, other_key) = leaf(&ca, "h2");
    for (cert, why) in [
        (&wrong_key_cert, "does not match"),
        (&other_cert, "does not match"),
    ] {
        let out = reg
            .call("cert-install", args(&[("cert_pem", cert)]), ctx())
            .await;
        captured.push_str(&as_json(&out));
        assert!(!out.success && out.message.contains(why), "{out:?}");
        assert_eq!(std::fs::read_to_string(&c).unwrap(), old_cert);
        assert_eq!(std::fs::read_to_string(&k).unwrap(), old_key);
    }
    // The CSR signed by another CA.
    {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let rogue = rcgen::Issuer::new(p, rcgen::KeyPair::generate().unwrap());
        let rc = csr.signed_by(&rogue).unwrap().pem();
        let out = reg
            .call("cert-install", args(&[("cert_pem", &rc)]), ctx())
            .await;
        captured.push_str(&as_json(&out));
        assert!(
            !out.success && out.message.contains("does not chain"),
            "{out:?}"
        );
    }
    // --- step 2: the real installation
    let new_cert = csr.signed_by(&ca).unwrap().pem();
    let out = reg
        .call("cert-install", args(&[("cert_pem", &new_cert)]), ctx())
        .await;
    captured.push_str(&as_json(&out));
    assert!(out.success, "{out:?}");
    assert_eq!(out.details["identity"], "spiffe://td/agent/h1");
    assert_eq!(
        out.details["replaced_cert_sha256"],
        dr_proto::tls::cert_sha256_hex(&old_der)
    );
    assert_eq!(std::fs::read_to_string(&c).unwrap(), new_cert);
    let new_key = std::fs::read_to_string(&k).unwrap();
    assert_eq!(
        new_key, pending_key,
        "the agent-made key is the one installed"
    );
    assert!(!pending.exists(), "the pending key is gone");
    // The TLS layer loads the new pair.
    dr_proto::tls::ClientTls::load(&config.tls).expect("new pair loads");

    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    for key in [&old_key, &new_key, &other_key] {
        let body = key.lines().nth(1).unwrap();
        assert!(
            !captured.contains(body) && !logs.contains(body),
            "a key leaked"
        );
    }
}
