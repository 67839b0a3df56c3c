//! RFC 2136 dynamic DNS update, signed with TSIG (RFC 8945, hmac-sha256), of one A/AAAA record
//! set: the `update-dns --target dr-site` step of the DRP.
//!
//! DNS has no weights. A region with weight 0 has its addresses removed from the record set, a
//! region with any weight > 0 has them all included (so a 10/90 canary puts both regions in the
//! set and the resolvers split roughly evenly; the `Applied` notes say so). The provider owns the
//! whole record set: addresses that are in no region of the plan are removed too.
//!
//! ```text
//!  agent                                   primary DNS server (BIND, Knot, ...)
//!    | -- QUERY  name A / AAAA  (TSIG) ----------> |   read the current set
//!    | <- answer (TSIG verified) ----------------- |   equal to the plan? -> no-op
//!    | -- UPDATE zone SOA                          |
//!    |      delete rrset name A / AAAA             |   one message: the server applies it
//!    |      add name ttl A x.x.x.x ...  (TSIG) --> |   atomically, never an empty window
//!    | <- NOERROR (TSIG verified) ---------------- |
//!    | -- QUERY again ----------------------------> |   verify the server now serves the plan
//! ```
//!
//! We use hickory-proto only for the wire format and TSIG (feature `dnssec-ring`: ring, not
//! aws-lc or OpenSSL) and speak TCP ourselves: one short connection per exchange, no truncation
//! handling, and no resolver machinery we do not need. Every response must carry a valid TSIG
//! signature, so a spoofed NOERROR cannot make us report a switch that did not happen; queries
//! are signed as well, so the server may restrict `allow-query` to the key.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, OpCode, Query, ResponseCode, UpdateMessage as _};
use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, TSigner};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tracing::{debug, info, instrument};

use super::error::{TrafficError, TrafficResult};
use super::outcome::{Applied, EndpointState, TrafficState, diff};
use super::plan::{Endpoint, Percent, TrafficPlan};
use super::secret::{SecretFormat, SecretSource};

const KIND: &str = "dns";

/// `[[traffic]] kind = "dns"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    pub name: String,
    /// The primary server that accepts updates, e.g. `10.1.0.53:53`.
    pub server: SocketAddr,
    /// The zone to update, e.g. `yeslocker.test`.
    pub zone: String,
    /// The record set's owner name, absolute (`app.yeslocker.test`); must be inside `zone`.
    pub record: String,
    #[serde(default = "defaults::ttl")]
    pub ttl: u32,
    pub tsig: TsigConfig,
    /// Bound on each exchange with the server.
    #[serde(default = "defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TsigConfig {
    /// The key's name as the server knows it (`key "dr-agent" { ... }`).
    pub key_name: String,
    #[serde(default)]
    pub algorithm: TsigAlgorithmName,
    /// Base64 secret or a `tsig-keygen` key file.
    pub secret: SecretSource,
}

/// Only hmac-sha256: the older MD5/SHA-1 variants are not worth supporting for a new system.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TsigAlgorithmName {
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
}

mod defaults {
    use std::time::Duration;
    pub(super) fn ttl() -> u32 {
        60
    }
    pub(super) fn timeout() -> Duration {
        Duration::from_secs(5)
    }
}

/// See the module docs.
pub struct DnsProvider {
    name: String,
    server: SocketAddr,
    zone: Name,
    record: Name,
    ttl: u32,
    key_name: String,
    signer: TSigner,
    timeout: Duration,
    /// Serialises applies and remembers the last applied plan digest.
    last_applied: Mutex<Option<String>>,
}

impl std::fmt::Debug for DnsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No signer: it holds the key.
        f.debug_struct("DnsProvider")
            .field("name", &self.name)
            .field("server", &self.server)
            .field("zone", &self.zone)
            .field("record", &self.record)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl DnsProvider {
    pub fn from_config(cfg: DnsConfig, env: &BTreeMap<String, String>) -> TrafficResult<Self> {
        let DnsConfig {
            name,
            server,
            zone,
            record,
            ttl,
            tsig:
                TsigConfig {
                    key_name,
                    algorithm,
                    secret,
                },
            timeout,
        } = cfg;
        let bad = |reason: String| TrafficError::Config {
            provider: name.clone(),
            reason,
        };
        let fqdn = |s: &str, what: &str| {
            let mut n =
                Name::from_ascii(s).map_err(|e| bad(format!("{what} {s:?} is not a name: {e}")))?;
            n.set_fqdn(true);
            Ok::<_, TrafficError>(n)
        };
        let zone = fqdn(&zone, "zone")?;
        let record = fqdn(&record, "record")?;
        if !zone.zone_of(&record) {
            return Err(bad(format!("record {record} is not inside zone {zone}")));
        }
        let key = fqdn(&key_name, "tsig key_name")?;
        let secret = secret.load(&name, env, SecretFormat::TsigBase64)?;
        let TsigAlgorithmName::HmacSha256 = algorithm;
        let signer = TSigner::new(
            secret.expose().to_vec(),
            TsigAlgorithm::HmacSha256,
            key,
            300,
        )
        .map_err(|e| bad(format!("tsig: {e}")))?;
        Ok(Self {
            name,
            server,
            zone,
            record,
            ttl,
            key_name,
            signer,
            timeout,
            last_applied: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The addresses the plan wants in the record set (active regions only), sorted.
    fn desired(&self, plan: &TrafficPlan) -> TrafficResult<Vec<IpAddr>> {
        let mut ips = Vec::new();
        for rt in plan.regions().values().filter(|rt| rt.weight.get() > 0) {
            for ep in &rt.endpoints {
                let ip = ep
                    .as_str()
                    .parse::<IpAddr>()
                    .map_err(|_| TrafficError::Unsupported {
                        provider: self.name.clone(),
                        reason: format!(
                            "endpoint {ep} is not an IP address; a DNS A/AAAA record needs one"
                        ),
                    })?;
                ips.push(ip);
            }
        }
        ips.sort();
        Ok(ips)
    }

    /// The current A and AAAA records: addresses (sorted) and the TTLs seen.
    async fn read(&self) -> TrafficResult<(Vec<IpAddr>, Vec<u32>)> {
        let mut ips = Vec::new();
        let mut ttls = Vec::new();
        for rtype in [RecordType::A, RecordType::AAAA] {
            let mut q = Message::query();
            q.metadata.recursion_desired = false;
            q.add_query(Query::query(self.record.clone(), rtype));
            let resp = self.exchange(q, "query").await?;
            for rec in &resp.answers {
                if rec.name != self.record {
                    continue;
                }
                match &rec.data {
                    RData::A(A(ip)) => ips.push(IpAddr::V4(*ip)),
                    RData::AAAA(AAAA(ip)) => ips.push(IpAddr::V6(*ip)),
                    _ => continue,
                }
                ttls.push(rec.ttl);
            }
        }
        ips.sort();
        Ok((ips, ttls))
    }

    /// Signs `msg`, sends it over TCP, verifies the response's TSIG and rcode.
    async fn exchange(&self, mut msg: Message, what: &'static str) -> TrafficResult<Message> {
        let server = self.server.to_string();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let proto = |e: &dyn std::fmt::Display| TrafficError::DnsTransport {
            server: server.clone(),
            reason: format!("{what}: {e}"),
        };
        let mut verifier = msg
            .finalize(&self.signer, now)
            .map_err(|e| proto(&e))?
            .ok_or_else(|| proto(&"tsig signer returned no verifier"))?;
        let request = msg.to_vec().map_err(|e| proto(&e))?;
        let response = tokio::time::timeout(self.timeout, tcp_exchange(self.server, &request))
            .await
            .map_err(|_| proto(&format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| proto(&e))?;
        let resp = Message::from_vec(&response).map_err(|e| proto(&e))?;
        if resp.metadata.id != msg.metadata.id {
            return Err(proto(&"response id does not match the request"));
        }
        // A server that cannot verify our signature answers NOTAUTH with an unsigned TSIG
        // record carrying the reason (BADSIG, BADKEY, BADTIME).
        if let Some(tsig_error) = resp.signature.as_ref().and_then(|s| s.data.error) {
            return Err(TrafficError::DnsTsigRejected {
                server,
                key_name: self.key_name.clone(),
                tsig_error: format!("{tsig_error:?}").to_uppercase(),
            });
        }
        if resp.metadata.response_code == ResponseCode::NotAuth && resp.signature.is_none() {
            return Err(TrafficError::DnsTsigRejected {
                server,
                key_name: self.key_name.clone(),
                tsig_error: "NOTAUTH, unsigned".to_owned(),
            });
        }
        verifier
            .verify(&response)
            .map_err(|e| TrafficError::DnsBadResponseSignature {
                server: server.clone(),
                reason: e.to_string(),
            })?;
        match resp.metadata.response_code {
            ResponseCode::NoError => Ok(resp),
            // The name has no records at all yet: an empty set, not an error.
            ResponseCode::NXDomain if what == "query" => Ok(resp),
            code => Err(TrafficError::DnsRcode {
                server,
                what,
                rcode: rcode_name(code),
                hint: match code {
                    ResponseCode::Refused => {
                        ": check allow-update / update-policy for this key on the server"
                    }
                    ResponseCode::NotAuth | ResponseCode::NotZone => {
                        ": check that the server is the primary for the zone"
                    }
                    _ => "",
                },
            }),
        }
    }

    fn state_of(ips: &[IpAddr]) -> Vec<EndpointState> {
        ips.iter()
            .map(|ip| EndpointState {
                endpoint: Endpoint::new(ip.to_string()).expect("an IP address is a valid endpoint"),
                weight: 1,
            })
            .collect()
    }

    #[instrument(name = "traffic_apply", skip_all, fields(provider = %self.name, kind = KIND, record = %self.record, digest = %plan.digest()))]
    pub(super) async fn apply_plan(&self, plan: &TrafficPlan) -> TrafficResult<Applied> {
        let desired = self.desired(plan)?;
        let mut last = self.last_applied.lock().await;
        let mut notes = Vec::new();
        let active = plan.active_regions();
        if active.len() > 1 {
            let split: Vec<String> = active
                .iter()
                .map(|r| format!("{r} {}", plan.weight_of(r).unwrap_or(Percent::ZERO)))
                .collect();
            notes.push(format!(
                "dns has no weights: every address of {} is in the record set",
                split.join(", ")
            ));
        }
        let (current, ttls) = self.read().await?;
        let ttl_ok = ttls.iter().all(|t| *t == self.ttl);
        let changes = diff(plan, &Self::state_of(&current), &Self::state_of(&desired));
        let applied = |changed, changes, notes| Applied {
            provider: self.name.clone(),
            kind: KIND.to_owned(),
            plan_digest: plan.digest(),
            changed,
            changes,
            notes,
        };
        if current == desired && ttl_ok {
            debug!("record set already matches the plan");
            *last = Some(plan.digest());
            return Ok(applied(false, Vec::new(), notes));
        }
        if changes.is_empty() {
            notes.push(format!("ttl set to {}", self.ttl));
        }

        let mut update = Message::query();
        update.metadata.op_code = OpCode::Update;
        update.metadata.recursion_desired = false;
        let mut zone = Query::query(self.zone.clone(), RecordType::SOA);
        zone.set_query_class(DNSClass::IN);
        update.add_zone(zone);
        for rtype in [RecordType::A, RecordType::AAAA] {
            // Delete the whole rrset (class ANY, RDLENGTH 0) then add the wanted records. In one
            // message the server applies both or neither.
            let mut del = Record::update0(self.record.clone(), 0, rtype);
            del.dns_class = DNSClass::ANY;
            update.add_update(del);
        }
        for ip in &desired {
            let data = match ip {
                IpAddr::V4(v4) => RData::A(A(*v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
            };
            update.add_update(Record::from_rdata(self.record.clone(), self.ttl, data));
        }
        self.exchange(update, "update").await?;

        let (after, _) = self.read().await?;
        if after != desired {
            return Err(TrafficError::DnsVerifyMismatch {
                record: self.record.to_string(),
                expected: desired.iter().map(ToString::to_string).collect(),
                found: after.iter().map(ToString::to_string).collect(),
            });
        }
        info!(
            changes = changes.len(),
            "dns record set updated and verified"
        );
        *last = Some(plan.digest());
        Ok(applied(true, changes, notes))
    }

    #[instrument(name = "traffic_status", skip_all, fields(provider = %self.name, kind = KIND))]
    pub(super) async fn read_state(&self) -> TrafficResult<TrafficState> {
        let (ips, _) = self.read().await?;
        Ok(TrafficState {
            provider: self.name.clone(),
            kind: KIND.to_owned(),
            endpoints: Self::state_of(&ips),
            last_applied: self.last_applied.lock().await.clone(),
        })
    }
}

fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::YXDomain => "YXDOMAIN".into(),
        ResponseCode::YXRRSet => "YXRRSET".into(),
        ResponseCode::NXRRSet => "NXRRSET".into(),
        ResponseCode::NotAuth => "NOTAUTH".into(),
        ResponseCode::NotZone => "NOTZONE".into(),
        other => format!("rcode {}", u16::from(other)),
    }
}

/// One DNS-over-TCP exchange: 2-byte length prefix each way (RFC 1035 4.2.2).
async fn tcp_exchange(server: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let len = u16::try_from(request.len())
        .map_err(|_| std::io::Error::other("request larger than 64 KiB"))?;
    let mut stream = TcpStream::connect(server).await?;
    let mut framed = Vec::with_capacity(request.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(request);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut response = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut response).await?;
    Ok(response)
}
