//! Sustained ingest: outbox items from devices, through the broker, into the store, acked.
//!
//! `cargo bench -p fleet-server --bench ingest [-- --items N --devices D --postgres URL]`
//!
//! Starts a real server in process (embedded broker with mutual TLS, SQLite in a temp dir;
//! then PostgreSQL when `--postgres URL` or `DRIFTGATE_TEST_POSTGRES_URL` names one), enrolls
//! D devices, and lets each send its share of N items as an agent does: batches of 512
//! telemetry and health items on `up`, at most 4 batches awaiting their ack. Prints items/s
//! from the first batch sent to the last ack received, against the target of 50,000.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_protocol::histogram::LatencyHistogram;
use fleet_protocol::outbox::{Ack, Batch, Health, Item, ItemBody, Telemetry};
use fleet_protocol::{decode, encode, DeviceId, ModelName, ModelVersion, TopicKind, Topics, V1};
use fleet_server::config::ServerConfig;
use fleet_server::server;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

const BATCH_ITEMS: usize = 512;
const IN_FLIGHT: usize = 4;
const TARGET: f64 = 50_000.0;

struct Args {
    items: usize,
    devices: usize,
    postgres: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        items: 200_000,
        devices: 8,
        postgres: std::env::var("DRIFTGATE_TEST_POSTGRES_URL").ok(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--items" => args.items = it.next().and_then(|v| v.parse().ok()).unwrap_or(args.items),
            "--devices" => {
                args.devices = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(args.devices)
            }
            "--postgres" => args.postgres = it.next(),
            "--bench" => {}
            other => eprintln!("ignoring argument {other:?}"),
        }
    }
    args
}

/// One device's batches, encoded up front so the bench measures the server, not the encoder.
fn batches(device: &DeviceId, items: usize) -> Vec<(u64, Vec<u8>)> {
    let model = ModelName::new("digits-mlp").unwrap();
    let version = ModelVersion::new("v2").unwrap();
    let mut latency = LatencyHistogram::default();
    for us in [80.0, 95.0, 120.0, 400.0] {
        latency.record_us(us);
    }
    let mut out = Vec::new();
    let mut id = 0u64;
    while (id as usize) < items {
        let after = id;
        let n = BATCH_ITEMS.min(items - id as usize);
        let batch_items: Vec<Item> = (0..n)
            .map(|_| {
                id += 1;
                let body = if id.is_multiple_of(8) {
                    ItemBody::Health(Health {
                        cpu_percent: 23.5,
                        mem_used_bytes: 512 << 20,
                        mem_total_bytes: 4 << 30,
                        disk_free_bytes: 10 << 30,
                        disk_total_bytes: 32 << 30,
                        temperatures_c: BTreeMap::from([("cpu".to_string(), 48.0)]),
                        agent_rss_bytes: 30 << 20,
                        uptime_s: id,
                        link: Default::default(),
                    })
                } else {
                    ItemBody::Telemetry(Telemetry {
                        model: model.clone(),
                        release: 2,
                        version: version.clone(),
                        interval_ms: 10_000,
                        inferences: 1000 + id,
                        errors: BTreeMap::from([("bad_shape".to_string(), 1)]),
                        latency: latency.clone(),
                    })
                };
                Item {
                    id,
                    at_ms: 1_700_000_000_000 + id as i64,
                    body,
                }
            })
            .collect();
        let batch = Batch {
            v: V1,
            device: device.clone(),
            after: Some(after),
            items: batch_items,
        };
        out.push((id, encode(&batch)));
    }
    out
}

fn device_options(bundle: &fleet_server::fleet::Bundle, id: &str, port: u16) -> MqttOptions {
    let file = |name: &str| -> Vec<u8> {
        bundle
            .files
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.contents.as_bytes().to_vec())
            .unwrap_or_default()
    };
    let mut options = MqttOptions::new(id, "localhost", port);
    options.set_max_packet_size(8 << 20, 8 << 20);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: file("ca.pem"),
        alpn: None,
        client_auth: Some((file("device.pem"), file("device.key"))),
    }));
    options
}

/// Sends one device's batches with a window of IN_FLIGHT, counting acked items.
async fn device_run(
    options: MqttOptions,
    device: DeviceId,
    batches: Vec<(u64, Vec<u8>)>,
    acked_items: Arc<AtomicU64>,
    start: Arc<tokio::sync::Barrier>,
) {
    let topics = Topics::default();
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let up = topics.topic(&device, TopicKind::Up);
    client
        .subscribe(topics.topic(&device, TopicKind::Ack), QoS::AtLeastOnce)
        .await
        .unwrap();
    // The SUBACK first, so that no ack is missed.
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.expect("device connects")
        {
            break;
        }
    }
    // The event loop runs on its own, handing acks over.
    let (ack_tx, mut acks) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(ack) = decode::<Ack>(&p.payload) {
                        if ack_tx.send(ack.up_to).is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("device connection failed: {e}"),
            }
        }
    });
    start.wait().await;
    let last_id = batches.last().map(|b| b.0).unwrap_or(0);
    let (mut next, mut acked) = (0usize, 0u64);
    while acked < last_id {
        let unacked = batches[..next]
            .iter()
            .filter(|(last, _)| *last > acked)
            .count();
        for _ in unacked..IN_FLIGHT {
            let Some((_, payload)) = batches.get(next) else {
                break;
            };
            client
                .publish(&up, QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap();
            next += 1;
        }
        let Some(up_to) = acks.recv().await else {
            break;
        };
        if up_to > acked {
            acked_items.fetch_add(up_to - acked, Ordering::Relaxed);
            acked = up_to;
        }
    }
    poller.abort();
}

async fn run_backend(label: &str, database: Option<String>, args: &Args) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig {
        data_dir: dir.path().join("server"),
        database,
        ..Default::default()
    };
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.broker.listen = "127.0.0.1:0".parse().unwrap();
    let running = server::start(config).await.expect("server starts");
    let port = running.device_addr.unwrap().port();
    let per_device = args.items / args.devices;
    let total = (per_device * args.devices) as u64;
    let acked = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(args.devices + 1));
    let mut tasks = Vec::new();
    for d in 0..args.devices {
        let id = format!("bench-{d}");
        let bundle = running
            .fleet
            .enroll(&id, Default::default(), None)
            .await
            .unwrap();
        let device = DeviceId::new(&id).unwrap();
        let batches = batches(&device, per_device);
        tasks.push(tokio::spawn(device_run(
            device_options(&bundle, &id, port),
            device,
            batches,
            acked.clone(),
            barrier.clone(),
        )));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut last_report = Instant::now();
    while acked.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!(
                "  {label}: {} of {total} items acked ({:.0} items/s so far)",
                acked.load(Ordering::Relaxed),
                acked.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{label}: stalled"
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let stored: i64 = running
        .fleet
        .store
        .item_counts(None)
        .await
        .unwrap()
        .values()
        .sum();
    assert_eq!(stored as u64, total, "{label}: every item stored once");
    let rate = total as f64 / elapsed;
    println!(
        "{label:<10} {total} items from {} devices in {elapsed:.2} s = {rate:>9.0} items/s   target ≥ {TARGET:.0} {}",
        args.devices,
        if rate >= TARGET { "ok" } else { "BELOW" }
    );
    running.shutdown().await;
    rate
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "ingest benchmark: {} items in batches of {BATCH_ITEMS} (7/8 telemetry, 1/8 health), {} in flight per device, {} cores",
        args.items,
        IN_FLIGHT,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    runtime.block_on(async {
        run_backend("sqlite", None, &args).await;
        match &args.postgres {
            Some(url) => {
                let db = fresh_postgres(url).await;
                run_backend("postgres", Some(db), &args).await;
            }
            None => println!(
                "postgres   skipped: pass --postgres URL or set DRIFTGATE_TEST_POSTGRES_URL"
            ),
        }
    });
}

async fn fresh_postgres(admin: &str) -> String {
    sqlx::any::install_default_drivers();
    let name = format!("driftgate_bench_{}", std::process::id());
    let pool = sqlx::AnyPool::connect(admin)
        .await
        .expect("PostgreSQL reachable");
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&pool)
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .expect("CREATE DATABASE");
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    format!("{base}/{name}")
}
