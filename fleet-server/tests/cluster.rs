//! The leader lease of a scale-out (issue 10), on SQLite and, with `DRIFTGATE_TEST_POSTGRES`,
//! on PostgreSQL: one replica leads; when it dies without a word another takes over once the
//! lease has expired; the dead one's term lapses by its own clock, and the database refuses it
//! any further directive sequence number; a clean stop hands over at once.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_server::cluster::{keep_lease, Authority, Leadership};
use fleet_server::store::{Store, StoreError};

const LEASE: Duration = Duration::from_secs(2);

/// A replica's lease keeper, as `fleet-server run` starts it.
struct Replica {
    leadership: Arc<Leadership>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    fn start(store: &Store, name: &str) -> Replica {
        let leadership = Leadership::replica(name, LEASE);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(keep_lease(store.clone(), leadership.clone(), stopped));
        Replica {
            leadership,
            stop,
            task,
        }
    }

    fn fence(&self) -> Option<fleet_server::cluster::Fence> {
        match self.leadership.authority() {
            Some(Authority::Leader(fence)) => Some(fence),
            _ => None,
        }
    }

    async fn wait_to_lead(&self, within: Duration) -> Duration {
        let started = Instant::now();
        while !self.leadership.is_leader() {
            assert!(
                started.elapsed() < within,
                "{:?} did not lead within {within:?}",
                self.leadership.replica_name()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_passes_on_when_the_leader_dies_and_the_old_leader_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    for (engine, store) in common::stores("the_lease_passes_on", dir.path()).await {
        eprintln!("store: {engine}");
        store.insert_device(&common::device("dev-1")).await.unwrap();

        let a = Replica::start(&store, "a");
        a.wait_to_lead(Duration::from_secs(5)).await;
        let b = Replica::start(&store, "b");
        // One leader at a time.
        tokio::time::sleep(LEASE).await;
        assert!(a.leadership.is_leader() && !b.leadership.is_leader());
        let old = a.fence().expect("a leads");
        assert_eq!(
            store.next_directive_seq("dev-1", Some(&old)).await.unwrap(),
            1
        );

        // a dies without giving the lease up: its keeper stops, nothing renews.
        a.task.abort();
        let died = Instant::now();
        let took = b.wait_to_lead(LEASE * 3).await;
        eprintln!("{engine}: b leads {took:?} after a died (lease {LEASE:?})");
        assert!(
            took <= LEASE + Duration::from_secs(2),
            "takeover took {took:?}"
        );
        // a's term ended by its own clock before b's began.
        assert!(
            !a.leadership.is_leader(),
            "a still believes it leads {:?} after it stopped renewing",
            died.elapsed()
        );
        let new = b.fence().expect("b leads");
        assert!(new.epoch > old.epoch, "{new:?} after {old:?}");
        // The database refuses the old leader a sequence number, whatever it believes.
        match store.next_directive_seq("dev-1", Some(&old)).await {
            Err(StoreError::NotLeader(_)) => {}
            other => panic!("the old leader got {other:?}"),
        }
        assert_eq!(
            store.next_directive_seq("dev-1", Some(&new)).await.unwrap(),
            2
        );
        let lease = fleet_server::cluster::current_lease(&store)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lease.holder, new.holder);
        assert!(lease.holder.starts_with("b#"), "{lease:?}");

        // A clean stop hands over at once: c takes the lease within its polling interval,
        // not after a lease period.
        let c = Replica::start(&store, "c");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!c.leadership.is_leader());
        b.stop.send(true).unwrap();
        b.task.await.unwrap();
        let took = c.wait_to_lead(LEASE).await;
        eprintln!("{engine}: c leads {took:?} after b stopped cleanly");
        assert!(!b.leadership.is_leader());
        c.stop.send(true).unwrap();
        c.task.await.unwrap();
    }
}
