//! The server's counters, rendered as Prometheus text at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters updated by every part of the server.
#[derive(Debug, Default)]
pub struct Metrics {
    pub batches_ingested: AtomicU64,
    pub items_stored: AtomicU64,
    pub items_duplicate: AtomicU64,
    pub acks_sent: AtomicU64,
    pub states_stored: AtomicU64,
    pub statuses_stored: AtomicU64,
    pub chunks_served: AtomicU64,
    pub chunk_bytes_served: AtomicU64,
    pub directives_published: AtomicU64,
    /// 1 while this process leads the fleet (a single server always does).
    pub leading: AtomicU64,
    /// Terms as the leader this process began.
    pub leader_terms: AtomicU64,
    /// Rollout engine steps (one look at every active rollout) and the time they took, in
    /// microseconds: how close the engine runs to its tick.
    pub rollout_steps: AtomicU64,
    pub rollout_step_micros: AtomicU64,
    /// Chunk replies other than ok, by status.
    chunk_refusals: Mutex<BTreeMap<&'static str, u64>>,
    /// Messages dropped, by (topic kind, reason).
    dropped: Mutex<BTreeMap<(String, String), u64>>,
    /// API responses, by (method, status).
    api: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Metrics {
    pub fn dropped(&self, topic: &str, reason: &str) {
        if let Ok(mut map) = self.dropped.lock() {
            *map.entry((topic.to_string(), reason.to_string()))
                .or_default() += 1;
        }
    }

    pub fn dropped_count(&self, topic: &str, reason: &str) -> u64 {
        self.dropped
            .lock()
            .ok()
            .and_then(|m| m.get(&(topic.to_string(), reason.to_string())).copied())
            .unwrap_or(0)
    }

    pub fn chunk_refused(&self, status: &'static str) {
        if let Ok(mut map) = self.chunk_refusals.lock() {
            *map.entry(status).or_default() += 1;
        }
    }

    pub fn api_response(&self, method: &str, status: u16) {
        if let Ok(mut map) = self.api.lock() {
            *map.entry((method.to_string(), status)).or_default() += 1;
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        };
        counter(
            &mut out,
            "driftgate_server_batches_ingested_total",
            "Uplink batches stored.",
            &self.batches_ingested,
        );
        counter(
            &mut out,
            "driftgate_server_items_stored_total",
            "Outbox items stored for the first time.",
            &self.items_stored,
        );
        counter(
            &mut out,
            "driftgate_server_items_duplicate_total",
            "Outbox items received again (resends) and not stored twice.",
            &self.items_duplicate,
        );
        counter(
            &mut out,
            "driftgate_server_acks_sent_total",
            "Acks published to devices.",
            &self.acks_sent,
        );
        counter(
            &mut out,
            "driftgate_server_states_stored_total",
            "Reported device states stored.",
            &self.states_stored,
        );
        counter(
            &mut out,
            "driftgate_server_statuses_stored_total",
            "Online/offline statuses stored.",
            &self.statuses_stored,
        );
        counter(
            &mut out,
            "driftgate_server_chunks_served_total",
            "Artifact chunks served.",
            &self.chunks_served,
        );
        counter(
            &mut out,
            "driftgate_server_chunk_bytes_served_total",
            "Artifact bytes served.",
            &self.chunk_bytes_served,
        );
        counter(
            &mut out,
            "driftgate_server_directives_published_total",
            "Signed directives published.",
            &self.directives_published,
        );
        counter(
            &mut out,
            "driftgate_server_leader_terms_total",
            "Terms as the fleet's leader this process began.",
            &self.leader_terms,
        );
        let _ = writeln!(
            out,
            "# HELP driftgate_server_rollout_step_seconds Time the rollout engine took per step over every active rollout.\n# TYPE driftgate_server_rollout_step_seconds summary\ndriftgate_server_rollout_step_seconds_sum {}\ndriftgate_server_rollout_step_seconds_count {}",
            self.rollout_step_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.rollout_steps.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP driftgate_server_leading Whether this process leads the fleet (signs directives, drives rollouts).\n# TYPE driftgate_server_leading gauge\ndriftgate_server_leading {}",
            self.leading.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP driftgate_server_chunk_refusals_total Chunk requests answered with a status other than ok.\n# TYPE driftgate_server_chunk_refusals_total counter");
        if let Ok(map) = self.chunk_refusals.lock() {
            for (status, n) in map.iter() {
                let _ = writeln!(
                    out,
                    "driftgate_server_chunk_refusals_total{{status=\"{status}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP driftgate_server_dropped_messages_total Device messages dropped as malformed or not allowed.\n# TYPE driftgate_server_dropped_messages_total counter");
        if let Ok(map) = self.dropped.lock() {
            for ((topic, reason), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "driftgate_server_dropped_messages_total{{topic=\"{}\",reason=\"{}\"}} {n}",
                    escape(topic),
                    escape(reason)
                );
            }
        }
        let _ = writeln!(out, "# HELP driftgate_server_api_responses_total REST API responses.\n# TYPE driftgate_server_api_responses_total counter");
        if let Ok(map) = self.api.lock() {
            for ((method, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "driftgate_server_api_responses_total{{method=\"{}\",status=\"{status}\"}} {n}",
                    escape(method)
                );
            }
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
