//! The drift monitor: its cost per feature per sample against the target (issue 4: ≤ 200 ns),
//! and its quality on the sample models' data (acceptance 4: false alarms, detection delays,
//! noise and prior shifts), with the exact figures `tests/drift_quality.rs` only bounds.
//!
//! ```text
//! cargo bench -p edge-agent --bench drift             # cost and full quality figures
//! cargo bench -p edge-agent --bench drift -- --quick  # fewer streams and trials
//! ```

#[path = "../tests/drift_harness/mod.rs"]
mod drift_harness;

use std::time::Instant;

use drift_harness::{delay_quantile, stream, switch_trial, Sample};

const TARGET_NS_PER_FEATURE_SAMPLE: f64 = 200.0;

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// ns per feature per sample of `observe` for requests of `batch` rows (64 features: digits).
fn cost(sample: &Sample, batch: usize, samples: usize) -> f64 {
    let mut rng = fastrand::Rng::with_seed(9);
    // Requests are built beforehand: the figure is the monitor's, not the test kit's.
    let requests: Vec<_> = (0..64)
        .map(|_| {
            let rows: Vec<usize> = (0..batch)
                .map(|_| rng.usize(..sample.holdout.rows))
                .collect();
            sample.request(&sample.holdout, &rows)
        })
        .collect();
    let mut monitor = sample.monitor();
    let features = sample.profile.features.len();
    for (i, o) in requests.iter().take(8) {
        monitor.observe(i, o, 0);
    }
    let calls = samples / batch;
    let started = Instant::now();
    let mut closed = 0;
    for c in 0..calls {
        let (i, o) = &requests[c % requests.len()];
        closed += monitor.observe(i, o, 0).len();
    }
    let elapsed = started.elapsed().as_nanos() as f64;
    std::hint::black_box(closed);
    elapsed / (calls * batch * features) as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "drift benchmark: {}, {cores} cores, {} build\n",
        cpu_model(),
        if cfg!(debug_assertions) {
            "DEBUG (figures meaningless: use cargo bench)"
        } else {
            "optimised"
        }
    );
    let digits = Sample::load("digits-mlp/v2", "digits-mlp", "v2", "digits");
    let wine = Sample::load("wine-forest/v1", "wine-forest", "v1", "wine");

    println!("monitor update (digits-mlp/v2: 64 features + 10-class prediction, one thread)");
    let mut missed = false;
    for batch in [1, 32] {
        let ns = cost(&digits, batch, if quick { 200_000 } else { 2_000_000 });
        let ok = ns <= TARGET_NS_PER_FEATURE_SAMPLE;
        missed |= !ok;
        println!(
            "  batch {batch:>2}: {ns:>6.1} ns per feature per sample   target ≤ {TARGET_NS_PER_FEATURE_SAMPLE} {}",
            if ok { "ok" } else { "MISSED" }
        );
    }

    let (long_windows, trials) = if quick { (100, 100) } else { (1000, 500) };
    for sample in [&digits, &wine] {
        let label = sample.label;
        let long = *sample.profile.windows.last().unwrap() as usize;
        println!(
            "\n{label} (profile: {} features, CUSUM h {:.2})",
            sample.profile.features.len(),
            sample.profile.cusum.h
        );
        let tally = stream(sample, &sample.holdout, long_windows * long, 32, 11);
        for &w in &sample.profile.windows {
            let t = tally.per_window.iter().find(|t| t.0 == w).unwrap();
            println!(
                "  unshifted (held-out rows):  windows of {w:>4}: {:>4} of {:>5} flagged = {:.2} %   target ≤ 1 %",
                t.2,
                t.1,
                100.0 * tally.rate(w)
            );
        }
        let mut rng = fastrand::Rng::with_seed(12);
        let results: Vec<_> = (0..trials)
            .map(|_| switch_trial(sample, &sample.shift_mean, 4096, &mut rng))
            .collect();
        let delays: Vec<Option<usize>> = results.iter().map(|r| r.0).collect();
        let within = delays
            .iter()
            .filter(|d| d.is_some_and(|d| d <= 256))
            .count();
        let early = results.iter().filter(|r| r.1).count();
        let show = |d: Option<usize>| d.map_or("not detected".to_string(), |d| d.to_string());
        println!(
            "  1σ mean shift on the most important feature, {trials} trials: within 256 samples {:.1} %   target ≥ 95 %",
            100.0 * within as f64 / trials as f64
        );
        println!(
            "    delay in samples: p50 {}  p95 {}  max {}   (a flag before the switch in {early} trials)",
            show(delay_quantile(&delays, 0.5)),
            show(delay_quantile(&delays, 0.95)),
            show(delay_quantile(&delays, 1.0)),
        );
        for (what, rows) in [
            ("Gaussian noise 0.5σ", &sample.shift_noise),
            ("class prior", &sample.shift_prior),
        ] {
            let tally = stream(sample, rows, (long_windows / 10).max(8) * long, 32, 13);
            let rates: Vec<String> = sample
                .profile
                .windows
                .iter()
                .map(|&w| {
                    format!(
                        "windows of {w}: {:.1} % of {}",
                        100.0 * tally.rate(w),
                        tally.windows(w)
                    )
                })
                .collect();
            println!("  {what} shift flagged: {}", rates.join(", "));
            let results: Vec<_> = (0..trials / 5)
                .map(|_| switch_trial(sample, rows, 4096, &mut rng))
                .collect();
            let delays: Vec<Option<usize>> = results.iter().map(|r| r.0).collect();
            println!(
                "    delay from a switch, {} trials: p50 {}  p95 {}  max {}",
                delays.len(),
                show(delay_quantile(&delays, 0.5)),
                show(delay_quantile(&delays, 0.95)),
                show(delay_quantile(&delays, 1.0)),
            );
        }
    }
    if missed && std::env::args().any(|a| a == "--check") {
        std::process::exit(1);
    }
}
