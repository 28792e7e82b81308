//! Sustained outbox inserts: items pushed from an async task as fast as the outbox thread
//! commits them (group commits in WAL mode, `synchronous = NORMAL`), measured until the last
//! one is on disk. Target (issue 4): ≥ 200,000 items/s.
//!
//! ```text
//! cargo bench -p edge-agent --bench outbox               # 1,000,000 items of each kind
//! cargo bench -p edge-agent --bench outbox -- --quick    # 200,000
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edge_agent::outbox::{spawn, Outbox, OutboxLimits};
use fleet_protocol::histogram::LatencyHistogram;
use fleet_protocol::outbox::{Event, EventKind, ItemBody, Telemetry};
use fleet_protocol::{ModelName, ModelVersion};

const TARGET_ITEMS_PER_S: f64 = 200_000.0;

fn telemetry(n: u64) -> ItemBody {
    let mut latency = LatencyHistogram::default();
    for us in [40.0, 55.0, 61.0, 90.0, 130.0] {
        latency.record_us(us + (n % 7) as f64);
    }
    ItemBody::Telemetry(Telemetry {
        model: ModelName::new("cancer-logreg").unwrap(),
        release: 1,
        version: ModelVersion::new("v1").unwrap(),
        interval_ms: 10_000,
        inferences: 1_000 + n % 100,
        errors: BTreeMap::from([("bad_request".to_string(), n % 3)]),
        latency,
    })
}

fn event(n: u64) -> ItemBody {
    ItemBody::Event(Event {
        model: Some(ModelName::new("cancer-logreg").unwrap()),
        release: Some(n),
        event: EventKind::Activated,
        detail: String::new(),
    })
}

async fn run(count: u64, make: fn(u64) -> ItemBody) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open(
        &path,
        OutboxLimits {
            quota_bytes: 4 << 30,
        },
    )
    .unwrap();
    let (handle, thread) = spawn(outbox);
    let started = Instant::now();
    let mut full = 0u64;
    for n in 0..count {
        let body = make(n);
        // A full queue means the thread is behind: wait for it rather than drop, so the
        // figure is the sustained rate of what is actually stored.
        while !handle.push(n as i64, &body) {
            full += 1;
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let stats = handle.stats().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(stats.items, count);
    let file = stats.file_bytes;
    drop(handle);
    thread.join().unwrap();
    let _ = full;
    (count as f64 / elapsed.as_secs_f64(), file)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let count = if quick { 200_000 } else { 1_000_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("outbox benchmark: {count} items per kind, pushed from one task, committed by the outbox thread");
    let mut missed = false;
    for (kind, make) in [
        ("telemetry", telemetry as fn(u64) -> ItemBody),
        ("event", event),
    ] {
        let (rate, file) = runtime.block_on(run(count, make));
        let ok = rate >= TARGET_ITEMS_PER_S;
        missed |= !ok;
        println!(
            "  {kind:<10} {rate:>10.0} items/s   ({:.1} MiB on disk)   target ≥ {TARGET_ITEMS_PER_S} {}",
            file as f64 / (1 << 20) as f64,
            if ok { "ok" } else { "MISSED" }
        );
    }
    if missed && std::env::args().any(|a| a == "--check") {
        std::process::exit(1);
    }
}
