//! The query API: stateless reads of the read models and of the event log, from Postgres
//! read replicas through an in-process cache.
//!
//! Instances share nothing, so more of them can be added behind a load balancer at will.
//! - `sources`: the replica pool with the primary as fallback, and the lag monitor.
//! - `cache` + `invalidations`: moka caches of account and transfer rows, kept honest by the
//!   projectors' invalidations over NATS (a row older than an invalidation seen is never kept).
//! - `consistency`: read-your-writes with the command API's consistency tokens.
//! - `accounts`, `transfers`, `entries` (folded from the entry's stream in the log), `audit`, `proofs` (inclusion proofs against signed checkpoints),
//!   `ledger` (the trial balance and the system accounts, and its gauge): the handlers;
//!   `routes`: the router and what they share.
//!
//! Reads need the `reader` role, audit reads the `auditor` role; `/health`, `/ready` and
//! `/openapi.json` are open. [`app`] puts the router behind `tally_service::edge` (timeout,
//! authentication, per-client rate limit).

// The handlers' helpers fail with the finished `Response` (a problem): it is built only on
// the error path, and boxing it would add an allocation to no one's benefit.
#![allow(clippy::result_large_err)]

pub mod accounts;
pub mod audit;
pub mod cache;
pub mod consistency;
pub mod entries;
pub mod invalidations;
pub mod ledger;
pub mod openapi;
pub mod proofs;
pub mod routes;
pub mod sources;
pub mod transfers;
pub mod views;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tally_service::auth::AuthConfig;
use tally_service::edge::{Edge, LimitsConfig};
use tally_service::shutdown::{Listeners, ShutdownConfig};

use crate::invalidations::{CacheConfig, Caches};
use crate::sources::{LagBounds, Sources};

/// Configuration of the `tally-query-api` binary (flags or `TALLY_*` variables).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tally-query-api", about = "Tally query API", version)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "TALLY_QUERY_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Address of the operations listener: `/metrics`, `/health`, `/ready`. Keep it off the
    /// clients' network (`tally_service::probes`).
    #[arg(long, env = "TALLY_QUERY_OPS_LISTEN", default_value = "127.0.0.1:9181")]
    pub ops_listen: SocketAddr,
    /// Read replicas, comma-separated. Reads go round-robin to those within the lag bounds,
    /// to the primary when none is.
    #[arg(long, env = "TALLY_REPLICA_URLS", value_delimiter = ',', hide_env_values = true)]
    pub replica_urls: Vec<String>,
    /// One more read replica (the single-replica form, kept for existing deployments).
    #[arg(long, env = "TALLY_REPLICA_URL", hide_env_values = true)]
    pub replica_url: Option<String>,
    /// Postgres primary: the fallback when no replica is usable (and for lag measurements).
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tally",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Upper bound on connections to each database.
    #[arg(long, env = "TALLY_DB_CONNECTIONS_MAX", default_value_t = 32)]
    pub db_connections_max: u32,
    /// A replica further behind than this (milliseconds) leaves the rotation.
    #[arg(long, env = "TALLY_REPLICA_LAG_MAX_MS", default_value_t = 5_000)]
    pub replica_lag_max_ms: u64,
    /// A replica further behind than this (bytes of WAL) leaves the rotation.
    #[arg(long, env = "TALLY_REPLICA_LAG_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub replica_lag_max_bytes: u64,
    /// How often each replica's health and lag are checked (milliseconds).
    #[arg(long, env = "TALLY_REPLICA_CHECK_MS", default_value_t = 1_000)]
    pub replica_check_ms: u64,
    /// NATS, for the projectors' cache invalidations, signed in as the query API's user
    /// (`tally_query`: it may only subscribe to them).
    #[command(flatten)]
    pub nats: tally_event_store::nats_users::NatsArgs,
    /// Subject prefix of the events (invalidations come on `<prefix>-invalidations.>`).
    #[arg(long, env = "TALLY_SUBJECT_PREFIX", default_value = tally_event_store::partition::SUBJECT_PREFIX_DEFAULT)]
    pub subject_prefix: String,
    /// Rows kept per cache (accounts, transfers); 0 turns the cache off.
    #[arg(long, env = "TALLY_QUERY_CACHE_MAX_ENTRIES", default_value_t = 100_000)]
    pub cache_max_entries: u64,
    /// A cached row is dropped this long after it was loaded (milliseconds), as a safety net.
    #[arg(long, env = "TALLY_QUERY_CACHE_TTL_MS", default_value_t = 60_000)]
    pub cache_ttl_ms: u64,
    /// How long a read with a consistency token waits for its write (milliseconds).
    #[arg(long, env = "TALLY_CONSISTENCY_WAIT_MS", default_value_t = 2_000)]
    pub consistency_wait_ms: u64,
    /// How often the trial balance is read for the gauge `tally_trial_balance_minor`
    /// (seconds; each reading passes over every balance row once); 0 turns it off.
    #[arg(long, env = "TALLY_TRIAL_BALANCE_INTERVAL_S", default_value_t = 60)]
    pub trial_balance_interval_s: u64,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub limits: LimitsConfig,
    #[command(flatten)]
    pub shutdown: ShutdownConfig,
}

impl Config {
    /// Every replica configured, in order.
    pub fn replicas(&self) -> Vec<String> {
        self.replica_urls
            .iter()
            .chain(&self.replica_url)
            .filter(|url| !url.is_empty())
            .cloned()
            .collect()
    }

    fn replica_lag_max(&self) -> Duration {
        Duration::from_millis(self.replica_lag_max_ms)
    }
}

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub sources: Arc<Sources>,
    pub caches: Arc<Caches>,
    /// How long a read with a consistency token waits.
    pub consistency_wait: Duration,
}

impl AppState {
    /// Lazy, like every Tally pool: the instance starts and answers `/ready` with 503 until
    /// a database it reads from is reachable. Starts the replica monitor, the invalidation
    /// listener and the trial balance gauge (so it must run inside a Tokio runtime).
    pub fn start(config: &Config) -> Result<Self, sqlx::Error> {
        let bounds = LagBounds {
            bytes_max: config.replica_lag_max_bytes,
            seconds_max: config.replica_lag_max().as_secs_f64(),
        };
        let sources = Arc::new(Sources::connect(
            &config.replicas(),
            &config.database_url,
            config.db_connections_max,
            bounds,
        )?);
        let caches = Arc::new(Caches::new(CacheConfig {
            entries_max: config.cache_max_entries,
            ttl: Duration::from_millis(config.cache_ttl_ms),
            replica_lag_max: config.replica_lag_max(),
        }));
        tokio::spawn(
            sources
                .clone()
                .monitor(Duration::from_millis(config.replica_check_ms.max(10))),
        );
        tokio::spawn(invalidations::listen(
            caches.clone(),
            config.nats.clone(),
            config.subject_prefix.clone(),
        ));
        let state = Self {
            sources,
            caches,
            consistency_wait: Duration::from_millis(config.consistency_wait_ms),
        };
        if config.trial_balance_interval_s > 0 {
            tokio::spawn(ledger::watch(
                state.clone(),
                Duration::from_secs(config.trial_balance_interval_s),
            ));
        }
        Ok(state)
    }
}

/// The query API as served: every route behind the edge's timeout, authentication and rate
/// limit.
pub fn app(state: AppState, edge: &Edge) -> axum::Router {
    tally_service::edge::protect(routes::router(state), edge)
}

/// Serves the query API on `listeners.main` and its probes and metrics on `listeners.ops`
/// until `shutdown` resolves, then drains as `config` says
/// (`tally_service::shutdown::serve_with_ops`: grace with `/ready` at 503, stop accepting,
/// finish the requests in flight, bounded).
pub async fn run(
    listeners: Listeners,
    state: AppState,
    edge: &Edge,
    config: &ShutdownConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ops = routes::ops_router(state.clone());
    tally_service::shutdown::serve_with_ops(listeners, app(state, edge), ops, &edge.limits, config, shutdown).await
}
