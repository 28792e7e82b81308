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

/// Most queued uplink batches stored in one transaction.
const MAX_GROUP: usize = 32;

/// One ingest worker: stores the messages of the devices routed to it, in order. Batches
/// that queued up while the last commit ran are stored together, in one transaction.
pub async fn run(
    store: Store,
    bus: Bus,
    metrics: Arc<Metrics>,
    mut messages: mpsc::Receiver<DeviceMessage>,
) {
    while let Some(first) = messages.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match messages.try_recv() {
                Ok(message) => group.push(message),
                Err(_) => break,
            }
        }
        let mut batches = Vec::new();
        for message in group {
            let kind = message.kind;
            if kind == TopicKind::Up {
                match decode_batch(&message) {
                    Ok(batch) => batches.push(batch),
                    Err(reason) => metrics.dropped("up", reason),
                }
            } else if let Err(reason) = handle(&store, &metrics, message).await {
                metrics.dropped(kind.as_str(), reason);
            }
        }
        if !batches.is_empty() {
            store_batches(&store, &bus, &metrics, &batches).await;
        }
    }
}

fn decode_batch(message: &DeviceMessage) -> Result<Batch, &'static str> {
    let device = &message.device;
    let batch: Batch = decode(&message.payload).map_err(|e| {
        tracing::warn!(%device, error = %e, "dropped an uplink batch");
        e.label()
    })?;
    if batch.device != *device {
        tracing::warn!(%device, claimed = %batch.device, "dropped a batch naming another device");
        return Err("device_mismatch");
    }
    Ok(batch)
}

/// Stores the batches in one transaction and acks each after the commit. A busy or briefly
/// unreachable database is retried here: otherwise the batches would wait for the agents'
/// ack timeouts to come round again. Nothing is acked that was not committed.
async fn store_batches(store: &Store, bus: &Bus, metrics: &Metrics, batches: &[Batch]) {
    let refs: Vec<&Batch> = batches.iter().collect();
    let mut attempt = 0;
    let outcomes = loop {
        match store.ingest_batches(&refs, now_ms()).await {
            Ok(outcomes) => break outcomes,
            Err(StoreError::Sql(e)) if attempt < 3 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, batches = batches.len(), "storing batches failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50 << (2 * attempt))).await;
            }
            Err(e) => {
                for batch in batches {
                    metrics.dropped("up", store_failure(&batch.device, &e));
                }
                return;
            }
        }
    };
    for (batch, outcome) in batches.iter().zip(outcomes) {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                metrics.dropped("up", store_failure(&batch.device, &e));
                continue;
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
            // Never waiting on the session: its event loop may be waiting on this worker.
            bus.publish_detached(&batch.device, TopicKind::Ack, ack);
            metrics.acks_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Stores a `state` or `status` message; the error is the reason label it was dropped with.
async fn handle(
    store: &Store,
    metrics: &Metrics,
    message: DeviceMessage,
) -> Result<(), &'static str> {
    let DeviceMessage {
        device,
        kind,
        payload,
    } = message;
    match kind {
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
