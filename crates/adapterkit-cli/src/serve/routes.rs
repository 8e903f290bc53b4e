//! The HTTP routes: JSON in and out, checked here, then queued for the compute thread.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use adapterkit::batch::Encoded;
use adapterkit::methods::composition::Setup;
use adapterkit::pooling::Pooling;

use super::batcher::{Answer, Job, Queue, Refused, Work};
use super::errors::ApiError;
use super::metrics::{Metrics, RequestLabels, RouteLabels};
use super::registry::Registry;

pub const LOADING: u8 = 0;
pub const READY: u8 = 1;
pub const SHUTTING_DOWN: u8 = 2;

pub struct AppState {
    pub registry: Arc<Registry>,
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    pub max_client_batch: usize,
    /// [`LOADING`], [`READY`] or [`SHUTTING_DOWN`].
    pub health: AtomicU8,
}

type Shared = State<Arc<AppState>>;
type Body = Result<Bytes, BytesRejection>;

pub fn router(state: Arc<AppState>, payload_limit: usize) -> Router {
    let api = Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/adapters/{name}/predict", post(predict_in_path))
        .route("/v1/embed", post(embed))
        .route("/v1/adapters", get(list))
        .route("/v1/adapters/{name}", put(load).delete(remove))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(payload_limit))
        .with_state(state)
}

/// `Authorization: Bearer KEY` on the `/v1` routes when a key is set.
async fn auth(State(state): Shared, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = (request.headers().get(header::AUTHORIZATION))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
            let error = ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API key");
            let mut response = error.into_response();
            let challenge = header::HeaderValue::from_static("Bearer");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
            return response;
        }
    }
    next.run(request).await
}

/// Equality whose time does not depend on where the two differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Counts and times a request, and makes its response.
fn answer(
    state: &AppState,
    route: &str,
    adapter: Option<&str>,
    started: Instant,
    result: Result<Value, ApiError>,
) -> Response {
    let response = match result {
        Ok(body) => (StatusCode::OK, Json(body)).into_response(),
        Err(e) => e.into_response(),
    };
    let adapter = adapter
        .filter(|a| state.registry.contains(a))
        .unwrap_or_default();
    let labels = RequestLabels {
        route: route.into(),
        adapter: adapter.into(),
        status: response.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    let route = RouteLabels {
        route: route.into(),
    };
    (state.metrics.latency.get_or_create(&route)).observe(started.elapsed().as_secs_f64());
    response
}

/// The body as a JSON object holding only `allowed` fields.
fn object(body: Body, allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    if let Some(field) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::unprocessable(format!(
            "unknown field '{field}' (this route takes {allowed:?})"
        )));
    }
    Ok(object)
}

/// `inputs`: 1 to `--max-client-batch` strings, tokenized for `adapter` (its token limit).
fn inputs(
    state: &AppState,
    body: &Map<String, Value>,
    adapter: Option<&str>,
) -> Result<Vec<Encoded>, ApiError> {
    let Some(Value::Array(inputs)) = body.get("inputs") else {
        return Err(ApiError::unprocessable(
            "'inputs' must be a list of strings",
        ));
    };
    if inputs.is_empty() {
        return Err(ApiError::unprocessable("'inputs' is empty"));
    }
    if inputs.len() > state.max_client_batch {
        return Err(ApiError::unprocessable(format!(
            "{} inputs, more than the {} a request may hold (--max-client-batch)",
            inputs.len(),
            state.max_client_batch
        )));
    }
    let info = adapter.and_then(|a| state.registry.info(a));
    (inputs.iter().enumerate())
        .map(|(i, text)| {
            let text = text
                .as_str()
                .ok_or_else(|| ApiError::unprocessable(format!("inputs[{i}] is not a string")))?;
            (state.registry.set.encode(text, info.as_ref()))
                .map_err(|e| ApiError::unprocessable(format!("inputs[{i}]: {e}")))
        })
        .collect()
}

fn string_field<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::unprocessable(format!(
            "'{field}' must be a string"
        ))),
    }
}

/// Queues the work and waits for its answer.
async fn submit(state: &AppState, work: Work, rows: Vec<Encoded>) -> Result<Answer, ApiError> {
    if state.health.load(Ordering::SeqCst) != READY {
        return Err(ApiError::unavailable(
            "the server is starting or shutting down",
        ));
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    state
        .queue
        .push(Job { work, rows, reply })
        .map_err(|e| match e {
            Refused::Full => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the queue is full (--max-queue); retry later",
            ),
            Refused::Closed => ApiError::unavailable("the server is shutting down"),
        })?;
    answer
        .await
        .map_err(|_| ApiError::unavailable("the server stopped before answering"))?
}

fn known(state: &AppState, name: &str) -> Result<(), ApiError> {
    match state.registry.contains(name) {
        true => Ok(()),
        false => Err(ApiError::not_found(format!(
            "no adapter named '{name}' is loaded"
        ))),
    }
}

/// `{"predictions": [...]}` for one adapter, or `[{"tasks": {...}}, ...]` under a setup.
async fn predict_body(
    state: &AppState,
    adapter: Option<String>,
    body: Map<String, Value>,
) -> Result<Value, ApiError> {
    let setup = string_field(&body, "setup")?;
    let adapter = match adapter {
        Some(a) => Some(a),
        None => string_field(&body, "adapter")?.map(String::from),
    };
    let (adapter, setup) = match (adapter, setup) {
        (Some(adapter), None) => (adapter, None),
        (None, Some(text)) => {
            let setup = Setup::parse(text).map_err(ApiError::unprocessable)?;
            (String::new(), Some(setup))
        }
        _ => {
            return Err(ApiError::unprocessable(
                "give either 'adapter' (one adapter) or 'setup' (several, e.g. parallel(a,b))",
            ))
        }
    };
    match setup {
        None => {
            known(state, &adapter)?;
            let rows = inputs(state, &body, Some(&adapter))?;
            let Answer::Predictions(p) = submit(state, Work::Predict { adapter }, rows).await?
            else {
                return Err(ApiError::internal("a prediction got another answer"));
            };
            Ok(json!({ "predictions": p }))
        }
        Some(setup) => {
            for name in setup.names() {
                known(state, name)?;
            }
            // The first adapter's token limit, as `predict --setup` takes the first directory's.
            let rows = inputs(state, &body, setup.names().first().copied())?;
            let Answer::Tasks(tasks) = submit(state, Work::Setup { setup }, rows).await? else {
                return Err(ApiError::internal("a setup got another answer"));
            };
            let predictions: Vec<Value> =
                tasks.into_iter().map(|t| json!({ "tasks": t })).collect();
            Ok(json!({ "predictions": predictions }))
        }
    }
}

async fn predict(State(state): Shared, body: Body) -> Response {
    let started = Instant::now();
    let (result, adapter) = match object(body, &["adapter", "setup", "inputs"]) {
        Ok(body) => {
            let adapter = body
                .get("adapter")
                .and_then(Value::as_str)
                .map(String::from);
            (predict_body(&state, None, body).await, adapter)
        }
        Err(e) => (Err(e), None),
    };
    answer(&state, "/v1/predict", adapter.as_deref(), started, result)
}

async fn predict_in_path(
    State(state): Shared,
    UrlPath(name): UrlPath<String>,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = match object(body, &["inputs"]) {
        Ok(body) => predict_body(&state, Some(name.clone()), body).await,
        Err(e) => Err(e),
    };
    answer(
        &state,
        "/v1/adapters/{name}/predict",
        Some(&name),
        started,
        result,
    )
}

async fn embed(State(state): Shared, body: Body) -> Response {
    let started = Instant::now();
    let mut adapter = None;
    let result = async {
        let body = object(body, &["inputs", "adapter", "pooling", "normalize"])?;
        adapter = string_field(&body, "adapter")?.map(String::from);
        let pooling = match string_field(&body, "pooling")? {
            None | Some("mean") => Pooling::Mean,
            Some("cls") => Pooling::Cls,
            Some(other) => {
                return Err(ApiError::unprocessable(format!(
                    "pooling '{other}': use \"mean\" or \"cls\""
                )))
            }
        };
        let normalize = match body.get("normalize") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::unprocessable("'normalize' must be true or false")),
        };
        if let Some(name) = &adapter {
            known(&state, name)?;
        }
        let rows = inputs(&state, &body, adapter.as_deref())?;
        let work = Work::Embed {
            adapter: adapter.clone(),
            pooling,
            normalize,
        };
        let Answer::Embeddings(e) = submit(&state, work, rows).await? else {
            return Err(ApiError::internal("embedding got another answer"));
        };
        Ok(json!({ "embeddings": e }))
    }
    .await;
    answer(&state, "/v1/embed", adapter.as_deref(), started, result)
}

async fn list(State(state): Shared) -> Response {
    let started = Instant::now();
    let adapters: Vec<Value> = (state.registry.list().into_iter())
        .map(|(info, loaded)| {
            let mut value = json!(info);
            value["loaded"] = loaded.into();
            value
        })
        .collect();
    let result = Ok(json!({ "adapters": adapters }));
    answer(&state, "/v1/adapters", None, started, result)
}

/// Where `PUT` may load from: inside `--adapter-dir`, by name and after links are followed.
fn inside_adapter_dir(registry: &Registry, path: &str) -> Result<PathBuf, ApiError> {
    let forbidden = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "adapters load only from inside the server's --adapter-dir",
        )
    };
    let root = registry.adapter_dir.as_ref().ok_or_else(forbidden)?;
    let path = Path::new(path);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(forbidden());
    }
    let path = root.join(path);
    if !path.starts_with(root) {
        return Err(forbidden());
    }
    let real = path.canonicalize().map_err(|e| {
        ApiError::unprocessable(format!("no adapter directory at {}: {e}", path.display()))
    })?;
    if !real.starts_with(root) {
        return Err(forbidden());
    }
    Ok(real)
}

async fn load(State(state): Shared, UrlPath(name): UrlPath<String>, body: Body) -> Response {
    let started = Instant::now();
    let result = async {
        let body = object(body, &["path"])?;
        let path = string_field(&body, "path")?
            .ok_or_else(|| ApiError::unprocessable("'path' (an adapter directory) is missing"))?;
        let dir = inside_adapter_dir(&state.registry, path)?;
        let registry = state.registry.clone();
        let (task_name, task_dir) = (name.clone(), dir.clone());
        let loaded = tokio::task::spawn_blocking(move || registry.load(&task_name, &task_dir))
            .await
            .map_err(ApiError::internal)?;
        let info = loaded.map_err(ApiError::unprocessable)?;
        Ok(json!(info))
    }
    .await;
    answer(&state, "/v1/adapters/{name}", Some(&name), started, result)
}

async fn remove(State(state): Shared, UrlPath(name): UrlPath<String>) -> Response {
    let started = Instant::now();
    let result = match state.registry.remove(&name) {
        true => Ok(json!({ "deleted": name })),
        false => Err(ApiError::not_found(format!(
            "no adapter named '{name}' is loaded"
        ))),
    };
    answer(&state, "/v1/adapters/{name}", None, started, result)
}

async fn health(State(state): Shared) -> Response {
    match state.health.load(Ordering::SeqCst) {
        READY => (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response(),
        LOADING => ApiError::unavailable("loading").into_response(),
        _ => ApiError::unavailable("shutting down").into_response(),
    }
}

async fn metrics(State(state): Shared) -> Response {
    (state.metrics.loaded_adapters).set(state.registry.loaded_count() as i64);
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    (
        [(header::CONTENT_TYPE, content_type)],
        state.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    let spec = include_str!("openapi.json");
    ([(header::CONTENT_TYPE, "application/json")], spec).into_response()
}
