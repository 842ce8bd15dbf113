//! The projector's own HTTP endpoints: `/health` (the process answers), `/ready` (Postgres and
//! NATS reachable) and `/metrics` (Prometheus).

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sqlx::PgPool;
use tally_service::Problem;

#[derive(Clone)]
struct Deps {
    pool: PgPool,
    nats: async_nats::Client,
}

pub fn router(pool: PgPool, nats: async_nats::Client) -> Router {
    tally_service::probes::router(get(ready)).with_state(Deps { pool, nats })
}

async fn ready(State(deps): State<Deps>) -> Response {
    if sqlx::query("SELECT 1").execute(&deps.pool).await.is_err() {
        return Problem::unavailable(1)
            .detail("Postgres is unreachable.")
            .into_response();
    }
    if deps.nats.connection_state() != async_nats::connection::State::Connected {
        return Problem::unavailable(1).detail("NATS is unreachable.").into_response();
    }
    "ready".into_response()
}
