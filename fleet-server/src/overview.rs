//! The fleet at a glance, for the console's overview and for filtered device lists: computed
//! from the device records and the assignments in one pass, so that a fleet of thousands of
//! devices is summarised on the server instead of shipped whole to every browser tab.
//!
//! Pure: no I/O.

use std::collections::BTreeMap;

use fleet_protocol::state::InstallPhase;
use fleet_protocol::State;
use serde::Serialize;

use crate::store::DeviceRecord;

/// How a device stands against its assignment for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compliance {
    /// The assigned version is active.
    OnTarget,
    /// Downloading, verifying, staging or self-testing.
    Updating,
    /// The last install failed or was rolled back on the device.
    Failed,
    /// Something else is active (or nothing), and no install is in progress: offline, or the
    /// directive has not arrived yet.
    Behind,
}

/// Counts per presence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceCounts {
    pub total: u64,
    pub online: u64,
    pub offline: u64,
    /// Enrolled but never connected.
    pub never_seen: u64,
    pub revoked: u64,
}

/// One model across the fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModelOverview {
    pub model: String,
    /// Devices with each version active.
    pub running: BTreeMap<String, u64>,
    /// Devices assigned each version.
    pub assigned: BTreeMap<String, u64>,
    /// Assigned devices by how they stand.
    pub compliance: BTreeMap<Compliance, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FleetOverview {
    pub devices: DeviceCounts,
    pub models: Vec<ModelOverview>,
}

fn reported(device: &DeviceRecord) -> Option<State> {
    serde_json::from_value(device.state.clone()?).ok()
}

/// The version of `model` active on the device, from its reported state.
pub fn active_version(device: &DeviceRecord, model: &str) -> Option<String> {
    reported(device)?
        .models
        .into_iter()
        .find(|m| m.name.as_str() == model)?
        .active
        .map(|a| a.version.as_str().to_string())
}

/// How a device stands against an assignment of `model` to `target`.
pub fn compliance(state: Option<&State>, model: &str, target: &str) -> Compliance {
    let Some(entry) = state.and_then(|s| s.models.iter().find(|m| m.name.as_str() == model)) else {
        return Compliance::Behind;
    };
    match entry.phase {
        InstallPhase::Failed { .. } | InstallPhase::RolledBack { .. } => Compliance::Failed,
        InstallPhase::Downloading { .. }
        | InstallPhase::Verifying
        | InstallPhase::Staging
        | InstallPhase::SelfTest => Compliance::Updating,
        InstallPhase::Idle | InstallPhase::Active => {
            if entry.active.as_ref().map(|a| a.version.as_str()) == Some(target) {
                Compliance::OnTarget
            } else {
                Compliance::Behind
            }
        }
    }
}

/// The overview of `devices`, given every assignment as (device, model, version).
pub fn overview(
    devices: &[DeviceRecord],
    assignments: &[(String, String, String)],
) -> FleetOverview {
    let mut out = FleetOverview::default();
    let mut models: BTreeMap<String, ModelOverview> = BTreeMap::new();
    let mut states: BTreeMap<&str, Option<State>> = BTreeMap::new();
    for d in devices {
        out.devices.total += 1;
        if d.revoked_at_ms.is_some() {
            out.devices.revoked += 1;
            continue;
        }
        match d.presence.as_deref() {
            Some("online") => out.devices.online += 1,
            Some(_) => out.devices.offline += 1,
            None => out.devices.never_seen += 1,
        }
        let state = reported(d);
        if let Some(s) = &state {
            for m in &s.models {
                if let Some(active) = &m.active {
                    let entry = models.entry(m.name.as_str().to_string()).or_default();
                    *entry
                        .running
                        .entry(active.version.as_str().to_string())
                        .or_default() += 1;
                }
            }
        }
        states.insert(d.id.as_str(), state);
    }
    for (device, model, version) in assignments {
        // Revoked devices (not in `states`) no longer count against anything.
        let Some(state) = states.get(device.as_str()) else {
            continue;
        };
        let entry = models.entry(model.clone()).or_default();
        *entry.assigned.entry(version.clone()).or_default() += 1;
        *entry
            .compliance
            .entry(compliance(state.as_ref(), model, version))
            .or_default() += 1;
    }
    out.models = models
        .into_iter()
        .map(|(name, mut m)| {
            m.model = name;
            m
        })
        .collect();
    out
}

/// Which devices a list asks for.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    /// `key=value` labels, all of which must match.
    pub labels: Vec<(String, String)>,
    /// `online`, `offline`, `never_seen` or `revoked`.
    pub presence: Option<String>,
    /// Devices with this model active (with `version`: that version of it).
    pub model: Option<String>,
    pub version: Option<String>,
    /// A part of the device id.
    pub search: Option<String>,
}

impl DeviceFilter {
    /// Parses `k=v,k2=v2`.
    pub fn parse_labels(text: &str) -> Result<Vec<(String, String)>, String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_string(), v.trim().to_string()))
                }
                _ => Err(format!("label filter {pair:?} is not key=value")),
            })
            .collect()
    }

    pub fn matches(&self, d: &DeviceRecord) -> bool {
        if !self
            .labels
            .iter()
            .all(|(k, v)| d.labels.get(k).is_some_and(|have| have == v))
        {
            return false;
        }
        if let Some(p) = &self.presence {
            let presence = if d.revoked_at_ms.is_some() {
                "revoked"
            } else {
                d.presence.as_deref().unwrap_or("never_seen")
            };
            if presence != p {
                return false;
            }
        }
        if let Some(model) = &self.model {
            match (active_version(d, model), &self.version) {
                (None, _) => return false,
                (Some(have), Some(want)) if &have != want => return false,
                _ => {}
            }
        }
        if let Some(s) = &self.search {
            if !d.id.to_lowercase().contains(&s.to_lowercase()) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn device(id: &str, presence: Option<&str>, models: serde_json::Value) -> DeviceRecord {
        DeviceRecord {
            id: id.into(),
            labels: BTreeMap::from([("site".to_string(), "oslo".to_string())]),
            cert_serial: String::new(),
            cert_not_after_ms: 0,
            enrolled_at_ms: 0,
            revoked_at_ms: None,
            directive_seq: 0,
            presence: presence.map(str::to_string),
            presence_at_ms: None,
            agent_version: None,
            state: Some(
                json!({"v": 1, "device": id, "agent_version": "0.1.0", "at_ms": 0,
                               "models": models}),
            ),
            state_at_ms: None,
            health: None,
            health_at_ms: None,
            acked_up_to: 0,
        }
    }

    fn model(active: Option<&str>, phase: serde_json::Value) -> serde_json::Value {
        let r = |v: &str| json!({"release": 1, "version": v, "sha256": "00".repeat(32)});
        json!({"name": "m", "active": active.map(r), "phase": phase})
    }

    #[test]
    fn every_assigned_device_is_counted_once_by_how_it_stands() {
        let devices = vec![
            device(
                "a",
                Some("online"),
                json!([model(Some("v2"), json!({"phase": "active"}))]),
            ),
            device(
                "b",
                Some("online"),
                json!([model(
                    Some("v1"),
                    json!({"phase": "downloading", "received": 1, "total": 2})
                )]),
            ),
            device(
                "c",
                Some("offline"),
                json!([model(
                    Some("v1"),
                    json!({"phase": "failed", "reason": "self-test"})
                )]),
            ),
            device(
                "d",
                Some("offline"),
                json!([model(Some("v1"), json!({"phase": "idle"}))]),
            ),
            device("e", None, json!([])),
            DeviceRecord {
                revoked_at_ms: Some(1),
                ..device("f", Some("online"), json!([]))
            },
        ];
        let assignments: Vec<(String, String, String)> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|d| (d.to_string(), "m".to_string(), "v2".to_string()))
            .collect();
        let o = overview(&devices, &assignments);
        assert_eq!(
            o.devices,
            DeviceCounts {
                total: 6,
                online: 2,
                offline: 2,
                never_seen: 1,
                revoked: 1
            }
        );
        let m = &o.models[0];
        assert_eq!(
            m.running,
            BTreeMap::from([("v1".into(), 3), ("v2".into(), 1)])
        );
        assert_eq!(m.assigned, BTreeMap::from([("v2".into(), 5)]));
        assert_eq!(
            m.compliance,
            BTreeMap::from([
                (Compliance::OnTarget, 1),
                (Compliance::Updating, 1),
                (Compliance::Failed, 1),
                (Compliance::Behind, 2),
            ])
        );
    }

    #[test]
    fn filters_combine_labels_presence_version_and_search() {
        let a = device(
            "edge-a",
            Some("online"),
            json!([model(Some("v2"), json!({"phase": "active"}))]),
        );
        let b = device(
            "edge-b",
            Some("offline"),
            json!([model(Some("v1"), json!({"phase": "idle"}))]),
        );
        let f = |filter: DeviceFilter| -> Vec<String> {
            [&a, &b]
                .iter()
                .filter(|d| filter.matches(d))
                .map(|d| d.id.clone())
                .collect()
        };
        let labels = DeviceFilter::parse_labels("site=oslo").unwrap();
        assert_eq!(
            f(DeviceFilter {
                labels,
                ..Default::default()
            })
            .len(),
            2
        );
        let labels = DeviceFilter::parse_labels("site=rome").unwrap();
        assert!(f(DeviceFilter {
            labels,
            ..Default::default()
        })
        .is_empty());
        assert_eq!(
            f(DeviceFilter {
                presence: Some("offline".into()),
                ..Default::default()
            }),
            ["edge-b"]
        );
        assert_eq!(
            f(DeviceFilter {
                model: Some("m".into()),
                version: Some("v2".into()),
                ..Default::default()
            }),
            ["edge-a"]
        );
        assert_eq!(
            f(DeviceFilter {
                search: Some("-B".into()),
                ..Default::default()
            }),
            ["edge-b"]
        );
        assert!(DeviceFilter::parse_labels("site").is_err());
    }
}
