//! `edge-agent`: the Driftgate device daemon.
//!
//! Today the crate holds the inference runtime, which `fleetctl` also uses to read a model's
//! signature and compute its self-test. The daemon's pipeline (MQTT link, directive handling,
//! chunked fetch, model store, local inference API, outbox) builds on it.

pub mod metrics; // counters and latency histograms, rendered as Prometheus text
pub mod runtime; // ONNX models loaded, optimised and run with tract; self-tests
pub mod serve; // the local inference API (Open Inference Protocol / KServe v2 over HTTP) and /metrics
