//! The `dns` provider against a real BIND 9 (`named`) on 127.0.0.1: TSIG-signed RFC 2136 updates
//! switch `app.yeslocker.test` from beijing to shanghai, `dig` sees it, a wrong key is refused.
// Test helpers (outside #[test] fns) may unwrap and ignore best-effort cleanup results.
#![allow(clippy::unwrap_used, clippy::let_underscore_must_use)]

#[path = "traffic_common.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{ChildGuard, free_port, init_tracing, plan, require_binary, wait_until};
use dr_agent::traffic::{
    Change, DnsConfig, DnsProvider, SecretSource, TrafficError, TrafficProvider as _,
    TsigAlgorithmName, TsigConfig,
};
use tracing::info;

const SECRET_B64: &str = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=";
const WRONG_B64: &str = "d3JvbmdrZXl3cm9uZ2tleXdyb25na2V5d3JvbmdrZXk=";

struct Named {
    guard: ChildGuard,
    port: u16,
    log: std::path::PathBuf,
}

fn start_named(dir: &Path) -> Named {
    let named = require_binary("named", "bind9");
    let port = free_port();
    let d = dir.display();
    std::fs::write(
        dir.join("named.conf"),
        format!(
            r#"options {{
  directory "{d}";
  listen-on port {port} {{ 127.0.0.1; }};
  listen-on-v6 {{ none; }};
  pid-file "{d}/named.pid";
  session-keyfile "{d}/session.key";
  recursion no;
  dnssec-validation no;
  allow-transfer {{ none; }};
}};
controls {{ }};
key "dr-agent" {{ algorithm hmac-sha256; secret "{SECRET_B64}"; }};
zone "yeslocker.test" {{
  type primary;
  file "{d}/yeslocker.test.db";
  allow-update {{ key "dr-agent"; }};
}};
"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("yeslocker.test.db"),
        "$TTL 60\n\
         @ IN SOA ns.yeslocker.test. hostmaster.yeslocker.test. 1 3600 600 86400 60\n\
         @ IN NS ns.yeslocker.test.\n\
         ns IN A 127.0.0.1\n\
         app IN A 127.0.0.10\n",
    )
    .unwrap();
    let log = dir.join("named.log");
    let out = std::fs::File::create(&log).unwrap();
    let guard = ChildGuard::spawn(
        "named",
        Command::new(named)
            .args(["-g", "-n", "1", "-c"])
            .arg(dir.join("named.conf"))
            .stdout(out.try_clone().unwrap())
            .stderr(out),
    );
    Named { guard, port, log }
}

fn provider(port: u16, secret: SecretSource, env: &BTreeMap<String, String>) -> DnsProvider {
    DnsProvider::from_config(
        DnsConfig {
            name: "app-dns".into(),
            server: format!("127.0.0.1:{port}").parse().unwrap(),
            zone: "yeslocker.test".into(),
            record: "app.yeslocker.test".into(),
            ttl: 60,
            tsig: TsigConfig {
                key_name: "dr-agent".into(),
                algorithm: TsigAlgorithmName::HmacSha256,
                secret,
            },
            timeout: Duration::from_secs(3),
        },
        env,
    )
    .unwrap()
}

/// What an independent client (`dig`) sees.
fn dig(port: u16, rtype: &str) -> Vec<String> {
    let dig = require_binary("dig", "bind9-dnsutils");
    let out = Command::new(dig)
        .args(["@127.0.0.1", "-p", &port.to_string(), "+short", "+tcp"])
        .args(["app.yeslocker.test", rtype])
        .output()
        .unwrap();
    assert!(out.status.success(), "dig failed: {out:?}");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_dns_update_switches_record_and_wrong_key_is_refused() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let named = start_named(dir.path());
    // A BIND key file, as `tsig-keygen` writes it.
    let key_file = dir.path().join("dr-agent.key");
    std::fs::write(
        &key_file,
        format!("key \"dr-agent\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{SECRET_B64}\";\n}};\n"),
    )
    .unwrap();
    let env = BTreeMap::from([("DR_WRONG_TSIG".to_owned(), WRONG_B64.to_owned())]);
    let dns = provider(named.port, SecretSource::File(key_file), &env);
    let beijing = plan(&["127.0.0.10"], &["127.0.0.20", "fd00::20"], 100);
    let shanghai = plan(&["127.0.0.10"], &["127.0.0.20", "fd00::20"], 0);

    let mut named = named;
    info!("--- wait for named");
    {
        let log = named.log.clone();
        let guard = &mut named.guard;
        wait_until("named to answer", Duration::from_secs(20), || {
            guard.assert_running(&log);
            let fut = dns.current();
            async move { fut.await.ok() }
        })
        .await;
    }
    let port = named.port;

    info!("--- the zone serves beijing; applying the beijing plan is a no-op");
    {
        assert_eq!(dig(port, "A"), vec!["127.0.0.10"]);
        let applied = dns.apply(&beijing).await.unwrap();
        assert!(!applied.changed, "{applied:?}");
        assert!(applied.changes.is_empty());
    }

    info!("--- failover: switch to shanghai (A and AAAA)");
    {
        let applied = dns.apply(&shanghai).await.unwrap();
        assert!(applied.changed);
        assert_eq!(applied.plan_digest, shanghai.digest());
        let json = serde_json::to_string(&applied.changes).unwrap();
        assert_eq!(
            json,
            r#"[{"change":"removed","region":"beijing","endpoint":"127.0.0.10","weight":1},{"change":"added","region":"shanghai","endpoint":"127.0.0.20","weight":1},{"change":"added","region":"shanghai","endpoint":"fd00::20","weight":1}]"#
        );
        assert_eq!(dig(port, "A"), vec!["127.0.0.20"]);
        assert_eq!(dig(port, "AAAA"), vec!["fd00::20"]);
        let state = dns.current().await.unwrap();
        let eps: Vec<String> = state
            .endpoints
            .iter()
            .map(|e| e.endpoint.to_string())
            .collect();
        assert_eq!(eps, vec!["127.0.0.20", "fd00::20"]);
        assert_eq!(state.last_applied, Some(shanghai.digest()));
    }

    info!("--- re-applying the same plan changes nothing");
    {
        let applied = dns.apply(&shanghai).await.unwrap();
        assert!(!applied.changed);
    }

    info!("--- a wrong TSIG key is refused with a clear error and changes nothing");
    {
        let wrong = provider(port, SecretSource::Env("DR_WRONG_TSIG".into()), &env);
        let err = wrong.apply(&beijing).await.unwrap_err();
        assert!(
            matches!(err, TrafficError::DnsTsigRejected { .. }),
            "unexpected error: {err:?}"
        );
        let msg = err.to_string();
        info!(%msg, "refused as expected");
        assert!(msg.contains("rejected TSIG key \"dr-agent\""), "{msg}");
        assert!(msg.contains("BADSIG"), "{msg}");
        assert!(
            !msg.contains(WRONG_B64) && !msg.contains(SECRET_B64),
            "{msg}"
        );
        assert!(err.is_permanent());
        assert_eq!(dig(port, "A"), vec!["127.0.0.20"]);
    }

    info!("--- canary 50/50: dns has no weights, both regions are in the set");
    {
        let canary = plan(&["127.0.0.10"], &["127.0.0.20", "fd00::20"], 50);
        let applied = dns.apply(&canary).await.unwrap();
        assert!(applied.changed);
        assert!(
            applied
                .notes
                .iter()
                .any(|n| n.contains("dns has no weights")),
            "{:?}",
            applied.notes
        );
        assert_eq!(dig(port, "A"), vec!["127.0.0.10", "127.0.0.20"]);
        assert!(matches!(applied.changes.as_slice(), [Change::Added { .. }]));
    }

    info!("--- a hostname endpoint does not fit an A record");
    {
        let bad = plan(&["db.beijing"], &["127.0.0.20"], 0);
        let bad = bad
            .enable_traffic(&common::region("beijing"), dr_agent::traffic::Percent::FULL)
            .unwrap();
        let err = dns.apply(&bad).await.unwrap_err();
        assert!(err.to_string().contains("not an IP address"), "{err}");
    }

    named.guard.assert_running(&named.log);
    drop(named);
}
