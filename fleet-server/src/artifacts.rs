//! The artifact server: answers chunk requests on `fetch` with replies on `chunk`, built by the
//! same protocol code the agent decodes with.
//!
//! Bytes come from the registry's blob files by positioned reads, never from a blob loaded
//! whole. A device gets only blobs of model versions assigned to it (else `denied`). Work is
//! bounded twice: a fleet-wide limit on reads at once, and a per-device token bucket, so one
//! device downloading cannot starve the others. A request over either limit waits a little,
//! then is answered `busy` (the agent asks again).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_protocol::chunk::{encode_chunk, ChunkHeader, ChunkRequest, ChunkStatus};
use fleet_protocol::{decode, DeviceId, TopicKind};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, Semaphore};

use crate::bus::{Bus, DeviceMessage};
use crate::metrics::Metrics;
use crate::registry::BlobStore;
use crate::store::Store;

/// Limits of the artifact server.
#[derive(Debug, Clone, Copy)]
pub struct ArtifactLimits {
    pub max_concurrent: usize,
    pub device_chunks_per_sec: u32,
}

/// How long a request may wait for a read slot or a token before it is answered `busy`.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// Runs until the request queue closes.
pub async fn run(
    store: Store,
    blobs: BlobStore,
    bus: Bus,
    metrics: Arc<Metrics>,
    limits: ArtifactLimits,
    mut requests: mpsc::Receiver<DeviceMessage>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_concurrent.max(1)));
    let buckets = Arc::new(Mutex::new(HashMap::<DeviceId, Bucket>::new()));
    while let Some(message) = requests.recv().await {
        let request: ChunkRequest = match decode(&message.payload) {
            Ok(request) => request,
            Err(e) => {
                metrics.dropped("fetch", e.label());
                continue;
            }
        };
        let (store, blobs, bus, metrics, slots, buckets) = (
            store.clone(),
            blobs.clone(),
            bus.clone(),
            metrics.clone(),
            slots.clone(),
            buckets.clone(),
        );
        tokio::spawn(async move {
            let device = message.device;
            let reply = answer(
                &store, &blobs, &metrics, &slots, &buckets, limits, &device, request,
            )
            .await;
            let _ = bus.publish(&device, TopicKind::Chunk, reply).await;
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn answer(
    store: &Store,
    blobs: &BlobStore,
    metrics: &Metrics,
    slots: &Semaphore,
    buckets: &Mutex<HashMap<DeviceId, Bucket>>,
    limits: ArtifactLimits,
    device: &DeviceId,
    request: ChunkRequest,
) -> Vec<u8> {
    let header = |status| ChunkHeader {
        status,
        sha256: request.sha256,
        offset: request.offset,
    };
    let refuse = |status: ChunkStatus, label: &'static str| {
        metrics.chunk_refused(label);
        encode_chunk(&header(status), &[])
    };
    // The rate limit first: a device asking too fast waits for its own tokens.
    let deadline = Instant::now() + MAX_WAIT;
    loop {
        let wait = {
            let Ok(mut buckets) = buckets.lock() else {
                return refuse(ChunkStatus::Busy, "busy");
            };
            let bucket = buckets
                .entry(device.clone())
                .or_insert_with(|| Bucket::new(limits.device_chunks_per_sec));
            bucket.take(Instant::now())
        };
        match wait {
            None => break,
            Some(wait) if Instant::now() + wait <= deadline => tokio::time::sleep(wait).await,
            Some(_) => return refuse(ChunkStatus::Busy, "busy"),
        }
    }
    let sha = request.sha256.to_hex();
    match store.blob_assigned(device.as_str(), &sha).await {
        Ok(true) => {}
        Ok(false) => {
            return match store.blob_known(&sha).await {
                Ok(true) => refuse(ChunkStatus::Denied, "denied"),
                Ok(false) => refuse(ChunkStatus::NotFound, "not_found"),
                Err(_) => refuse(ChunkStatus::Busy, "busy"),
            };
        }
        Err(e) => {
            tracing::error!(error = %e, "chunk request: store unavailable");
            return refuse(ChunkStatus::Busy, "busy");
        }
    }
    let Ok(Ok(_permit)) = tokio::time::timeout(MAX_WAIT, slots.acquire()).await else {
        return refuse(ChunkStatus::Busy, "busy");
    };
    match read_range(&blobs.path(&sha), request.offset, request.len).await {
        Ok(Some(data)) => {
            metrics.chunks_served.fetch_add(1, Ordering::Relaxed);
            metrics
                .chunk_bytes_served
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            encode_chunk(&header(ChunkStatus::Ok), &data)
        }
        Ok(None) => refuse(ChunkStatus::OutOfRange, "out_of_range"),
        Err(e) => {
            tracing::error!(%device, sha256 = %sha, error = %e, "cannot read a blob");
            refuse(ChunkStatus::NotFound, "not_found")
        }
    }
}

/// Up to `len` bytes from `offset`; None when the offset is at or past the end.
async fn read_range(
    path: &std::path::Path,
    offset: u64,
    len: u32,
) -> Result<Option<Vec<u8>>, std::io::Error> {
    let mut file = tokio::fs::File::open(path).await?;
    let size = file.metadata().await?.len();
    if offset >= size {
        return Ok(None);
    }
    let n = (size - offset).min(u64::from(len)) as usize;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut data = vec![0u8; n];
    file.read_exact(&mut data).await?;
    Ok(Some(data))
}

/// A token bucket: `rate` tokens per second, up to twice that banked.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        let rate = f64::from(rate.max(1));
        Bucket {
            rate,
            tokens: 2.0 * rate,
            at: Instant::now(),
        }
    }

    /// Takes a token; or says how long until one is there.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut b = Bucket::new(10);
        let t0 = Instant::now();
        for _ in 0..20 {
            assert_eq!(b.take(t0), None);
        }
        let wait = b.take(t0).unwrap();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert_eq!(b.take(t0 + Duration::from_millis(100)), None);
    }
}
