//! `edge-agent`: the Driftgate device daemon, built as a pipeline (see `daemon`): the MQTT link
//! feeds the directive controller, which fetches, stores, self-tests and activates models that
//! the local inference API serves. `fleetctl` also uses `runtime` to read a model's signature
//! and compute its self-test, so sign time and install time agree.

pub mod check; // a new model's first load and self-test, in a child process under a memory limit
pub mod config; // agent.toml: documented defaults, paths relative to the file, errors naming the field
pub mod daemon; // wires the pipeline together and runs it until SIGTERM
pub mod directive; // directive verification and the per-model install state machine, probation
pub mod disk; // the data disk's condition: full or not, from failed writes and statvfs, reported in the state
pub mod drift; // the drift monitor: per model version, windows of inputs and predictions vs the profile
pub mod fetch; // chunked, windowed, resumable artifact download bounded by the manifest
pub mod fsutil; // file helpers: crash-safe writes, streamed file digests
pub mod health; // device and agent health (sysinfo): CPU, memory, disk, temperatures, RSS, link counters
pub mod link; // the MQTT session: TLS, last will, jittered reconnect, resubscribe, topic routing
pub mod metrics; // counters and latency histograms, rendered as Prometheus text
pub mod outbox; // everything for the server, in SQLite until acknowledged, under a byte quota
pub mod runtime; // ONNX models loaded, optimised and run with tract; self-tests
pub mod sampler; // some inferences' inputs and outputs for the server: by rate or reservoir, per model, off for privacy
pub mod serve; // the local inference API (Open Inference Protocol / KServe v2 over HTTP) and /metrics
pub mod store; // model versions on disk: install, atomic activation, keep the last N, start-up recovery
pub mod systemd; // sd_notify without libsystemd: readiness, status line, watchdog keep-alives
pub mod telemetry; // inference figures per model version per interval, into the outbox
pub mod uplink; // the outbox to the server in acknowledged batches, resent after a reconnect

/// With `RUST_BACKTRACE=1` in the environment, every `anyhow::Error` captures a backtrace, and
/// tract builds such errors in normal control flow for some operators (a tree ensemble runs
/// 1.7× slower). Panics keep their backtraces; library errors get them only when asked for
/// with `RUST_LIB_BACKTRACE=1`. Call first thing in `main`, before any other thread exists.
pub fn quiet_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}
