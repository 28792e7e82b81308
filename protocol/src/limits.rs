//! Size bounds shared by both sides. Every decoder checks these before parsing, and the MQTT
//! clients and broker are configured from them (rumqttc's 10 KiB default is far too small).

/// Largest control message: directives (which carry manifests), manifests, state, acks.
pub const MAX_CONTROL_MESSAGE_BYTES: usize = 1024 * 1024;

/// Largest outbox batch on the `up` topic.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Largest outbox batch, in items.
pub const MAX_BATCH_ITEMS: usize = 4096;

/// Largest data part of one chunk reply.
pub const MAX_CHUNK_DATA_BYTES: usize = 1024 * 1024;

/// Largest MQTT packet either side sends or accepts: the biggest message plus room for the
/// MQTT header and topic.
pub const MAX_MQTT_PACKET_BYTES: usize = 4 * 1024 * 1024;

/// Largest model artifact a manifest may declare (2 GiB).
pub const MAX_ARTIFACT_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// Most input or output tensors a manifest may declare.
pub const MAX_TENSORS: usize = 64;

/// Most dimensions a declared tensor may have.
pub const MAX_RANK: usize = 8;

/// Most elements a tensor carried in JSON may have (self-test vectors, samples).
pub const MAX_JSON_TENSOR_ELEMENTS: usize = 1 << 20;

/// Tolerated difference between a device's clock and the server's when checking a
/// directive's validity window (see [`crate::trust::verify_directive`]).
pub const CLOCK_SKEW_TOLERANCE_MS: i64 = 15 * 60 * 1000;

/// Largest reference profile file (it ships beside the model, not on a control topic).
pub const MAX_PROFILE_BYTES: usize = 16 * 1024 * 1024;

/// Most features a reference profile may monitor.
pub const MAX_PROFILE_FEATURES: usize = 8192;
