//! Ingest: what devices send on `up`, `state` and `status`, into the store.
//!
//! An outbox batch is stored idempotently by (device, item id) in one transaction, and the
//! ack goes out only after the commit: an item the agent deletes is always in the database.
//! A message that does not decode, names another device than its topic, or comes from a
//! device the server does not know is dropped and counted; it never stops the worker.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fleet_protocol::outbox::{Ack, Batch};
use fleet_protocol::state::{Presence, State, Status};
use fleet_protocol::{decode, encode, TopicKind, V1};
use tokio::sync::mpsc;

use crate::bus::{Bus, DeviceMessage};
use crate::metrics::Metrics;
use crate::store::{now_ms, Store, StoreError};

/// One ingest worker: stores the messages of the devices routed to it, in order.
pub async fn run(
    store: Store,
    bus: Bus,
    metrics: Arc<Metrics>,
    mut messages: mpsc::Receiver<DeviceMessage>,
) {
    while let Some(message) = messages.recv().await {
        let kind = message.kind;
        if let Err(reason) = handle(&store, &bus, &metrics, message).await {
            metrics.dropped(kind.as_str(), reason);
        }
    }
}

/// Stores one message; the error is the reason label it was dropped with.
async fn handle(
    store: &Store,
    bus: &Bus,
    metrics: &Metrics,
    message: DeviceMessage,
) -> Result<(), &'static str> {
    let DeviceMessage {
        device,
        kind,
        payload,
    } = message;
    match kind {
        TopicKind::Up => {
            let batch: Batch = decode(&payload).map_err(|e| {
                tracing::warn!(%device, error = %e, "dropped an uplink batch");
                e.label()
            })?;
            if batch.device != device {
                tracing::warn!(%device, claimed = %batch.device, "dropped a batch naming another device");
                return Err("device_mismatch");
            }
            // A busy or briefly unreachable database is retried here: otherwise the batch
            // would wait for the agent's ack timeout to come round again.
            let mut attempt = 0;
            let outcome = loop {
                match store.ingest_batch(&batch, now_ms()).await {
                    Ok(outcome) => break outcome,
                    Err(StoreError::Sql(e)) if attempt < 3 => {
                        attempt += 1;
                        tracing::warn!(%device, error = %e, attempt, "storing a batch failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(50 << (2 * attempt)))
                            .await;
                    }
                    Err(e) => return Err(store_failure(&device, &e)),
                }
            };
            metrics.batches_ingested.fetch_add(1, Ordering::Relaxed);
            metrics
                .items_stored
                .fetch_add(outcome.stored, Ordering::Relaxed);
            metrics
                .items_duplicate
                .fetch_add(outcome.duplicates, Ordering::Relaxed);
            if outcome.ack_up_to > 0 {
                let ack = encode(&Ack {
                    v: V1,
                    up_to: outcome.ack_up_to,
                });
                if bus.publish(&device, TopicKind::Ack, ack).await.is_ok() {
                    metrics.acks_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        }
        TopicKind::State => {
            let state: State = decode(&payload).map_err(|e| e.label())?;
            if state.device != device {
                return Err("device_mismatch");
            }
            let json = serde_json::to_string(&state).map_err(|_| "unencodable")?;
            store
                .set_state(device.as_str(), &json, &state.agent_version, state.at_ms)
                .await
                .map_err(|e| store_failure(&device, &e))?;
            metrics.states_stored.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        TopicKind::Status => {
            let status: Status = decode(&payload).map_err(|e| e.label())?;
            let presence = match status.state {
                Presence::Online => "online",
                Presence::Offline => "offline",
            };
            store
                .set_presence(
                    device.as_str(),
                    presence,
                    &status.agent_version,
                    status.at_ms,
                )
                .await
                .map_err(|e| store_failure(&device, &e))?;
            metrics.statuses_stored.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        _ => Err("wrong_direction"),
    }
}

fn store_failure(device: &fleet_protocol::DeviceId, e: &StoreError) -> &'static str {
    match e {
        StoreError::Conflict(_) => {
            tracing::warn!(%device, "dropped a message from a device that is not enrolled");
            "unknown_device"
        }
        other => {
            // Not acked: the agent resends, and nothing is lost.
            tracing::error!(%device, error = %other, "could not store a device message");
            "store_failed"
        }
    }
}
