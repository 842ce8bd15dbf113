//! The HTTP listener of a worker process (projector, relay): `/health`, its own `/ready` and
//! `/metrics`, nothing else. The APIs serve the same three routes on their main listener.

use axum::Router;
use axum::routing::{MethodRouter, get};

/// `/health` (the process answers), `/ready` (the worker's `ready` handler) and `/metrics`
/// (Prometheus); any other path is a `no-route` problem.
pub fn router<S: Clone + Send + Sync + 'static>(ready: MethodRouter<S>) -> Router<S> {
    Router::new()
        .route("/health", get(crate::problem::health))
        .route("/ready", ready)
        .route("/metrics", get(crate::metrics::serve))
        .fallback(crate::problem::fallback)
}
