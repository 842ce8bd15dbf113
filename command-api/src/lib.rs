//! The command API: turns HTTP requests into domain commands, runs them against the current
//! state of their stream, and appends the resulting events with optimistic concurrency.
//!
//! Path of a command: [`routes`] parses the body into domain types (400/413/415/422 on bad
//! input) → [`execute`] loads the stream, asks the aggregate, appends, and retries internally
//! on a version conflict → the response carries the new version and a consistency token.
//! Every error becomes a problem+json in one place, [`error`].

pub mod error;
pub mod execute;
pub mod routes;

use std::future::Future;
use std::net::SocketAddr;

use tally_event_store::EventStore;

/// Configuration of the `tally-command-api` binary (flags or `TALLY_*` variables).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tally-command-api", about = "Tally command API", version)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "TALLY_COMMAND_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Postgres primary (the event store).
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tally",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Upper bound on connections to the primary.
    #[arg(long, env = "TALLY_DB_CONNECTIONS_MAX", default_value_t = 32)]
    pub db_connections_max: u32,
    /// Delete idempotency keys older than this many days. Unset (the default): keep forever,
    /// so a retry is safe however late it comes.
    #[arg(long, env = "TALLY_IDEMPOTENCY_RETENTION_DAYS")]
    pub idempotency_retention_days: Option<u32>,
}

/// How often expired idempotency keys are pruned, when a retention is configured.
pub const IDEMPOTENCY_PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Deletes idempotency keys older than `retention` every [`IDEMPOTENCY_PRUNE_INTERVAL`].
/// Several instances may run it at once: deleting is idempotent.
pub async fn prune_idempotency_keys(store: EventStore, retention: std::time::Duration) {
    let mut tick = tokio::time::interval(IDEMPOTENCY_PRUNE_INTERVAL);
    loop {
        tick.tick().await;
        match tally_event_store::idempotency::prune(store.pool(), retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "pruned expired idempotency keys"),
            Err(error) => tracing::warn!(%error, "pruning idempotency keys failed; will retry"),
        }
    }
}

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: EventStore,
}

/// Serves the command API on `listener` until `shutdown` resolves, then drains in-flight
/// requests.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
