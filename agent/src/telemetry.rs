//! Telemetry: every interval, the inference figures of each model version (count, errors by
//! kind, latency histogram) go into the outbox as one item per version, followed by one health
//! reading of the device.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_protocol::outbox::{ItemBody, Telemetry};
use fleet_protocol::{ModelName, ModelVersion};

use crate::disk::DiskWatch;
use crate::health::HealthProbe;
use crate::link::LinkStats;
use crate::metrics::Metrics;
use crate::outbox::OutboxHandle;
use crate::sampler::Sampler;
use crate::serve::ModelTable;

/// Turns interval counters into telemetry items. Remembers the release counter of every
/// version it has seen served, so a version swapped out during the interval is still reported
/// with its release.
pub struct TelemetryRecorder {
    metrics: Arc<Metrics>,
    table: Arc<ModelTable>,
    outbox: OutboxHandle,
    releases: HashMap<(ModelName, ModelVersion), u64>,
    last: Instant,
    health: Option<(HealthProbe, Arc<LinkStats>)>,
    sampler: Option<Arc<Sampler>>,
    disk: Option<Arc<DiskWatch>>,
}

impl TelemetryRecorder {
    pub fn new(metrics: Arc<Metrics>, table: Arc<ModelTable>, outbox: OutboxHandle) -> Self {
        TelemetryRecorder {
            metrics,
            table,
            outbox,
            releases: HashMap::new(),
            last: Instant::now(),
            health: None,
            sampler: None,
            disk: None,
        }
    }

    /// Holds the counters while the data disk is full: they add up in memory, and the first
    /// interval after the disk has room again reports the whole span, instead of items the
    /// outbox could not store.
    pub fn with_disk_watch(mut self, disk: Arc<DiskWatch>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Also sends the sampler's reservoirs whose window has ended at every flush (and all of
    /// them at the final flush).
    pub fn with_sampler(mut self, sampler: Arc<Sampler>) -> Self {
        self.sampler = Some(sampler);
        self
    }

    /// Also reports the device's health at every flush, with the link's counters.
    pub fn with_health(mut self, probe: HealthProbe, link: Arc<LinkStats>) -> Self {
        self.health = Some((probe, link));
        self
    }

    /// Notes the release of every version served now. Between two ticks a version can serve
    /// and be swapped out unseen; it is then reported with release 0, which the server reads
    /// as unknown (versions are still named).
    fn learn_releases(&mut self) {
        for model in self.table.list() {
            self.releases
                .insert((model.name.clone(), model.version.clone()), model.release);
        }
    }

    /// Queues one item per model version that served requests since the last call, and a
    /// health reading when a probe is attached; returns how many items.
    pub fn flush(&mut self) -> usize {
        self.learn_releases();
        let interval_ms = self.last.elapsed().as_millis() as u64;
        self.last = Instant::now();
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut queued = 0;
        for ((model, version), counters) in self.metrics.take_interval() {
            let release = self
                .releases
                .get(&(model.clone(), version.clone()))
                .copied()
                .unwrap_or(0);
            let body = ItemBody::Telemetry(Telemetry {
                model,
                release,
                version,
                interval_ms,
                inferences: counters.count,
                errors: counters
                    .errors
                    .iter()
                    .map(|(kind, n)| (kind.to_string(), *n))
                    .collect(),
                latency: counters.latency,
            });
            if self.outbox.push(at_ms, &body) {
                queued += 1;
            }
        }
        // Drift windows the clock closed (a quiet model still reports within the hour).
        for model in self.table.list() {
            crate::drift::report_windows(&self.outbox, model.drain_drift(at_ms, false));
        }
        if let Some((probe, link)) = &mut self.health {
            // A few dozen small reads of /proc and /sys: well under a millisecond, once an
            // interval, so it stays on this task.
            let health = probe.sample(link);
            if self.outbox.push(at_ms, &ItemBody::Health(health)) {
                queued += 1;
            }
        }
        queued
    }

    /// Flushes every `interval`, and once more when `stop` turns true (so a clean shutdown
    /// loses no counts).
    pub async fn run(mut self, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if self.disk.as_ref().is_some_and(|disk| disk.is_full()) {
                        continue;
                    }
                    self.flush();
                    if let Some(sampler) = &self.sampler {
                        sampler.flush(false);
                    }
                }
                _ = stop.wait_for(|stop| *stop) => {
                    self.flush();
                    // A clean stop: what the monitors hold open is judged and kept.
                    let at_ms = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0);
                    for model in self.table.list() {
                        crate::drift::report_windows(&self.outbox, model.drain_drift(at_ms, true));
                    }
                    if let Some(sampler) = &self.sampler {
                        sampler.flush(true);
                    }
                    return;
                }
            }
        }
    }
}
