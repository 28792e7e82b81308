//! The drift monitor in a real agent process: a model signed with its reference profile is
//! installed over the broker (the profile fetched by digest like the artifact), every
//! inference feeds the monitor, and closed windows reach the server through the outbox:
//! unshifted traffic is not flagged, traffic with the most important feature shifted by 1σ is.

mod common;
#[path = "drift_harness/mod.rs"]
mod drift_harness;

use std::time::{Duration, Instant};

use common::agent::{log_tail, write_config, Agent};
use common::receiver::Receiver;
use common::{sample_manifest, Control, Faults, Responder};
use fleet_protocol::drift::DriftWindow;
use fleet_protocol::outbox::ItemBody;
use fleet_protocol::Sha256Digest;
use serde_json::json;

/// Rows per request: the API takes batches, the monitor counts rows.
const BATCH: usize = 32;

/// Sends `rows` rows of `data` (row-major, 64 features) in batches; panics on any failure.
fn serve_rows(api_port: u16, data: &[f32], cols: usize, rows: usize, offset: usize) {
    let available = data.len() / cols;
    let mut sent = 0;
    while sent < rows {
        let n = BATCH.min(rows - sent);
        let values: Vec<f32> = (0..n)
            .flat_map(|i| {
                let row = (offset + sent + i) % available;
                data[row * cols..(row + 1) * cols].iter().copied()
            })
            .collect();
        let body = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [n, cols], "data": values}]});
        let (status, text) = common::http(
            api_port,
            "POST",
            "/v2/models/digits-mlp/infer",
            body.to_string().as_bytes(),
        );
        assert_eq!(status, 200, "{text}");
        sent += n;
    }
}

fn drift_windows(receiver: &Receiver) -> Vec<DriftWindow> {
    receiver
        .items
        .lock()
        .unwrap()
        .values()
        .filter_map(|item| match &item.body {
            ItemBody::Drift(w) => Some(w.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_windows_reach_the_server_and_a_shift_is_flagged() {
    for broker in common::brokers("drift_windows_reach_the_server_and_a_shift_is_flagged") {
        eprintln!("broker: {}", broker.name);
        let device = "dev-drift";
        let dir = tempfile::tempdir().unwrap();
        let api_port = common::free_port();
        write_config(
            dir.path(),
            device,
            broker.port,
            api_port,
            "[telemetry]\ninterval_secs = 1\n[sampler]\nenabled = false",
        );
        let (onnx, mut manifest) = sample_manifest("digits-mlp", "v2", 1);
        let profile = std::fs::read(common::models_dir().join("digits-mlp/v2.profile.json"))
            .expect("the committed profile");
        manifest.profile_sha256 = Some(Sha256Digest::of(&profile));
        manifest.profile_size = Some(profile.len() as u64);
        let responder = Responder::start(broker.port, Faults::default()).await;
        responder.add(onnx);
        responder.add(profile.clone());
        let receiver = Receiver::start(broker.port, device, Vec::new()).await;
        let mut control = Control::start(broker.port, device).await;
        let agent = Agent::start(dir.path());
        control.wait_for("the agent's first state", |_| true).await;
        control.install(device, 1, &manifest, false).await;
        let stored = dir.path().join("data/models/digits-mlp/v2/profile.json");
        assert_eq!(
            std::fs::read(&stored).expect("the profile is stored beside the model"),
            profile
        );

        let data = drift_harness::models_dir().join("../models/data/digits");
        let (_, cols, holdout) = drift_harness::read_npy(&data.join("holdout.X.npy"));
        let (_, _, shifted) = drift_harness::read_npy(&data.join("shift-mean.X.npy"));
        // Two short windows of unshifted traffic, then two of shifted traffic.
        serve_rows(api_port, &holdout, cols, 512, 0);
        serve_rows(api_port, &shifted, cols, 512, 0);

        // The monitor may close a short window early on a CUSUM alarm (and the last one stays
        // open until it fills or an hour passes), so judge by the samples each window covers:
        // the windows within the first 512 (unshifted) must pass; one after them must be
        // flagged.
        let judge = |windows: &[DriftWindow]| {
            let mut short: Vec<&DriftWindow> = windows.iter().filter(|w| w.window == 256).collect();
            short.sort_by_key(|w| w.started_at_ms);
            let mut seen = 0u64;
            let (mut clean_flagged, mut shifted_flagged) = (false, false);
            for w in &short {
                if seen + w.samples <= 512 {
                    clean_flagged |= w.drifted;
                } else if seen >= 512 {
                    shifted_flagged |= w.drifted;
                }
                seen += w.samples;
            }
            (seen, clean_flagged, shifted_flagged)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let windows = loop {
            let windows = drift_windows(&receiver);
            let (seen, _, shifted_flagged) = judge(&windows);
            if (seen > 512 && shifted_flagged) || Instant::now() > deadline {
                break windows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for w in &windows {
            assert_eq!((w.model.as_str(), w.release), ("digits-mlp", 1));
            assert_eq!(w.features.len(), 64, "one entry per pixel");
        }
        let summary: Vec<(u32, u64, bool)> = windows
            .iter()
            .map(|w| (w.window, w.samples, w.drifted))
            .collect();
        eprintln!("windows (length, samples, drifted): {summary:?}");
        let (seen, clean_flagged, shifted_flagged) = judge(&windows);
        assert!(!clean_flagged, "unshifted traffic was flagged: {summary:?}");
        assert!(
            shifted_flagged,
            "a 1σ mean shift was not flagged ({seen} samples in closed windows): {summary:?}\n{}",
            log_tail(dir.path())
        );
        agent.kill();
    }
}
