//! Snapshots of long streams: a cache of folded state, never a source of truth.
//!
//! A writer loads the latest snapshot of a stream and then only the events after its version.
//! Saving is an upsert that never moves a snapshot backwards, so two writers saving at once
//! leave the newer one. Deleting every snapshot is always safe: loads fall back to a replay.
//! `tally audit verify` never reads snapshots; the hash chain covers only the log.

use std::collections::HashMap;

use sqlx::{PgPool, Row};
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

/// A stream as [`load_streams`] read it: its latest snapshot, if any, and the events after it.
#[derive(Debug, Clone, Default)]
pub struct StoredStream {
    pub snapshot: Option<Snapshot>,
    /// The global position of the event at the snapshot's version (0 without a snapshot): where
    /// the stream stands when no event follows the snapshot.
    pub snapshot_position: i64,
    /// In version order, at most `limit_each` of them: a stream that returns that many may have
    /// more (page on with [`crate::EventStore::read_stream`]).
    pub events: Vec<crate::StoredEvent>,
}

/// The latest snapshot of each of `stream_ids` and up to `limit_each` events after it (after
/// version 0 when there is none), in **one** round trip: a command on a stream the writer's
/// cache does not hold waits on this before it is decided. The snapshot's state comes once
/// per stream, on its first row.
pub async fn load_streams<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    stream_ids: &[Uuid],
    limit_each: i64,
) -> Result<HashMap<Uuid, StoredStream>, crate::StoreError> {
    if stream_ids.is_empty() {
        return Ok(HashMap::new());
    }
    // Each stream once: a caller may name one id under two kinds, and a repeated id would
    // return its events twice.
    let mut ids = stream_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    // `e.*` first: columns 0-12 are `EVENT_COLUMNS`, decoded by `stored_event`.
    let sql = format!(
        "SELECT e.*, s.sid, sn.stream_type, sn.version, sn.state_version, \
                CASE WHEN e.version IS NULL OR e.version = sn.version + 1 THEN sn.state END, \
                sn.position \
         FROM UNNEST($1::uuid[]) AS s(sid) \
         LEFT JOIN LATERAL (SELECT stream_type, version, state_version, state, \
                                   (SELECT p.position FROM events p \
                                    WHERE p.stream_id = s.sid AND p.version = snapshots.version) AS position \
                            FROM snapshots WHERE stream_id = s.sid LIMIT 1) sn ON true \
         LEFT JOIN LATERAL (SELECT {} FROM events \
                            WHERE stream_id = s.sid AND version > coalesce(sn.version, 0) \
                            ORDER BY version LIMIT $2) e ON true \
         ORDER BY s.sid, e.version",
        crate::EVENT_COLUMNS
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .bind(limit_each.clamp(1, crate::READ_LIMIT_MAX))
        .fetch_all(executor)
        .await?;
    let mut streams: HashMap<Uuid, StoredStream> = HashMap::with_capacity(ids.len());
    for row in &rows {
        let stream_id: Uuid = row.try_get(13)?;
        let stream = streams.entry(stream_id).or_default();
        stream.snapshot_position = row.try_get::<Option<i64>, _>(18)?.unwrap_or(0);
        let state: Option<serde_json::Value> = row.try_get(17)?;
        if let (Some(state), Some(stream_type), Some(version), Some(state_version)) =
            (state, row.try_get(14)?, row.try_get(15)?, row.try_get(16)?)
        {
            stream.snapshot = Some(Snapshot {
                stream_type,
                version,
                state_version,
                state,
            });
        }
        if row.try_get::<Option<i64>, _>(0)?.is_some() {
            stream.events.push(crate::stored_event(row)?);
        }
    }
    Ok(streams)
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
