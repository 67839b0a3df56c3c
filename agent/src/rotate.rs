//! Emergency credential rotation (DRP scenario 3, `rotate-credentials --emergency`): verb
//! `rotate-credentials` with `scope=db|app|certs|all`.
//!
//! Why on the agent: the secrets live on the host (PostgreSQL roles, the application's secret
//! files, the agent's own TLS key), so only the agent can replace them and prove the result.
//! For each `[rotation]` target:
//!
//! ```text
//!  db:    read old secret from its file ─> new random secret (40 chars, CSPRNG)
//!         ─> ALTER ROLE "r" PASSWORD '<SCRAM-SHA-256 verifier>' ─> terminate r's sessions
//!         ─> write every secret file atomically ─> reload consumers
//!         ─> PROVE: login with the old password fails, with the new one succeeds
//!  app:   new random secret ─> write files ─> reload
//!  certs: verb `cert-request`: new key made HERE (kept in <data_dir>/rotation, 0600)
//!         ─> CSR for the current identity and SANs, + SHA-256 of the certificate in use
//!         verb `cert-install cert_pem=...`: signed cert matches the pending key, same
//!         SPIFFE id, chains to our CA ─> replace key, then cert, atomically
//!         (dr_proto::tls reloads them, no restart); the coordinator then revokes the old one
//! ```
//!
//! Secrets never leave this module in clear except into the secret files: they are not
//! logged, not put in errors or results (which list role names and file paths only), and
//! the plaintext password never reaches PostgreSQL either: the server receives a SCRAM
//! verifier computed here (as `psql \password` does), so `log_statement = 'all'` or a
//! `pg_stat_statements` reader learns nothing usable. sqlx statement logging is disabled on
//! the connections used here for the same reason.
//!
//! No private key ever arrives in (or leaves in) a command: commands and their results are
//! stored in the coordinators' Raft log. A command that still carries `key_pem` is refused.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use dr_proto::tls::TlsPaths;
use futures::future::BoxFuture;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::actions::{ActionCtx, ActionOutput, Registry};
use crate::config::{Config, Reload, RotationSpec, RotationTarget};

pub mod atomic_file;
pub mod certs;
pub mod secret_file;

/// Length of generated secrets (alphanumeric: about 238 bits).
pub const SECRET_LEN: usize = 40;
const SCRAM_ITERATIONS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("unknown scope `{0}`: use db, app, certs or all")]
    Scope(String),
    #[error("{0}")]
    Args(String),
    #[error("nothing configured to rotate for scope `{0}` (see [rotation] in the agent config)")]
    NothingConfigured(&'static str),
    /// Never carries a secret: built from sqlx errors, which hold server messages and
    /// never the statement text (and the statement holds only a verifier).
    #[error("database: {0}")]
    Db(String),
    #[error("{0}")]
    File(#[from] secret_file::SecretFileError),
    #[error("{0}")]
    Certs(#[from] certs::CertError),
}

pub type RotateResult<T> = Result<T, RotateError>;

/// A secret value. Debug and Display never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A fresh random secret: [`SECRET_LEN`] alphanumerics from the thread CSPRNG (ChaCha,
    /// seeded from the OS). Alphanumeric so it needs no quoting in env files, URLs or SQL.
    pub fn generate() -> Secret {
        use rand::Rng;
        use rand::distr::Alphanumeric;
        Secret(
            rand::rng()
                .sample_iter(&Alphanumeric)
                .take(SECRET_LEN)
                .map(char::from)
                .collect(),
        )
    }

    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677, PostgreSQL's
/// `scram_build_secret`): `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
pub fn scram_verifier(password: &Secret, salt: &[u8; 16]) -> String {
    use base64::Engine;
    use ring::{digest, hmac, pbkdf2};
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(SCRAM_ITERATIONS).expect("4096 is not zero"),
        salt,
        password.expose().as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    format!(
        "SCRAM-SHA-256${SCRAM_ITERATIONS}:{}${}:{}",
        b64(salt),
        b64(stored_key.as_ref()),
        b64(server_key.as_ref())
    )
}

/// `"name"` with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Db,
    App,
    Certs,
    All,
}

impl FromStr for Scope {
    type Err = RotateError;
    fn from_str(s: &str) -> RotateResult<Scope> {
        match s {
            "db" => Ok(Scope::Db),
            "app" => Ok(Scope::App),
            "certs" => Ok(Scope::Certs),
            "all" => Ok(Scope::All),
            other => Err(RotateError::Scope(other.to_string())),
        }
    }
}

/// What one rotated target became. Names and paths only, never values.
#[derive(Debug, Clone, Default)]
pub struct Rotated {
    pub kind: &'static str,
    pub name: String,
    pub files: Vec<PathBuf>,
    pub reloaded: Vec<String>,
    pub sessions_terminated: u64,
    /// `Some(true)`: a login with the old password was refused. `None`: not provable (the
    /// old password was in no secret file).
    pub old_rejected: Option<bool>,
    pub new_accepted: Option<bool>,
    /// Why this target is not fully done (empty when it is).
    pub problems: Vec<String>,
}

impl Rotated {
    fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn sqlx_err(what: &str, e: &sqlx::Error) -> RotateError {
    // sqlx's Display for a database error is the server's message; connection errors name
    // host and cause. Neither includes the options' password.
    RotateError::Db(format!("{what}: {e}"))
}

/// Connection options for the admin URL with statement logging off.
fn admin_options(url: &str) -> RotateResult<PgConnectOptions> {
    PgConnectOptions::from_str(url)
        .map(|o| o.disable_statement_logging())
        .map_err(|e| {
            RotateError::Db(format!(
                "db_admin_url {} is invalid: {e}",
                crate::config::redact_url(url)
            ))
        })
}

/// Rotates the configured credentials of one host.
pub struct Rotator {
    spec: RotationSpec,
    tls: TlsPaths,
    /// Where a pending certificate request's key waits (`<data_dir>/rotation`).
    state_dir: PathBuf,
}

/// Directory under `data_dir` for the pending certificate key.
pub const STATE_DIR: &str = "rotation";

impl Rotator {
    pub fn new(spec: RotationSpec, tls: TlsPaths) -> Self {
        Self {
            spec,
            tls,
            state_dir: PathBuf::from(STATE_DIR),
        }
    }

    /// Where the pending certificate key is kept (`<data_dir>/rotation`).
    pub fn with_state_dir(mut self, dir: PathBuf) -> Self {
        self.state_dir = dir;
        self
    }

    /// Rotates every `[[rotation.roles]]` entry. Stops at the first role whose password
    /// could not be changed; later problems (a reload, a proof) are recorded and the next
    /// role still rotates (in an emergency, more rotated is better than fewer).
    pub async fn rotate_db(&self, cancel: &CancellationToken) -> RotateResult<Vec<Rotated>> {
        let Some(admin_url) = &self.spec.db_admin_url else {
            return Err(RotateError::NothingConfigured("db"));
        };
        if self.spec.roles.is_empty() {
            return Err(RotateError::NothingConfigured("db"));
        }
        let admin = admin_options(admin_url)?;
        let check = match &self.spec.db_check_url {
            Some(u) => admin_options(u)?,
            None => admin.clone(),
        };
        let mut out = Vec::new();
        for target in &self.spec.roles {
            let r = self
                .rotate_role(target, &admin, &check, cancel)
                .instrument(info_span!("role", role = %target.name))
                .await?;
            out.push(r);
        }
        Ok(out)
    }

    async fn rotate_role(
        &self,
        target: &RotationTarget,
        admin: &PgConnectOptions,
        check: &PgConnectOptions,
        cancel: &CancellationToken,
    ) -> RotateResult<Rotated> {
        let old = secret_file::read_first(&target.files).await?;
        let new = Secret::generate();
        let timeout = self.spec.timeout;
        let salt: [u8; 16] = rand::random();
        let terminated = alter_role(
            admin.clone(),
            target.name.clone(),
            scram_verifier(&new, &salt),
            self.spec.terminate_sessions,
            timeout,
        )
        .await?;
        let mut rotated = Rotated {
            kind: "db-role",
            name: target.name.clone(),
            ..Default::default()
        };
        match terminated {
            Ok(n) => {
                rotated.sessions_terminated = n;
                if n > 0 {
                    info!(sessions = n, "open sessions of the role terminated");
                }
            }
            Err(e) => rotated.problems.push(e),
        }

        self.write_and_reload(target, &new, &mut rotated, cancel)
            .await?;

        // Proof: the old password is dead, the new one works.
        let old_opts = match &old {
            Some(o) if *o != new => Some(login_options(check, &target.name, o)),
            _ => None,
        };
        let new_opts = login_options(check, &target.name, &new);
        match old_opts {
            Some(opts) => match try_login(opts, timeout).await {
                Ok(()) => {
                    rotated.old_rejected = Some(false);
                    rotated.problems.push(format!(
                        "the OLD password still logs in as {}: pg_hba.conf does not check passwords for this role from the check host (trust?); fix pg_hba.conf",
                        target.name
                    ));
                }
                Err(_) => rotated.old_rejected = Some(true),
            },
            _ => rotated.problems.push(
                "old password unknown (no secret file held it): cannot prove it is dead".into(),
            ),
        }
        match try_login(new_opts, timeout).await {
            Ok(()) => rotated.new_accepted = Some(true),
            Err(e) => {
                rotated.new_accepted = Some(false);
                rotated
                    .problems
                    .push(format!("login with the new password failed: {e}"));
            }
        }
        if rotated.ok() {
            info!("old password refused, new password accepted");
        } else {
            warn!(problems = %rotated.problems.join("; "), "role rotated with problems");
        }
        Ok(rotated)
    }

    async fn write_and_reload(
        &self,
        target: &RotationTarget,
        new: &Secret,
        rotated: &mut Rotated,
        cancel: &CancellationToken,
    ) -> RotateResult<()> {
        for f in &target.files {
            secret_file::write(f, new).await?;
            info!(path = %f.path.display(), "secret file replaced");
            rotated.files.push(f.path.clone());
        }
        for r in &target.reload {
            let (label, argv) = match r {
                Reload::Unit(u) => (
                    format!("systemctl reload {u}"),
                    vec!["systemctl".to_string(), "reload".to_string(), u.clone()],
                ),
                Reload::Command(c) => (c.join(" "), c.clone()),
            };
            match crate::exec::command::run(&argv, self.spec.timeout, cancel).await {
                Ok(o) if o.success() => {
                    info!(reload = %label, "consumer reloaded");
                    rotated.reloaded.push(label);
                }
                Ok(o) => rotated
                    .problems
                    .push(format!("reload `{label}` failed: {}", o.summary())),
                Err(e) => rotated
                    .problems
                    .push(format!("reload `{label}` failed: {e}")),
            }
        }
        Ok(())
    }

    /// Rotates every `[[rotation.app_secrets]]` entry.
    pub async fn rotate_app(&self, cancel: &CancellationToken) -> RotateResult<Vec<Rotated>> {
        if self.spec.app_secrets.is_empty() {
            return Err(RotateError::NothingConfigured("app"));
        }
        let mut out = Vec::new();
        for target in &self.spec.app_secrets {
            let mut rotated = Rotated {
                kind: "app-secret",
                name: target.name.clone(),
                ..Default::default()
            };
            self.write_and_reload(target, &Secret::generate(), &mut rotated, cancel)
                .instrument(info_span!("app_secret", name = %target.name))
                .await?;
            out.push(rotated);
        }
        Ok(out)
    }

    /// Certificate rotation, step 1: a new key here, a CSR out.
    pub async fn request_cert(&self) -> RotateResult<certs::CertRequest> {
        let (tls, dir) = (self.tls.clone(), self.state_dir.clone());
        let r = tokio::task::spawn_blocking(move || certs::request(&tls, &dir))
            .await
            .map_err(|e| certs::CertError::Other(e.to_string()))??;
        info!(identity = %r.identity, "new key generated, certificate request made");
        Ok(r)
    }

    /// Certificate rotation, step 2: the signed certificate for the pending key.
    pub async fn install_cert(&self, cert_pem: String) -> RotateResult<certs::Installed> {
        let (tls, dir) = (self.tls.clone(), self.state_dir.clone());
        let r = tokio::task::spawn_blocking(move || certs::install(&tls, &dir, &cert_pem))
            .await
            .map_err(|e| certs::CertError::Other(e.to_string()))??;
        info!(identity = %r.identity, "agent certificate and key replaced");
        Ok(r)
    }
}

fn login_options(check: &PgConnectOptions, role: &str, pw: &Secret) -> PgConnectOptions {
    check.clone().username(role).password(pw.expose())
}

/// Opens and closes one connection; the error text never holds the password.
///
/// Boxed as a `Send` future with owned arguments: sqlx's connection futures trip rustc's
/// higher-ranked `Send` inference when awaited deep inside the verb handler.
fn try_login(opts: PgConnectOptions, timeout: Duration) -> BoxFuture<'static, Result<(), String>> {
    Box::pin(try_login_inner(opts, timeout))
}

async fn try_login_inner(opts: PgConnectOptions, timeout: Duration) -> Result<(), String> {
    let opts = opts.disable_statement_logging();
    match tokio::time::timeout(timeout, PgConnection::connect_with(&opts)).await {
        Ok(Ok(c)) => {
            let _closed = c.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_string()),
    }
}

/// `ALTER ROLE` with a SCRAM verifier, then (optionally) terminates the role's sessions.
/// Returns how many sessions were terminated (`Err` text for the termination alone).
fn alter_role(
    admin: PgConnectOptions,
    role: String,
    verifier: String,
    terminate: bool,
    timeout: Duration,
) -> BoxFuture<'static, RotateResult<Result<u64, String>>> {
    Box::pin(alter_role_inner(admin, role, verifier, terminate, timeout))
}

async fn alter_role_inner(
    admin: PgConnectOptions,
    role: String,
    verifier: String,
    terminate: bool,
    timeout: Duration,
) -> RotateResult<Result<u64, String>> {
    let mut conn = match tokio::time::timeout(timeout, PgConnection::connect_with(&admin)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(sqlx_err("connect as the admin role", &e)),
        Err(_) => {
            return Err(RotateError::Db(
                "connect as the admin role: timed out".into(),
            ));
        }
    };
    let sql = format!(
        "ALTER ROLE {} PASSWORD {}",
        quote_ident(&role),
        quote_literal(&verifier)
    );
    match tokio::time::timeout(
        timeout,
        sqlx::query(&sql).persistent(false).execute(&mut conn),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(sqlx_err(&format!("ALTER ROLE {role}"), &e)),
        Err(_) => return Err(RotateError::Db(format!("ALTER ROLE {role}: timed out"))),
    }
    info!("role password changed");
    let terminated = if terminate {
        sqlx::query_scalar::<_, i64>(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity \
             where usename = $1 and pid <> pg_backend_pid()",
        )
        .bind(&role)
        .fetch_one(&mut conn)
        .await
        .map(|n| u64::try_from(n).unwrap_or(0))
        .map_err(|e| format!("terminating the role's sessions failed: {e}"))
    } else {
        Ok(0)
    };
    let _closed = conn.close().await;
    Ok(terminated)
}

const ARGS: [&str; 1] = ["scope"];
/// Why certificate material in `rotate-credentials` is refused.
const CERTS_HINT: &str = "certificates rotate with an agent-made key: verbs cert-request then cert-install (drctl rotate-credentials --emergency --scope certs --ca-dir DIR); a private key is never accepted in a command, because commands are stored in the coordinators' Raft log";

/// The `rotate-credentials` verb.
pub async fn rotate_action(
    rotator: &Rotator,
    args: HashMap<String, String>,
    ctx: &ActionCtx,
) -> ActionOutput {
    if args.contains_key("key_pem") || args.contains_key("cert_pem") {
        return ActionOutput::failed(format!("rotate-credentials: {CERTS_HINT}"));
    }
    let mut unknown: Vec<&String> = args
        .keys()
        .filter(|k| !ARGS.contains(&k.as_str()))
        .collect();
    if !unknown.is_empty() {
        unknown.sort();
        return ActionOutput::failed(format!(
            "rotate-credentials: unknown argument(s) {unknown:?}; allowed: scope=db|app|all"
        ));
    }
    let scope = match args.get("scope").map(|s| s.parse::<Scope>()) {
        None => {
            return ActionOutput::failed("rotate-credentials needs scope=db|app|certs|all");
        }
        Some(Err(e)) => return ActionOutput::failed(e.to_string()),
        Some(Ok(s)) => s,
    };
    drop(args);

    let mut rotated: Vec<Rotated> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let all = scope == Scope::All;
    let (want_db, want_app, want_certs) = (
        all || scope == Scope::Db,
        all || scope == Scope::App,
        all || scope == Scope::Certs,
    );
    if want_db {
        match rotator.rotate_db(&ctx.cancel).await {
            Ok(r) => rotated.extend(r),
            Err(RotateError::NothingConfigured(_)) if scope == Scope::All => {
                skipped.push("db: nothing configured".into());
            }
            Err(e) => failures.push(format!("db: {e}")),
        }
    }
    if want_app {
        match rotator.rotate_app(&ctx.cancel).await {
            Ok(r) => rotated.extend(r),
            Err(RotateError::NothingConfigured(_)) if scope == Scope::All => {
                skipped.push("app: nothing configured".into());
            }
            Err(e) => failures.push(format!("app: {e}")),
        }
    }
    if want_certs {
        if scope == Scope::All {
            skipped.push("certs: rotated by cert-request/cert-install".into());
        } else {
            failures.push(format!("certs: {CERTS_HINT}"));
        }
    }

    for r in &rotated {
        for p in &r.problems {
            failures.push(format!("{} {}: {p}", r.kind, r.name));
        }
    }
    let names = |kind: &str| {
        rotated
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.name.clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    let files: Vec<String> = rotated
        .iter()
        .flat_map(|r| r.files.iter().map(|p| p.display().to_string()))
        .collect();
    let reloaded: Vec<String> = rotated.iter().flat_map(|r| r.reloaded.clone()).collect();
    let proof: Vec<String> = rotated
        .iter()
        .filter(|r| r.kind == "db-role")
        .map(|r| {
            let b = |v: Option<bool>| v.map_or("unknown".to_string(), |b| b.to_string());
            format!(
                "{}: old_rejected={} new_accepted={} sessions_terminated={}",
                r.name,
                b(r.old_rejected),
                b(r.new_accepted),
                r.sessions_terminated
            )
        })
        .collect();
    let summary = format!(
        "rotated {} target(s){}",
        rotated.len(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!("; skipped: {}", skipped.join("; "))
        }
    );
    let out = if failures.is_empty() {
        ActionOutput::ok(summary)
    } else {
        ActionOutput::failed(format!("{summary}; problems: {}", failures.join("; ")))
    };
    out.with_detail(
        "scope",
        match scope {
            Scope::Db => "db",
            Scope::App => "app",
            Scope::Certs => "certs",
            Scope::All => "all",
        },
    )
    .with_detail("roles", names("db-role"))
    .with_detail("app_secrets", names("app-secret"))
    .with_detail("files", files.join(","))
    .with_detail("reloaded", reloaded.join(","))
    .with_detail("proof", proof.join("; "))
}

/// Registers `rotate-credentials`.
pub fn register(reg: &mut Registry, config: &Arc<Config>) {
    let rotator = Arc::new(
        Rotator::new(config.rotation.clone(), config.tls.clone())
            .with_state_dir(config.data_dir.join(STATE_DIR)),
    );
    let host = config.host_id.clone();
    let (r2, h2) = (rotator.clone(), host.clone());
    reg.register(
        "cert-request",
        move |args: HashMap<String, String>, ctx: ActionCtx| {
            let (rotator, host) = (r2.clone(), h2.clone());
            async move {
                if !args.is_empty() {
                    return ActionOutput::failed("cert-request takes no arguments");
                }
                let span = info_span!("cert_request", key = %ctx.key, host = %host);
                match rotator.request_cert().instrument(span).await {
                    Ok(r) => ActionOutput::ok(
                        "new key generated on this host; sign the CSR and send it back with cert-install",
                    )
                    .with_detail("identity", r.identity)
                    .with_detail("csr_pem", r.csr_pem)
                    .with_detail("old_cert_sha256", r.old_cert_sha256),
                    Err(e) => ActionOutput::failed(format!("cert-request: {e}")),
                }
            }
        },
    );
    let (r3, h3) = (rotator.clone(), host.clone());
    reg.register(
        "cert-install",
        move |mut args: HashMap<String, String>, ctx: ActionCtx| {
            let (rotator, host) = (r3.clone(), h3.clone());
            async move {
                let Some(cert_pem) = args.remove("cert_pem") else {
                    return ActionOutput::failed("cert-install needs cert_pem (the signed certificate for the pending request)");
                };
                if !args.is_empty() {
                    return ActionOutput::failed(format!("cert-install: {CERTS_HINT}"));
                }
                let span = info_span!("cert_install", key = %ctx.key, host = %host);
                match rotator.install_cert(cert_pem).instrument(span).await {
                    Ok(r) => ActionOutput::ok(
                        "new certificate and key installed; picked up at the next TLS reload, no restart",
                    )
                    .with_detail("identity", r.identity)
                    .with_detail("replaced_cert_sha256", r.replaced_cert_sha256)
                    .with_detail("new_cert_sha256", r.new_cert_sha256),
                    Err(e) => ActionOutput::failed(format!("cert-install: {e}")),
                }
            }
        },
    );
    reg.register(
        "rotate-credentials",
        move |args: HashMap<String, String>, ctx: ActionCtx| {
            let (rotator, host) = (rotator.clone(), host.clone());
            async move {
                let span = info_span!("rotate_credentials", key = %ctx.key, host = %host, scope = args.get("scope").map_or("", String::as_str));
                rotate_action(&rotator, args, &ctx).instrument(span).await
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_never_shown() {
        let (a, b) = (Secret::generate(), Secret::generate());
        assert_eq!(a.expose().len(), SECRET_LEN);
        assert!(a.expose().chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "Secret(***)");
    }

    #[test]
    fn scram_verifier_matches_postgres_format() {
        // Reference computed with PostgreSQL's algorithm (RFC 7677 test vector shape):
        // same password + salt always give the same verifier.
        let pw = Secret::new("pencil".into());
        let v = scram_verifier(&pw, &[0u8; 16]);
        assert!(
            v.starts_with("SCRAM-SHA-256$4096:AAAAAAAAAAAAAAAAAAAAAA==$"),
            "{v}"
        );
        assert_eq!(v, scram_verifier(&pw, &[0u8; 16]));
        assert_ne!(v, scram_verifier(&pw, &[1u8; 16]));
        assert!(!v.contains("pencil"));
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn scopes_parse() {
        assert_eq!("all".parse::<Scope>().unwrap(), Scope::All);
        assert!("everything".parse::<Scope>().is_err());
    }
}
