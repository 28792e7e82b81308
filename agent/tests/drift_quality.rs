//! Acceptance 4 of the drift issue, on the sample models' held-out and shifted data, through
//! the real `DriftMonitor` with tract's outputs and the committed profiles:
//!
//! - false alarms on unshifted streams ≤ 1 % of windows, per window length;
//! - a 1σ mean shift of the most important feature is flagged within 256 samples in ≥ 95 %
//!   of trials (switch at a random offset; the first drifted window or CUSUM alarm counts);
//! - Gaussian-noise and class-prior shifts are flagged (most windows).
//!
//! Seeded, so the figures are the same on every run; `cargo bench -p edge-agent --bench drift`
//! prints them in full.

mod drift_harness;

use drift_harness::{delay_quantile, stream, switch_trial, Sample};

const MEAN_SHIFT_TRIALS: usize = 100;

fn check(sample: &Sample, unshifted_long_windows: usize) {
    let label = sample.label;
    let long = *sample.profile.windows.last().unwrap();
    let samples = unshifted_long_windows * long as usize;
    let tally = stream(sample, &sample.holdout, samples, 32, 1);
    for &window in &sample.profile.windows {
        let (n, rate) = (tally.windows(window), tally.rate(window));
        eprintln!("{label}: false alarms, windows of {window}: {rate:.4} of {n}");
        assert!(n >= 300, "{label}: only {n} windows of {window}");
        assert!(
            rate <= 0.01,
            "{label}: {rate} of {n} windows of {window} flagged without a shift"
        );
    }

    let mut rng = fastrand::Rng::with_seed(2);
    let trials: Vec<_> = (0..MEAN_SHIFT_TRIALS)
        .map(|_| switch_trial(sample, &sample.shift_mean, 2048, &mut rng))
        .collect();
    let delays: Vec<Option<usize>> = trials.iter().map(|t| t.0).collect();
    let within = delays
        .iter()
        .filter(|d| d.is_some_and(|d| d <= 256))
        .count();
    eprintln!(
        "{label}: 1σ mean shift flagged within 256 samples in {within}/{MEAN_SHIFT_TRIALS} \
         trials; delay p50 {:?} p95 {:?}",
        delay_quantile(&delays, 0.5),
        delay_quantile(&delays, 0.95)
    );
    assert!(
        within * 100 >= 95 * MEAN_SHIFT_TRIALS,
        "{label}: {within}/{MEAN_SHIFT_TRIALS}"
    );

    for (what, rows) in [
        ("noise", &sample.shift_noise),
        ("prior", &sample.shift_prior),
    ] {
        let tally = stream(sample, rows, 8 * long as usize, 32, 3);
        for &window in &sample.profile.windows {
            let rate = tally.rate(window);
            eprintln!("{label}: {what} shift, windows of {window} flagged: {rate:.3}");
            assert!(
                rate >= 0.9,
                "{label}: {what} shift flagged in only {rate} of windows of {window}"
            );
        }
    }
}

#[test]
fn digits_mlp_v2() {
    check(
        &Sample::load("digits-mlp/v2", "digits-mlp", "v2", "digits"),
        300,
    );
}

#[test]
fn wine_forest_v1() {
    check(
        &Sample::load("wine-forest/v1", "wine-forest", "v1", "wine"),
        300,
    );
}
