//! The rollout runner: the I/O around the pure engine. It reads the facts (devices, their
//! labels, assignments and reported states; the gate figures from telemetry and drift totals),
//! calls the engine, saves the state with the decisions that explain it (one transaction), and
//! then carries out the engine's actions through the fleet's operations (assign, unassign,
//! signed directives). A small loop does this for every active rollout once per tick, and at
//! once when an operator creates or commands one.
//!
//! Order matters for crash safety: the state (with the devices about to be assigned) is saved
//! before any directive goes out, and each published directive is recorded afterwards; an
//! assignment without a recorded directive is asked for again by the engine at the next step.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};

use fleet_protocol::drift::{score, DriftWindow};
use fleet_protocol::histogram::LatencyHistogram;
use fleet_protocol::state::InstallPhase;
use fleet_protocol::ReferenceProfile;
use serde_json::json;

use crate::fleet::{Fleet, FleetError};
use crate::rollout::engine::{self, Action, Command, DeviceFacts, Facts, Step};
use crate::rollout::{RolloutRequest, RolloutSpec, RolloutState, StageFigures};
use crate::store::{now_ms, AuditEntry, DeviceRecord, RolloutRecord, ROLLOUTS_LOCK};

/// Serialises the engine's steps and operators' commands (one writer of rollout state at a
/// time), and wakes the loop.
#[derive(Default)]
pub struct RolloutControl {
    lock: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
}

/// Who did something, for the audit log.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

impl Actor {
    pub fn engine() -> Actor {
        Actor("engine".into())
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Steps every active rollout every `tick`, or sooner when woken, until `shutdown` flips.
/// Directives the engine's actions sign and publish at once.
const ACTIONS_AT_ONCE: usize = 32;

pub async fn run(
    fleet: Arc<Fleet>,
    tick: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = fleet.rollouts.wake.notified() => {}
            _ = shutdown.changed() => return,
        }
        // Rollouts are the leader's: on the other replicas they wait for a takeover.
        if !fleet.leadership.is_leader() {
            continue;
        }
        let started = std::time::Instant::now();
        if let Err(e) = fleet.step_rollouts().await {
            tracing::warn!(error = %e, "rollout step failed; retrying at the next tick");
        }
        let took = started.elapsed();
        fleet.metrics.rollout_steps.fetch_add(1, Ordering::Relaxed);
        fleet
            .metrics
            .rollout_step_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if took > tick {
            tracing::debug!(
                took_ms = took.as_millis() as u64,
                "a rollout step took longer than the engine's tick"
            );
        }
    }
}

impl Fleet {
    /// Creates a rollout: checks the version and the spec, refuses one that would share a
    /// device with another active rollout of the model, stores it, and wakes the engine.
    pub async fn create_rollout(
        &self,
        request: RolloutRequest,
        actor: &Actor,
    ) -> Result<RolloutRecord, FleetError> {
        self.with_rollouts_locked(self.create_rollout_locked(request, actor))
            .await
    }

    async fn create_rollout_locked(
        &self,
        request: RolloutRequest,
        actor: &Actor,
    ) -> Result<RolloutRecord, FleetError> {
        let record = self
            .store
            .model(&request.model, &request.version)
            .await?
            .ok_or_else(|| {
                FleetError::NotFound(format!(
                    "no model {}@{} in the registry",
                    request.model, request.version
                ))
            })?;
        let devices = self.store.devices().await?;
        let matching: Vec<&DeviceRecord> = devices
            .iter()
            .filter(|d| d.revoked_at_ms.is_none())
            .filter(|d| crate::rollout::spec::matches(&request.selector, &d.labels))
            .collect();
        let spec = RolloutSpec::from_request(request, matching.len() as u64)
            .map_err(|e| FleetError::Invalid(e.to_string()))?;
        if matching.is_empty() {
            return Err(FleetError::Invalid(format!(
                "the selector {} matches no enrolled device",
                selector_text(&spec)
            )));
        }
        for other in self.store.rollouts(Some(&spec.model), true).await? {
            let shared: Vec<&str> = matching
                .iter()
                .filter(|d| {
                    other.spec.selects(&d.labels) || other.state.devices.contains_key(&d.id)
                })
                .map(|d| d.id.as_str())
                .collect();
            if !shared.is_empty() {
                return Err(FleetError::Conflict(format!(
                    "rollout {} ({}@{}, {}) already covers {} of these devices ({}{}); one active rollout per model and device: wait for it, or abort or roll it back",
                    other.id,
                    other.model,
                    other.version,
                    other.phase.as_str(),
                    shared.len(),
                    shared.iter().take(5).copied().collect::<Vec<_>>().join(", "),
                    if shared.len() > 5 { ", …" } else { "" }
                )));
            }
        }
        let now = now_ms();
        let stages: Vec<String> = spec
            .stages
            .iter()
            .map(|s| format!("{:?}/{}s", s.size, s.soak_secs))
            .collect();
        let entry = AuditEntry {
            id: 0,
            at_ms: now,
            actor: actor.to_string(),
            action: "rollout_created".into(),
            rollout: None,
            subject: Some(format!("{}@{}", spec.model, spec.version)),
            message: format!(
                "{actor} started a rollout of {}@{} (release {}) to {} devices matching {} in {} stages",
                spec.model,
                spec.version,
                record.release,
                matching.len(),
                selector_text(&spec),
                spec.stages.len()
            ),
            details: json!({"spec": spec, "devices": matching.len(), "stages": stages}),
        };
        let stored = self
            .store
            .insert_rollout(
                RolloutRecord {
                    id: String::new(),
                    seq: 0,
                    model: spec.model.clone(),
                    version: spec.version.clone(),
                    phase: engine::Phase::Running,
                    spec,
                    state: engine::start("", now),
                    created_by: actor.to_string(),
                    created_at_ms: now,
                    updated_at_ms: now,
                },
                entry,
            )
            .await?;
        tracing::info!(rollout = %stored.id, model = %stored.model, version = %stored.version, "rollout created");
        self.rollouts.wake.notify_one();
        Ok(stored)
    }

    /// An operator's pause, resume, abort or rollback.
    pub async fn command_rollout(
        &self,
        id: &str,
        command: Command,
        actor: &Actor,
    ) -> Result<RolloutRecord, FleetError> {
        self.with_rollouts_locked(self.command_rollout_locked(id, command, actor))
            .await
    }

    async fn command_rollout_locked(
        &self,
        id: &str,
        command: Command,
        actor: &Actor,
    ) -> Result<RolloutRecord, FleetError> {
        let mut record = self
            .store
            .rollout(id)
            .await?
            .ok_or_else(|| FleetError::NotFound(format!("no rollout {id}")))?;
        if command == Command::Rollback && !record.phase.is_active() {
            // Rolling back a finished rollout would fight a later one of the same model.
            if let Some(newer) = self
                .store
                .rollouts(Some(&record.model), false)
                .await?
                .into_iter()
                .find(|r| r.seq > record.seq)
            {
                return Err(FleetError::Conflict(format!(
                    "rollout {} of {}@{} came after {id}; roll that one back instead",
                    newer.id, newer.model, newer.version
                )));
            }
        }
        let devices = self.store.devices().await?;
        let active = self.store.rollouts(Some(&record.model), true).await?;
        let facts = self.rollout_facts(&record, &devices, &active).await?;
        let now = now_ms();
        let step = engine::command(&mut record.state, &facts, command, &actor.0, now)
            .map_err(|e| FleetError::Conflict(e.to_string()))?;
        let mut entries = vec![AuditEntry {
            id: 0,
            at_ms: now,
            actor: actor.to_string(),
            action: format!("rollout_{}", command.as_str()),
            rollout: Some(record.id.clone()),
            subject: Some(format!("{}@{}", record.model, record.version)),
            message: format!("{actor}: {} rollout {id}", command.as_str()),
            details: json!({"command": command}),
        }];
        entries.extend(self.audit_entries(&record, &step, now));
        self.store
            .save_rollout(&record.id, &record.state, &entries)
            .await?;
        self.apply(&mut record, step.actions, &devices).await?;
        record.phase = record.state.phase;
        self.rollouts.wake.notify_one();
        Ok(record)
    }

    /// One engine step for every active rollout, oldest first.
    pub async fn step_rollouts(&self) -> Result<(), FleetError> {
        self.with_rollouts_locked(self.step_rollouts_locked()).await
    }

    /// Runs `work` holding the rollouts: this process's lock, then the database's
    /// ([`ROLLOUTS_LOCK`]), so that an operator's command through one replica and the
    /// leader's step never both read a rollout, change it and write it back over the other.
    async fn with_rollouts_locked<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, FleetError>>,
    ) -> Result<T, FleetError> {
        let _guard = self.rollouts.lock.lock().await;
        let lock = self.store.lock_across_replicas(ROLLOUTS_LOCK).await?;
        let result = work.await;
        lock.release().await;
        result
    }

    async fn step_rollouts_locked(&self) -> Result<(), FleetError> {
        // Read once per tick: every rollout's facts come from the same devices.
        let devices = self.store.devices().await?;
        let mut active = self.store.rollouts(None, true).await?;
        active.sort_by_key(|r| r.seq);
        for i in 0..active.len() {
            let mut record = active[i].clone();
            let mut facts = self.rollout_facts(&record, &devices, &active).await?;
            let now = now_ms();
            if engine::wants_figures(&record.spec, &record.state, now) {
                facts.figures = Some(self.stage_figures(&record).await?);
            }
            let step = engine::step(&record.spec, &mut record.state, &facts, now);
            if step.changed {
                let entries = self.audit_entries(&record, &step, now);
                for d in &step.decisions {
                    tracing::info!(rollout = %record.id, action = d.action, "{}", d.message);
                }
                self.store
                    .save_rollout(&record.id, &record.state, &entries)
                    .await?;
            }
            self.apply(&mut record, step.actions, &devices).await?;
            // Later rollouts see the devices this one has just reached as held.
            active[i] = record;
        }
        Ok(())
    }

    /// Carries out the engine's actions, then saves which directives went out.
    ///
    /// `devices` are the tick's device records: the engine only acts on devices that were
    /// active in them, so each action skips reading its device again.
    async fn apply(
        &self,
        record: &mut RolloutRecord,
        actions: Vec<Action>,
        devices: &[DeviceRecord],
    ) -> Result<(), FleetError> {
        if actions.is_empty() {
            return Ok(());
        }
        let (model, version) = (record.model.clone(), record.version.clone());
        let by_id: HashMap<&str, &DeviceRecord> =
            devices.iter().map(|d| (d.id.as_str(), d)).collect();
        // The versions this step assigns, checked against the registry once rather than per
        // device.
        let wanted: BTreeSet<&String> = actions
            .iter()
            .filter_map(|action| match action {
                Action::Assign { .. } => Some(&version),
                Action::Revert { version, .. } => version.as_ref(),
            })
            .collect();
        let mut registered: HashSet<String> = HashSet::new();
        for version in wanted {
            if self.store.model(&model, version).await?.is_some() {
                registered.insert(version.clone());
            }
        }
        let assign = |device: &str, version: &str| {
            let (by_id, registered, model) = (&by_id, &registered, &model);
            let (device, version) = (device.to_string(), version.to_string());
            async move {
                if !registered.contains(&version) {
                    return Err(FleetError::NotFound(format!(
                        "no model {model}@{version} in the registry"
                    )));
                }
                match by_id.get(device.as_str()) {
                    Some(record) if record.revoked_at_ms.is_none() => {
                        self.assign_checked(record, model, &version).await
                    }
                    // Not in this tick's records, or revoked: the checks of `assign` decide.
                    _ => self.assign(&device, model, &version).await,
                }
            }
        };
        // Each action is one device's directive: several at once, or a stage of 10,000
        // devices waits on 10,000 round trips to the database one after the other.
        let outcomes: Vec<(Action, Result<u64, FleetError>)> = stream::iter(actions)
            .map(|action| {
                let (model, version) = (&model, &version);
                async move {
                    let outcome = match &action {
                        Action::Assign { device } => assign(device, version).await,
                        Action::Revert {
                            device,
                            version: Some(previous),
                        } => assign(device, previous).await,
                        Action::Revert {
                            device,
                            version: None,
                        } => match self.unassign(device, model).await {
                            Ok(seq) => Ok(seq),
                            Err(FleetError::NotFound(_)) => Ok(0),
                            Err(e) => Err(e),
                        },
                    };
                    (action, outcome)
                }
            })
            .buffer_unordered(ACTIONS_AT_ONCE)
            .collect()
            .await;
        for (action, outcome) in outcomes {
            match (action, outcome) {
                (Action::Assign { device }, Ok(seq)) => {
                    engine::record_assigned(&mut record.state, &device, seq)
                }
                (Action::Assign { device }, Err(e)) => {
                    tracing::warn!(rollout = %record.id, device, error = %e, "assignment failed; retrying at the next step")
                }
                (Action::Revert { device, .. }, Ok(_)) => {
                    engine::record_reverted(&mut record.state, &device)
                }
                (Action::Revert { device, .. }, Err(e)) => {
                    tracing::warn!(rollout = %record.id, device, error = %e, "rollback of a device failed; retrying at the next step")
                }
            }
        }
        self.store
            .save_rollout(&record.id, &record.state, &[])
            .await?;
        Ok(())
    }

    fn audit_entries(&self, record: &RolloutRecord, step: &Step, now: i64) -> Vec<AuditEntry> {
        step.decisions
            .iter()
            .map(|d| AuditEntry {
                id: 0,
                at_ms: now,
                actor: "engine".into(),
                action: d.action.to_string(),
                rollout: Some(record.id.clone()),
                subject: d
                    .details
                    .get("device")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .or_else(|| Some(format!("{}@{}", record.model, record.version))),
                message: d.message.clone(),
                details: d.details.clone(),
            })
            .collect()
    }

    /// What the devices report, as the engine sees it for one rollout. `active` are the active
    /// rollouts (any model; this one may be among them).
    async fn rollout_facts(
        &self,
        record: &RolloutRecord,
        devices: &[DeviceRecord],
        active: &[RolloutRecord],
    ) -> Result<Facts, FleetError> {
        let spec = &record.spec;
        let assigned: BTreeMap<String, String> = self
            .store
            .assignments_of_model(&spec.model)
            .await?
            .into_iter()
            .collect();
        // Devices an older active rollout of the same model holds are not ours to take.
        let mut held: BTreeSet<String> = BTreeSet::new();
        let older: Vec<&RolloutRecord> = active
            .iter()
            .filter(|r| r.model == spec.model && r.seq < record.seq)
            .collect();
        for device in devices {
            if older
                .iter()
                .any(|o| o.spec.selects(&device.labels) || o.state.devices.contains_key(&device.id))
            {
                held.insert(device.id.clone());
            }
        }
        let mut facts = Facts::default();
        for device in devices {
            if device.revoked_at_ms.is_some() {
                continue;
            }
            let (running, failure) = reported(device, &spec.model, &spec.version);
            facts.devices.insert(
                device.id.clone(),
                DeviceFacts {
                    eligible: spec.selects(&device.labels) && !held.contains(&device.id),
                    assigned: assigned.get(&device.id).cloned(),
                    active: running,
                    failure,
                    labels: device.labels.clone(),
                },
            );
        }
        Ok(facts)
    }

    /// The gate figures over the devices that installed the version: their telemetry and
    /// drift totals for it, and their telemetry totals of the version each ran before.
    async fn stage_figures(&self, record: &RolloutRecord) -> Result<StageFigures, FleetError> {
        let state: &RolloutState = &record.state;
        let installed: BTreeSet<&str> = engine::installed_devices(state).into_iter().collect();
        let model = &record.model;
        let release = |version: String| async move {
            Ok::<_, FleetError>(
                self.store
                    .model(model, &version)
                    .await?
                    .map(|m| (m.release, m)),
            )
        };
        let Some((new_release, new_record)) = release(record.version.clone()).await? else {
            return Err(FleetError::NotFound(format!(
                "model {}@{} is gone from the registry",
                record.model, record.version
            )));
        };
        let mut figures = StageFigures::default();
        let mut latency = LatencyHistogram::default();
        for totals in self.store.telemetry_totals(model, new_release).await? {
            if !installed.contains(totals.device.as_str()) {
                continue;
            }
            if totals.reports > 0 {
                figures.devices_reporting += 1;
            }
            figures.inferences += u64::try_from(totals.inferences).unwrap_or(0);
            figures.errors += u64::try_from(totals.errors).unwrap_or(0);
            latency.merge(&totals.latency);
        }
        figures.p95_us = latency.quantile_us(0.95);

        // The previous version's latency, on the same devices.
        let mut by_previous: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (id, d) in &state.devices {
            if let (true, Some(previous)) = (installed.contains(id.as_str()), &d.previous) {
                by_previous.entry(previous.as_str()).or_default().push(id);
            }
        }
        let mut previous_latency = LatencyHistogram::default();
        for (version, ids) in by_previous {
            let Some((previous_release, _)) = release(version.to_string()).await? else {
                continue;
            };
            for totals in self.store.telemetry_totals(model, previous_release).await? {
                if ids.contains(&totals.device.as_str()) {
                    previous_latency.merge(&totals.latency);
                }
            }
        }
        figures.previous_p95_us = previous_latency.quantile_us(0.95);

        // Drift: the shortest windows (the most of them), merged over the devices and judged
        // as one window against the version's profile.
        let merged = self.store.drift(model, new_release).await?;
        let shortest = merged
            .iter()
            .filter(|m| installed.contains(m.device.as_str()))
            .map(|m| m.window_len)
            .min();
        if let Some(len) = shortest {
            let mut total: Option<DriftWindow> = None;
            for m in merged
                .iter()
                .filter(|m| installed.contains(m.device.as_str()) && m.window_len == len)
            {
                figures.drift_windows += u64::try_from(m.windows).unwrap_or(0);
                match &mut total {
                    None => total = Some(m.merged.clone()),
                    Some(t) => {
                        if let Err(e) = t.merge(&m.merged) {
                            tracing::warn!(device = %m.device, "drift totals not merged: {e}");
                        }
                    }
                }
            }
            if let (Some(window), Some(profile)) = (total, self.profile_of(&new_record).await) {
                figures.drift_score = drift_score(&profile, window);
            }
        }
        Ok(figures)
    }

    /// The reference profile of a model version, for scoring: `None` when it has none, or
    /// when it cannot be read (logged; the drift gate then does not judge).
    pub async fn profile_of(&self, record: &crate::store::ModelRecord) -> Option<ReferenceProfile> {
        self.registry.profile(record).await.unwrap_or_else(|e| {
            tracing::warn!(model = %record.name, version = %record.version, error = %e, "no profile to score drift with");
            None
        })
    }
}

/// A window's drift score against the profile: its largest `psi / threshold`, over the input
/// features and the prediction (class and max-probability histograms, or output values), so a
/// version whose predictions shift on the same inputs scores as high as shifted inputs do.
/// Above 1: past the threshold calibrated for its length. `None` when it cannot be judged.
pub fn drift_score(profile: &ReferenceProfile, mut window: DriftWindow) -> Option<f64> {
    score(profile, &mut window).ok()?;
    let t = profile.thresholds_for(window.samples)?;
    let ratio = |psi: f64, threshold: f64| {
        if threshold > 0.0 {
            psi / threshold
        } else {
            0.0
        }
    };
    let prediction = window.prediction.as_ref().map_or(0.0, |p| {
        ratio(p.psi, t.prediction_psi).max(ratio(p.max_prob_psi, t.max_prob_psi))
    });
    Some(window.max_score.max(prediction))
}

/// The version a device reports serving, and a reported failure to install `version`.
#[allow(clippy::type_complexity)]
fn reported(
    device: &DeviceRecord,
    model: &str,
    version: &str,
) -> (Option<String>, Option<(Option<u64>, String)>) {
    let Some(state) = device
        .state
        .as_ref()
        .and_then(|s| serde_json::from_value::<fleet_protocol::State>(s.clone()).ok())
    else {
        return (None, None);
    };
    let Some(m) = state.models.iter().find(|m| m.name.as_str() == model) else {
        return (None, None);
    };
    let active = m.active.as_ref().map(|a| a.version.as_str().to_string());
    let targets_version = m
        .target
        .as_ref()
        .is_some_and(|t| t.version.as_str() == version);
    let failure = match &m.phase {
        InstallPhase::Failed { reason } | InstallPhase::RolledBack { reason }
            if targets_version =>
        {
            Some((state.directive_seq, reason.clone()))
        }
        _ => None,
    };
    (active, failure)
}

fn selector_text(spec: &RolloutSpec) -> String {
    if spec.selector.is_empty() {
        "(every device)".into()
    } else {
        spec.selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}
