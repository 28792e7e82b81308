//! The daemon: wires the pipeline together and runs it until SIGTERM or Ctrl-C.
//!
//! ```text
//!  broker ──link──► directive controller ──► store (disk) ──► model table ◄── serve (HTTP API)
//!           ▲  │            │                                      │
//!           │  └─ chunks ──► fetch                                 └──► metrics ──► /metrics
//!           └──────── state, status, chunk requests ◄──────────────┘
//! ```
//! At start, before connecting, every model's active version is re-verified (signature,
//! digest, self-test); a broken one falls back to the last good one, so the API serves from
//! the first second even with no broker in sight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use fleet_protocol::keys::verifying_key_from_pem;
use fleet_protocol::state::{Presence, Status};
use fleet_protocol::{encode, KeyRing, TopicKind, V1};

use crate::check::ModelCheck;
use crate::config::AgentConfig;
use crate::directive::{check_model, model_ref, AcceptedDirective, CheckedModel, Controller};
use crate::disk::DiskWatch;
use crate::drift::DriftReporter;
use crate::health::HealthProbe;
use crate::link::{self, AGENT_VERSION};
use crate::metrics::Metrics;
use crate::outbox::{self, Outbox, OutboxLimits};
use crate::sampler::Sampler;
use crate::serve::{self, ModelTable, ServeConfig, ServeState};
use crate::store::ModelStore;
use crate::systemd::{self, Notifier};
use crate::telemetry::TelemetryRecorder;
use crate::uplink::{self, UplinkConfig, UplinkStats};

/// Reads a list of public key files into a key ring.
pub fn read_key_ring(paths: &[std::path::PathBuf], what: &str) -> Result<KeyRing> {
    let mut ring = KeyRing::new();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{what} key {}", path.display()))?;
        let key = verifying_key_from_pem(&text)
            .with_context(|| format!("{what} key {}", path.display()))?;
        let id = ring.insert(key);
        tracing::info!(%id, path = %path.display(), "trusting {what} key");
    }
    Ok(ring)
}

/// Runs the agent until SIGTERM or Ctrl-C, telling systemd how it goes when started by a
/// `Type=notify` unit (readiness, status, watchdog keep-alives).
pub async fn run(config: AgentConfig) -> Result<()> {
    let model_check = if config.check.isolate {
        ModelCheck::with_this_binary()
    } else {
        ModelCheck::InProcess
    };
    run_pipeline(
        config,
        shutdown_signal(),
        Notifier::from_env().map(Arc::new),
        model_check,
    )
    .await
}

/// Runs the agent until `stop` completes. Several agents can run in one process this way
/// (each with its own data dir, API port and MQTT session), as `fleet-server demo` does; none
/// of them speaks for the process to systemd.
pub async fn run_until(
    config: AgentConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    // Another program's process: it has no `check-model` subcommand to run.
    run_pipeline(config, stop, None, ModelCheck::InProcess).await
}

/// How long a restarted agent waits for its API address to come free.
const API_ADDRESS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds the inference API, waiting a little while the address is in use. Right after a
/// crash the previous run's listening socket can outlive it for a moment: a child it was
/// starting holds a copy of every descriptor until its `exec` closes them. A supervisor
/// restarting the agent at once would otherwise see it fail for nothing.
async fn bind_api(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let started = std::time::Instant::now();
    loop {
        match tokio::net::TcpListener::bind(address).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed() < API_ADDRESS_WAIT =>
            {
                tracing::warn!(%address, "the API address is in use; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            result => return result,
        }
    }
}

async fn run_pipeline(
    config: AgentConfig,
    stop: impl std::future::Future<Output = ()>,
    service_manager: Option<Arc<Notifier>>,
    model_check: ModelCheck,
) -> Result<()> {
    let config = Arc::new(config);
    link::install_crypto_provider();
    let fleet_keys = read_key_ring(&config.trust.fleet_keys, "fleet")?;
    let release_keys = read_key_ring(&config.trust.release_keys, "release")?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("data_dir {}", config.data_dir.display()))?;
    let accepted = AcceptedDirective::load(&config.data_dir).map_err(anyhow::Error::msg)?;
    let store = Arc::new(
        ModelStore::open(&config.data_dir, config.store.keep_versions)
            .with_context(|| format!("model store in {}", config.data_dir.display()))?,
    );

    // Recover: keep the plans that passed, so each model is loaded once.
    let table = Arc::new(ModelTable::new());
    let plans: Mutex<HashMap<(String, String), CheckedModel>> = Mutex::new(HashMap::new());
    let recoveries = store.recover(&release_keys, |stored| {
        let plan = check_model(stored)?;
        plans.lock().expect("not poisoned").insert(
            (
                stored.manifest.name.to_string(),
                stored.manifest.version.to_string(),
            ),
            plan,
        );
        Ok(())
    });
    for recovery in &recoveries {
        tracing::info!(?recovery, "model store checked");
    }
    let mut plans = plans.into_inner().expect("not poisoned");
    let mut serving = Vec::new();
    for name in store.models().context("listing stored models")? {
        let Some(pointer) = store.pointer(&name).context("reading the active pointer")? else {
            continue;
        };
        let stored = store.load(&name, &pointer.active, &release_keys)?;
        let key = (name.to_string(), pointer.active.to_string());
        let checked = match plans.remove(&key) {
            Some(checked) => checked,
            None => check_model(&stored).map_err(anyhow::Error::msg)?,
        };
        tracing::info!(model = %name, version = %pointer.active, drift = checked.drift.is_some(), "serving");
        serving.push((name.clone(), model_ref(&stored.manifest)));
        table.set(Arc::new(checked.into_serving(&stored.manifest)));
    }

    let metrics = Arc::new(Metrics::new());
    // The outbox: what the agent learns waits on disk until the server has it.
    let outbox_path = config.data_dir.join("outbox.db");
    let outbox_limits = OutboxLimits {
        quota_bytes: config.outbox.quota_bytes,
    };
    // The data disk: a full one stops writes, not serving; the state says so.
    let disk = Arc::new(DiskWatch::new(&config.data_dir));
    disk.check();
    let disk_task = tokio::spawn(disk.clone().run(crate::disk::CHECK_PERIOD));
    let (outbox, outbox_thread) = match Outbox::open(&outbox_path, outbox_limits) {
        Ok(outbox) => outbox::spawn(outbox.with_disk_watch(disk.clone())),
        // Started on a full disk: serve now, open the outbox once there is room.
        Err(e) if e.is_disk_full() => {
            tracing::warn!(error = %e, "the outbox cannot be opened on the full disk; serving without it until there is room");
            disk.write_failed("outbox", &e);
            outbox::spawn_when_open(outbox_path.clone(), outbox_limits, disk.clone())
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("outbox {}", outbox_path.display())))
        }
    };
    let sampler = Arc::new(Sampler::new(
        config.sampler.clone(),
        outbox.clone(),
        metrics.clone(),
    ));
    let listener = bind_api(config.api.listen)
        .await
        .with_context(|| format!("api.listen {}", config.api.listen))?;
    tracing::info!(address = %listener.local_addr()?, "inference API listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serve_state = ServeState::new(
        table.clone(),
        metrics.clone(),
        &ServeConfig {
            max_concurrent_inferences: config.api.max_concurrent_inferences,
            max_body_bytes: config.api.max_body_bytes,
        },
    )
    .with_observer(sampler.clone())
    .with_observer(Arc::new(DriftReporter::new(outbox.clone())));
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(serve::serve(listener, serve_state, async move {
        let _ = api_stop.wait_for(|stop| *stop).await;
    }));

    let (handle, inbound, driver) = link::start(&config)?;
    metrics.attach_link(handle.stats.clone());
    tokio::spawn(driver);

    // The uplink: what the agent learns waits in the outbox until the server has it.
    let uplink_stats = Arc::new(UplinkStats::default());
    metrics.attach_uplink(uplink_stats.clone());
    let uplink = tokio::spawn(uplink::run(
        outbox.clone(),
        handle.clone(),
        inbound.ack.clone(),
        inbound.connected.clone(),
        UplinkConfig {
            batch_items: config.outbox.batch_items,
            batch_bytes: config.outbox.batch_bytes,
            in_flight: config.outbox.in_flight,
            ack_timeout: std::time::Duration::from_millis(config.outbox.ack_timeout_ms),
            ..UplinkConfig::default()
        },
        uplink_stats,
    ));
    let (telemetry_stop, telemetry_stopped) = tokio::sync::watch::channel(false);
    let telemetry = tokio::spawn(
        TelemetryRecorder::new(metrics.clone(), table.clone(), outbox.clone())
            .with_health(HealthProbe::new(&config.data_dir), handle.stats.clone())
            .with_sampler(sampler)
            .with_disk_watch(disk.clone())
            .run(
                std::time::Duration::from_secs(config.telemetry.interval_secs),
                telemetry_stopped,
            ),
    );
    tracing::info!(broker = %config.broker_address(), device = %config.device_id, "connecting");
    // Ready as soon as the API serves what the store recovered: a device without a broker in
    // sight is still a working device.
    let systemd_task = service_manager.clone().map(|notifier| {
        tokio::spawn(systemd::run(
            notifier,
            systemd::watchdog_period_from_env(),
            table.clone(),
            inbound.connected.clone(),
        ))
    });
    let controller = Controller::new(
        config.clone(),
        fleet_keys,
        release_keys,
        store,
        table,
        metrics,
        handle.clone(),
        accepted,
        serving,
    )
    .with_outbox(outbox.clone())
    .with_model_check(model_check)
    .with_disk_watch(disk);
    let controller = tokio::spawn(controller.run(inbound));

    stop.await;
    tracing::info!("stopping");
    if let Some(notifier) = &service_manager {
        systemd::stopping(notifier);
    }
    // A clean disconnect suppresses the last will, so say offline ourselves.
    let offline = encode(&Status {
        v: V1,
        state: Presence::Offline,
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        agent_version: AGENT_VERSION.to_string(),
    });
    let _ = handle.publish(TopicKind::Status, offline).await;
    // The API finishes the requests in flight; then the last interval's telemetry goes into
    // the outbox (it is sent at the next start).
    let _ = stop_tx.send(true);
    let _ = api.await;
    let _ = telemetry_stop.send(true);
    let _ = telemetry.await;
    handle.disconnect().await;
    controller.abort();
    uplink.abort();
    disk_task.abort();
    let _ = controller.await;
    let _ = uplink.await;
    if let Some(task) = systemd_task {
        task.abort();
    }
    // Every handle is gone: the outbox thread commits what is queued and ends.
    drop(outbox);
    let _ = tokio::task::spawn_blocking(move || outbox_thread.join()).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
