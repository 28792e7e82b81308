//! Issue 4: SIGKILL during heavy outbox writes, 20 times: the database passes
//! `PRAGMA integrity_check`, and no item that was acknowledged upstream is missing from what the
//! receiver stored.
//!
//! The writer is a real process: this test binary run again with `DRIFTGATE_OUTBOX_WRITER` set,
//! so the test function acts as the writer instead. It drives the agent's own outbox (thread,
//! group commits, quota) and uplink over a real broker to the test's receiver, and pushes a mix
//! of telemetry, samples of a few KiB and events as fast as the pacing allows, each tagged with
//! (round, sequence) so that its contents can be rebuilt and checked. The test kills it at a
//! seeded random moment, checks the file as the next start will find it, and starts it again on
//! the same file.
//!
//! What "no acknowledged item is missing" needs: an item leaves the outbox only on the
//! receiver's ack, so every id the outbox ever committed must end up at the receiver, once, with
//! the contents the writer gave it. The file's own record of the highest id committed
//! (`sqlite_sequence`) after each kill says which ids those are; at the end the receiver must
//! hold exactly ids 1..=that, each carrying the next (round, sequence) in the writers' order
//! with the rebuilt contents. An id reused after a crash shows as a conflict at the receiver or
//! as a tag out of order; an item lost between commit and ack as a gap.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent::log_tail;
use common::receiver::Receiver;
use edge_agent::config::AgentConfig;
use edge_agent::link;
use edge_agent::outbox::{self, Outbox, OutboxLimits};
use edge_agent::uplink::{self, UplinkConfig, UplinkStats};
use fleet_protocol::outbox::{Event, EventKind, ItemBody, Sample, Telemetry};
use fleet_protocol::{ModelName, ModelVersion};
use rusqlite::{Connection, OpenFlags};

const TEST: &str = "sigkill_during_heavy_outbox_writes_loses_no_acknowledged_item";
/// Set in the writer process: the directory of the outbox.
const WRITER_DIR: &str = "DRIFTGATE_OUTBOX_WRITER";
const WRITER_ROUND: &str = "DRIFTGATE_OUTBOX_ROUND";
const WRITER_BROKER: &str = "DRIFTGATE_OUTBOX_BROKER";
/// "0": the writer only uploads (the final drain).
const WRITER_WRITES: &str = "DRIFTGATE_OUTBOX_WRITES";
const STARTED: &str = "outbox writer started";
const DEVICE: &str = "dev-outbox-crash";

const ROUNDS: u64 = 20;
const SEED: u64 = 0x5EED_0B0C;
/// Items pushed per second, at most.
const ITEMS_PER_SECOND: f64 = 10_000.0;
/// Items waiting for the uplink above which the writer pauses: how fast the uplink drains
/// depends on the machine's load, and the default quota must never evict (an eviction is a
/// legitimate gap, which this test cannot tell from a lost item). About a third of the quota's
/// content budget with this mix.
const MAX_BACKLOG: u64 = 15_000;
/// When in a round the kill lands, after the writer said it started.
const KILL_AFTER_MS: std::ops::RangeInclusive<u64> = 300..=2_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_heavy_outbox_writes_loses_no_acknowledged_item() {
    if let Some(dir) = std::env::var_os(WRITER_DIR) {
        writer(PathBuf::from(dir)).await;
    }
    for broker in common::brokers(TEST) {
        eprintln!("broker: {}", broker.name);
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("outbox.db");
        let receiver = Receiver::start(broker.port, DEVICE, Vec::new()).await;
        let mut rng = fastrand::Rng::with_seed(SEED);
        // The highest id the file had ever committed, after each kill.
        let mut high_water = vec![0u64];
        let mut committed_per_round = Vec::new();
        for round in 0..ROUNDS {
            let writer = Writer::start(dir.path(), broker.port, round, true);
            let kill_after = Duration::from_millis(rng.u64(KILL_AFTER_MS));
            tokio::time::sleep(kill_after).await;
            writer.kill();

            let file = FileState::read(&db);
            let context = || format!("round {round}\n{}", log_tail(dir.path()));
            assert_eq!(
                file.integrity,
                ["ok"],
                "integrity_check after the kill; {}",
                context()
            );
            let before = *high_water.last().unwrap();
            assert!(
                file.high_water >= before,
                "the highest id went back from {before} to {} across a restart; {}",
                file.high_water,
                context()
            );
            assert!(
                file.evictions.is_empty(),
                "the quota evicted {:?}: the backlog outgrew it, so the uplink stalled (acked up \
                 to {} of {}) or MAX_BACKLOG is too high; {}",
                file.evictions,
                receiver.acked.load(std::sync::atomic::Ordering::Relaxed),
                file.high_water,
                context()
            );
            // What the file still holds and the receiver already has must be the same item:
            // an id is one item, wherever it is.
            let at_receiver = receiver.items.lock().unwrap();
            for (id, body) in &file.items {
                if let Some(received) = at_receiver.get(id) {
                    assert_eq!(
                        &received.body,
                        body,
                        "item {id} differs between the file and the receiver; {}",
                        context()
                    );
                }
            }
            committed_per_round.push(file.high_water - before);
            high_water.push(file.high_water);
            eprintln!(
                "round {round:2}: killed after {kill_after:?}, {} items committed, {} waiting \
                 in the file, receiver holds {} (acked up to {})",
                file.high_water - before,
                file.items.len(),
                at_receiver.len(),
                receiver.acked.load(std::sync::atomic::Ordering::Relaxed)
            );
            // The receiver waits on this lock; release it before the next writer starts.
            drop(at_receiver);
        }

        // A last start that only uploads: everything committed must leave the file, which it
        // does only on the receiver's acks.
        let total = *high_water.last().unwrap();
        let drain_started = Instant::now();
        let writer = Writer::start(dir.path(), broker.port, ROUNDS, false);
        loop {
            let acked = receiver.acked.load(std::sync::atomic::Ordering::Relaxed);
            if acked >= total && FileState::items_left(&db) == 0 {
                break;
            }
            assert!(
                drain_started.elapsed() < Duration::from_secs(60),
                "the outbox did not drain: acked up to {acked} of {total}\n{}",
                log_tail(dir.path())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drained_in = drain_started.elapsed();
        writer.kill();
        let file = FileState::read(&db);
        assert_eq!(file.integrity, ["ok"]);
        assert_eq!(file.high_water, total, "the draining writer wrote nothing");

        let conflicts = receiver.conflicts.lock().unwrap().clone();
        assert!(
            conflicts.is_empty(),
            "ids reused for other items: {:?}",
            &conflicts[..conflicts.len().min(10)]
        );
        let items = receiver.items.lock().unwrap().clone();
        let ids: Vec<u64> = items.keys().copied().collect();
        if ids != (1..=total).collect::<Vec<_>>() {
            let missing: Vec<u64> = (1..=total)
                .filter(|id| !items.contains_key(id))
                .take(10)
                .collect();
            panic!(
                "the receiver holds {} items, ids {:?}..={:?}, of the {total} the outbox \
                 committed; first missing: {missing:?}",
                items.len(),
                ids.first(),
                ids.last()
            );
        }
        // In id order, the tags go through each round's sequence from 0 without a gap, rounds in
        // order, each round's ids within what its file had committed by its kill, and each
        // item's contents are what its writer made.
        let mut expected = (0u64, 0u64);
        for (id, item) in &items {
            let (round, seq) = tag(&item.body)
                .unwrap_or_else(|| panic!("item {id} is not a writer's: {:?}", item.body));
            if (round, seq) != expected {
                assert!(
                    round > expected.0 && seq == 0,
                    "item {id} is round {round} #{seq}, expected round {} #{}: an item is \
                     missing or an id was reused",
                    expected.0,
                    expected.1
                );
            }
            let round_ids = high_water[round as usize]..=high_water[round as usize + 1];
            assert!(
                round_ids.contains(id) && *id != high_water[round as usize],
                "item {id} (round {round}) outside the ids its round committed, {round_ids:?}"
            );
            assert_eq!(
                item.body,
                body(round, seq),
                "item {id}: round {round} #{seq} arrived with other contents"
            );
            expected = (round, seq + 1);
        }
        let deliveries = *receiver.deliveries.lock().unwrap();
        eprintln!(
            "{}: {ROUNDS} kills, {total} items committed ({} to {} per round), all {total} at \
             the receiver exactly once from {deliveries} deliveries ({} resent), drained in \
             {drained_in:.1?}, {:.1?} in all",
            broker.name,
            committed_per_round.iter().min().unwrap(),
            committed_per_round.iter().max().unwrap(),
            deliveries - total,
            started.elapsed()
        );
    }
}

/// The writer process, as seen by the test.
struct Writer {
    child: Child,
}

impl Writer {
    /// Starts the writer on the outbox in `dir` and waits until it runs.
    fn start(dir: &Path, broker_port: u16, round: u64, writes: bool) -> Writer {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        let mut child = driftgate_tests::target_command(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(WRITER_DIR, dir)
            .env(WRITER_ROUND, round.to_string())
            .env(WRITER_BROKER, broker_port.to_string())
            .env(WRITER_WRITES, if writes { "1" } else { "0" })
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("the writer starts");
        let stdout = child.stdout.take().unwrap();
        let (started_tx, started) = std::sync::mpsc::channel();
        // Reads to the end, so the writer never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest has already written "test <name> ... " on that line.
                if line.ends_with(STARTED) {
                    let _ = started_tx.send(());
                }
            }
        });
        if started.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!(
                "the writer of round {round} did not start\n{}",
                log_tail(dir)
            );
        }
        Writer { child }
    }

    /// SIGKILL, and wait until it is gone.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// The outbox file as the next start finds it, read without changing it: read-only, so no
/// checkpoint runs and a crashed write-ahead log is left for the outbox itself to recover.
struct FileState {
    integrity: Vec<String>,
    /// The highest id ever given (AUTOINCREMENT's record), 0 before the first.
    high_water: u64,
    items: Vec<(u64, ItemBody)>,
    evictions: Vec<(String, u64)>,
}

impl FileState {
    fn open(db: &Path) -> Connection {
        Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap_or_else(|e| panic!("{}: {e}", db.display()))
    }

    fn read(db: &Path) -> FileState {
        let connection = FileState::open(db);
        let integrity = connection
            .prepare("PRAGMA integrity_check")
            .unwrap()
            .query_map([], |row| row.get::<_, String>(0))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let high_water: i64 = connection
            .query_row(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'items'), 0)",
                [],
                |row| row.get(0),
            )
            .unwrap();
        let items = connection
            .prepare("SELECT id, body FROM items ORDER BY id")
            .unwrap()
            .query_map([], |row| {
                Ok((row.get::<_, i64>(0)? as u64, row.get::<_, Vec<u8>>(1)?))
            })
            .unwrap()
            .map(|row| {
                let (id, body) = row.unwrap();
                let body = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("item {id} in the file is unreadable: {e}"));
                (id, body)
            })
            .collect();
        let evictions = connection
            .prepare("SELECT kind, count FROM evictions")
            .unwrap()
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64))
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        FileState {
            integrity,
            high_water: high_water as u64,
            items,
            evictions,
        }
    }

    fn items_left(db: &Path) -> u64 {
        FileState::open(db)
            .query_row("SELECT COUNT(*) FROM items", [], |row| row.get::<_, i64>(0))
            .unwrap() as u64
    }
}

/// The item a writer pushes as number `seq` of `round`: one in ten a sample of 2 to 4 KiB, one
/// in twenty an event, the rest telemetry.
fn body(round: u64, seq: u64) -> ItemBody {
    let model = ModelName::new("crash-test").unwrap();
    match seq % 20 {
        0 | 10 => ItemBody::Sample(Sample {
            model,
            release: round,
            format: format!("seq {seq}"),
            data: sample_bytes(round, seq),
        }),
        5 => ItemBody::Event(Event {
            model: Some(model),
            release: Some(round),
            event: EventKind::Activated,
            detail: format!("seq {seq}"),
        }),
        _ => ItemBody::Telemetry(Telemetry {
            model,
            release: round,
            version: ModelVersion::new("v1").unwrap(),
            interval_ms: 1_000,
            inferences: seq,
            errors: Default::default(),
            latency: Default::default(),
        }),
    }
}

/// (round, seq) of a writer's item.
fn tag(body: &ItemBody) -> Option<(u64, u64)> {
    let seq_of = |text: &str| text.strip_prefix("seq ")?.parse().ok();
    match body {
        ItemBody::Sample(s) => Some((s.release, seq_of(&s.format)?)),
        ItemBody::Event(e) => Some((e.release?, seq_of(&e.detail)?)),
        ItemBody::Telemetry(t) => Some((t.release, t.inferences)),
        _ => None,
    }
}

/// Bytes that differ from item to item, so a mix-up cannot pass as equal.
fn sample_bytes(round: u64, seq: u64) -> Vec<u8> {
    let len = 2048 + (seq * 7919 % 2048) as usize;
    let mut state = (round << 32 | seq) ^ 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The writer process: the agent's outbox and uplink on `dir/outbox.db`, and a thread pushing
/// items. Runs until killed.
async fn writer(dir: PathBuf) -> ! {
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let round: u64 = env(WRITER_ROUND).parse().unwrap();
    let broker_port: u16 = env(WRITER_BROKER).parse().unwrap();
    let writes = env(WRITER_WRITES) == "1";
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter("info")
        .try_init();
    tracing::info!(round, writes, "writer starting");

    common::write_public_keys(&dir);
    let text = format!(
        "device_id = \"{DEVICE}\"\ndata_dir = \"data\"\n[broker]\nurl = \"mqtt://127.0.0.1:{broker_port}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n[trust]\nrelease_keys = [\"release.pub\"]\nfleet_keys = [\"fleet.pub\"]\n"
    );
    let config = AgentConfig::parse(&text, &dir.join("agent.toml"), &dir).unwrap();
    // The agent's default quota: it checkpoints and vacuums as in the field.
    let outbox = Outbox::open(&dir.join("outbox.db"), OutboxLimits::default()).unwrap();
    let (outbox, _thread) = outbox::spawn(outbox);
    let (link, inbound, driver) = link::start(&config).unwrap();
    tokio::spawn(driver);
    tokio::spawn(uplink::run(
        outbox.clone(),
        link,
        inbound.ack.clone(),
        inbound.connected.clone(),
        UplinkConfig::default(),
        Arc::new(UplinkStats::default()),
    ));
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{STARTED}").unwrap();
        stdout.flush().unwrap();
    }
    if writes {
        let runtime = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            let tick = Duration::from_millis(20);
            let per_tick = (ITEMS_PER_SECOND * tick.as_secs_f64()) as u64;
            let mut seq = 0u64;
            let mut next = Instant::now();
            loop {
                // The stats come after everything queued is committed: a true backlog.
                let backlog = runtime
                    .block_on(outbox.stats())
                    .map(|stats| stats.items)
                    .unwrap_or(0);
                if backlog < MAX_BACKLOG {
                    let end = seq + per_tick;
                    while seq < end {
                        if outbox.push(now_ms(), &body(round, seq)) {
                            seq += 1;
                        } else {
                            // The queue is full: the outbox thread is behind; the item waits
                            // its turn, so the sequence stays without gaps.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                next += tick;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
    }
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
