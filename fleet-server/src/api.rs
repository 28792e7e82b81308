//! The REST API (`/api/v1/…`), its OpenAPI document, and `/metrics`.
//!
//! Every route but the OpenAPI document, the health check and `/metrics` needs a bearer token;
//! each handler states the least role it needs. Errors are JSON with a stable code:
//! `{"error": {"code": "not_found", "message": "no device dev-9"}}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use fleet_protocol::drift::{score, DriftWindow};
use fleet_protocol::histogram::LatencyHistogram;
use fleet_protocol::{ModelName, ModelVersion, ReferenceProfile};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::{self, AuthError, Caller, Role};
use crate::fleet::{Fleet, FleetError};
use crate::registry::{PushOutcome, Registry, RegistryError};
use crate::rollout::engine::Command;
use crate::rollout::RolloutRequest;
use crate::rollout_runner::Actor;
use crate::store::{now_ms, AuditEntry, MergedDrift, ModelRecord, StoreError};

/// The OpenAPI 3.1 document, served as is.
pub const OPENAPI: &str = include_str!("openapi.json");

/// An API error: HTTP status, stable code, human message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "API request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            e @ StoreError::NotLeader(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", e.to_string())
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> ApiError {
        match e {
            FleetError::NotFound(m) => ApiError::not_found(m),
            FleetError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            FleetError::Invalid(m) => ApiError::invalid(m),
            FleetError::Registry(e) => e.into(),
            FleetError::Unavailable(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", m)
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::Untrusted(_) | RegistryError::NoTrustedKeys => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "untrusted_manifest",
                e.to_string(),
            ),
            RegistryError::BadEnvelope(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_manifest", e.to_string())
            }
            RegistryError::Mismatch(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "artifact_mismatch",
                e.to_string(),
            ),
            RegistryError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            RegistryError::NotFound(m) => ApiError::not_found(format!("no model {m}")),
            RegistryError::Store(e) => e.into(),
            RegistryError::Io(e) => ApiError::internal(e),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Who calls: the bearer token checked against the store.
async fn authenticate(fleet: &Fleet, headers: &HeaderMap) -> ApiResult<Caller> {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // An expired token has its own code, so a client can tell its operator to get a new one.
    let unauthorized = |e: AuthError| {
        let code = match e {
            AuthError::Expired { .. } => "token_expired",
            _ => "unauthorized",
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string())
    };
    let Some(presented) = presented else {
        return Err(unauthorized(AuthError::Missing));
    };
    auth::authenticate(&fleet.store, presented)
        .await
        .map_err(unauthorized)
}

/// The layer in front of every route that needs a token: the caller is authenticated before
/// anything of the request is read or parsed (an unauthenticated client learns nothing of what
/// a handler would accept, and costs no upload), and handed to the handler as an
/// `Extension<Caller>` for its role check.
async fn require_token(
    State(fleet): State<Arc<Fleet>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authenticate(&fleet, request.headers()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refused) => {
            let mut response = refused.into_response();
            if request
                .headers()
                .contains_key(axum::http::header::CONTENT_LENGTH)
                || request
                    .headers()
                    .contains_key(axum::http::header::TRANSFER_ENCODING)
            {
                // The body is not read: the connection cannot carry another request.
                response.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            response
        }
    }
}

/// Checks that the caller's role is at least `needed`.
fn require(caller: &Caller, needed: Role) -> ApiResult<()> {
    let role = caller.role;
    if role < needed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this needs the {needed} role; the token has {role}"),
        ));
    }
    Ok(())
}

/// Records an operator's action in the audit log. The action has happened: a failure to
/// record it is logged, not turned into a failed request.
async fn audit(
    fleet: &Fleet,
    caller: &Caller,
    action: &str,
    subject: &str,
    message: String,
    details: Value,
) {
    let entry = AuditEntry {
        id: 0,
        at_ms: now_ms(),
        actor: caller.actor(),
        action: action.to_string(),
        rollout: None,
        subject: Some(subject.to_string()),
        message,
        details,
    };
    if let Err(e) = fleet.store.append_audit(&[entry]).await {
        tracing::error!(error = %e, action, subject, "audit entry not stored");
    }
}

/// The router, with every route.
pub fn router(fleet: Arc<Fleet>) -> Router {
    let max_upload = usize::try_from(fleet.config.api.max_upload_bytes).unwrap_or(usize::MAX);
    // Every route here needs a token; `require_token` checks it before the handler runs.
    let protected = Router::new()
        .route("/api/v1/whoami", get(whoami))
        .route(
            "/api/v1/models",
            get(list_models)
                .post(push_model)
                .layer(DefaultBodyLimit::max(max_upload)),
        )
        .route(
            "/api/v1/models/{name}/{version}",
            get(show_model).delete(delete_model),
        )
        .route(
            "/api/v1/models/{name}/{version}/telemetry",
            get(model_telemetry),
        )
        .route("/api/v1/models/{name}/{version}/drift", get(model_drift))
        .route(
            "/api/v1/models/{name}/{version}/profile",
            get(model_profile),
        )
        .route("/api/v1/fleet", get(fleet_overview))
        .route("/api/v1/cluster", get(cluster_status))
        .route("/api/v1/devices", get(list_devices).post(enroll_device))
        .route("/api/v1/devices/{id}", get(show_device))
        .route("/api/v1/devices/{id}/assign", post(assign_model))
        .route(
            "/api/v1/devices/{id}/models/{model}",
            axum::routing::delete(unassign_model),
        )
        .route("/api/v1/devices/{id}/revoke", post(revoke_device))
        .route("/api/v1/devices/{id}/items", get(device_items))
        .route("/api/v1/tokens", post(create_token))
        .route("/api/v1/rollouts", get(list_rollouts).post(create_rollout))
        .route("/api/v1/rollouts/{id}", get(show_rollout))
        .route("/api/v1/rollouts/{id}/{command}", post(command_rollout))
        .route("/api/v1/audit", get(audit_log))
        .route_layer(axum::middleware::from_fn_with_state(
            fleet.clone(),
            require_token,
        ));
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/health", get(health))
        .route("/metrics", get(metrics))
        .merge(protected)
        .merge(crate::console::router())
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::middleware::from_fn_with_state(
            fleet.clone(),
            count_responses,
        ))
        .with_state(fleet)
}

async fn count_responses(
    State(fleet): State<Arc<Fleet>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().to_string();
    let response = next.run(request).await;
    fleet
        .metrics
        .api_response(&method, response.status().as_u16());
    response
}

async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Who the token belongs to and what it may do: the console signs in with it.
async fn whoami(Extension(caller): Extension<Caller>) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    Ok(Json(json!({
        "name": caller.name,
        "role": caller.role.as_str(),
        "token_id": caller.token_id,
    })))
}

async fn metrics(State(fleet): State<Arc<Fleet>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        fleet.metrics.render(),
    )
}

// ---- models ------------------------------------------------------------------------------

fn check_model_path(name: &str, version: &str) -> ApiResult<()> {
    ModelName::new(name).map_err(|e| ApiError::invalid(e.to_string()))?;
    ModelVersion::new(version).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(())
}

/// The model version a path names: a valid name and version, in the registry (else 404).
async fn find_model(fleet: &Fleet, name: &str, version: &str) -> ApiResult<ModelRecord> {
    check_model_path(name, version)?;
    fleet
        .store
        .model(name, version)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no model {name}@{version}")))
}

async fn list_models(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let models = fleet.store.models().await?;
    Ok(Json(json!({ "models": models })))
}

/// `multipart/form-data` with the parts `manifest` (the signed envelope, first), `artifact`
/// and, when the manifest names one, `profile`. Blobs stream to disk as they arrive.
async fn push_model(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    mut multipart: Multipart,
) -> ApiResult<Response> {
    let result = push_parts(&fleet, &caller, &mut multipart).await;
    if result.is_err() {
        // Read the rest of a refused upload (it is bounded by the body limit) so the client,
        // still sending, gets this answer rather than a connection reset mid-body.
        let drain = async {
            while let Ok(Some(mut field)) = multipart.next_field().await {
                while let Ok(Some(_)) = field.chunk().await {}
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), drain).await;
    }
    result
}

async fn push_parts(
    fleet: &Fleet,
    caller: &Caller,
    multipart: &mut Multipart,
) -> ApiResult<Response> {
    require(caller, Role::Operator)?;
    let bad_part = |e: axum::extract::multipart::MultipartError| {
        ApiError::new(
            e.status(),
            "invalid_request",
            format!("upload: {}", e.body_text()),
        )
    };
    let mut manifest = None;
    let mut artifact = None;
    let mut profile = None;
    while let Some(mut field) = multipart.next_field().await.map_err(bad_part)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "manifest" => {
                let bytes = field.bytes().await.map_err(bad_part)?;
                if bytes.len() > fleet_protocol::limits::MAX_CONTROL_MESSAGE_BYTES {
                    return Err(ApiError::invalid("the manifest is larger than 1 MiB"));
                }
                let (_, m) = fleet.registry.verify_envelope(&bytes)?;
                manifest = Some((bytes.to_vec(), m));
            }
            "artifact" | "profile" => {
                let Some((_, m)) = &manifest else {
                    return Err(ApiError::invalid(
                        "send the `manifest` part before the artifact and profile",
                    ));
                };
                let limit = if name == "artifact" {
                    m.size
                } else {
                    m.profile_size.unwrap_or(0)
                };
                let mut staged = fleet
                    .registry
                    .blobs()
                    .stage()
                    .await
                    .map_err(ApiError::internal)?;
                staged.limit(limit);
                while let Some(chunk) = field.chunk().await.map_err(bad_part)? {
                    staged.write(&chunk).await?;
                }
                if name == "artifact" {
                    artifact = Some(staged);
                } else {
                    profile = Some(staged);
                }
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown part {other:?}; expected manifest, artifact, profile"
                )))
            }
        }
    }
    let Some((manifest_bytes, manifest)) = manifest else {
        return Err(ApiError::invalid("no `manifest` part"));
    };
    let Some(artifact) = artifact else {
        return Err(ApiError::invalid("no `artifact` part"));
    };
    let outcome = fleet
        .registry
        .push(&manifest_bytes, &manifest, artifact, profile)
        .await?;
    let record = fleet
        .store
        .model(manifest.name.as_str(), manifest.version.as_str())
        .await?
        .ok_or_else(|| ApiError::internal("the pushed model vanished"))?;
    let status = match outcome {
        PushOutcome::Stored => StatusCode::CREATED,
        PushOutcome::AlreadyPresent => StatusCode::OK,
    };
    if outcome == PushOutcome::Stored {
        audit(
            fleet,
            caller,
            "model_pushed",
            &format!("{}@{}", record.name, record.version),
            format!(
                "{} pushed {}@{} (release {}, sha256 {})",
                caller.actor(),
                record.name,
                record.version,
                record.release,
                record.sha256
            ),
            json!({"release": record.release, "sha256": record.sha256, "size": record.size}),
        )
        .await;
    }
    Ok((
        status,
        Json(json!({ "model": record, "stored": outcome == PushOutcome::Stored })),
    )
        .into_response())
}

async fn show_model(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let record = find_model(&fleet, &name, &version).await?;
    let (envelope, manifest) = Registry::manifest_of(&record)?;
    Ok(Json(json!({
        "model": record,
        "manifest": manifest,
        "signed_by": envelope.key_id.to_string(),
    })))
}

/// The version's reference profile (what its drift is judged against): per feature the bin
/// edges and reference proportions, the prediction's, and the calibrated thresholds.
async fn model_profile(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let record = find_model(&fleet, &name, &version).await?;
    match fleet.registry.profile(&record).await? {
        Some(profile) => Ok(Json(json!({ "profile": profile }))),
        None => Err(ApiError::not_found(format!(
            "{name}@{version} was pushed without a reference profile"
        ))),
    }
}

async fn delete_model(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    require(&caller, Role::Operator)?;
    check_model_path(&name, &version)?;
    fleet.registry.delete(&name, &version).await?;
    audit(
        &fleet,
        &caller,
        "model_deleted",
        &format!("{name}@{version}"),
        format!("{} deleted {name}@{version}", caller.actor()),
        json!({}),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct TelemetryQuery {
    #[serde(default)]
    since_ms: i64,
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    1000
}

/// Telemetry of one model version across the fleet: the series (one row per device and
/// interval) and the totals, with latency quantiles from the merged histograms.
async fn model_telemetry(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
    Query(q): Query<TelemetryQuery>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let record = find_model(&fleet, &name, &version).await?;
    let items = fleet
        .store
        .telemetry(&name, record.release, q.since_ms, q.limit.clamp(1, 10_000))
        .await?;
    let mut series = Vec::new();
    let mut total_latency = LatencyHistogram::default();
    let mut inferences = 0u64;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut devices = std::collections::BTreeSet::new();
    for item in items {
        let Ok(t) = serde_json::from_value::<fleet_protocol::outbox::ItemBody>(item.body) else {
            continue;
        };
        let fleet_protocol::outbox::ItemBody::Telemetry(t) = t else {
            continue;
        };
        inferences += t.inferences;
        for (kind, n) in &t.errors {
            *errors.entry(kind.clone()).or_default() += n;
        }
        total_latency.merge(&t.latency);
        devices.insert(item.device.clone());
        series.push(json!({
            "device": item.device,
            "at_ms": item.at_ms,
            "interval_ms": t.interval_ms,
            "inferences": t.inferences,
            "errors": t.errors,
            "p50_us": t.latency.quantile_us(0.5),
            "p95_us": t.latency.quantile_us(0.95),
        }));
    }
    Ok(Json(json!({
        "model": name,
        "version": version,
        "release": record.release,
        "totals": {
            "devices": devices.len(),
            "inferences": inferences,
            "errors": errors,
            "p50_us": total_latency.quantile_us(0.5),
            "p95_us": total_latency.quantile_us(0.95),
            "p99_us": total_latency.quantile_us(0.99),
        },
        "series": series,
    })))
}

#[derive(Debug, Deserialize)]
struct DriftQuery {
    /// Group devices into cohorts by this label's value.
    #[serde(default)]
    label: Option<String>,
}

/// Drift of one model version: per device (its windows merged, counts added), and per cohort
/// when `?label=KEY` is given; every merged window re-scored against the model's profile.
async fn model_drift(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
    Query(q): Query<DriftQuery>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let record = find_model(&fleet, &name, &version).await?;
    let profile = fleet.registry.profile(&record).await?;
    let merged = fleet.store.drift(&name, record.release).await?;
    let devices: Vec<Value> = merged
        .iter()
        .map(|m| {
            drift_summary(
                json!({"device": m.device}),
                m,
                profile.as_ref(),
                m.merged.clone(),
            )
        })
        .collect();
    let mut cohorts = Vec::new();
    if let Some(key) = &q.label {
        let mut by_value: BTreeMap<(String, i64), Vec<&MergedDrift>> = BTreeMap::new();
        for device in fleet.store.devices().await? {
            let Some(value) = device.labels.get(key) else {
                continue;
            };
            for m in merged.iter().filter(|m| m.device == device.id) {
                by_value
                    .entry((value.clone(), m.window_len))
                    .or_default()
                    .push(m);
            }
        }
        for ((value, _), parts) in by_value {
            let mut window = parts[0].merged.clone();
            let mut total = MergedDrift {
                merged: window.clone(),
                ..parts[0].clone()
            };
            for part in &parts[1..] {
                if window.merge(&part.merged).is_err() {
                    continue;
                }
                total.windows += part.windows;
                total.flagged += part.flagged;
                total.first_ms = total.first_ms.min(part.first_ms);
                total.last_ms = total.last_ms.max(part.last_ms);
            }
            let devices: Vec<&str> = parts.iter().map(|p| p.device.as_str()).collect();
            cohorts.push(drift_summary(
                json!({"label": key, "value": value, "devices": devices}),
                &total,
                profile.as_ref(),
                window,
            ));
        }
    }
    Ok(Json(json!({
        "model": name,
        "version": version,
        "release": record.release,
        "profile": record.profile_sha256,
        "devices": devices,
        "cohorts": cohorts,
    })))
}

fn drift_summary(
    mut head: Value,
    m: &MergedDrift,
    profile: Option<&ReferenceProfile>,
    mut window: DriftWindow,
) -> Value {
    // Re-score the merged counts: the merged window is judged as one long window.
    let rescored = profile.is_some_and(|p| score(p, &mut window).is_ok());
    let features: Vec<Value> = window
        .features
        .iter()
        .map(|f| json!({"index": f.index, "psi": f.psi, "effect": f.effect, "drifted": f.drifted, "cusum_alarms": f.cusum_alarms}))
        .collect();
    if let Value::Object(map) = &mut head {
        for (k, v) in [
            ("window_len", json!(m.window_len)),
            ("windows", json!(m.windows)),
            ("flagged_windows", json!(m.flagged)),
            ("samples", json!(window.samples)),
            ("first_ms", json!(m.first_ms)),
            ("last_ms", json!(m.last_ms)),
            ("rescored", json!(rescored)),
            ("drifted", json!(window.drifted)),
            ("drifted_share", json!(window.drifted_share)),
            ("max_score", json!(window.max_score)),
            (
                "prediction_psi",
                json!(window.prediction.as_ref().map(|p| p.psi)),
            ),
            ("features", json!(features)),
        ] {
            map.insert(k.to_string(), v);
        }
    }
    head
}

// ---- devices -----------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct DeviceListQuery {
    /// `key=value[,key=value]`: every label must match.
    #[serde(default)]
    label: Option<String>,
    /// online, offline, never_seen or revoked.
    #[serde(default)]
    presence: Option<String>,
    /// Devices with this model active (and with `version`, that version).
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    version: Option<String>,
    /// Part of the device id.
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    offset: usize,
    /// At most this many (default: all).
    #[serde(default)]
    limit: Option<usize>,
}

/// Devices, filtered and paged on the server (a console showing 50 of 1,000 devices fetches
/// 50), with the number that matched.
async fn list_devices(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<DeviceListQuery>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let empty = |s: Option<String>| s.filter(|v| !v.trim().is_empty());
    let presence = empty(q.presence);
    if let Some(p) = &presence {
        if !["online", "offline", "never_seen", "revoked"].contains(&p.as_str()) {
            return Err(ApiError::invalid(format!(
                "presence {p:?}: expected online, offline, never_seen or revoked"
            )));
        }
    }
    let filter = crate::overview::DeviceFilter {
        labels: crate::overview::DeviceFilter::parse_labels(q.label.as_deref().unwrap_or(""))
            .map_err(ApiError::invalid)?,
        presence,
        model: empty(q.model),
        version: empty(q.version),
        search: empty(q.q),
    };
    let matched: Vec<_> = fleet
        .store
        .devices()
        .await?
        .into_iter()
        .filter(|d| filter.matches(d))
        .collect();
    let total = matched.len();
    // Each device with its assignments (what it should run), beside what it reports.
    let mut assignments: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (device, model, version) in fleet.store.all_assignments().await? {
        assignments
            .entry(device)
            .or_default()
            .push(json!({"model": model, "version": version}));
    }
    let page: Vec<Value> = matched
        .into_iter()
        .skip(q.offset)
        .take(q.limit.unwrap_or(usize::MAX).min(10_000))
        .map(|d| {
            let assigned = assignments.remove(&d.id).unwrap_or_default();
            let mut v = json!(d);
            if let Some(o) = v.as_object_mut() {
                o.insert("assignments".into(), Value::Array(assigned));
            }
            v
        })
        .collect();
    Ok(Json(
        json!({ "devices": page, "total": total, "offset": q.offset }),
    ))
}

/// The fleet at a glance: devices by presence, and per model the versions running, the
/// versions assigned, and how the assigned devices stand (on target, updating, failed, behind).
async fn fleet_overview(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let devices = fleet.store.devices().await?;
    let assignments = fleet.store.all_assignments().await?;
    let overview = crate::overview::overview(&devices, &assignments);
    let active = fleet.store.rollouts(None, true).await?.len();
    Ok(Json(json!({
        "devices": overview.devices,
        "models": overview.models,
        "active_rollouts": active,
    })))
}

/// Which replica answered, and which leads (a single server always leads).
async fn cluster_status(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let lease = match fleet.leadership.replica_name() {
        Some(_) => crate::cluster::current_lease(&fleet.store).await?,
        None => None,
    };
    Ok(Json(json!({
        "replica": fleet.leadership.replica_name(),
        "leading": fleet.leadership.is_leader(),
        "lease": lease,
    })))
}

#[derive(Debug, Deserialize, Serialize)]
pub struct EnrollRequest {
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the device's local inference API listens (written into its agent.toml).
    #[serde(default)]
    pub api_listen: Option<String>,
}

async fn enroll_device(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<EnrollRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    require(&caller, Role::Operator)?;
    let Json(request) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let bundle = fleet
        .enroll(&request.id, request.labels.clone(), request.api_listen)
        .await?;
    audit(
        &fleet,
        &caller,
        "device_enrolled",
        &request.id,
        format!("{} enrolled {}", caller.actor(), request.id),
        json!({"labels": request.labels}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(json!({ "bundle": bundle }))))
}

async fn show_device(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let device = fleet
        .store
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {id}")))?;
    let assignments = fleet.store.assignments(&id).await?;
    let items = fleet.store.item_counts(Some(&id)).await?;
    Ok(Json(json!({
        "device": device,
        "assignments": assignments,
        "items": items,
    })))
}

#[derive(Debug, Deserialize, Serialize)]
pub struct AssignRequest {
    pub model: String,
    pub version: String,
}

async fn assign_model(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<AssignRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Operator)?;
    let Json(request) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let seq = fleet.assign(&id, &request.model, &request.version).await?;
    audit(
        &fleet,
        &caller,
        "model_assigned",
        &id,
        format!(
            "{} assigned {}@{} to {id}",
            caller.actor(),
            request.model,
            request.version
        ),
        json!({"model": request.model, "version": request.version, "directive_seq": seq}),
    )
    .await;
    Ok(Json(json!({ "device": id, "directive_seq": seq })))
}

async fn unassign_model(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path((id, model)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Operator)?;
    let seq = fleet.unassign(&id, &model).await?;
    audit(
        &fleet,
        &caller,
        "model_unassigned",
        &id,
        format!("{} removed {model} from {id}", caller.actor()),
        json!({"model": model, "directive_seq": seq}),
    )
    .await;
    Ok(Json(json!({ "device": id, "directive_seq": seq })))
}

async fn revoke_device(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Admin)?;
    let newly = fleet.revoke(&id).await?;
    audit(
        &fleet,
        &caller,
        "device_revoked",
        &id,
        format!("{} revoked {id}", caller.actor()),
        json!({"already_revoked": !newly}),
    )
    .await;
    Ok(Json(
        json!({ "device": id, "revoked": true, "already_revoked": !newly }),
    ))
}

#[derive(Debug, Deserialize)]
struct ItemsQuery {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    after_id: i64,
    #[serde(default = "default_limit")]
    limit: i64,
    /// The newest `limit` items rather than the oldest (the reply is oldest first either way).
    #[serde(default)]
    newest: bool,
}

async fn device_items(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<ItemsQuery>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    if fleet.store.device(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("no device {id}")));
    }
    let (kind, limit) = (q.kind.as_deref(), q.limit.clamp(1, 10_000));
    let items = if q.newest {
        fleet
            .store
            .items_newest(&id, kind, q.after_id, limit)
            .await?
    } else {
        fleet.store.items(&id, kind, q.after_id, limit).await?
    };
    Ok(Json(json!({ "items": items })))
}

// ---- tokens ------------------------------------------------------------------------------

#[derive(Debug, Deserialize, Serialize)]
pub struct TokenRequest {
    pub role: Role,
    #[serde(default)]
    pub name: String,
    /// Seconds until the token is refused (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

async fn create_token(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<TokenRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    require(&caller, Role::Admin)?;
    let Json(request) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let lifetime = request.expires_in_secs.map(std::time::Duration::from_secs);
    if let Some(lifetime) = lifetime {
        auth::check_lifetime(lifetime)
            .map_err(|why| ApiError::invalid(format!("expires_in_secs: {why}")))?;
    }
    let token =
        auth::create_token_expiring(&fleet.store, request.role, &request.name, lifetime).await?;
    audit(
        &fleet,
        &caller,
        "token_created",
        &token.id,
        format!(
            "{} created a {} token {:?} ({})",
            caller.actor(),
            request.role,
            request.name,
            token.id
        ),
        json!({"role": request.role, "name": request.name, "expires_at_ms": token.expires_at_ms}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(json!(token))))
}

// ---- rollouts and the audit log ----------------------------------------------------------

#[derive(Debug, Deserialize)]
struct RolloutQuery {
    #[serde(default)]
    model: Option<String>,
    /// Only running, paused or rolling back.
    #[serde(default)]
    active: bool,
}

async fn list_rollouts(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<RolloutQuery>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let rollouts: Vec<Value> = fleet
        .store
        .rollouts(q.model.as_deref(), q.active)
        .await?
        .iter()
        .map(rollout_summary)
        .collect();
    Ok(Json(json!({ "rollouts": rollouts })))
}

/// A rollout's one-line view: where it is, and its devices by outcome.
fn rollout_summary(r: &crate::store::RolloutRecord) -> Value {
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    for d in r.state.devices.values() {
        *outcomes.entry(d.outcome.as_str()).or_default() += 1;
    }
    json!({
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "phase": r.phase,
        "stage": r.state.stage + 1,
        "stages": r.spec.stages.len(),
        "reason": r.state.reason,
        "devices": r.state.devices.len(),
        "outcomes": outcomes,
        "soak_started_ms": r.state.soak_started_ms,
        "soak_secs": r.spec.stages.get(r.state.stage).map(|s| s.soak_secs),
        "created_by": r.created_by,
        "created_at_ms": r.created_at_ms,
        "updated_at_ms": r.updated_at_ms,
        "finished_ms": r.state.finished_ms,
    })
}

async fn create_rollout(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<RolloutRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    require(&caller, Role::Operator)?;
    let Json(request) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    check_model_path(&request.model, &request.version)?;
    let record = fleet
        .create_rollout(request, &Actor(caller.actor()))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "rollout": rollout_summary(&record), "spec": record.spec })),
    ))
}

async fn show_rollout(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let record = fleet
        .store
        .rollout(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))?;
    Ok(Json(json!({
        "rollout": rollout_summary(&record),
        "spec": record.spec,
        "devices": record.state.devices,
        "evaluations": record.state.evaluations,
    })))
}

#[derive(Debug, Deserialize, Default)]
struct CommandBody {
    /// Why, for the audit log.
    #[serde(default)]
    reason: Option<String>,
}

async fn command_rollout(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path((id, command)): Path<(String, String)>,
    body: Option<Json<CommandBody>>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Operator)?;
    let command = match command.as_str() {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "abort" => Command::Abort,
        "rollback" => Command::Rollback,
        other => {
            return Err(ApiError::not_found(format!(
                "no rollout command {other:?}: pause, resume, abort or rollback"
            )))
        }
    };
    let mut actor = caller.actor();
    if let Some(reason) = body.and_then(|Json(b)| b.reason) {
        actor = format!("{actor}, because: {reason}");
    }
    let record = fleet.command_rollout(&id, command, &Actor(actor)).await?;
    Ok(Json(json!({ "rollout": rollout_summary(&record) })))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    rollout: Option<String>,
    #[serde(default)]
    after_id: i64,
    #[serde(default = "default_limit")]
    limit: i64,
    /// The newest `limit` entries rather than the oldest (the reply is oldest first either way).
    #[serde(default)]
    newest: bool,
}

/// The audit log: operators' actions and the engine's decisions, oldest first.
async fn audit_log(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Value>> {
    require(&caller, Role::Viewer)?;
    let (rollout, limit) = (q.rollout.as_deref(), q.limit.clamp(1, 10_000));
    let entries = if q.newest {
        fleet.store.audit_newest(rollout, q.after_id, limit).await?
    } else {
        fleet.store.audit(rollout, q.after_id, limit).await?
    };
    Ok(Json(json!({ "entries": entries })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_is_json_and_names_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(doc["openapi"].as_str().unwrap().get(..2), Some("3."));
        let paths = doc["paths"].as_object().unwrap();
        for route in [
            "/api/v1/openapi.json",
            "/api/v1/health",
            "/api/v1/whoami",
            "/metrics",
            "/api/v1/models",
            "/api/v1/models/{name}/{version}",
            "/api/v1/models/{name}/{version}/telemetry",
            "/api/v1/models/{name}/{version}/drift",
            "/api/v1/models/{name}/{version}/profile",
            "/api/v1/fleet",
            "/api/v1/devices",
            "/api/v1/devices/{id}",
            "/api/v1/devices/{id}/assign",
            "/api/v1/devices/{id}/models/{model}",
            "/api/v1/devices/{id}/revoke",
            "/api/v1/devices/{id}/items",
            "/api/v1/tokens",
            "/api/v1/rollouts",
            "/api/v1/rollouts/{id}",
            "/api/v1/rollouts/{id}/{command}",
            "/api/v1/audit",
        ] {
            assert!(paths.contains_key(route), "{route} is not documented");
        }
        let source = include_str!("api.rs");
        // Spelled in two pieces so that this line does not count itself.
        let routed = source.matches(concat!(".", "route(")).count();
        assert_eq!(
            routed,
            paths.len(),
            "routes and documented paths differ in number"
        );
    }
}
