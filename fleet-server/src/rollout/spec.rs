//! What an operator asks for: the rollout spec, its stages and gates, and their checks.
//!
//! A request names either explicit stages or an exponential ramp; the ramp is expanded into
//! explicit stages when the rollout is created (over the fleet the selector matched then; its
//! last stage is always 100 %, so devices that join later are still covered).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::selection::{check_stages, exponential_ramp, PlanError, StageSize};

/// What the engine does when a stage fails its gates, or too many devices fail to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Every device the rollout touched goes back to the version it ran before.
    #[default]
    Rollback,
    /// Stop where it is and wait for an operator (resume, abort or roll back).
    Pause,
}

/// The gates a stage must pass after its soak. Every limit is optional except the install
/// success and the number of devices reporting, which always apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// Share of the stage's devices that installed the version, in percent.
    #[serde(default = "default_min_install_success_pct")]
    pub min_install_success_pct: f64,
    /// Failed inferences over all inferences on the new version, in percent.
    #[serde(default = "default_max_error_rate_pct")]
    pub max_error_rate_pct: Option<f64>,
    /// p95 latency on the new version over the previous version's p95 on the same devices.
    #[serde(default = "default_max_p95_ratio")]
    pub max_p95_ratio: Option<f64>,
    /// The drift score of the stage's merged drift windows: the largest `psi / threshold` over
    /// the input features and the prediction, re-scored against the version's profile (above
    /// 1: past the threshold).
    #[serde(default)]
    pub max_drift_score: Option<f64>,
    /// Devices that sent telemetry for the new version; capped at the devices that installed
    /// it, so a one-device canary can pass a gate of 3.
    #[serde(default = "default_min_devices_reporting")]
    pub min_devices_reporting: u64,
}

fn default_min_install_success_pct() -> f64 {
    100.0
}
fn default_max_error_rate_pct() -> Option<f64> {
    Some(1.0)
}
fn default_max_p95_ratio() -> Option<f64> {
    Some(1.5)
}
fn default_min_devices_reporting() -> u64 {
    1
}

impl Default for Gates {
    fn default() -> Gates {
        Gates {
            min_install_success_pct: default_min_install_success_pct(),
            max_error_rate_pct: default_max_error_rate_pct(),
            max_p95_ratio: default_max_p95_ratio(),
            max_drift_score: None,
            min_devices_reporting: default_min_devices_reporting(),
        }
    }
}

impl Gates {
    fn check(&self, at: &str) -> Result<(), SpecError> {
        let bad = |what: &str| SpecError(format!("{at}: {what}"));
        let pct = |v: f64| v.is_finite() && (0.0..=100.0).contains(&v);
        if !pct(self.min_install_success_pct) {
            return Err(bad("min_install_success_pct must be within 0..=100"));
        }
        if self.max_error_rate_pct.is_some_and(|v| !pct(v)) {
            return Err(bad("max_error_rate_pct must be within 0..=100"));
        }
        if self
            .max_p95_ratio
            .is_some_and(|v| !(v.is_finite() && v > 0.0))
        {
            return Err(bad("max_p95_ratio must be above 0"));
        }
        if self
            .max_drift_score
            .is_some_and(|v| !(v.is_finite() && v >= 0.0))
        {
            return Err(bad("max_drift_score must be 0 or more"));
        }
        Ok(())
    }
}

/// One stage: how many devices, how long they soak once they all settled, and (optionally)
/// gates of its own instead of the rollout's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub size: StageSize,
    #[serde(default)]
    pub soak_secs: u64,
    #[serde(default)]
    pub gates: Option<Gates>,
}

/// An exponential ramp: `start` devices, ×`factor` per stage, each stage soaking `soak_secs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ramp {
    pub start: u64,
    pub factor: f64,
    #[serde(default)]
    pub soak_secs: u64,
}

/// A rollout as requested through the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    pub model: String,
    pub version: String,
    /// Label equalities a device must all match (empty: every device).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Spread every stage across this label's values (for example one canary per site).
    #[serde(default)]
    pub spread_label: Option<String>,
    /// Explicit stages…
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// …or an exponential ramp (exactly one of the two).
    #[serde(default)]
    pub ramp: Option<Ramp>,
    #[serde(default)]
    pub gates: Gates,
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// A device that has not installed the version this long after its directive counts as
    /// failed; also how long a soaked stage waits for devices to report before failing.
    #[serde(default = "default_install_timeout_secs")]
    pub install_timeout_secs: u64,
    /// More failed devices than this fails the rollout at once, without waiting for a gate.
    #[serde(default)]
    pub max_failed_devices: u64,
}

fn default_install_timeout_secs() -> u64 {
    600
}

/// A rollout as the engine runs it: the request with its stages made explicit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub model: String,
    pub version: String,
    pub selector: BTreeMap<String, String>,
    pub spread_label: Option<String>,
    pub stages: Vec<Stage>,
    /// The ramp the stages came from, when they did (for display).
    pub ramp: Option<Ramp>,
    pub gates: Gates,
    pub on_failure: FailurePolicy,
    pub install_timeout_secs: u64,
    pub max_failed_devices: u64,
}

/// Why a rollout request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

impl From<PlanError> for SpecError {
    fn from(e: PlanError) -> SpecError {
        SpecError(e.to_string())
    }
}

impl RolloutSpec {
    /// Checks a request and makes its stages explicit; `fleet` is how many devices its
    /// selector matches now (what a ramp is laid out over).
    pub fn from_request(request: RolloutRequest, fleet: u64) -> Result<RolloutSpec, SpecError> {
        let stages = match (&request.ramp, request.stages.is_empty()) {
            (Some(_), false) => {
                return Err(SpecError(
                    "give either stages or a ramp, not both".to_string(),
                ))
            }
            (None, true) => return Err(SpecError("give stages or a ramp".to_string())),
            (None, false) => request.stages.clone(),
            (Some(ramp), true) => exponential_ramp(ramp.start, ramp.factor, fleet)?
                .into_iter()
                .map(|size| Stage {
                    size,
                    soak_secs: ramp.soak_secs,
                    gates: None,
                })
                .collect(),
        };
        let sizes: Vec<StageSize> = stages.iter().map(|s| s.size).collect();
        check_stages(&sizes)?;
        if !matches!(stages.last().map(|s| s.size), Some(StageSize::Percent(p)) if p >= 100.0) {
            return Err(SpecError(
                "the last stage must be 100 % (a rollout ends with every selected device on the version)"
                    .to_string(),
            ));
        }
        request.gates.check("gates")?;
        for (i, stage) in stages.iter().enumerate() {
            if let Some(gates) = &stage.gates {
                gates.check(&format!("stage {}", i + 1))?;
            }
        }
        for (key, value) in &request.selector {
            crate::fleet::check_label(key, value).map_err(|e| SpecError(e.to_string()))?;
        }
        if let Some(label) = &request.spread_label {
            crate::fleet::check_label(label, "x").map_err(|e| SpecError(e.to_string()))?;
        }
        if request.install_timeout_secs == 0 {
            return Err(SpecError("install_timeout_secs must be above 0".into()));
        }
        Ok(RolloutSpec {
            model: request.model,
            version: request.version,
            selector: request.selector,
            spread_label: request.spread_label,
            stages,
            ramp: request.ramp,
            gates: request.gates,
            on_failure: request.on_failure,
            install_timeout_secs: request.install_timeout_secs,
            max_failed_devices: request.max_failed_devices,
        })
    }

    /// The gates of stage `i` (its own, or the rollout's).
    pub fn gates_of(&self, i: usize) -> &Gates {
        self.stages
            .get(i)
            .and_then(|s| s.gates.as_ref())
            .unwrap_or(&self.gates)
    }

    /// Whether a device with these labels is in the rollout's scope.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        matches(&self.selector, labels)
    }
}

/// Whether `labels` has every label of `selector` (an empty selector matches every device).
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RolloutRequest {
        serde_json::from_value(serde_json::json!({
            "model": "digits-mlp",
            "version": "v2",
            "stages": [
                {"size": {"percent": 10.0}, "soak_secs": 60},
                {"size": {"percent": 50.0}, "soak_secs": 60},
                {"size": {"percent": 100.0}}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn a_request_with_defaults_becomes_a_spec() {
        let spec = RolloutSpec::from_request(request(), 20).unwrap();
        assert_eq!(spec.stages.len(), 3);
        assert_eq!(spec.on_failure, FailurePolicy::Rollback);
        assert_eq!(spec.gates.min_install_success_pct, 100.0);
        assert_eq!(spec.gates_of(2), &Gates::default());
    }

    #[test]
    fn a_ramp_is_expanded_and_ends_at_the_whole_fleet() {
        let mut r = request();
        r.stages.clear();
        r.ramp = Some(Ramp {
            start: 2,
            factor: 4.0,
            soak_secs: 30,
        });
        let spec = RolloutSpec::from_request(r, 100).unwrap();
        let sizes: Vec<StageSize> = spec.stages.iter().map(|s| s.size).collect();
        assert_eq!(
            sizes,
            vec![
                StageSize::Count(2),
                StageSize::Count(8),
                StageSize::Count(32),
                StageSize::Percent(100.0)
            ]
        );
        assert!(spec.stages.iter().all(|s| s.soak_secs == 30));
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let mut both = request();
        both.ramp = Some(Ramp {
            start: 1,
            factor: 2.0,
            soak_secs: 0,
        });
        assert!(RolloutSpec::from_request(both, 10)
            .unwrap_err()
            .0
            .contains("not both"));
        let mut short = request();
        short.stages.pop();
        assert!(RolloutSpec::from_request(short, 10)
            .unwrap_err()
            .0
            .contains("last stage must be 100"));
        let mut gates = request();
        gates.gates.min_install_success_pct = 120.0;
        assert!(RolloutSpec::from_request(gates, 10)
            .unwrap_err()
            .0
            .contains("min_install_success_pct"));
        let mut label = request();
        label.selector.insert("site".into(), "a b".into());
        assert!(RolloutSpec::from_request(label, 10).is_err());
        let mut empty = request();
        empty.stages[0].size = StageSize::Count(0);
        assert!(RolloutSpec::from_request(empty, 20)
            .unwrap_err()
            .0
            .contains("stage 1"));
        let unknown: Result<RolloutRequest, _> = serde_json::from_value(serde_json::json!({
            "model": "m", "version": "v", "stages": [], "soak": 3
        }));
        assert!(unknown.is_err());
    }

    #[test]
    fn the_selector_matches_every_label_it_names() {
        let spec = RolloutSpec::from_request(
            RolloutRequest {
                selector: [("site".to_string(), "berlin".to_string())].into(),
                ..request()
            },
            10,
        )
        .unwrap();
        let berlin: BTreeMap<String, String> = [
            ("site".to_string(), "berlin".to_string()),
            ("hw".to_string(), "rpi4".to_string()),
        ]
        .into();
        let paris: BTreeMap<String, String> = [("site".to_string(), "paris".to_string())].into();
        assert!(spec.selects(&berlin));
        assert!(!spec.selects(&paris));
        assert!(!spec.selects(&BTreeMap::new()));
    }
}
