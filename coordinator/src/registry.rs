//! The leader's in-memory view of live agent sessions.
//!
//! Why in memory and not in the log: heartbeats, check details and facts are REPORTED, not
//! decided. Ten thousand agents at one heartbeat a second must cost ten thousand map
//! updates, not ten thousand Raft writes; only transitions (host up/down, a check changing
//! state) are proposed to the log, by the session handler and the failure detector.
//!
//! Design for 10,000 sessions: the map is split into [`SHARDS`] `std::sync::Mutex`
//! shards keyed by a hash of the host id, so heartbeats of different hosts rarely contend.
//! No lock is ever held across an `.await` (every method is synchronous and short).
//!
//! A session that ends is not forgotten at once: the entry stays with `connected = false`
//! and its last heartbeat time, so the failure detector can give an agent `down_after` to
//! come back (a reconnect after a network blip must not flap the host down and up).
//!
//! Command events (ack, progress, result) are also published here on a broadcast channel,
//! so RunAction handlers on the leader can stream progress without a Raft round trip.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dr_proto::pb;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Number of lock shards.
pub const SHARDS: usize = 64;
/// Buffered command events for in-memory subscribers; a slow subscriber that falls behind
/// loses progress messages (results are committed, so it can re-read them).
const EVENT_BUFFER: usize = 4096;

/// One message to an agent session, boxed. Why boxed: tokio's channel allocates its slots
/// 32 at a time and keeps the first block for as long as the channel lives, and a bare
/// `Result<CoordinatorMessage, Status>` is a few hundred bytes, so every idle session held
/// ~4-8 KiB of slots (~40-80 MB at 10,000 sessions, issue 2 fan-in). Boxed, a block is 32
/// pointers; the one allocation per message (about one a second) is cheap.
pub type SessionItem = Box<Result<pb::CoordinatorMessage, tonic::Status>>;

/// Messages to one agent session.
pub type SessionTx = mpsc::Sender<SessionItem>;

/// Identifies one session of a host, so a stale session ending cannot remove a newer one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a Hello told us about the host.
#[derive(Clone, Debug, Default)]
pub struct HostInfo {
    pub region: String,
    pub site: String,
    pub roles: Vec<String>,
    pub version: String,
    pub incarnation: u64,
    pub labels: HashMap<String, String>,
}

/// A host's live entry.
#[derive(Debug)]
struct Entry {
    session: SessionId,
    tx: Option<SessionTx>,
    cancel: CancellationToken,
    info: HostInfo,
    connected_to: u64,
    last_heartbeat: Instant,
    last_heartbeat_unix_ms: i64,
    checks: BTreeMap<String, pb::CheckResult>,
    facts: HashMap<String, String>,
}

/// A copy of a host's live entry, without the channel.
#[derive(Clone, Debug)]
pub struct SessionView {
    pub host_id: String,
    pub session: SessionId,
    pub connected: bool,
    pub info: HostInfo,
    pub connected_to: u64,
    pub last_heartbeat: Instant,
    pub last_heartbeat_unix_ms: i64,
    pub checks: BTreeMap<String, pb::CheckResult>,
    pub facts: HashMap<String, String>,
}

/// A host's live entry, borrowed for the length of a [`Registry::for_each`] call.
#[derive(Clone, Copy, Debug)]
pub struct EntryRef<'a> {
    pub host_id: &'a str,
    pub connected: bool,
    pub info: &'a HostInfo,
    pub last_heartbeat: Instant,
    pub checks: &'a BTreeMap<String, pb::CheckResult>,
    pub facts: &'a HashMap<String, String>,
}

/// Something an agent reported about a command, for in-memory subscribers.
#[derive(Clone, Debug)]
pub enum CommandEvent {
    Acked {
        key: String,
        host_id: String,
        at_unix_ms: i64,
    },
    Progress {
        key: String,
        host_id: String,
        progress: pb::CommandProgress,
    },
    Result {
        key: String,
        host_id: String,
        result: pb::CommandResult,
    },
}

impl CommandEvent {
    pub fn key(&self) -> &str {
        match self {
            CommandEvent::Acked { key, .. }
            | CommandEvent::Progress { key, .. }
            | CommandEvent::Result { key, .. } => key,
        }
    }
}

/// Live sessions of the agents connected to this node.
pub struct Registry {
    shards: Box<[Mutex<HashMap<String, Entry>>]>,
    hasher: RandomState,
    next_session: AtomicU64,
    /// Entries with an open session, kept under the shard locks: session start and end
    /// update the gauge, and counting 10,000 entries there made each O(hosts).
    connected: AtomicUsize,
    events: broadcast::Sender<CommandEvent>,
    /// Reference point for `confirmed_ms`.
    base: Instant,
    /// When the last successful quorum confirmation of our leadership STARTED, as
    /// milliseconds after `base` plus one (0: not confirmed in this term).
    confirmed_ms: AtomicU64,
    /// Cancelled when the process starts shutting down: sessions are refused and action
    /// streams end, so the gRPC server has nothing long-lived left to wait for.
    closing: CancellationToken,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("sessions", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(HashMap::new()))
            .collect::<Vec<_>>();
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Registry {
            shards: shards.into_boxed_slice(),
            hasher: RandomState::new(),
            next_session: AtomicU64::new(1),
            connected: AtomicUsize::new(0),
            events,
            base: Instant::now(),
            confirmed_ms: AtomicU64::new(0),
            closing: CancellationToken::new(),
        }
    }

    /// First shutdown step: refuse new sessions, end action streams (through
    /// [`Registry::closing`]) and close every session with `msg` (a Redirect).
    pub fn begin_shutdown(&self, msg: &pb::CoordinatorMessage) -> usize {
        self.closing.cancel();
        self.close_all(msg)
    }

    /// Whether [`Registry::begin_shutdown`] was called.
    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Fires when the process starts shutting down.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    fn shard(&self, host_id: &str) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        let i = (self.hasher.hash_one(host_id) as usize) % self.shards.len();
        // A poisoned shard only means another thread panicked mid-update of plain data; the
        // map itself is still usable, so keep serving rather than cascading the panic.
        self.shards[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new session for `host_id`, replacing (and cancelling) any older one.
    /// Returns the session id and the token that ends the session when cancelled.
    pub fn register(
        &self,
        host_id: &str,
        info: HostInfo,
        tx: SessionTx,
        connected_to: u64,
        now: Instant,
        now_unix_ms: i64,
    ) -> (SessionId, CancellationToken) {
        let session = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed));
        let cancel = CancellationToken::new();
        let entry = Entry {
            session,
            tx: Some(tx),
            cancel: cancel.clone(),
            info,
            connected_to,
            last_heartbeat: now,
            last_heartbeat_unix_ms: now_unix_ms,
            checks: BTreeMap::new(),
            facts: HashMap::new(),
        };
        let old = {
            let mut shard = self.shard(host_id);
            let old = shard.insert(host_id.to_owned(), entry);
            if old.as_ref().is_none_or(|o| o.tx.is_none()) {
                self.connected.fetch_add(1, Ordering::Relaxed);
            }
            old
        };
        if let Some(old) = old {
            old.cancel.cancel();
        }
        (session, cancel)
    }

    /// Records a heartbeat. Returns false when `session` is no longer the host's session.
    pub fn heartbeat(
        &self,
        host_id: &str,
        session: SessionId,
        now: Instant,
        now_unix_ms: i64,
        checks: &[pb::CheckResult],
        facts: &HashMap<String, String>,
    ) -> bool {
        let mut shard = self.shard(host_id);
        let Some(e) = shard
            .get_mut(host_id)
            .filter(|e| e.session == session && e.tx.is_some())
        else {
            return false;
        };
        e.last_heartbeat = now;
        e.last_heartbeat_unix_ms = now_unix_ms;
        // Hot path (10,000 agents x 1/s): overwrite in place so a steady heartbeat reuses
        // the strings it already holds instead of allocating new ones.
        for c in checks {
            match e.checks.get_mut(&c.name) {
                Some(old) => old.clone_from(c),
                None => {
                    e.checks.insert(c.name.clone(), c.clone());
                }
            }
        }
        if !facts.is_empty() && e.facts != *facts {
            e.facts.clone_from(facts);
        }
        true
    }

    /// Marks the session ended (only if it is still the host's current one). The entry is
    /// kept, disconnected, for the failure detector.
    pub fn disconnect(&self, host_id: &str, session: SessionId) {
        let mut shard = self.shard(host_id);
        if let Some(e) = shard.get_mut(host_id).filter(|e| e.session == session) {
            if e.tx.take().is_some() {
                self.connected.fetch_sub(1, Ordering::Relaxed);
            }
            e.cancel.cancel();
        }
    }

    /// Forgets a host entirely (e.g. after it was committed down).
    pub fn forget(&self, host_id: &str) {
        let removed = {
            let mut shard = self.shard(host_id);
            let e = shard.remove(host_id);
            if e.as_ref().is_some_and(|e| e.tx.is_some()) {
                self.connected.fetch_sub(1, Ordering::Relaxed);
            }
            e
        };
        if let Some(e) = removed {
            e.cancel.cancel();
        }
    }

    /// The sender of the host's live session, if connected.
    pub fn sender(&self, host_id: &str) -> Option<SessionTx> {
        self.shard(host_id).get(host_id).and_then(|e| e.tx.clone())
    }

    pub fn view(&self, host_id: &str) -> Option<SessionView> {
        self.shard(host_id).get(host_id).map(|e| view(host_id, e))
    }

    /// Calls `f` with every entry, borrowed under its shard's lock (so `f` must be short and
    /// must not block). Why not [`Registry::views`]: controllers that look at every host
    /// several times a second (security alerts every 500 ms, the region detector every
    /// 200 ms) copied all 10,000 entries with their check maps each time, which was a third
    /// of the leader's CPU at 10,000 sessions (perf, issue 2 fan-in); they only need a few
    /// fields of a few hosts.
    pub fn for_each(&self, mut f: impl FnMut(EntryRef<'_>)) {
        for shard in self.shards.iter() {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (h, e) in shard.iter() {
                f(EntryRef {
                    host_id: h,
                    connected: e.tx.is_some(),
                    info: &e.info,
                    last_heartbeat: e.last_heartbeat,
                    checks: &e.checks,
                    facts: &e.facts,
                });
            }
        }
    }

    /// A copy of every entry (for status pages, on request; O(hosts) allocations, so not for
    /// periodic controllers: see [`Registry::for_each`]).
    pub fn views(&self) -> Vec<SessionView> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            out.extend(shard.iter().map(|(h, e)| view(h, e)));
        }
        out
    }

    /// Hosts whose last sign of life (heartbeat, or session start) is at least `silent_for`
    /// before `now`, with the time of that last sign.
    pub fn silent(&self, now: Instant, silent_for: Duration) -> Vec<(String, Instant, bool)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (h, e) in shard.iter() {
                if now.saturating_duration_since(e.last_heartbeat) >= silent_for {
                    out.push((h.clone(), e.last_heartbeat, e.tx.is_some()));
                }
            }
        }
        out
    }

    /// Last sign of life of a host and whether its session is open, without copying the
    /// entry: the failure detector asks this for every up host every tick (10,000 hosts
    /// once a second), where [`Registry::view`] would clone each host's checks and facts.
    pub fn liveness(&self, host_id: &str) -> Option<(Instant, bool)> {
        self.shard(host_id)
            .get(host_id)
            .map(|e| (e.last_heartbeat, e.tx.is_some()))
    }

    /// Last heartbeat of a host, connected or not.
    pub fn last_seen(&self, host_id: &str) -> Option<Instant> {
        self.shard(host_id).get(host_id).map(|e| e.last_heartbeat)
    }

    /// Number of connected sessions.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Number of entries, connected or not.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends `msg` to every connected session, then ends them all and forgets every entry.
    /// Used when this node stops leading: agents must follow the new leader, and a later
    /// term must not inherit this term's heartbeat history.
    pub fn close_all(&self, msg: &pb::CoordinatorMessage) -> usize {
        self.clear_leadership();
        let mut closed = 0;
        for shard in self.shards.iter() {
            let entries: Vec<Entry> = {
                let mut shard = shard
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let entries: Vec<Entry> = shard.drain().map(|(_, e)| e).collect();
                let open = entries.iter().filter(|e| e.tx.is_some()).count();
                self.connected.fetch_sub(open, Ordering::Relaxed);
                entries
            };
            for e in entries {
                if let Some(tx) = &e.tx {
                    // Best effort: a full or closed channel means the agent is gone or
                    // stuck; cancelling ends the stream either way.
                    if tx.try_send(Box::new(Ok(msg.clone()))).is_ok() {
                        closed += 1;
                    }
                }
                e.cancel.cancel();
            }
        }
        closed
    }

    /// Records that a quorum confirmed our leadership in a round that started at `started`.
    pub fn confirm_leadership(&self, started: Instant) {
        let ms = u64::try_from(started.saturating_duration_since(self.base).as_millis())
            .unwrap_or(u64::MAX - 1)
            + 1;
        self.confirmed_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Whether leadership was confirmed by a round that started within `max` before `now`.
    /// Leases are renewed only then (DESIGN.md, fencing): a deposed leader cut off with an
    /// old primary must not keep that primary alive.
    pub fn leadership_confirmed_within(&self, now: Instant, max: Duration) -> bool {
        match self.confirmed_ms.load(Ordering::Acquire) {
            0 => false,
            ms => {
                let at = self.base + Duration::from_millis(ms - 1);
                now.saturating_duration_since(at) <= max
            }
        }
    }

    /// Forgets the confirmation (on leaving leadership).
    pub fn clear_leadership(&self) {
        self.confirmed_ms.store(0, Ordering::Release);
    }

    /// Publishes a command event to in-memory subscribers (no-op without subscribers).
    pub fn publish(&self, event: CommandEvent) {
        // An error only means nobody is listening.
        self.events.send(event).ok();
    }

    pub fn subscribe(&self) -> broadcast::Receiver<CommandEvent> {
        self.events.subscribe()
    }
}

fn view(host_id: &str, e: &Entry) -> SessionView {
    SessionView {
        host_id: host_id.to_owned(),
        session: e.session,
        connected: e.tx.is_some(),
        info: e.info.clone(),
        connected_to: e.connected_to,
        last_heartbeat: e.last_heartbeat,
        last_heartbeat_unix_ms: e.last_heartbeat_unix_ms,
        checks: e.checks.clone(),
        facts: e.facts.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, state: pb::CheckState) -> pb::CheckResult {
        pb::CheckResult {
            name: name.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    fn chan() -> (SessionTx, mpsc::Receiver<SessionItem>) {
        mpsc::channel(8)
    }

    #[test]
    fn t10_register_heartbeat_disconnect() {
        let r = Registry::new();
        let t0 = Instant::now();
        let (tx, _rx) = chan();
        let (s1, cancel) = r.register("h1", HostInfo::default(), tx, 1, t0, 1000);
        assert_eq!((r.len(), r.connected()), (1, 1));
        assert!(r.sender("h1").is_some());

        let t1 = t0 + Duration::from_secs(1);
        assert!(r.heartbeat(
            "h1",
            s1,
            t1,
            2000,
            &[check("pg", pb::CheckState::Passing)],
            &HashMap::new()
        ));
        let v = r.view("h1").unwrap();
        assert_eq!(
            (v.last_heartbeat, v.last_heartbeat_unix_ms, v.checks.len()),
            (t1, 2000, 1)
        );

        r.disconnect("h1", s1);
        assert!(cancel.is_cancelled());
        assert!(r.sender("h1").is_none());
        assert_eq!(
            (r.len(), r.connected()),
            (1, 0),
            "entry kept for the failure detector"
        );
        assert!(
            !r.heartbeat("h1", s1, t1, 2000, &[], &HashMap::new()),
            "a closed session cannot heartbeat"
        );
    }

    #[test]
    fn t20_newer_session_wins() {
        let r = Registry::new();
        let t0 = Instant::now();
        let (tx1, _rx1) = chan();
        let (tx2, _rx2) = chan();
        let (s1, c1) = r.register("h1", HostInfo::default(), tx1, 1, t0, 0);
        let (s2, c2) = r.register("h1", HostInfo::default(), tx2, 1, t0, 0);
        assert!(c1.is_cancelled(), "the replaced session is told to end");
        assert!(!r.heartbeat("h1", s1, t0, 0, &[], &HashMap::new()));
        r.disconnect("h1", s1);
        assert!(
            !c2.is_cancelled(),
            "a stale session ending does not touch the new one"
        );
        assert!(r.heartbeat("h1", s2, t0, 0, &[], &HashMap::new()));
    }

    #[test]
    fn t30_silent_hosts() {
        let r = Registry::new();
        let t0 = Instant::now();
        for (h, offset) in [("a", 0), ("b", 3), ("c", 6)] {
            let (tx, rx) = chan();
            std::mem::forget(rx);
            r.register(
                h,
                HostInfo::default(),
                tx,
                1,
                t0 + Duration::from_secs(offset),
                0,
            );
        }
        let mut silent: Vec<String> = r
            .silent(t0 + Duration::from_secs(8), Duration::from_secs(5))
            .into_iter()
            .map(|(h, _, _)| h)
            .collect();
        silent.sort();
        assert_eq!(silent, vec!["a", "b"]);
    }

    #[tokio::test]
    async fn t40_close_all_redirects_and_forgets() {
        let r = Registry::new();
        let t0 = Instant::now();
        let (tx, mut rx) = chan();
        let (_, cancel) = r.register("h1", HostInfo::default(), tx, 1, t0, 0);
        let msg = pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Redirect(pb::Redirect {
                leader_id: 2,
                leader_endpoint: "127.0.0.1:7002".into(),
                reason: "leadership lost".into(),
            })),
        };
        assert_eq!(r.close_all(&msg), 1);
        assert!(cancel.is_cancelled());
        assert!(r.is_empty());
        let got = rx.recv().await.unwrap().unwrap();
        assert_eq!(got, msg);
    }

    #[tokio::test]
    async fn t50_events_reach_subscribers() {
        let r = Registry::new();
        r.publish(CommandEvent::Acked {
            key: "lost".into(),
            host_id: "h".into(),
            at_unix_ms: 0,
        });
        let mut sub = r.subscribe();
        r.publish(CommandEvent::Acked {
            key: "k".into(),
            host_id: "h".into(),
            at_unix_ms: 1,
        });
        assert_eq!(sub.recv().await.unwrap().key(), "k");
    }

    #[test]
    fn t55_leadership_confirmation_window() {
        let r = Registry::new();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert!(!r.leadership_confirmed_within(t0, s(1)));
        r.confirm_leadership(t0 + s(2));
        r.confirm_leadership(t0 + s(1)); // an older round finishing late does not go back
        assert!(r.leadership_confirmed_within(t0 + Duration::from_millis(2900), s(1)));
        assert!(!r.leadership_confirmed_within(t0 + s(4), s(1)));
        r.clear_leadership();
        assert!(!r.leadership_confirmed_within(t0 + s(2), s(1)));
    }

    #[test]
    fn t60_many_sessions() {
        let r = Registry::new();
        let t0 = Instant::now();
        let mut rxs = Vec::new();
        for i in 0..10_000 {
            let (tx, rx) = chan();
            rxs.push(rx);
            r.register(&format!("host-{i}"), HostInfo::default(), tx, 1, t0, 0);
        }
        assert_eq!(r.connected(), 10_000);
        assert_eq!(r.views().len(), 10_000);
    }

    /// `for_each` sees every entry once, with what `views` would copy (the periodic
    /// controllers moved to it from `views`).
    #[test]
    fn t62_for_each_borrows_what_views_copies() {
        let r = Registry::new();
        let t0 = Instant::now();
        let mut rxs = Vec::new();
        let mut sids = Vec::new();
        for i in 0..200 {
            let (tx, rx) = chan();
            rxs.push(rx);
            let info = HostInfo {
                region: if i % 2 == 0 { "beijing" } else { "shanghai" }.into(),
                ..Default::default()
            };
            sids.push(r.register(&format!("h{i}"), info, tx, 1, t0, 0).0);
        }
        let facts: HashMap<String, String> = [("role".to_owned(), "primary".to_owned())].into();
        let checks = [check("pg", pb::CheckState::Failing)];
        assert!(r.heartbeat("h7", sids[7], t0, 1, &checks, &facts));
        r.disconnect("h9", sids[9]);

        let mut seen = BTreeMap::new();
        r.for_each(|e| {
            let prev = seen.insert(
                e.host_id.to_owned(),
                (
                    e.connected,
                    e.info.region.clone(),
                    e.checks.len(),
                    e.facts.get("role").cloned(),
                ),
            );
            assert!(prev.is_none(), "{} seen twice", e.host_id);
        });
        assert_eq!(seen.len(), 200);
        for v in r.views() {
            let (connected, region, checks, role) = &seen[&v.host_id];
            assert_eq!(*connected, v.connected, "{}", v.host_id);
            assert_eq!(*region, v.info.region);
            assert_eq!(*checks, v.checks.len());
            assert_eq!(*role, v.facts.get("role").cloned());
        }
        assert_eq!(
            seen["h7"],
            (true, "shanghai".into(), 1, Some("primary".into()))
        );
        assert!(!seen["h9"].0);
    }

    /// The connected counter agrees with the entries through every way a session starts
    /// and ends (it replaced a count over all entries at every session start and end).
    #[tokio::test]
    async fn t65_connected_counter_matches_entries() {
        let r = Registry::new();
        let t0 = Instant::now();
        let count = |r: &Registry| r.views().iter().filter(|v| v.connected).count();
        let mut rxs = Vec::new();
        let mut sids = Vec::new();
        for i in 0..100 {
            let (tx, rx) = chan();
            rxs.push(rx);
            sids.push(
                r.register(&format!("h{i}"), HostInfo::default(), tx, 1, t0, 0)
                    .0,
            );
        }
        assert_eq!((r.connected(), count(&r)), (100, 100));
        // A newer session of a connected host replaces it: still one.
        let (tx, rx) = chan();
        rxs.push(rx);
        let newer = r.register("h0", HostInfo::default(), tx, 1, t0, 0).0;
        assert_eq!((r.connected(), count(&r)), (100, 100));
        // The replaced session ending later changes nothing; the current one ending does.
        r.disconnect("h0", sids[0]);
        assert_eq!((r.connected(), count(&r)), (100, 100));
        r.disconnect("h0", newer);
        r.disconnect("h0", newer);
        assert_eq!((r.connected(), count(&r)), (99, 99));
        // A disconnected host reconnecting counts again; forgetting counts only open ones.
        let (tx, rx) = chan();
        rxs.push(rx);
        r.register("h0", HostInfo::default(), tx, 1, t0, 0);
        r.disconnect("h1", sids[1]);
        r.forget("h1");
        r.forget("h2");
        r.forget("nobody");
        assert_eq!((r.connected(), count(&r)), (98, 98));
        let msg = pb::CoordinatorMessage::default();
        assert_eq!(r.close_all(&msg), 98);
        assert_eq!((r.connected(), count(&r), r.len()), (0, 0, 0));
    }
}
