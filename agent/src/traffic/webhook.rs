//! POST the plan to an HTTP(S) endpoint: for balancers and CDNs with an API of their own, and
//! for the DRP's "locker-site gateways repointed" step (a gateway is just another agent host; a
//! small receiver on it, or the vendor's API, does the repointing).
//!
//! Request (`content-type: application/json`):
//! ```text
//! POST <url>
//! idempotency-key: <plan digest>        same plan, same key: receivers must treat it as a no-op
//! x-dr-timestamp:  <unix seconds>
//! x-dr-signature:  sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>   (if a secret is set)
//! {"provider": "...", "plan_digest": "...", "plan": {"regions": {...}}}
//! ```
//! The timestamp is inside the signature so a captured request cannot be replayed later to
//! switch traffic back; receivers should refuse timestamps more than a few minutes old.
//!
//! Any 2xx is success. Connection errors, timeouts, 408, 429 and 5xx are retried with doubling
//! backoff up to `max_attempts`; other statuses fail at once. TLS is rustls with ring and the
//! system's native roots, plus `ca_file` for a private CA.
//!
//! Idempotency: the far side cannot be read back, so this provider remembers the digest of the
//! last plan delivered by this process and skips a re-apply of the same plan. After a restart it
//! sends again, and the idempotency key lets the receiver recognise the repeat.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{debug, info, instrument, warn};

use super::error::{TrafficError, TrafficResult, tail};
use super::outcome::{Applied, Change, TrafficState};
use super::plan::TrafficPlan;
use super::secret::{Secret, SecretFormat, SecretSource};

const KIND: &str = "webhook";

/// `[[traffic]] kind = "webhook"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    pub url: String,
    /// HMAC-SHA256 key for `x-dr-signature` (raw bytes of the file / variable).
    #[serde(default)]
    pub secret: Option<SecretSource>,
    /// Extra PEM CA certificates to trust for https.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "defaults::backoff", with = "humantime_serde")]
    pub backoff: Duration,
}

mod defaults {
    use std::time::Duration;
    pub(super) fn timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn max_attempts() -> u32 {
        3
    }
    pub(super) fn backoff() -> Duration {
        Duration::from_millis(500)
    }
}

/// The JSON body.
#[derive(Debug, Serialize, Deserialize)]
pub struct WebhookBody {
    pub provider: String,
    pub plan_digest: String,
    pub plan: TrafficPlan,
}

pub const SIGNATURE_HEADER: &str = "x-dr-signature";
pub const TIMESTAMP_HEADER: &str = "x-dr-timestamp";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// `sha256=<hex>` over `"<timestamp>.<body>"`; exposed so receivers (and tests) verify the same way.
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// See the module docs.
#[derive(Debug)]
pub struct WebhookProvider {
    name: String,
    url: reqwest::Url,
    secret: Option<Secret>,
    client: reqwest::Client,
    max_attempts: u32,
    backoff: Duration,
    last_applied: Mutex<Option<String>>,
}

impl WebhookProvider {
    pub fn from_config(cfg: WebhookConfig, env: &BTreeMap<String, String>) -> TrafficResult<Self> {
        let WebhookConfig {
            name,
            url,
            secret,
            ca_file,
            timeout,
            max_attempts,
            backoff,
        } = cfg;
        let bad = |reason: String| TrafficError::Config {
            provider: name.clone(),
            reason,
        };
        let url = reqwest::Url::parse(&url).map_err(|e| bad(format!("url {url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!(
                "url scheme {} is not http or https",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("put no credentials in the url; use `secret`".into()));
        }
        if max_attempts == 0 {
            return Err(bad("max_attempts must be at least 1".into()));
        }
        let secret = secret
            .map(|s| s.load(&name, env, SecretFormat::Raw))
            .transpose()?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &ca_file {
            let pem =
                std::fs::read(ca).map_err(|e| bad(format!("ca_file {}: {e}", ca.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| bad(format!("ca_file {}: {e}", ca.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| bad(format!("http client: {e}")))?;
        Ok(Self {
            name,
            url,
            secret,
            client,
            max_attempts,
            backoff,
            last_applied: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL without query string, for logs and errors (a query may carry a token).
    fn url_for_logs(&self) -> String {
        let mut u = self.url.clone();
        u.set_query(None);
        u.to_string()
    }

    #[instrument(name = "traffic_apply", skip_all, fields(provider = %self.name, kind = KIND, url = %self.url_for_logs(), digest = %plan.digest()))]
    pub(super) async fn apply_plan(&self, plan: &TrafficPlan) -> TrafficResult<Applied> {
        let digest = plan.digest();
        let mut last = self.last_applied.lock().await;
        let applied = |changed, changes| Applied {
            provider: self.name.clone(),
            kind: KIND.to_owned(),
            plan_digest: digest.clone(),
            changed,
            changes,
            notes: Vec::new(),
        };
        if last.as_deref() == Some(digest.as_str()) {
            debug!("plan already delivered");
            return Ok(applied(false, Vec::new()));
        }
        let body = serde_json::to_vec(&WebhookBody {
            provider: self.name.clone(),
            plan_digest: digest.clone(),
            plan: plan.clone(),
        })
        .expect("a webhook body always serializes");
        let url = self.url_for_logs();
        let mut delay = self.backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                .to_string();
            let mut req = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(IDEMPOTENCY_HEADER, &digest)
                .header(TIMESTAMP_HEADER, &ts)
                .body(body.clone());
            if let Some(secret) = &self.secret {
                req = req.header(SIGNATURE_HEADER, signature(secret.expose(), &ts, &body));
            }
            let (retryable, err) = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    info!(
                        attempt,
                        status = resp.status().as_u16(),
                        "webhook accepted the plan"
                    );
                    *last = Some(digest.clone());
                    return Ok(applied(true, vec![Change::Delivered { target: url }]));
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let text = resp.text().await.unwrap_or_default();
                    let err = TrafficError::WebhookStatus {
                        url: url.clone(),
                        status,
                        attempts: attempt,
                        body_tail: tail(&text, 500),
                    };
                    (!err.is_permanent(), err)
                }
                Err(e) => (
                    true,
                    TrafficError::WebhookTransport {
                        url: url.clone(),
                        attempts: attempt,
                        // `without_url`: the error's url could carry the query string.
                        reason: error_chain(&e.without_url()),
                    },
                ),
            };
            if !retryable || attempt >= self.max_attempts {
                return Err(err);
            }
            warn!(attempt, error = %err, "webhook delivery failed, retrying");
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
        }
    }

    pub(super) async fn read_state(&self) -> TrafficResult<TrafficState> {
        Ok(TrafficState {
            provider: self.name.clone(),
            kind: KIND.to_owned(),
            endpoints: Vec::new(),
            last_applied: self.last_applied.lock().await.clone(),
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
