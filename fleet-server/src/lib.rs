//! `fleet-server`: Driftgate's control plane, and the library behind the `fleetctl` CLI.
//!
//! Today it holds the offline release tooling; the server itself (embedded broker, store,
//! registry, ingest, rollouts, REST API, console) builds on the same protocol crate.

pub mod broker; // the embedded MQTT broker (rmqtt): device TLS listener, per-device ACL; Mosquitto config
pub mod ca; // the device CA: device and broker certificates, CRLs
pub mod keyfile; // key files on disk: PKCS#8 PEM private keys (0600), SPKI PEM public keys
pub mod profile; // fleetctl profile build: reference profiles from data, thresholds calibrated by bootstrap
pub mod release; // signing a model's manifest, verifying a model against its manifest
