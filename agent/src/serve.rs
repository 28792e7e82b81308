//! The local inference API: the Open Inference Protocol (KServe v2 REST) as Triton speaks it,
//! plus `/metrics` in Prometheus text format.
//!
//! Applications on the device talk to this API with the clients they already have (for
//! example `tritonclient.http` with `binary_data=False`, or plain JSON over curl). Only the
//! JSON tensor form is supported; the binary-data extension is refused with a clear message.
//!
//! Models are served from a [`ModelTable`]: an atomically swapped map from model name to the
//! active [`ServingModel`]. A request takes the model's `Arc` when it starts and finishes on
//! that plan even if the installer swaps in another version meanwhile; later requests get the
//! new version. Nothing fails across a swap, and no lock is held while a model runs.
//!
//! Inference is CPU-bound and synchronous (tract), so it runs on tokio's blocking pool behind
//! a semaphore: the pool can grow to hundreds of threads, and letting every waiting request
//! run at once on a small device would only make all of them slow.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleet_protocol::tensor::Dim;
use fleet_protocol::{ModelName, ModelVersion, Tensor, TensorSpec};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::metrics::{Metrics, KIND_BAD_REQUEST, KIND_RUNTIME, KIND_TOO_LARGE};
use crate::runtime::{Plan, RuntimeError};

/// The name the server reports in its metadata.
pub const SERVER_NAME: &str = "driftgate-edge-agent";

/// The platform every served model reports: the runtime only loads ONNX.
pub const PLATFORM_ONNX: &str = "onnx";

/// Default request body limit: 8 MiB of JSON is about a million FP32 values, far more than
/// any sample model needs, yet small enough that a runaway client cannot exhaust memory.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// The version of a model that is currently served under its name.
#[derive(Debug)]
pub struct ServingModel {
    pub name: ModelName,
    pub version: ModelVersion,
    /// The manifest's release counter, which orders versions (the version string does not).
    pub release: u64,
    pub plan: Plan,
    /// Reported in model metadata; always [`PLATFORM_ONNX`] today.
    pub platform: &'static str,
}

impl ServingModel {
    pub fn new(name: ModelName, version: ModelVersion, release: u64, plan: Plan) -> Self {
        ServingModel {
            name,
            version,
            release,
            plan,
            platform: PLATFORM_ONNX,
        }
    }
}

/// The models being served, by name. Readers never block: each request loads the current map
/// with one atomic operation. Writers (the installer) copy the small map and swap it in.
#[derive(Debug, Default)]
pub struct ModelTable {
    models: ArcSwap<BTreeMap<ModelName, Arc<ServingModel>>>,
}

impl ModelTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `model` the active version under its name and returns the one it replaces.
    /// Requests already running on the replaced model finish on it.
    pub fn set(&self, model: Arc<ServingModel>) -> Option<Arc<ServingModel>> {
        // rcu retries if another writer swapped in between, so concurrent sets of different
        // models never lose each other's update.
        let previous = self.models.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            next.insert(model.name.clone(), Arc::clone(&model));
            next
        });
        previous.get(&model.name).cloned()
    }

    /// Stops serving `name` and returns the model that was served.
    pub fn remove(&self, name: &ModelName) -> Option<Arc<ServingModel>> {
        let previous = self.models.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            next.remove(name);
            next
        });
        previous.get(name).cloned()
    }

    /// The active model called `name`, if any. Names that are not valid model names are
    /// simply not found.
    pub fn get(&self, name: &str) -> Option<Arc<ServingModel>> {
        let name = ModelName::new(name).ok()?;
        self.models.load().get(&name).cloned()
    }

    /// Every active model, ordered by name.
    pub fn list(&self) -> Vec<Arc<ServingModel>> {
        self.models.load().values().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.models.load().is_empty()
    }
}

/// Limits of the inference API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Inferences allowed to run at once; further requests wait their turn.
    pub max_concurrent_inferences: usize,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        // Two per core: one can be converting JSON while the other computes, without
        // oversubscribing the CPU enough to hurt tail latency.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        ServeConfig {
            max_concurrent_inferences: 2 * cores,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ServeState {
    pub models: Arc<ModelTable>,
    pub metrics: Arc<Metrics>,
    inference_slots: Arc<Semaphore>,
    max_body_bytes: usize,
}

impl ServeState {
    pub fn new(models: Arc<ModelTable>, metrics: Arc<Metrics>, config: &ServeConfig) -> Self {
        ServeState {
            models,
            metrics,
            // Zero slots would hang every request forever; treat it as one.
            inference_slots: Arc::new(Semaphore::new(config.max_concurrent_inferences.max(1))),
            max_body_bytes: config.max_body_bytes,
        }
    }
}

/// Why a request failed. Rendered as `{"error": "<message>"}`, as KServe and Triton do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no model is being served yet")]
    NoModels,
    #[error("model {name:?} is not served; available models: {available}")]
    UnknownModel { name: String, available: String },
    #[error("model {name:?} version {requested:?} is not served; the active version is {active:?}")]
    UnknownVersion {
        name: String,
        requested: String,
        active: String,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{0}")]
    Runtime(String),
    #[error("the inference service is shutting down")]
    ShuttingDown,
    #[error("no route for {method} {path}")]
    NoRoute { method: Method, path: String },
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NoModels | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UnknownModel { .. }
            | ApiError::UnknownVersion { .. }
            | ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Runtime(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error kind label counted in metrics for a request that reached a model.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::TooLarge { .. } => KIND_TOO_LARGE,
            ApiError::Runtime(_) | ApiError::ShuttingDown => KIND_RUNTIME,
            _ => KIND_BAD_REQUEST,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// The inference API's routes.
pub fn router(state: ServeState) -> Router {
    let body_limit = state.max_body_bytes;
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_version_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Serves the inference API on `listener` until `shutdown` completes, then lets requests in
/// flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ServeState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "inference API listening"),
        Err(e) => tracing::info!(error = %e, "inference API listening"),
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn live() -> StatusCode {
    StatusCode::OK
}

/// Ready once at least one model is active: before that every inference would fail.
async fn ready(State(state): State<ServeState>) -> Response {
    if state.models.is_empty() {
        ApiError::NoModels.into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
}

async fn model_metadata(
    State(state): State<ServeState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let model = resolve(&state, &name, None)?;
    Ok(Json(metadata_json(&model)))
}

async fn model_version_metadata(
    State(state): State<ServeState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let model = resolve(&state, &name, Some(&version))?;
    Ok(Json(metadata_json(&model)))
}

async fn model_ready(
    State(state): State<ServeState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    resolve(&state, &name, None).map(|_| StatusCode::OK)
}

async fn model_version_ready(
    State(state): State<ServeState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    resolve(&state, &name, Some(&version)).map(|_| StatusCode::OK)
}

async fn metrics(State(state): State<ServeState>) -> Response {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        state.metrics.render_prometheus(),
    )
        .into_response()
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute {
        method,
        path: uri.path().to_string(),
    }
}

/// The active model called `name`, checked against the requested version if one was given.
fn resolve(
    state: &ServeState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<ServingModel>, ApiError> {
    let models = state.models.list();
    if models.is_empty() {
        return Err(ApiError::NoModels);
    }
    let model = models
        .iter()
        .find(|m| m.name.as_str() == name)
        .cloned()
        .ok_or_else(|| ApiError::UnknownModel {
            name: name.to_string(),
            available: models
                .iter()
                .map(|m| format!("{:?}", m.name.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    if let Some(requested) = version {
        if requested != model.version.as_str() {
            return Err(ApiError::UnknownVersion {
                name: name.to_string(),
                requested: requested.to_string(),
                active: model.version.to_string(),
            });
        }
    }
    Ok(model)
}

/// KServe writes dynamic dimensions as -1.
fn shape_json(spec: &TensorSpec) -> Vec<i64> {
    spec.shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
            Dim::Symbolic(_) => -1,
        })
        .collect()
}

fn specs_json(specs: &[TensorSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|s| json!({ "name": s.name, "datatype": s.datatype, "shape": shape_json(s) }))
        .collect()
}

fn metadata_json(model: &ServingModel) -> Value {
    let signature = model.plan.signature();
    json!({
        "name": model.name,
        "versions": [model.version],
        "platform": model.platform,
        "inputs": specs_json(&signature.inputs),
        "outputs": specs_json(&signature.outputs),
    })
}

/// An inference request. `parameters` (at any level) are accepted and ignored: none of
/// them changes how a plan runs, and clients send some by default.
#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    /// Kept as JSON until nested `data` is flattened; see [`decode_input`].
    inputs: Vec<Value>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
}

const BINARY_UNSUPPORTED: &str = "binary tensor data (the binary_data extension) is not \
     supported; send tensors as JSON (with tritonclient: binary_data=False)";

async fn infer(
    State(state): State<ServeState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    infer_request(&state, &name, None, &headers, body).await
}

async fn infer_version(
    State(state): State<ServeState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    infer_request(&state, &name, Some(&version), &headers, body).await
}

async fn infer_request(
    state: &ServeState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    // The Arc taken here is the plan this request runs on, whatever the table does meanwhile.
    let model = resolve(state, name, version)?;
    let outcome = run_inference(state, &model, headers, body).await;
    match &outcome {
        Ok(_) => {} // recorded with its latency by run_inference
        Err(e) => {
            state
                .metrics
                .record_inference(&model.name, &model.version, 0.0, Err(e.kind()));
            if e.status().is_server_error() {
                tracing::warn!(model = %model.name, version = %model.version, error = %e, "inference failed");
            } else {
                tracing::debug!(model = %model.name, version = %model.version, error = %e, "inference request refused");
            }
        }
    }
    outcome
}

async fn run_inference(
    state: &ServeState,
    model: &Arc<ServingModel>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge {
                limit: state.max_body_bytes,
            }
        } else {
            ApiError::BadRequest(format!("the request body could not be read: {rejection}"))
        }
    })?;
    if headers.contains_key("inference-header-content-length") {
        return Err(ApiError::BadRequest(BINARY_UNSUPPORTED.to_string()));
    }
    let request: InferRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed inference request: {e}")))?;
    drop(body);
    let inputs = request
        .inputs
        .into_iter()
        .enumerate()
        .map(|(i, value)| decode_input(value).map_err(|e| format!("inputs[{i}]: {e}")))
        .collect::<Result<Vec<Tensor>, String>>()
        .map_err(ApiError::BadRequest)?;
    let wanted = requested_outputs(model, request.outputs)?;

    // The permit moves into the blocking task, so a client that disconnects does not free
    // its slot while its inference is still using the CPU.
    let permit = Arc::clone(&state.inference_slots)
        .acquire_owned()
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    let running = Arc::clone(model);
    let (result, latency) = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let started = Instant::now();
        let result = running.plan.run(&inputs);
        (result, started.elapsed())
    })
    .await
    .map_err(|e| ApiError::Runtime(format!("the inference task failed: {e}")))?;
    let outputs = result.map_err(|e| match e {
        RuntimeError::BadInput(message) => ApiError::BadRequest(message),
        other => ApiError::Runtime(other.to_string()),
    })?;
    state.metrics.record_inference(
        &model.name,
        &model.version,
        latency.as_secs_f64() * 1e6,
        Ok(()),
    );

    let outputs: Vec<Tensor> = match wanted {
        None => outputs,
        Some(names) => names
            .iter()
            .filter_map(|name| outputs.iter().find(|t| &t.name == name).cloned())
            .collect(),
    };
    let mut response = json!({
        "model_name": model.name,
        "model_version": model.version,
        "outputs": outputs,
    });
    if let (Some(id), Some(object)) = (request.id, response.as_object_mut()) {
        object.insert("id".to_string(), Value::String(id));
    }
    Ok(Json(response))
}

/// The output names a request asks for, checked against the model before it runs; `None`
/// means all of them.
fn requested_outputs(
    model: &ServingModel,
    requested: Option<Vec<RequestedOutput>>,
) -> Result<Option<Vec<String>>, ApiError> {
    let Some(requested) = requested.filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    let available = &model.plan.signature().outputs;
    let mut names: Vec<String> = Vec::with_capacity(requested.len());
    for output in requested {
        if !available.iter().any(|spec| spec.name == output.name) {
            return Err(ApiError::BadRequest(format!(
                "output {:?} is not an output of model {:?}; available outputs: {}",
                output.name,
                model.name.as_str(),
                available
                    .iter()
                    .map(|s| format!("{:?}", s.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !names.contains(&output.name) {
            names.push(output.name);
        }
    }
    Ok(Some(names))
}

/// Decodes one request tensor. `data` may be flat (as tritonclient sends it) or nested like
/// the tensor itself (as people write it by hand); nested data is flattened row-major and
/// then checked against `shape` like flat data.
fn decode_input(mut value: Value) -> Result<Tensor, String> {
    if let Some(object) = value.as_object_mut() {
        let binary = object
            .get("parameters")
            .and_then(|p| p.get("binary_data_size"))
            .is_some();
        if binary {
            return Err(BINARY_UNSUPPORTED.to_string());
        }
        if let Some(Value::Array(data)) = object.get_mut("data") {
            if data.iter().any(Value::is_array) {
                let nested = std::mem::take(data);
                flatten_into(nested, data);
            }
        }
    }
    serde_json::from_value::<Tensor>(value).map_err(|e| e.to_string())
}

/// Row-major flattening. Recursion depth is bounded by serde_json's nesting limit (128).
fn flatten_into(values: Vec<Value>, out: &mut Vec<Value>) {
    for value in values {
        match value {
            Value::Array(inner) => flatten_into(inner, out),
            scalar => out.push(scalar),
        }
    }
}
