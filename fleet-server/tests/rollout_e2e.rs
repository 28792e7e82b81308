//! The staged rollout end to end, with 20 real agents (issue 6, acceptance 2).
//!
//! This is `fleet-server demo --agents 20 --stages 10,50,100` run in-process: the server with
//! its embedded broker and SQLite, twenty `edge-agent`s each with its own data dir, inference
//! API and mutual-TLS MQTT session, every one of them under an application load. v1 reaches
//! every device; v2 goes out in stages of 10 %, 50 % and 100 %, each judged on the devices'
//! own figures; then v3, much slower, fails its canary's latency gate and the fleet rolls back
//! to v2 on its own. Beyond the demo's own checks, this test reads the audit log: every
//! decision must carry the figures behind it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use fleet_server::demo::{self, DemoOptions};
use fleet_server::store::AuditEntry;
use serde_json::Value;

const AGENTS: usize = 20;

fn entries<'a>(audit: &'a [AuditEntry], rollout: &str, action: &str) -> Vec<&'a AuditEntry> {
    audit
        .iter()
        .filter(|e| e.rollout.as_deref() == Some(rollout) && e.action == action)
        .collect()
}

/// A gate decision names its stage, the install counts, the measured figures and, per gate,
/// the figure, the limit and whether it held.
fn assert_has_figures(e: &AuditEntry) {
    let d = &e.details;
    assert!(d["stage"].as_u64().is_some(), "no stage in {d}");
    assert!(d["installs"].is_object(), "no install counts in {d}");
    let figures = &d["figures"];
    assert!(
        figures["devices_reporting"].as_u64().unwrap_or(0) >= 1,
        "no reporting devices in {figures}"
    );
    assert!(
        figures["inferences"].as_u64().unwrap_or(0) > 0,
        "no inferences behind the decision: {figures}"
    );
    let checks = d["checks"].as_array().expect("checks");
    let gates: BTreeSet<&str> = checks.iter().filter_map(|c| c["gate"].as_str()).collect();
    for gate in [
        "install_success_pct",
        "devices_reporting",
        "error_rate_pct",
        "p95_ratio",
        "drift_score",
    ] {
        assert!(gates.contains(gate), "{gate} not judged in {d}");
    }
    for check in checks {
        assert!(check["passed"].is_boolean(), "{check}");
        assert!(check["limit"].is_number(), "no limit in {check}");
        // A gate that was judged has its figure (p95_ratio is only skipped without a baseline).
        assert!(
            check["value"].is_number() || check["gate"] == "p95_ratio",
            "no figure in {check}"
        );
    }
}

fn failed_gates(e: &AuditEntry) -> Vec<String> {
    e.details["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["passed"] == Value::Bool(false))
        .filter_map(|c| c["gate"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_agents_stage_v2_then_roll_back_the_bad_v3() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = DemoOptions::new(
        AGENTS,
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")),
    );
    options.dir = Some(dir.path().join("demo"));
    options.api_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    options.stages = vec![10.0, 50.0, 100.0];
    // Twenty agents share two cores with the server: the same total load as the demo's five.
    options.requests_per_second = 10;
    options.soak_secs = 8;
    let report = demo::run(options).await.expect("the demo ran");

    for (check, ok) in &report.checks {
        println!("{} {check}", if *ok { "ok  " } else { "FAIL" });
    }
    assert!(report.ok(), "some step did not behave: {:?}", report.checks);
    let [r1, r2, r3] = report.rollouts.as_slice() else {
        panic!("three rollouts expected: {:?}", report.rollouts)
    };
    let audit = &report.audit;

    // v1 and v2 reached every device; v2 stage by stage: 2, then 10, then 20 devices.
    assert_eq!(entries(audit, r1, "completed").len(), 1);
    assert_eq!(entries(audit, r2, "completed").len(), 1);
    let reached: Vec<String> = entries(audit, r2, "devices_reached")
        .iter()
        .map(|e| e.message.clone())
        .collect();
    assert_eq!(reached.len(), 3, "{reached:#?}");
    for (message, total) in reached.iter().zip([2, 10, 20]) {
        assert!(
            message.contains(&format!("({total} of {AGENTS} selected devices now)")),
            "{message}"
        );
    }
    // The 10 % canary stage is spread across sites: its two devices are at two sites.
    let canaries = entries(audit, r2, "devices_reached")[0].details["devices"]
        .as_array()
        .expect("devices")
        .len();
    assert_eq!(canaries, 2);

    // Every v2 stage passed its gates, each decision with its figures.
    let passed = entries(audit, r2, "gates_passed");
    assert_eq!(passed.len(), 3);
    for (i, e) in passed.iter().enumerate() {
        assert_has_figures(e);
        assert_eq!(e.details["stage"], i + 1);
        assert!(failed_gates(e).is_empty(), "{}", e.message);
    }
    assert_eq!(passed[2].details["figures"]["devices_reporting"], AGENTS);

    // v3's canary failed on latency, against v2's on the same devices; the fleet went back.
    let failed = entries(audit, r3, "gates_failed");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_has_figures(failed[0]);
    assert_eq!(failed[0].details["stage"], 1);
    assert!(
        failed_gates(failed[0]).contains(&"p95_ratio".to_string()),
        "{}",
        failed[0].message
    );
    let figures = &failed[0].details["figures"];
    let (p95, previous) = (
        figures["p95_us"].as_f64().expect("p95"),
        figures["previous_p95_us"].as_f64().expect("previous p95"),
    );
    assert!(
        p95 > demo::MAX_P95_RATIO * previous,
        "v3 p95 {p95} µs against v2's {previous} µs"
    );
    let rolling_back = entries(audit, r3, "rolling_back");
    assert_eq!(rolling_back.len(), 1);
    for device in rolling_back[0].details["devices"]
        .as_array()
        .expect("devices")
    {
        assert_eq!(device["back_to"], "v2", "{device}");
    }
    assert_eq!(entries(audit, r3, "rolled_back").len(), 1);
    assert!(entries(audit, r3, "completed").is_empty());

    // Every device ends on the previous version.
    assert_eq!(report.versions.len(), AGENTS);
    for (device, version) in &report.versions {
        assert_eq!(version.as_deref(), Some("v2"), "{device}");
    }
}
