//! Chunked, windowed, resumable download of a model artifact over MQTT.
//!
//! The agent asks for `chunk_bytes` at a time on its `fetch` topic and keeps up to `window`
//! requests in flight; replies may arrive in any order and are written to the staging file in
//! order. The staging file survives restarts: a new download starts from its length (after
//! re-hashing what is there), so a kill in the middle costs only the chunks in flight.
//!
//! When to ask again is decided the way TCP decides to retransmit, because a fixed timeout per
//! request cannot tell a lost request from a slow link: on a 64 KiB/s link a window of eight
//! 256 KiB chunks takes 32 s to arrive, so timing each request from its own sending would
//! resend seven of them every 5 s. So:
//! - the link is judged stalled only when no useful reply has come for the stall timeout: the
//!   configured `request_timeout_ms`, or three times the usual gap between replies when the
//!   link is slower than that. Then everything in flight is asked again (go-back-N);
//! - a single lost request is found by evidence instead: once `window` requests sent after it
//!   were answered, it is asked again at once (a fast retransmit), which also bounds how many
//!   chunks wait in memory for a gap to fill;
//! - a `busy` reply is asked again after the timeout.
//!
//! Every resend counts against the request's `max_retries`.
//!
//! How many requests are in flight adapts to the link too. Everything the device receives
//! shares one TCP connection, so replies asked for queue ahead of the broker's acks, keep-alive
//! answers and directives: a full window on a slow link held them for half a minute, long
//! enough for the MQTT keep-alive to give up on the connection (seen in `tests/tests/faults.rs`
//! at 64 KiB/s: reconnections, resent uplink batches, 1.7 × the model's bytes over the link and
//! 148 s where the link needs 80; with this, 1.01 × and 88 s). So the window starts at two
//! requests and grows by one per reply while a window's worth of replies still arrives within
//! `max_queue_ms` at the pace measured between replies, and shrinks at once to what does.
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
    /// Send order (a resend takes a new number), for the overtaken count.
    seq: u64,
    retries: u32,
    len: u32,
    /// Requests sent after this one that were answered while it was not.
    overtaken: usize,
    /// Set by a `busy` reply: ask again at this instant.
    busy_until: Option<Instant>,
}

/// Requests in flight before the link's pace is known.
const INITIAL_WINDOW: usize = 2;

/// When the link counts as stalled: no useful reply for the configured timeout, or for three
/// of the link's usual gaps between replies if it is slower than that.
struct StallClock {
    timeout: Duration,
    last_progress: Instant,
    /// Smoothed gap between useful replies (like TCP's SRTT, 1/8 weight to a new sample).
    gap: Option<Duration>,
}

impl StallClock {
    fn new(timeout: Duration) -> StallClock {
        StallClock {
            timeout,
            last_progress: Instant::now(),
            gap: None,
        }
    }

    fn progress(&mut self, now: Instant) {
        let sample = now - self.last_progress;
        self.gap = Some(match self.gap {
            None => sample,
            Some(gap) => gap.mul_f64(7.0 / 8.0) + sample.mul_f64(1.0 / 8.0),
        });
        self.last_progress = now;
    }

    /// A stall restarts the clock: the resent requests get a whole timeout.
    fn restart(&mut self, now: Instant) {
        self.last_progress = now;
    }

    /// How many requests fit in `max_queue` at the measured pace, from 1 to `max`.
    fn window_that_fits(&self, max_queue: Duration, max: usize) -> usize {
        match self.gap {
            None => max,
            Some(gap) => {
                let fits = max_queue.as_secs_f64() / gap.as_secs_f64().max(1e-6);
                (fits as usize).clamp(1, max)
            }
        }
    }

    fn deadline(&self) -> Instant {
        let patience = self
            .gap
            .map_or(self.timeout, |gap| self.timeout.max(gap * 3));
        self.last_progress + patience
    }
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
    let overtaken_limit = config.window.max(3);
    let max_queue = Duration::from_millis(config.max_queue_ms);
    let mut window = INITIAL_WINDOW.min(config.window);
    let mut next_offset = written;
    let mut next_seq = 0u64;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut early: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut stall = StallClock::new(timeout);
    let mut report = FetchReport {
        resumed_from,
        fetched: 0,
        sha256: Sha256Digest([0; 32]),
        retries: 0,
        ignored: 0,
    };

    while written < size {
        // Fill the window.
        while pending.len() < window && next_offset < size {
            let len = chunk.min(size - next_offset) as u32;
            send(requester, &blob, next_offset, len).await?;
            if pending.is_empty() {
                // Nothing was in flight: the wait for a reply starts now.
                stall.restart(Instant::now());
            }
            pending.insert(
                next_offset,
                Pending {
                    seq: next_seq,
                    retries: 0,
                    len,
                    overtaken: 0,
                    busy_until: None,
                },
            );
            next_seq += 1;
            next_offset += u64::from(len);
        }

        let busy_deadline = pending.values().filter_map(|p| p.busy_until).min();
        let waiting_for_replies = pending.values().any(|p| p.busy_until.is_none());
        let deadline = match (waiting_for_replies, busy_deadline) {
            (true, Some(busy)) => busy.min(stall.deadline()),
            (true, None) => stall.deadline(),
            (false, Some(busy)) => busy,
            (false, None) => Instant::now() + timeout,
        };
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
                        // The server is there but full: ask again after a pause.
                        if let Some(p) = pending.get_mut(&header.offset) {
                            p.busy_until = Some(Instant::now() + timeout);
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
                let answered = request.seq;
                pending.remove(&header.offset);
                stall.progress(Instant::now());
                let fits = stall.window_that_fits(max_queue, config.window);
                window = if fits > window { window + 1 } else { fits };
                report.fetched += data.len() as u64;
                early.insert(header.offset, data.to_vec());
                // Write every chunk that is now contiguous with the file.
                while let Some(data) = early.remove(&written) {
                    file.write_all(&data).map_err(io)?;
                    hasher.update(&data);
                    written += data.len() as u64;
                }
                progress(written, size);
                // Requests this reply overtook: after a window of such evidence, one is lost.
                let mut lost = Vec::new();
                for (&offset, p) in pending.iter_mut() {
                    if p.seq < answered && p.busy_until.is_none() {
                        p.overtaken += 1;
                        if p.overtaken >= overtaken_limit {
                            lost.push(offset);
                        }
                    }
                }
                for offset in lost {
                    resend(requester, &blob, &mut pending, offset, &mut next_seq, config, &mut report).await?;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                let stalled = waiting_for_replies && now >= stall.deadline();
                let due: Vec<u64> = pending
                    .iter()
                    .filter(|(_, p)| match p.busy_until {
                        Some(at) => at <= now,
                        None => stalled,
                    })
                    .map(|(&offset, _)| offset)
                    .collect();
                if stalled {
                    tracing::debug!(in_flight = pending.len(), "no chunk reply for the stall timeout; asking again");
                    stall.restart(now);
                }
                for offset in due {
                    resend(requester, &blob, &mut pending, offset, &mut next_seq, config, &mut report).await?;
                }
            }
        }
    }

    file.sync_all().map_err(io)?;
    report.sha256 = hasher.finalize().into();
    verify_blob(&blob, written, &report.sha256).map_err(FetchError::Mismatch)?;
    Ok(report)
}

/// Asks for the pending request at `offset` again, unless it has used up its retries.
async fn resend(
    requester: &impl ChunkRequester,
    blob: &BlobRef,
    pending: &mut HashMap<u64, Pending>,
    offset: u64,
    next_seq: &mut u64,
    config: &FetchConfig,
    report: &mut FetchReport,
) -> Result<(), FetchError> {
    let Some(p) = pending.get_mut(&offset) else {
        return Ok(());
    };
    if p.retries >= config.max_retries {
        return Err(FetchError::Timeout {
            offset,
            retries: p.retries,
        });
    }
    p.retries += 1;
    p.seq = *next_seq;
    *next_seq += 1;
    p.overtaken = 0;
    p.busy_until = None;
    report.retries += 1;
    let len = p.len;
    send(requester, blob, offset, len).await
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

#[cfg(test)]
mod tests {
    //! The retransmit policy against an in-process server whose pace and losses the test sets.
    //! (The same download over a real broker is `tests/fetch_over_broker.rs`; over a shaped
    //! link to the real server, `tests/tests/faults.rs`.)

    use super::*;
    use fleet_protocol::chunk::{encode_chunk, ChunkHeader};
    use std::sync::{Arc, Mutex};

    /// Hands requests to the test's server task.
    struct Requests(mpsc::UnboundedSender<ChunkRequest>, Arc<Mutex<Served>>);

    impl ChunkRequester for Requests {
        async fn request(&self, request: ChunkRequest) -> Result<(), FetchError> {
            {
                let mut served = self.1.lock().unwrap();
                served.sent += 1;
                if served.answered >= 2 {
                    let in_flight = served.sent - served.answered;
                    served.max_in_flight_once_paced =
                        served.max_in_flight_once_paced.max(in_flight);
                }
            }
            self.0.send(request).map_err(|_| FetchError::LinkClosed)
        }
    }

    /// What the server saw.
    #[derive(Default)]
    struct Served {
        /// Requests the server received, lost ones included.
        requests: u64,
        sent: u64,
        answered: u64,
        /// The most requests in flight once two replies had set the link's pace.
        max_in_flight_once_paced: u64,
    }

    /// Answers requests in order, one every `gap` (a link of `chunk / gap` bytes per second),
    /// ignoring the requests for which `lose` says so.
    fn server(
        artifact: Vec<u8>,
        gap: Duration,
        mut lose: impl FnMut(&ChunkRequest) -> bool + Send + 'static,
    ) -> (Requests, mpsc::Receiver<Vec<u8>>, Arc<Mutex<Served>>) {
        let (requests, mut incoming) = mpsc::unbounded_channel::<ChunkRequest>();
        let (replies, received) = mpsc::channel(1024);
        let served = Arc::new(Mutex::new(Served::default()));
        let seen = served.clone();
        let sha256 = Sha256Digest::of(&artifact);
        tokio::spawn(async move {
            while let Some(request) = incoming.recv().await {
                seen.lock().unwrap().requests += 1;
                if lose(&request) {
                    continue;
                }
                tokio::time::sleep(gap).await;
                seen.lock().unwrap().answered += 1;
                let start = request.offset as usize;
                let end = (start + request.len as usize).min(artifact.len());
                let header = ChunkHeader {
                    status: ChunkStatus::Ok,
                    sha256,
                    offset: request.offset,
                };
                if replies
                    .send(encode_chunk(&header, &artifact[start..end]))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        (Requests(requests, served.clone()), received, served)
    }

    fn artifact(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn config(chunk_bytes: u32, window: usize, request_timeout_ms: u64) -> FetchConfig {
        FetchConfig {
            chunk_bytes,
            window,
            max_queue_ms: 2000,
            request_timeout_ms,
            max_retries: 3,
        }
    }

    async fn fetch(
        artifact: &[u8],
        config: &FetchConfig,
        requests: &Requests,
        replies: &mut mpsc::Receiver<Vec<u8>>,
    ) -> (Result<FetchReport, FetchError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let blob = BlobRef {
            sha256: Sha256Digest::of(artifact),
            size: artifact.len() as u64,
        };
        let result = download(
            blob,
            &dir.path().join("staging"),
            config,
            requests,
            replies,
            |_, _| {},
        )
        .await;
        (result, dir)
    }

    /// A window takes 8 × 60 ms to arrive, far past the 100 ms timeout, but replies keep
    /// coming: nothing is asked twice.
    #[tokio::test]
    async fn a_slow_link_that_keeps_delivering_is_not_asked_again() {
        let artifact = artifact(24 * 1024);
        let (requests, mut replies, served) =
            server(artifact.clone(), Duration::from_millis(60), |_| false);
        let config = config(1024, 8, 100);
        let (result, _dir) = fetch(&artifact, &config, &requests, &mut replies).await;
        let report = result.unwrap();
        assert_eq!(report.retries, 0, "{report:?}");
        assert_eq!(served.lock().unwrap().requests, 24);
    }

    /// Replies that take 60 ms each, with 100 ms of queue allowed: once the pace is known, one
    /// request at a time (and none asked twice).
    #[tokio::test]
    async fn a_slow_link_gets_only_the_requests_that_arrive_within_the_queue_target() {
        let artifact = artifact(12 * 1024);
        let (requests, mut replies, served) =
            server(artifact.clone(), Duration::from_millis(60), |_| false);
        let mut config = config(1024, 8, 1000);
        config.max_queue_ms = 100;
        let (result, _dir) = fetch(&artifact, &config, &requests, &mut replies).await;
        assert_eq!(result.unwrap().retries, 0);
        let served = served.lock().unwrap();
        assert_eq!(served.requests, 12);
        assert_eq!(served.max_in_flight_once_paced, 1);
    }

    /// A fast link: the window grows from two to the configured eight.
    #[tokio::test]
    async fn a_fast_link_opens_the_whole_window() {
        let artifact = artifact(64 * 1024);
        let (requests, mut replies, served) =
            server(artifact.clone(), Duration::from_micros(100), |_| false);
        let config = config(1024, 8, 1000);
        let (result, _dir) = fetch(&artifact, &config, &requests, &mut replies).await;
        assert_eq!(result.unwrap().retries, 0);
        assert_eq!(served.lock().unwrap().max_in_flight_once_paced, 8);
    }

    /// One request lost while the others flow: found by the replies that overtook it, long
    /// before any timeout (10 s here).
    #[tokio::test]
    async fn a_lost_request_is_asked_again_once_a_window_overtook_it() {
        let artifact = artifact(64 * 1024);
        let mut lost_once = false;
        let (requests, mut replies, served) =
            server(artifact.clone(), Duration::from_millis(1), move |r| {
                let lose = r.offset == 4096 && !lost_once;
                lost_once |= lose;
                lose
            });
        let config = config(1024, 8, 10_000);
        let started = Instant::now();
        let (result, _dir) = fetch(&artifact, &config, &requests, &mut replies).await;
        let report = result.unwrap();
        assert_eq!(report.retries, 1, "{report:?}");
        assert_eq!(served.lock().unwrap().requests, 65);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Every request in flight lost at once (a broker restart): after the stall timeout they
    /// are all asked again, and the download completes.
    #[tokio::test]
    async fn a_stalled_link_is_asked_everything_again_after_the_timeout() {
        let artifact = artifact(16 * 1024);
        let mut dropped = 0;
        let (requests, mut replies, _served) =
            server(artifact.clone(), Duration::from_millis(1), move |_| {
                dropped += 1;
                dropped <= 4
            });
        let config = config(1024, 4, 200);
        let (result, _dir) = fetch(&artifact, &config, &requests, &mut replies).await;
        let report = result.unwrap();
        assert_eq!(report.retries, 4, "{report:?}");
    }

    /// A server that never answers: the download gives up after `max_retries`, naming the
    /// offset.
    #[tokio::test]
    async fn a_dead_link_fails_after_the_retries() {
        let artifact = artifact(4 * 1024);
        let (requests, mut replies, served) =
            server(artifact.clone(), Duration::from_millis(1), |_| true);
        let config = config(1024, 2, 50);
        let (result, _dir) = fetch(&artifact, &config, &requests, &mut replies).await;
        match result {
            Err(FetchError::Timeout { retries: 3, .. }) => {}
            other => panic!("expected a timeout after 3 retries, got {other:?}"),
        }
        // The two in flight, each asked three more times.
        assert_eq!(served.lock().unwrap().requests, 8);
    }
}
