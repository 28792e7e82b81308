//! The outbox reaches a server through a real broker: batches on `up`, deletion only on the
//! server's ack, malformed and impossible acks dropped and counted.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::receiver::Receiver;
use edge_agent::config::AgentConfig;
use edge_agent::link;
use edge_agent::outbox::{self, Outbox, OutboxLimits};
use edge_agent::uplink::{self, UplinkConfig, UplinkStats};
use fleet_protocol::outbox::{Ack, Event, EventKind, ItemBody};
use fleet_protocol::{encode, V1};

fn config(port: u16, dir: &std::path::Path, device: &str) -> AgentConfig {
    common::write_public_keys(dir);
    let text = format!(
        "device_id = \"{device}\"\ndata_dir = \"data\"\n[broker]\nurl = \"mqtt://127.0.0.1:{port}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n[trust]\nrelease_keys = [\"release.pub\"]\nfleet_keys = [\"fleet.pub\"]\n"
    );
    AgentConfig::parse(&text, &dir.join("agent.toml"), dir).unwrap()
}

fn event(n: u64) -> ItemBody {
    ItemBody::Event(Event {
        model: None,
        release: Some(n),
        event: EventKind::Activated,
        detail: format!("event {n}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_arrives_and_leaves_the_outbox_only_when_acknowledged() {
    for broker in common::brokers("every_item_arrives_and_leaves_the_outbox_only_when_acknowledged")
    {
        eprintln!("broker: {}", broker.name);
        let device = "dev-uplink";
        let dir = tempfile::tempdir().unwrap();
        let config = config(broker.port, dir.path(), device);
        let junk = vec![
            b"{not json".to_vec(),
            br#"{"v": 2, "up_to": 1}"#.to_vec(),
            vec![b' '; 10_000],
            encode(&Ack {
                v: V1,
                up_to: u64::MAX,
            }),
        ];
        let receiver = Receiver::start(broker.port, device, junk).await;

        let outbox = Outbox::open(&dir.path().join("outbox.db"), OutboxLimits::default()).unwrap();
        let (outbox, _thread) = outbox::spawn(outbox);
        let total = 5_000u64;
        for n in 1..=total {
            assert!(outbox.push(n as i64, &event(n)));
        }
        let (handle, inbound, driver) = link::start(&config).unwrap();
        tokio::spawn(driver);
        let link_stats = handle.stats.clone();
        let stats = Arc::new(UplinkStats::default());
        tokio::spawn(uplink::run(
            outbox.clone(),
            handle,
            inbound.ack.clone(),
            inbound.connected.clone(),
            UplinkConfig {
                batch_items: 300,
                ..UplinkConfig::default()
            },
            stats.clone(),
        ));

        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = outbox.stats().await.unwrap().items;
            if left == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{left} items still in the outbox; {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let items = receiver.items.lock().unwrap();
        assert_eq!(items.len() as u64, total, "every item arrived");
        assert_eq!(items.keys().next(), Some(&1));
        assert_eq!(items.keys().last(), Some(&total));
        assert_eq!(items.get(&42).map(|i| &i.body), Some(&event(42)));
        assert_eq!(stats.items_acknowledged.load(Ordering::Relaxed), total);
        // The link drops what does not decode; the uplink drops an ack for ids it never sent.
        let dropped = link_stats.dropped();
        for reason in [
            "no_version",
            "unsupported_version",
            "too_large",
            "unknown_ids",
        ] {
            assert_eq!(
                dropped.get(&("ack", reason)),
                Some(&1),
                "each malformed or impossible ack is counted once and dropped: {dropped:?}"
            );
        }
        assert_eq!(dropped.len(), 4, "{dropped:?}");
        assert_eq!(stats.bad_acks.load(Ordering::Relaxed), 1, "{stats:?}");
        eprintln!(
            "{} items in {} batches ({} deliveries at the receiver, {} resends)",
            total,
            stats.batches_sent.load(Ordering::Relaxed),
            receiver.deliveries.lock().unwrap(),
            stats.resends.load(Ordering::Relaxed)
        );
    }
}

/// After a restart the server may already hold far more than the first window reaches (its
/// acks for the previous run were lost, or the window was made smaller). Its acks then name
/// ids beyond what this run has sent; they must move the uplink on, not stall it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_beyond_this_runs_window_after_a_restart_move_the_uplink_on() {
    let broker = common::embedded_broker();
    let device = "dev-uplink-restart";
    let dir = tempfile::tempdir().unwrap();
    let config = config(broker.port, dir.path(), device);
    let receiver = Receiver::start(broker.port, device, Vec::new()).await;
    let total = 3_000u64;
    let outbox = Outbox::open(&dir.path().join("outbox.db"), OutboxLimits::default()).unwrap();
    let (outbox, _thread) = outbox::spawn(outbox);
    for n in 1..=total {
        assert!(outbox.push(n as i64, &event(n)));
    }
    // The previous run delivered ids 1..=2048 and its acks were lost.
    let held: Vec<_> = outbox.next_batch(0, 2048, 1 << 20).await.unwrap();
    assert_eq!(held.len(), 2048);
    receiver
        .items
        .lock()
        .unwrap()
        .extend(held.into_iter().map(|item| (item.id, item)));

    let (handle, inbound, driver) = link::start(&config).unwrap();
    tokio::spawn(driver);
    let link_stats = handle.stats.clone();
    let stats = Arc::new(UplinkStats::default());
    tokio::spawn(uplink::run(
        outbox.clone(),
        handle,
        inbound.ack.clone(),
        inbound.connected.clone(),
        UplinkConfig {
            batch_items: 100,
            in_flight: 1,
            ..UplinkConfig::default()
        },
        stats.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while outbox.stats().await.unwrap().items > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the uplink stalled: {:?}; {stats:?}",
            outbox.stats().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.items.lock().unwrap().len() as u64, total);
    assert!(receiver.conflicts.lock().unwrap().is_empty());
    assert!(
        link_stats.dropped().is_empty(),
        "{:?}",
        link_stats.dropped()
    );
    assert_eq!(stats.bad_acks.load(Ordering::Relaxed), 0);
}
