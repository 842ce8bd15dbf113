//! Probe and metrics routes outside the API: the HTTP listener of a worker process (projector,
//! relay) and the **operations listener** of each API.
//!
//! Each API serves its business routes, `/health`, `/ready` and `/openapi.json` on its main
//! listener, and Prometheus `/metrics` only on a second one (`TALLY_COMMAND_OPS_LISTEN`,
//! `TALLY_QUERY_OPS_LISTEN`; loopback by default), which a deployment keeps on its private
//! network: what the process counts (routes, outcomes, queue depths) is not for the callers of
//! the API. The operations listener answers `/health` and `/ready` too, so a scraper or a
//! liveness probe needs only that port.

use axum::Router;
use axum::routing::{MethodRouter, get};

/// `/health` (the process answers), `/ready` (the process's `ready` handler) and `/metrics`
/// (Prometheus); any other path is a `no-route` problem. A worker's whole listener, and an
/// API's operations listener.
pub fn router<S: Clone + Send + Sync + 'static>(ready: MethodRouter<S>) -> Router<S> {
    Router::new()
        .route("/health", get(crate::problem::health))
        .route("/ready", ready)
        .route("/metrics", get(crate::metrics::serve))
        .fallback(crate::problem::fallback)
        .method_not_allowed_fallback(crate::problem::method_not_allowed)
}
