//! The command API: turns HTTP requests into domain commands, runs them against the current
//! state of their stream, and appends the resulting events with optimistic concurrency.
//!
//! Path of a command: [`routes`] parses the body into domain types (400/413/415/422 on bad
//! input) → [`writer`] queues it; a batch of commands (group commit) is decided against the
//! cached state of their streams and appended in one transaction, retrying internally on a
//! version conflict → the response carries the new version and a consistency token.
//! Every error becomes a problem+json in one place, [`error`]. Every route but `/health`,
//! `/ready` and `/openapi.json` needs the `teller` role; [`app`] puts the router behind
//! `tally_service::edge` (timeout, authentication, per-client rate limit).

pub mod batches;
pub mod command;
pub mod entries;
pub mod error;
pub mod execute;
pub mod expiry;
pub mod openapi;
pub mod profile;
pub mod routes;
pub mod transfers;
pub mod writer;

use std::future::Future;
use std::net::SocketAddr;

use tally_event_store::EventStore;
use tally_service::auth::AuthConfig;
use tally_service::edge::{Edge, LimitsConfig};
use tally_service::shutdown::{Listeners, ShutdownConfig};
use writer::{Writer, WriterConfig};

/// Configuration of the `tally-command-api` binary (flags or `TALLY_*` variables).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tally-command-api", about = "Tally command API", version)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "TALLY_COMMAND_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of the operations listener: `/metrics`, `/health`, `/ready`. Keep it off the
    /// clients' network (`tally_service::probes`).
    #[arg(long, env = "TALLY_COMMAND_OPS_LISTEN", default_value = "127.0.0.1:9180")]
    pub ops_listen: SocketAddr,
    /// Postgres primary (the event store).
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tally",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Upper bound on pooled connections to the primary; the writer's group-commit lanes hold
    /// one more each.
    #[arg(long, env = "TALLY_DB_CONNECTIONS_MAX", default_value_t = 32)]
    pub db_connections_max: u32,
    /// Delete idempotency keys older than this many days. Unset (the default): keep forever,
    /// so a retry is safe however late it comes.
    #[arg(long, env = "TALLY_IDEMPOTENCY_RETENTION_DAYS")]
    pub idempotency_retention_days: Option<u32>,
    /// Most commands committed in one transaction (group commit); 1 turns it off.
    #[arg(long, env = "TALLY_GROUP_COMMIT_MAX", default_value_t = WriterConfig::default().batch_max,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=writer::BATCH_MAX_LIMIT as u64))]
    pub group_commit_max: usize,
    /// Transactions running at once.
    #[arg(long, env = "TALLY_GROUP_COMMIT_LANES", default_value_t = WriterConfig::default().lanes,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub group_commit_lanes: usize,
    /// Microseconds a free lane waits for more commands before committing a small batch.
    #[arg(long, env = "TALLY_GROUP_COMMIT_WAIT_US", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub group_commit_wait_us: u64,
    /// Commands that may wait for the writer; beyond it, 503 with Retry-After.
    #[arg(long, env = "TALLY_COMMAND_QUEUE_MAX", default_value_t = WriterConfig::default().queue_max)]
    pub command_queue_max: usize,
    /// Streams whose state is kept in memory.
    #[arg(long, env = "TALLY_AGGREGATE_CACHE_MAX", default_value_t = WriterConfig::default().cache_streams_max)]
    pub aggregate_cache_max: u64,
    /// How often pending transfers past their deadline are expired, in milliseconds.
    #[arg(long, env = "TALLY_EXPIRY_INTERVAL_MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub expiry_interval_ms: u64,
    /// Write a snapshot of a stream every this many events.
    #[arg(long, env = "TALLY_SNAPSHOT_EVERY", default_value_t = WriterConfig::default().snapshot_every,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub snapshot_every: i64,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub limits: LimitsConfig,
    #[command(flatten)]
    pub shutdown: ShutdownConfig,
}

impl Config {
    pub fn writer(&self) -> WriterConfig {
        WriterConfig {
            batch_max: self.group_commit_max,
            lanes: self.group_commit_lanes,
            linger: std::time::Duration::from_micros(self.group_commit_wait_us),
            queue_max: self.command_queue_max,
            cache_streams_max: self.aggregate_cache_max,
            snapshot_every: self.snapshot_every,
        }
    }
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
    /// Every command is run through it.
    pub writer: Writer,
}

/// The command API as served: every route behind the edge's timeout, authentication and
/// rate limit.
pub fn app(state: AppState, edge: &Edge) -> axum::Router {
    tally_service::edge::protect(routes::router(state), edge)
}

/// Serves the command API on `listeners.main` and its probes and metrics on `listeners.ops`
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
