//! The query API: stateless reads of the read models, from a Postgres read replica.
//!
//! Instances share nothing, so more of them can be added behind a load balancer at will.
//! Reads go to the replica pool; the primary is used only when no replica URL is configured.
//! Every route but `/health`, `/ready` and `/openapi.json` needs the `reader` role; [`app`]
//! puts the router behind `tally_service::edge` (timeout, authentication, per-client rate limit).

pub mod openapi;
pub mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tally_service::auth::AuthConfig;
use tally_service::edge::{Edge, LimitsConfig};
use tally_service::shutdown::ShutdownConfig;

/// Configuration of the `tally-query-api` binary (flags or `TALLY_*` variables).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tally-query-api", about = "Tally query API", version)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "TALLY_QUERY_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Read replica to read from. Without it, reads go to the primary.
    #[arg(long, env = "TALLY_REPLICA_URL", hide_env_values = true)]
    pub replica_url: Option<String>,
    /// Postgres primary, the fallback when no replica is configured.
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tally",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Upper bound on connections to the replica.
    #[arg(long, env = "TALLY_DB_CONNECTIONS_MAX", default_value_t = 32)]
    pub db_connections_max: u32,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub limits: LimitsConfig,
    #[command(flatten)]
    pub shutdown: ShutdownConfig,
}

impl Config {
    /// The database this instance reads from.
    pub fn read_url(&self) -> &str {
        self.replica_url.as_deref().unwrap_or(&self.database_url)
    }
}

/// How long a read waits for a pooled connection before answering 503.
pub const READ_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The read pool (a replica when configured).
    pub reads: PgPool,
}

impl AppState {
    /// Lazy, like every Tally pool: the instance starts and answers `/ready` with 503 until
    /// its database is reachable.
    pub fn connect(config: &Config) -> Result<Self, sqlx::Error> {
        let reads = PgPoolOptions::new()
            .max_connections(config.db_connections_max)
            .acquire_timeout(READ_ACQUIRE_TIMEOUT)
            .connect_lazy(config.read_url())?;
        Ok(Self { reads })
    }
}

/// The query API as served: every route behind the edge's timeout, authentication and rate
/// limit.
pub fn app(state: AppState, edge: &Edge) -> axum::Router {
    tally_service::edge::protect(routes::router(state), edge)
}

/// Serves the query API on `listener` until `shutdown` resolves, then drains as `config`
/// says (`tally_service::shutdown::serve`: grace with `/ready` at 503, stop accepting, finish
/// the requests in flight, bounded).
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    edge: &Edge,
    config: &ShutdownConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tally_service::shutdown::serve(listener, app(state, edge), config, shutdown).await
}
