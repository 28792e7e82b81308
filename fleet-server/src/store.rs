//! The server's database: one SQL layer over SQLite (the default, a file in the data dir) and
//! PostgreSQL (`--database postgres://…`).
//!
//! Every query is written once, with `$N` placeholders, which both engines accept, and runs
//! through sqlx's `Any` driver. The schema differs only in a few type names, which the
//! migrations fill in per dialect. Nothing else in the server writes SQL.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_protocol::drift::DriftWindow;
use fleet_protocol::histogram::LatencyHistogram;
use fleet_protocol::outbox::{Batch, ItemBody, Telemetry};
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};

use crate::rollout::{Phase, RolloutSpec, RolloutState};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database URL {0:?} is neither sqlite:// nor postgres://")]
    UnsupportedUrl(String),
    #[error("stored {what} is unreadable: {cause}")]
    Corrupt { what: String, cause: String },
    #[error("{0}")]
    Conflict(String),
    /// A directive was to be signed under a leader lease this replica no longer holds.
    #[error("this replica no longer leads the fleet: {0}")]
    NotLeader(String),
}

/// Which SQL engine is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Migrations, in order. `{blob}` becomes the dialect's byte-string type, `{serial}` an
/// auto-incrementing integer primary key.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    cert_not_after_ms BIGINT NOT NULL,
    enrolled_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT,
    directive_seq BIGINT NOT NULL DEFAULT 0,
    presence TEXT,
    presence_at_ms BIGINT,
    agent_version TEXT,
    state TEXT,
    state_at_ms BIGINT,
    health TEXT,
    health_at_ms BIGINT,
    acked_up_to BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE device_labels (
    device TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (device, key)
);
CREATE INDEX device_labels_by_value ON device_labels (key, value);
CREATE TABLE revoked_certs (
    serial TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    revoked_at_ms BIGINT NOT NULL
);
CREATE TABLE models (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    release BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    profile_sha256 TEXT,
    profile_size BIGINT,
    manifest {blob} NOT NULL,
    pushed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE UNIQUE INDEX models_by_release ON models (name, release);
CREATE INDEX models_by_sha256 ON models (sha256);
CREATE INDEX models_by_profile ON models (profile_sha256);
CREATE TABLE assignments (
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    assigned_at_ms BIGINT NOT NULL,
    PRIMARY KEY (device, model)
);
CREATE TABLE directives (
    device TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    envelope {blob} NOT NULL,
    issued_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE TABLE items (
    device TEXT NOT NULL,
    id BIGINT NOT NULL,
    kind TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    model TEXT,
    release BIGINT,
    body TEXT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    PRIMARY KEY (device, id)
);
CREATE INDEX items_by_model ON items (kind, model, release, at_ms);
CREATE TABLE drift_merged (
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    release BIGINT NOT NULL,
    window_len BIGINT NOT NULL,
    windows BIGINT NOT NULL,
    flagged BIGINT NOT NULL,
    first_ms BIGINT NOT NULL,
    last_ms BIGINT NOT NULL,
    merged TEXT NOT NULL,
    PRIMARY KEY (device, model, release, window_len)
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);
",
    ),
    (
        2,
        "
CREATE TABLE telemetry_merged (
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    release BIGINT NOT NULL,
    reports BIGINT NOT NULL,
    inferences BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    latency TEXT NOT NULL,
    first_ms BIGINT NOT NULL,
    last_ms BIGINT NOT NULL,
    PRIMARY KEY (device, model, release)
);
CREATE INDEX telemetry_merged_by_model ON telemetry_merged (model, release);
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    phase TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX rollouts_by_model ON rollouts (model, phase);
CREATE TABLE audit (
    id {serial},
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    rollout TEXT,
    subject TEXT,
    message TEXT NOT NULL,
    details TEXT NOT NULL
);
CREATE INDEX audit_by_rollout ON audit (rollout, id);
",
    ),
    (
        3,
        "
ALTER TABLE tokens ADD COLUMN expires_at_ms BIGINT;
",
    ),
    (
        4,
        "
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE TABLE directive_requests (
    device TEXT PRIMARY KEY,
    requested_at_ms BIGINT NOT NULL
);
",
    ),
    (
        5,
        "
CREATE TABLE batch_ranges (
    device TEXT NOT NULL,
    after_id BIGINT NOT NULL,
    last_id BIGINT NOT NULL,
    PRIMARY KEY (device, after_id)
);
",
    ),
];

/// The PostgreSQL advisory lock replicas take around their migrations, so that two starting
/// at once do not both create the same tables. Any number; this one spells "dgate".
const MIGRATION_LOCK: i64 = 0x0064_6761_7465;

/// The advisory lock around every change to rollouts (creating one, an operator's command,
/// the leader's engine step): a rollout is read, changed and written back, and replicas
/// sharing the database must take turns at that as the tasks of one process do.
pub const ROLLOUTS_LOCK: i64 = 0x0064_6761_7472;

/// Items per multi-row INSERT (8 values each; far below either engine's parameter limit).
const INSERT_CHUNK: usize = 128;

/// A lock held across the replicas of one database ([`Store::lock_across_replicas`]).
pub struct ReplicaLock {
    key: i64,
    connection: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
}

impl ReplicaLock {
    /// Gives the lock up, and its connection back to the pool.
    pub async fn release(mut self) {
        if let Some(mut connection) = self.connection.take() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(self.key)
                .execute(&mut *connection)
                .await;
            if unlocked.is_err() {
                // A connection that may still hold the lock must not go back to the pool.
                drop(connection.detach());
            }
        }
    }
}

impl Drop for ReplicaLock {
    /// Not released (the holder's task was cancelled, or it returned early): the connection
    /// is closed rather than pooled, and PostgreSQL frees the lock with its session.
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            drop(connection.detach());
        }
    }
}

/// The database, shared by every part of the server (cheap to clone).
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

/// A device as enrolled, with what it last reported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceRecord {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub cert_serial: String,
    pub cert_not_after_ms: i64,
    pub enrolled_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub directive_seq: i64,
    pub presence: Option<String>,
    pub presence_at_ms: Option<i64>,
    pub agent_version: Option<String>,
    pub state: Option<serde_json::Value>,
    pub state_at_ms: Option<i64>,
    pub health: Option<serde_json::Value>,
    pub health_at_ms: Option<i64>,
    pub acked_up_to: i64,
}

/// A model version in the registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelRecord {
    pub name: String,
    pub version: String,
    pub release: i64,
    pub sha256: String,
    pub size: i64,
    pub profile_sha256: Option<String>,
    pub profile_size: Option<i64>,
    /// The signed manifest envelope, as pushed (JSON bytes).
    #[serde(skip)]
    pub manifest: Vec<u8>,
    pub pushed_at_ms: i64,
}

/// A report a device sent on `state` or `status`, as the row update it makes.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceReport {
    /// Its whole state, as JSON.
    State {
        device: String,
        json: String,
        agent_version: String,
        at_ms: i64,
    },
    /// Online or offline.
    Presence {
        device: String,
        presence: &'static str,
        agent_version: String,
        at_ms: i64,
    },
}

/// A device's assignment of one model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    pub device: String,
    pub model: String,
    pub version: String,
    pub assigned_at_ms: i64,
}

/// An API token (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    pub hash: String,
    pub role: String,
    pub name: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    /// Refused from this instant on (`None`: never expires).
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
}

/// A stored outbox item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredItem {
    pub device: String,
    pub id: i64,
    pub kind: String,
    pub at_ms: i64,
    pub model: Option<String>,
    pub release: Option<i64>,
    pub body: serde_json::Value,
}

/// Drift windows of one model release on one device, merged (counts added).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MergedDrift {
    pub device: String,
    pub model: String,
    pub release: i64,
    pub window_len: i64,
    pub windows: i64,
    pub flagged: i64,
    pub first_ms: i64,
    pub last_ms: i64,
    pub merged: DriftWindow,
}

/// Telemetry of one model release on one device, added up over every report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TelemetryTotals {
    pub device: String,
    pub model: String,
    pub release: i64,
    pub reports: i64,
    /// Inferences, failed ones included.
    pub inferences: i64,
    pub errors: i64,
    pub latency: LatencyHistogram,
    pub first_ms: i64,
    pub last_ms: i64,
}

/// A rollout: what was asked, and where the engine has it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutRecord {
    pub id: String,
    pub seq: i64,
    pub model: String,
    pub version: String,
    pub phase: Phase,
    pub spec: RolloutSpec,
    pub state: RolloutState,
    pub created_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One audit log entry: an operator's action or an engine's decision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    /// Assigned by the store, increasing.
    #[serde(default)]
    pub id: i64,
    pub at_ms: i64,
    /// `engine`, or the token's name and id for an operator.
    pub actor: String,
    pub action: String,
    pub rollout: Option<String>,
    /// What it acted on: a device, a model version, a token.
    pub subject: Option<String>,
    pub message: String,
    pub details: serde_json::Value,
}

/// What storing one uplink batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Items stored now.
    pub stored: u64,
    /// Items already stored before (a resend).
    pub duplicates: u64,
    /// What to ack: every item up to this id is stored.
    pub ack_up_to: u64,
}

impl Store {
    /// Opens (creating it for SQLite) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Dialect::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        };
        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(30));
        options = match dialect {
            // One writer at a time is all SQLite allows; a few readers beside it.
            Dialect::Sqlite => options.max_connections(4).after_connect(|conn, _meta| {
                Box::pin(async move {
                    // WAL lets readers run beside the writer; NORMAL syncs at checkpoints,
                    // which WAL keeps crash-safe (a power cut may lose the last commits, never
                    // corrupt). The busy timeout makes writers queue instead of failing.
                    for pragma in [
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA synchronous = NORMAL",
                        "PRAGMA busy_timeout = 10000",
                    ] {
                        sqlx::query(pragma).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            }),
            // The rollout runner signs 32 directives at once, beside 4 ingest workers and the
            // API: 8 connections made them queue for the pool.
            Dialect::Postgres => options.max_connections(16),
        };
        let url = match dialect {
            Dialect::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let pool = options.connect(&url).await?;
        let store = Store { pool, dialect };
        store.migrate().await?;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// A transaction that will write. On SQLite it takes the write lock at BEGIN
    /// (`IMMEDIATE`): a deferred transaction that reads first and writes later cannot wait
    /// for the lock when another connection wrote in between, and fails at once with
    /// SQLITE_BUSY whatever the busy timeout.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres => self.pool.begin().await,
        }
    }

    /// The pool itself, for the cluster's lease (`crate::cluster`).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The database's own clock in milliseconds, as SQL: leases are judged by one clock, not
    /// by each replica's.
    pub(crate) fn now_sql(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)",
            Dialect::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
        }
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let lock = self.lock_across_replicas(MIGRATION_LOCK).await?;
        let result = self.migrate_unlocked().await;
        lock.release().await;
        result
    }

    /// Takes the PostgreSQL advisory lock `key` on a connection of its own and holds it until
    /// [`ReplicaLock::release`]: replicas sharing the database take turns. Waits while
    /// another process holds it. On SQLite (one process) it holds nothing: the caller's own
    /// mutex is the lock there.
    pub async fn lock_across_replicas(&self, key: i64) -> Result<ReplicaLock, StoreError> {
        let connection = match self.dialect {
            Dialect::Sqlite => None,
            Dialect::Postgres => {
                let mut connection = self.pool.acquire().await?;
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(key)
                    .execute(&mut *connection)
                    .await?;
                Some(connection)
            }
        };
        Ok(ReplicaLock { key, connection })
    }

    async fn migrate_unlocked(&self) -> Result<(), StoreError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let blob = match self.dialect {
            Dialect::Sqlite => "BLOB",
            Dialect::Postgres => "BYTEA",
        };
        let serial = match self.dialect {
            Dialect::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Dialect::Postgres => "BIGSERIAL PRIMARY KEY",
        };
        for (version, sql) in MIGRATIONS {
            let mut tx = self.begin_write().await?;
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_optional(&mut *tx)
                    .await?;
            if applied.is_some() {
                continue;
            }
            let sql = sql.replace("{blob}", blob).replace("{serial}", serial);
            for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                // Our own migration text, never outside input.
                sqlx::query(AssertSqlSafe(statement.to_string()))
                    .execute(&mut *tx)
                    .await?;
            }
            if *version == 2 {
                backfill_telemetry(&mut tx).await?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)")
                .bind(*version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, "database migrated");
        }
        Ok(())
    }

    // ---- devices -------------------------------------------------------------------------

    /// Adds a device; refused when the id exists.
    pub async fn insert_device(&self, device: &DeviceRecord) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let exists: Option<String> = sqlx::query_scalar("SELECT id FROM devices WHERE id = $1")
            .bind(&device.id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::Conflict(format!(
                "device {} is already enrolled",
                device.id
            )));
        }
        sqlx::query(
            "INSERT INTO devices (id, labels, cert_serial, cert_not_after_ms, enrolled_at_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&device.id)
        .bind(json_string(&device.labels))
        .bind(&device.cert_serial)
        .bind(device.cert_not_after_ms)
        .bind(device.enrolled_at_ms)
        .execute(&mut *tx)
        .await?;
        for (key, value) in &device.labels {
            sqlx::query("INSERT INTO device_labels (device, key, value) VALUES ($1, $2, $3)")
                .bind(&device.id)
                .bind(key)
                .bind(value)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!("{DEVICE_COLUMNS} WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| device_from_row(&r)).transpose()
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!("{DEVICE_COLUMNS} ORDER BY id")))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(device_from_row).collect()
    }

    /// Marks the device revoked and lists its certificate as revoked. Returns false when it
    /// was revoked already.
    pub async fn revoke_device(&self, id: &str, at_ms: i64) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT cert_serial, revoked_at_ms FROM devices WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Err(StoreError::Conflict(format!("no device {id}")));
        };
        let serial: String = row.try_get(0)?;
        let revoked: Option<i64> = row.try_get(1)?;
        if revoked.is_some() {
            return Ok(false);
        }
        sqlx::query("UPDATE devices SET revoked_at_ms = $1 WHERE id = $2")
            .bind(at_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO revoked_certs (serial, device, revoked_at_ms) VALUES ($1, $2, $3) ON CONFLICT (serial) DO NOTHING",
        )
        .bind(&serial)
        .bind(id)
        .bind(at_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Every revoked certificate: (serial, revoked at), for the CRL.
    pub async fn revoked_certs(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT serial, revoked_at_ms FROM revoked_certs ORDER BY serial")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Enrolled and not revoked: the broker lets exactly these connect.
    pub async fn active_device_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .active_devices()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// Enrolled and not revoked, with their certificates' serials.
    pub async fn active_devices(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, cert_serial FROM devices WHERE revoked_at_ms IS NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Devices whose label `key` has `value`.
    pub async fn devices_with_label(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT device FROM device_labels WHERE key = $1 AND value = $2 ORDER BY device",
        )
        .bind(key)
        .bind(value)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn set_state(
        &self,
        device: &str,
        state_json: &str,
        agent_version: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.store_reports(&[DeviceReport::State {
            device: device.to_string(),
            json: state_json.to_string(),
            agent_version: agent_version.to_string(),
            at_ms,
        }])
        .await
    }

    /// Stores what devices reported on `state` and `status`, in order, in one transaction:
    /// a fleet answering a rollout sends thousands of states a second, and one commit each
    /// would make the database's commit rate the fleet's. A late retained copy never
    /// overwrites a newer report (each update is guarded by its time).
    pub async fn store_reports(&self, reports: &[DeviceReport]) -> Result<(), StoreError> {
        let update = |report: &DeviceReport| match report {
            DeviceReport::State {
                device,
                json,
                agent_version,
                at_ms,
            } => sqlx::query(UPDATE_STATE)
                .bind(json.clone())
                .bind(*at_ms)
                .bind(agent_version.clone())
                .bind(device.clone()),
            DeviceReport::Presence {
                device,
                presence,
                agent_version,
                at_ms,
            } => sqlx::query(UPDATE_PRESENCE)
                .bind(*presence)
                .bind(*at_ms)
                .bind(agent_version.clone())
                .bind(device.clone()),
        };
        match reports {
            [] => {}
            [one] => {
                update(one).execute(&self.pool).await?;
            }
            many => {
                let mut tx = self.begin_write().await?;
                for report in many {
                    update(report).execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    // ---- registry ------------------------------------------------------------------------

    pub async fn insert_model(&self, model: &ModelRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO models (name, version, release, sha256, size, profile_sha256, profile_size, manifest, pushed_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&model.name)
        .bind(&model.version)
        .bind(model.release)
        .bind(&model.sha256)
        .bind(model.size)
        .bind(&model.profile_sha256)
        .bind(model.profile_size)
        .bind(&model.manifest)
        .bind(model.pushed_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn model(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<ModelRecord>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "{MODEL_COLUMNS} WHERE name = $1 AND version = $2"
        )))
        .bind(name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| model_from_row(&r)).transpose()
    }

    pub async fn model_by_release(
        &self,
        name: &str,
        release: i64,
    ) -> Result<Option<ModelRecord>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "{MODEL_COLUMNS} WHERE name = $1 AND release = $2"
        )))
        .bind(name)
        .bind(release)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| model_from_row(&r)).transpose()
    }

    pub async fn models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "{MODEL_COLUMNS} ORDER BY name, release"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(model_from_row).collect()
    }

    /// Whether any model version names this digest as its artifact or profile: a device may
    /// fetch only such blobs.
    pub async fn blob_known(&self, sha256: &str) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM models WHERE sha256 = $1 OR profile_sha256 = $1",
        )
        .bind(sha256)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    /// Whether the blob belongs to a model version assigned to the device (its artifact or
    /// its profile).
    pub async fn blob_assigned(&self, device: &str, sha256: &str) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM assignments a JOIN models m ON a.model = m.name AND a.version = m.version WHERE a.device = $1 AND (m.sha256 = $2 OR m.profile_sha256 = $2)",
        )
        .bind(device)
        .bind(sha256)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    /// Deletes a model version unless a device is assigned it; returns the digests that no
    /// other version references any more (their files may go).
    pub async fn delete_model(&self, name: &str, version: &str) -> Result<Vec<String>, StoreError> {
        let mut tx = self.begin_write().await?;
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT device FROM assignments WHERE model = $1 AND version = $2 ORDER BY device",
        )
        .bind(name)
        .bind(version)
        .fetch_all(&mut *tx)
        .await?;
        if !users.is_empty() {
            return Err(StoreError::Conflict(format!(
                "{name}@{version} is assigned to {} device(s): {}",
                users.len(),
                users.join(", ")
            )));
        }
        let row = sqlx::query(
            "SELECT sha256, profile_sha256 FROM models WHERE name = $1 AND version = $2",
        )
        .bind(name)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::Conflict(format!("no model {name}@{version}")));
        };
        let sha: String = row.try_get(0)?;
        let profile: Option<String> = row.try_get(1)?;
        sqlx::query("DELETE FROM models WHERE name = $1 AND version = $2")
            .bind(name)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        let mut orphans = Vec::new();
        for digest in std::iter::once(sha).chain(profile) {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM models WHERE sha256 = $1 OR profile_sha256 = $1",
            )
            .bind(&digest)
            .fetch_one(&mut *tx)
            .await?;
            if n == 0 {
                orphans.push(digest);
            }
        }
        tx.commit().await?;
        Ok(orphans)
    }

    // ---- assignments and directives ------------------------------------------------------

    pub async fn assign(&self, a: &Assignment) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO assignments (device, model, version, assigned_at_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (device, model) DO UPDATE SET version = excluded.version, assigned_at_ms = excluded.assigned_at_ms",
        )
        .bind(&a.device)
        .bind(&a.model)
        .bind(&a.version)
        .bind(a.assigned_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn unassign(&self, device: &str, model: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM assignments WHERE device = $1 AND model = $2")
            .bind(device)
            .bind(model)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every device's assignment of one model: (device, version).
    pub async fn assignments_of_model(
        &self,
        model: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT device, version FROM assignments WHERE model = $1")
            .bind(model)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Every assignment in the fleet: (device, model, version).
    pub async fn all_assignments(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let rows = sqlx::query("SELECT device, model, version FROM assignments")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// The device's assignments with the registry record of each assigned version, in one
    /// query: what its directive is made of. An assignment whose version is gone from the
    /// registry comes with `None`.
    pub async fn assignments_with_models(
        &self,
        device: &str,
    ) -> Result<Vec<(Assignment, Option<ModelRecord>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.name, m.version, m.release, m.sha256, m.size, m.profile_sha256, m.profile_size, m.manifest, m.pushed_at_ms, a.device, a.model, a.version, a.assigned_at_ms FROM assignments a LEFT JOIN models m ON m.name = a.model AND m.version = a.version WHERE a.device = $1 ORDER BY a.model",
        )
        .bind(device)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let assignment = assignment_from_row(r, 9)?;
                let name: Option<String> = r.try_get(0)?;
                let record = match name {
                    Some(_) => Some(model_from_row(r)?),
                    None => None,
                };
                Ok((assignment, record))
            })
            .collect()
    }

    pub async fn assignments(&self, device: &str) -> Result<Vec<Assignment>, StoreError> {
        let rows = sqlx::query(
            "SELECT device, model, version, assigned_at_ms FROM assignments WHERE device = $1 ORDER BY model",
        )
        .bind(device)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| assignment_from_row(r, 0)).collect()
    }

    /// Takes the device's next directive sequence number. It is persisted before the
    /// directive is signed, so no number is ever handed out twice, even across a crash. With
    /// a `fence` (a replica of a cluster), only while that lease is still held: checked in the
    /// same statement, with the lease row share-locked on PostgreSQL, so a takeover waits for
    /// this commit and every number taken after it is refused to the old leader.
    ///
    /// One statement, one round trip: a rollout stage takes one number per device.
    pub async fn next_directive_seq(
        &self,
        device: &str,
        fence: Option<&crate::cluster::Fence>,
    ) -> Result<u64, StoreError> {
        let seq: Option<i64> = match fence {
            None => {
                sqlx::query_scalar(
                    "UPDATE devices SET directive_seq = directive_seq + 1 WHERE id = $1 RETURNING directive_seq",
                )
                .bind(device)
                .fetch_optional(&self.pool)
                .await?
            }
            Some(fence) => {
                let lock = match self.dialect {
                    Dialect::Sqlite => "",
                    Dialect::Postgres => " FOR SHARE",
                };
                let seq = sqlx::query_scalar(AssertSqlSafe(format!(
                    "UPDATE devices SET directive_seq = directive_seq + 1 WHERE id = $1 AND EXISTS (SELECT 1 FROM leases WHERE name = $2 AND holder = $3 AND epoch = $4 AND expires_at_ms > {}{lock}) RETURNING directive_seq",
                    self.now_sql()
                )))
                .bind(device)
                .bind(crate::cluster::LEADER_LEASE)
                .bind(&fence.holder)
                .bind(fence.epoch)
                .fetch_optional(&self.pool)
                .await?;
                if seq.is_none() && self.device(device).await?.is_some() {
                    return Err(StoreError::NotLeader(format!(
                        "the lease of epoch {} has passed to another replica or lapsed",
                        fence.epoch
                    )));
                }
                seq
            }
        };
        let seq = seq.ok_or_else(|| StoreError::Conflict(format!("no device {device}")))?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    /// The sequence of the device's last stored directive.
    pub async fn directive_seq(&self, device: &str) -> Result<Option<u64>, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM directives WHERE device = $1")
            .bind(device)
            .fetch_optional(&self.pool)
            .await?;
        Ok(seq.map(|s| u64::try_from(s).unwrap_or(0)))
    }

    /// Devices whose last directive was issued at or after `since_ms`.
    pub async fn directives_issued_since(&self, since_ms: i64) -> Result<Vec<String>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT device FROM directives WHERE issued_at_ms >= $1 ORDER BY device",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Asks the leader for a new directive for the device (a replica that does not lead
    /// cannot sign one).
    pub async fn request_directive(&self, device: &str, at_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO directive_requests (device, requested_at_ms) VALUES ($1, $2) ON CONFLICT (device) DO UPDATE SET requested_at_ms = excluded.requested_at_ms",
        )
        .bind(device)
        .bind(at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The open directive requests: (device, requested at), oldest first.
    pub async fn directive_requests(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT device, requested_at_ms FROM directive_requests ORDER BY requested_at_ms",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Closes a request answered by a directive, unless it was made again since.
    pub async fn close_directive_request(
        &self,
        device: &str,
        requested_at_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM directive_requests WHERE device = $1 AND requested_at_ms <= $2")
            .bind(device)
            .bind(requested_at_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn save_directive(
        &self,
        device: &str,
        seq: u64,
        envelope: &[u8],
        issued_at_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO directives (device, seq, envelope, issued_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (device) DO UPDATE SET seq = excluded.seq, envelope = excluded.envelope, issued_at_ms = excluded.issued_at_ms, expires_at_ms = excluded.expires_at_ms",
        )
        .bind(device)
        .bind(seq as i64)
        .bind(envelope)
        .bind(issued_at_ms)
        .bind(expires_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The last directive issued to each device: (device, seq, envelope, expires at).
    pub async fn directives(&self) -> Result<Vec<(String, i64, Vec<u8>, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT device, seq, envelope, expires_at_ms FROM directives ORDER BY device",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
            .collect()
    }

    // ---- ingest --------------------------------------------------------------------------

    /// Stores a batch idempotently by (device, item id), in one transaction, and says what
    /// to ack. A resent item is stored once. Drift windows are merged into the device's
    /// running totals once, when first stored; health replaces the latest when newer.
    ///
    /// The ack: when the batch follows on from what is stored (its `after` is at most the
    /// device's acknowledged id), the batch's last id, or further when batches stored earlier
    /// follow on from it (replicas may store a device's batches out of order); otherwise an
    /// earlier batch is missing, and the ack stays where it was (the agent resends from there
    /// if the missing batch never comes).
    pub async fn ingest_batch(
        &self,
        batch: &Batch,
        received_at_ms: i64,
    ) -> Result<IngestOutcome, StoreError> {
        self.ingest_batches(&[batch], received_at_ms)
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::Conflict("no batch".into())))
    }

    /// Several batches in one transaction (what the ingest worker has queued): one commit for
    /// all of them. The outer error fails the whole transaction (nothing is stored); an inner
    /// one refuses that batch alone (a device the server does not know), before it wrote.
    pub async fn ingest_batches(
        &self,
        batches: &[&Batch],
        received_at_ms: i64,
    ) -> Result<Vec<Result<IngestOutcome, StoreError>>, StoreError> {
        let mut tx = self.begin_write().await?;
        // Each batch locks its device's row; taking them in one order (by device) keeps two
        // replicas' transactions from waiting on each other in a circle.
        let mut order: Vec<usize> = (0..batches.len()).collect();
        order.sort_by(|&a, &b| batches[a].device.as_str().cmp(batches[b].device.as_str()));
        let mut outcomes: Vec<Option<Result<IngestOutcome, StoreError>>> =
            (0..batches.len()).map(|_| None).collect();
        for i in order {
            outcomes[i] = Some(self.ingest_in(&mut tx, batches[i], received_at_ms).await?);
        }
        tx.commit().await?;
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(StoreError::Conflict("not stored".into()))))
            .collect())
    }

    async fn ingest_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        batch: &Batch,
        received_at_ms: i64,
    ) -> Result<Result<IngestOutcome, StoreError>, StoreError> {
        let device = batch.device.as_str();
        // Locked on PostgreSQL (SQLite's write transaction holds the whole database): two
        // replicas storing the same device's batches take turns, so the later one sees what
        // the earlier one stored and acks past it.
        let lock = match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        };
        let acked: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT acked_up_to FROM devices WHERE id = $1{lock}"
        )))
        .bind(device)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(acked) = acked else {
            return Ok(Err(StoreError::Conflict(format!("no device {device}"))));
        };
        let acked = u64::try_from(acked).unwrap_or(0);
        let (mut stored, mut duplicates) = (0u64, 0u64);
        let mut latest_health: Option<(i64, String)> = None;
        // Telemetry totals change once per model release and batch, however many intervals
        // the batch carries (an agent back from a long offline period sends hundreds).
        let mut telemetry: BTreeMap<(String, i64), TelemetryDelta> = BTreeMap::new();
        // Many rows per statement: one round trip per chunk, not per item. RETURNING names
        // the rows that were new, so a resent item has no side effects a second time.
        for chunk in batch.items.chunks(INSERT_CHUNK) {
            let mut sql = String::from(
                "INSERT INTO items (device, id, kind, at_ms, model, release, body, received_at_ms) VALUES ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                match self.dialect {
                    // Plain `?` on SQLite: for each numbered `$N` the driver asks SQLite for
                    // the parameter's name, a linear scan, so a statement with a thousand of
                    // them spent most of its time there.
                    Dialect::Sqlite => sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?)"),
                    Dialect::Postgres => {
                        let p = i * 8;
                        sql.push_str(&format!(
                            "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                            p + 1,
                            p + 2,
                            p + 3,
                            p + 4,
                            p + 5,
                            p + 6,
                            p + 7,
                            p + 8
                        ));
                    }
                }
            }
            sql.push_str(" ON CONFLICT (device, id) DO NOTHING RETURNING id");
            // Only placeholders are formatted in; every value is bound.
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for item in chunk {
                let (model, release) = match &item.body {
                    ItemBody::Telemetry(t) => (Some(t.model.as_str().to_string()), Some(t.release)),
                    ItemBody::Drift(d) => (Some(d.model.as_str().to_string()), Some(d.release)),
                    ItemBody::Sample(s) => (Some(s.model.as_str().to_string()), Some(s.release)),
                    ItemBody::Event(e) => {
                        (e.model.as_ref().map(|m| m.as_str().to_string()), e.release)
                    }
                    ItemBody::Health(_) | ItemBody::Evictions(_) => (None, None),
                };
                let body = serde_json::to_string(&item.body).map_err(|e| StoreError::Corrupt {
                    what: format!("item {}", item.id),
                    cause: e.to_string(),
                })?;
                query = query
                    .bind(device)
                    .bind(item.id as i64)
                    .bind(item.body.kind())
                    .bind(item.at_ms)
                    .bind(model)
                    .bind(release.map(|r| r as i64))
                    .bind(body)
                    .bind(received_at_ms);
            }
            let new_ids: std::collections::HashSet<i64> = query
                .fetch_all(&mut **tx)
                .await?
                .iter()
                .map(|row| row.try_get::<i64, _>(0))
                .collect::<Result<_, _>>()?;
            for item in chunk {
                if !new_ids.contains(&(item.id as i64)) {
                    duplicates += 1;
                    continue;
                }
                stored += 1;
                match &item.body {
                    ItemBody::Health(h)
                        if latest_health
                            .as_ref()
                            .is_none_or(|(at, _)| *at <= item.at_ms) =>
                    {
                        latest_health = Some((item.at_ms, json_string(h)));
                    }
                    ItemBody::Drift(window) => {
                        merge_drift(tx, device, window).await?;
                    }
                    ItemBody::Telemetry(t) => {
                        telemetry
                            .entry((t.model.as_str().to_string(), t.release as i64))
                            .or_default()
                            .add(item.at_ms, t);
                    }
                    _ => {}
                }
            }
        }
        for ((model, release), delta) in &telemetry {
            merge_telemetry(tx, device, model, *release, delta).await?;
        }
        if let Some((at_ms, health)) = latest_health {
            sqlx::query(
                "UPDATE devices SET health = $1, health_at_ms = $2 WHERE id = $3 AND (health_at_ms IS NULL OR health_at_ms <= $2)",
            )
            .bind(health)
            .bind(at_ms)
            .bind(device)
            .execute(&mut **tx)
            .await?;
        }
        let last = batch.items.last().map(|i| i.id).unwrap_or(0);
        let follows_on = batch.after.is_none_or(|after| after <= acked);
        let mut ack_up_to = if follows_on { last } else { acked };
        if !follows_on {
            // Stored, but a batch before it is missing: on its way through another replica,
            // or lost. Its range is kept so that the ack can pass it once the gap closes,
            // instead of waiting for the agent to send it again.
            if let (Some(after), true) = (batch.after, last > 0) {
                sqlx::query(
                    "INSERT INTO batch_ranges (device, after_id, last_id) VALUES ($1, $2, $3) ON CONFLICT (device, after_id) DO UPDATE SET last_id = excluded.last_id",
                )
                .bind(device)
                .bind(after as i64)
                .bind(last as i64)
                .execute(&mut **tx)
                .await?;
            }
        } else if last > acked {
            // The gap is closed up to `last`: batches stored earlier that follow on from here
            // are acknowledged too.
            loop {
                let next: Option<i64> = sqlx::query_scalar(
                    "SELECT MAX(last_id) FROM batch_ranges WHERE device = $1 AND after_id <= $2 AND last_id > $2",
                )
                .bind(device)
                .bind(ack_up_to as i64)
                .fetch_one(&mut **tx)
                .await?;
                match next.and_then(|n| u64::try_from(n).ok()) {
                    Some(next) if next > ack_up_to => ack_up_to = next,
                    _ => break,
                }
            }
            sqlx::query("DELETE FROM batch_ranges WHERE device = $1 AND last_id <= $2")
                .bind(device)
                .bind(ack_up_to as i64)
                .execute(&mut **tx)
                .await?;
            sqlx::query("UPDATE devices SET acked_up_to = $1 WHERE id = $2")
                .bind(ack_up_to as i64)
                .bind(device)
                .execute(&mut **tx)
                .await?;
        }
        Ok(Ok(IngestOutcome {
            stored,
            duplicates,
            ack_up_to,
        }))
    }

    /// Stored items of one device, oldest id first, optionally of one kind.
    pub async fn items(
        &self,
        device: &str,
        kind: Option<&str>,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<StoredItem>, StoreError> {
        self.items_page(device, kind, after_id, limit, false).await
    }

    /// The newest `limit` items of a device (of one kind, when given) after `after_id`,
    /// oldest first: "the last N health reports".
    pub async fn items_newest(
        &self,
        device: &str,
        kind: Option<&str>,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<StoredItem>, StoreError> {
        let mut items = self.items_page(device, kind, after_id, limit, true).await?;
        items.reverse();
        Ok(items)
    }

    async fn items_page(
        &self,
        device: &str,
        kind: Option<&str>,
        after_id: i64,
        limit: i64,
        newest_first: bool,
    ) -> Result<Vec<StoredItem>, StoreError> {
        let order = if newest_first { "DESC" } else { "ASC" };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT device, id, kind, at_ms, model, release, body FROM items WHERE device = $1 AND id > $2 AND ($3 = '' OR kind = $3) ORDER BY id {order} LIMIT $4"
        )))
            .bind(device)
            .bind(after_id)
            .bind(kind.unwrap_or(""))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(item_from_row).collect()
    }

    /// Telemetry items of one model release across the fleet, oldest first.
    pub async fn telemetry(
        &self,
        model: &str,
        release: i64,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<StoredItem>, StoreError> {
        let rows = sqlx::query(
            "SELECT device, id, kind, at_ms, model, release, body FROM items WHERE kind = 'telemetry' AND model = $1 AND release = $2 AND at_ms >= $3 ORDER BY at_ms, device, id LIMIT $4",
        )
        .bind(model)
        .bind(release)
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(item_from_row).collect()
    }

    /// Count of stored items, by kind (for a device, or the whole fleet).
    pub async fn item_counts(
        &self,
        device: Option<&str>,
    ) -> Result<BTreeMap<String, i64>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, COUNT(*) FROM items WHERE ($1 = '' OR device = $1) GROUP BY kind ORDER BY kind",
        )
        .bind(device.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Merged drift of one model release, per device (and window length).
    pub async fn drift(&self, model: &str, release: i64) -> Result<Vec<MergedDrift>, StoreError> {
        let rows = sqlx::query(
            "SELECT device, model, release, window_len, windows, flagged, first_ms, last_ms, merged FROM drift_merged WHERE model = $1 AND release = $2 ORDER BY device, window_len",
        )
        .bind(model)
        .bind(release)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let merged: String = r.try_get(8)?;
                Ok(MergedDrift {
                    device: r.try_get(0)?,
                    model: r.try_get(1)?,
                    release: r.try_get(2)?,
                    window_len: r.try_get(3)?,
                    windows: r.try_get(4)?,
                    flagged: r.try_get(5)?,
                    first_ms: r.try_get(6)?,
                    last_ms: r.try_get(7)?,
                    merged: serde_json::from_str(&merged).map_err(|e| StoreError::Corrupt {
                        what: "merged drift window".into(),
                        cause: e.to_string(),
                    })?,
                })
            })
            .collect()
    }

    /// Telemetry totals of one model release, per device.
    pub async fn telemetry_totals(
        &self,
        model: &str,
        release: i64,
    ) -> Result<Vec<TelemetryTotals>, StoreError> {
        let rows = sqlx::query(
            "SELECT device, model, release, reports, inferences, errors, latency, first_ms, last_ms FROM telemetry_merged WHERE model = $1 AND release = $2 ORDER BY device",
        )
        .bind(model)
        .bind(release)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let latency: String = r.try_get(6)?;
                Ok(TelemetryTotals {
                    device: r.try_get(0)?,
                    model: r.try_get(1)?,
                    release: r.try_get(2)?,
                    reports: r.try_get(3)?,
                    inferences: r.try_get(4)?,
                    errors: r.try_get(5)?,
                    latency: parse_json(&latency, "merged latency histogram")?,
                    first_ms: r.try_get(7)?,
                    last_ms: r.try_get(8)?,
                })
            })
            .collect()
    }

    // ---- rollouts and the audit log -------------------------------------------------------

    /// Stores a new rollout with its audit entry; its `seq` is the next number and its id
    /// `r{seq}`. Returns the record as stored.
    pub async fn insert_rollout(
        &self,
        mut record: RolloutRecord,
        entry: AuditEntry,
    ) -> Result<RolloutRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM rollouts")
            .fetch_one(&mut *tx)
            .await?;
        record.seq = last.unwrap_or(0) + 1;
        record.id = format!("r{}", record.seq);
        record.state.id = record.id.clone();
        sqlx::query(
            "INSERT INTO rollouts (id, seq, model, version, phase, spec, state, created_by, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&record.id)
        .bind(record.seq)
        .bind(&record.model)
        .bind(&record.version)
        .bind(record.phase.as_str())
        .bind(json_string(&record.spec))
        .bind(json_string(&record.state))
        .bind(&record.created_by)
        .bind(record.created_at_ms)
        .bind(record.updated_at_ms)
        .execute(&mut *tx)
        .await?;
        let entry = AuditEntry {
            rollout: Some(record.id.clone()),
            ..entry
        };
        insert_audit(&mut tx, &entry).await?;
        tx.commit().await?;
        Ok(record)
    }

    /// Saves a rollout's state and the audit entries that explain it, together.
    pub async fn save_rollout(
        &self,
        id: &str,
        state: &RolloutState,
        entries: &[AuditEntry],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE rollouts SET phase = $1, state = $2, updated_at_ms = $3 WHERE id = $4",
        )
        .bind(state.phase.as_str())
        .bind(json_string(state))
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!("no rollout {id}")));
        }
        for entry in entries {
            insert_audit(&mut tx, entry).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!("{ROLLOUT_COLUMNS} WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rollout_from_row).transpose()
    }

    /// Rollouts, newest first; only the active ones (running, paused, rolling back) when
    /// `active_only`, and of one model when given.
    pub async fn rollouts(
        &self,
        model: Option<&str>,
        active_only: bool,
    ) -> Result<Vec<RolloutRecord>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "{ROLLOUT_COLUMNS} WHERE ($1 = '' OR model = $1) AND ($2 = 0 OR phase IN ('running', 'paused', 'rolling_back')) ORDER BY seq DESC"
        )))
        .bind(model.unwrap_or(""))
        .bind(i64::from(active_only))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rollout_from_row).collect()
    }

    /// Appends entries to the audit log.
    pub async fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for entry in entries {
            insert_audit(&mut tx, entry).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Audit entries after `after_id`, oldest first; of one rollout when given.
    pub async fn audit(
        &self,
        rollout: Option<&str>,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.audit_page(rollout, after_id, limit, false).await
    }

    /// The newest `limit` audit entries after `after_id` (of one rollout, when given), oldest
    /// first: what an operator asking for "the last N" wants.
    pub async fn audit_newest(
        &self,
        rollout: Option<&str>,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut entries = self.audit_page(rollout, after_id, limit, true).await?;
        entries.reverse();
        Ok(entries)
    }

    async fn audit_page(
        &self,
        rollout: Option<&str>,
        after_id: i64,
        limit: i64,
        newest_first: bool,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let order = if newest_first { "DESC" } else { "ASC" };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, at_ms, actor, action, rollout, subject, message, details FROM audit WHERE id > $1 AND ($2 = '' OR rollout = $2) ORDER BY id {order} LIMIT $3"
        )))
            .bind(after_id)
            .bind(rollout.unwrap_or(""))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let details: String = r.try_get(7)?;
                Ok(AuditEntry {
                    id: r.try_get(0)?,
                    at_ms: r.try_get(1)?,
                    actor: r.try_get(2)?,
                    action: r.try_get(3)?,
                    rollout: r.try_get(4)?,
                    subject: r.try_get(5)?,
                    message: r.try_get(6)?,
                    details: parse_json(&details, "audit details")?,
                })
            })
            .collect()
    }

    // ---- tokens --------------------------------------------------------------------------

    pub async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tokens (id, hash, role, name, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&token.id)
        .bind(&token.hash)
        .bind(&token.role)
        .bind(&token.name)
        .bind(token.created_at_ms)
        .bind(token.expires_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, hash, role, name, created_at_ms, revoked_at_ms, expires_at_ms FROM tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(TokenRecord {
                id: r.try_get(0)?,
                hash: r.try_get(1)?,
                role: r.try_get(2)?,
                name: r.try_get(3)?,
                created_at_ms: r.try_get(4)?,
                revoked_at_ms: r.try_get(5)?,
                expires_at_ms: r.try_get(6)?,
            })
        })
        .transpose()
    }
}

/// Adds one window into the device's running totals for its model release and length.
async fn merge_drift(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    device: &str,
    window: &DriftWindow,
) -> Result<(), StoreError> {
    let row = sqlx::query(
        "SELECT windows, flagged, first_ms, last_ms, merged FROM drift_merged WHERE device = $1 AND model = $2 AND release = $3 AND window_len = $4",
    )
    .bind(device)
    .bind(window.model.as_str())
    .bind(window.release as i64)
    .bind(i64::from(window.window))
    .fetch_optional(&mut **tx)
    .await?;
    let flagged = i64::from(window.drifted);
    match row {
        None => {
            sqlx::query(
                "INSERT INTO drift_merged (device, model, release, window_len, windows, flagged, first_ms, last_ms, merged) VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8)",
            )
            .bind(device)
            .bind(window.model.as_str())
            .bind(window.release as i64)
            .bind(i64::from(window.window))
            .bind(flagged)
            .bind(window.started_at_ms)
            .bind(window.ended_at_ms)
            .bind(json_string(window))
            .execute(&mut **tx)
            .await?;
        }
        Some(row) => {
            let windows: i64 = row.try_get(0)?;
            let flagged_before: i64 = row.try_get(1)?;
            let first: i64 = row.try_get(2)?;
            let last: i64 = row.try_get(3)?;
            let merged: String = row.try_get(4)?;
            let mut merged: DriftWindow =
                serde_json::from_str(&merged).map_err(|e| StoreError::Corrupt {
                    what: "merged drift window".into(),
                    cause: e.to_string(),
                })?;
            if let Err(e) = merged.merge(window) {
                // A window that does not fit the running totals (another profile's shape)
                // is kept as an item but not merged: say so rather than fail the batch.
                tracing::warn!(device, model = %window.model, release = window.release, "drift window not merged: {e}");
                return Ok(());
            }
            sqlx::query(
                "UPDATE drift_merged SET windows = $1, flagged = $2, first_ms = $3, last_ms = $4, merged = $5 WHERE device = $6 AND model = $7 AND release = $8 AND window_len = $9",
            )
            .bind(windows + 1)
            .bind(flagged_before + flagged)
            .bind(first.min(window.started_at_ms))
            .bind(last.max(window.ended_at_ms))
            .bind(json_string(&merged))
            .bind(device)
            .bind(window.model.as_str())
            .bind(window.release as i64)
            .bind(i64::from(window.window))
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// Telemetry of one model release, added up over the items of a batch.
#[derive(Default)]
struct TelemetryDelta {
    reports: i64,
    inferences: i64,
    errors: i64,
    latency: LatencyHistogram,
    first_ms: i64,
    last_ms: i64,
}

impl TelemetryDelta {
    fn add(&mut self, at_ms: i64, t: &Telemetry) {
        if self.reports == 0 {
            (self.first_ms, self.last_ms) = (at_ms, at_ms);
        }
        self.reports += 1;
        self.inferences = self
            .inferences
            .saturating_add(i64::try_from(t.inferences).unwrap_or(i64::MAX));
        self.errors = self
            .errors
            .saturating_add(i64::try_from(t.errors.values().sum::<u64>()).unwrap_or(i64::MAX));
        self.latency.merge(&t.latency);
        self.first_ms = self.first_ms.min(at_ms);
        self.last_ms = self.last_ms.max(at_ms);
    }
}

/// Adds `delta` to the device's running totals of one model release.
async fn merge_telemetry(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    device: &str,
    model: &str,
    release: i64,
    delta: &TelemetryDelta,
) -> Result<(), StoreError> {
    let row = sqlx::query(
        "SELECT reports, inferences, errors, latency, first_ms, last_ms FROM telemetry_merged WHERE device = $1 AND model = $2 AND release = $3",
    )
    .bind(device)
    .bind(model)
    .bind(release)
    .fetch_optional(&mut **tx)
    .await?;
    match row {
        None => {
            sqlx::query(
                "INSERT INTO telemetry_merged (device, model, release, reports, inferences, errors, latency, first_ms, last_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(device)
            .bind(model)
            .bind(release)
            .bind(delta.reports)
            .bind(delta.inferences)
            .bind(delta.errors)
            .bind(json_string(&delta.latency))
            .bind(delta.first_ms)
            .bind(delta.last_ms)
            .execute(&mut **tx)
            .await?;
        }
        Some(row) => {
            let reports: i64 = row.try_get(0)?;
            let inferences_before: i64 = row.try_get(1)?;
            let errors_before: i64 = row.try_get(2)?;
            let latency: String = row.try_get(3)?;
            let first: i64 = row.try_get(4)?;
            let last: i64 = row.try_get(5)?;
            let mut latency: LatencyHistogram = parse_json(&latency, "merged latency histogram")?;
            latency.merge(&delta.latency);
            sqlx::query(
                "UPDATE telemetry_merged SET reports = $1, inferences = $2, errors = $3, latency = $4, first_ms = $5, last_ms = $6 WHERE device = $7 AND model = $8 AND release = $9",
            )
            .bind(reports.saturating_add(delta.reports))
            .bind(inferences_before.saturating_add(delta.inferences))
            .bind(errors_before.saturating_add(delta.errors))
            .bind(json_string(&latency))
            .bind(first.min(delta.first_ms))
            .bind(last.max(delta.last_ms))
            .bind(device)
            .bind(model)
            .bind(release)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// Migration 2 adds the telemetry totals: add up what is already stored.
async fn backfill_telemetry(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
) -> Result<(), StoreError> {
    let mut after = (String::new(), -1i64);
    loop {
        let rows = sqlx::query(
            "SELECT device, id, at_ms, body FROM items WHERE kind = 'telemetry' AND (device > $1 OR (device = $1 AND id > $2)) ORDER BY device, id LIMIT 1000",
        )
        .bind(&after.0)
        .bind(after.1)
        .fetch_all(&mut **tx)
        .await?;
        if rows.is_empty() {
            return Ok(());
        }
        for r in &rows {
            let device: String = r.try_get(0)?;
            let at_ms: i64 = r.try_get(2)?;
            let body: String = r.try_get(3)?;
            if let Ok(ItemBody::Telemetry(t)) = serde_json::from_str::<ItemBody>(&body) {
                let mut delta = TelemetryDelta::default();
                delta.add(at_ms, &t);
                merge_telemetry(tx, &device, t.model.as_str(), t.release as i64, &delta).await?;
            }
            after = (device, r.try_get(1)?);
        }
    }
}

async fn insert_audit(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    entry: &AuditEntry,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit (at_ms, actor, action, rollout, subject, message, details) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(entry.at_ms)
    .bind(&entry.actor)
    .bind(&entry.action)
    .bind(entry.rollout.as_deref())
    .bind(entry.subject.as_deref())
    .bind(&entry.message)
    .bind(json_string(&entry.details))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

const ROLLOUT_COLUMNS: &str = "SELECT id, seq, model, version, phase, spec, state, created_by, created_at_ms, updated_at_ms FROM rollouts";

fn rollout_from_row(r: &AnyRow) -> Result<RolloutRecord, StoreError> {
    let spec: String = r.try_get(5)?;
    let state: String = r.try_get(6)?;
    let state: RolloutState = parse_json(&state, "rollout state")?;
    Ok(RolloutRecord {
        id: r.try_get(0)?,
        seq: r.try_get(1)?,
        model: r.try_get(2)?,
        version: r.try_get(3)?,
        phase: state.phase,
        spec: parse_json(&spec, "rollout spec")?,
        state,
        created_by: r.try_get(7)?,
        created_at_ms: r.try_get(8)?,
        updated_at_ms: r.try_get(9)?,
    })
}

const DEVICE_COLUMNS: &str = "SELECT id, labels, cert_serial, cert_not_after_ms, enrolled_at_ms, revoked_at_ms, directive_seq, presence, presence_at_ms, agent_version, state, state_at_ms, health, health_at_ms, acked_up_to FROM devices";

fn device_from_row(r: &AnyRow) -> Result<DeviceRecord, StoreError> {
    let labels: String = r.try_get(1)?;
    let state: Option<String> = r.try_get(10)?;
    let health: Option<String> = r.try_get(12)?;
    Ok(DeviceRecord {
        id: r.try_get(0)?,
        labels: parse_json(&labels, "device labels")?,
        cert_serial: r.try_get(2)?,
        cert_not_after_ms: r.try_get(3)?,
        enrolled_at_ms: r.try_get(4)?,
        revoked_at_ms: r.try_get(5)?,
        directive_seq: r.try_get(6)?,
        presence: r.try_get(7)?,
        presence_at_ms: r.try_get(8)?,
        agent_version: r.try_get(9)?,
        state: state.map(|s| parse_json(&s, "device state")).transpose()?,
        state_at_ms: r.try_get(11)?,
        health: health
            .map(|s| parse_json(&s, "device health"))
            .transpose()?,
        health_at_ms: r.try_get(13)?,
        acked_up_to: r.try_get(14)?,
    })
}

/// A device's reported state, unless a newer one is stored already.
const UPDATE_STATE: &str = "UPDATE devices SET state = $1, state_at_ms = $2, agent_version = $3 WHERE id = $4 AND (state_at_ms IS NULL OR state_at_ms <= $2)";
/// A device's online or offline status, unless a newer one is stored already.
const UPDATE_PRESENCE: &str = "UPDATE devices SET presence = $1, presence_at_ms = $2, agent_version = $3 WHERE id = $4 AND (presence_at_ms IS NULL OR presence_at_ms <= $2)";

const MODEL_COLUMNS: &str = "SELECT name, version, release, sha256, size, profile_sha256, profile_size, manifest, pushed_at_ms FROM models";

/// An assignment from four columns of a row, starting at `first`: device, model, version,
/// assigned at.
fn assignment_from_row(r: &AnyRow, first: usize) -> Result<Assignment, StoreError> {
    Ok(Assignment {
        device: r.try_get(first)?,
        model: r.try_get(first + 1)?,
        version: r.try_get(first + 2)?,
        assigned_at_ms: r.try_get(first + 3)?,
    })
}

fn model_from_row(r: &AnyRow) -> Result<ModelRecord, StoreError> {
    Ok(ModelRecord {
        name: r.try_get(0)?,
        version: r.try_get(1)?,
        release: r.try_get(2)?,
        sha256: r.try_get(3)?,
        size: r.try_get(4)?,
        profile_sha256: r.try_get(5)?,
        profile_size: r.try_get(6)?,
        manifest: r.try_get(7)?,
        pushed_at_ms: r.try_get(8)?,
    })
}

fn item_from_row(r: &AnyRow) -> Result<StoredItem, StoreError> {
    let body: String = r.try_get(6)?;
    Ok(StoredItem {
        device: r.try_get(0)?,
        id: r.try_get(1)?,
        kind: r.try_get(2)?,
        at_ms: r.try_get(3)?,
        model: r.try_get(4)?,
        release: r.try_get(5)?,
        body: parse_json(&body, "item body")?,
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        what: what.to_string(),
        cause: e.to_string(),
    })
}

fn json_string<T: Serialize>(value: &T) -> String {
    // Serialising our own plain data types cannot fail (no maps with non-string keys, no
    // failing Serialize impls).
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
