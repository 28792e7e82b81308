//! `fleet-sim`: thousands of simulated devices against a running fleet, speaking the real wire
//! protocol (see `fleet_server::sim`): each a real MQTT session over mutual TLS with its own
//! enrolled certificate, verifying every directive and manifest, reporting its state and
//! uploading telemetry.
//!
//! ```text
//! fleet-sim --server http://127.0.0.1:8480 --token dgt_… --devices 1000 --label fleet=sim
//! ```
//!
//! With `--infer-model` and `--infer-case`, a share of the devices (`--infer-share`, default
//! 1 %) runs the model for real with tract each interval and reports what it measured.
//!
//! Devices are enrolled through the REST API on the first run and their bundles kept in
//! `--bundles` (default `./fleet-sim-bundles`), so later runs reconnect the same devices.
//! Progress is printed every second until Ctrl-C or `--for` seconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use fleet_protocol::Topics;
use fleet_server::client::ApiClient;
use fleet_server::fleet::Bundle;
use fleet_server::sim::{start_devices, Launch, SimConfig, SimInference, SimStats};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "fleet-sim",
    version,
    about = "Simulated devices against a Driftgate fleet"
)]
struct Cli {
    /// The fleet server's URL [env DRIFTGATE_SERVER; default http://127.0.0.1:8480].
    #[arg(long)]
    server: Option<String>,
    /// An operator token [env DRIFTGATE_TOKEN].
    #[arg(long)]
    token: Option<String>,
    /// How many devices to simulate.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Device ids: PREFIX-00000, PREFIX-00001, …
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// A label for newly enrolled devices, key=value (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Where enrollment bundles are kept between runs.
    #[arg(long, default_value = "fleet-sim-bundles")]
    bundles: PathBuf,
    /// Each device uploads a telemetry batch this often (0: no uplink).
    #[arg(long, default_value_t = 10)]
    telemetry_secs: u64,
    /// Telemetry items per batch.
    #[arg(long, default_value_t = 1)]
    batch_items: usize,
    /// TLS handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// The broker's host as the devices should dial it (default: from the bundles).
    #[arg(long)]
    broker_host: Option<String>,
    /// Stop after this many seconds (default: at Ctrl-C).
    #[arg(long = "for")]
    run_for: Option<u64>,
    /// A model (ONNX) that a share of the devices runs for real with tract each telemetry
    /// interval, reporting the latencies measured; needs --infer-case.
    #[arg(long, requires = "infer_case")]
    infer_model: Option<PathBuf>,
    /// The self-test case (`*.selftest.json`) whose inputs they run and outputs they check.
    #[arg(long, requires = "infer_model")]
    infer_case: Option<PathBuf>,
    /// The share of devices that run the model, 0 to 1.
    #[arg(long, default_value_t = 0.01)]
    infer_share: f64,
    /// Runs per device and telemetry interval.
    #[arg(long, default_value_t = 10)]
    infer_runs: u32,
}

fn labels(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--label {pair:?}: expected key=value"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The device's bundle: from `dir` if an earlier run kept it, else enrolled now and kept.
fn bundle(
    api: &ApiClient,
    dir: &Path,
    id: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Bundle> {
    let path = dir.join(format!("{id}.json"));
    if let Ok(bytes) = std::fs::read(&path) {
        return serde_json::from_slice(&bytes).with_context(|| format!("{}", path.display()));
    }
    let reply = api
        .post_json("/api/v1/devices", &json!({"id": id, "labels": labels}))
        .with_context(|| format!("enrolling {id}"))?;
    let bundle: Bundle = serde_json::from_value(reply["bundle"].clone())
        .with_context(|| format!("the bundle of {id}"))?;
    edge_agent::fsutil::atomic_write(&path, &serde_json::to_vec(&bundle)?)
        .with_context(|| format!("keeping {}", path.display()))?;
    Ok(bundle)
}

/// (host, port) of the broker a bundle's agent.toml names.
fn broker_of(bundle: &Bundle) -> Result<(String, u16)> {
    let toml_text = bundle
        .files
        .iter()
        .find(|f| f.name == "agent.toml")
        .map(|f| f.contents.as_str())
        .context("the bundle has no agent.toml")?;
    let value: toml::Value = toml::from_str(toml_text).context("the bundle's agent.toml")?;
    let url = value
        .get("broker")
        .and_then(|b| b.get("url"))
        .and_then(|u| u.as_str())
        .context("agent.toml names no [broker] url")?;
    let rest = url
        .strip_prefix("mqtts://")
        .with_context(|| format!("{url:?} is not mqtts://"))?
        .trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .map_or((rest, "8883"), |(h, p)| (h, p));
    Ok((
        host.to_string(),
        port.parse()
            .with_context(|| format!("the port of {url:?}"))?,
    ))
}

async fn run(cli: Cli) -> Result<()> {
    let api = ApiClient::resolve(cli.server.clone(), cli.token.clone(), None)?;
    let needed = cli.devices as u64 + 256;
    let limit = fleet_server::sim::raise_fd_limit(needed).context("raising the open-file limit")?;
    if limit < needed {
        bail!("{} devices need about {needed} open files and the limit is {limit}: raise it (ulimit -Hn)", cli.devices);
    }
    let labels = labels(&cli.labels)?;
    std::fs::create_dir_all(&cli.bundles)
        .with_context(|| format!("creating {}", cli.bundles.display()))?;
    let started = Instant::now();
    let mut bundles = Vec::with_capacity(cli.devices);
    for i in 0..cli.devices {
        let id = format!("{}-{i:05}", cli.prefix);
        bundles.push(bundle(&api, &cli.bundles, &id, &labels)?);
        if (i + 1) % 500 == 0 || i + 1 == cli.devices {
            eprintln!(
                "bundles: {}/{} ({:.0} s)",
                i + 1,
                cli.devices,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let first = bundles.first().context("--devices must be at least 1")?;
    let (host, port) = broker_of(first)?;
    let host = cli.broker_host.clone().unwrap_or(host);
    if !(0.0..=1.0).contains(&cli.infer_share) {
        bail!("--infer-share {} is outside 0 to 1", cli.infer_share);
    }
    let inference = match (&cli.infer_model, &cli.infer_case) {
        (Some(model), Some(case)) => {
            let inference = Arc::new(SimInference::load(model, case, cli.infer_runs)?);
            let inferring = (cli.infer_share * bundles.len() as f64).round() as usize;
            eprintln!(
                "{inferring} of the devices run the model with tract, {} runs per interval",
                cli.infer_runs
            );
            Some((inference, inferring))
        }
        _ => None,
    };
    let stats = Arc::new(SimStats::default());
    stats.uplink_on.store(true, Ordering::Relaxed);
    start_devices(
        &tokio::runtime::Handle::current(),
        &bundles,
        Launch {
            host: &host,
            port,
            topics: Topics::default(),
            config: SimConfig {
                telemetry_every: (cli.telemetry_secs > 0)
                    .then(|| Duration::from_secs(cli.telemetry_secs)),
                items_per_batch: cli.batch_items.max(1),
                ..SimConfig::default()
            },
            connect_concurrency: cli.connect_concurrency,
            inference,
        },
        &stats,
    )?;
    let started = Instant::now();
    let mut all_connected = None;
    let deadline = cli.run_for.map(|s| started + Duration::from_secs(s));
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let connected = stats.connected.load(Ordering::Relaxed) as usize;
        if connected == bundles.len() && all_connected.is_none() {
            all_connected = Some(started.elapsed());
        }
        eprintln!(
            "{:>5.0} s: {connected}/{} connected; directives applied {} refused {}; items acked {}; connection errors {}",
            started.elapsed().as_secs_f64(),
            bundles.len(),
            stats.applied.load(Ordering::Relaxed),
            stats.refused.load(Ordering::Relaxed),
            stats.items_acked.load(Ordering::Relaxed),
            stats.link_errors.load(Ordering::Relaxed),
        );
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    match all_connected {
        Some(took) => println!(
            "all {} devices connected in {:.1} s",
            bundles.len(),
            took.as_secs_f64()
        ),
        None => println!(
            "{} of {} devices connected",
            stats.connected.load(Ordering::Relaxed),
            bundles.len()
        ),
    }
    let refused = stats.refused.load(Ordering::Relaxed);
    if refused > 0 {
        bail!("{refused} directives were refused");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
