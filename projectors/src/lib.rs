//! Projectors: NATS JetStream consumers that build Tally's read models.
//!
//! A projection ([`model::Projection`]) folds the events of one stream type into rows that
//! remember the stream version they reflect: [`accounts`] (`account_balances`,
//! `account_statement`, `ledger_totals`) and [`transfers`] (`transfers`). Each has one durable
//! pull consumer per partition (`<prefix>.<partition>.>`); workers share the
//! (projection, partition) units through leases in Postgres ([`worker`]). A batch is one
//! Postgres transaction changing the rows *and* the partition's checkpoint, acknowledged after
//! the commit; a redelivered event is dropped by version and a version jump is filled from the
//! log ([`model::apply_batch`]). Effect: exactly once.
//!
//! Rows live in generation tables behind views ([`catalog`]); [`rebuild`] builds a new
//! generation straight from the log and swaps the views atomically. [`ops`] is what
//! `tally projections` shows and changes; [`reconcile`] compares every read model with a fold
//! of the log (`tally ledger reconcile`).

pub mod accounts;
pub mod catalog;
pub mod consumer;
pub mod copy;
pub mod http;
pub mod model;
pub mod ops;
pub mod rebuild;
pub mod reconcile;
pub mod transfers;
mod verify;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sqlx::PgPool;
use tally_event_store::EventStore;
use tally_event_store::partition::Topology;

/// Applies the read-model migrations (`projectors/migrations`), kept in their own history
/// table beside the event store's, creates the first generation of every projection that
/// has none, and grants the service roles what concerns the read models (run it after the
/// event store's `migrate`, which creates the roles).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name("_tally_projector_migrations");
    migrator.run(pool).await?;
    // First the grants: the first generation is created as the projectors' role.
    catalog::grant_roles(pool).await?;
    catalog::ensure_all(pool, 0).await?;
    Ok(())
}

/// Configuration of the `tally-projector` binary (flags or `TALLY_*` variables).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tally-projector", about = "Tally projector worker", version)]
pub struct Config {
    /// Postgres primary: read models are written here, gaps filled from the log here.
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tally",
        hide_env_values = true
    )]
    pub database_url: String,
    #[arg(long, env = "TALLY_DB_CONNECTIONS_MAX", default_value_t = 16)]
    pub db_connections_max: u32,
    /// NATS, signed in as the projectors' user (`tally_projector`).
    #[command(flatten)]
    pub nats: tally_event_store::nats_users::NatsArgs,
    #[arg(long, env = "TALLY_NATS_STREAM", default_value = tally_event_store::partition::STREAM_NAME_DEFAULT)]
    pub nats_stream: String,
    #[arg(long, env = "TALLY_SUBJECT_PREFIX", default_value = tally_event_store::partition::SUBJECT_PREFIX_DEFAULT)]
    pub subject_prefix: String,
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = tally_event_store::partition::PARTITIONS_DEFAULT)]
    pub partitions: u32,
    /// Copies of the stream a NATS cluster keeps (3 on a three-server cluster).
    #[arg(long, env = "TALLY_NATS_REPLICAS", default_value_t = tally_event_store::partition::REPLICAS_DEFAULT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=5))]
    pub nats_replicas: usize,
    /// Most events applied in one transaction.
    #[arg(long, env = "TALLY_PROJECTOR_BATCH_MAX", default_value_t = 500)]
    pub batch_events_max: usize,
    /// Longest wait for more events once a batch has its first, in milliseconds; only taken
    /// while JetStream reports more events pending for the partition.
    #[arg(long, env = "TALLY_PROJECTOR_BATCH_WAIT_MS", default_value_t = 5)]
    pub batch_wait_ms: u64,
    /// This worker's name in leases and status (default: host name and process id).
    #[arg(long, env = "TALLY_PROJECTOR_WORKER_ID")]
    pub worker_id: Option<String>,
    /// How long a lease lasts without renewal: a dead worker's partitions move after this.
    #[arg(long, env = "TALLY_PROJECTOR_LEASE_MS", default_value_t = 5_000)]
    pub lease_ms: u64,
    /// Attempts at a batch that fails for its data before its poison event is dead-lettered
    /// and the partition stopped.
    #[arg(long, env = "TALLY_PROJECTOR_POISON_ATTEMPTS", default_value_t = 5)]
    pub poison_attempts: u32,
    /// First back-off after a failed batch, in milliseconds (doubling up to 10 s).
    #[arg(long, env = "TALLY_PROJECTOR_BACKOFF_MS", default_value_t = 100)]
    pub backoff_ms: u64,
    /// `/health`, `/ready` and `/metrics`.
    #[arg(long, env = "TALLY_PROJECTOR_LISTEN", default_value = "0.0.0.0:9090")]
    pub listen: String,
    /// On SIGTERM, the longest wait for the batches in hand to commit and be acked, in
    /// milliseconds; the leases are given back either way.
    #[arg(long, env = "TALLY_SHUTDOWN_DRAIN_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub shutdown_drain_ms: u64,
}

/// Longest back-off between retries of a failing batch.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

impl Config {
    pub fn topology(&self) -> Topology {
        Topology {
            stream_name: self.nats_stream.clone(),
            subject_prefix: self.subject_prefix.clone(),
            partitions: self.partitions,
            replicas: self.nats_replicas,
        }
    }

    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

/// Runs this worker until `shutdown` resolves: claims its share of the (projection, partition)
/// units and consumes them. On shutdown every unit finishes (commits and acks) its batch, what
/// it had pulled and not applied goes back to the stream, and the leases are given back, so
/// another worker takes the units over at its next lease round instead of after the lease
/// expires.
pub async fn run(
    pool: PgPool,
    js: jetstream::Context,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    // A database starting, restarting or failing over when the worker starts: wait for it, as
    // the worker does for an outage later, instead of exiting.
    let mut delay = Duration::from_millis(100);
    loop {
        match catalog::ensure_all(&pool, config.partitions).await {
            Ok(()) => break,
            Err(error) if tally_event_store::is_unavailable_error(&error) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "database unavailable; the projector waits for it");
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(BACKOFF_MAX);
            }
            Err(error) => return Err(error.into()),
        }
    }
    let topology = config.topology();
    let stream = topology.ensure_stream(&js).await?;
    let worker_id = config.worker_id();
    let shared = Arc::new(consumer::Shared {
        store: EventStore::new(pool.clone()),
        pool: pool.clone(),
        js,
        stream,
        topology,
        worker_id: worker_id.clone(),
        batch_events_max: config.batch_events_max.clamp(1, 10_000),
        batch_wait: config.batch_wait(),
        retry: consumer::RetryPolicy {
            poison_attempts: config.poison_attempts.max(1),
            backoff_min: Duration::from_millis(config.backoff_ms.max(1)),
            backoff_max: BACKOFF_MAX,
        },
    });
    let leases = worker::Leases {
        pool,
        worker_id: worker_id.clone(),
        ttl: Duration::from_millis(config.lease_ms.max(500)),
        partitions: config.partitions,
        drain: Duration::from_millis(config.shutdown_drain_ms),
    };
    tracing::info!(worker = %worker_id, partitions = config.partitions, "projector running");
    worker::run(shared, leases, shutdown).await;
    Ok(())
}
