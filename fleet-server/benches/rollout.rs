//! Rollout convergence: the time from a rollout's start until every device runs the new
//! version, for fleets of 100 and 1,000 simulated agents.
//!
//! `cargo bench -p fleet-server --bench rollout [-- --quick | --agents 100,1000 --runs 3
//! --tick-ms 100 --connect-concurrency 32]` (`--quick`: 100 agents, one run)
//!
//! For each fleet size it starts a real server in process (embedded broker with mutual TLS,
//! SQLite in a temp dir, the rollout engine ticking every `--tick-ms`), signs and pushes
//! digits-mlp v1 and v2, enrolls the devices and connects one simulated agent per device: a
//! real MQTT session over mutual TLS with the device's enrolled certificate, which does what
//! an agent's control path does. It subscribes to its `directive` topic, announces itself
//! online (retained, with an offline last will), verifies every directive as the agent does
//! (fleet key, device, sequence, expiry; each manifest against the release key; the release
//! order) and reports the version active in its retained `state`, phase `active`, with the
//! directive's sequence. It does not download, check or load the artifact: the figure is the
//! control loop's (engine ticks, signed directives, state reports through the broker into the
//! store), not an install's, which depends on the model's size and the device.
//!
//! v1 goes to every device first (one stage), so that every device has a previous version;
//! then v2 is rolled out in stages 10 % → 50 % → 100 %, zero soak, with gates that judge only
//! the installs (then v3, … for `--runs`). The time from `create_rollout` until the rollout is
//! completed and every device's stored state shows the version is printed, with each stage's
//! timeline from the audit log, and a summary with the median over the runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fleet_protocol::state::State;
use fleet_protocol::Topics;
use fleet_server::config::ServerConfig;
use fleet_server::fleet::Fleet;
use fleet_server::rollout::spec::Stage;
use fleet_server::rollout::{FailurePolicy, Gates, Outcome, Phase, RolloutRequest, StageSize};
use fleet_server::rollout_runner::Actor;
use fleet_server::server;
use fleet_server::sim::{sign_versions, start_devices, Launch, SignedVersion, SimConfig, SimStats};
use fleet_server::store::AuditEntry;

const MODEL: &str = "digits-mlp";
/// The staged rollout that is timed; the last stage must be 100 %.
const STAGES_PCT: [f64; 3] = [10.0, 50.0, 100.0];
/// A stage that has not converged by then is a failure, not a slow result.
const ROLLOUT_LIMIT: Duration = Duration::from_secs(900);
const CONNECT_LIMIT: Duration = Duration::from_secs(600);

struct Args {
    agents: Vec<usize>,
    /// Timed staged rollouts per fleet size (v2, v3, …): a stage's end waits for the next
    /// engine tick, so a single run is quantised by the tick; the median of a few is steadier.
    runs: usize,
    tick_ms: u64,
    connect_concurrency: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        agents: vec![100, 1000],
        runs: 3,
        tick_ms: 100,
        connect_concurrency: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                args.agents = vec![100];
                args.runs = 1;
            }
            "--runs" => {
                args.runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .unwrap_or(args.runs)
            }
            "--agents" => {
                let parsed: Option<Vec<usize>> = it
                    .next()
                    .map(|v| v.split(',').map(|n| n.trim().parse().ok()).collect())
                    .and_then(|v: Option<Vec<usize>>| v.filter(|v| v.iter().all(|&n| n > 0)));
                match parsed {
                    Some(v) if !v.is_empty() => args.agents = v,
                    _ => eprintln!("--agents takes a list such as 100,1000; keeping the default"),
                }
            }
            "--tick-ms" => {
                args.tick_ms = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(args.tick_ms)
            }
            "--connect-concurrency" => {
                args.connect_concurrency = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .unwrap_or(args.connect_concurrency)
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => eprintln!("ignoring argument {other:?}"),
        }
    }
    args
}

/// Pushes a signed version through the registry, as the REST API's push does (manifest
/// verified against the trusted release keys, artifact staged, hashed and checked).
async fn push(fleet: &Fleet, signed: &SignedVersion) -> Result<()> {
    let (_, manifest) = fleet
        .registry
        .verify_envelope(&signed.manifest_bytes)
        .with_context(|| format!("verifying the manifest of {}", signed.version))?;
    let mut staged = fleet.registry.blobs().stage().await?;
    staged.limit(manifest.size);
    staged.write(&tokio::fs::read(&signed.model).await?).await?;
    fleet
        .registry
        .push(&signed.manifest_bytes, &manifest, staged, None)
        .await
        .with_context(|| format!("pushing {MODEL}@{}", signed.version))?;
    Ok(())
}

/// Polls `probe` every `every` until it returns `Some`, printing `describe()` once a second;
/// fails after `limit`.
async fn wait_for<T, F, Fut>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut probe: F,
    describe: impl Fn() -> String,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    let mut reported = Instant::now();
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        if started.elapsed() > limit {
            bail!("{what}: not done after {:?} ({})", limit, describe());
        }
        if reported.elapsed() >= Duration::from_secs(1) {
            reported = Instant::now();
            eprintln!(
                "  {what}: {} ({:.0} s)",
                describe(),
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(every).await;
    }
}

/// One timed rollout.
struct Measured {
    version: String,
    /// Each stage's share of the fleet, percent.
    plan: Vec<f64>,
    /// From `create_rollout` until the rollout was seen completed and every device's stored
    /// state showed the version (wall clock, polled every 10 ms).
    converged: Duration,
    /// The engine's own clock: rollout started → completed decision.
    engine: Duration,
    directives: u64,
    states: u64,
    audit: Vec<AuditEntry>,
    started_ms: i64,
}

fn stage_plan(stages: &[f64]) -> Vec<Stage> {
    stages
        .iter()
        .map(|&pct| Stage {
            size: StageSize::Percent(pct),
            soak_secs: 0,
            gates: None,
        })
        .collect()
}

/// Gates that judge only the installs: every reached device must install; error rate, p95
/// ratio and drift are not judged, and no telemetry is needed (the simulated agents serve
/// nothing). So convergence depends on the control loop alone.
fn install_only_gates() -> Gates {
    Gates {
        min_install_success_pct: 100.0,
        max_error_rate_pct: None,
        max_p95_ratio: None,
        max_drift_score: None,
        min_devices_reporting: 0,
    }
}

async fn timed_rollout(
    fleet: &Fleet,
    version: &str,
    stages: &[f64],
    agents: usize,
) -> Result<Measured> {
    let request = RolloutRequest {
        model: MODEL.into(),
        version: version.to_string(),
        selector: BTreeMap::new(),
        spread_label: None,
        stages: stage_plan(stages),
        ramp: None,
        gates: install_only_gates(),
        // A failure stops and shows here, rather than rolling back and muddling the figure.
        on_failure: FailurePolicy::Pause,
        install_timeout_secs: 300,
        max_failed_devices: 0,
    };
    let metrics = &fleet.metrics;
    let directives_before = metrics.directives_published.load(Ordering::Relaxed);
    let states_before = metrics.states_stored.load(Ordering::Relaxed);
    let started = Instant::now();
    let created = fleet
        .create_rollout(request, &Actor("bench".into()))
        .await
        .context("creating the rollout")?;
    let id = created.id.clone();

    // Completed: the engine saw every device report the version (from the store).
    let last = std::sync::Mutex::new(String::from("created"));
    // References the probes' futures copy (a future may not borrow from its closure).
    let (id, last) = (&id, &last);
    let record = wait_for(
        &format!("{MODEL}@{version} to {agents} agents"),
        ROLLOUT_LIMIT,
        Duration::from_millis(10),
        || async move {
            let record = fleet
                .store
                .rollout(id)
                .await?
                .context("the rollout vanished")?;
            let on_version = record
                .state
                .devices
                .values()
                .filter(|d| d.outcome == Outcome::Installed)
                .count();
            if let Ok(mut last) = last.lock() {
                *last = format!(
                    "stage {}/{}, {on_version}/{agents} devices installed, {} directives so far",
                    record.state.stage + 1,
                    record.spec.stages.len(),
                    metrics.directives_published.load(Ordering::Relaxed) - directives_before
                );
            }
            match record.phase {
                Phase::Completed => Ok(Some(record)),
                Phase::Running => Ok(None),
                other => bail!(
                    "the rollout is {}: {}",
                    other.as_str(),
                    record.state.reason.as_deref().unwrap_or("no reason given")
                ),
            }
        },
        || last.lock().map(|l| l.clone()).unwrap_or_default(),
    )
    .await?;

    // And every device's stored report says so (the engine read the same store; checked
    // here on its own, as the definition of converged).
    wait_for(
        "stored states",
        Duration::from_secs(30),
        Duration::from_millis(10),
        || async move {
            let on_version = fleet
                .store
                .devices()
                .await?
                .iter()
                .filter(|d| reports_active(d.state.as_ref(), version))
                .count();
            Ok((on_version == agents).then_some(()))
        },
        String::new,
    )
    .await?;
    let converged = started.elapsed();

    let finished_ms = record.state.finished_ms.unwrap_or(record.state.started_ms);
    Ok(Measured {
        version: version.to_string(),
        plan: stages.to_vec(),
        converged,
        engine: Duration::from_millis(
            u64::try_from(finished_ms - record.state.started_ms).unwrap_or(0),
        ),
        directives: metrics.directives_published.load(Ordering::Relaxed) - directives_before,
        states: metrics.states_stored.load(Ordering::Relaxed) - states_before,
        audit: fleet.store.audit(Some(id), 0, 10_000).await?,
        started_ms: record.state.started_ms,
    })
}

/// Whether a stored report says `version` of the model is active.
fn reports_active(state: Option<&serde_json::Value>, version: &str) -> bool {
    state
        .and_then(|s| serde_json::from_value::<State>(s.clone()).ok())
        .is_some_and(|s| {
            s.models.iter().any(|m| {
                m.name.as_str() == MODEL
                    && m.active
                        .as_ref()
                        .is_some_and(|a| a.version.as_str() == version)
            })
        })
}

/// Each stage's timeline from the audit log, relative to the rollout's start (engine clock:
/// the time of the step that decided; a step's directives go out right after its decisions).
fn print_stages(m: &Measured) {
    let stage_of = |e: &AuditEntry| e.details.get("stage").and_then(|s| s.as_u64());
    let at = |action: &str, stage: u64| {
        m.audit
            .iter()
            .find(|e| e.action == action && stage_of(e) == Some(stage))
            .map(|e| (e.at_ms - m.started_ms) as f64 / 1000.0)
    };
    let show = |t: Option<f64>| t.map_or("      –".into(), |t| format!("{t:>6.2}s"));
    println!("    stage  size   devices   reached    settled   gates passed   stage took");
    let mut previous_end = 0.0;
    for (stage, pct) in (1u64..).zip(&m.plan) {
        let devices: usize = m
            .audit
            .iter()
            .filter(|e| e.action == "devices_reached" && stage_of(e) == Some(stage))
            .filter_map(|e| e.details.get("devices").and_then(|d| d.as_array()))
            .map(Vec::len)
            .sum();
        let size = format!("{pct:.0} %");
        let passed = at("gates_passed", stage);
        println!(
            "    {stage:>5}  {size:>5}  {devices:>8}   {}    {}       {}      {}",
            show(at("devices_reached", stage)),
            show(at("stage_settled", stage)),
            show(passed),
            show(passed.map(|p| p - previous_end)),
        );
        previous_end = passed.unwrap_or(previous_end);
    }
}

fn print_measured(m: &Measured, agents: usize) {
    let secs = m.converged.as_secs_f64();
    println!(
        "  {MODEL}@{} to {agents} agents in {} stage(s): converged in {secs:.2} s (engine clock {:.2} s); {} directives ({:.0}/s), {} state reports stored ({:.0}/s)",
        m.version,
        m.plan.len(),
        m.engine.as_secs_f64(),
        m.directives,
        m.directives as f64 / secs,
        m.states,
        m.states as f64 / secs,
    );
    print_stages(m);
}

/// One fleet size on a fresh server: returns the timed staged rollouts.
async fn run_fleet(
    agents: usize,
    args: &Args,
    signed: &[SignedVersion],
    keys: &Path,
) -> Result<Vec<Measured>> {
    println!("\n{agents} simulated agents");
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig {
        data_dir: dir.path().join("server"),
        ..Default::default()
    };
    config.api.listen = "127.0.0.1:0".parse()?;
    config.broker.listen = "127.0.0.1:0".parse()?;
    config.trust.release_keys = vec![keys.join("release.pub")];
    config.rollouts.tick_ms = args.tick_ms;
    let topics = Topics::new(config.topic_root.clone()).map_err(anyhow::Error::msg)?;
    let running = server::start(config).await.context("starting the server")?;
    let fleet = running.fleet.clone();
    let port = running
        .device_addr
        .context("the embedded broker has no device listener")?
        .port();
    for s in signed {
        push(&fleet, s).await?;
    }

    let started = Instant::now();
    let mut bundles = Vec::with_capacity(agents);
    for i in 0..agents {
        bundles.push(
            fleet
                .enroll(&format!("sim-{i:04}"), BTreeMap::new(), None)
                .await?,
        );
        if (i + 1) % 250 == 0 && i + 1 < agents {
            eprintln!("  enrolled {}/{agents}", i + 1);
        }
    }
    println!(
        "  enrolled {agents} devices in {:.1} s (certificate from the device CA each)",
        started.elapsed().as_secs_f64()
    );
    // Connect with bounded concurrency: at most `connect_concurrency` TLS handshakes and
    // first subscriptions in flight; the rest wait for a permit.
    let started = Instant::now();
    let progress = Arc::new(SimStats::default());
    let tasks = start_devices(
        &tokio::runtime::Handle::current(),
        &bundles,
        Launch {
            host: "localhost",
            port,
            topics: topics.clone(),
            config: SimConfig::default(),
            connect_concurrency: args.connect_concurrency,
            inference: None,
        },
        &progress,
    )?;
    let progress = &progress;
    let describe = || {
        format!(
            "{}/{agents} connected and subscribed ({} connection errors)",
            progress.connected.load(Ordering::Relaxed),
            progress.link_errors.load(Ordering::Relaxed)
        )
    };
    wait_for(
        "connecting",
        CONNECT_LIMIT,
        Duration::from_millis(20),
        || async move {
            Ok((progress.connected.load(Ordering::Relaxed) == agents as u64).then_some(()))
        },
        describe,
    )
    .await?;
    println!(
        "  {agents} agents connected over mutual TLS and subscribed in {:.1} s ({} at a time, {} connection errors)",
        started.elapsed().as_secs_f64(),
        args.connect_concurrency,
        progress.link_errors.load(Ordering::Relaxed)
    );
    // Nothing of the connect burst left in the ingest queue when the clock starts: every
    // device's online status is stored.
    let store = &fleet.store;
    wait_for(
        "online statuses stored",
        Duration::from_secs(120),
        Duration::from_millis(50),
        || async move {
            let online = store
                .devices()
                .await?
                .iter()
                .filter(|d| d.presence.as_deref() == Some("online"))
                .count();
            Ok((online == agents).then_some(()))
        },
        String::new,
    )
    .await?;

    let first = timed_rollout(&fleet, "v1", &[100.0], agents)
        .await
        .context("rolling out v1")?;
    print_measured(&first, agents);
    // Each timed run moves the whole fleet from the version before to the next one.
    let mut runs = Vec::with_capacity(args.runs);
    for s in signed.iter().skip(1).take(args.runs) {
        let measured = timed_rollout(&fleet, &s.version, &STAGES_PCT, agents)
            .await
            .with_context(|| format!("rolling out {}", s.version))?;
        print_measured(&measured, agents);
        runs.push(measured);
    }
    let refused = progress.refused.load(Ordering::Relaxed);
    let applied = progress.applied.load(Ordering::Relaxed);
    println!(
        "  agents applied {applied} directives, refused {refused}; {} connection errors",
        progress.link_errors.load(Ordering::Relaxed)
    );
    if refused > 0 {
        bail!("{refused} directives were refused by the simulated agents");
    }

    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    running.shutdown().await;
    Ok(runs)
}

fn main() -> Result<()> {
    let args = parse_args();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let most = args.agents.iter().copied().max().unwrap_or(0) as u64;
    let fd_limit = fleet_server::sim::raise_fd_limit(2 * most + 512)?;
    if fd_limit < 2 * most + 512 {
        bail!(
            "{most} agents need about {} open files and the hard limit is {fd_limit}: raise it (ulimit -Hn)",
            2 * most + 512
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan: Vec<String> = STAGES_PCT.iter().map(|p| format!("{p:.0} %")).collect();
    println!("rollout benchmark: time from rollout start until every device runs the new version");
    println!(
        "  server in process: embedded broker (mTLS), SQLite in a temp dir; engine tick {} ms; {cores} cores; open-file limit {fd_limit}",
        args.tick_ms
    );
    println!(
        "  each simulated agent: its own MQTT session over mTLS with its enrolled certificate; verifies every directive (fleet key, device, sequence, expiry, manifest signature, release order) and reports the version active in its retained state"
    );
    println!(
        "  no artifact is downloaded or loaded: this measures the control loop (engine ticks, signed directives, state reports through the broker into the store)"
    );
    println!(
        "  timed rollouts: {MODEL} v1 → v2 (then v2 → v3, …: {} per fleet size) in stages {}, soak 0 s each; gates: 100 % installs, error rate, p95 ratio and drift not judged, 0 devices reporting",
        args.runs,
        plan.join(" → ")
    );
    println!("  (first v1 goes to every device in one stage, so each has a previous version)");

    let work = tempfile::tempdir()?;
    let signed = sign_versions(
        &driftgate_tests::workspace_root().join("models"),
        MODEL,
        work.path(),
        args.runs + 1,
    )?;
    let keys = work.path().join("keys");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    for &agents in &args.agents {
        let runs = runtime.block_on(run_fleet(agents, &args, &signed, &keys))?;
        results.push((agents, runs));
    }

    println!(
        "\nsummary: staged rollout to every device ({}), soak 0 s, engine tick {} ms, {cores} cores; median of {} run(s)",
        plan.join(" / "),
        args.tick_ms,
        args.runs
    );
    println!(
        "  agents   stages   time to converge (s)   min – max (s)   engine clock (s)   directives   directives/s"
    );
    for (agents, runs) in &results {
        let secs: Vec<f64> = sorted(runs.iter().map(|m| m.converged.as_secs_f64()));
        let engine: Vec<f64> = sorted(runs.iter().map(|m| m.engine.as_secs_f64()));
        let directives = runs.first().map_or(0, |m| m.directives);
        let median = secs[secs.len() / 2];
        println!(
            "  {agents:>6}   {:>6}   {median:>20.2}   {:>5.2} – {:<5.2}   {:>16.2}   {directives:>10}   {:>12.0}",
            STAGES_PCT.len(),
            secs[0],
            secs[secs.len() - 1],
            engine[engine.len() / 2],
            directives as f64 / median
        );
    }
    Ok(())
}

/// The values in ascending order (never empty: at least one run is timed).
fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        v.push(f64::NAN);
    }
    v
}
