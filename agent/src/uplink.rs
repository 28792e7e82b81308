//! The uplink: sends the outbox to the server in batches on the `up` topic and deletes items
//! only when the server's ack for them arrives.
//!
//! At most `in_flight` batches are unacknowledged at a time. The server acks "everything up to
//! id N"; the outbox then deletes those items. A reconnect, or an ack that does not come in
//! time, rewinds to the last acked id and sends again: the server stores items by (device, id),
//! so a resent item is never counted twice. A malformed ack is dropped and counted; it changes
//! nothing. So is an ack for ids the outbox never gave. An ack beyond what this run has sent
//! but within the ids given (the server stored batches of a previous run whose ack was lost)
//! deletes what this run sent, and sending goes on from there.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::outbox::{Ack, Batch};
use fleet_protocol::{decode, encode, limits, TopicKind, V1};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::link::LinkHandle;
use crate::outbox::{OutboxHandle, OutboxUnavailable};

/// How the uplink paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkConfig {
    /// Items per batch at most.
    pub batch_items: usize,
    /// Bytes of item bodies per batch, about (a single larger item still goes alone).
    pub batch_bytes: usize,
    /// Batches sent and not yet acknowledged, at most.
    pub in_flight: usize,
    /// An ack this late rewinds and resends from the last acknowledged id.
    pub ack_timeout: Duration,
    /// How often an idle uplink looks for new items.
    pub poll: Duration,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            batch_items: 512,
            batch_bytes: 256 * 1024,
            in_flight: 4,
            ack_timeout: Duration::from_secs(15),
            poll: Duration::from_millis(250),
        }
    }
}

/// Counters of the uplink, for health reports and `/metrics`.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub batches_sent: AtomicU64,
    pub items_sent: AtomicU64,
    pub items_acknowledged: AtomicU64,
    pub resends: AtomicU64,
    pub bad_acks: AtomicU64,
}

/// Failures of the outbox the uplink lives through: a full disk fails writes (even deleting
/// acknowledged items needs room in SQLite's log) until space returns. Each streak is logged
/// once, and its end.
#[derive(Default)]
struct OutboxTrouble {
    failing: bool,
}

impl OutboxTrouble {
    /// Whether the uplink can go on after `error`; it cannot once the outbox is gone.
    fn survive(&mut self, error: &OutboxUnavailable) -> bool {
        match error {
            OutboxUnavailable::Gone(_) => {
                tracing::error!(%error, "uplink stopping");
                false
            }
            OutboxUnavailable::Failed(_) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(%error, "the outbox fails; the uplink tries again");
                }
                true
            }
        }
    }

    fn cleared(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!("the outbox works again; the uplink goes on");
        }
    }
}

/// Runs until the outbox or the link goes away.
pub async fn run(
    outbox: OutboxHandle,
    link: LinkHandle,
    mut acks: watch::Receiver<Option<Vec<u8>>>,
    mut connected: watch::Receiver<bool>,
    config: UplinkConfig,
    stats: Arc<UplinkStats>,
) {
    // Everything up to `acked` is stored by the server; `sent` is the last id sent since.
    let mut acked = 0u64;
    let mut sent = 0u64;
    // The highest id ever sent in this run: an ack beyond it is not to be believed.
    let mut max_sent = 0u64;
    // (last id of the batch, when it went)
    let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
    let max_items = config.batch_items.clamp(1, limits::MAX_BATCH_ITEMS);
    // Leave room for the batch's own JSON around the item bodies.
    let max_bytes = config.batch_bytes.clamp(1, limits::MAX_BATCH_BYTES / 2);
    let mut poll = tokio::time::interval(config.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trouble = OutboxTrouble::default();

    loop {
        if *connected.borrow() {
            match outbox.report_evictions().await {
                Ok(_) => trouble.cleared(),
                Err(e) => {
                    if !trouble.survive(&e) {
                        return;
                    }
                }
            }
            // Fill the window.
            while in_flight.len() < config.in_flight.max(1) {
                let items = match outbox.next_batch(sent, max_items, max_bytes).await {
                    Ok(items) => items,
                    Err(e) if trouble.survive(&e) => break,
                    Err(_) => return,
                };
                let Some(last) = items.last().map(|item| item.id) else {
                    break;
                };
                let count = items.len() as u64;
                let batch = Batch {
                    v: V1,
                    device: link.device().clone(),
                    after: Some(sent),
                    items,
                };
                if link.publish(TopicKind::Up, encode(&batch)).await.is_err() {
                    return; // the link is closed for good
                }
                stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                stats.items_sent.fetch_add(count, Ordering::Relaxed);
                sent = last;
                max_sent = max_sent.max(last);
                in_flight.push_back((last, Instant::now()));
            }
        }

        let deadline = in_flight
            .front()
            .map(|(_, at)| *at + config.ack_timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            changed = acks.changed() => {
                if changed.is_err() {
                    return;
                }
                let payload = acks.borrow_and_update().clone();
                let Some(payload) = payload else { continue };
                let ack = match decode::<Ack>(&payload) {
                    Ok(ack) => ack,
                    Err(e) => {
                        stats.bad_acks.fetch_add(1, Ordering::Relaxed);
                        link.stats.record_dropped("ack", e.label());
                        tracing::warn!(error = %e, "dropped a malformed ack");
                        continue;
                    }
                };
                let mut up_to = ack.up_to;
                if up_to > max_sent {
                    // The server holds more than this run has sent. Legitimate after a restart
                    // (it stored batches of the previous run whose ack never arrived), as long
                    // as those ids exist at all; then only what this run sent is deleted, and
                    // the next batches catch up. An id beyond any ever given is a confused or
                    // hostile server: deleting on its word would lose items.
                    let max_id = match outbox.stats().await {
                        Ok(stats) => stats.max_id,
                        // A later ack says the same again.
                        Err(e) if trouble.survive(&e) => continue,
                        Err(_) => return,
                    };
                    if up_to > max_id {
                        stats.bad_acks.fetch_add(1, Ordering::Relaxed);
                        link.stats.record_dropped("ack", "unknown_ids");
                        tracing::warn!(up_to, max_id, "dropped an ack for ids never given");
                        continue;
                    }
                    up_to = max_sent;
                }
                if up_to <= acked {
                    continue; // a duplicate, or nothing of this run covered yet
                }
                match outbox.acknowledge(up_to).await {
                    Ok(deleted) => {
                        stats.items_acknowledged.fetch_add(deleted, Ordering::Relaxed);
                    }
                    // Nothing deleted: the items stay until a later ack deletes them.
                    Err(e) if trouble.survive(&e) => continue,
                    Err(_) => return,
                }
                acked = up_to;
                sent = sent.max(acked);
                while in_flight.front().is_some_and(|(last, _)| *last <= acked) {
                    in_flight.pop_front();
                }
            }
            changed = connected.changed() => {
                if changed.is_err() {
                    return;
                }
                // A new session (or the end of one): what was in flight may be lost; send
                // again from the last acknowledged id.
                if !in_flight.is_empty() {
                    stats.resends.fetch_add(1, Ordering::Relaxed);
                }
                in_flight.clear();
                sent = acked;
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(acked, sent, "no ack in time; sending again from the last acknowledged item");
                stats.resends.fetch_add(1, Ordering::Relaxed);
                in_flight.clear();
                sent = acked;
            }
            _ = poll.tick() => {}
        }
    }
}
