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
            "beyond_sent",
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
