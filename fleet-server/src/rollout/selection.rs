//! Which devices a rollout reaches at each stage.
//!
//! Pure functions, no I/O. Selection is deterministic and sticky: every device gets a rank
//! from a hash of the rollout id and its own id, and stage k takes the first n_k devices in
//! rank order, so a device once selected stays selected in every later stage, and the same
//! rollout over the same fleet always picks the same devices. With a spread label the order
//! interleaves the label's values (the best-ranked device of every site first, then the
//! second of every site, …), so a one-device-per-site canary falls out of the same rule.
//! A device that starts matching the selector mid-rollout takes its place in that order: it
//! joins at once when its rank is inside the current stage. Without a spread label it never
//! moves another device; with one it can push later devices of its own label value back by a
//! round, so the engine keeps the set of devices it has reached and only ever adds to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How many devices a stage takes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageSize {
    /// A share of the selected devices, in percent (0 < p ≤ 100), rounded up so that a
    /// non-zero share of a non-empty fleet is at least one device.
    Percent(f64),
    /// A fixed number of devices (capped by the fleet).
    Count(u64),
}

/// Why a stage plan was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("a rollout needs at least one stage")]
    NoStages,
    #[error("stage {stage}: {reason}")]
    BadStage { stage: usize, reason: String },
    #[error("exponential ramp: {0}")]
    BadRamp(String),
}

/// Checks a list of stages: at least one, every size valid. A stage that would take fewer
/// devices than one before it (a count after a share, in a big fleet) is not an error: the
/// devices a rollout reached stay reached, so stage k takes [`cumulative_target`].
pub fn check_stages(stages: &[StageSize]) -> Result<(), PlanError> {
    if stages.is_empty() {
        return Err(PlanError::NoStages);
    }
    for (i, stage) in stages.iter().enumerate() {
        if let StageSize::Percent(p) = stage {
            if !(p.is_finite() && *p > 0.0 && *p <= 100.0) {
                return Err(PlanError::BadStage {
                    stage: i + 1,
                    reason: format!("{p} % is outside (0, 100]"),
                });
            }
        }
        if let StageSize::Count(0) = stage {
            return Err(PlanError::BadStage {
                stage: i + 1,
                reason: "a stage of 0 devices".into(),
            });
        }
    }
    Ok(())
}

/// How many of `fleet` devices stage `k` (0-based) reaches: the most any stage up to it
/// takes, so that a stage never gives devices back.
pub fn cumulative_target(stages: &[StageSize], k: usize, fleet: u64) -> u64 {
    stages
        .iter()
        .take(k + 1)
        .map(|s| stage_target(*s, fleet))
        .max()
        .unwrap_or(0)
}

/// How many of `fleet` devices a stage reaches.
pub fn stage_target(stage: StageSize, fleet: u64) -> u64 {
    match stage {
        StageSize::Percent(p) => {
            let exact = fleet as f64 * p / 100.0;
            // Rounded up, but a float just above an integer (3.0000000004) is that integer.
            let n = (exact - 1e-9).ceil().max(0.0) as u64;
            n.min(fleet)
        }
        StageSize::Count(n) => n.min(fleet),
    }
}

/// An exponential ramp as explicit stages: `start` devices, then ×`factor` per stage, the
/// last stage taking the whole fleet.
pub fn exponential_ramp(start: u64, factor: f64, fleet: u64) -> Result<Vec<StageSize>, PlanError> {
    if start == 0 {
        return Err(PlanError::BadRamp(
            "it must start with at least one device".into(),
        ));
    }
    if !(factor.is_finite() && factor > 1.0) {
        return Err(PlanError::BadRamp(format!(
            "factor {factor} must be above 1"
        )));
    }
    let mut stages = Vec::new();
    let mut n = start as f64;
    while (n as u64) < fleet {
        stages.push(StageSize::Count(n as u64));
        // At least one more device per stage, however small the factor.
        n = (n * factor).max(n + 1.0).ceil();
    }
    stages.push(StageSize::Percent(100.0));
    Ok(stages)
}

/// A device's rank in a rollout: the first 8 bytes of SHA-256(rollout id, 0, device id).
pub fn rank(rollout: &str, device: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(rollout.as_bytes());
    hasher.update([0u8]);
    hasher.update(device.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The rollout's device order. `devices` are (id, value of the spread label, if any);
/// without a spread label pass `None` for every device. Ties in rank (practically never)
/// fall back to the id, so the order is total.
pub fn order<'a>(rollout: &str, devices: &[(&'a str, Option<&'a str>)]) -> Vec<&'a str> {
    let mut groups: BTreeMap<Option<&str>, Vec<(u64, &str)>> = BTreeMap::new();
    for (id, group) in devices {
        groups
            .entry(*group)
            .or_default()
            .push((rank(rollout, id), id));
    }
    for members in groups.values_mut() {
        members.sort_unstable();
    }
    // Interleave: round r takes every group's r-th device, groups in the order of their
    // best-ranked device (so which site goes first is as deterministic as the rest).
    let mut lists: Vec<Vec<(u64, &str)>> = groups.into_values().collect();
    lists.sort_by_key(|members| members[0]);
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::with_capacity(devices.len());
    for round in 0..longest {
        let mut this_round: Vec<(u64, &str)> =
            lists.iter().filter_map(|m| m.get(round).copied()).collect();
        this_round.sort_unstable();
        out.extend(this_round.into_iter().map(|(_, id)| id));
    }
    out
}

/// The devices a stage reaches: the first `stage_target` of the rollout's order.
pub fn stage_devices<'a>(
    rollout: &str,
    devices: &[(&'a str, Option<&'a str>)],
    stage: StageSize,
) -> Vec<&'a str> {
    let ordered = order(rollout, devices);
    let n = stage_target(stage, ordered.len() as u64) as usize;
    ordered.into_iter().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dev-{i:03}")).collect()
    }

    #[test]
    fn stage_targets_round_up_and_cap() {
        assert_eq!(stage_target(StageSize::Percent(10.0), 20), 2);
        assert_eq!(stage_target(StageSize::Percent(10.0), 5), 1);
        assert_eq!(stage_target(StageSize::Percent(50.0), 20), 10);
        assert_eq!(stage_target(StageSize::Percent(100.0), 20), 20);
        assert_eq!(stage_target(StageSize::Percent(30.0), 10), 3);
        assert_eq!(stage_target(StageSize::Count(3), 2), 2);
        assert_eq!(stage_target(StageSize::Percent(10.0), 0), 0);
    }

    #[test]
    fn stage_lists_are_checked() {
        let ok = [
            StageSize::Percent(10.0),
            StageSize::Percent(50.0),
            StageSize::Percent(100.0),
        ];
        assert_eq!(check_stages(&ok), Ok(()));
        assert_eq!(check_stages(&[]), Err(PlanError::NoStages));
        assert!(check_stages(&[StageSize::Percent(0.0)]).is_err());
        assert!(check_stages(&[StageSize::Percent(120.0)]).is_err());
        assert!(check_stages(&[StageSize::Percent(f64::NAN)]).is_err());
        let e = check_stages(&[StageSize::Percent(5.0), StageSize::Count(0)]).unwrap_err();
        assert!(e.to_string().contains("stage 2"), "{e}");
        // A count after a smaller share keeps the devices it reached.
        let shrinking = [
            StageSize::Count(5),
            StageSize::Percent(10.0),
            StageSize::Percent(100.0),
        ];
        assert_eq!(check_stages(&shrinking), Ok(()));
        assert_eq!(cumulative_target(&shrinking, 1, 20), 5);
        assert_eq!(cumulative_target(&shrinking, 2, 20), 20);
    }

    #[test]
    fn an_exponential_ramp_grows_to_the_whole_fleet() {
        let stages = exponential_ramp(1, 3.0, 100).unwrap();
        let targets: Vec<u64> = stages.iter().map(|s| stage_target(*s, 100)).collect();
        assert_eq!(targets, vec![1, 3, 9, 27, 81, 100]);
        assert_eq!(check_stages(&stages), Ok(()));
        // A factor barely above 1 still adds a device per stage.
        let slow = exponential_ramp(2, 1.01, 5).unwrap();
        let targets: Vec<u64> = slow.iter().map(|s| stage_target(*s, 5)).collect();
        assert_eq!(targets, vec![2, 3, 4, 5]);
        assert!(exponential_ramp(0, 2.0, 10).is_err());
        assert!(exponential_ramp(1, 1.0, 10).is_err());
        // A fleet smaller than the start is one stage.
        assert_eq!(
            exponential_ramp(5, 2.0, 3).unwrap(),
            vec![StageSize::Percent(100.0)]
        );
    }

    #[test]
    fn selection_is_deterministic_sticky_and_differs_between_rollouts() {
        let ids = fleet(50);
        let devices: Vec<(&str, Option<&str>)> = ids.iter().map(|d| (d.as_str(), None)).collect();
        let s10 = stage_devices("r1", &devices, StageSize::Percent(10.0));
        let s50 = stage_devices("r1", &devices, StageSize::Percent(50.0));
        let s100 = stage_devices("r1", &devices, StageSize::Percent(100.0));
        assert_eq!(s10.len(), 5);
        assert_eq!(s50.len(), 25);
        assert_eq!(s100.len(), 50);
        // Sticky: every stage contains the ones before it.
        assert!(s10.iter().all(|d| s50.contains(d)));
        assert!(s50.iter().all(|d| s100.contains(d)));
        // Deterministic, whatever order the devices are listed in.
        let mut reversed = devices.clone();
        reversed.reverse();
        assert_eq!(
            stage_devices("r1", &reversed, StageSize::Percent(10.0)),
            s10
        );
        // Another rollout picks other canaries (not the first ids, not the same five).
        let other = stage_devices("r2", &devices, StageSize::Percent(10.0));
        assert_ne!(other, s10);
        assert_ne!(
            s10,
            vec!["dev-000", "dev-001", "dev-002", "dev-003", "dev-004"]
        );
    }

    #[test]
    fn a_device_joining_mid_rollout_takes_its_rank_and_nobody_else_moves() {
        let ids = fleet(30);
        let devices: Vec<(&str, Option<&str>)> = ids.iter().map(|d| (d.as_str(), None)).collect();
        let before = order("r1", &devices);
        let mut with_new = devices.clone();
        with_new.push(("dev-new", None));
        let after = order("r1", &with_new);
        let without_new: Vec<&str> = after.iter().copied().filter(|d| *d != "dev-new").collect();
        assert_eq!(
            without_new, before,
            "existing devices keep their relative order"
        );
    }

    #[test]
    fn a_spread_label_puts_one_device_of_each_value_first() {
        let ids = fleet(40);
        let sites = ["berlin", "paris", "oslo", "rome"];
        let devices: Vec<(&str, Option<&str>)> = ids
            .iter()
            .enumerate()
            .map(|(i, d)| (d.as_str(), Some(sites[i % 4])))
            .collect();
        let site_of = |id: &str| devices.iter().find(|(d, _)| *d == id).unwrap().1.unwrap();
        let canaries = stage_devices("r1", &devices, StageSize::Count(4));
        let mut covered: Vec<&str> = canaries.iter().map(|d| site_of(d)).collect();
        covered.sort_unstable();
        assert_eq!(covered, vec!["berlin", "oslo", "paris", "rome"]);
        // The next four are again one per site.
        let eight = stage_devices("r1", &devices, StageSize::Count(8));
        let mut second: Vec<&str> = eight[4..].iter().map(|d| site_of(d)).collect();
        second.sort_unstable();
        assert_eq!(second, vec!["berlin", "oslo", "paris", "rome"]);
        // Uneven groups: a site with one device is used up after the first round.
        let uneven: Vec<(&str, Option<&str>)> = vec![
            ("a1", Some("a")),
            ("b1", Some("b")),
            ("b2", Some("b")),
            ("b3", Some("b")),
        ];
        let ordered = order("r1", &uneven);
        assert_eq!(ordered.len(), 4);
        assert!(ordered[..2].contains(&"a1"));
    }
}
