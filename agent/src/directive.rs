//! Directives: verification, and the per-model install state machine.
//!
//! For each directive that arrives (the latest one wins; directives are declarative):
//! 1. verify it (fleet key, this device, sequence, validity window); a refusal is reported in
//!    the retained state with its reason and changes nothing else;
//! 2. persist its sequence *before* acting, so a replay after a restart is still refused;
//! 3. for every model it names: verify the manifest (release key), refuse a downgrade unless
//!    the directive is a signed rollback, then
//!    downloading → verifying → staging → self-test → active, or failed with a reason.
//!    The previous version keeps serving until the new one has passed its self-test;
//! 4. retire models the directive no longer names.
//!
//! The reported state is published (retained) at every transition. A newly active version is
//! on probation: if its error rate passes the threshold before probation ends, the agent goes
//! back to the previous version on its own and reports `rolled_back` with the figures.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_protocol::manifest::parse_semver;
use fleet_protocol::outbox::{Event, EventKind, ItemBody};
use fleet_protocol::state::{Condition, ModelRef, Refusal};
use fleet_protocol::trust::{check_release_order, verify_directive, verify_manifest};
use fleet_protocol::{
    decode, encode, BlobRef, Directive, Envelope, InstallPhase, KeyRing, Manifest, ModelName,
    ModelState, Sha256Digest, State, TopicKind, TrustError, DIRECTIVE_TYPE, V1,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::check::{self, CheckError, ModelCheck};
use crate::config::{AgentConfig, ProbationConfig};
use crate::disk::DiskWatch;
use crate::drift::DriftMonitor;
use crate::fetch;
use crate::fsutil::atomic_write;
use crate::link::{Delivery, Inbound, LinkHandle, AGENT_VERSION};
use crate::metrics::Metrics;
use crate::outbox::OutboxHandle;
use crate::runtime::Plan;
use crate::serve::{ModelTable, ServingModel};
use crate::store::{ModelStore, StoreError, StoredModel};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The last accepted directive, persisted in `{data_dir}/directive.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedDirective {
    pub seq: Option<u64>,
    /// Digest of the accepted envelope's payload: the same retained directive delivered again
    /// after a reconnect is recognised and ignored, not reported as a replay.
    pub payload_sha256: Option<Sha256Digest>,
    /// The accepted envelope itself, kept until the agent has acted on all of it: a directive
    /// interrupted by a crash or a power cut (mid-download, mid-activation) is taken up again
    /// at the next start, without waiting for the server to send anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<Envelope>,
    /// Whether every model the directive names reached its outcome (active or failed). A
    /// settled directive is not re-applied at start: a version the agent rolled back on its
    /// own stays rolled back until the server decides otherwise.
    #[serde(default = "settled_by_default")]
    pub settled: bool,
}

/// Records written before `settled` existed were written after acting.
fn settled_by_default() -> bool {
    true
}

impl AcceptedDirective {
    fn path(data_dir: &std::path::Path) -> PathBuf {
        data_dir.join("directive.json")
    }

    /// Reads the record; a missing file means no directive was ever accepted. A corrupt one is
    /// an error: starting from zero would reopen the door to replays.
    pub fn load(data_dir: &std::path::Path) -> Result<Self, String> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{}: {e}; refusing to forget the last accepted sequence",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    fn save(&self, data_dir: &std::path::Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).expect("plain data serialises");
        atomic_write(&Self::path(data_dir), &bytes)
    }
}

/// A stored version that passed its checks: the plan to serve, and the drift monitor built
/// from its reference profile when one ships.
pub struct CheckedModel {
    pub plan: Plan,
    pub drift: Option<DriftMonitor>,
}

impl CheckedModel {
    /// The version ready to serve.
    pub fn into_serving(self, manifest: &Manifest) -> ServingModel {
        ServingModel::new(
            manifest.name.clone(),
            manifest.version.clone(),
            manifest.release,
            self.plan,
        )
        .with_drift(self.drift)
    }
}

/// Loads a stored version, runs its self-test and builds its drift monitor: what "valid" means
/// at start and at install. A profile that does not fit the model fails the version, like a
/// failing self-test: it is signed, so it is a release mistake, not something to serve around.
pub fn check_model(stored: &StoredModel) -> Result<CheckedModel, String> {
    let plan = Plan::load(&stored.onnx, &stored.manifest.inputs).map_err(|e| e.to_string())?;
    plan.self_test(&stored.manifest.self_test)
        .map_err(|e| e.to_string())?;
    let drift = match &stored.profile {
        None => None,
        Some(bytes) => Some(
            DriftMonitor::from_manifest(&stored.manifest, bytes)
                .map_err(|e| format!("reference profile: {e}"))?,
        ),
    };
    Ok(CheckedModel { plan, drift })
}

/// A model the controller knows nothing about yet.
fn fresh_state(name: &ModelName) -> ModelState {
    ModelState {
        name: name.clone(),
        active: None,
        previous: None,
        target: None,
        installed: Vec::new(),
        phase: InstallPhase::Idle,
    }
}

pub fn model_ref(manifest: &Manifest) -> ModelRef {
    ModelRef {
        release: manifest.release,
        version: manifest.version.clone(),
        sha256: manifest.sha256,
    }
}

/// The directive controller: owns the reported state and drives installs.
pub struct Controller {
    config: Arc<AgentConfig>,
    fleet_keys: KeyRing,
    release_keys: KeyRing,
    store: Arc<ModelStore>,
    table: Arc<ModelTable>,
    metrics: Arc<Metrics>,
    link: LinkHandle,
    accepted: AcceptedDirective,
    models: BTreeMap<ModelName, ModelState>,
    refused: Option<Refusal>,
    probation: BTreeMap<ModelName, Probation>,
    /// Where events (accepted, refused, activated, failed, rolled back, retired) are recorded
    /// for the server, when the agent runs with an outbox.
    outbox: Option<OutboxHandle>,
    /// Set when an install stopped for a passing reason (the link): the directive stays
    /// unsettled and is taken up again.
    retry_wanted: bool,
    /// Where a new version first loads: in a child process under a memory limit, or here.
    model_check: ModelCheck,
    /// The data disk's condition, reported in the state; none when the agent runs without.
    disk: Option<Arc<DiskWatch>>,
    /// A verified directive that could not be persisted for want of space: acted upon once
    /// the disk has room (acting first would lose the replay protection across a restart).
    /// Not acknowledged to the broker until then, so a restart gets it delivered again.
    unpersisted: Option<Delivery>,
    /// Set by `accept` when persisting failed for want of space.
    persist_failed: bool,
}

/// How long an unsettled directive waits before it is taken up again when no reconnect
/// prompts it sooner.
const RETRY_UNSETTLED_AFTER: Duration = Duration::from_secs(30);

/// A version on probation: when it started and the counters at activation.
struct Probation {
    version: ModelRef,
    started: Instant,
    base_count: u64,
    base_errors: u64,
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<AgentConfig>,
        fleet_keys: KeyRing,
        release_keys: KeyRing,
        store: Arc<ModelStore>,
        table: Arc<ModelTable>,
        metrics: Arc<Metrics>,
        link: LinkHandle,
        accepted: AcceptedDirective,
        serving: Vec<(ModelName, ModelRef)>,
    ) -> Self {
        let mut models = BTreeMap::new();
        for (name, active) in serving {
            let mut state = fresh_state(&name);
            state.active = Some(active);
            models.insert(name, state);
        }
        Controller {
            config,
            fleet_keys,
            release_keys,
            store,
            table,
            metrics,
            link,
            accepted,
            models,
            refused: None,
            probation: BTreeMap::new(),
            retry_wanted: false,
            outbox: None,
            model_check: ModelCheck::InProcess,
            disk: None,
            unpersisted: None,
            persist_failed: false,
        }
    }

    /// Reports the data disk's condition, and takes up an install that failed for want of
    /// space as soon as the disk has room again.
    pub fn with_disk_watch(mut self, disk: Arc<DiskWatch>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Sends the open drift windows of a version that stopped serving: what it saw until the
    /// switch is judged on its own, not mixed into its successor's windows.
    fn close_drift_windows(&self, stopped: Option<Arc<ServingModel>>) {
        if let (Some(model), Some(outbox)) = (stopped, &self.outbox) {
            crate::drift::report_windows(outbox, model.drain_drift(now_ms(), true));
        }
    }

    /// Loads each new version first as `check` says (in process until this is called).
    pub fn with_model_check(mut self, check: ModelCheck) -> Self {
        self.model_check = check;
        self
    }

    /// Records events in `outbox` from now on.
    pub fn with_outbox(mut self, outbox: OutboxHandle) -> Self {
        self.outbox = Some(outbox);
        self
    }

    fn record_event(
        &self,
        event: EventKind,
        model: Option<&ModelName>,
        release: Option<u64>,
        detail: String,
    ) {
        if let Some(outbox) = &self.outbox {
            let body = ItemBody::Event(Event {
                model: model.cloned(),
                release,
                event,
                detail,
            });
            if !outbox.push(now_ms(), &body) {
                tracing::warn!(?event, "the outbox is full; an event was not recorded");
            }
        }
    }

    /// Runs until the link closes: handles directives as they arrive and watches probation.
    pub async fn run(mut self, mut inbound: Inbound) {
        self.publish_state().await;
        self.resume_unsettled(&mut inbound.chunks).await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_attempt = Instant::now();
        // Without a watch, a channel that never changes.
        let (_no_disk_watch, no_disk_changes) = tokio::sync::watch::channel(None);
        let mut disk = self
            .disk
            .as_ref()
            .map_or(no_disk_changes, |disk| disk.subscribe());
        loop {
            tokio::select! {
                changed = inbound.directive.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let delivery = inbound.directive.borrow_and_update().clone();
                    if let Some(delivery) = delivery {
                        self.take_delivery(delivery, &mut inbound.chunks).await;
                    }
                }
                changed = inbound.connected.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // A fresh session: make sure the retained state is current, and take up
                    // an install the link interrupted.
                    if *inbound.connected.borrow_and_update() {
                        self.publish_state().await;
                        if !self.accepted.settled {
                            last_attempt = Instant::now();
                            self.resume_unsettled(&mut inbound.chunks).await;
                        }
                    }
                }
                Ok(()) = disk.changed() => {
                    let room_again = disk.borrow_and_update().is_none();
                    self.publish_state().await;
                    let waiting = if room_again { self.unpersisted.take() } else { None };
                    if let Some(delivery) = waiting {
                        last_attempt = Instant::now();
                        self.take_delivery(delivery, &mut inbound.chunks).await;
                    } else if room_again && !self.accepted.settled {
                        last_attempt = Instant::now();
                        self.resume_unsettled(&mut inbound.chunks).await;
                    }
                }
                _ = tick.tick() => {
                    self.check_probation().await;
                    if !self.accepted.settled && last_attempt.elapsed() >= RETRY_UNSETTLED_AFTER {
                        last_attempt = Instant::now();
                        self.resume_unsettled(&mut inbound.chunks).await;
                    }
                }
            }
        }
    }

    /// Accepts a delivered directive and acts on it.
    async fn take_delivery(&mut self, delivery: Delivery, chunks: &mut mpsc::Receiver<Vec<u8>>) {
        let accepted = self.accept(delivery.payload()).await;
        if std::mem::take(&mut self.persist_failed) {
            // Kept unacknowledged until it is on disk; a newer one replaces it.
            if let Some(superseded) = self.unpersisted.replace(delivery) {
                self.link.ack(&superseded);
            }
            return;
        }
        // Acknowledged only now that the decision is on disk: a kill before this point gets
        // the directive delivered again.
        self.link.ack(&delivery);
        if let Some(directive) = accepted {
            // A newer directive is on disk: one still waiting for room is moot.
            if let Some(moot) = self.unpersisted.take() {
                self.link.ack(&moot);
            }
            self.apply(&directive, chunks).await;
        }
    }

    /// Handles one directive payload: accepts it, then acts on it.
    pub async fn handle(&mut self, payload: &[u8], chunks: &mut mpsc::Receiver<Vec<u8>>) {
        if let Some(directive) = self.accept(payload).await {
            self.apply(&directive, chunks).await;
        }
    }

    /// Verifies a directive and persists it as accepted, or reports why it is refused. Returns
    /// the directive to act upon, if any.
    async fn accept(&mut self, payload: &[u8]) -> Option<Directive> {
        let digest = Sha256Digest::of(payload);
        if self.accepted.payload_sha256 == Some(digest) {
            tracing::debug!("the accepted directive was delivered again; nothing to do");
            return None;
        }
        let envelope = match decode::<Envelope>(payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.refuse(None, &TrustError::Malformed(e)).await;
                return None;
            }
        };
        let directive = match verify_directive(
            &envelope,
            &self.fleet_keys,
            self.link.device(),
            self.accepted.seq,
            now_ms(),
        ) {
            Ok(directive) => directive,
            Err(e) => {
                let seq = decode::<Directive>(&envelope.payload).ok().map(|d| d.seq);
                self.refuse(seq, &e).await;
                return None;
            }
        };
        // Persist before acting: after a crash from here on, this directive (and any older one)
        // is refused as a replay, the retained copy is recognised by its digest, and the next
        // start takes the unsettled directive up again.
        let accepted = AcceptedDirective {
            seq: Some(directive.seq),
            payload_sha256: Some(digest),
            envelope: Some(envelope),
            settled: false,
        };
        if let Err(e) = accepted.save(&self.config.data_dir) {
            tracing::error!(error = %e, "cannot persist the accepted sequence; not acting on the directive");
            if crate::disk::is_no_space(&e) {
                if let Some(disk) = &self.disk {
                    disk.write_failed("directive", &e);
                    self.persist_failed = true;
                }
                self.refused = Some(Refusal {
                    seq: Some(directive.seq),
                    code: Condition::DISK_FULL.to_string(),
                    reason: format!(
                        "cannot persist the directive: {e}; it is acted upon when the disk has room"
                    ),
                    at_ms: now_ms(),
                });
                self.publish_state().await;
            }
            return None;
        }
        self.accepted = accepted;
        self.refused = None;
        self.metrics.record_install("directive_accepted");
        self.record_event(
            EventKind::DirectiveAccepted,
            None,
            None,
            format!("directive {}", directive.seq),
        );
        tracing::info!(
            seq = directive.seq,
            models = directive.models.len(),
            "directive accepted"
        );
        Some(directive)
    }

    /// Takes up a directive that was accepted but not settled when the agent stopped. Its
    /// signature is checked again (the file is on the device's disk); its sequence and validity
    /// window are not: they were checked when it was accepted, and an install that a crash
    /// interrupted must not be abandoned because the directive expired meanwhile.
    pub async fn resume_unsettled(&mut self, chunks: &mut mpsc::Receiver<Vec<u8>>) {
        if self.accepted.settled {
            return;
        }
        let Some(envelope) = self.accepted.envelope.clone() else {
            return;
        };
        let directive = envelope
            .open(&self.fleet_keys, DIRECTIVE_TYPE)
            .and_then(|payload| decode::<Directive>(payload).map_err(TrustError::from))
            .and_then(|directive| {
                if &directive.device == self.link.device() {
                    Ok(directive)
                } else {
                    Err(TrustError::WrongDevice {
                        expected: self.link.device().clone(),
                        found: directive.device,
                    })
                }
            });
        match directive {
            Ok(directive) => {
                tracing::info!(
                    seq = directive.seq,
                    "taking up the directive an earlier run did not finish"
                );
                self.apply(&directive, chunks).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "the unsettled directive on disk no longer verifies; dropping it");
                self.settle();
            }
        }
    }

    /// Acts on a verified, persisted directive, then records it as settled.
    async fn apply(&mut self, directive: &Directive, chunks: &mut mpsc::Receiver<Vec<u8>>) {
        let mut named = Vec::new();
        let mut refused_any = false;
        for assignment in &directive.models {
            let manifest = match verify_manifest(&assignment.manifest, &self.release_keys) {
                Ok(manifest) => manifest,
                Err(e) => {
                    refused_any = true;
                    tracing::warn!(error = %e, "manifest refused");
                    self.metrics.record_install("refused");
                    self.refused = Some(Refusal {
                        seq: Some(directive.seq),
                        code: e.label().to_string(),
                        reason: format!("manifest: {e}"),
                        at_ms: now_ms(),
                    });
                    continue;
                }
            };
            named.push(manifest.name.clone());
            self.install(&assignment.manifest, manifest, assignment.rollback, chunks)
                .await;
        }
        // A refused manifest names a model nobody can trust the name of: the directive may
        // have meant the very model served now, so it retires nothing.
        if refused_any {
            tracing::warn!("a manifest was refused: no model is retired by this directive");
        } else {
            self.retire_unnamed(&named);
        }
        if !std::mem::take(&mut self.retry_wanted) {
            self.settle();
        }
        self.publish_state().await;
    }

    /// Marks the accepted directive as acted upon and drops its stored copy.
    fn settle(&mut self) {
        self.accepted.settled = true;
        self.accepted.envelope = None;
        if let Err(e) = self.accepted.save(&self.config.data_dir) {
            // Not fatal: the worst case is acting on the directive once more at the next start.
            tracing::warn!(error = %e, "cannot record the directive as settled");
        }
    }

    /// Downloads `blob` for model `name` into its staging file, publishing progress, and
    /// returns the staging path; or the reason it failed. A failure caused by the link keeps
    /// the staging file and asks for a retry after the next reconnect; bytes that can never
    /// become the blob are thrown away.
    async fn fetch_blob(
        &mut self,
        name: &ModelName,
        blob: BlobRef,
        chunks: &mut mpsc::Receiver<Vec<u8>>,
    ) -> Result<std::path::PathBuf, String> {
        let staging = self.store.staging_path(&blob.sha256);
        let total = blob.size;
        self.set_phase(name, InstallPhase::Downloading { received: 0, total })
            .await;
        // The download borrows its own handles, so that the controller can publish its
        // progress while it runs: at most once a second or every 10 %.
        let (fetch_config, link) = (self.config.fetch.clone(), self.link.clone());
        let result = {
            let (progress, mut progressed) = tokio::sync::watch::channel(0u64);
            let download = fetch::download(
                blob,
                &staging,
                &fetch_config,
                &link,
                chunks,
                move |received, _total| {
                    progress.send_replace(received);
                },
            );
            tokio::pin!(download);
            let mut last_report = (Instant::now(), 0u64);
            loop {
                tokio::select! {
                    result = &mut download => break result,
                    Ok(()) = progressed.changed() => {
                        let received = *progressed.borrow_and_update();
                        if last_report.0.elapsed() >= Duration::from_secs(1)
                            || received.saturating_sub(last_report.1) * 10 >= total
                        {
                            last_report = (Instant::now(), received);
                            self.set_phase(name, InstallPhase::Downloading { received, total })
                                .await;
                        }
                    }
                }
            }
        };
        match result {
            Ok(report) => {
                self.metrics.add_bytes_fetched(report.fetched);
                tracing::info!(model = %name, sha256 = %blob.sha256, fetched = report.fetched, resumed_from = report.resumed_from, retries = report.retries, "downloaded");
                Ok(staging)
            }
            Err(e) => {
                if let fetch::FetchError::Io { cause, .. } = &e {
                    if self.no_space(&format!("download of {name}"), cause) {
                        // Keep what was staged: the download resumes from there.
                        return Err(format!("{e}; will try again when the disk has room"));
                    }
                }
                if matches!(
                    e,
                    fetch::FetchError::Mismatch(_) | fetch::FetchError::TooLong { .. }
                ) {
                    // These bytes can never become the blob: start afresh next time.
                    self.store.remove_staging(&blob.sha256);
                }
                if matches!(
                    e,
                    fetch::FetchError::Timeout { .. } | fetch::FetchError::LinkClosed
                ) {
                    // The link, not the blob: keep the staging file and try again after the
                    // next reconnect (or a while), from where it stopped.
                    self.retry_wanted = true;
                    return Err(format!("{e}; will resume after the next reconnect"));
                }
                Err(e.to_string())
            }
        }
    }

    /// Whether `cause` is a full disk; if so, reports the condition and keeps the directive
    /// unsettled, to be taken up again when the disk has room.
    fn no_space(&mut self, what: &str, cause: &std::io::Error) -> bool {
        if !crate::disk::is_no_space(cause) {
            return false;
        }
        if let Some(disk) = &self.disk {
            disk.write_failed(what, cause);
        }
        self.retry_wanted = true;
        true
    }

    async fn refuse(&mut self, seq: Option<u64>, error: &TrustError) {
        tracing::warn!(code = error.label(), error = %error, "directive refused");
        self.metrics.record_install("directive_refused");
        self.link.stats.record_dropped("directive", error.label());
        self.record_event(
            EventKind::DirectiveRefused,
            None,
            None,
            format!("{}: {error}", error.label()),
        );
        self.refused = Some(Refusal {
            seq,
            code: error.label().to_string(),
            reason: error.to_string(),
            at_ms: now_ms(),
        });
        self.publish_state().await;
    }

    fn state_of(&mut self, name: &ModelName) -> &mut ModelState {
        self.models
            .entry(name.clone())
            .or_insert_with(|| fresh_state(name))
    }

    async fn set_phase(&mut self, name: &ModelName, phase: InstallPhase) {
        self.state_of(name).phase = phase;
        self.publish_state().await;
    }

    async fn fail(&mut self, name: &ModelName, reason: String) {
        tracing::warn!(model = %name, %reason, "install failed; the previous version keeps serving");
        self.metrics.record_install("failed");
        let release = self
            .models
            .get(name)
            .and_then(|m| m.target.as_ref())
            .map(|t| t.release);
        self.record_event(
            EventKind::InstallFailed,
            Some(name),
            release,
            reason.clone(),
        );
        self.set_phase(name, InstallPhase::Failed { reason }).await;
    }

    /// Brings one model to the manifest's version.
    async fn install(
        &mut self,
        envelope: &Envelope,
        manifest: Manifest,
        rollback: bool,
        chunks: &mut mpsc::Receiver<Vec<u8>>,
    ) {
        let name = manifest.name.clone();
        let target = model_ref(&manifest);
        // What serves now, as this controller installed or recovered it.
        let running = self.models.get(&name).and_then(|m| m.active.clone());
        if let Some(running) = &running {
            if running.sha256 == manifest.sha256 && running.version == manifest.version {
                let state = self.state_of(&name);
                state.target = Some(target);
                state.phase = InstallPhase::Active;
                return;
            }
        }
        self.state_of(&name).target = Some(target.clone());
        if let Err(e) =
            check_release_order(&manifest, running.as_ref().map(|r| r.release), rollback)
        {
            self.metrics.record_install("refused");
            return self.fail(&name, e.to_string()).await;
        }
        if let Some(min) = &manifest.min_agent_version {
            let (have, need) = (parse_semver(AGENT_VERSION), parse_semver(min));
            if have < need {
                return self
                    .fail(
                        &name,
                        format!("needs agent {min} or newer; this is {AGENT_VERSION}"),
                    )
                    .await;
            }
        }

        // Download unless this exact version is already on disk.
        let installed = self
            .store
            .load(&name, &manifest.version, &self.release_keys)
            .ok()
            .filter(|stored| stored.manifest.sha256 == manifest.sha256);
        if installed.is_none() {
            // The reference profile first: it is small, and the model is useless to the drift
            // monitor without it.
            let staged_profile = match manifest.profile() {
                None => None,
                Some(profile) => match self.fetch_blob(&name, profile, chunks).await {
                    Ok(path) => Some(path),
                    Err(reason) => {
                        return self
                            .fail(&name, format!("reference profile: {reason}"))
                            .await
                    }
                },
            };
            let staging = match self.fetch_blob(&name, manifest.artifact(), chunks).await {
                Ok(path) => path,
                Err(reason) => return self.fail(&name, reason).await,
            };
            self.set_phase(&name, InstallPhase::Verifying).await;
            self.set_phase(&name, InstallPhase::Staging).await;
            if let Err(e) = self.store.install_with_profile(
                envelope,
                &manifest,
                &staging,
                staged_profile.as_deref(),
            ) {
                if let StoreError::Io { cause, .. } = &e {
                    if self.no_space(&format!("install of {name}"), cause) {
                        // Staged bytes stay for the retry, once there is room.
                        return self
                            .fail(&name, format!("{e}; will try again when the disk has room"))
                            .await;
                    }
                }
                self.store.remove_staging(&manifest.sha256);
                if let Some(profile) = manifest.profile() {
                    self.store.remove_staging(&profile.sha256);
                }
                return self.fail(&name, e.to_string()).await;
            }
        }

        self.set_phase(&name, InstallPhase::SelfTest).await;
        if let ModelCheck::Isolated { program } = &self.model_check {
            let (program, config) = (program.clone(), Arc::clone(&self.config));
            let (n, v) = (name.clone(), manifest.version.clone());
            let checked = tokio::task::spawn_blocking(move || {
                check::check_in_child(&program, &config, &n, &v)
            })
            .await;
            match checked {
                Ok(Ok(report)) => tracing::info!(
                    model = %name,
                    version = %manifest.version,
                    load_ms = report.load_ms,
                    peak_rss_kib = report.peak_rss_kib,
                    "the new version passed its check in a child process"
                ),
                Ok(Err(CheckError::Failed(reason))) => {
                    return self
                        .fail(&name, format!("self-test failed: {reason}"))
                        .await
                }
                // Only where the agent cannot run its own binary (under an emulator without
                // binfmt_misc, say): better an unbounded check than no install.
                Ok(Err(e @ CheckError::Spawn { .. })) => tracing::warn!(
                    model = %name,
                    error = %e,
                    "cannot check the new version in a child process; loading it here, without a memory bound"
                ),
                Err(e) => {
                    return self
                        .fail(&name, format!("the model check task failed: {e}"))
                        .await
                }
            }
        }
        let store = self.store.clone();
        let keys = self.release_keys.clone();
        let (n, v) = (name.clone(), manifest.version.clone());
        let checked = tokio::task::spawn_blocking(move || {
            let stored = store.load(&n, &v, &keys).map_err(|e| e.to_string())?;
            check_model(&stored)
        })
        .await
        .unwrap_or_else(|e| Err(format!("self-test task failed: {e}")));
        let checked = match checked {
            Ok(checked) => checked,
            Err(reason) => {
                return self
                    .fail(&name, format!("self-test failed: {reason}"))
                    .await
            }
        };

        if let Err(e) = self.store.activate(&name, &manifest.version) {
            return self.fail(&name, e.to_string()).await;
        }
        let previous = running;
        let replaced = self.table.set(Arc::new(checked.into_serving(&manifest)));
        self.close_drift_windows(replaced);
        let before = self.metrics.snapshot_model(&name, &manifest.version);
        self.probation.insert(
            name.clone(),
            Probation {
                version: target.clone(),
                started: Instant::now(),
                base_count: before.count,
                base_errors: before.error_count(),
            },
        );
        if let Err(e) = self.store.prune(&name) {
            tracing::warn!(model = %name, error = %e, "cannot prune old versions");
        }
        self.metrics.record_install("installed");
        self.record_event(
            EventKind::Activated,
            Some(&name),
            Some(manifest.release),
            format!("{} active", manifest.version),
        );
        tracing::info!(model = %name, version = %manifest.version, release = manifest.release, "active");
        let state = self.state_of(&name);
        state.active = Some(target);
        state.previous = previous;
        state.phase = InstallPhase::Active;
        self.refresh_installed(&name);
        self.publish_state().await;
    }

    fn refresh_installed(&mut self, name: &ModelName) {
        let installed = self
            .store
            .versions(name)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(version, _)| self.store.load(name, &version, &self.release_keys).ok())
            .map(|stored| model_ref(&stored.manifest))
            .collect();
        self.state_of(name).installed = installed;
    }

    fn retire_unnamed(&mut self, named: &[ModelName]) {
        let retired: Vec<ModelName> = self
            .models
            .keys()
            .filter(|name| !named.contains(name))
            .cloned()
            .collect();
        for name in retired {
            tracing::info!(model = %name, "retired: the directive no longer names it");
            self.record_event(
                EventKind::Retired,
                Some(&name),
                None,
                "the directive no longer names it".into(),
            );
            let removed = self.table.remove(&name);
            self.close_drift_windows(removed);
            self.probation.remove(&name);
            if let Err(e) = self.store.retire(&name) {
                tracing::warn!(model = %name, error = %e, "cannot remove retired model files");
            }
            self.models.remove(&name);
        }
    }

    /// Ends probations that are over and rolls back versions that fail theirs.
    async fn check_probation(&mut self) {
        let rules: ProbationConfig = self.config.probation.clone();
        let mut ended = Vec::new();
        let mut failed = Vec::new();
        for (name, probation) in &self.probation {
            let now = self
                .metrics
                .snapshot_model(name, &probation.version.version);
            let count = now.count.saturating_sub(probation.base_count);
            let errors = now.error_count().saturating_sub(probation.base_errors);
            let elapsed = probation.started.elapsed();
            // Judge only on enough evidence: a minimum of 10 calls, or the whole probation.
            if count >= 10 || elapsed >= Duration::from_secs(rules.seconds) {
                let rate = if count == 0 {
                    0.0
                } else {
                    errors as f64 / count as f64
                };
                if rate > rules.max_error_rate {
                    failed.push((
                        name.clone(),
                        format!(
                            "{errors} of {count} inferences failed ({:.1} % > {:.1} %) in the first {:.0} s",
                            rate * 100.0,
                            rules.max_error_rate * 100.0,
                            elapsed.as_secs_f64()
                        ),
                    ));
                    continue;
                }
            }
            if count >= rules.inferences && elapsed >= Duration::from_secs(rules.seconds) {
                ended.push(name.clone());
            }
        }
        for name in ended {
            tracing::info!(model = %name, "probation passed");
            self.probation.remove(&name);
        }
        for (name, reason) in failed {
            self.probation.remove(&name);
            self.roll_back_locally(&name, reason).await;
        }
    }

    async fn roll_back_locally(&mut self, name: &ModelName, reason: String) {
        tracing::warn!(model = %name, %reason, "probation failed; going back to the previous version");
        let previous = match self.store.rollback(name) {
            Ok(previous) => previous,
            Err(e) => {
                tracing::error!(model = %name, error = %e, "cannot roll back");
                return;
            }
        };
        let stored = match self.store.load(name, &previous, &self.release_keys) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(model = %name, error = %e, "the previous version cannot be loaded");
                return;
            }
        };
        let manifest = stored.manifest.clone();
        match tokio::task::spawn_blocking(move || check_model(&stored)).await {
            Ok(Ok(checked)) => {
                let replaced = self.table.set(Arc::new(checked.into_serving(&manifest)));
                self.close_drift_windows(replaced);
                self.metrics.record_install("rolled_back");
                self.record_event(
                    EventKind::RolledBack,
                    Some(name),
                    Some(manifest.release),
                    format!("back to {}: {reason}", manifest.version),
                );
                let state = self.state_of(name);
                state.previous = state.active.take();
                state.active = Some(model_ref(&manifest));
                state.phase = InstallPhase::RolledBack { reason };
                self.publish_state().await;
            }
            Ok(Err(e)) => {
                tracing::error!(model = %name, error = %e, "the previous version fails its self-test")
            }
            Err(e) => tracing::error!(model = %name, error = %e, "rollback task failed"),
        }
    }

    /// The reported state, as published.
    pub fn state(&self) -> State {
        State {
            v: V1,
            device: self.link.device().clone(),
            agent_version: AGENT_VERSION.to_string(),
            at_ms: now_ms(),
            directive_seq: self.accepted.seq,
            models: self.models.values().cloned().collect(),
            refused: self.refused.clone(),
            conditions: self
                .disk
                .as_ref()
                .and_then(|disk| disk.condition())
                .into_iter()
                .collect(),
        }
    }

    async fn publish_state(&self) {
        if let Err(e) = self
            .link
            .publish(TopicKind::State, encode(&self.state()))
            .await
        {
            tracing::warn!(error = %e, "cannot publish the reported state");
        }
    }
}
