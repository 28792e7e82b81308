//! Chunked, windowed, resumable download of a model artifact over MQTT.
//!
//! The agent asks for `chunk_bytes` at a time on its `fetch` topic and keeps up to `window`
//! requests in flight; replies may arrive in any order and are written to the staging file in
//! order. A request that gets no reply within the timeout is sent again, up to `max_retries`
//! times. The staging file survives restarts: a new download starts from its length (after
//! re-hashing what is there), so a kill in the middle costs only the chunks in flight.
//!
//! The manifest bounds everything: no chunk is requested past its size, a reply whose data
//! would go past it aborts the download, and the digest is checked before the caller stages
//! the file.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use fleet_protocol::chunk::{decode_chunk, ChunkStatus};
use fleet_protocol::trust::verify_blob;
use fleet_protocol::{encode, BlobRef, ChunkRequest, Sha256Digest, TopicKind, TrustError, V1};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::FetchConfig;
use crate::link::LinkHandle;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("staging file {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("the server has no artifact {0}")]
    NotFound(Sha256Digest),
    #[error("the server refused artifact {0} to this device")]
    Denied(Sha256Digest),
    #[error("the server says offset {offset} is beyond the artifact's end (manifest size {size})")]
    OutOfRange { offset: u64, size: u64 },
    #[error("a reply at offset {offset} carries {len} bytes, which would go past the manifest's size {size}")]
    TooLong { offset: u64, len: usize, size: u64 },
    #[error("no reply for offset {offset} after {retries} retries")]
    Timeout { offset: u64, retries: u32 },
    #[error("the MQTT link is closed")]
    LinkClosed,
    #[error("the downloaded artifact does not match its manifest: {0}")]
    Mismatch(TrustError),
}

/// How a finished download went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// Bytes already in the staging file when the download started (resumed).
    pub resumed_from: u64,
    /// Bytes received over the link in this download.
    pub fetched: u64,
    pub sha256: Sha256Digest,
    /// Chunk requests sent again after a timeout or a busy reply.
    pub retries: u64,
    /// Replies ignored: late duplicates, other artifacts, malformed.
    pub ignored: u64,
}

/// Sends chunk requests. The real one publishes on the `fetch` topic.
pub trait ChunkRequester {
    fn request(
        &self,
        request: ChunkRequest,
    ) -> impl std::future::Future<Output = Result<(), FetchError>> + Send;
}

impl ChunkRequester for LinkHandle {
    async fn request(&self, request: ChunkRequest) -> Result<(), FetchError> {
        self.publish(TopicKind::Fetch, encode(&request))
            .await
            .map_err(|_| FetchError::LinkClosed)
    }
}

struct Pending {
    sent_at: Instant,
    retries: u32,
    len: u32,
}

/// Downloads `blob` (a model's artifact or its reference profile) into `staging`, resuming
/// from what is there, and checks its size and digest. `progress` is called with (bytes on
/// disk, total).
pub async fn download(
    blob: BlobRef,
    staging: &Path,
    config: &FetchConfig,
    requester: &impl ChunkRequester,
    replies: &mut mpsc::Receiver<Vec<u8>>,
    mut progress: impl FnMut(u64, u64),
) -> Result<FetchReport, FetchError> {
    let io = |cause| FetchError::Io {
        path: staging.display().to_string(),
        cause,
    };
    let size = blob.size;
    let (mut file, mut hasher, resumed_from) = open_staging(staging, size).map_err(io)?;
    let mut written = resumed_from;
    progress(written, size);

    // Replies left over from an earlier download must not count for this one.
    while replies.try_recv().is_ok() {}

    let timeout = Duration::from_millis(config.request_timeout_ms);
    let chunk = u64::from(config.chunk_bytes);
    let mut next_offset = written;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut early: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut report = FetchReport {
        resumed_from,
        fetched: 0,
        sha256: Sha256Digest([0; 32]),
        retries: 0,
        ignored: 0,
    };

    while written < size {
        // Fill the window.
        while pending.len() < config.window && next_offset < size {
            let len = chunk.min(size - next_offset) as u32;
            send(requester, &blob, next_offset, len).await?;
            pending.insert(
                next_offset,
                Pending {
                    sent_at: Instant::now(),
                    retries: 0,
                    len,
                },
            );
            next_offset += u64::from(len);
        }

        let deadline = pending
            .values()
            .map(|p| p.sent_at + timeout)
            .min()
            .unwrap_or_else(|| Instant::now() + timeout);
        tokio::select! {
            reply = replies.recv() => {
                let Some(reply) = reply else { return Err(FetchError::LinkClosed) };
                let (header, data) = match decode_chunk(&reply) {
                    Ok(decoded) => decoded,
                    Err(e) => {
                        tracing::warn!(error = %e, "dropped a malformed chunk reply");
                        report.ignored += 1;
                        continue;
                    }
                };
                if header.sha256 != blob.sha256 {
                    report.ignored += 1;
                    continue;
                }
                match header.status {
                    ChunkStatus::Ok => {}
                    ChunkStatus::NotFound => return Err(FetchError::NotFound(blob.sha256)),
                    ChunkStatus::Denied => return Err(FetchError::Denied(blob.sha256)),
                    ChunkStatus::OutOfRange => {
                        return Err(FetchError::OutOfRange { offset: header.offset, size })
                    }
                    ChunkStatus::Busy => {
                        // Ask again after a pause; the timeout path resends it.
                        if let Some(p) = pending.get_mut(&header.offset) {
                            p.sent_at = Instant::now();
                        }
                        continue;
                    }
                }
                if header.offset.saturating_add(data.len() as u64) > size {
                    return Err(FetchError::TooLong { offset: header.offset, len: data.len(), size });
                }
                let Some(request) = pending.get(&header.offset) else {
                    report.ignored += 1; // a duplicate or late reply
                    continue;
                };
                if data.len() != request.len as usize {
                    tracing::warn!(offset = header.offset, got = data.len(), asked = request.len, "short chunk; asking again");
                    report.ignored += 1;
                    continue;
                }
                pending.remove(&header.offset);
                report.fetched += data.len() as u64;
                early.insert(header.offset, data.to_vec());
                // Write every chunk that is now contiguous with the file.
                while let Some(data) = early.remove(&written) {
                    file.write_all(&data).map_err(io)?;
                    hasher.update(&data);
                    written += data.len() as u64;
                }
                progress(written, size);
            }
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                let expired: Vec<u64> = pending
                    .iter()
                    .filter(|(_, p)| p.sent_at + timeout <= now)
                    .map(|(&offset, _)| offset)
                    .collect();
                for offset in expired {
                    let p = pending.get_mut(&offset).expect("listed above");
                    if p.retries >= config.max_retries {
                        return Err(FetchError::Timeout { offset, retries: p.retries });
                    }
                    p.retries += 1;
                    p.sent_at = now;
                    report.retries += 1;
                    let len = p.len;
                    send(requester, &blob, offset, len).await?;
                }
            }
        }
    }

    file.sync_all().map_err(io)?;
    report.sha256 = hasher.finalize().into();
    verify_blob(&blob, written, &report.sha256).map_err(FetchError::Mismatch)?;
    Ok(report)
}

async fn send(
    requester: &impl ChunkRequester,
    blob: &BlobRef,
    offset: u64,
    len: u32,
) -> Result<(), FetchError> {
    requester
        .request(ChunkRequest {
            v: V1,
            sha256: blob.sha256,
            offset,
            len,
        })
        .await
}

/// Opens (or creates) the staging file for appending, and hashes what it already holds. A file
/// longer than the manifest allows cannot be a prefix of the artifact: it is started afresh.
fn open_staging(path: &Path, size: u64) -> std::io::Result<(File, Sha256, u64)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let mut existing = file.metadata()?.len();
    if existing > size {
        tracing::warn!(path = %path.display(), existing, size, "staging file longer than the artifact; starting over");
        file.set_len(0)?;
        existing = 0;
    }
    let mut hasher = Sha256::new();
    file.seek(SeekFrom::Start(0))?;
    let mut reader = (&mut file).take(existing);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    file.seek(SeekFrom::Start(existing))?;
    Ok((file, hasher, existing))
}
