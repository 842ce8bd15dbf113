//! Projectors: NATS JetStream consumers that build Tally's read models.
//!
//! Each projection has one durable pull consumer per partition
//! (`<prefix>.<partition>.>`). Messages are applied in batches: one Postgres transaction
//! changes the read-model rows *and* the projection's checkpoint, then the messages are
//! acknowledged. Every row records the stream version it reflects, so a redelivered event
//! (crash between commit and ack, relay re-publish) is recognised and dropped, and a version
//! jump is filled from the Postgres log before applying. Effect: exactly once.

pub mod balances;
pub mod consumer;

use std::time::Duration;

use sqlx::PgPool;
use tally_event_store::partition::Topology;

/// Applies the read-model migrations (`projectors/migrations`), kept in their own history
/// table beside the event store's.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name("_tally_projector_migrations");
    migrator.run(pool).await
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
    #[arg(long, env = "TALLY_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[arg(long, env = "TALLY_NATS_STREAM", default_value = tally_event_store::partition::STREAM_NAME_DEFAULT)]
    pub nats_stream: String,
    #[arg(long, env = "TALLY_SUBJECT_PREFIX", default_value = tally_event_store::partition::SUBJECT_PREFIX_DEFAULT)]
    pub subject_prefix: String,
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = tally_event_store::partition::PARTITIONS_DEFAULT)]
    pub partitions: u32,
    /// Most events applied in one transaction.
    #[arg(long, env = "TALLY_PROJECTOR_BATCH_MAX", default_value_t = 500)]
    pub batch_events_max: usize,
    /// Longest wait for more events once a batch has its first, in milliseconds.
    #[arg(long, env = "TALLY_PROJECTOR_BATCH_WAIT_MS", default_value_t = 5)]
    pub batch_wait_ms: u64,
}

impl Config {
    pub fn topology(&self) -> Topology {
        Topology {
            stream_name: self.nats_stream.clone(),
            subject_prefix: self.subject_prefix.clone(),
            partitions: self.partitions,
        }
    }

    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }
}
