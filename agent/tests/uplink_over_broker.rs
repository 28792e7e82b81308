//! The outbox reaches a server through a real broker: batches on `up`, deletion only on the
//! server's ack, malformed and impossible acks dropped and counted.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_agent::config::AgentConfig;
use edge_agent::link;
use edge_agent::outbox::{self, Outbox, OutboxLimits};
use edge_agent::uplink::{self, UplinkConfig, UplinkStats};
use fleet_protocol::outbox::{Ack, Batch, Event, EventKind, Item, ItemBody};
use fleet_protocol::{decode, encode, DeviceId, TopicKind, Topics, V1};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};

fn config(port: u16, dir: &std::path::Path, device: &str) -> AgentConfig {
    common::write_public_keys(dir);
    let text = format!(
        "device_id = \"{device}\"\ndata_dir = \"data\"\n[broker]\nurl = \"mqtt://127.0.0.1:{port}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n[trust]\nrelease_keys = [\"release.pub\"]\nfleet_keys = [\"fleet.pub\"]\n"
    );
    AgentConfig::parse(&text, &dir.join("agent.toml"), dir).unwrap()
}

/// The server's side of the uplink: stores items by id (a resent item replaces itself) and
/// acks the highest id below which it holds everything. Can be told to send junk first.
struct Receiver {
    items: Arc<Mutex<BTreeMap<u64, Item>>>,
    deliveries: Arc<Mutex<u64>>,
}

impl Receiver {
    async fn start(port: u16, device: &str, junk_acks: Vec<Vec<u8>>) -> Receiver {
        let mut options = MqttOptions::new(format!("test-receiver-{device}"), "127.0.0.1", port);
        options.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let topics = Topics::default();
        let device = DeviceId::new(device).unwrap();
        client
            .subscribe(topics.topic(&device, TopicKind::Up), QoS::AtLeastOnce)
            .await
            .unwrap();
        let items = Arc::new(Mutex::new(BTreeMap::new()));
        let deliveries = Arc::new(Mutex::new(0));
        let (store, count) = (items.clone(), deliveries.clone());
        // The event loop runs in a task of its own, so the acks go out while the processing
        // task waits.
        let (batches_tx, mut batches) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                        let _ = batches_tx.send(p.payload);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::spawn(async move {
            let ack_topic = topics.topic(&device, TopicKind::Ack);
            let mut junk = junk_acks.into_iter();
            while let Some(payload) = batches.recv().await {
                let Ok(batch) = decode::<Batch>(&payload) else {
                    continue;
                };
                let up_to = {
                    let mut store = store.lock().unwrap();
                    *count.lock().unwrap() += batch.items.len() as u64;
                    for item in batch.items {
                        store.insert(item.id, item);
                    }
                    // Everything below the first gap.
                    let mut up_to = 0;
                    for id in store.keys() {
                        if *id != up_to + 1 {
                            break;
                        }
                        up_to = *id;
                    }
                    up_to
                };
                if let Some(junk) = junk.next() {
                    let _ = client
                        .publish(&ack_topic, QoS::AtLeastOnce, false, junk)
                        .await;
                    // Acks reach the uplink through a latest-wins channel: give the junk its
                    // turn before the real ack replaces it.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let ack = encode(&Ack { v: V1, up_to });
                let _ = client
                    .publish(&ack_topic, QoS::AtLeastOnce, false, ack)
                    .await;
            }
        });
        Receiver { items, deliveries }
    }
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
        assert_eq!(
            stats.bad_acks.load(Ordering::Relaxed),
            4,
            "each malformed or impossible ack is counted and dropped: {stats:?}"
        );
        eprintln!(
            "{} items in {} batches ({} deliveries at the receiver, {} resends)",
            total,
            stats.batches_sent.load(Ordering::Relaxed),
            receiver.deliveries.lock().unwrap(),
            stats.resends.load(Ordering::Relaxed)
        );
    }
}
