//! Simulated devices, for `fleet-sim` and the benchmarks: thousands of light agents in one
//! process that speak the real wire protocol. Each is a real MQTT session over mutual TLS
//! with its enrolled certificate, and does what an agent's control path does: it subscribes
//! to its `directive` and `ack` topics, announces itself online (retained, with an offline
//! last will), verifies every directive as the agent does (fleet key, device, sequence,
//! expiry; each manifest against the release key; the release order), reports the version
//! active in its retained `state`, and uploads telemetry in batches on `up`, resending until
//! the server acks. It downloads, checks and loads no artifact: what it loads is the
//! control plane. A subset may run real inference with tract ([`SimInference`]): their
//! telemetry then carries measured latencies and counts instead of fixed figures.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::histogram::LatencyHistogram;
use fleet_protocol::keys::verifying_key_from_pem;
use fleet_protocol::outbox::{Ack, Batch, Item, ItemBody, Telemetry};
use fleet_protocol::state::{InstallPhase, ModelState, Presence, State, Status};
use fleet_protocol::{
    check_release_order, decode, encode, verify_directive, verify_manifest, DeviceId, Envelope,
    KeyRing, Manifest, TopicKind, Topics, TrustError, V1,
};
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::fleet::Bundle;
use crate::store::now_ms;

/// Why a simulated device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("the bundle of {device} has no {file}")]
    MissingFile { device: String, file: String },
    #[error("{0}")]
    Invalid(String),
}

/// What a device trusts, read from its enrollment bundle (every bundle of a fleet names the
/// same keys, so the devices share one copy).
pub struct Trust {
    fleet: KeyRing,
    release: KeyRing,
}

fn bundle_file<'a>(bundle: &'a Bundle, name: &str) -> Result<&'a str, SimError> {
    bundle
        .files
        .iter()
        .find(|f| f.name == name)
        .map(|f| f.contents.as_str())
        .ok_or_else(|| SimError::MissingFile {
            device: bundle.device.clone(),
            file: name.to_string(),
        })
}

impl Trust {
    /// The fleet key and every release key the bundle names.
    pub fn of(bundle: &Bundle) -> Result<Trust, SimError> {
        let mut fleet = KeyRing::new();
        fleet.insert(
            verifying_key_from_pem(bundle_file(bundle, "fleet.pub")?)
                .map_err(|e| SimError::Invalid(format!("fleet.pub: {e}")))?,
        );
        let mut release = KeyRing::new();
        for file in bundle
            .files
            .iter()
            .filter(|f| f.name.starts_with("release-"))
        {
            release.insert(
                verifying_key_from_pem(&file.contents)
                    .map_err(|e| SimError::Invalid(format!("{}: {e}", file.name)))?,
            );
        }
        Ok(Trust { fleet, release })
    }
}

/// The MQTT options of a device's session, as the agent's link sets them: its certificate,
/// the broker's CA, a persistent session, the packet limit, and a retained offline will.
pub fn device_options(
    bundle: &Bundle,
    host: &str,
    port: u16,
    topics: &Topics,
) -> Result<MqttOptions, SimError> {
    // TLS needs a process-wide crypto provider; the agent's (ring).
    edge_agent::link::install_crypto_provider();
    let device = DeviceId::new(&bundle.device).map_err(|e| SimError::Invalid(e.to_string()))?;
    let mut options = MqttOptions::new(device.as_str(), host, port);
    let limit = fleet_protocol::limits::MAX_MQTT_PACKET_BYTES;
    options
        .set_keep_alive(Duration::from_secs(60))
        .set_clean_session(false)
        .set_max_packet_size(limit, limit)
        .set_last_will(LastWill::new(
            topics.topic(&device, TopicKind::Status),
            status(Presence::Offline),
            QoS::AtLeastOnce,
            true,
        ))
        .set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: bundle_file(bundle, "ca.pem")?.as_bytes().to_vec(),
            alpn: None,
            client_auth: Some((
                bundle_file(bundle, "device.pem")?.as_bytes().to_vec(),
                bundle_file(bundle, "device.key")?.as_bytes().to_vec(),
            )),
        }));
    Ok(options)
}

fn status(state: Presence) -> Vec<u8> {
    encode(&Status {
        v: V1,
        state,
        at_ms: now_ms(),
        agent_version: edge_agent::link::AGENT_VERSION.to_string(),
    })
}

/// Counters every simulated device adds to.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Devices whose first subscription was acknowledged.
    pub connected: AtomicU64,
    /// Directives verified and applied (a state report published for each).
    pub applied: AtomicU64,
    /// Directives refused: none should be.
    pub refused: AtomicU64,
    /// Connection errors (each followed by a reconnect).
    pub link_errors: AtomicU64,
    /// Telemetry batches published, resends included.
    pub batches_sent: AtomicU64,
    /// Items the server acknowledged.
    pub items_acked: AtomicU64,
    /// Whether the devices upload telemetry now (with `SimConfig::telemetry_every` set): a
    /// benchmark turns the load on and off.
    pub uplink_on: std::sync::atomic::AtomicBool,
}

/// How the simulated devices behave.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// A telemetry batch this often once a model is active; none: no uplink at all.
    pub telemetry_every: Option<Duration>,
    /// Items in each batch.
    pub items_per_batch: usize,
    /// A batch not acked this long is sent again, as the agent's uplink does.
    pub ack_timeout: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            telemetry_every: None,
            items_per_batch: 1,
            ack_timeout: Duration::from_secs(15),
        }
    }
}

/// Real inference for some simulated devices: a model loaded with the agent's runtime and a
/// self-test case, run `runs` times per telemetry interval (outputs checked against the case:
/// a mismatch counts as an error).
pub struct SimInference {
    plan: edge_agent::runtime::Plan,
    case: fleet_protocol::SelfTest,
    runs: u32,
}

impl SimInference {
    /// Loads `model` (ONNX) and `case` (a `*.selftest.json` as `fleetctl model sign` takes).
    pub fn load(
        model: &std::path::Path,
        case: &std::path::Path,
        runs: u32,
    ) -> Result<SimInference, SimError> {
        let failed = |what: &std::path::Path, e: &dyn std::fmt::Display| {
            SimError::Invalid(format!("{}: {e}", what.display()))
        };
        let onnx = std::fs::read(model).map_err(|e| failed(model, &e))?;
        let signature = edge_agent::runtime::inspect(&onnx).map_err(|e| failed(model, &e))?;
        let plan = edge_agent::runtime::Plan::load(&onnx, &signature.inputs)
            .map_err(|e| failed(model, &e))?;
        let text = std::fs::read(case).map_err(|e| failed(case, &e))?;
        let case: fleet_protocol::SelfTest =
            serde_json::from_slice(&text).map_err(|e| failed(case, &e))?;
        Ok(SimInference {
            plan,
            case,
            runs: runs.max(1),
        })
    }

    /// One interval's runs: (inferences, errors, latency).
    fn measure(&self) -> (u64, u64, LatencyHistogram) {
        let mut latency = LatencyHistogram::default();
        let mut errors = 0;
        for _ in 0..self.runs {
            let started = std::time::Instant::now();
            if self.plan.self_test(&self.case).is_err() {
                errors += 1;
            }
            latency.record_us(started.elapsed().as_secs_f64() * 1e6);
        }
        (u64::from(self.runs), errors, latency)
    }
}

/// One interval's figures for a telemetry item.
struct Figures {
    inferences: u64,
    errors: u64,
    latency: LatencyHistogram,
}

impl Figures {
    /// What a device without a model of its own reports: fixed, plausible figures.
    fn fixed() -> Figures {
        let mut latency = LatencyHistogram::default();
        for us in [180.0, 210.0, 240.0, 400.0] {
            latency.record_us(us);
        }
        Figures {
            inferences: 100,
            errors: 0,
            latency,
        }
    }
}

/// A batch sent and not yet acknowledged.
struct Pending {
    last_id: u64,
    items: u64,
    bytes: Vec<u8>,
    sent_at: Instant,
}

/// One simulated device: the control path of `edge_agent::directive` without the install,
/// and an uplink of telemetry.
pub struct SimDevice {
    device: DeviceId,
    topics: Topics,
    trust: Arc<Trust>,
    /// The last directive accepted.
    accepted_seq: Option<u64>,
    /// By model name.
    models: BTreeMap<String, ModelState>,
    /// Everything up to here is acknowledged by the server.
    acked: u64,
    pending: Option<Pending>,
    inference: Option<Arc<SimInference>>,
}

impl SimDevice {
    pub fn new(device: DeviceId, topics: Topics, trust: Arc<Trust>) -> SimDevice {
        SimDevice {
            device,
            topics,
            trust,
            accepted_seq: None,
            models: BTreeMap::new(),
            acked: 0,
            pending: None,
            inference: None,
        }
    }

    /// This device runs real inference each telemetry interval and reports what it measured.
    pub fn with_inference(mut self, inference: Arc<SimInference>) -> SimDevice {
        self.inference = Some(inference);
        self
    }

    fn state(&self) -> State {
        State {
            v: V1,
            device: self.device.clone(),
            agent_version: edge_agent::link::AGENT_VERSION.to_string(),
            at_ms: now_ms(),
            directive_seq: self.accepted_seq,
            models: self.models.values().cloned().collect(),
            refused: None,
            conditions: Vec::new(),
        }
    }

    /// Verifies a directive as the agent does and applies it at once: each model it names
    /// becomes active (the one before it kept as previous), models it no longer names are
    /// retired. `Ok(false)`: the retained directive already applied, delivered again after a
    /// reconnect. A directive is taken whole or not at all.
    pub fn apply(&mut self, payload: &[u8]) -> Result<bool, String> {
        let envelope: Envelope = decode(payload).map_err(|e| format!("undecodable: {e}"))?;
        let directive = match verify_directive(
            &envelope,
            &self.trust.fleet,
            &self.device,
            self.accepted_seq,
            now_ms(),
        ) {
            Ok(directive) => directive,
            Err(TrustError::ReplayedSequence { seq, .. }) if Some(seq) == self.accepted_seq => {
                return Ok(false)
            }
            Err(e) => return Err(format!("{}: {e}", e.label())),
        };
        let mut wanted: BTreeMap<String, Manifest> = BTreeMap::new();
        for model in &directive.models {
            let manifest = verify_manifest(&model.manifest, &self.trust.release)
                .map_err(|e| format!("{}: {e}", e.label()))?;
            let running = self
                .models
                .get(manifest.name.as_str())
                .and_then(|m| m.active.as_ref())
                .map(|a| a.release);
            check_release_order(&manifest, running, model.rollback)
                .map_err(|e| format!("{}: {e}", e.label()))?;
            wanted.insert(manifest.name.as_str().to_string(), manifest);
        }
        self.models.retain(|name, _| wanted.contains_key(name));
        for (name, manifest) in wanted {
            let target = edge_agent::directive::model_ref(&manifest);
            let state = self.models.entry(name).or_insert_with(|| ModelState {
                name: manifest.name.clone(),
                active: None,
                previous: None,
                target: None,
                installed: Vec::new(),
                phase: InstallPhase::Idle,
            });
            if state.active.as_ref() != Some(&target) {
                state.previous = state.active.replace(target.clone());
            }
            if !state.installed.contains(&target) {
                state.installed.push(target.clone());
            }
            state.target = Some(target);
            state.phase = InstallPhase::Active;
        }
        self.accepted_seq = Some(directive.seq);
        Ok(true)
    }

    /// The next telemetry batch: `items` intervals of the active models' figures, following
    /// the last acknowledged id. None while no model is active.
    fn next_batch(&self, items: usize, interval: Duration, figures: &Figures) -> Option<Pending> {
        let active: Vec<&ModelState> = self
            .models
            .values()
            .filter(|m| m.active.is_some())
            .collect();
        if active.is_empty() {
            return None;
        }
        let now = now_ms();
        let items: Vec<Item> = (0..items.max(1) as u64)
            .map(|n| {
                let model = active[n as usize % active.len()];
                let running = model.active.as_ref().expect("filtered on active");
                Item {
                    id: self.acked + 1 + n,
                    at_ms: now,
                    body: ItemBody::Telemetry(Telemetry {
                        model: model.name.clone(),
                        release: running.release,
                        version: running.version.clone(),
                        interval_ms: interval.as_millis() as u64,
                        inferences: figures.inferences,
                        errors: match figures.errors {
                            0 => BTreeMap::new(),
                            n => BTreeMap::from([("self_test".to_string(), n)]),
                        },
                        latency: figures.latency.clone(),
                    }),
                }
            })
            .collect();
        let last_id = items.last().map(|i| i.id)?;
        let count = items.len() as u64;
        let batch = Batch {
            v: V1,
            device: self.device.clone(),
            after: Some(self.acked),
            items,
        };
        Some(Pending {
            last_id,
            items: count,
            bytes: encode(&batch),
            sent_at: Instant::now(),
        })
    }

    /// Drives the session until the task is aborted. The connect `permit`, if any, is held
    /// until the first subscription is acknowledged, which bounds the TLS handshakes in
    /// flight.
    pub async fn run(
        mut self,
        client: AsyncClient,
        mut eventloop: EventLoop,
        permit: Option<OwnedSemaphorePermit>,
        stats: Arc<SimStats>,
        config: SimConfig,
    ) {
        let mut permit = permit;
        let topic = |kind| self.topics.topic(&self.device, kind);
        let (directive_topic, ack_topic) = (topic(TopicKind::Directive), topic(TopicKind::Ack));
        let (state_topic, status_topic, up_topic) = (
            topic(TopicKind::State),
            topic(TopicKind::Status),
            topic(TopicKind::Up),
        );
        // `try_` variants, as in the agent's link: the request queue is drained by this very
        // loop, so awaiting a full queue here would deadlock.
        let publish_state = |device: &SimDevice| {
            let _ = client.try_publish(
                &state_topic,
                QoS::AtLeastOnce,
                true,
                encode(&device.state()),
            );
        };
        let interval = config.telemetry_every.unwrap_or(Duration::from_secs(3600));
        // Devices spread their uploads over the interval instead of all at once.
        let offset = Duration::from_millis(fastrand::u64(0..=interval.as_millis() as u64));
        let mut telemetry = tokio::time::interval_at(Instant::now() + offset, interval);
        telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut online = false;
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = telemetry.tick(), if config.telemetry_every.is_some() && online => {
                    if !stats.uplink_on.load(Ordering::Relaxed) {
                        continue;
                    }
                    let resend = self
                        .pending
                        .as_ref()
                        .is_some_and(|p| p.sent_at.elapsed() >= config.ack_timeout);
                    if self.pending.is_none() {
                        let figures = match self.inference.clone() {
                            // Off the runtime's threads: a model run takes milliseconds.
                            Some(inference) => tokio::task::spawn_blocking(move || {
                                let (inferences, errors, latency) = inference.measure();
                                Figures { inferences, errors, latency }
                            })
                            .await
                            .unwrap_or_else(|_| Figures::fixed()),
                            None => Figures::fixed(),
                        };
                        self.pending = self.next_batch(config.items_per_batch, interval, &figures);
                    } else if !resend {
                        continue;
                    }
                    if let Some(pending) = self.pending.as_mut() {
                        pending.sent_at = Instant::now();
                        if client
                            .try_publish(&up_topic, QoS::AtLeastOnce, false, pending.bytes.clone())
                            .is_ok()
                        {
                            stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    continue;
                }
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // As the agent: subscribe on every ConnAck (a broker may have lost the
                    // session), announce presence, make sure the retained state is current.
                    let _ = client.try_subscribe(&directive_topic, QoS::AtLeastOnce);
                    let _ = client.try_subscribe(&ack_topic, QoS::AtLeastOnce);
                    let _ = client.try_publish(
                        &status_topic,
                        QoS::AtLeastOnce,
                        true,
                        status(Presence::Online),
                    );
                    publish_state(&self);
                    online = true;
                    // What was in flight may be lost with the connection: send it again.
                    if let Some(pending) = self.pending.as_mut() {
                        pending.sent_at = Instant::now();
                        let _ = client.try_publish(
                            &up_topic,
                            QoS::AtLeastOnce,
                            false,
                            pending.bytes.clone(),
                        );
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if permit.take().is_some() {
                        stats.connected.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == directive_topic => {
                    match self.apply(&p.payload) {
                        Ok(true) => {
                            publish_state(&self);
                            stats.applied.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(reason) => {
                            if stats.refused.fetch_add(1, Ordering::Relaxed) < 5 {
                                tracing::warn!(device = %self.device, reason, "directive refused");
                            }
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                    let Ok(ack) = decode::<Ack>(&p.payload) else {
                        continue;
                    };
                    if let Some(pending) = &self.pending {
                        if ack.up_to >= pending.last_id {
                            stats
                                .items_acked
                                .fetch_add(pending.items, Ordering::Relaxed);
                            self.acked = pending.last_id;
                            self.pending = None;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    online = false;
                    if stats.link_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        tracing::warn!(device = %self.device, error = %e, "connection error; reconnecting");
                    }
                    // The next poll reconnects; do not spin on a broker that refuses.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// A signed model version, ready to push.
pub struct SignedVersion {
    pub version: String,
    /// The artifact (a copy in the work dir).
    pub model: std::path::PathBuf,
    /// The signed manifest's envelope, encoded.
    pub manifest_bytes: Vec<u8>,
}

/// Signs the repository's `models/{name}` v1 … v`last` with a fresh release key written to
/// `dir/keys/release.{pem,pub}` (tract checks each self-test, as `fleetctl model sign` does).
/// v1 and v2 are the repository's models; later versions are v2's bytes under a new version
/// and release counter: simulated devices never load an artifact, so a version only needs to
/// be a distinct, validly signed release.
pub fn sign_versions(
    models_dir: &std::path::Path,
    name: &str,
    dir: &std::path::Path,
    last: usize,
) -> Result<Vec<SignedVersion>, SimError> {
    fn failed(what: impl std::fmt::Display, e: impl std::fmt::Display) -> SimError {
        SimError::Invalid(format!("{what}: {e}"))
    }
    let models = models_dir.join(name);
    crate::keyfile::generate(&dir.join("keys"), "release")
        .map_err(|e| failed("generating the release key", e))?;
    let key = crate::keyfile::read_signing_key(&dir.join("keys/release.pem"))
        .map_err(|e| failed("reading the release key", e))?;
    let mut out = Vec::new();
    for n in 1..=last.max(2) {
        let version = format!("v{n}");
        let source = if n == 1 { "v1" } else { "v2" };
        let model = dir.join(format!("{name}-{version}.onnx"));
        std::fs::copy(models.join(format!("{source}.onnx")), &model).map_err(|e| {
            failed(
                format!("copying {name} {source} from {}", models.display()),
                e,
            )
        })?;
        let request = crate::release::SignRequest {
            model: model.clone(),
            name: name.parse().map_err(|e| failed(name, e))?,
            version: version.parse().map_err(|e| failed(&version, e))?,
            release: None,
            self_test: Some(models.join(format!("{source}.selftest.json"))),
            profile: None,
            min_agent_version: None,
            created_at_ms: now_ms(),
        };
        let signed = crate::release::sign_model(&request, &key)
            .map_err(|e| failed(format!("signing {name}@{version}"), e))?;
        out.push(SignedVersion {
            version,
            model,
            manifest_bytes: encode(&signed.envelope),
        });
    }
    Ok(out)
}

/// Raises this process's soft limit of open files towards `needed`, up to the hard limit
/// (children started afterwards inherit it): every simulated device holds a socket, and
/// most shells start with 1,024. Returns the limit in force afterwards.
pub fn raise_fd_limit(needed: u64) -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur >= needed {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: needed.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct we pass; a soft limit up to the hard one needs no
    // privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(raised.rlim_cur)
}

/// Where and how [`start_devices`] connects its devices.
pub struct Launch<'a> {
    /// The broker as the devices dial it (its certificate names `localhost`).
    pub host: &'a str,
    pub port: u16,
    pub topics: Topics,
    pub config: SimConfig,
    /// TLS handshakes in flight at once.
    pub connect_concurrency: usize,
    /// Real inference for the first `n` devices.
    pub inference: Option<(Arc<SimInference>, usize)>,
}

/// Starts one simulated device per bundle on `runtime`, connecting at most
/// `connect_concurrency` at a time; they run until their tasks are aborted (or the runtime
/// stops) and count into `stats`.
pub fn start_devices(
    runtime: &tokio::runtime::Handle,
    bundles: &[Bundle],
    launch: Launch<'_>,
    stats: &Arc<SimStats>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, SimError> {
    let Some(first) = bundles.first() else {
        return Ok(Vec::new());
    };
    let trust = Arc::new(Trust::of(first)?);
    let gate = Arc::new(tokio::sync::Semaphore::new(
        launch.connect_concurrency.max(1),
    ));
    let mut tasks = Vec::with_capacity(bundles.len());
    for (i, bundle) in bundles.iter().enumerate() {
        let options = device_options(bundle, launch.host, launch.port, &launch.topics)?;
        let id = DeviceId::new(&bundle.device).map_err(|e| SimError::Invalid(e.to_string()))?;
        let mut device = SimDevice::new(id, launch.topics.clone(), trust.clone());
        if let Some((inference, _)) = launch.inference.as_ref().filter(|(_, n)| i < *n) {
            device = device.with_inference(inference.clone());
        }
        let (gate, stats, config) = (gate.clone(), stats.clone(), launch.config);
        tasks.push(runtime.spawn(async move {
            let Ok(permit) = gate.acquire_owned().await else {
                return;
            };
            let (client, eventloop) = AsyncClient::new(options, 16);
            device
                .run(client, eventloop, Some(permit), stats, config)
                .await;
        }));
    }
    Ok(tasks)
}
