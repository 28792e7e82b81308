//! Issue 4, acceptance 2: with a 1 MiB outbox quota and a long offline period at a high sample
//! rate, the database stays under the quota, install events survive, and the eviction counts
//! reach the server after the reconnect.
//!
//! A real agent process samples every inference (rate 1.0) while its link is cut (a proxy
//! between it and the broker resets every connection), so samples pile up far beyond the
//! quota: the outbox must give up samples first, keep the install events, and report what it
//! gave up once the link is back.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::agent::{infer_matches_self_test, link_metrics, log_tail, write_config, Agent};
use common::proxy::{Cut, Proxy};
use common::receiver::Receiver;
use common::{sample_manifest, Control, Faults, Responder};
use fleet_protocol::outbox::{EventKind, ItemBody};

const QUOTA: u64 = 1024 * 1024;
/// About 350 bytes of outbox per sampled inference of cancer-logreg: some 7 MB offered, seven
/// times the quota.
const SERVED_OFFLINE: u64 = 20_000;
const CLIENTS: u64 = 4;
const _: () = assert!(SERVED_OFFLINE.is_multiple_of(CLIENTS));

/// The outbox database and its write-ahead log, as the quota counts them.
fn outbox_bytes(data_dir: &Path) -> u64 {
    ["outbox.db", "outbox.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(data_dir.join(f)).map_or(0, |m| m.len()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_offline_period_stays_under_quota_and_reports_evictions() {
    for broker in common::brokers("a_long_offline_period_stays_under_quota_and_reports_evictions") {
        eprintln!("broker: {}", broker.name);
        offline_period(broker.port, &[]).await;
    }
}

/// The same on a slow disk: every fsync of the agent takes 50 ms, as on an SD card or a busy
/// virtual disk. The outbox must keep up with its writers there too; when it fell behind,
/// the uplink's requests waited behind a minute of queued appends and nothing reached the
/// server in time (a CI machine showed it first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_offline_period_on_a_slow_disk_still_reports_in_time() {
    let library = match driftgate_tests::slow_fsync::library() {
        Ok(library) => library,
        Err(why) => {
            eprintln!("skipped a_long_offline_period_on_a_slow_disk_still_reports_in_time: {why}");
            return;
        }
    };
    let broker = common::embedded_broker();
    offline_period(
        broker.port,
        &[
            ("LD_PRELOAD", library.as_os_str()),
            (driftgate_tests::slow_fsync::DELAY_VAR, "50000".as_ref()),
        ],
    )
    .await;
}

/// Installs a model, cuts the link, serves [`SERVED_OFFLINE`] sampled inferences, restores the
/// link and checks what reaches the server. `env` goes to the agent process.
async fn offline_period(broker_port: u16, env: &[(&str, &std::ffi::OsStr)]) {
    let device = "dev-quota";
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let api_port = common::free_port();
    let proxy = Proxy::start(broker_port);
    write_config(
            dir.path(),
            device,
            proxy.port,
            api_port,
            &format!(
                "[telemetry]\ninterval_secs = 1\n[outbox]\nquota_bytes = {QUOTA}\n[sampler]\nrate = 1.0"
            ),
        );
    let (onnx, manifest) = sample_manifest("cancer-logreg", "v1", 1);
    let responder = Responder::start(broker_port, Faults::default()).await;
    responder.add(onnx);
    let receiver = Receiver::start(broker_port, device, Vec::new()).await;
    let mut control = Control::start(broker_port, device).await;
    let _agent = Agent::start_with_env(dir.path(), env);
    control.wait_for("the agent's first state", |_| true).await;
    control.install(device, 1, &manifest, false).await;
    // The install events are delivered before the outage; the cut must not lose the ones
    // still waiting either way, so cut right away.
    proxy.cut(Cut::Reset);

    // Serve, and watch the file while it fills.
    let watching = {
        let data_dir = data_dir.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut largest = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                largest = largest.max(outbox_bytes(&data_dir));
                std::thread::sleep(Duration::from_millis(20));
            }
            largest
        });
        (stop, handle)
    };
    let started = Instant::now();
    {
        let manifest = manifest.clone();
        tokio::task::spawn_blocking(move || {
            std::thread::scope(|scope| {
                for _ in 0..CLIENTS {
                    let manifest = &manifest;
                    scope.spawn(move || {
                        for _ in 0..SERVED_OFFLINE / CLIENTS {
                            infer_matches_self_test(api_port, manifest);
                        }
                    });
                }
            })
        })
        .await
        .unwrap();
    }
    let serving_took = started.elapsed();
    // Two more telemetry intervals offline, so the last counts are in the outbox too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    watching.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let largest = watching.1.join().unwrap();
    assert!(
        largest <= QUOTA,
        "the outbox grew to {largest} bytes with a quota of {QUOTA}"
    );
    assert!(
        largest > QUOTA / 4,
        "the outbox never filled ({largest} bytes): the test did not press the quota"
    );

    proxy.restore();
    // Wait until the eviction report and every inference's telemetry have arrived.
    let restored = Instant::now();
    let (evicted, counted, events, samples, drained) = loop {
        let (evicted, counted, events, samples, drained) = {
            let items = receiver.items.lock().unwrap();
            // The evicted ids leave gaps for good: the acks must move past them, or the
            // outbox would never drain.
            let drained = items.keys().next_back().copied().unwrap_or(0)
                <= receiver.acked.load(std::sync::atomic::Ordering::Relaxed);
            let mut evicted: BTreeMap<String, u64> = BTreeMap::new();
            let mut counted = 0u64;
            let mut events = Vec::new();
            let mut samples = 0u64;
            for item in items.values() {
                match &item.body {
                    ItemBody::Evictions(e) => {
                        for (kind, n) in &e.evicted {
                            *evicted.entry(kind.clone()).or_default() += n;
                        }
                    }
                    ItemBody::Telemetry(t) => counted += t.inferences,
                    ItemBody::Event(e) => events.push(e.event),
                    ItemBody::Sample(_) => samples += 1,
                    _ => {}
                }
            }
            (evicted, counted, events, samples, drained)
        };
        // Every sample accounted for, too: kept samples and a later eviction report can
        // still be on their way when the first report arrives. A lost one times out below.
        let accounted = samples + evicted.get("sample").copied().unwrap_or(0);
        let done = counted >= SERVED_OFFLINE
            && !evicted.is_empty()
            && accounted >= SERVED_OFFLINE
            && drained;
        if done || restored.elapsed() > Duration::from_secs(60) {
            break (evicted, counted, events, samples, drained);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let context = format!(
        "the receiver had {} deliveries and acked up to {}; the agent's counters:\n{}\n\
             the agent's log:\n{}",
        receiver.deliveries.lock().unwrap(),
        receiver.acked.load(std::sync::atomic::Ordering::Relaxed),
        link_metrics(api_port),
        log_tail(dir.path())
    );
    eprintln!(
        "served {SERVED_OFFLINE} offline in {serving_took:?}; largest outbox {largest} bytes \
             (quota {QUOTA}); after the reconnect: {samples} samples kept, evicted {evicted:?}, \
             telemetry counts {counted}, events {events:?}"
    );
    let evicted_samples = evicted.get("sample").copied().unwrap_or(0);
    assert!(
        evicted_samples > 0,
        "eviction counts are reported after the reconnect: {evicted:?}\n{context}"
    );
    // Samples go first: every offered sample is either kept or counted as evicted.
    assert_eq!(
        samples + evicted_samples,
        SERVED_OFFLINE,
        "each sample is either delivered or counted as evicted"
    );
    assert!(
        !evicted.contains_key("event"),
        "install events are never evicted: {evicted:?}"
    );
    for kind in [EventKind::DirectiveAccepted, EventKind::Activated] {
        assert_eq!(
            events.iter().filter(|e| **e == kind).count(),
            1,
            "{kind:?} survived, once: {events:?}\n{context}"
        );
    }
    // Samples were enough to make room: no telemetry had to go, so every inference is
    // still counted.
    assert!(!evicted.contains_key("telemetry"), "{evicted:?}");
    assert_eq!(counted, SERVED_OFFLINE, "telemetry counts every inference");
    assert!(
        drained,
        "every item received was acknowledged, past the evicted ids\n{context}"
    );
    // The agent served throughout.
    infer_matches_self_test(api_port, &manifest);
}
