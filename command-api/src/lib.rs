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
