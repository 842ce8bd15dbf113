//! What `tally projections` reads and changes: status per projection and partition, pause,
//! resume, retry after a poison event.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool};

use crate::catalog;

/// One (projection, partition) as `status` shows it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct PartitionStatus {
    pub projection: String,
    pub partition: i32,
    /// Generation readers see, and the code shape that built it.
    pub generation: Option<i32>,
    pub shape: Option<i32>,
    /// A generation being built by a rebuild.
    pub building: Option<i32>,
    pub paused: bool,
    /// `running`, `retrying`, `failed`, `needs-rebuild`; `paused` when the projection is.
    pub state: String,
    /// The worker holding the lease, when the lease is current.
    pub worker: Option<String>,
    pub stream_sequence: i64,
    pub position: i64,
    /// Messages still waiting in the partition's consumer after its last batch.
    pub lag_events: i64,
    /// Age of the last applied event while messages wait; 0 when caught up.
    pub lag_seconds: f64,
    pub applied: i64,
    pub duplicates: i64,
    pub dead_letters: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// Every partition of every projection, in (projection, partition) order.
pub async fn status(pool: &PgPool) -> Result<Vec<PartitionStatus>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.projection, p.partition, j.generation, j.shape, j.building, j.paused, \
                CASE WHEN j.paused THEN 'paused' ELSE p.state END AS state, \
                CASE WHEN p.lease_until > now() THEN p.worker END AS worker, \
                p.stream_sequence, p.position, p.lag_events, \
                CASE WHEN p.lag_events > 0 AND p.last_event_at IS NOT NULL \
                     THEN extract(epoch FROM now() - p.last_event_at)::float8 ELSE 0 END AS lag_seconds, \
                p.applied, p.duplicates, p.dead_letters, p.last_error, p.last_error_at, p.updated_at \
         FROM projection_partitions p JOIN projections j ON j.name = p.projection \
         ORDER BY p.projection, p.partition",
    )
    .fetch_all(pool)
    .await
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("no projection or read model is called {0:?} (projections: {1})")]
    Unknown(String, String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn projection(name: &str) -> Result<&'static str, OpsError> {
    catalog::resolve(name).ok_or_else(|| OpsError::Unknown(name.to_owned(), catalog::PROJECTIONS.join(", ")))
}

/// Stops (or restarts) every partition of a projection after the batch in hand. Returns once
/// no batch of it is running: the flag is written under the lock batches share.
pub async fn set_paused(pool: &PgPool, name: &str, paused: bool) -> Result<&'static str, OpsError> {
    let projection = projection(name)?;
    sqlx::query("UPDATE projections SET paused = $2, updated_at = now() WHERE name = $1")
        .bind(projection)
        .bind(paused)
        .execute(pool)
        .await?;
    Ok(projection)
}

/// Lets failed partitions (stopped at a poison event) try again; `partition` limits it to
/// one. Returns how many partitions were failed.
pub async fn retry(pool: &PgPool, name: &str, partition: Option<i32>) -> Result<u64, OpsError> {
    let projection = projection(name)?;
    let done = sqlx::query(
        "UPDATE projection_partitions SET state = 'running', updated_at = now() \
         WHERE projection = $1 AND state = 'failed' AND ($2::int IS NULL OR partition = $2)",
    )
    .bind(projection)
    .bind(partition)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// An account whose owner matched [`accounts_by_owner`].
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct AccountMatch {
    pub account_id: uuid::Uuid,
    pub owner: String,
    pub currency: String,
    pub balance: i64,
    pub status: String,
}

/// Most accounts [`accounts_by_owner`] returns.
pub const OWNER_MATCHES_MAX: i64 = 50;

/// Accounts whose owner is `owner` or starts with it (case-insensitive), from the live
/// `account_balances` view, at most [`OWNER_MATCHES_MAX`]: how the console finds an account
/// by a prefix of its owner (the query API's `GET /v1/accounts?owner=` matches owners
/// exactly, through an index). No index serves a case-insensitive prefix: a scan, bounded by
/// the limit.
pub async fn accounts_by_owner(pool: &PgPool, owner: &str) -> Result<Vec<AccountMatch>, sqlx::Error> {
    let escaped = owner.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    sqlx::query_as(
        "SELECT account_id, owner, currency, balance, status FROM account_balances \
         WHERE owner ILIKE $1 ORDER BY owner, account_id LIMIT $2",
    )
    .bind(format!("{escaped}%"))
    .bind(OWNER_MATCHES_MAX)
    .fetch_all(pool)
    .await
}
