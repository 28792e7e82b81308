//! The agent's counters and latency histograms, and their Prometheus text rendering.
//!
//! One [`Metrics`] is shared (behind an `Arc`) by the inference API, which records every
//! inference, and the fetch/install pipeline and MQTT link, which record bytes, install
//! outcomes and dropped messages. Readers are the local `/metrics` endpoint, the probation
//! logic (which compares a new version's error rate and latency with the previous one's, via
//! [`Metrics::snapshot_model`]) and telemetry (which ships per-interval deltas, via
//! [`Metrics::take_interval`]).
//!
//! Latency uses the protocol's [`LatencyHistogram`], so what the device renders locally and
//! what the server merges from telemetry share the same bucket edges.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use fleet_protocol::histogram::{bucket_upper_us, LatencyHistogram};
use fleet_protocol::{ModelName, ModelVersion};

use crate::link::LinkStats;
use crate::uplink::UplinkStats;

/// Error kind label for a request the model refused (wrong type, shape, malformed JSON).
pub const KIND_BAD_REQUEST: &str = "bad_request";
/// Error kind label for a request body above the size limit.
pub const KIND_TOO_LARGE: &str = "too_large";
/// Error kind label for a failure inside the runtime (tract error, panic in the blocking pool).
pub const KIND_RUNTIME: &str = "runtime";

/// Counters for one model version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelCounters {
    /// Inference requests attributed to this version, successful or not.
    pub count: u64,
    /// Failed requests by kind label (`bad_request`, `runtime`, …); a subset of `count`.
    pub errors: BTreeMap<&'static str, u64>,
    /// Latency of successful runs only: a request refused before the model ran would pull
    /// the distribution towards zero and hide a slow model.
    pub latency: LatencyHistogram,
}

impl ModelCounters {
    /// Failed requests of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn record(&mut self, latency_us: f64, outcome: Result<(), &'static str>) {
        self.count += 1;
        match outcome {
            Ok(()) => self.latency.record_us(latency_us),
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }
}

type ModelKey = (ModelName, ModelVersion);

/// Cumulative counters (for Prometheus) and the counters since the last
/// [`Metrics::take_interval`] (for telemetry), kept side by side so neither reader disturbs
/// the other.
#[derive(Debug, Default)]
struct ModelEntry {
    total: ModelCounters,
    interval: ModelCounters,
}

/// The agent's metrics. Cheap to record from many threads: counters that are touched per
/// inference sit behind one short-held mutex, the byte counter is an atomic.
#[derive(Debug, Default)]
pub struct Metrics {
    models: Mutex<BTreeMap<ModelKey, ModelEntry>>,
    bytes_fetched: AtomicU64,
    installs: Mutex<BTreeMap<&'static str, u64>>,
    /// Sampler outcomes by model and label (`kept`, `too_large`, …).
    samples: Mutex<BTreeMap<(ModelName, &'static str), u64>>,
    /// The MQTT link's counters, once the link exists (the API starts before it).
    link: OnceLock<Arc<LinkStats>>,
    /// The uplink's counters, once the uplink runs.
    uplink: OnceLock<Arc<UplinkStats>>,
}

/// Locks a mutex even if a thread panicked while holding it: every update is a few integer
/// additions, so a poisoned map is still a consistent one, and losing metrics for the rest
/// of the process's life would be worse.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one inference request for `model` `version`: its latency in microseconds
    /// (measured around the model run; ignored for failures) and its outcome, `Err(kind)`
    /// with a kind label such as [`KIND_BAD_REQUEST`] or [`KIND_RUNTIME`].
    pub fn record_inference(
        &self,
        model: &ModelName,
        version: &ModelVersion,
        latency_us: f64,
        outcome: Result<(), &'static str>,
    ) {
        let mut models = lock(&self.models);
        let entry = models.entry((model.clone(), version.clone())).or_default();
        entry.total.record(latency_us, outcome);
        entry.interval.record(latency_us, outcome);
    }

    /// Adds artifact bytes fetched from the server.
    pub fn add_bytes_fetched(&self, n: u64) {
        self.bytes_fetched.fetch_add(n, Ordering::Relaxed);
    }

    pub fn bytes_fetched(&self) -> u64 {
        self.bytes_fetched.load(Ordering::Relaxed)
    }

    /// Counts an install outcome (`installed`, `failed`, `rolled_back`, …).
    pub fn record_install(&self, outcome: &'static str) {
        *lock(&self.installs).entry(outcome).or_default() += 1;
    }

    /// Counts one sampler outcome for `model`.
    pub fn record_sample(&self, model: &ModelName, outcome: &'static str) {
        *lock(&self.samples)
            .entry((model.clone(), outcome))
            .or_default() += 1;
    }

    pub fn samples(&self) -> BTreeMap<(ModelName, &'static str), u64> {
        lock(&self.samples).clone()
    }

    /// Makes the link's counters (connections, bytes, dropped messages) part of `/metrics`.
    /// Only the first call has an effect.
    pub fn attach_link(&self, stats: Arc<LinkStats>) {
        let _ = self.link.set(stats);
    }

    /// Makes the uplink's counters (batches, acknowledgements, resends) part of `/metrics`.
    /// Only the first call has an effect.
    pub fn attach_uplink(&self, stats: Arc<UplinkStats>) {
        let _ = self.uplink.set(stats);
    }

    pub fn installs(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.installs).clone()
    }

    /// Cumulative counters of one model version since the agent started (zero if never used).
    pub fn snapshot_model(&self, model: &ModelName, version: &ModelVersion) -> ModelCounters {
        lock(&self.models)
            .get(&(model.clone(), version.clone()))
            .map(|entry| entry.total.clone())
            .unwrap_or_default()
    }

    /// The counters of every model version since the previous call (or since start), and
    /// resets them; versions with no requests in the interval are left out. Cumulative
    /// counters are not affected.
    pub fn take_interval(&self) -> BTreeMap<(ModelName, ModelVersion), ModelCounters> {
        let mut models = lock(&self.models);
        models
            .iter_mut()
            .filter(|(_, entry)| entry.interval.count > 0)
            .map(|(key, entry)| (key.clone(), std::mem::take(&mut entry.interval)))
            .collect()
    }

    /// Renders every metric in the Prometheus text exposition format, version 0.0.4.
    pub fn render_prometheus(&self) -> String {
        // Copy out under the lock, format without it: rendering must not stall inferences.
        let models: Vec<(ModelKey, ModelCounters)> = lock(&self.models)
            .iter()
            .map(|(key, entry)| (key.clone(), entry.total.clone()))
            .collect();
        let installs = self.installs();
        let link = self.link.get();
        let uplink = self.uplink.get();
        let samples = self.samples();

        let mut out = String::new();
        header(
            &mut out,
            "driftgate_inferences_total",
            "counter",
            "Inference requests served by a model version, successful or not.",
        );
        for ((model, version), counters) in &models {
            sample(
                &mut out,
                "driftgate_inferences_total",
                &[("model", model.as_str()), ("version", version.as_str())],
                counters.count as f64,
            );
        }

        header(
            &mut out,
            "driftgate_inference_errors_total",
            "counter",
            "Failed inference requests by model version and kind.",
        );
        for ((model, version), counters) in &models {
            for (kind, n) in &counters.errors {
                sample(
                    &mut out,
                    "driftgate_inference_errors_total",
                    &[
                        ("model", model.as_str()),
                        ("version", version.as_str()),
                        ("kind", kind),
                    ],
                    *n as f64,
                );
            }
        }

        header(
            &mut out,
            "driftgate_inference_latency_seconds",
            "histogram",
            "Latency of successful model runs.",
        );
        for ((model, version), counters) in &models {
            histogram(
                &mut out,
                "driftgate_inference_latency_seconds",
                &[("model", model.as_str()), ("version", version.as_str())],
                &counters.latency,
            );
        }

        header(
            &mut out,
            "driftgate_fetched_bytes_total",
            "counter",
            "Model artifact bytes fetched from the fleet server.",
        );
        sample(
            &mut out,
            "driftgate_fetched_bytes_total",
            &[],
            self.bytes_fetched() as f64,
        );

        header(
            &mut out,
            "driftgate_installs_total",
            "counter",
            "Model installs by outcome.",
        );
        for (outcome, n) in &installs {
            sample(
                &mut out,
                "driftgate_installs_total",
                &[("outcome", outcome)],
                *n as f64,
            );
        }

        header(
            &mut out,
            "driftgate_samples_total",
            "counter",
            "Inferences the sampler chose to keep, by model and outcome.",
        );
        for ((model, outcome), n) in &samples {
            sample(
                &mut out,
                "driftgate_samples_total",
                &[("model", model.as_str()), ("outcome", outcome)],
                *n as f64,
            );
        }

        if let Some(link) = link {
            let counters = [
                (
                    "driftgate_link_connects_total",
                    "Sessions established with the broker.",
                    &link.connects,
                ),
                (
                    "driftgate_link_disconnects_total",
                    "Sessions with the broker that were lost.",
                    &link.disconnects,
                ),
                (
                    "driftgate_link_received_bytes_total",
                    "Payload bytes received from the broker.",
                    &link.bytes_in,
                ),
                (
                    "driftgate_link_sent_bytes_total",
                    "Payload bytes published to the broker.",
                    &link.bytes_out,
                ),
            ];
            plain_counters(&mut out, &counters);
            header(
                &mut out,
                "driftgate_dropped_messages_total",
                "counter",
                "Incoming messages dropped as malformed, untrusted or unexpected, by topic and reason.",
            );
            for ((topic, reason), n) in link.dropped() {
                sample(
                    &mut out,
                    "driftgate_dropped_messages_total",
                    &[("topic", topic), ("reason", reason)],
                    n as f64,
                );
            }
        }

        if let Some(uplink) = uplink {
            let counters = [
                (
                    "driftgate_uplink_batches_sent_total",
                    "Outbox batches published to the server, resends included.",
                    &uplink.batches_sent,
                ),
                (
                    "driftgate_uplink_items_sent_total",
                    "Outbox items published to the server, resends included.",
                    &uplink.items_sent,
                ),
                (
                    "driftgate_uplink_items_acknowledged_total",
                    "Outbox items the server acknowledged, deleted from the outbox.",
                    &uplink.items_acknowledged,
                ),
                (
                    "driftgate_uplink_resends_total",
                    "Rewinds to the last acknowledged item after a reconnect or a late ack.",
                    &uplink.resends,
                ),
                (
                    "driftgate_uplink_bad_acks_total",
                    "Acks dropped as malformed or naming ids never given.",
                    &uplink.bad_acks,
                ),
            ];
            plain_counters(&mut out, &counters);
        }
        out
    }
}

/// Counters without labels: (name, help, value).
fn plain_counters(out: &mut String, counters: &[(&str, &str, &AtomicU64)]) {
    for (name, help, counter) in counters {
        header(out, name, "counter", help);
        sample(out, name, &[], counter.load(Ordering::Relaxed) as f64);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value as the text format requires: backslash, double quote and newline.
pub fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label_value(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// A sample value. Rust's `Display` for f64 never uses exponents and prints integers without
/// a fraction, both of which Prometheus parses.
fn sample(out: &mut String, name: &str, pairs: &[(&str, &str)], value: f64) {
    let _ = writeln!(out, "{name}{} {value}", labels(pairs));
}

/// A histogram in Prometheus form: cumulative `_bucket`s at the LatencyHistogram's upper
/// edges (in seconds) up to the last non-empty one, then `+Inf`, `_sum` and `_count`. Empty
/// buckets beyond the slowest observation carry no information, and the full 128 would make
/// every scrape needlessly long.
fn histogram(out: &mut String, name: &str, pairs: &[(&str, &str)], h: &LatencyHistogram) {
    let last = h.buckets.keys().next_back().copied();
    let mut cumulative = 0u64;
    if let Some(last) = last {
        for bucket in 0..=last {
            cumulative += h.buckets.get(&bucket).copied().unwrap_or(0);
            let le = bucket_upper_us(usize::from(bucket)) / 1e6;
            let mut with_le = pairs.to_vec();
            let le = le.to_string();
            with_le.push(("le", &le));
            sample(out, &format!("{name}_bucket"), &with_le, cumulative as f64);
        }
    }
    let mut with_inf = pairs.to_vec();
    with_inf.push(("le", "+Inf"));
    sample(out, &format!("{name}_bucket"), &with_inf, h.count as f64);
    sample(out, &format!("{name}_sum"), pairs, h.sum_us / 1e6);
    sample(out, &format!("{name}_count"), pairs, h.count as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &str, version: &str) -> (ModelName, ModelVersion) {
        (
            ModelName::new(model).unwrap(),
            ModelVersion::new(version).unwrap(),
        )
    }

    #[test]
    fn counts_errors_and_latency_per_version() {
        let m = Metrics::new();
        let (name, v1) = key("digits-mlp", "v1");
        let (_, v2) = key("digits-mlp", "v2");
        m.record_inference(&name, &v1, 100.0, Ok(()));
        m.record_inference(&name, &v1, 300.0, Ok(()));
        m.record_inference(&name, &v1, 5.0, Err(KIND_BAD_REQUEST));
        m.record_inference(&name, &v2, 50.0, Err(KIND_RUNTIME));

        let s1 = m.snapshot_model(&name, &v1);
        assert_eq!(s1.count, 3);
        assert_eq!(s1.error_count(), 1);
        assert_eq!(s1.errors.get(KIND_BAD_REQUEST), Some(&1));
        assert_eq!(s1.latency.count, 2);
        assert_eq!(s1.latency.sum_us, 400.0);
        let s2 = m.snapshot_model(&name, &v2);
        assert_eq!((s2.count, s2.latency.count), (1, 0));
        assert_eq!(
            m.snapshot_model(&name, &ModelVersion::new("v9").unwrap()),
            ModelCounters::default()
        );
    }

    #[test]
    fn intervals_reset_but_totals_do_not() {
        let m = Metrics::new();
        let (name, v1) = key("m", "v1");
        m.record_inference(&name, &v1, 10.0, Ok(()));
        let first = m.take_interval();
        assert_eq!(first[&(name.clone(), v1.clone())].count, 1);
        assert!(m.take_interval().is_empty());
        m.record_inference(&name, &v1, 10.0, Ok(()));
        assert_eq!(m.take_interval()[&(name.clone(), v1.clone())].count, 1);
        assert_eq!(m.snapshot_model(&name, &v1).count, 2);
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        let (name, v1) = key("cancer-logreg", "v1");
        m.record_inference(&name, &v1, 0.5, Ok(())); // bucket 0 (≤ 1 µs)
        m.record_inference(&name, &v1, 3.0, Ok(())); // bucket 7 (≤ 2^1.75 µs)
        m.record_inference(&name, &v1, 3.0, Err(KIND_RUNTIME));
        m.add_bytes_fetched(1234);
        m.record_install("installed");
        m.record_install("installed");
        let link = Arc::new(LinkStats::default());
        link.record_dropped("directive", "bad_signature");
        link.connects.fetch_add(2, Ordering::Relaxed);
        m.attach_link(link);
        let uplink = Arc::new(UplinkStats::default());
        uplink.items_acknowledged.fetch_add(7, Ordering::Relaxed);
        m.attach_uplink(uplink);
        let text = m.render_prometheus();

        let labels = r#"model="cancer-logreg",version="v1""#;
        for line in [
            "# TYPE driftgate_inferences_total counter".to_string(),
            format!("driftgate_inferences_total{{{labels}}} 3"),
            format!(r#"driftgate_inference_errors_total{{{labels},kind="runtime"}} 1"#),
            "# TYPE driftgate_inference_latency_seconds histogram".to_string(),
            format!(r#"driftgate_inference_latency_seconds_bucket{{{labels},le="0.000001"}} 1"#),
            format!(r#"driftgate_inference_latency_seconds_bucket{{{labels},le="+Inf"}} 2"#),
            format!("driftgate_inference_latency_seconds_sum{{{labels}}} 0.0000035"),
            format!("driftgate_inference_latency_seconds_count{{{labels}}} 2"),
            "driftgate_fetched_bytes_total 1234".to_string(),
            r#"driftgate_installs_total{outcome="installed"} 2"#.to_string(),
            r#"driftgate_dropped_messages_total{topic="directive",reason="bad_signature"} 1"#
                .to_string(),
            "driftgate_link_connects_total 2".to_string(),
            "driftgate_uplink_items_acknowledged_total 7".to_string(),
            "driftgate_uplink_resends_total 0".to_string(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Buckets 0..=7, then +Inf: nothing beyond the slowest observation.
        let buckets: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("driftgate_inference_latency_seconds_bucket"))
            .collect();
        assert_eq!(buckets.len(), 9, "{buckets:#?}");
        assert!(buckets[6].ends_with(" 1") && buckets[7].ends_with(" 2"));
        // Every sample line is `name{labels} value` with a parseable value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("x\ny"), r"x\ny");
    }
}
