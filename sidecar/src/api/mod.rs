//! The event-store API: the sidecar's HTTP API for the pod's own containers, on a loopback address by default.
//! JSON in and out, errors as problem details, the OpenAPI document at `GET /v1/openapi.json`.
//!
//! - [`body`]: events as clients send them (the append body, structured CloudEvents), parsed once.
//! - [`events`]: append to an aggregate with an expected version (several events atomically) and read it back.
//! - [`wait`]: read-your-writes — wait until a projection has applied every event of its filter up to a sequence.
//! - [`reactors`]: a reactor's parking lot — list, retry, skip.
//! - [`problem`]: errors as `application/problem+json`.
//! - [`metrics`]: requests by route and status, append latency, conflicts, duplicates.

pub mod body;
pub mod events;
pub mod metrics;
pub mod problem;
pub mod reactors;
pub mod wait;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::status::ProjectionState;
use crate::store::Store;
pub use metrics::ApiMetrics;
use problem::Problem;

/// The OpenAPI document, kept in the repository and served as is.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The largest request body: 1,000 events of 64 KiB each.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// A projection the `wait` endpoint can wait on.
#[derive(Debug, Clone)]
pub struct WaitTarget {
    /// The projection's live state (checkpoint, halt).
    pub state: Arc<ProjectionState>,
    /// The store it reads.
    pub store: Arc<Store>,
    /// Its durable consumer, whose filter says which events it applies.
    pub consumer: String,
}

/// What the API serves.
#[derive(Debug, Default)]
pub struct ApiState {
    /// Stores by EventStore name.
    pub stores: BTreeMap<String, Arc<Store>>,
    /// Projections by Projection name.
    pub projections: BTreeMap<String, WaitTarget>,
    /// Reactors by Reactor name.
    pub reactors: BTreeMap<String, crate::reactor::ReactorHandle>,
    /// Request metrics.
    pub metrics: Option<Arc<ApiMetrics>>,
}

/// The API's route templates (also the `route` label of its request metrics).
const OPENAPI_ROUTE: &str = "/v1/openapi.json";
const EVENTS_ROUTE: &str = "/v1/stores/{store}/aggregates/{type}/{id}/events";
const WAIT_ROUTE: &str = "/v1/projections/{name}/wait";
const PARKED_ROUTE: &str = "/v1/reactors/{name}/parked";
const RETRY_ROUTE: &str = "/v1/reactors/{name}/parked/{aggregate}/retry";
const SKIP_ROUTE: &str = "/v1/reactors/{name}/parked/{aggregate}/skip";
const ROUTES: [&str; 6] = [
    OPENAPI_ROUTE,
    EVENTS_ROUTE,
    WAIT_ROUTE,
    PARKED_ROUTE,
    RETRY_ROUTE,
    SKIP_ROUTE,
];

/// The API's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route(OPENAPI_ROUTE, get(openapi))
        .route(EVENTS_ROUTE, post(events::append).get(events::read))
        .route(WAIT_ROUTE, get(wait::wait))
        .route(PARKED_ROUTE, get(reactors::list))
        .route(RETRY_ROUTE, post(reactors::retry))
        .route(SKIP_ROUTE, post(reactors::skip))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Answers are small and latency matters (an append waits on them): no Nagle delay.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn not_found() -> Problem {
    Problem::not_found("no such endpoint; see GET /v1/openapi.json")
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint; see GET /v1/openapi.json",
    )
}

/// Counts every request by route template and status.
async fn count(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| ROUTES.into_iter().find(|r| *r == p.as_str()))
        .unwrap_or("unmatched");
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    };
    let response = next.run(request).await;
    if let Some(m) = &state.metrics {
        m.request(method, route, response.status().as_u16());
    }
    response
}
