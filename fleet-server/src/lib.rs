//! `fleet-server`: Driftgate's control plane, and the library behind the `fleet-server` and
//! `fleetctl` binaries.
//!
//! One process is the whole fleet's control plane by default: an embedded MQTT broker, a
//! SQLite store, ingest, the artifact server and the REST API. The same code runs against an
//! external broker (Mosquitto, EMQX) and PostgreSQL when one machine is not enough.

pub mod api; // REST API (axum): models, devices, telemetry, drift, tokens; OpenAPI; /metrics
pub mod artifacts; // answers chunk requests from blob files: assigned blobs only, bounded, rate-limited
pub mod auth; // bearer tokens with roles viewer < operator < admin, stored hashed
pub mod broker; // the embedded MQTT broker (rmqtt): mTLS, CN identity, per-device topic ACL
pub mod bus; // the server's own MQTT session: subscribes to device topics, routes, publishes
pub mod ca; // the device CA: device and broker certificates, the CRL
pub mod client; // fleetctl's REST client: tokens from flags, env or file; uploads with progress
pub mod cluster; // several replicas: the leader lease in the database, fenced directive sequences, requests to the leader
pub mod config; // server.toml: documented defaults, paths relative to the file, flag overrides
pub mod console; // the operator console: a single-page app built into the binary, served at /
pub mod demo; // `fleet-server demo`: server, local agents, app load, three rollouts, summary
pub mod fleet; // operations: enroll, revoke, assign; signed directives with persisted sequences
pub mod ingest; // up/state/status into the store, idempotent by (device, item id), ack after commit
pub mod keyfile; // key files on disk: PKCS#8 PEM private keys (0600), SPKI PEM public keys
pub mod metrics; // the server's counters in Prometheus text
pub mod overview; // the fleet at a glance (presence, versions running, compliance) and device filters, pure
pub mod profile; // fleetctl profile build: reference profiles from data, thresholds calibrated by bootstrap
pub mod registry; // signed manifests and content-addressed blobs: push, verify, delete
pub mod release; // signing a model's manifest, verifying a model against its manifest
pub mod rollout; // rollouts, pure: stage sizes and sticky device selection, specs, gates, the engine state machine
pub mod rollout_runner; // the engine's loop: facts and gate figures from the store, actions through the fleet, audit
pub mod server; // wires it all together: data dir, keys, store, broker, session, workers, API
pub mod sim; // simulated devices for fleet-sim and the benchmarks: real mTLS sessions, real signature checks, telemetry
pub mod store; // one SQL layer over SQLite and PostgreSQL (sqlx Any), with migrations
