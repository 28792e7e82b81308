//! A stream that keeps alarming (here the same 8 rows over and over, as from a stuck sensor)
//! must not flood the outbox: CUSUM alarms close a short window early at most once per
//! short-window length, so windows stay within twice the rows / 256, every row is in exactly
//! one closed or open short window, and every closed window is flagged.

mod common;

use fleet_protocol::Sha256Digest;

#[test]
fn a_stuck_input_stream_closes_a_bounded_number_of_windows() {
    let (onnx, mut manifest) = common::sample_manifest("cancer-logreg", "v1", 1);
    let profile = std::fs::read(common::models_dir().join("cancer-logreg/v1.profile.json"))
        .expect("the committed profile");
    manifest.profile_sha256 = Some(Sha256Digest::of(&profile));
    manifest.profile_size = Some(profile.len() as u64);
    let mut monitor = edge_agent::drift::DriftMonitor::from_manifest(&manifest, &profile).unwrap();
    let signature = edge_agent::runtime::inspect(&onnx).unwrap();
    let plan = edge_agent::runtime::Plan::load(&onnx, &signature.inputs).unwrap();
    let inputs = manifest.self_test.inputs.clone();
    let outputs = plan.run(&inputs).unwrap();
    let rows_per_batch = inputs[0].shape[0];
    let batches = 10_000u64;
    let (mut short_windows, mut short_rows, mut bytes, mut flagged) = (0u64, 0u64, 0usize, 0u64);
    for i in 0..batches {
        for window in monitor.observe(&inputs, &outputs, i as i64) {
            bytes += serde_json::to_vec(&window).unwrap().len();
            flagged += u64::from(window.drifted);
            if window.window == 256 {
                short_windows += 1;
                short_rows += window.samples;
            }
        }
    }
    let rows = batches * rows_per_batch;
    eprintln!(
        "{rows} stuck rows: {short_windows} short windows holding {short_rows} rows, \
         {flagged} flagged windows, {bytes} bytes of windows"
    );
    assert!(
        short_windows <= 2 * rows / 256 + 1,
        "{short_windows} windows for {rows} rows"
    );
    assert!(
        rows - short_rows < 256,
        "every row but the open window's is in a closed one"
    );
    assert!(flagged > 0 && bytes < 8 << 20);
}
