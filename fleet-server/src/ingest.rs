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
use crate::store::{now_ms, DeviceReport, Store, StoreError};

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
        // Outbox batches and device reports are stored apart: each keeps its own order, and
        // neither kind's rows are the other's.
        let mut batches = Vec::new();
        let mut reports = Vec::new();
        for message in group {
            let kind = message.kind;
            let decoded = match kind {
                TopicKind::Up => decode_batch(&message).map(|batch| batches.push(batch)),
                _ => decode_report(message).map(|report| reports.push(report)),
            };
            if let Err(reason) = decoded {
                metrics.dropped(kind.as_str(), reason);
            }
        }
        if !reports.is_empty() {
            store_reports(&store, &metrics, &reports).await;
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
                    metrics.dropped("up", store_failure(batch.device.as_str(), &e));
                }
                return;
            }
        }
    };
    for (batch, outcome) in batches.iter().zip(outcomes) {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                metrics.dropped("up", store_failure(batch.device.as_str(), &e));
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

/// A `state` or `status` message as the update it makes; the error is the reason label it
/// is dropped with.
fn decode_report(message: DeviceMessage) -> Result<DeviceReport, &'static str> {
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
            Ok(DeviceReport::State {
                device: device.as_str().to_string(),
                json,
                agent_version: state.agent_version,
                at_ms: state.at_ms,
            })
        }
        TopicKind::Status => {
            let status: Status = decode(&payload).map_err(|e| e.label())?;
            let presence = match status.state {
                Presence::Online => "online",
                Presence::Offline => "offline",
            };
            Ok(DeviceReport::Presence {
                device: device.as_str().to_string(),
                presence,
                agent_version: status.agent_version,
                at_ms: status.at_ms,
            })
        }
        _ => Err("wrong_direction"),
    }
}

/// Stores the reports together; when that fails, one by one, so that one that cannot be
/// stored does not take the others with it.
async fn store_reports(store: &Store, metrics: &Metrics, reports: &[DeviceReport]) {
    let counted = |report: &DeviceReport| match report {
        DeviceReport::State { .. } => &metrics.states_stored,
        DeviceReport::Presence { .. } => &metrics.statuses_stored,
    };
    if reports.len() > 1 {
        match store.store_reports(reports).await {
            Ok(()) => {
                for report in reports {
                    counted(report).fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, reports = reports.len(), "storing device reports together failed; storing them one by one");
            }
        }
    }
    for report in reports {
        match store.store_reports(std::slice::from_ref(report)).await {
            Ok(()) => {
                counted(report).fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let (device, kind) = match report {
                    DeviceReport::State { device, .. } => (device, "state"),
                    DeviceReport::Presence { device, .. } => (device, "status"),
                };
                metrics.dropped(kind, store_failure(device, &e));
            }
        }
    }
}

fn store_failure(device: &str, e: &StoreError) -> &'static str {
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
