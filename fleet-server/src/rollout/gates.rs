//! Gate evaluation: the figures the runner measured over a stage's devices, judged against
//! the stage's gates. Pure; every check keeps the figure and the limit that decided it, so the
//! audit log can show why a stage advanced or stopped.

use serde::{Deserialize, Serialize};

use super::spec::Gates;

/// What the runner measured over the devices that installed the version (all stages so far).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageFigures {
    /// Devices with at least one telemetry report of the new version.
    pub devices_reporting: u64,
    /// Inferences on the new version, failed ones included.
    pub inferences: u64,
    pub errors: u64,
    /// p95 latency of the new version over those devices, µs.
    pub p95_us: Option<f64>,
    /// p95 latency of the version each of those devices ran before, over the same devices.
    pub previous_p95_us: Option<f64>,
    /// The drift score of the new version's merged drift windows on those devices.
    pub drift_score: Option<f64>,
    /// Drift windows behind that score.
    pub drift_windows: u64,
}

/// One gate's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateCheck {
    pub gate: String,
    /// The measured figure (absent when there was nothing to measure).
    pub value: Option<f64>,
    /// The limit it was held to.
    pub limit: f64,
    pub passed: bool,
    /// How to read it, in words.
    pub note: String,
}

/// The devices' installs at evaluation time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallCounts {
    /// Devices the rollout reached (that are still enrolled).
    pub reached: u64,
    pub installed: u64,
    /// Failed or timed out.
    pub failed: u64,
}

/// Devices the reporting gate asks for: its minimum, but never more than installed.
pub fn reporting_needed(gates: &Gates, installs: InstallCounts) -> u64 {
    gates.min_devices_reporting.min(installs.installed)
}

/// Judges `figures` against `gates`; returns whether every gate passed, and every check.
pub fn evaluate(
    gates: &Gates,
    installs: InstallCounts,
    figures: &StageFigures,
) -> (bool, Vec<GateCheck>) {
    let mut checks = Vec::new();

    let success = if installs.reached == 0 {
        None
    } else {
        Some(100.0 * installs.installed as f64 / installs.reached as f64)
    };
    checks.push(GateCheck {
        gate: "install_success_pct".into(),
        value: success,
        limit: gates.min_install_success_pct,
        passed: success.is_some_and(|s| s + 1e-9 >= gates.min_install_success_pct),
        note: format!(
            "{} of {} devices installed, {} failed (at least {} % must)",
            installs.installed, installs.reached, installs.failed, gates.min_install_success_pct
        ),
    });

    let needed = reporting_needed(gates, installs);
    checks.push(GateCheck {
        gate: "devices_reporting".into(),
        value: Some(figures.devices_reporting as f64),
        limit: needed as f64,
        // Nobody installed: the install gate failed already; nobody can report either.
        passed: installs.installed > 0 && figures.devices_reporting >= needed,
        note: format!(
            "{} devices sent telemetry for the version (at least {needed} must)",
            figures.devices_reporting
        ),
    });

    if let Some(limit) = gates.max_error_rate_pct {
        let rate = (figures.inferences > 0)
            .then(|| 100.0 * figures.errors as f64 / figures.inferences as f64);
        checks.push(GateCheck {
            gate: "error_rate_pct".into(),
            value: rate,
            limit,
            passed: rate.is_none_or(|r| r <= limit + 1e-9),
            note: match rate {
                Some(_) => format!(
                    "{} failed of {} inferences (at most {limit} %)",
                    figures.errors, figures.inferences
                ),
                None => "no inferences yet: not judged".into(),
            },
        });
    }

    if let Some(limit) = gates.max_p95_ratio {
        let (value, note) = match (figures.p95_us, figures.previous_p95_us) {
            (Some(new), Some(old)) if old > 0.0 => (
                Some(new / old),
                format!("p95 {new:.1} µs against {old:.1} µs before, on the same devices (at most ×{limit})"),
            ),
            (Some(new), _) => (
                None,
                format!("p95 {new:.1} µs; no previous version measured on these devices: not judged"),
            ),
            (None, _) => (None, "no latency measured yet: not judged".into()),
        };
        checks.push(GateCheck {
            gate: "p95_ratio".into(),
            value,
            limit,
            passed: value.is_none_or(|v| v <= limit + 1e-9),
            note,
        });
    }

    if let Some(limit) = gates.max_drift_score {
        let value = figures.drift_score;
        checks.push(GateCheck {
            gate: "drift_score".into(),
            value,
            limit,
            passed: value.is_none_or(|v| v <= limit + 1e-9),
            note: match value {
                Some(v) => format!(
                    "score {v:.2} over {} merged windows (at most {limit})",
                    figures.drift_windows
                ),
                None => "no drift window closed yet: not judged".into(),
            },
        });
    }

    let passed = checks.iter().all(|c| c.passed);
    (passed, checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installs(reached: u64, installed: u64) -> InstallCounts {
        InstallCounts {
            reached,
            installed,
            failed: reached - installed,
        }
    }

    fn healthy() -> StageFigures {
        StageFigures {
            devices_reporting: 2,
            inferences: 1000,
            errors: 2,
            p95_us: Some(12.0),
            previous_p95_us: Some(10.0),
            drift_score: Some(0.4),
            drift_windows: 6,
        }
    }

    fn gates() -> Gates {
        Gates {
            max_drift_score: Some(1.0),
            ..Gates::default()
        }
    }

    fn failed_gates(checks: &[GateCheck]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.gate.as_str())
            .collect()
    }

    #[test]
    fn healthy_figures_pass_every_gate_and_keep_their_numbers() {
        let (passed, checks) = evaluate(&gates(), installs(2, 2), &healthy());
        assert!(passed, "{checks:?}");
        assert_eq!(checks.len(), 5);
        let p95 = checks.iter().find(|c| c.gate == "p95_ratio").unwrap();
        assert!((p95.value.unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(p95.limit, 1.5);
        let errors = checks.iter().find(|c| c.gate == "error_rate_pct").unwrap();
        assert!((errors.value.unwrap() - 0.2).abs() < 1e-9);
    }

    #[test]
    fn each_gate_fails_on_its_own_figure() {
        let slow = StageFigures {
            p95_us: Some(80.0),
            ..healthy()
        };
        assert_eq!(
            failed_gates(&evaluate(&gates(), installs(2, 2), &slow).1),
            ["p95_ratio"]
        );
        let erroring = StageFigures {
            errors: 50,
            ..healthy()
        };
        assert_eq!(
            failed_gates(&evaluate(&gates(), installs(2, 2), &erroring).1),
            ["error_rate_pct"]
        );
        let drifting = StageFigures {
            drift_score: Some(3.0),
            ..healthy()
        };
        assert_eq!(
            failed_gates(&evaluate(&gates(), installs(2, 2), &drifting).1),
            ["drift_score"]
        );
        assert_eq!(
            failed_gates(&evaluate(&gates(), installs(3, 2), &healthy()).1),
            ["install_success_pct"]
        );
        let silent = StageFigures {
            devices_reporting: 0,
            ..healthy()
        };
        assert_eq!(
            failed_gates(&evaluate(&gates(), installs(2, 2), &silent).1),
            ["devices_reporting"]
        );
    }

    #[test]
    fn missing_figures_are_not_judged_but_nobody_installed_fails() {
        let empty = StageFigures {
            devices_reporting: 1,
            ..StageFigures::default()
        };
        let (passed, checks) = evaluate(&gates(), installs(1, 1), &empty);
        assert!(passed, "{checks:?}");
        assert!(checks.iter().any(|c| c.note.contains("not judged")));
        let (passed, _) = evaluate(&gates(), installs(2, 0), &StageFigures::default());
        assert!(!passed);
    }

    #[test]
    fn the_reporting_gate_never_asks_for_more_devices_than_installed() {
        let g = Gates {
            min_devices_reporting: 3,
            ..Gates::default()
        };
        assert_eq!(reporting_needed(&g, installs(1, 1)), 1);
        let one = StageFigures {
            devices_reporting: 1,
            ..healthy()
        };
        assert!(evaluate(&g, installs(1, 1), &one).0);
        assert!(!evaluate(&g, installs(5, 5), &one).0);
    }
}
