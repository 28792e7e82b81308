//! The server's side of the uplink for tests: stores items by id and acks them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_protocol::outbox::{Ack, Batch, Item};
use fleet_protocol::{decode, encode, DeviceId, TopicKind, Topics, V1};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};

/// The server's side of the uplink: stores items by id (a resent item is stored once) and
/// acks by the server's rule: a batch that follows on from what was acked (its `after` is at
/// most the acked id) moves the ack to its last id; any other batch gets the old ack again,
/// so a lost batch is resent rather than skipped. Ids the outbox evicted leave gaps that
/// never close, which is why "everything below the first gap" would not do. Can be told to
/// send junk first.
pub struct Receiver {
    pub items: Arc<Mutex<BTreeMap<u64, Item>>>,
    /// Items received, resends included.
    pub deliveries: Arc<Mutex<u64>>,
    /// Ids that arrived again with other contents: the agent reused an id. The first copy is
    /// kept, as a server storing by (device, id) would.
    pub conflicts: Arc<Mutex<Vec<u64>>>,
    /// The highest `up_to` acked so far.
    pub acked: Arc<AtomicU64>,
}

impl Receiver {
    pub async fn start(port: u16, device: &str, junk_acks: Vec<Vec<u8>>) -> Receiver {
        let mut options = MqttOptions::new(format!("test-receiver-{device}"), "127.0.0.1", port);
        options.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let topics = Topics::default();
        let device = DeviceId::new(device).unwrap();
        let up_topic = topics.topic(&device, TopicKind::Up);
        let items = Arc::new(Mutex::new(BTreeMap::new()));
        let deliveries = Arc::new(Mutex::new(0));
        let conflicts = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(AtomicU64::new(0));
        let (store, count, conflicted, acked_up_to) = (
            items.clone(),
            deliveries.clone(),
            conflicts.clone(),
            acked.clone(),
        );
        // The event loop runs in a task of its own, so the acks go out while the processing
        // task waits.
        let (batches_tx, mut batches) = tokio::sync::mpsc::unbounded_channel();
        // Subscribes on every ConnAck: a reconnect of this clean-session client would
        // otherwise leave it deaf, and a test waiting for items would time out for a reason
        // that is not the agent's.
        let subscriber = client.clone();
        let (subscribed_tx, mut subscribed) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                        if let Err(e) = subscriber.try_subscribe(&up_topic, QoS::AtLeastOnce) {
                            eprintln!("receiver: cannot subscribe to {up_topic}: {e}");
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                        subscribed_tx.send_replace(true);
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                        let _ = batches_tx.send(p.payload);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("receiver: connection to the broker lost: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                }
            }
        });
        // Batches published before the subscription would wait for the agent's ack timeout.
        tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|done| *done))
            .await
            .expect("the receiver subscribed within 10 s")
            .expect("the receiver's event loop runs");
        tokio::spawn(async move {
            let ack_topic = topics.topic(&device, TopicKind::Ack);
            let mut junk = junk_acks.into_iter();
            while let Some(payload) = batches.recv().await {
                let batch = match decode::<Batch>(&payload) {
                    Ok(batch) => batch,
                    Err(e) => {
                        // A server would drop it and never ack: say why, so a test that then
                        // times out is not a mystery.
                        eprintln!("receiver: dropped a batch of {} bytes: {e}", payload.len());
                        continue;
                    }
                };
                let last = batch.items.last().map_or(0, |item| item.id);
                let follows_on = batch
                    .after
                    .is_none_or(|after| after <= acked_up_to.load(Ordering::Relaxed));
                {
                    let mut store = store.lock().unwrap();
                    *count.lock().unwrap() += batch.items.len() as u64;
                    for item in batch.items {
                        match store.get(&item.id) {
                            Some(stored) if *stored != item => {
                                conflicted.lock().unwrap().push(item.id);
                            }
                            Some(_) => {}
                            None => {
                                store.insert(item.id, item);
                            }
                        }
                    }
                }
                if let Some(junk) = junk.next() {
                    let _ = client
                        .publish(&ack_topic, QoS::AtLeastOnce, false, junk)
                        .await;
                    // Acks reach the uplink through a latest-wins channel: give the junk its
                    // turn before the real ack replaces it.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if follows_on {
                    acked_up_to.fetch_max(last, Ordering::Relaxed);
                }
                let up_to = acked_up_to.load(Ordering::Relaxed);
                if up_to == 0 {
                    continue;
                }
                let ack = encode(&Ack { v: V1, up_to });
                let _ = client
                    .publish(&ack_topic, QoS::AtLeastOnce, false, ack)
                    .await;
            }
        });
        Receiver {
            items,
            deliveries,
            conflicts,
            acked,
        }
    }
}
