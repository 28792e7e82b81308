//! The agent never ends up without a working model: a real `edge-agent` process is killed
//! with SIGKILL mid-download and around activation, switched under load, and made to roll
//! back a version that breaks its clients. A real broker carries every message.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent::{
    active_version, infer, infer_matches_self_test, model, wait_for_api, write_config, Agent,
};
use common::{directive, onnx, sample_manifest, sign_manifest, Control, Faults, Responder};
use edge_agent::runtime::Plan;
use fleet_protocol::tensor::compare_outputs;
use fleet_protocol::{InstallPhase, Manifest, Tensor};

/// Reference plans for the versions a test switches between: what each must answer to a
/// given input, whichever of them the agent happens to serve.
struct Reference {
    plans: BTreeMap<String, (Plan, Manifest)>,
}

impl Reference {
    fn new(models: &[(&[u8], &Manifest)]) -> Reference {
        let plans = models
            .iter()
            .map(|(onnx, manifest)| {
                let plan = Plan::load(onnx, &manifest.inputs).unwrap();
                (manifest.version.to_string(), (plan, (*manifest).clone()))
            })
            .collect();
        Reference { plans }
    }

    /// Checks that `outputs` are what `version` computes for `inputs`.
    fn check(&self, version: &str, inputs: &[Tensor], outputs: &[Tensor]) -> Result<(), String> {
        let (plan, manifest) = self
            .plans
            .get(version)
            .ok_or_else(|| format!("version {version:?} answered, which was never installed"))?;
        let expected = plan.run(inputs).map_err(|e| e.to_string())?;
        compare_outputs(&expected, outputs, manifest.self_test.tolerance)
            .map_err(|e| format!("{version}: {e}"))
    }
}

fn seed() -> u64 {
    let seed = std::env::var("DRIFTGATE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("random instants from seed {seed} (DRIFTGATE_TEST_SEED={seed} repeats them)");
    seed
}

fn staging_files(dir: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(dir.join("data/staging")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_killed_midway_resumes_from_where_it_stopped() {
    for broker in common::brokers("a_download_killed_midway_resumes_from_where_it_stopped") {
        eprintln!("broker: {}", broker.name);
        let device = "dev-resume";
        let dir = tempfile::tempdir().unwrap();
        let api_port = common::free_port();
        write_config(
            dir.path(),
            device,
            broker.port,
            api_port,
            "[fetch]\nchunk_bytes = 65536\nwindow = 4\nrequest_timeout_ms = 2000",
        );
        // About 6 MiB, served slowly enough (one 64 KiB reply per 8 ms) to stop it midway.
        let onnx = onnx::dense_mlp(384, 4096, 7);
        let size = onnx.len() as u64;
        assert!(size > 6_000_000, "a multi-megabyte artifact: {size} bytes");
        let manifest = onnx::manifest_for(&onnx, "dense", "v1", 1);
        let faults = Faults {
            reply_delay: Duration::from_millis(8),
            ..Default::default()
        };
        let responder = Responder::start(broker.port, faults).await;
        responder.add(onnx.clone());
        let mut control = Control::start(broker.port, device).await;

        let agent = Agent::start(dir.path());
        control.wait_for("the agent's first state", |_| true).await;
        control
            .publish_directive(
                device,
                directive(device, 1, vec![(sign_manifest(&manifest), false)]),
            )
            .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while responder.served.load(Ordering::Relaxed) < size / 3 {
            assert!(Instant::now() < deadline, "the download never got going");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        agent.kill();
        // Replies to requests already in flight are still counted as the first run's.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let first = responder.served.swap(0, Ordering::Relaxed);
        let staged = staging_files(dir.path());
        eprintln!("killed after {first} of {size} bytes were served; staging: {staged:?}");
        assert!(first < size, "the kill came too late to interrupt anything");
        assert!(
            staged.iter().any(|(_, len)| *len > 0 && *len < size),
            "a partial staging file survives the kill: {staged:?}"
        );

        let _agent = Agent::start(dir.path());
        control
            .wait_for("the resumed install active", |s| {
                active_version(s, "dense").as_deref() == Some("v1")
            })
            .await;
        let second = responder.served.load(Ordering::Relaxed);
        eprintln!(
            "after the restart {second} bytes were fetched ({:.0} % of the artifact)",
            second as f64 * 100.0 / size as f64
        );
        assert!(
            second < size,
            "the restarted agent fetched {second} bytes of {size}: it did not resume"
        );
        infer_matches_self_test(api_port, &manifest);
        assert!(
            staging_files(dir.path()).is_empty(),
            "the staging file is gone once installed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_around_activation_never_leaves_a_partial_version() {
    for broker in common::brokers("sigkill_around_activation_never_leaves_a_partial_version") {
        eprintln!("broker: {}", broker.name);
        let device = "dev-kill";
        let dir = tempfile::tempdir().unwrap();
        let api_port = common::free_port();
        write_config(dir.path(), device, broker.port, api_port, "");
        let (v1_bytes, v1) = sample_manifest("digits-mlp", "v1", 1);
        let (v2_bytes, v2) = sample_manifest("digits-mlp", "v2", 2);
        let reference = Reference::new(&[(&v1_bytes, &v1), (&v2_bytes, &v2)]);
        let responder = Responder::start(broker.port, Faults::default()).await;
        responder.add(v1_bytes.clone());
        responder.add(v2_bytes.clone());
        let mut control = Control::start(broker.port, device).await;

        let mut agent = Agent::start(dir.path());
        control.wait_for("the agent's first state", |_| true).await;
        control.install(device, 1, &v1, false).await;
        control.install(device, 2, &v2, false).await;
        // How long a switch between two stored versions takes, from the directive to the new
        // version reported active. The pointer flips early in that span (the rest is pruning,
        // re-listing and reporting), so the kills are spread over its first half.
        let started = Instant::now();
        control.install(device, 3, &v1, true).await;
        let switch = started.elapsed();
        eprintln!("one switch takes {switch:?}");

        let mut rng = fastrand::Rng::with_seed(seed());
        let rounds = 30;
        let mut answered_by = BTreeMap::<String, u32>::new();
        let mut on_disk = BTreeMap::<&str, u32>::new();
        for round in 0..rounds {
            let seq = 4 + round as u64;
            // Alternate between v2 and v1 (a signed rollback).
            let rollback = round % 2 == 1;
            let (target, previous) = if rollback { (&v1, &v2) } else { (&v2, &v1) };
            control
                .publish_directive(
                    device,
                    directive(device, seq, vec![(sign_manifest(target), rollback)]),
                )
                .await;
            let delay = Duration::from_micros(rng.u64(0..=switch.as_micros() as u64 / 2));
            tokio::time::sleep(delay).await;
            agent.kill();
            // What the kill left on disk: the pointer names one whole version or the other.
            let pointer = std::fs::read(dir.path().join("data/models/digits-mlp/ACTIVE.json"))
                .expect("the active pointer survives every kill");
            let pointer: edge_agent::store::ActivePointer = serde_json::from_slice(&pointer)
                .unwrap_or_else(|e| panic!("round {round}: a torn pointer: {e}"));
            *on_disk
                .entry(if pointer.active == target.version {
                    "switched"
                } else {
                    "not yet"
                })
                .or_default() += 1;
            agent = Agent::start(dir.path());
            wait_for_api(api_port);

            // At once, before the agent has done anything else: a whole version answers.
            let probe = &v1.self_test.inputs;
            let (status, version, outputs, text) = infer(api_port, &v1);
            assert_eq!(status, 200, "round {round}: {text}");
            let version = version.unwrap();
            assert!(
                version == target.version.as_str() || version == previous.version.as_str(),
                "round {round}: {version} answered"
            );
            reference
                .check(&version, probe, &outputs)
                .unwrap_or_else(|e| panic!("round {round}, killed after {delay:?}: {e}"));
            *answered_by
                .entry(if version == target.version.as_str() {
                    "new".to_string()
                } else {
                    "old".to_string()
                })
                .or_default() += 1;

            // And the interrupted switch completes after the restart.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (status, version, outputs, text) = infer(api_port, &v1);
                assert_eq!(status, 200, "round {round}: {text}");
                let version = version.unwrap();
                reference.check(&version, probe, &outputs).unwrap();
                if version == target.version.as_str() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: {} never became active after the restart; the agent's log:\n{}",
                    target.version,
                    common::agent::log_tail(dir.path())
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        eprintln!(
            "{rounds} kills; the pointer on disk after the kill: {on_disk:?}; right after the restart the API answered with: {answered_by:?}"
        );
        drop(agent);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_versions_under_load_fails_no_request() {
    for broker in common::brokers("switching_versions_under_load_fails_no_request") {
        eprintln!("broker: {}", broker.name);
        let device = "dev-hotswap";
        let dir = tempfile::tempdir().unwrap();
        let api_port = common::free_port();
        write_config(dir.path(), device, broker.port, api_port, "");
        let (v1_bytes, v1) = sample_manifest("digits-mlp", "v1", 1);
        let (v2_bytes, v2) = sample_manifest("digits-mlp", "v2", 2);
        let reference = Arc::new(Reference::new(&[(&v1_bytes, &v1), (&v2_bytes, &v2)]));
        let responder = Responder::start(broker.port, Faults::default()).await;
        responder.add(v1_bytes.clone());
        responder.add(v2_bytes.clone());
        let mut control = Control::start(broker.port, device).await;
        let _agent = Agent::start(dir.path());
        control.wait_for("the agent's first state", |_| true).await;
        control.install(device, 1, &v1, false).await;

        // Two clients send requests back to back for the whole test.
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (stop, reference, probe) = (stop.clone(), reference.clone(), v1.clone());
                std::thread::spawn(move || {
                    let mut by_version = BTreeMap::<String, u64>::new();
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let (status, version, outputs, text) = infer(api_port, &probe);
                        match version {
                            Some(version) if status == 200 => {
                                if let Err(e) =
                                    reference.check(&version, &probe.self_test.inputs, &outputs)
                                {
                                    failures.push(e);
                                }
                                *by_version.entry(version).or_default() += 1;
                            }
                            _ => failures.push(format!("{status}: {text}")),
                        }
                    }
                    (by_version, failures)
                })
            })
            .collect();

        let switches = 6;
        for i in 0..switches {
            let seq = 2 + i as u64;
            let (target, rollback) = if i % 2 == 0 {
                (&v2, false)
            } else {
                (&v1, true)
            };
            control
                .publish_directive(
                    device,
                    directive(device, seq, vec![(sign_manifest(target), rollback)]),
                )
                .await;
            control
                .wait_for("the switch", |s| {
                    s.directive_seq == Some(seq)
                        && active_version(s, "digits-mlp").as_deref()
                            == Some(target.version.as_str())
                })
                .await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut by_version = BTreeMap::<String, u64>::new();
        let mut failures = Vec::new();
        for client in clients {
            let (counts, failed) = client.join().unwrap();
            for (version, n) in counts {
                *by_version.entry(version).or_default() += n;
            }
            failures.extend(failed);
        }
        let total: u64 = by_version.values().sum();
        eprintln!("{total} requests across {switches} switches, answered by {by_version:?}");
        assert!(
            failures.is_empty(),
            "{} of {} requests failed, first: {}",
            failures.len(),
            total + failures.len() as u64,
            failures[0]
        );
        assert!(by_version.len() == 2 && total >= 100, "{by_version:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_breaks_its_clients_is_rolled_back_on_probation() {
    for broker in common::brokers("a_version_that_breaks_its_clients_is_rolled_back_on_probation") {
        eprintln!("broker: {}", broker.name);
        let device = "dev-probation";
        let dir = tempfile::tempdir().unwrap();
        let api_port = common::free_port();
        write_config(
            dir.path(),
            device,
            broker.port,
            api_port,
            "[probation]\ninferences = 100\nseconds = 60\nmax_error_rate = 0.05",
        );
        let (v2_bytes, v2) = sample_manifest("digits-mlp", "v2", 2);
        // v4 passes its own self-test but takes 8×8 images where v2 took 64 features: every
        // client of v2 now gets a 400.
        let (v4_bytes, mut v4) = sample_manifest("digits-cnn", "v1", 4);
        v4.name = v2.name.clone();
        v4.version = fleet_protocol::ModelVersion::new("v4").unwrap();
        let responder = Responder::start(broker.port, Faults::default()).await;
        responder.add(v2_bytes);
        responder.add(v4_bytes);
        let mut control = Control::start(broker.port, device).await;
        let agent = Agent::start(dir.path());
        control.wait_for("the agent's first state", |_| true).await;
        control.install(device, 1, &v2, false).await;
        control.install(device, 2, &v4, false).await;
        infer_matches_self_test(api_port, &v4);

        // v2's clients keep sending v2's requests. v4 refuses each; once probation has judged
        // (10 calls at least, checked every second) v2 is back and answers them. On a slow
        // machine (qemu) that can happen before the 20th request, so the answers are a run of
        // 400s, then only v2's 200s.
        let mut refused = 0;
        let mut answered_by_v2 = 0;
        for i in 0..20 {
            let (status, version, _, text) = infer(api_port, &v2);
            match status {
                400 if answered_by_v2 == 0 => refused += 1,
                200 if version.as_deref() == Some("v2") => answered_by_v2 += 1,
                _ => panic!("request {i}: {status} from {version:?} after {refused} refusals and {answered_by_v2} answers from v2: {text}"),
            }
        }
        assert!(
            refused >= 9,
            "v4 refuses v2's requests: {refused} refused before the rollback"
        );
        let state = control
            .wait_for("the local rollback", |s| {
                matches!(
                    model(s, "digits-mlp").map(|m| &m.phase),
                    Some(InstallPhase::RolledBack { .. })
                )
            })
            .await;
        let m = model(&state, "digits-mlp").unwrap();
        eprintln!("reported: {:?}", m.phase);
        let InstallPhase::RolledBack { reason } = &m.phase else {
            unreachable!()
        };
        assert!(reason.contains("inferences failed"), "{reason}");
        assert_eq!(active_version(&state, "digits-mlp").as_deref(), Some("v2"));
        assert_eq!(m.previous.as_ref().map(|p| p.version.as_str()), Some("v4"));
        infer_matches_self_test(api_port, &v2);
        let (_, metrics) = common::http(api_port, "GET", "/metrics", b"");
        assert!(
            metrics.contains(r#"driftgate_installs_total{outcome="rolled_back"} 1"#),
            "{metrics}"
        );

        // The rollback outlives a restart: the directive naming v4 is settled, not redone.
        agent.kill();
        let _agent = Agent::start(dir.path());
        wait_for_api(api_port);
        tokio::time::sleep(Duration::from_millis(500)).await;
        infer_matches_self_test(api_port, &v2);
    }
}
