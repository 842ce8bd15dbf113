//! The Postgres limit of an append: single-row INSERT transactions into a table shaped like
//! `events`, with no application around them; and the limit of a batch of transfers
//! ([`RawBatchInsert`]): their rows in one multi-row INSERT per transaction.
//!
//! Each insert is one autocommit statement, so one round trip and one durable commit per
//! event: the least work a durable single-event append can do. The table is a copy of
//! `events` (columns, defaults, identity, checks, indexes) without its append-only triggers,
//! so the limit pays for the same index maintenance as the real log.

use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

use crate::runner::Operation;
use crate::sample::{self, OwnStreams};

/// The scratch table the raw limit writes.
pub const RAW_TABLE: &str = "bench_raw_events";

/// Stand-in for the 32-byte hashes: the limit does not hash, the columns still hold 32 bytes.
const HASH_PLACEHOLDER: [u8; 32] = [0x5a; 32];

/// Creates the scratch table as a copy of `events` if it does not exist yet. `LIKE` copies
/// neither triggers nor the table's rows.
pub async fn ensure_table(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {RAW_TABLE} (LIKE events INCLUDING ALL)"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// One raw writer: inserts the next version of one of its own streams per operation.
#[derive(Debug)]
pub struct RawInsert {
    pool: PgPool,
    streams: OwnStreams,
    sql: String,
}

impl RawInsert {
    pub fn new(pool: PgPool) -> Self {
        let sql = format!(
            "INSERT INTO {RAW_TABLE} (stream_type, stream_id, version, event_id, event_type, schema_version, \
                                      payload, metadata, recorded_at, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8::json, $9, $10, $11)"
        );
        Self {
            pool,
            streams: OwnStreams::new(sample::STREAMS_PER_WORKER),
            sql,
        }
    }

    async fn insert(&self, stream_id: Uuid, version: i64) -> Result<(), sqlx::Error> {
        // The chain-start check of `events` holds here too: only version 1 has no predecessor.
        let prev_hash = (version > 1).then_some(HASH_PLACEHOLDER.as_slice());
        sqlx::query(sqlx::AssertSqlSafe(self.sql.as_str()))
            .bind(sample::STREAM_TYPE)
            .bind(stream_id)
            .bind(version)
            .bind(Uuid::now_v7())
            .bind(sample::EVENT_TYPE)
            .bind(sample::SCHEMA_VERSION)
            .bind(sample::payload())
            .bind(sample::metadata())
            .bind(Utc::now())
            .bind(prev_hash)
            .bind(HASH_PLACEHOLDER.as_slice())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl Operation for RawInsert {
    async fn run(&mut self) -> Result<(), &'static str> {
        let (stream_id, version) = self.streams.current();
        let result = self.insert(stream_id, version + 1).await;
        self.streams.advance(result.is_ok());
        result.map_err(|_| "database")
    }
}

/// Rows a transfer writes: a leg on each account and the transfer's own record.
pub const ROWS_PER_TRANSFER: usize = 3;

/// One raw writer of batches: `transfers` transfers' rows per transaction, in one multi-row
/// `INSERT ... SELECT FROM UNNEST` (one round trip, one commit), each row the first of a new
/// stream. Counts `transfers` operations per transaction: the limit of `batch-transfers`.
#[derive(Debug)]
pub struct RawBatchInsert {
    pool: PgPool,
    transfers: usize,
    sql: String,
}

impl RawBatchInsert {
    pub fn new(pool: PgPool, transfers: usize) -> Self {
        let sql = format!(
            "INSERT INTO {RAW_TABLE} (stream_type, stream_id, version, event_id, event_type, schema_version, \
                                      payload, metadata, recorded_at, prev_hash, hash) \
             SELECT $1, s, 1, e, $2, $3, $4::json, m::json, $5, NULL, $6 \
             FROM UNNEST($7::uuid[], $8::uuid[], $9::text[]) AS r(s, e, m)"
        );
        Self { pool, transfers, sql }
    }
}

impl Operation for RawBatchInsert {
    async fn run(&mut self) -> Result<(), &'static str> {
        let rows = self.transfers * ROWS_PER_TRANSFER;
        let streams: Vec<Uuid> = (0..rows).map(|_| Uuid::now_v7()).collect();
        let events: Vec<Uuid> = (0..rows).map(|_| Uuid::now_v7()).collect();
        let metadata: Vec<String> = (0..rows).map(|_| sample::metadata()).collect();
        sqlx::query(sqlx::AssertSqlSafe(self.sql.as_str()))
            .bind(sample::STREAM_TYPE)
            .bind(sample::EVENT_TYPE)
            .bind(sample::SCHEMA_VERSION)
            .bind(sample::payload())
            .bind(Utc::now())
            .bind(HASH_PLACEHOLDER.as_slice())
            .bind(&streams)
            .bind(&events)
            .bind(&metadata)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|_| "database")
    }

    fn ops(&self) -> u64 {
        self.transfers as u64
    }
}
