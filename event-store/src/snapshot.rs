//! Snapshots of long streams: a cache of folded state, never a source of truth.
//!
//! A writer loads the latest snapshot of a stream and then only the events after its version.
//! Saving is an upsert that never moves a snapshot backwards, so two writers saving at once
//! leave the newer one. Deleting every snapshot is always safe: loads fall back to a replay.
//! `tally audit verify` never reads snapshots; the hash chain covers only the log.

use std::collections::HashMap;

use sqlx::PgPool;
use uuid::Uuid;

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub stream_type: String,
    /// The stream version `state` reflects.
    pub version: i64,
    /// The shape of `state` (the aggregate's snapshot version when it was written).
    pub state_version: i32,
    pub state: serde_json::Value,
}

/// The latest snapshot of `stream_id`, if any.
pub async fn load(pool: &PgPool, stream_id: Uuid) -> Result<Option<Snapshot>, sqlx::Error> {
    Ok(load_many(pool, &[stream_id]).await?.remove(&stream_id))
}

/// The latest snapshots of many streams, in one round trip.
pub async fn load_many(pool: &PgPool, stream_ids: &[Uuid]) -> Result<HashMap<Uuid, Snapshot>, sqlx::Error> {
    if stream_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(Uuid, String, i64, i32, serde_json::Value)> = sqlx::query_as(
        "SELECT stream_id, stream_type, version, state_version, state FROM snapshots WHERE stream_id = ANY($1)",
    )
    .bind(stream_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(stream_id, stream_type, version, state_version, state)| {
            let snapshot = Snapshot {
                stream_type,
                version,
                state_version,
                state,
            };
            (stream_id, snapshot)
        })
        .collect())
}

/// Stores `snapshot` for `stream_id` unless a snapshot at a later version is already there.
pub async fn save(pool: &PgPool, stream_id: Uuid, snapshot: &Snapshot) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO snapshots (stream_id, stream_type, version, state_version, state) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (stream_id) DO UPDATE \
            SET version = EXCLUDED.version, state_version = EXCLUDED.state_version, \
                state = EXCLUDED.state, taken_at = now() \
          WHERE snapshots.version < EXCLUDED.version OR snapshots.state_version <> EXCLUDED.state_version",
    )
    .bind(stream_id)
    .bind(&snapshot.stream_type)
    .bind(snapshot.version)
    .bind(snapshot.state_version)
    .bind(&snapshot.state)
    .execute(pool)
    .await?;
    Ok(())
}
