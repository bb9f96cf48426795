//! The router and what every request passes through: the API key, the body
//! limit, and the bound on requests in flight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dllm::Engine;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::Semaphore;

use super::api;
use super::completion::{Endpoint, Reply};
use super::decoding::Decoding;
use super::error::ApiError;
use super::metrics::Metrics;

#[derive(Clone, Copy)]
pub struct Limits {
    /// Requests accepted and not yet let go by the engine: the running batch
    /// and its queue.
    pub in_flight: usize,
    pub body_bytes: usize,
}

/// What the handlers share.
pub struct Server {
    engine: Engine,
    model_name: String,
    api_key: Option<String>,
    limits: Limits,
    /// One permit per request in flight.
    places: Arc<Semaphore>,
    metrics: Metrics,
    requests: AtomicU64,
}

impl Server {
    pub fn new(
        engine: Engine,
        model_name: String,
        api_key: Option<String>,
        limits: Limits,
    ) -> Server {
        Server {
            engine,
            model_name,
            api_key,
            places: Arc::new(Semaphore::new(limits.in_flight)),
            limits,
            metrics: Metrics::default(),
            requests: AtomicU64::new(0),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn device_name(&self) -> String {
        self.engine.device_name()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn next_request_id(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed)
    }
}

pub fn router(server: Arc<Server>) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(server.clone(), require_key));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            server.clone(),
            count_response,
        ))
        .with_state(server)
}

async fn completions(State(server): State<Arc<Server>>, body: Body) -> Response {
    generate(server, Endpoint::Completions, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(server): State<Arc<Server>>, body: Body) -> Response {
    generate(server, Endpoint::Chat, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Reads and checks the body, takes a place among the requests in flight,
/// submits, and answers whole or streaming.
async fn generate(
    server: Arc<Server>,
    endpoint: Endpoint,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, server.limits.body_bytes).await?;
    let job = match endpoint {
        Endpoint::Completions => api::completion_job(&server.engine, &body)?,
        Endpoint::Chat => api::chat_job(&server.engine, &body)?,
    };
    let place = server
        .places
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::queue_full(server.limits.in_flight))?;
    let decoding = Decoding::start(&server.engine, &job, place)
        .map_err(|e| ApiError::from_engine(e, endpoint.prompt_field()))?;
    let stream = job.stream;
    let reply = Reply::new(server, endpoint, job, decoding)?;
    Ok(match stream {
        true => reply.stream(),
        false => reply.complete().await,
    })
}

/// The body, refused once it grows past `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut frames = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|e| ApiError::malformed(format!("cannot read the body: {e}")))?;
        if bytes.len() + frame.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        bytes.extend_from_slice(&frame);
    }
    Ok(bytes.into())
}

async fn models(State(server): State<Arc<Server>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": server.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "dllm",
        }],
    }))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(server): State<Arc<Server>>) -> impl IntoResponse {
    let in_flight = server.limits.in_flight - server.places.available_permits();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        server.metrics.render(&server.engine.stats(), in_flight),
    )
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

/// With `--api-key`, a /v1 request without "Authorization: Bearer KEY" is
/// refused before its body is read.
async fn require_key(State(server): State<Arc<Server>>, request: Request, next: Next) -> Response {
    let Some(key) = &server.api_key else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match given {
        Some(given) if same_secret(given.as_bytes(), key.as_bytes()) => next.run(request).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Compares in time independent of where the first difference is, so the
/// answer's timing does not reveal the key byte by byte.
fn same_secret(given: &[u8], key: &[u8]) -> bool {
    given.len() == key.len() && given.iter().zip(key).fold(0, |diff, (a, b)| diff | (a ^ b)) == 0
}

async fn count_response(
    State(server): State<Arc<Server>>,
    request: Request,
    next: Next,
) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |path| path.as_str())
        .to_string();
    let response = next.run(request).await;
    server
        .metrics
        .count_response(&endpoint, response.status().as_u16());
    response
}
