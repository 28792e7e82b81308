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
use std::sync::{Arc, Mutex};
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

use crate::drift::DriftMonitor;
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

/// Models whose typical run is at most this long run on the async worker that received the
/// request; slower ones on the blocking pool.
pub const INLINE_RUN_MAX: std::time::Duration = std::time::Duration::from_micros(500);

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
    /// Watches this version's inputs and predictions, when a reference profile shipped.
    pub drift: Option<Mutex<DriftMonitor>>,
}

impl ServingModel {
    pub fn new(name: ModelName, version: ModelVersion, release: u64, plan: Plan) -> Self {
        ServingModel {
            name,
            version,
            release,
            plan,
            platform: PLATFORM_ONNX,
            drift: None,
        }
    }

    /// With a drift monitor (built from the version's reference profile).
    pub fn with_drift(mut self, drift: Option<DriftMonitor>) -> Self {
        self.drift = drift.map(Mutex::new);
        self
    }

    /// The drift windows closed by the clock (`flush` false), or every open one (`flush`
    /// true: the version stops serving, or the agent stops).
    pub fn drain_drift(&self, now_ms: i64, flush: bool) -> Vec<fleet_protocol::drift::DriftWindow> {
        let Some(drift) = &self.drift else {
            return Vec::new();
        };
        let mut monitor = drift
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if flush {
            monitor.flush(now_ms)
        } else {
            monitor.poll(now_ms)
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

/// Sees every successful inference with its inputs and all of its outputs (the sampler, the
/// drift monitor). Called on the thread that ran the model, after the latency was measured, so
/// it must be quick: a few microseconds, no I/O that can block.
pub trait InferenceObserver: Send + Sync + 'static {
    fn observe(&self, model: &ServingModel, inputs: &[Tensor], outputs: &[Tensor]);
}

/// What the handlers share.
#[derive(Clone)]
pub struct ServeState {
    pub models: Arc<ModelTable>,
    pub metrics: Arc<Metrics>,
    inference_slots: Arc<Semaphore>,
    max_body_bytes: usize,
    observers: Arc<Vec<Arc<dyn InferenceObserver>>>,
}

impl std::fmt::Debug for ServeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeState")
            .field("models", &self.models)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("observers", &self.observers.len())
            .finish_non_exhaustive()
    }
}

impl ServeState {
    pub fn new(models: Arc<ModelTable>, metrics: Arc<Metrics>, config: &ServeConfig) -> Self {
        ServeState {
            models,
            metrics,
            // Zero slots would hang every request forever; treat it as one.
            inference_slots: Arc::new(Semaphore::new(config.max_concurrent_inferences.max(1))),
            max_body_bytes: config.max_body_bytes,
            observers: Arc::new(Vec::new()),
        }
    }

    /// Adds an observer of every successful inference.
    pub fn with_observer(mut self, observer: Arc<dyn InferenceObserver>) -> Self {
        Arc::make_mut(&mut self.observers).push(observer);
        self
    }
}

/// Why a request failed. Rendered as `{"error": "<message>"}`, as KServe and Triton do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no model is being served yet")]
    NoModels,
    #[error("model {name:?} is not served; available models: {available}")]
    UnknownModel { name: String, available: String },
    #[error(
        "model {name:?} version {requested:?} is not served; the active version is {active:?}"
    )]
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
    use axum::serve::ListenerExt;
    // Responses go out as soon as they are written, not after the client's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
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
    let observers = Arc::clone(&state.observers);
    let run = move || {
        let _permit = permit;
        let started = Instant::now();
        let result = running.plan.run(&inputs);
        let elapsed = started.elapsed();
        if let Ok(outputs) = &result {
            for observer in observers.iter() {
                observer.observe(&running, &inputs, outputs);
            }
        }
        (result, elapsed)
    };
    // Where the inference runs. A model that typically runs within `INLINE_RUN_MAX` runs right
    // here: a hop to the blocking pool and back costs two thread wake-ups (tens of
    // microseconds on a small device, more than such a model's whole run), and holding this
    // worker that briefly delays its other tasks by no more than one inference. Slower models
    // (or ones not yet measured) run on the blocking pool. Either way the permit above bounds
    // how many run at once.
    let inline = model
        .plan
        .typical_run()
        .is_some_and(|typical| typical <= INLINE_RUN_MAX);
    let (result, latency) = if inline {
        run()
    } else {
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| ApiError::Runtime(format!("the inference task failed: {e}")))?
    };
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

#[cfg(test)]
mod tests {
    //! These tests run the real server on a loopback socket and talk HTTP/1.1 to it with a
    //! deliberately tiny client, so routing, body limits, status codes and headers are
    //! exercised as a device application would see them.

    use std::net::SocketAddr;
    use std::path::{Path as FsPath, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    use fleet_protocol::tensor::compare_outputs;
    use fleet_protocol::{SelfTest, TensorData};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::runtime::inspect;

    fn models_dir() -> PathBuf {
        FsPath::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    /// A sample model's plan and self-test, loaded once per test process (optimising a plan
    /// is the slowest part of these tests).
    fn sample(model: &str, version: &str) -> (Plan, Arc<SelfTest>) {
        type Cache = Mutex<BTreeMap<String, (Plan, Arc<SelfTest>)>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let key = format!("{model}/{version}");
        let cache = CACHE.get_or_init(Default::default);
        if let Some(hit) = cache.lock().unwrap().get(&key) {
            return hit.clone();
        }
        let dir = models_dir().join(model);
        let onnx = std::fs::read(dir.join(format!("{version}.onnx"))).unwrap();
        let case: SelfTest = serde_json::from_slice(
            &std::fs::read(dir.join(format!("{version}.selftest.json"))).unwrap(),
        )
        .unwrap();
        let signature = inspect(&onnx).unwrap();
        let plan = Plan::load(&onnx, &signature.inputs).unwrap();
        let loaded = (plan, Arc::new(case));
        cache.lock().unwrap().insert(key, loaded.clone());
        loaded
    }

    fn serving(model: &str, version: &str, release: u64) -> Arc<ServingModel> {
        let (plan, _) = sample(model, version);
        Arc::new(ServingModel::new(
            ModelName::new(model).unwrap(),
            ModelVersion::new(version).unwrap(),
            release,
            plan,
        ))
    }

    struct Server {
        addr: SocketAddr,
        state: ServeState,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Server {
        async fn start(models: Vec<Arc<ServingModel>>, config: ServeConfig) -> Server {
            let table = Arc::new(ModelTable::new());
            for model in models {
                table.set(model);
            }
            let state = ServeState::new(table, Arc::new(Metrics::new()), &config);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(serve(listener, state.clone(), async {
                let _ = stopped.await;
            }));
            Server {
                addr,
                state,
                stop: Some(stop),
                task,
            }
        }

        async fn get(&self, path: &str) -> Reply {
            http(self.addr, "GET", path, None).await
        }

        async fn post(&self, path: &str, body: &str) -> Reply {
            http(self.addr, "POST", path, Some(body)).await
        }

        /// Stops the server and checks that it shut down cleanly.
        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("graceful shutdown")
                .unwrap()
                .unwrap();
        }
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("{e}: response body is not JSON: {:?}", self.body))
        }

        fn error(&self) -> String {
            self.json()["error"]
                .as_str()
                .unwrap_or_else(|| panic!("no error message in {:?}", self.body))
                .to_string()
        }

        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().find_map(|line| {
                let (k, v) = line.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim())
            })
        }
    }

    /// One request on a fresh connection (`Connection: close`), response read to EOF.
    async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        // A server that refuses a body without reading it may reset the connection after
        // its response; what arrived before the reset is the response.
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete response: {text:?}"));
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "the test client does not decode chunked bodies"
        );
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        Reply {
            status,
            head: head.to_string(),
            body: body.to_string(),
        }
    }

    fn infer_body(inputs: &[Tensor]) -> String {
        json!({ "inputs": inputs }).to_string()
    }

    fn response_outputs(reply: &Reply) -> Vec<Tensor> {
        serde_json::from_value(reply.json()["outputs"].clone()).unwrap()
    }

    #[test]
    fn table_swaps_without_disturbing_holders() {
        let table = ModelTable::new();
        assert!(table.is_empty());
        let v1 = serving("digits-mlp", "v1", 1);
        let v2 = serving("digits-mlp", "v2", 2);
        assert!(table.set(Arc::clone(&v1)).is_none());
        let held = table.get("digits-mlp").unwrap();
        let replaced = table.set(Arc::clone(&v2)).unwrap();
        assert!(Arc::ptr_eq(&replaced, &v1));
        // The holder still has v1 and can still run it.
        assert_eq!(held.version.as_str(), "v1");
        let (_, case) = sample("digits-mlp", "v1");
        held.plan.run(&case.inputs).unwrap();
        assert_eq!(table.get("digits-mlp").unwrap().version.as_str(), "v2");
        assert!(table.get("../etc").is_none());
        table.set(serving("cancer-logreg", "v1", 1));
        let names: Vec<String> = table.list().iter().map(|m| m.name.to_string()).collect();
        assert_eq!(names, ["cancer-logreg", "digits-mlp"]);
        let removed = table
            .remove(&ModelName::new("digits-mlp").unwrap())
            .unwrap();
        assert!(Arc::ptr_eq(&removed, &v2));
        assert!(table.get("digits-mlp").is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_and_metadata() {
        let server = Server::start(
            vec![serving("cancer-logreg", "v1", 1)],
            ServeConfig::default(),
        )
        .await;
        assert_eq!(server.get("/v2/health/live").await.status, 200);
        assert_eq!(server.get("/v2/health/ready").await.status, 200);

        let meta = server.get("/v2").await;
        assert_eq!(meta.status, 200);
        assert_eq!(meta.json()["name"], SERVER_NAME);
        assert_eq!(meta.json()["extensions"], json!([]));
        assert!(meta.json()["version"].is_string());

        let expected = json!({
            "name": "cancer-logreg",
            "versions": ["v1"],
            "platform": "onnx",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
            ],
        });
        let model = server.get("/v2/models/cancer-logreg").await;
        assert_eq!((model.status, model.json()), (200, expected.clone()));
        let versioned = server.get("/v2/models/cancer-logreg/versions/v1").await;
        assert_eq!((versioned.status, versioned.json()), (200, expected));
        assert!(model
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")));

        assert_eq!(
            server.get("/v2/models/cancer-logreg/ready").await.status,
            200
        );
        assert_eq!(
            server
                .get("/v2/models/cancer-logreg/versions/v1/ready")
                .await
                .status,
            200
        );
        let other_version = server.get("/v2/models/cancer-logreg/versions/v7").await;
        assert_eq!(other_version.status, 404);
        assert!(other_version.error().contains("active version is \"v1\""));
        assert_eq!(
            server
                .get("/v2/models/cancer-logreg/versions/v7/ready")
                .await
                .status,
            404
        );

        let unknown = server.get("/v2/models/wine-forest").await;
        assert_eq!(unknown.status, 404);
        assert!(unknown.error().contains("\"cancer-logreg\""), "{unknown:?}");
        assert_eq!(server.get("/v2/models/wine-forest/ready").await.status, 404);
        let nowhere = server.get("/v3/whatever").await;
        assert_eq!(nowhere.status, 404);
        assert!(nowhere.error().contains("/v3/whatever"));
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inference_reproduces_the_self_tests() {
        let server = Server::start(
            vec![
                serving("cancer-logreg", "v1", 1),
                serving("digits-mlp", "v1", 1),
            ],
            ServeConfig::default(),
        )
        .await;
        for (model, path) in [
            ("cancer-logreg", "/v2/models/cancer-logreg/infer"),
            ("digits-mlp", "/v2/models/digits-mlp/infer"),
            ("digits-mlp", "/v2/models/digits-mlp/versions/v1/infer"),
        ] {
            let (_, case) = sample(model, "v1");
            let body = json!({ "id": "req-7", "inputs": case.inputs, "parameters": {} });
            let reply = server.post(path, &body.to_string()).await;
            assert_eq!(reply.status, 200, "{path}: {}", reply.body);
            let response = reply.json();
            assert_eq!(response["model_name"], model);
            assert_eq!(response["model_version"], "v1");
            assert_eq!(response["id"], "req-7");
            compare_outputs(&case.outputs, &response_outputs(&reply), case.tolerance)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
        }

        // Nested data, as people write it by hand, is flattened row-major.
        let (_, case) = sample("cancer-logreg", "v1");
        let input = &case.inputs[0];
        let TensorData::F32(flat) = &input.data else {
            panic!("cancer-logreg input is FP32")
        };
        let rows: Vec<&[f32]> = flat.chunks(30).collect();
        let nested = json!({ "inputs": [{
            "name": "input", "datatype": "FP32", "shape": input.shape, "data": rows,
        }]});
        let reply = server
            .post("/v2/models/cancer-logreg/infer", &nested.to_string())
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(reply.json().get("id").is_none());
        compare_outputs(&case.outputs, &response_outputs(&reply), case.tolerance).unwrap();

        let counters = server.state.metrics.snapshot_model(
            &ModelName::new("digits-mlp").unwrap(),
            &ModelVersion::new("v1").unwrap(),
        );
        assert_eq!((counters.count, counters.latency.count), (2, 2));
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requested_outputs_are_filtered() {
        let server = Server::start(
            vec![serving("cancer-logreg", "v1", 1)],
            ServeConfig::default(),
        )
        .await;
        let (_, case) = sample("cancer-logreg", "v1");
        let path = "/v2/models/cancer-logreg/infer";

        let body = json!({ "inputs": case.inputs, "outputs": [{"name": "probabilities"}] });
        let reply = server.post(path, &body.to_string()).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let outputs = response_outputs(&reply);
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].name, "probabilities");
        compare_outputs(&case.outputs[1..], &outputs, case.tolerance).unwrap();

        let body = json!({ "inputs": case.inputs, "outputs": [{"name": "logits"}] });
        let reply = server.post(path, &body.to_string()).await;
        assert_eq!(reply.status, 400);
        let message = reply.error();
        assert!(
            message.contains("\"logits\"")
                && message.contains("\"label\"")
                && message.contains("\"probabilities\""),
            "{message}"
        );
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_requests_say_what_was_expected() {
        let server = Server::start(
            vec![serving("cancer-logreg", "v1", 1)],
            ServeConfig::default(),
        )
        .await;
        let path = "/v2/models/cancer-logreg/infer";
        let refused = |reply: Reply, status: u16, needle: &str| {
            assert_eq!(reply.status, status, "{reply:?}");
            let message = reply.error();
            assert!(message.contains(needle), "{needle:?} not in {message:?}");
        };

        let wrong_shape =
            Tensor::new("input", vec![2, 31], TensorData::F32(vec![0.5; 62])).unwrap();
        refused(
            server.post(path, &infer_body(&[wrong_shape])).await,
            400,
            "expected [N, 30]",
        );
        let wrong_type = Tensor::new("input", vec![1, 30], TensorData::I64(vec![1; 30])).unwrap();
        refused(
            server.post(path, &infer_body(&[wrong_type])).await,
            400,
            "has datatype INT64, expected FP32",
        );
        refused(
            server.post(path, r#"{"inputs": []}"#).await,
            400,
            "input \"input\" (FP32 [N, 30]) is missing",
        );
        refused(
            server.post(path, r#"{"inputs": [{"name": "input""#).await,
            400,
            "malformed inference request",
        );
        refused(
            server
                .post(
                    path,
                    r#"{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": [1, 2]}]}"#,
                )
                .await,
            400,
            "(30 elements) but 2 data elements",
        );
        refused(
            server
                .post(
                    path,
                    r#"{"inputs": [{"name": "input", "datatype": "FP16", "shape": [1], "data": [1]}]}"#,
                )
                .await,
            400,
            "unknown datatype \"FP16\"",
        );
        refused(
            server
                .post(
                    path,
                    r#"{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": [], "parameters": {"binary_data_size": 120}}]}"#,
                )
                .await,
            400,
            "binary_data=False",
        );
        let ok_input = infer_body(&sample("cancer-logreg", "v1").1.inputs);
        refused(
            server.post("/v2/models/digits-mlp/infer", &ok_input).await,
            404,
            "available models: \"cancer-logreg\"",
        );
        refused(
            server
                .post("/v2/models/cancer-logreg/versions/v2/infer", &ok_input)
                .await,
            404,
            "the active version is \"v1\"",
        );

        // Every refusal that reached the model is counted against it; the two 404s are not.
        let counters = server.state.metrics.snapshot_model(
            &ModelName::new("cancer-logreg").unwrap(),
            &ModelVersion::new("v1").unwrap(),
        );
        assert_eq!(counters.count, 7);
        assert_eq!(counters.errors.get(KIND_BAD_REQUEST), Some(&7));
        assert_eq!(counters.latency.count, 0);
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_served_means_not_ready() {
        let server = Server::start(Vec::new(), ServeConfig::default()).await;
        assert_eq!(server.get("/v2/health/live").await.status, 200);
        let ready = server.get("/v2/health/ready").await;
        assert_eq!(ready.status, 503);
        assert!(ready.error().contains("no model"));
        let infer = server
            .post("/v2/models/digits-mlp/infer", r#"{"inputs": []}"#)
            .await;
        assert_eq!(infer.status, 503);
        assert_eq!(server.get("/v2/models/digits-mlp").await.status, 503);

        // Becoming ready needs no restart.
        server.state.models.set(serving("digits-mlp", "v1", 1));
        assert_eq!(server.get("/v2/health/ready").await.status, 200);
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_bodies_are_refused() {
        let config = ServeConfig {
            max_body_bytes: 2048,
            ..ServeConfig::default()
        };
        let server = Server::start(vec![serving("cancer-logreg", "v1", 1)], config).await;
        // The self-test input (8 rows of 30 features) is well over 2 KiB of JSON.
        let body = infer_body(&sample("cancer-logreg", "v1").1.inputs);
        assert!(body.len() > 2048);
        let reply = server.post("/v2/models/cancer-logreg/infer", &body).await;
        assert_eq!(reply.status, 413, "{reply:?}");
        assert!(reply.error().contains("2048 bytes"));
        let counters = server.state.metrics.snapshot_model(
            &ModelName::new("cancer-logreg").unwrap(),
            &ModelVersion::new("v1").unwrap(),
        );
        assert_eq!(counters.errors.get(KIND_TOO_LARGE), Some(&1));
        server.stop().await;
    }

    /// Two clients infer continuously while the installer swaps digits-mlp between v1 and
    /// v2 many times: every request succeeds, and its outputs are those of the version the
    /// response names (both self-tests share their inputs), so no request ran half on one
    /// plan and was reported as the other.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hot_swap_under_load_loses_nothing() {
        let v1 = serving("digits-mlp", "v1", 1);
        let v2 = serving("digits-mlp", "v2", 2);
        let (_, case1) = sample("digits-mlp", "v1");
        let (_, case2) = sample("digits-mlp", "v2");
        assert_eq!(case1.inputs, case2.inputs);
        let server = Server::start(vec![Arc::clone(&v1)], ServeConfig::default()).await;
        let body = Arc::new(infer_body(&case1.inputs));
        let swapping = Arc::new(AtomicBool::new(true));

        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (addr, body, swapping) = (server.addr, body.clone(), swapping.clone());
                let (case1, case2) = (case1.clone(), case2.clone());
                tokio::spawn(async move {
                    let mut served = BTreeMap::<String, u64>::new();
                    while swapping.load(Ordering::Relaxed) {
                        let reply =
                            http(addr, "POST", "/v2/models/digits-mlp/infer", Some(&body)).await;
                        assert_eq!(reply.status, 200, "{}", reply.body);
                        let version = reply.json()["model_version"].as_str().unwrap().to_string();
                        let case = if version == "v1" { &case1 } else { &case2 };
                        compare_outputs(&case.outputs, &response_outputs(&reply), case.tolerance)
                            .unwrap_or_else(|e| panic!("response claims {version}: {e}"));
                        *served.entry(version).or_default() += 1;
                    }
                    served
                })
            })
            .collect();

        for i in 0..200 {
            let next = if i % 2 == 0 { &v2 } else { &v1 };
            server.state.models.set(Arc::clone(next));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        swapping.store(false, Ordering::Relaxed);
        let mut served = BTreeMap::<String, u64>::new();
        for client in clients {
            for (version, n) in client.await.unwrap() {
                *served.entry(version).or_default() += n;
            }
        }
        let total: u64 = served.values().sum();
        assert!(total >= 20, "too little load to mean anything: {served:?}");

        // Metrics agree with what the clients saw, per version, and render as Prometheus text.
        let metrics = server.get("/metrics").await;
        assert_eq!(metrics.status, 200);
        assert_eq!(
            metrics.header("content-type"),
            Some(PROMETHEUS_CONTENT_TYPE)
        );
        let text = &metrics.body;
        for (version, n) in &served {
            let labels = format!("model=\"digits-mlp\",version=\"{version}\"");
            for line in [
                format!("driftgate_inferences_total{{{labels}}} {n}"),
                format!("driftgate_inference_latency_seconds_count{{{labels}}} {n}"),
                format!("driftgate_inference_latency_seconds_bucket{{{labels},le=\"+Inf\"}} {n}"),
            ] {
                assert!(
                    text.lines().any(|l| l == line),
                    "missing {line:?} in\n{text}"
                );
            }
        }
        assert!(
            !text.contains("driftgate_inference_errors_total{"),
            "{text}"
        );
        assert!(text.contains("# TYPE driftgate_fetched_bytes_total counter"));
        eprintln!("served across 200 swaps: {served:?}");
        server.stop().await;
    }
}
