//! Storage tests: openraft's conformance suite on the SQLite log store and the state
//! machine store, plus restart behaviour (snapshot reload, durable vote and log).

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{RaftLogReader, RaftSnapshotBuilder};

use super::log_store::LogStore;
use super::state_machine::StateMachineStore;
use super::typ::{StorageError, TypeConfig};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(&dir.path().join("raft.db"))
            .await
            .expect("open log store");
        let sm = StateMachineStore::open(&dir.path().join("snapshots"))
            .await
            .expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn t10_conformance_suite() {
    Suite::test_all(Builder).expect("openraft storage conformance suite");
}

fn request(i: u64) -> crate::state::Request {
    crate::state::Request {
        at_unix_ms: 1_700_000_000_000,
        origin: "spiffe://test/coordinator/1".into(),
        cmd: crate::state::Command::HostUp {
            host_id: format!("h{i}"),
            region: "beijing".into(),
            site: "bj-1".into(),
            roles: vec!["app".into()],
            version: "test".into(),
            incarnation: 1,
        },
    }
}

#[tokio::test]
async fn t11_restart_reloads_snapshot_log_and_vote() {
    let dir = tempfile::tempdir().unwrap();
    let log_id = |i| openraft::testing::log_id(1, 1, i);
    {
        let mut log = LogStore::open(&dir.path().join("raft.db")).await.unwrap();
        let mut sm = StateMachineStore::open(&dir.path().join("snapshots"))
            .await
            .unwrap();
        log.save_vote(&openraft::Vote::new_committed(1, 1))
            .await
            .unwrap();
        let entries: Vec<_> = (1..=5)
            .map(|i| openraft::Entry::<TypeConfig> {
                log_id: log_id(i),
                payload: openraft::EntryPayload::Normal(request(i)),
            })
            .collect();
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, entries.clone())
            .await
            .unwrap();
        sm.apply(entries[..3].to_vec()).await.unwrap();
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(3)));
        sm.apply(entries[3..].to_vec()).await.unwrap();
        assert_eq!(*sm.shared().applied().borrow(), 5);
        log.close().await;
    }
    // "Restart": the state machine comes back at the snapshot; openraft replays 4..=5.
    let mut log = LogStore::open(&dir.path().join("raft.db")).await.unwrap();
    let mut sm = StateMachineStore::open(&dir.path().join("snapshots"))
        .await
        .unwrap();
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(openraft::Vote::new_committed(1, 1))
    );
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(5)));
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(3)));
    assert_eq!(sm.shared().read(|s| s.hosts.len()), 3);
    assert_eq!(*sm.shared().applied().borrow(), 3);
    let current = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("snapshot reloaded");
    assert_eq!(current.meta.last_log_id, Some(log_id(3)));
    let rest = log.try_get_log_entries(4..).await.unwrap();
    assert_eq!(rest.len(), 2);
    // Exactly one snapshot file, no temporary leftovers.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        names[0].starts_with("snapshot-00000000000000000003-"),
        "{names:?}"
    );
}
