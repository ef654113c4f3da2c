//! The admin HTTP server on a pod-local port: `/healthz` (every projection's loop is alive — a projection that is
//! behind, waiting or halted is still alive), `/readyz` (every projection is connected, positioned and not halted;
//! the body says why not), `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::status::ProjectionState;

/// A loop that has not beaten for this long is considered dead.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// What the admin server reads.
#[derive(Debug)]
pub struct AdminState {
    /// Every projection.
    pub projections: Vec<Arc<ProjectionState>>,
    /// The metrics registry.
    pub registry: Registry,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let dead: Vec<String> = state
        .projections
        .iter()
        .filter(|p| p.since_beat() > LIVENESS_TIMEOUT)
        .map(|p| format!("{}: loop stuck for {:?}", p.key, p.since_beat()))
        .collect();
    if dead.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, dead.join("\n") + "\n")
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut ready = true;
    let mut lines = Vec::new();
    for p in &state.projections {
        let checkpoint = p.checkpoint.load(Ordering::Relaxed);
        let lag = p.lag.load(Ordering::Relaxed);
        let lag = if lag < 0 {
            "unknown".to_string()
        } else {
            lag.to_string()
        };
        let rebuilding = if p.rebuilding.load(Ordering::Relaxed) {
            ", rebuilding"
        } else {
            ""
        };
        let line = if let Some(reason) = p.halted() {
            ready = false;
            format!("{}: halted: {reason}", p.key)
        } else if let Some(waiting) = p.waiting() {
            ready = false;
            format!(
                "{}: not ready: {waiting} (checkpoint {checkpoint}{rebuilding})",
                p.key
            )
        } else {
            format!(
                "{}: ready (checkpoint {checkpoint}, lag {lag}{rebuilding})",
                p.key
            )
        };
        lines.push(line);
    }
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, lines.join("\n") + "\n")
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        ),
    }
}
