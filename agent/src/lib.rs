//! `edge-agent`: the Driftgate device daemon.
//!
//! Today the crate holds the inference runtime, which `fleetctl` also uses to read a model's
//! signature and compute its self-test. The daemon's pipeline (MQTT link, directive handling,
//! chunked fetch, model store, local inference API, outbox) builds on it.

pub mod config; // agent.toml: documented defaults, paths relative to the file, errors naming the field
pub mod daemon; // wires the pipeline together and runs it until SIGTERM
pub mod directive; // directive verification and the per-model install state machine, probation
pub mod fetch; // chunked, windowed, resumable artifact download bounded by the manifest
pub mod fsutil; // crash-safe file writes: temp file, fsync, rename, fsync the directory
pub mod link; // the MQTT session: TLS, last will, jittered reconnect, resubscribe, topic routing
pub mod metrics; // counters and latency histograms, rendered as Prometheus text
pub mod runtime; // ONNX models loaded, optimised and run with tract; self-tests
pub mod serve; // the local inference API (Open Inference Protocol / KServe v2 over HTTP) and /metrics
pub mod store; // model versions on disk: install, atomic activation, keep the last N, start-up recovery
