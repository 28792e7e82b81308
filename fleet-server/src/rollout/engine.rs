//! The rollout engine: a pure state machine. Given the spec, the persisted state, what the
//! devices report (facts) and the time, [`step`] moves the state on and says what to do
//! (assign the version, or put a device back on its previous one) and why (decisions, for the
//! audit log). Nothing here reads a clock, a socket or a database, so every transition is
//! unit tested with an injected clock, and a server that restarts picks the persisted state up
//! exactly where it was.
//!
//! The life of a rollout:
//!
//! ```text
//!            ┌──────── operator pause / gate failure (policy pause) ───────┐
//!            ▼                                                              │
//!  Running ──stage k: reach devices → all settled → soak → gates──┬─ pass ─┴─ next stage … Completed
//!    │  ▲                                                          └─ fail (policy rollback)
//!    │  └── operator resume ── Paused                                        │
//!    │                           │                                           ▼
//!    └── operator abort ─► Aborted      operator rollback ─────────► RollingBack ─► RolledBack
//! ```
//!
//! A device's outcome is recomputed from its reports at every step: installed when it runs
//! the version, failed when it reports the install failed (or rolled it back locally) after our
//! directive, timed out when neither happened within the install timeout. Actions are
//! declarative and idempotent: an assignment not yet confirmed as applied (no directive
//! sequence recorded) is asked for again at the next step, so a crash between saving the state
//! and publishing a directive loses nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::gates::{evaluate, reporting_needed, GateCheck, InstallCounts, StageFigures};
use super::selection::{cumulative_target, order, StageSize};
use super::spec::{FailurePolicy, RolloutSpec};

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Running,
    /// Waiting for an operator: paused by one, or by a failed gate under the pause policy.
    Paused,
    Completed,
    /// Stopped by an operator; devices keep what they run.
    Aborted,
    /// Putting every device it reached back on its previous version.
    RollingBack,
    RolledBack,
}

impl Phase {
    /// Still owns its devices' assignments of the model (one such rollout per device).
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Running | Phase::Paused | Phase::RollingBack)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Completed => "completed",
            Phase::Aborted => "aborted",
            Phase::RollingBack => "rolling_back",
            Phase::RolledBack => "rolled_back",
        }
    }
}

/// A reached device's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Directive sent (or about to be), not installed yet.
    Pending,
    Installed,
    /// The device reported the install failed, or rolled the version back on its own.
    Failed,
    /// Neither installed nor failed within the install timeout.
    TimedOut,
    /// Revoked or deleted since: no longer counted.
    Gone,
    /// Back on its previous version (after a rollback).
    Reverted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Installed => "installed",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Gone => "gone",
            Outcome::Reverted => "reverted",
        }
    }
}

/// A device the rollout reached: it is (or was) assigned the version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReachedDevice {
    /// The stage (0-based) it was reached in.
    pub stage: usize,
    /// The version assigned before the rollout (`None`: the model was not assigned).
    pub previous: Option<String>,
    pub reached_at_ms: i64,
    /// Sequence of the directive that assigned the version, once published.
    pub directive_seq: Option<u64>,
    /// Whether the directive back to `previous` was published (after a rollback).
    #[serde(default)]
    pub reverted_sent: bool,
    pub outcome: Outcome,
    /// Why it failed, in the device's words.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A gate evaluation, with the figures that decided it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub stage: usize,
    pub at_ms: i64,
    pub passed: bool,
    pub installs: InstallCounts,
    pub figures: StageFigures,
    pub checks: Vec<GateCheck>,
}

/// The persisted state of one rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The rollout's id: with each device's id, it seeds the device order.
    pub id: String,
    pub phase: Phase,
    /// The current stage, 0-based.
    pub stage: usize,
    pub stage_started_ms: i64,
    /// When every device of the stage had settled (installed, failed or timed out).
    pub soak_started_ms: Option<i64>,
    /// Why it is paused, or why it stopped.
    pub reason: Option<String>,
    pub devices: BTreeMap<String, ReachedDevice>,
    pub evaluations: Vec<Evaluation>,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// A "waiting for reports" decision was recorded for this soak (recorded once).
    #[serde(default)]
    pub waiting_recorded: bool,
}

/// A device's report, as the runner read it for this step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceFacts {
    pub labels: BTreeMap<String, String>,
    /// In the rollout's scope now: matches the selector, enrolled and not revoked, and not
    /// held by an older active rollout of the same model.
    pub eligible: bool,
    /// The version of the model assigned to it now.
    pub assigned: Option<String>,
    /// The version it reports serving.
    pub active: Option<String>,
    /// It reports that installing the rollout's version failed (or was rolled back on the
    /// device): the directive sequence its report reflects, and the reason.
    pub failure: Option<(Option<u64>, String)>,
}

/// What the runner knows at one step. Devices absent from `devices` are revoked or deleted.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub devices: BTreeMap<String, DeviceFacts>,
    /// Gate figures over the installed devices; supplied when [`wants_figures`] said so.
    pub figures: Option<StageFigures>,
}

/// Something for the runner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Assign the rollout's version to the device (and publish its directive).
    Assign { device: String },
    /// Put the device back on `version` (`None`: unassign the model).
    Revert {
        device: String,
        version: Option<String>,
    },
}

/// Why the engine did something: one audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub action: &'static str,
    pub message: String,
    pub details: serde_json::Value,
}

/// The outcome of a step or an operator command.
#[derive(Debug, Default)]
pub struct Step {
    pub actions: Vec<Action>,
    pub decisions: Vec<Decision>,
    /// The state changed (save it).
    pub changed: bool,
}

impl Step {
    fn decide(&mut self, action: &'static str, message: String, details: serde_json::Value) {
        self.changed = true;
        self.decisions.push(Decision {
            action,
            message,
            details,
        });
    }
}

/// An operator's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Pause,
    Resume,
    Abort,
    Rollback,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Abort => "abort",
            Command::Rollback => "rollback",
        }
    }
}

/// Why an operator's command cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} a rollout that is {phase}")]
pub struct CommandError {
    pub command: &'static str,
    pub phase: &'static str,
}

/// A new rollout's state.
pub fn start(id: &str, now_ms: i64) -> RolloutState {
    RolloutState {
        id: id.to_string(),
        phase: Phase::Running,
        stage: 0,
        stage_started_ms: now_ms,
        soak_started_ms: None,
        reason: None,
        devices: BTreeMap::new(),
        evaluations: Vec::new(),
        started_ms: now_ms,
        finished_ms: None,
        waiting_recorded: false,
    }
}

/// Whether the next step evaluates gates, so the runner should measure the stage's figures.
pub fn wants_figures(spec: &RolloutSpec, state: &RolloutState, now_ms: i64) -> bool {
    state.phase == Phase::Running
        && state
            .soak_started_ms
            .is_some_and(|at| now_ms >= at + soak_ms(spec, state.stage))
}

/// The devices whose gate figures the runner should measure: those that installed.
pub fn installed_devices(state: &RolloutState) -> Vec<&str> {
    state
        .devices
        .iter()
        .filter(|(_, d)| d.outcome == Outcome::Installed)
        .map(|(id, _)| id.as_str())
        .collect()
}

/// The runner published the directive that assigns the version (`seq`) to `device`.
pub fn record_assigned(state: &mut RolloutState, device: &str, seq: u64) {
    if let Some(d) = state.devices.get_mut(device) {
        d.directive_seq = Some(seq);
    }
}

/// The runner published the directive that puts `device` back on its previous version.
pub fn record_reverted(state: &mut RolloutState, device: &str) {
    if let Some(d) = state.devices.get_mut(device) {
        d.reverted_sent = true;
    }
}

fn soak_ms(spec: &RolloutSpec, stage: usize) -> i64 {
    let secs = spec.stages.get(stage).map(|s| s.soak_secs).unwrap_or(0);
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn timeout_ms(spec: &RolloutSpec) -> i64 {
    i64::try_from(spec.install_timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// Moves the rollout on by one step.
pub fn step(spec: &RolloutSpec, state: &mut RolloutState, facts: &Facts, now_ms: i64) -> Step {
    let mut out = Step::default();
    match state.phase {
        Phase::Running | Phase::Paused => {
            update_outcomes(spec, state, facts, now_ms, &mut out);
            if state.phase == Phase::Running {
                let failed = count(state, |o| matches!(o, Outcome::Failed | Outcome::TimedOut));
                if failed > spec.max_failed_devices {
                    let reason = format!(
                        "{failed} devices failed to install {}@{} (at most {} may)",
                        spec.model, spec.version, spec.max_failed_devices
                    );
                    fail(
                        spec,
                        state,
                        facts,
                        now_ms,
                        reason,
                        json!({"failed": failed}),
                        &mut out,
                    );
                } else {
                    run_stages(spec, state, facts, now_ms, &mut out);
                }
            }
            if state.phase.is_active() && state.phase != Phase::RollingBack {
                request_assignments(state, facts, &mut out);
            }
        }
        Phase::RollingBack => roll_back(state, facts, now_ms, &mut out),
        Phase::Completed | Phase::Aborted | Phase::RolledBack => {}
    }
    out
}

/// Carries out an operator's command.
pub fn command(
    state: &mut RolloutState,
    facts: &Facts,
    command: Command,
    actor: &str,
    now_ms: i64,
) -> Result<Step, CommandError> {
    let refuse = || CommandError {
        command: command.as_str(),
        phase: state.phase.as_str(),
    };
    let mut out = Step::default();
    match (command, state.phase) {
        (Command::Pause, Phase::Running) => {
            state.phase = Phase::Paused;
            state.reason = Some(format!("paused by {actor}"));
            out.decide(
                "paused",
                format!("{actor} paused the rollout at stage {}", state.stage + 1),
                json!({"stage": state.stage + 1}),
            );
        }
        (Command::Resume, Phase::Paused) => {
            state.phase = Phase::Running;
            state.reason = None;
            // The stage soaks again: whatever made it pause, its devices are judged afresh.
            state.soak_started_ms = None;
            state.waiting_recorded = false;
            out.decide(
                "resumed",
                format!(
                    "{actor} resumed the rollout at stage {}; it soaks again before its gates",
                    state.stage + 1
                ),
                json!({"stage": state.stage + 1}),
            );
        }
        (Command::Abort, Phase::Running | Phase::Paused) => {
            state.phase = Phase::Aborted;
            state.reason = Some(format!("aborted by {actor}"));
            state.finished_ms = Some(now_ms);
            out.decide(
                "aborted",
                format!(
                    "{actor} aborted the rollout at stage {}; devices keep the version they run",
                    state.stage + 1
                ),
                json!({"stage": state.stage + 1, "devices": state.devices.len()}),
            );
        }
        (Command::Rollback, Phase::Running | Phase::Paused | Phase::Aborted | Phase::Completed) => {
            begin_rollback(state, format!("rolled back by {actor}"), &mut out);
            roll_back(state, facts, now_ms, &mut out);
        }
        _ => return Err(refuse()),
    }
    Ok(out)
}

fn count(state: &RolloutState, f: impl Fn(Outcome) -> bool) -> u64 {
    state.devices.values().filter(|d| f(d.outcome)).count() as u64
}

fn update_outcomes(
    spec: &RolloutSpec,
    state: &mut RolloutState,
    facts: &Facts,
    now_ms: i64,
    out: &mut Step,
) {
    let timeout = timeout_ms(spec);
    for (id, device) in state.devices.iter_mut() {
        let (outcome, reason) = match facts.devices.get(id) {
            None => (Outcome::Gone, Some("no longer enrolled".to_string())),
            Some(f) if f.active.as_deref() == Some(spec.version.as_str()) => {
                (Outcome::Installed, None)
            }
            // A failure counts only when the report reflects our directive, not an earlier one.
            Some(DeviceFacts {
                failure: Some((reported_seq, reason)),
                ..
            }) if device
                .directive_seq
                .is_some_and(|ours| reported_seq.is_some_and(|seen| seen >= ours)) =>
            {
                (Outcome::Failed, Some(reason.clone()))
            }
            Some(_) if now_ms - device.reached_at_ms >= timeout => (
                Outcome::TimedOut,
                Some(format!(
                    "not installed within {} s",
                    spec.install_timeout_secs
                )),
            ),
            Some(_) => (Outcome::Pending, None),
        };
        if outcome != device.outcome {
            let was = device.outcome;
            device.outcome = outcome;
            device.reason = reason.clone();
            out.changed = true;
            let details = json!({"device": id, "was": was, "now": outcome, "reason": reason});
            match outcome {
                Outcome::Failed => out.decide(
                    "device_failed",
                    format!(
                        "{id} failed to install {}: {}",
                        spec.version,
                        reason.unwrap_or_default()
                    ),
                    details,
                ),
                Outcome::TimedOut => out.decide(
                    "device_timed_out",
                    format!(
                        "{id} has not installed {} within {} s",
                        spec.version, spec.install_timeout_secs
                    ),
                    details,
                ),
                Outcome::Gone => out.decide(
                    "device_gone",
                    format!("{id} is no longer enrolled; it no longer counts"),
                    details,
                ),
                _ => {}
            }
        }
    }
}

/// Reaches the stage's devices, starts the soak once they settled, and judges the gates once
/// it is over; a pass advances (and reaches the next stage's devices in the same step).
fn run_stages(
    spec: &RolloutSpec,
    state: &mut RolloutState,
    facts: &Facts,
    now_ms: i64,
    out: &mut Step,
) {
    loop {
        reach_stage_devices(spec, state, facts, now_ms, out);
        let pending = count(state, |o| o == Outcome::Pending);
        if pending > 0 {
            return;
        }
        let Some(soak_started) = state.soak_started_ms else {
            state.soak_started_ms = Some(now_ms);
            let installs = install_counts(state);
            out.decide(
                "stage_settled",
                format!(
                    "stage {}: its {} devices settled ({} installed, {} failed); soaking {} s",
                    state.stage + 1,
                    installs.reached,
                    installs.installed,
                    installs.failed,
                    soak_ms(spec, state.stage) / 1000
                ),
                json!({"stage": state.stage + 1, "installs": installs}),
            );
            // A zero soak is judged at once.
            continue;
        };
        let soak_end = soak_started + soak_ms(spec, state.stage);
        if now_ms < soak_end {
            return;
        }
        let Some(figures) = &facts.figures else {
            // The runner measures them for the next step (see `wants_figures`).
            return;
        };
        let gates = spec.gates_of(state.stage);
        let installs = install_counts(state);
        let needed = reporting_needed(gates, installs);
        if figures.devices_reporting < needed && now_ms < soak_end + timeout_ms(spec) {
            if !state.waiting_recorded {
                state.waiting_recorded = true;
                out.decide(
                    "waiting_for_reports",
                    format!(
                        "stage {}: soaked; {} of the {needed} devices needed have reported so far",
                        state.stage + 1,
                        figures.devices_reporting
                    ),
                    json!({"stage": state.stage + 1, "figures": figures}),
                );
            }
            return;
        }
        let (passed, checks) = evaluate(gates, installs, figures);
        let evaluation = Evaluation {
            stage: state.stage,
            at_ms: now_ms,
            passed,
            installs,
            figures: figures.clone(),
            checks,
        };
        let details = json!({
            "stage": state.stage + 1,
            "installs": installs,
            "figures": figures,
            "checks": evaluation.checks,
        });
        let failed_gates: Vec<&str> = evaluation
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.gate.as_str())
            .collect();
        let summary = summarize(&evaluation.checks);
        state.evaluations.push(evaluation.clone());
        if !passed {
            let reason = format!(
                "stage {} failed its gates ({}): {summary}",
                state.stage + 1,
                failed_gates.join(", ")
            );
            out.decide("gates_failed", reason.clone(), details);
            fail(spec, state, facts, now_ms, reason, json!({}), out);
            return;
        }
        out.decide(
            "gates_passed",
            format!("stage {} passed its gates: {summary}", state.stage + 1),
            details,
        );
        if state.stage + 1 >= spec.stages.len() {
            state.phase = Phase::Completed;
            state.finished_ms = Some(now_ms);
            out.decide(
                "completed",
                format!(
                    "{}@{} reached all {} devices",
                    spec.model, spec.version, installs.reached
                ),
                json!({"installs": installs}),
            );
            return;
        }
        state.stage += 1;
        state.stage_started_ms = now_ms;
        state.soak_started_ms = None;
        state.waiting_recorded = false;
        out.decide(
            "advanced",
            format!(
                "advancing to stage {} of {}",
                state.stage + 1,
                spec.stages.len()
            ),
            json!({"stage": state.stage + 1, "size": spec.stages[state.stage].size}),
        );
    }
}

fn summarize(checks: &[GateCheck]) -> String {
    checks
        .iter()
        .map(|c| match c.value {
            Some(v) => format!(
                "{} {v:.3} {} {}",
                c.gate,
                if c.passed { "within" } else { "beyond" },
                c.limit
            ),
            None => format!("{} not judged", c.gate),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn install_counts(state: &RolloutState) -> InstallCounts {
    InstallCounts {
        reached: count(state, |o| o != Outcome::Gone && o != Outcome::Reverted),
        installed: count(state, |o| o == Outcome::Installed),
        failed: count(state, |o| matches!(o, Outcome::Failed | Outcome::TimedOut)),
    }
}

/// Adds the devices the current stage selects that were not reached yet: the stage's own
/// devices on entering it, and devices that started matching since (they join here).
fn reach_stage_devices(
    spec: &RolloutSpec,
    state: &mut RolloutState,
    facts: &Facts,
    now_ms: i64,
    out: &mut Step,
) {
    let label = spec.spread_label.as_deref();
    let eligible: Vec<(&str, Option<&str>)> = facts
        .devices
        .iter()
        .filter(|(_, f)| f.eligible)
        .map(|(id, f)| {
            (
                id.as_str(),
                label.and_then(|l| f.labels.get(l).map(String::as_str)),
            )
        })
        .collect();
    let sizes: Vec<StageSize> = spec.stages.iter().map(|s| s.size).collect();
    let target = cumulative_target(&sizes, state.stage, eligible.len() as u64) as usize;
    let ordered = order(&state.id, &eligible);
    // The stage's devices are the first `target` in the rollout's order. Devices already
    // reached count towards it even when the order moved them (a spread label's new value).
    let already = ordered
        .iter()
        .filter(|id| state.devices.contains_key(**id))
        .count();
    let mut room = target.saturating_sub(already);
    let joining = state.devices.values().any(|d| d.stage == state.stage);
    let mut newly = Vec::new();
    for id in ordered.iter().take(target) {
        if room == 0 {
            break;
        }
        if state.devices.contains_key(*id) {
            continue;
        }
        let previous = facts.devices.get(*id).and_then(|f| f.assigned.clone());
        state.devices.insert(
            id.to_string(),
            ReachedDevice {
                stage: state.stage,
                previous,
                reached_at_ms: now_ms,
                directive_seq: None,
                reverted_sent: false,
                outcome: Outcome::Pending,
                reason: None,
            },
        );
        newly.push(id.to_string());
        room -= 1;
    }
    if !newly.is_empty() {
        out.decide(
            "devices_reached",
            format!(
                "stage {}: {} {} to {} ({} of {} selected devices now)",
                state.stage + 1,
                if joining {
                    "joined, assigning"
                } else {
                    "assigning"
                },
                newly.len(),
                spec.version,
                state.devices.len(),
                eligible.len()
            ),
            json!({"stage": state.stage + 1, "devices": newly}),
        );
    }
}

/// Asks for every reached device's assignment that was not confirmed as published.
fn request_assignments(state: &RolloutState, facts: &Facts, out: &mut Step) {
    for (id, device) in &state.devices {
        if device.directive_seq.is_none()
            && device.outcome != Outcome::Gone
            && facts.devices.contains_key(id)
        {
            out.actions.push(Action::Assign { device: id.clone() });
        }
    }
}

fn fail(
    spec: &RolloutSpec,
    state: &mut RolloutState,
    facts: &Facts,
    now_ms: i64,
    reason: String,
    details: serde_json::Value,
    out: &mut Step,
) {
    match spec.on_failure {
        FailurePolicy::Pause => {
            state.phase = Phase::Paused;
            state.reason = Some(reason.clone());
            out.decide(
                "paused",
                format!("paused for an operator: {reason}"),
                details,
            );
        }
        FailurePolicy::Rollback => {
            begin_rollback(state, reason, out);
            roll_back(state, facts, now_ms, out);
        }
    }
}

fn begin_rollback(state: &mut RolloutState, reason: String, out: &mut Step) {
    state.phase = Phase::RollingBack;
    state.reason = Some(reason.clone());
    let touched: Vec<serde_json::Value> = state
        .devices
        .iter()
        .map(|(id, d)| json!({"device": id, "back_to": d.previous}))
        .collect();
    out.decide(
        "rolling_back",
        format!(
            "rolling back {} devices to their previous versions: {reason}",
            state.devices.len()
        ),
        json!({"devices": touched}),
    );
}

/// Sends every reached device back to its previous version, until all are.
fn roll_back(state: &mut RolloutState, facts: &Facts, now_ms: i64, out: &mut Step) {
    let mut remaining = 0;
    for (id, device) in state.devices.iter_mut() {
        if matches!(device.outcome, Outcome::Reverted | Outcome::Gone) {
            continue;
        }
        let Some(f) = facts.devices.get(id) else {
            device.outcome = Outcome::Gone;
            out.changed = true;
            continue;
        };
        if device.reverted_sent && f.assigned == device.previous {
            device.outcome = Outcome::Reverted;
            out.changed = true;
            continue;
        }
        remaining += 1;
        if !device.reverted_sent {
            out.actions.push(Action::Revert {
                device: id.clone(),
                version: device.previous.clone(),
            });
        }
    }
    if remaining == 0 {
        state.phase = Phase::RolledBack;
        state.finished_ms = Some(now_ms);
        let reverted = count(state, |o| o == Outcome::Reverted);
        out.decide(
            "rolled_back",
            format!(
                "every device the rollout reached is back on its previous version ({reverted})"
            ),
            json!({"reverted": reverted}),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::spec::{Gates, RolloutRequest, Stage};

    const SOAK_S: u64 = 60;
    const TIMEOUT_S: u64 = 300;

    /// A fleet of obedient devices: the test applies the engine's actions to their
    /// assignments and decides when each installs.
    struct Sim {
        spec: RolloutSpec,
        state: RolloutState,
        facts: Facts,
        now: i64,
        seq: u64,
        log: Vec<Decision>,
    }

    fn spec_with(on_failure: FailurePolicy, max_failed: u64) -> RolloutSpec {
        let stage = |p: f64| Stage {
            size: StageSize::Percent(p),
            soak_secs: SOAK_S,
            gates: None,
        };
        RolloutSpec::from_request(
            RolloutRequest {
                model: "digits-mlp".into(),
                version: "v2".into(),
                selector: BTreeMap::new(),
                spread_label: None,
                stages: vec![stage(10.0), stage(50.0), stage(100.0)],
                ramp: None,
                gates: Gates {
                    max_drift_score: Some(1.0),
                    ..Gates::default()
                },
                on_failure,
                install_timeout_secs: TIMEOUT_S,
                max_failed_devices: max_failed,
            },
            20,
        )
        .unwrap()
    }

    impl Sim {
        fn new(n: usize, spec: RolloutSpec) -> Sim {
            let mut facts = Facts::default();
            for i in 0..n {
                facts.devices.insert(
                    format!("dev-{i:02}"),
                    DeviceFacts {
                        eligible: true,
                        assigned: Some("v1".into()),
                        active: Some("v1".into()),
                        ..DeviceFacts::default()
                    },
                );
            }
            Sim {
                spec,
                state: start("r1", 1_000_000),
                facts,
                now: 1_000_000,
                seq: 0,
                log: Vec::new(),
            }
        }

        /// One step, its actions carried out (assignments change; nothing installs).
        fn step(&mut self) -> Vec<Action> {
            if wants_figures(&self.spec, &self.state, self.now) {
                self.facts.figures.get_or_insert_with(healthy);
            } else {
                self.facts.figures = None;
            }
            let out = step(&self.spec, &mut self.state, &self.facts, self.now);
            self.apply(&out.actions);
            self.log.extend(out.decisions);
            out.actions
        }

        fn apply(&mut self, actions: &[Action]) {
            for action in actions {
                self.seq += 1;
                match action {
                    Action::Assign { device } => {
                        self.facts.devices.get_mut(device).unwrap().assigned =
                            Some(self.spec.version.clone());
                        record_assigned(&mut self.state, device, self.seq);
                    }
                    Action::Revert { device, version } => {
                        self.facts.devices.get_mut(device).unwrap().assigned = version.clone();
                        record_reverted(&mut self.state, device);
                    }
                }
            }
        }

        fn command(&mut self, c: Command) -> Result<(), CommandError> {
            let out = command(&mut self.state, &self.facts, c, "alice", self.now)?;
            self.apply(&out.actions);
            self.log.extend(out.decisions);
            Ok(())
        }

        /// Every device runs what it is assigned.
        fn install_all(&mut self) {
            for f in self.facts.devices.values_mut() {
                f.active = f.assigned.clone();
            }
        }

        fn advance(&mut self, secs: i64) {
            self.now += secs * 1000;
        }

        fn on_version(&self, v: &str) -> usize {
            self.facts
                .devices
                .values()
                .filter(|f| f.active.as_deref() == Some(v))
                .count()
        }

        fn decided(&self, action: &str) -> Vec<&Decision> {
            self.log.iter().filter(|d| d.action == action).collect()
        }

        /// Steps, installing, until the stage is soaked and judged.
        fn through_stage(&mut self) {
            self.step();
            self.install_all();
            self.advance(1);
            self.step(); // settled: the soak starts
            self.advance(SOAK_S as i64);
            self.step(); // soaked: judged
        }
    }

    fn healthy() -> StageFigures {
        StageFigures {
            devices_reporting: 20,
            inferences: 5000,
            errors: 0,
            p95_us: Some(9.0),
            previous_p95_us: Some(8.0),
            drift_score: Some(0.3),
            drift_windows: 12,
        }
    }

    #[test]
    fn a_healthy_rollout_goes_stage_by_stage_to_every_device() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        let first = sim.step();
        assert_eq!(first.len(), 2, "10 % of 20 devices");
        assert!(first.iter().all(|a| matches!(a, Action::Assign { .. })));
        // Already assigned and not installed: nothing is asked twice.
        assert!(sim.step().is_empty());
        sim.install_all();
        sim.step();
        sim.advance(SOAK_S as i64);
        sim.step();
        assert_eq!(sim.state.stage, 1, "{:#?}", sim.log);
        assert_eq!(
            sim.state.devices.len(),
            10,
            "the 50 % stage reached at once"
        );
        sim.install_all();
        sim.through_stage();
        assert_eq!(sim.state.stage, 2);
        assert_eq!(sim.state.devices.len(), 20);
        sim.through_stage();
        assert_eq!(sim.state.phase, Phase::Completed);
        assert_eq!(sim.on_version("v2"), 20);
        assert_eq!(sim.decided("gates_passed").len(), 3);
        assert_eq!(sim.state.evaluations.len(), 3);
        // Every evaluation kept its figures.
        let e = &sim.state.evaluations[0];
        assert_eq!(e.installs.installed, 2);
        assert_eq!(e.figures, healthy());
        // Devices keep the stage they were reached in.
        let by_stage = |k| sim.state.devices.values().filter(|d| d.stage == k).count();
        assert_eq!((by_stage(0), by_stage(1), by_stage(2)), (2, 8, 10));
        // A finished rollout does nothing more.
        sim.advance(1000);
        assert!(sim.step().is_empty());
    }

    #[test]
    fn the_soak_runs_from_when_the_stage_settled_by_the_injected_clock() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        sim.step();
        sim.advance(30); // installs take 30 s
        sim.install_all();
        sim.step();
        let settled = sim.now;
        assert_eq!(sim.state.soak_started_ms, Some(settled));
        sim.advance(SOAK_S as i64 - 1);
        assert!(!wants_figures(&sim.spec, &sim.state, sim.now));
        sim.step();
        assert_eq!(sim.state.stage, 0, "one second short of the soak");
        assert!(sim.state.evaluations.is_empty());
        sim.advance(1);
        assert!(wants_figures(&sim.spec, &sim.state, sim.now));
        sim.step();
        assert_eq!(sim.state.stage, 1);
        assert_eq!(
            sim.state.evaluations[0].at_ms,
            settled + SOAK_S as i64 * 1000
        );
        // No figures supplied: the engine waits instead of judging blind.
        let mut blind = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        blind.step();
        blind.install_all();
        blind.step();
        blind.advance(SOAK_S as i64);
        let out = step(
            &blind.spec,
            &mut blind.state,
            &Facts {
                figures: None,
                ..blind.facts.clone()
            },
            blind.now,
        );
        assert!(out.decisions.is_empty());
        assert_eq!(blind.state.stage, 0);
    }

    #[test]
    fn a_failed_gate_rolls_every_touched_device_back() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        sim.through_stage();
        sim.install_all();
        sim.step();
        sim.install_all();
        sim.advance(1);
        sim.step();
        sim.advance(SOAK_S as i64);
        // The second stage is slow: p95 three times the previous version's.
        sim.facts.figures = Some(StageFigures {
            p95_us: Some(24.0),
            ..healthy()
        });
        let out = step(&sim.spec, &mut sim.state, &sim.facts, sim.now);
        let failed = out
            .decisions
            .iter()
            .find(|d| d.action == "gates_failed")
            .unwrap();
        assert!(failed.message.contains("p95_ratio"), "{}", failed.message);
        assert!(failed.details["checks"]
            .to_string()
            .contains("\"value\":3.0"));
        assert_eq!(sim.state.phase, Phase::RollingBack);
        let reverts: Vec<&Action> = out
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Revert { version: Some(v), .. } if v == "v1"))
            .collect();
        assert_eq!(
            reverts.len(),
            10,
            "every device the rollout reached, back to v1"
        );
        sim.apply(&out.actions);
        sim.install_all();
        sim.step();
        assert_eq!(sim.state.phase, Phase::RolledBack);
        assert_eq!(sim.on_version("v1"), 20);
        assert!(sim
            .state
            .devices
            .values()
            .all(|d| d.outcome == Outcome::Reverted));
        // Nothing more to do, however long it runs.
        sim.advance(1000);
        assert!(sim.step().is_empty());
    }

    #[test]
    fn a_failed_gate_pauses_under_the_pause_policy_until_an_operator_acts() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Pause, 0));
        sim.step();
        sim.install_all();
        sim.step();
        sim.advance(SOAK_S as i64);
        sim.facts.figures = Some(StageFigures {
            errors: 500,
            ..healthy()
        });
        let out = step(&sim.spec, &mut sim.state, &sim.facts, sim.now);
        assert!(out.actions.is_empty());
        assert_eq!(sim.state.phase, Phase::Paused);
        assert!(sim
            .state
            .reason
            .as_deref()
            .unwrap()
            .contains("error_rate_pct"));
        // Paused: time passes, nothing advances.
        sim.advance(3600);
        assert!(sim.step().is_empty());
        assert_eq!(sim.state.stage, 0);
        // Resumed: the stage soaks again and, healthy now, advances.
        sim.command(Command::Resume).unwrap();
        sim.step();
        assert!(sim.state.soak_started_ms.is_some());
        sim.advance(SOAK_S as i64);
        sim.step();
        assert_eq!(sim.state.stage, 1);
        assert_eq!(sim.state.phase, Phase::Running);
    }

    #[test]
    fn operators_pause_resume_abort_and_roll_back() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        sim.step();
        sim.install_all();
        sim.command(Command::Pause).unwrap();
        assert_eq!(sim.state.phase, Phase::Paused);
        assert_eq!(sim.state.reason.as_deref(), Some("paused by alice"));
        assert_eq!(
            sim.command(Command::Pause).unwrap_err().to_string(),
            "cannot pause a rollout that is paused"
        );
        sim.advance(SOAK_S as i64 * 10);
        sim.step();
        assert_eq!(sim.state.stage, 0, "no progress while paused");
        sim.command(Command::Resume).unwrap();
        sim.step();
        sim.advance(SOAK_S as i64);
        sim.step();
        assert_eq!(sim.state.stage, 1);

        // Abort: it stops, devices keep what they run.
        let mut aborted = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        aborted.step();
        aborted.install_all();
        aborted.command(Command::Abort).unwrap();
        assert_eq!(aborted.state.phase, Phase::Aborted);
        aborted.advance(1000);
        assert!(aborted.step().is_empty());
        assert_eq!(aborted.on_version("v2"), 2);
        assert!(aborted.command(Command::Resume).is_err());
        // A finished rollout can still be rolled back by an operator.
        aborted.command(Command::Rollback).unwrap();
        assert_eq!(aborted.state.phase, Phase::RollingBack);
        aborted.install_all();
        aborted.step();
        assert_eq!(aborted.state.phase, Phase::RolledBack);
        assert_eq!(aborted.on_version("v1"), 20);
        assert!(aborted.command(Command::Rollback).is_err());
        assert_eq!(aborted.decided("rolled_back").len(), 1);
        assert!(aborted.decided("rolling_back")[0]
            .message
            .contains("rolled back by alice"));
    }

    #[test]
    fn devices_that_start_matching_join_at_the_current_stage() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        sim.through_stage();
        sim.install_all();
        sim.through_stage();
        sim.install_all();
        assert_eq!(sim.state.stage, 2);
        sim.step();
        assert_eq!(sim.state.devices.len(), 20);
        // A new device enrolls (or gets the selector's label) in the 100 % stage.
        sim.facts.devices.insert(
            "dev-new".into(),
            DeviceFacts {
                eligible: true,
                ..DeviceFacts::default()
            },
        );
        let actions = sim.step();
        assert_eq!(
            actions,
            vec![Action::Assign {
                device: "dev-new".into()
            }]
        );
        let joined = sim.decided("devices_reached");
        assert!(
            joined.last().unwrap().message.contains("joined"),
            "{:?}",
            joined.last()
        );
        assert_eq!(sim.state.devices["dev-new"].stage, 2);
        assert_eq!(sim.state.devices["dev-new"].previous, None);
        // A device outside the selector (not eligible) never joins.
        sim.facts
            .devices
            .insert("dev-other".into(), DeviceFacts::default());
        assert!(sim.step().is_empty());

        // In the 10 % stage, joiners fill the stage up to its share of the bigger fleet.
        let mut early = Sim::new(19, spec_with(FailurePolicy::Rollback, 0));
        early.step();
        assert_eq!(early.state.devices.len(), 2);
        for i in 0..2 {
            early.facts.devices.insert(
                format!("late-{i}"),
                DeviceFacts {
                    eligible: true,
                    ..DeviceFacts::default()
                },
            );
        }
        early.step();
        assert_eq!(early.state.devices.len(), 3, "10 % of 21, rounded up");
    }

    #[test]
    fn a_device_that_never_installs_times_out_and_counts_as_failed() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Rollback, 1));
        sim.step();
        let ids: Vec<String> = sim.state.devices.keys().cloned().collect();
        // One installs, the other stays silent.
        sim.facts.devices.get_mut(&ids[0]).unwrap().active = Some("v2".into());
        sim.advance(TIMEOUT_S as i64 - 1);
        sim.step();
        assert_eq!(sim.state.devices[&ids[1]].outcome, Outcome::Pending);
        assert!(
            sim.state.soak_started_ms.is_none(),
            "a pending device holds the stage"
        );
        sim.advance(1);
        sim.step();
        assert_eq!(sim.state.devices[&ids[1]].outcome, Outcome::TimedOut);
        assert_eq!(sim.decided("device_timed_out").len(), 1);
        // One failure is within the cap: the stage settles and soaks; its install gate (100 %)
        // then fails and the rollout rolls back.
        assert!(sim.state.soak_started_ms.is_some());
        sim.advance(SOAK_S as i64);
        sim.step();
        let failed = sim.decided("gates_failed");
        assert!(
            failed[0].message.contains("install_success_pct"),
            "{}",
            failed[0].message
        );
        assert_eq!(sim.state.phase, Phase::RollingBack);

        // With no failures allowed, a time-out fails the rollout at once.
        let mut strict = Sim::new(20, spec_with(FailurePolicy::Pause, 0));
        strict.step();
        strict.advance(TIMEOUT_S as i64);
        strict.step();
        assert_eq!(strict.state.phase, Phase::Paused);
        assert!(strict
            .state
            .reason
            .as_deref()
            .unwrap()
            .contains("2 devices failed"));
    }

    #[test]
    fn a_reported_install_failure_counts_only_after_our_directive() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Rollback, 5));
        sim.step();
        let ids: Vec<String> = sim.state.devices.keys().cloned().collect();
        let ours = sim.state.devices[&ids[0]].directive_seq.unwrap();
        // A report from before our directive (an older failed attempt) is not ours.
        sim.facts.devices.get_mut(&ids[0]).unwrap().failure =
            Some((Some(ours - 1), "self-test failed".into()));
        sim.step();
        assert_eq!(sim.state.devices[&ids[0]].outcome, Outcome::Pending);
        sim.facts.devices.get_mut(&ids[0]).unwrap().failure =
            Some((Some(ours), "sha256 mismatch".into()));
        sim.step();
        let d = &sim.state.devices[&ids[0]];
        assert_eq!(d.outcome, Outcome::Failed);
        assert_eq!(d.reason.as_deref(), Some("sha256 mismatch"));
        assert!(sim.decided("device_failed")[0]
            .message
            .contains("sha256 mismatch"));
    }

    #[test]
    fn a_restart_mid_stage_resumes_from_the_saved_state() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        sim.through_stage();
        sim.install_all();
        sim.step();
        sim.advance(10);
        // Mid-soak of stage 2: the server saves its state and stops.
        let saved = serde_json::to_string(&sim.state).unwrap();
        let soak_started = sim.state.soak_started_ms.unwrap();
        // …and starts again 20 s later with what it saved.
        sim.state = serde_json::from_str(&saved).unwrap();
        sim.advance(20);
        assert!(sim.step().is_empty(), "nothing is assigned twice");
        assert_eq!(
            sim.state.soak_started_ms,
            Some(soak_started),
            "the soak keeps its start"
        );
        sim.now = soak_started + SOAK_S as i64 * 1000;
        sim.step();
        assert_eq!(sim.state.stage, 2);

        // A crash between saving the reached devices and publishing their directives: the
        // saved state has devices without a directive, and they are asked for again.
        let mut crashed = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        let out = step(
            &crashed.spec,
            &mut crashed.state,
            &crashed.facts,
            crashed.now,
        );
        assert_eq!(out.actions.len(), 2);
        let saved = serde_json::to_string(&crashed.state).unwrap();
        crashed.state = serde_json::from_str(&saved).unwrap();
        assert_eq!(crashed.step(), out.actions);
        assert!(crashed.step().is_empty());
    }

    #[test]
    fn a_spread_label_puts_the_canaries_on_different_sites() {
        let mut spec = spec_with(FailurePolicy::Rollback, 0);
        spec.spread_label = Some("site".into());
        spec.stages[0].size = StageSize::Count(4);
        let mut sim = Sim::new(20, spec);
        let sites = ["berlin", "paris", "oslo", "rome"];
        for (i, f) in sim.facts.devices.values_mut().enumerate() {
            f.labels.insert("site".into(), sites[i % 4].into());
        }
        sim.step();
        let mut covered: Vec<&str> = sim
            .state
            .devices
            .keys()
            .map(|id| sim.facts.devices[id].labels["site"].as_str())
            .collect();
        covered.sort_unstable();
        assert_eq!(covered, ["berlin", "oslo", "paris", "rome"]);
    }

    #[test]
    fn devices_waiting_to_report_hold_the_gate_until_the_timeout() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        sim.step();
        sim.install_all();
        sim.step();
        sim.advance(SOAK_S as i64);
        sim.facts.figures = Some(StageFigures {
            devices_reporting: 0,
            ..healthy()
        });
        let out = step(&sim.spec, &mut sim.state, &sim.facts, sim.now);
        assert_eq!(out.decisions[0].action, "waiting_for_reports");
        assert_eq!(sim.state.phase, Phase::Running);
        // Recorded once, not at every step.
        assert!(step(&sim.spec, &mut sim.state, &sim.facts, sim.now + 1000)
            .decisions
            .is_empty());
        sim.advance(TIMEOUT_S as i64);
        let out = step(&sim.spec, &mut sim.state, &sim.facts, sim.now);
        assert!(out
            .decisions
            .iter()
            .any(|d| d.action == "gates_failed" && d.message.contains("devices_reporting")));
        assert_eq!(sim.state.phase, Phase::RollingBack);
    }

    #[test]
    fn a_revoked_device_no_longer_counts() {
        let mut sim = Sim::new(20, spec_with(FailurePolicy::Rollback, 0));
        sim.step();
        let gone = sim.state.devices.keys().next().unwrap().clone();
        sim.facts.devices.remove(&gone);
        sim.install_all();
        let replacement = sim.step();
        assert_eq!(sim.state.devices[&gone].outcome, Outcome::Gone);
        // The stage keeps its size: another device takes the revoked one's place.
        assert_eq!(replacement.len(), 1);
        assert_eq!(sim.state.devices.len(), 3);
        sim.install_all();
        sim.step();
        sim.advance(SOAK_S as i64);
        sim.step();
        assert_eq!(sim.state.stage, 1, "{:#?}", sim.log);
        let judged = &sim.state.evaluations[0].installs;
        assert_eq!(
            (judged.reached, judged.installed),
            (2, 2),
            "the gone device is not counted"
        );
    }
}
