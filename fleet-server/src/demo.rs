//! `fleet-server demo`: the whole product on one machine, in one command.
//!
//! It starts the server with its defaults (embedded broker, SQLite) in a fresh directory,
//! enrolls N devices and runs a real `edge-agent` for each in this process (own data dir, own
//! inference API port, own MQTT session over mutual TLS, from the bundle enrollment wrote),
//! drives every agent with a small application load of held-out digits, and then plays the
//! scenario an operator would:
//!
//! 1. `digits-mlp` v1 is signed, pushed and rolled out to every device;
//! 2. v2 is rolled out in stages (20 % → 60 % → 100 %), each gated on the devices' own
//!    behaviour: installs, errors, p95 latency against v1 on the same devices, drift;
//! 3. v3, a deliberately bad model (much slower, skewed predictions), is rolled out: its canary
//!    fails the gates and the fleet goes back to v2 on its own.
//!
//! Every engine decision is printed as it is made (from the audit log), and a table per device
//! ends it. With `--once` it exits, 0 only when every step behaved as described; otherwise it
//! keeps the server, the agents and the load running until Ctrl-C.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fleet_protocol::drift::DriftWindow;
use serde_json::{json, Value};

use crate::auth::{self, Role};
use crate::client::ApiClient;
use crate::config::ServerConfig;
use crate::fleet::Fleet;
use crate::rollout::{Phase, RolloutRequest};
use crate::rollout_runner::{drift_score, Actor};
use crate::server;
use crate::{keyfile, profile, release};

/// What `fleet-server demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How many local agents (devices).
    pub agents: usize,
    /// Exit after the summary (status 0 only if every step behaved).
    pub once: bool,
    /// Where everything goes (a fresh directory; default: one under the system's temp dir).
    pub dir: Option<PathBuf>,
    /// The REST API's address (falls back to any free port when it is taken).
    pub api_listen: SocketAddr,
    /// The repository's `models/` directory.
    pub models: PathBuf,
    /// Each stage's soak, seconds.
    pub soak_secs: u64,
    /// The stages of v2's rollout, as percentages of the devices (the last one 100). v3's
    /// rollout has two: the first of these, then 100.
    pub stages: Vec<f64>,
    /// The application load on each device, requests per second (16 rows each).
    pub requests_per_second: u32,
}

impl DemoOptions {
    /// The defaults of `fleet-server demo`, for `agents` devices.
    pub fn new(agents: usize, models: PathBuf) -> Self {
        DemoOptions {
            agents,
            once: true,
            dir: None,
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8480)),
            models,
            soak_secs: 6,
            stages: vec![20.0, 60.0, 100.0],
            requests_per_second: 40,
        }
    }
}

/// What the demo saw, for the binary's exit status and for tests.
#[derive(Debug)]
pub struct DemoReport {
    /// Every check, with whether it held.
    pub checks: Vec<(String, bool)>,
    /// The rollouts in the order they were made: v1, v2, v3 (fewer when a step failed early).
    pub rollouts: Vec<String>,
    /// The whole audit log, oldest first.
    pub audit: Vec<crate::store::AuditEntry>,
    /// The version each device serves at the end (None: nothing active).
    pub versions: BTreeMap<String, Option<String>>,
}

impl DemoReport {
    /// Whether every step behaved as expected.
    pub fn ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|(_, ok)| *ok)
    }
}

/// Sites the demo devices are spread over (a label the rollouts spread stages across).
const SITES: [&str; 5] = ["berlin", "paris", "oslo", "rome", "lisbon"];
const MODEL: &str = "digits-mlp";

/// The demo's latency gate: a stage fails when the new version's p95 is more than this many
/// times the previous version's on the same devices. On a loaded 2-core machine the good v2
/// measured 1.0 to 2.83 times v1 (one canary in CI at 2.83 failed a gate of 2.5), and the bad
/// v3 4.76 to 8.0 times v2; the gate sits between the two. (The latency histogram's buckets
/// are quarter octaves, so the ratios come in steps of 2^(1/4).)
pub const MAX_P95_RATIO: f64 = 3.5;

/// A step's outcome, for the final verdict.
struct Checks(Vec<(String, bool)>);

impl Checks {
    fn record(&mut self, what: impl Into<String>, ok: bool) {
        let what = what.into();
        println!("   {} {what}", if ok { "✔" } else { "✘" });
        self.0.push((what, ok));
    }
}

/// Prints the engine's decisions (the audit log) as they are made.
struct AuditTail {
    after_id: i64,
    started: Instant,
}

impl AuditTail {
    async fn print_new(&mut self, fleet: &Fleet) {
        let Ok(entries) = fleet.store.audit(None, self.after_id, 1000).await else {
            return;
        };
        for e in entries {
            self.after_id = e.id;
            if e.actor != "engine" && !e.action.starts_with("rollout_") {
                continue;
            }
            println!(
                "   [{:>5.1}s] {} {:<19} {}",
                self.started.elapsed().as_secs_f64(),
                e.rollout.as_deref().unwrap_or("-"),
                e.action,
                e.message
            );
        }
    }
}

/// A fleet on this machine: the server with its defaults, N enrolled devices each with a
/// real in-process `edge-agent`, an application load on every one, and digits-mlp v1, v2
/// and v3 signed and pushed. The demo plays its scenario on it; tests (the browser test of the
/// console) use it as a live fleet.
pub struct LocalFleet {
    pub server: server::RunningServer,
    pub fleet: Arc<Fleet>,
    /// `http://host:port` of the REST API (and the console).
    pub api: String,
    /// An admin token.
    pub token: String,
    pub dir: PathBuf,
    /// Every agent connected within 30 s.
    pub online: bool,
    /// Rows the agents answered.
    pub served: Arc<AtomicU64>,
    /// Device id and inference API port, per device.
    pub devices: Vec<(String, u16)>,
    stop_agents: tokio::sync::watch::Sender<bool>,
    agents: Vec<tokio::task::JoinHandle<()>>,
    stop_load: Arc<AtomicBool>,
    load: Vec<std::thread::JoinHandle<()>>,
}

impl LocalFleet {
    /// Builds the fleet, printing each step (times from `started`).
    pub async fn start(options: &DemoOptions, started: Instant) -> Result<LocalFleet> {
        let stages = &options.stages;
        if options.agents == 0 {
            bail!("the demo needs at least one agent");
        }
        if stages.is_empty()
            || stages.last() != Some(&100.0)
            || stages.iter().any(|p| !(*p > 0.0 && *p <= 100.0))
            || stages.windows(2).any(|w| w[0] >= w[1])
        {
            bail!(
                "--stages must be increasing percentages in (0, 100], ending with 100 (got {stages:?})"
            );
        }
        if options.requests_per_second == 0 {
            bail!("--rate must be at least 1 request per second");
        }
        let dir = match &options.dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!("driftgate-demo-{}", std::process::id())),
        };
        if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
            bail!(
                "{} is not empty; give --dir a new or empty directory",
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let models = &options.models;
        let holdout = models.join("data/digits/holdout.X.npy");
        if !holdout.exists() {
            bail!(
                "{} is missing: run the demo from the repository (or pass --models DIR)",
                holdout.display()
            );
        }

        step(
            &started,
            "signing digits-mlp v1, v2 and v3 (the bad one) with a new release key, each with its drift profile",
        );
        keyfile::generate(&dir.join("keys"), "release").context("generating the release key")?;
        let release_key = keyfile::read_signing_key(&dir.join("keys/release.pem"))?;
        let mut signed = Vec::new();
        for version in ["v1", "v2", "v3"] {
            let model = dir.join(format!("{MODEL}-{version}.onnx"));
            std::fs::copy(models.join(format!("{MODEL}/{version}.onnx")), &model)
                .with_context(|| format!("copying {MODEL} {version}"))?;
            let profile = models.join(format!("{MODEL}/{version}.profile.json"));
            let envelope = release::sign_model(
                &release::SignRequest {
                    model: model.clone(),
                    name: MODEL.parse()?,
                    version: version.parse()?,
                    release: None,
                    self_test: Some(models.join(format!("{MODEL}/{version}.selftest.json"))),
                    profile: Some(profile.clone()),
                    min_agent_version: None,
                    created_at_ms: crate::store::now_ms(),
                },
                &release_key,
            )
            .with_context(|| format!("signing {MODEL} {version}"))?
            .envelope;
            let manifest = release::default_manifest_path(&model);
            release::write_envelope(&manifest, &envelope, true)?;
            println!("   signed {MODEL}@{version} → {}", manifest.display());
            signed.push((version, model, manifest, profile));
        }

        step(
            &started,
            "starting the fleet server: embedded MQTT broker (mTLS), SQLite, REST API",
        );
        let mut config = ServerConfig {
            data_dir: dir.join("server"),
            ..Default::default()
        };
        config.api.listen = if std::net::TcpListener::bind(options.api_listen).is_ok() {
            options.api_listen
        } else {
            println!("   {} is taken; using a free port", options.api_listen);
            SocketAddr::from(([127, 0, 0, 1], 0))
        };
        config.broker.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.trust.release_keys = vec![dir.join("keys/release.pub")];
        // A quick engine for a short demo: the default looks once a second.
        config.rollouts.tick_ms = 250;
        let server = server::start(config).await?;
        let fleet = server.fleet.clone();
        let api = format!("http://{}", server.api_addr);
        let token = auth::create_token(&fleet.store, Role::Admin, "demo")
            .await?
            .token;
        println!("   REST API {api}/api/v1 (OpenAPI at {api}/api/v1/openapi.json)");
        println!("   admin token: {token}");

        step(
            &started,
            &format!(
                "enrolling {} devices and starting an edge agent for each",
                options.agents
            ),
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut agents = Vec::new();
        let mut ports = Vec::new();
        for i in 0..options.agents {
            let id = format!("dev-{:02}", i + 1);
            let site = SITES[i % SITES.len()];
            let port = free_port()?;
            let labels = BTreeMap::from([
                ("site".to_string(), site.to_string()),
                ("hw".to_string(), "demo".to_string()),
            ]);
            let bundle = fleet
                .enroll(&id, labels, Some(format!("127.0.0.1:{port}")))
                .await?;
            let agent_dir = dir.join("agents").join(&id);
            bundle
                .write_to(&agent_dir)
                .with_context(|| format!("writing {id}'s bundle"))?;
            // Telemetry every second, so that each stage's gates have figures within seconds.
            let toml = agent_dir.join("agent.toml");
            let mut text = std::fs::read_to_string(&toml)?;
            text.push_str("\n[telemetry]\ninterval_secs = 1\n");
            std::fs::write(&toml, text)?;
            let agent_config = edge_agent::config::AgentConfig::load(&toml)
                .with_context(|| format!("{}", toml.display()))?;
            let mut stop = stop_rx.clone();
            let name = id.clone();
            agents.push(tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = edge_agent::daemon::run_until(agent_config, stopped).await {
                    eprintln!("agent {name} stopped: {e:#}");
                }
            }));
            println!(
                "   {id} (site={site}): bundle in {}, inference API on 127.0.0.1:{port}",
                agent_dir.display()
            );
            ports.push((id, port));
        }
        let online = wait_until(Duration::from_secs(30), || async {
            let devices = fleet.store.devices().await.ok()?;
            let n = devices
                .iter()
                .filter(|d| d.presence.as_deref() == Some("online"))
                .count();
            (n == options.agents).then_some(())
        })
        .await;

        step(
            &started,
            "an application load on every device: held-out digits in small batches",
        );
        let rows = Arc::new(holdout_rows(&holdout)?);
        let load_stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let mut load = Vec::new();
        for (i, (_, port)) in ports.iter().enumerate() {
            let (rows, stop, served, port) =
                (rows.clone(), load_stop.clone(), served.clone(), *port);
            let rate = options.requests_per_second;
            load.push(std::thread::spawn(move || {
                app_load(port, &rows, i, rate, &stop, &served)
            }));
        }
        println!(
            "   {} rows of 64 pixels, {BATCH} rows per request, {} requests/s per device",
            rows.len(),
            options.requests_per_second
        );

        step(
            &started,
            "pushing v1, v2 and v3 to the registry (manifests verified against the release key)",
        );
        for (version, model, manifest, profile) in &signed {
            let client = ApiClient::new(&api, Some(token.clone()));
            let (model, manifest, profile) = (model.clone(), manifest.clone(), profile.clone());
            let response = tokio::task::spawn_blocking(move || {
                client.push_model(&manifest, &model, Some(&profile), &mut |_, _| {})
            })
            .await??;
            println!(
                "   {MODEL}@{version}: release {}, {} bytes",
                response["model"]["release"], response["model"]["size"]
            );
        }
        Ok(LocalFleet {
            server,
            fleet,
            api,
            token,
            dir,
            online: online.is_some(),
            served,
            devices: ports,
            stop_agents: stop_tx,
            agents,
            stop_load: load_stop,
            load,
        })
    }

    /// Stops the load, the agents and the server.
    pub async fn stop(self) {
        self.stop_load.store(true, Ordering::Relaxed);
        let _ = self.stop_agents.send(true);
        for agent in self.agents {
            let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
        }
        for l in self.load {
            let _ = tokio::task::spawn_blocking(move || l.join()).await;
        }
        self.server.shutdown().await;
    }
}

/// Runs the demo; the report says whether every step behaved as expected.
pub async fn run(options: DemoOptions) -> Result<DemoReport> {
    let started = Instant::now();
    let local = LocalFleet::start(&options, started).await?;
    let mut checks = Checks(Vec::new());
    checks.record(
        format!("all {} agents connected over mutual TLS", options.agents),
        local.online,
    );
    let (fleet, api, token, dir) = (
        local.fleet.clone(),
        local.api.clone(),
        local.token.clone(),
        local.dir.clone(),
    );
    let stages = &options.stages;
    let mut tail = AuditTail {
        after_id: 0,
        started,
    };
    let soak = options.soak_secs;
    let gates = json!({
        "min_install_success_pct": 100.0,
        "max_error_rate_pct": 1.0,
        "max_p95_ratio": MAX_P95_RATIO,
        "max_drift_score": 2.0,
        "min_devices_reporting": options.agents,
    });

    step(&started, "rollout 1: v1 to every device (one stage)");
    let r1 = rollout(
        &fleet,
        json!({"model": MODEL, "version": "v1", "stages": [{"size": {"percent": 100.0}, "soak_secs": soak}],
               "gates": gates, "install_timeout_secs": 60}),
    )
    .await?;
    let phase = follow(&fleet, &r1, &mut tail, Duration::from_secs(60)).await;
    checks.record(
        format!("{r1} completed: v1 on every device"),
        phase == Some(Phase::Completed),
    );

    let stage_list = |percents: &[f64]| -> Vec<Value> {
        percents
            .iter()
            .map(|p| json!({"size": {"percent": p}, "soak_secs": soak}))
            .collect()
    };
    let shown: Vec<String> = stages.iter().map(|p| format!("{p} %")).collect();
    step(
        &started,
        &format!(
            "rollout 2: v2 in stages {}, spread across sites, gated on the devices' behaviour",
            shown.join(" → ")
        ),
    );
    let r2 = rollout(
        &fleet,
        json!({"model": MODEL, "version": "v2", "spread_label": "site",
               "stages": stage_list(stages),
               "gates": gates, "install_timeout_secs": 60}),
    )
    .await?;
    let phase = follow(&fleet, &r2, &mut tail, Duration::from_secs(90)).await;
    checks.record(
        format!("{r2} completed: v2 on every device, stage by stage"),
        phase == Some(Phase::Completed),
    );

    step(
        &started,
        "rollout 3: v3 (bad on purpose: ~128× the work per row, skewed predictions)",
    );
    let r3 = rollout(
        &fleet,
        json!({"model": MODEL, "version": "v3", "spread_label": "site",
               "stages": stage_list(&[stages[0], 100.0]),
               "gates": gates, "on_failure": "rollback", "install_timeout_secs": 60}),
    )
    .await?;
    let phase = follow(&fleet, &r3, &mut tail, Duration::from_secs(60)).await;
    let failed_gate = fleet
        .store
        .audit(Some(&r3), 0, 1000)
        .await?
        .iter()
        .any(|e| e.action == "gates_failed");
    checks.record(
        format!("{r3}: the canary failed its gates and the fleet rolled back on its own"),
        phase == Some(Phase::RolledBack) && failed_gate,
    );
    let back = wait_until(Duration::from_secs(30), || async {
        let devices = fleet.store.devices().await.ok()?;
        devices
            .iter()
            .all(|d| active_version(d).as_deref() == Some("v2"))
            .then_some(())
    })
    .await;
    tail.print_new(&fleet).await;
    checks.record("every device serves v2 again", back.is_some());

    // A few more seconds of load, so the table shows v2's figures after the rollback too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    step(&started, "summary");
    let summary = summary(&fleet).await?;
    println!("{summary}");
    println!(
        "   {} rows inferred by the agents during the demo; audit log: GET {api}/api/v1/audit",
        local.served.load(Ordering::Relaxed)
    );
    let report = DemoReport {
        checks: checks.0,
        rollouts: vec![r1, r2, r3],
        audit: fleet.store.audit(None, 0, i64::MAX).await?,
        versions: fleet
            .store
            .devices()
            .await?
            .iter()
            .map(|d| (d.id.clone(), active_version(d)))
            .collect(),
    };
    let ok = report.ok();
    println!(
        "\n{} in {:.0} s",
        if ok {
            "every step behaved as expected"
        } else {
            "SOME STEPS DID NOT BEHAVE AS EXPECTED (see ✘ above)"
        },
        started.elapsed().as_secs_f64()
    );

    if !options.once {
        println!(
            "\nthe fleet keeps running: API {api} (token above), files in {}",
            dir.display()
        );
        println!("console: {api}/ (sign in with the admin token above)");
        println!("try: DRIFTGATE_SERVER={api} DRIFTGATE_TOKEN={token} fleetctl rollout list");
        println!("Ctrl-C stops everything");
        let _ = tokio::signal::ctrl_c().await;
    }
    local.stop().await;
    if options.once && options.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}

fn step(started: &Instant, what: &str) {
    println!("\n[{:>5.1}s] == {what}", started.elapsed().as_secs_f64());
}

async fn rollout(fleet: &Fleet, request: Value) -> Result<String> {
    let request: RolloutRequest = serde_json::from_value(request)?;
    let record = fleet
        .create_rollout(request, &Actor("demo (operator)".into()))
        .await?;
    Ok(record.id)
}

/// Prints the rollout's decisions until it finishes; returns its final phase (None: timed out).
async fn follow(fleet: &Fleet, id: &str, tail: &mut AuditTail, limit: Duration) -> Option<Phase> {
    let deadline = Instant::now() + limit;
    loop {
        tail.print_new(fleet).await;
        if let Ok(Some(r)) = fleet.store.rollout(id).await {
            if !r.phase.is_active() {
                tail.print_new(fleet).await;
                return Some(r.phase);
            }
        }
        if Instant::now() > deadline {
            println!("   {id} did not finish within {} s", limit.as_secs());
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_until<F, Fut, T>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn holdout_rows(path: &Path) -> Result<Vec<Vec<f64>>> {
    let m = profile::read_matrix(path)?;
    Ok(m.data.chunks(m.cols).map(<[f64]>::to_vec).collect())
}

/// Rows per request: the app batches its inputs, as a camera or sensor app would, so that each
/// request's time is mostly the model's own work.
const BATCH: usize = 16;

/// One device's application: a batch of held-out rows `rate` times a second, until told to
/// stop.
/// Refusals while no model is active (503) are expected at the start.
fn app_load(
    port: u16,
    rows: &[Vec<f64>],
    offset: usize,
    rate: u32,
    stop: &AtomicBool,
    served: &AtomicU64,
) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://127.0.0.1:{port}/v2/models/{MODEL}/infer");
    let cols = rows.first().map(Vec::len).unwrap_or(0);
    let mut i = offset * 37;
    while !stop.load(Ordering::Relaxed) {
        let mut data = Vec::with_capacity(BATCH * cols);
        for _ in 0..BATCH {
            data.extend_from_slice(&rows[i % rows.len()]);
            i += 1;
        }
        let body = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [BATCH, cols], "data": data}]});
        if let Ok(response) = agent.post(&url).send_json(&body) {
            if response.status() == 200 {
                served.fetch_add(BATCH as u64, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_secs(1) / rate);
    }
}

/// The version of the demo's model the device reports active.
fn active_version(d: &crate::store::DeviceRecord) -> Option<String> {
    crate::overview::active_version(d, MODEL)
}

/// Per device: the version it serves, and that version's inferences, p95 and drift score.
async fn summary(fleet: &Fleet) -> Result<String> {
    let mut out = String::new();
    out.push_str(&format!(
        "   {:<8} {:<7} {:<8} {:>11} {:>9} {:>11}\n",
        "DEVICE", "SITE", "VERSION", "INFERENCES", "P95 µs", "DRIFT SCORE"
    ));
    for d in fleet.store.devices().await? {
        let version = active_version(&d);
        let (mut inferences, mut p95, mut drift) =
            ("-".to_string(), "-".to_string(), "-".to_string());
        if let Some(v) = &version {
            if let Some(record) = fleet.store.model(MODEL, v).await? {
                if let Some(t) = fleet
                    .store
                    .telemetry_totals(MODEL, record.release)
                    .await?
                    .into_iter()
                    .find(|t| t.device == d.id)
                {
                    inferences = t.inferences.to_string();
                    p95 = t
                        .latency
                        .quantile_us(0.95)
                        .map(|p| format!("{p:.0}"))
                        .unwrap_or_else(|| "-".into());
                }
                let window: Option<DriftWindow> = fleet
                    .store
                    .drift(MODEL, record.release)
                    .await?
                    .into_iter()
                    .filter(|m| m.device == d.id)
                    .min_by_key(|m| m.window_len)
                    .map(|m| m.merged);
                if let (Some(w), Some(profile)) = (window, fleet.profile_of(&record).await) {
                    if let Some(score) = drift_score(&profile, w) {
                        drift = format!("{score:.2}");
                    }
                }
            }
        }
        out.push_str(&format!(
            "   {:<8} {:<7} {:<8} {:>11} {:>9} {:>11}\n",
            d.id,
            d.labels.get("site").map(String::as_str).unwrap_or("-"),
            version.as_deref().unwrap_or("-"),
            inferences,
            p95,
            drift
        ));
    }
    Ok(out)
}
