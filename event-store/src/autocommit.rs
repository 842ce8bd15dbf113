//! Appends committed by one statement: no `BEGIN`, no `COMMIT`.
//!
//! A transaction of `BEGIN`, the events' insert, the idempotency records' insert and `COMMIT`
//! waits on four round trips to Postgres. Postgres runs a statement sent outside a transaction
//! as a transaction of its own, committed when the statement ends, so the events and the
//! records written by one statement (two data-modifying `WITH` parts) are committed together
//! or not at all, with one round trip. What a transaction checked between its statements is
//! checked inside this one, and a failed check raises an error ([`CHECK_FUNCTION`], migration
//! 0008), which rolls the whole statement back:
//!
//! - every record's key was free (else [`AutocommitError::KeysTaken`]: run again with claims);
//! - every stream was where the caller expected it (else a [`StoreError::Conflict`]).
//!
//! A stream whose predecessor hash the caller does not know costs one read before the statement
//! ([`crate::previous_hashes`]). A stored response is written before Postgres numbers the
//! events, so it holds 0 for their positions; [`positions_at`] finds them again for a replay.
//!
//! What is lost by giving up the transaction: an error that reaches the client after the commit
//! record could have been written, or a connection that breaks before the answer, leaves the
//! outcome unknown ([`AutocommitError::Unknown`]), exactly as a failed `COMMIT` does.

use std::collections::HashMap;

use sqlx::Row;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

use crate::idempotency::{IdempotencyKey, Records, StoredResponse};
use crate::{AppendedEvent, Columns, INSERT_EVENTS, StoreError, StreamAppend, checked_append, conflict_or_database};

/// The migration-made function the statement ends with: raises `TL001` when keys were taken
/// and `TL002` when a stream's rows were not written (its predecessor is not in the log).
const CHECK_FUNCTION: &str = "tally_append_checked";

/// Why an autocommitted append did not take effect, or may not have.
#[derive(Debug, thiserror::Error)]
pub enum AutocommitError {
    /// Rolled back: nothing of it was written. A conflict is one of these.
    #[error(transparent)]
    RolledBack(StoreError),
    /// This many keys were stored already (by a committed transaction, or one that committed
    /// while this one waited on it). Rolled back; run the commands again with claims.
    #[error("{0} idempotency keys were taken")]
    KeysTaken(usize),
    /// The statement may or may not have committed: the connection broke before its answer,
    /// or the server went away while the commit waited on a synchronous standby.
    #[error("outcome unknown: {0}")]
    Unknown(StoreError),
}

/// Appends `appends` and stores `records` (key, request hash, response) in one autocommitted
/// statement on `connection`, which must not be inside a transaction. Returns where each event
/// landed, sorted by stream and version. Either may be empty; with both empty nothing is sent.
pub async fn append_with_keys(
    connection: &mut PgConnection,
    mut appends: Vec<StreamAppend>,
    records: &[(&IdempotencyKey, &[u8; 32], &StoredResponse)],
) -> Result<Vec<AppendedEvent>, AutocommitError> {
    if records.is_empty() && appends.iter().all(|a| a.events.is_empty()) {
        // A batch of keyless refusals: nothing to write.
        return Ok(Vec::new());
    }
    let total = checked_append(&mut appends, !records.is_empty()).map_err(AutocommitError::RolledBack)?;
    // A read before the statement: when it fails, nothing was written.
    let previous = crate::previous_hashes(connection, &appends, false)
        .await
        .map_err(AutocommitError::RolledBack)?;
    // Every predecessor is now known: the insert checks each against the log.
    for (append, hash) in appends.iter_mut().zip(&previous) {
        if let Some(hash) = hash {
            append.known_prev_hash = Some(hash.as_slice().try_into().expect("32 bytes"));
        }
    }
    let cols = Columns::of(&appends, previous, total);

    if records.is_empty() && appends.len() == 1 {
        // One stream and no records: every row carries the same check, so the plain insert
        // writes all of them or none, and commits nothing when the stream moved. It is the
        // cheaper statement to plan and run (no function, no second part).
        let rows = cols
            .bind(sqlx::query(INSERT_EVENTS))
            .fetch_all(&mut *connection)
            .await
            .map_err(|error| statement_failed(error, &appends))?;
        if rows.len() < total {
            let append = &appends[0];
            return Err(AutocommitError::RolledBack(StoreError::Conflict {
                stream_id: append.stream_id,
                expected: append.expected_version,
            }));
        }
        return cols
            .landed(&rows)
            .map_err(|error| AutocommitError::Unknown(StoreError::Database(error)));
    }

    // The keys' part is `idempotency::store_many`'s insert; the last `SELECT` reads both parts
    // (so both run to completion first) and raises when either fell short. Its one row is there
    // even when no event is written, so the check always runs.
    let sql = format!(
        "WITH ev AS ({INSERT_EVENTS}), ik AS ({} RETURNING 1) \
         SELECT ev.stream_id, ev.version, ev.position \
         FROM (SELECT {CHECK_FUNCTION}($2::uuid[], ARRAY(SELECT stream_id FROM ev), \
                                       cardinality($15::text[]), (SELECT count(*) FROM ik)) AS ok) c \
         LEFT JOIN ev ON c.ok",
        Records::insert(14)
    );
    let records = Records::of(records);
    let rows = records
        .bind(cols.bind(sqlx::query(sqlx::AssertSqlSafe(sql))))
        .fetch_all(&mut *connection)
        .await
        .map_err(|error| statement_failed(error, &appends))?;
    // The one row of an append with no events has no stream.
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|row| row.try_get::<Option<Uuid>, _>(0).ok().flatten().is_some())
        .collect();
    cols.landed(&rows)
        .map_err(|error| AutocommitError::Unknown(StoreError::Database(error)))
}

/// What the statement's failure says about its outcome.
fn statement_failed(error: sqlx::Error, appends: &[StreamAppend]) -> AutocommitError {
    let sqlx::Error::Database(db) = &error else {
        // No answer from the server: it may have committed before the connection broke.
        return AutocommitError::Unknown(StoreError::Database(error));
    };
    let detail = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.detail())
        .unwrap_or_default()
        .to_owned();
    let severity = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .map(|pg| pg.severity());
    match db.code().as_deref() {
        Some("TL001") => AutocommitError::KeysTaken(detail.parse().unwrap_or(1)),
        Some("TL002") => {
            let lost = Uuid::try_parse(&detail)
                .ok()
                .and_then(|id| appends.iter().find(|a| a.stream_id == id))
                .unwrap_or(&appends[0]);
            AutocommitError::RolledBack(StoreError::Conflict {
                stream_id: lost.stream_id,
                expected: lost.expected_version,
            })
        }
        // An error of `ERROR` severity ends the statement and its transaction before the commit
        // (a statement timeout too: Postgres disarms it before committing).
        _ if severity == Some(sqlx::postgres::PgSeverity::Error) => {
            AutocommitError::RolledBack(conflict_or_database(error, appends))
        }
        // `FATAL` or `PANIC` may come from the commit itself: a server shut down while the
        // commit waited on a synchronous standby (57P01, committed locally), or one that failed
        // to flush the commit record, which may still be on disk.
        _ => AutocommitError::Unknown(StoreError::Database(error)),
    }
}

/// The global positions of the events at `(stream, version)`, those the log holds.
pub async fn positions_at(
    connection: &mut PgConnection,
    at: &[(Uuid, i64)],
) -> Result<HashMap<(Uuid, i64), i64>, sqlx::Error> {
    if at.is_empty() {
        return Ok(HashMap::new());
    }
    let (ids, versions): (Vec<Uuid>, Vec<i64>) = at.iter().copied().unzip();
    let rows: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT e.stream_id, e.version, e.position \
         FROM UNNEST($1::uuid[], $2::bigint[]) AS p(sid, version) \
         CROSS JOIN LATERAL (SELECT stream_id, version, position FROM events \
                             WHERE stream_id = p.sid AND version = p.version LIMIT 1) e",
    )
    .bind(&ids)
    .bind(&versions)
    .fetch_all(connection)
    .await?;
    Ok(rows.into_iter().map(|(s, v, p)| ((s, v), p)).collect())
}
