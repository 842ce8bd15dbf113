//! The Postgres event store: the one place that writes events.
//!
//! - [`EventStore::append`] writes the events of one or more streams in one transaction, with
//!   optimistic concurrency on each stream and a per-stream SHA-256 hash chain.
//! - [`EventStore::read_stream`] reads one stream in version order.
//! - [`EventStore::read_all`] reads the global log **in commit order, gap-safely**: only events
//!   of transactions that can no longer commit "behind" the reader are returned.
//! - [`relay`] publishes the log to NATS JetStream (the log is the outbox).
//! - [`verify`] re-checks every stream's hash chain (`tally audit verify`).
//! - [`checkpoint`], [`merkle`] and [`seal`]: signed checkpoints, a Merkle tree over the log in
//!   commit order whose signed root the table owner cannot recompute (`tally audit seal`,
//!   `tally audit verify --checkpoint`), and inclusion proofs against them.
//!
//! Postgres error codes are translated into [`StoreError`] here and nowhere else.

pub mod autocommit;
pub mod checkpoint;
pub mod hash;
pub mod idempotency;
pub mod merkle;
pub mod nats_users;
pub mod notify;
pub mod partition;
pub mod relay;
pub mod roles;
pub mod seal;
pub mod sealer;
pub mod snapshot;
pub mod trace;
pub mod verify;

use std::collections::HashMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, Row, Transaction};
use uuid::Uuid;

pub use hash::{Hash, event_hash};

/// Applies the event store's migrations (`event-store/migrations`), then creates the service
/// roles and grants them the event store's tables ([`roles`]). Safe to run concurrently:
/// sqlx takes an advisory lock. The history lives in its own table so the projectors can keep
/// their migrations in the same database without the two sets mistaking each other's entries.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    migrator().run(pool).await?;
    roles::ensure(pool).await?;
    Ok(())
}

/// The event store's migrations, recording their history where [`migrate`] does (a test of one
/// migration runs those before it first).
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name("_tally_event_store_migrations");
    migrator
}

/// Upper bound on events in one append, across all its streams. One command writes a handful;
/// the bound stops a bug (or a hostile batch) from building a multi-megabyte statement.
pub const APPEND_EVENTS_MAX: usize = 1_000;
/// Upper bound on one `read_all`/`read_stream` page.
pub const READ_LIMIT_MAX: i64 = 10_000;

/// How long a request waits for a pooled connection before it is refused (503 upstream).
pub const POOL_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A pool to the primary. Lazy: a service starts even while Postgres is still coming up, and
/// reports itself not ready (`/ready`) instead of crash-looping. Fails only on a malformed URL.
///
/// sqlx pings a connection (one round trip) both when it hands it out and when it comes back.
/// The ping on return already closes a connection that broke while in use, so only one that sat
/// idle for a while can have died unseen (a server restart, a failover, a dropped socket): the
/// ping on acquire is kept for those ([`IDLE_PING_AFTER`]) and skipped for a connection just
/// returned, which saves a round trip per transaction on a busy service. A server gone within
/// that window fails the next statement instead, which every caller already answers as
/// unavailable (503, retryable).
pub fn connect(database_url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    Ok(pool_options(max_connections).connect_lazy_with(database_url.parse()?))
}

/// How every pool of the store hands out connections ([`connect`]).
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_PING_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// A pooled connection idle this long is pinged before it is used again ([`connect`]).
pub const IDLE_PING_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Opens a connection for a writer of its own (the command API's group-commit lanes), outside
/// the pool: no ping when it is handed out or back, so a transaction costs only its own round
/// trips.
///
/// Its statements are planned once per connection (`plan_cache_mode = force_generic_plan`).
/// Planned afresh at every call, the append's and the idempotency records' inserts spent
/// 0.13-0.17 ms each in the planner beside 0.2 ms in the executor (pg_stat_statements with
/// `track_planning`, 16 connections): the custom plan, which knows how many rows the arrays
/// hold, always looks cheaper, so Postgres never settled on the generic one. A generic plan made
/// while a table is small would keep a sequential scan as it grows, so sequential scans are
/// priced out on such a connection (`enable_seqscan = off`); each statement a writer runs is
/// written as a probe of a primary key per row (or by `= ANY` of its keys) anyway.
pub async fn connect_writer(pool: &PgPool) -> Result<PgConnection, sqlx::Error> {
    let options = writer_options(pool);
    match tokio::time::timeout(POOL_ACQUIRE_TIMEOUT, PgConnection::connect_with(&options)).await {
        Ok(connected) => connected,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

/// The options of `pool`'s connections, with a writer's settings ([`connect_writer`]).
fn writer_options(pool: &PgPool) -> sqlx::postgres::PgConnectOptions {
    (*pool.connect_options())
        .clone()
        .options([("plan_cache_mode", "force_generic_plan"), ("enable_seqscan", "off")])
}

/// Why an append or read failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream is not at the expected version: someone else appended first. Reload and retry.
    #[error("stream {stream_id} is not at version {expected}")]
    Conflict { stream_id: Uuid, expected: i64 },
    /// The append itself is malformed (a programming error in the caller, not a client's).
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// A failure that says nothing about the request and goes away if it is simply tried again:
    /// a deadlock or serialization failure between concurrent transactions.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Database(error) if is_transient_error(error))
    }

    /// The database could not be reached, the connection broke, or the server is shutting
    /// down, restarting, in recovery or read-only (a standby, after a failover): retry later
    /// (503), the request itself is fine. See [`is_unavailable_error`].
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(error) => is_unavailable_error(error),
            _ => false,
        }
    }
}

/// A deadlock (40P01) or serialization failure (40001): retry the transaction.
pub fn is_transient_error(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

/// Whether `error` says the database, not the statement, is the problem, and that it passes:
/// unreachable, a broken or exhausted connection, or a server going away
/// ([`is_unavailable_code`]).
///
/// A protocol error is one too: a router (HAProxy, PgBouncer) with no server behind it accepts
/// the connection and closes it, which sqlx reports as an unexpected answer to its first
/// message ("unexpected response from SSLRequest"); and a connection whose protocol went out
/// of step is as unusable as a broken one.
pub fn is_unavailable_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().as_deref().is_some_and(is_unavailable_code),
        _ => false,
    }
}

/// SQLSTATEs that say the server, not the statement, is the problem, and that it passes:
/// class 08 (connection exception); 57P01 `admin_shutdown` and 57P02 `crash_shutdown`
/// ("terminating connection due to unexpected postmaster exit", a primary killed mid-command);
/// 57P03 `cannot_connect_now` (starting up or in recovery); 57P05 `idle_session_timeout` (an
/// idle connection the server closed); 53300 `too_many_connections`; 25006
/// `read_only_sql_transaction` (a former primary demoted to a standby, reached before the
/// router moved).
pub fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "57P05" | "53300" | "25006")
}

/// An event to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    /// The exact JSON text to store (hashed as is).
    pub payload: String,
    /// The exact JSON text of the metadata (hashed as is).
    pub metadata: String,
}

/// The events to append to one stream, expecting it to be at `expected_version` (0: new).
#[derive(Debug, Clone)]
pub struct StreamAppend {
    pub stream_type: String,
    pub stream_id: Uuid,
    pub expected_version: i64,
    /// The hash of the stream's event at `expected_version`, when the caller knows it from an
    /// event it saw committed before this transaction wrote anything (its own earlier append,
    /// or a load). `None`: the store reads it, which costs a round trip and also proves the
    /// predecessor's transaction older than this one (see `previous_hashes`). A hash learnt
    /// any later (read while this transaction is open) must not be passed. Ignored when
    /// `expected_version` is 0.
    pub known_prev_hash: Option<Hash>,
    pub events: Vec<NewEvent>,
}

/// Where an appended stream now stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Appended {
    pub stream_id: Uuid,
    /// The stream's version after the append.
    pub version: i64,
    /// Global position of the stream's last appended event.
    pub position: i64,
    /// The hash of that event: the `known_prev_hash` of the stream's next append.
    pub hash: Hash,
}

/// Where one appended event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AppendedEvent {
    pub stream_id: Uuid,
    pub version: i64,
    pub position: i64,
    /// The event's hash: the `known_prev_hash` of the stream's next append.
    pub hash: Hash,
}

/// A place in the global log, in commit order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub tx_id: i64,
    pub position: i64,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub position: i64,
    pub tx_id: i64,
    pub stream_type: String,
    pub stream_id: Uuid,
    pub version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: String,
    pub metadata: String,
    pub recorded_at: DateTime<Utc>,
    pub prev_hash: Option<Vec<u8>>,
    pub hash: Vec<u8>,
}

impl StoredEvent {
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            tx_id: self.tx_id,
            position: self.position,
        }
    }

    /// Recomputes this event's hash from its stored bytes.
    pub fn computed_hash(&self) -> Hash {
        event_hash(&hash::HashInput {
            prev_hash: self.prev_hash.as_deref(),
            stream_type: &self.stream_type,
            stream_id: self.stream_id,
            version: self.version,
            event_id: self.event_id,
            event_type: &self.event_type,
            schema_version: self.schema_version,
            recorded_at: self.recorded_at,
            payload: &self.payload,
            metadata: &self.metadata,
        })
    }
}

/// The columns every event read selects, decoded by [`stored_event`] in this order (shared with
/// [`verify`]).
pub(crate) const EVENT_COLUMNS: &str = "position, tx_id::text::bigint AS tx_id, stream_type, stream_id, version, event_id, \
     event_type, schema_version, payload::text AS payload, metadata::text AS metadata, recorded_at, prev_hash, hash";

/// Decodes a row of [`EVENT_COLUMNS`] by column index, in that order: a read of the log decodes
/// millions of rows, and a lookup by name hashes the name for every field of every row.
pub(crate) fn stored_event(row: &sqlx::postgres::PgRow) -> Result<StoredEvent, sqlx::Error> {
    Ok(StoredEvent {
        position: row.try_get(0)?,
        tx_id: row.try_get(1)?,
        stream_type: row.try_get(2)?,
        stream_id: row.try_get(3)?,
        version: row.try_get(4)?,
        event_id: row.try_get(5)?,
        event_type: row.try_get(6)?,
        schema_version: row.try_get(7)?,
        payload: row.try_get(8)?,
        metadata: row.try_get(9)?,
        recorded_at: row.try_get(10)?,
        prev_hash: row.try_get(11)?,
        hash: row.try_get(12)?,
    })
}

/// The event store over a Postgres pool (the primary).
#[derive(Debug, Clone)]
pub struct EventStore {
    pool: PgPool,
    /// The connections [`EventStore::append`] writes on: to the same server as `pool`, with a
    /// writer's settings ([`writer_options`]), made on the first append.
    appenders: std::sync::Arc<std::sync::OnceLock<PgPool>>,
    /// Set by [`EventStore::notifying`]: who tells the relay about commits.
    notifier: Option<notify::CommitNotifier>,
}

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            appenders: Default::default(),
            notifier: None,
        }
    }

    /// The same store, also sending a commit notification ([`notify`], at most one per
    /// [`notify::NOTIFY_INTERVAL`]) after every append it commits and whenever
    /// [`EventStore::committed`] is called; for the processes that write
    /// the log (the command API). Needs a Tokio runtime.
    pub fn notifying(self) -> Self {
        let notifier = Some(notify::CommitNotifier::spawn(self.pool.clone()));
        Self { notifier, ..self }
    }

    /// Events were committed in a transaction of the caller's (see [`append_in`]): wakes the
    /// relay when this store is [`EventStore::notifying`].
    pub fn committed(&self) {
        if let Some(notifier) = &self.notifier {
            notifier.committed();
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool [`EventStore::append`] writes through: as large as `pool` and to the same
    /// server, but with its statements planned once per connection ([`writer_options`]). The
    /// append is one statement that Postgres took 0.4-0.8 ms to plan afresh at every call and
    /// 0.1 ms to run (`pg_stat_statements`, `track_planning`). Lazy: a process that never
    /// appends never connects it.
    fn appenders(&self) -> &PgPool {
        self.appenders.get_or_init(|| {
            pool_options(self.pool.options().get_max_connections()).connect_lazy_with(writer_options(&self.pool))
        })
    }

    /// Appends the events of every stream in `appends` atomically: all of them or none.
    ///
    /// Streams are written in a canonical order (by stream id), so two transactions touching
    /// the same streams in opposite orders cannot deadlock. A stream not at its expected
    /// version fails the whole append with [`StoreError::Conflict`].
    ///
    /// One autocommitted statement ([`autocommit`]), after one read of the predecessors'
    /// hashes (skipped for every stream whose `known_prev_hash` is given): the transaction that
    /// used to wrap it cost a `BEGIN` and a `COMMIT` round trip besides.
    pub async fn append(&self, appends: Vec<StreamAppend>) -> Result<Vec<Appended>, StoreError> {
        let mut connection = self.appenders().acquire().await?;
        let events = autocommit::append_with_keys(&mut connection, appends, &[])
            .await
            .map_err(|error| match error {
                autocommit::AutocommitError::RolledBack(error) | autocommit::AutocommitError::Unknown(error) => error,
                autocommit::AutocommitError::KeysTaken(_) => unreachable!("no keys were given"),
            })?;
        self.committed();
        Ok(heads(events))
    }

    /// Reads the events of one stream with `version > after_version`, in version order.
    pub async fn read_stream(
        &self,
        stream_id: Uuid,
        after_version: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version > $2 ORDER BY version LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(stream_id)
            .bind(after_version)
            .bind(limit.clamp(1, READ_LIMIT_MAX))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(stored_event).collect::<Result<_, _>>()?)
    }

    /// Reads the events of many streams in one round trip: for each `(stream, after_version)`,
    /// up to `limit_each` events with `version > after_version`, in `(stream, version)` order.
    /// A stream that returns `limit_each` events may have more: page on with [`Self::read_stream`].
    pub async fn read_streams(&self, streams: &[(Uuid, i64)], limit_each: i64) -> Result<Vec<StoredEvent>, StoreError> {
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = streams.iter().map(|(id, _)| *id).collect();
        let after: Vec<i64> = streams.iter().map(|(_, v)| *v).collect();
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM UNNEST($1::uuid[], $2::bigint[]) AS s(sid, after_version) \
             CROSS JOIN LATERAL (SELECT * FROM events WHERE stream_id = s.sid AND version > s.after_version \
                                 ORDER BY version LIMIT $3) e \
             ORDER BY stream_id, version"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&ids)
            .bind(&after)
            .bind(limit_each.clamp(1, READ_LIMIT_MAX))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(stored_event).collect::<Result<_, _>>()?)
    }

    /// Reads up to `limit` events after `after`, in commit order, **gap-safely**.
    ///
    /// Only events written by transactions older than the oldest transaction still running
    /// (`pg_snapshot_xmin`) are returned. Any transaction that could still commit has a
    /// `tx_id` at or above that bound, and will therefore sort *after* everything returned
    /// here: a reader that resumes from the last returned checkpoint never skips an event.
    /// A long-running writer delays readers; it never makes them lose events.
    ///
    /// `ORDER BY` names the table's columns: the bare `tx_id` would be the selected
    /// `tx_id::text::bigint`, which no index covers (every page would sort the whole log).
    ///
    /// Planned afresh at every call (an unnamed statement), never from a connection's cached
    /// plan: a plan cached while the log was small is a sequential scan and a sort, and it
    /// stays cached as the log grows until the table is analyzed again. The relay, whose every
    /// batch waits on this read, once spent 29 ms (1,800 buffers) per call that way instead of
    /// 0.1 ms. Planning costs a fraction of a millisecond per batch.
    pub async fn read_all(&self, after: Checkpoint, limit: i64) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE (tx_id, position) > ($1::text::xid8, $2) \
               AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY events.tx_id, events.position LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .persistent(false)
            .bind(after.tx_id.to_string())
            .bind(after.position)
            .bind(limit.clamp(1, READ_LIMIT_MAX))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(stored_event).collect::<Result<_, _>>()?)
    }
}

/// Appends inside a caller's transaction (the command API stores idempotency records in the
/// same transaction). Returns where each stream now stands.
pub async fn append_in(
    tx: &mut Transaction<'_, Postgres>,
    appends: Vec<StreamAppend>,
) -> Result<Vec<Appended>, StoreError> {
    Ok(heads(append_events_in(tx, appends).await?))
}

/// Where each stream of `events` (sorted by stream and version) stands after them.
fn heads(events: Vec<AppendedEvent>) -> Vec<Appended> {
    let mut appended: Vec<Appended> = Vec::new();
    for event in events {
        match appended.iter_mut().find(|a| a.stream_id == event.stream_id) {
            Some(a) if a.version < event.version => {
                a.version = event.version;
                a.position = event.position;
                a.hash = event.hash;
            }
            Some(_) => {}
            None => appended.push(Appended {
                stream_id: event.stream_id,
                version: event.version,
                position: event.position,
                hash: event.hash,
            }),
        }
    }
    appended
}

/// Checks an append's shape and sorts its streams (the canonical order that keeps two writers
/// of the same streams from deadlocking); returns how many events it carries. `empty_ok`: no
/// events at all is allowed (an autocommitted statement may store only idempotency records).
fn checked_append(appends: &mut [StreamAppend], empty_ok: bool) -> Result<usize, StoreError> {
    let total: usize = appends.iter().map(|a| a.events.len()).sum();
    if (total == 0 && !empty_ok) || total > APPEND_EVENTS_MAX {
        return Err(StoreError::InvalidAppend(format!(
            "an append carries 1 to {APPEND_EVENTS_MAX} events, not {total}"
        )));
    }
    appends.sort_by_key(|a| a.stream_id);
    if appends.windows(2).any(|w| w[0].stream_id == w[1].stream_id) {
        return Err(StoreError::InvalidAppend("a stream appears twice in one append".into()));
    }
    if appends.iter().any(|a| a.expected_version < 0) {
        return Err(StoreError::InvalidAppend("expected version must be >= 0".into()));
    }
    Ok(total)
}

/// One statement for all events of all streams: one round trip however many there are
/// ([`Columns::bind`] gives its parameters `$1` to `$13`).
///
/// An append chained on a hash its caller gave is kept only if the log holds that hash at
/// that version (one primary-key probe per row, in the same statement): a caller's state ahead
/// of the log, or a wrong hash, never writes a broken chain. `LIMIT 1` keeps the probe a
/// per-row subplan, whatever the planner knows of the table.
pub(crate) const INSERT_EVENTS: &str = "INSERT INTO events (stream_type, stream_id, version, event_id, event_type, \
                         schema_version, payload, metadata, recorded_at, prev_hash, hash) \
     SELECT t.stream_type, t.stream_id, t.version, t.event_id, t.event_type, t.schema_version, \
            t.payload::json, t.metadata::json, $9, t.prev_hash, t.hash \
     FROM UNNEST($1::text[], $2::uuid[], $3::bigint[], $4::uuid[], $5::text[], $6::int[], \
                 $7::text[], $8::text[], $10::bytea[], $11::bytea[], $12::bigint[], $13::bytea[]) \
          AS t(stream_type, stream_id, version, event_id, event_type, schema_version, \
               payload, metadata, prev_hash, hash, check_version, check_hash) \
     WHERE t.check_hash IS NULL \
        OR (SELECT p.hash FROM events p \
            WHERE p.stream_id = t.stream_id AND p.version = t.check_version LIMIT 1) = t.check_hash \
     RETURNING stream_id, version, position";

/// Like [`append_in`], but returns the version and position of every event, for a caller
/// that packed several commands into one append (group commit) and answers each of them.
pub async fn append_events_in(
    tx: &mut Transaction<'_, Postgres>,
    mut appends: Vec<StreamAppend>,
) -> Result<Vec<AppendedEvent>, StoreError> {
    let total = checked_append(&mut appends, false)?;
    let previous = previous_hashes(tx, &appends, true).await?;
    let cols = Columns::of(&appends, previous, total);

    let rows = cols
        .bind(sqlx::query(INSERT_EVENTS))
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| conflict_or_database(e, &appends))?;
    if rows.len() < total {
        // Some given predecessor is not in the log (the caller's state is from the future, or
        // its hash is wrong): those rows were skipped, the others inserted; the caller rolls
        // the transaction back on this error, as on any conflict.
        let inserted: std::collections::HashSet<Uuid> = rows
            .iter()
            .map(|row| row.try_get("stream_id"))
            .collect::<Result<_, _>>()?;
        let lost = appends
            .iter()
            .find(|a| !inserted.contains(&a.stream_id))
            .unwrap_or(&appends[0]);
        return Err(StoreError::Conflict {
            stream_id: lost.stream_id,
            expected: lost.expected_version,
        });
    }

    Ok(cols.landed(&rows)?)
}

/// For each append (sorted by stream), the hash of the event at its `expected_version`: the
/// caller's `known_prev_hash`, else read, in one round trip for all of them. Finding that event
/// proves the stream is exactly there *or behind*; being behind is caught by the primary key
/// when inserting. A stream that is not even at `expected_version` is a conflict too (the
/// caller's state is from the future).
///
/// `in_transaction`: the read runs in the appending transaction, which may hold an xid already,
/// so the predecessor's transaction is checked to be the older one (below). Read before the
/// appending statement starts (autocommit, [`autocommit`]), it is older by construction: it
/// committed before the read, and the appending statement takes its xid after. Asking for the
/// current xid there would give the read an xid of its own, and its commit a WAL flush.
pub(crate) async fn previous_hashes(
    connection: &mut PgConnection,
    appends: &[StreamAppend],
    in_transaction: bool,
) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
    let (ids, versions): (Vec<Uuid>, Vec<i64>) = appends
        .iter()
        .filter(|a| a.expected_version > 0 && a.known_prev_hash.is_none())
        .map(|a| (a.stream_id, a.expected_version))
        .unzip();
    // `ordered`: the predecessor's transaction is older than ours. If it is not (we took our
    // xid before it appended, then read on top of it), the commit-order feed would return our
    // event before its predecessor; refuse, and the caller's retry runs in a newer transaction.
    let found: Vec<(Uuid, Vec<u8>, bool)> = if ids.is_empty() {
        Vec::new()
    } else {
        // One primary-key probe per stream, whatever the planner thinks of the table: as a
        // plain join planned on an empty log (a new database), this was a hash join over a
        // sequential scan, and each connection kept that plan as the log grew (seen in the
        // projection-lag benchmark's statement statistics). `LIMIT 1` keeps the subquery from
        // being folded into a join.
        let sql = if in_transaction {
            "SELECT p.sid, e.hash, e.tx_id < pg_current_xact_id() AS ordered \
             FROM UNNEST($1::uuid[], $2::bigint[]) AS p(sid, version) \
             CROSS JOIN LATERAL (SELECT hash, tx_id FROM events \
                                 WHERE stream_id = p.sid AND version = p.version LIMIT 1) e"
        } else {
            "SELECT p.sid, e.hash, true AS ordered \
             FROM UNNEST($1::uuid[], $2::bigint[]) AS p(sid, version) \
             CROSS JOIN LATERAL (SELECT hash FROM events \
                                 WHERE stream_id = p.sid AND version = p.version LIMIT 1) e"
        };
        sqlx::query_as(sql)
            .bind(&ids)
            .bind(&versions)
            .fetch_all(connection)
            .await?
    };
    appends
        .iter()
        .map(|append| {
            if append.expected_version == 0 {
                return Ok(None);
            }
            if let Some(known) = append.known_prev_hash {
                return Ok(Some(known.to_vec()));
            }
            match found.iter().find(|(id, _, _)| *id == append.stream_id) {
                Some((_, hash, true)) => Ok(Some(hash.clone())),
                _ => Err(StoreError::Conflict {
                    stream_id: append.stream_id,
                    expected: append.expected_version,
                }),
            }
        })
        .collect()
}

/// Translates a unique violation on `(stream_id, version)` into a typed conflict.
fn conflict_or_database(error: sqlx::Error, appends: &[StreamAppend]) -> StoreError {
    if let sqlx::Error::Database(db) = &error
        && db.code().as_deref() == Some("23505")
        && db.constraint() == Some("events_pkey")
    {
        // The detail names the key that already exists: `Key (stream_id, version)=(<uuid>, 7)
        // already exists.` Report that stream, so a caller holding several can reload just it.
        let detail = db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| pg.detail());
        let lost = detail
            .and_then(conflicting_stream)
            .and_then(|id| appends.iter().find(|a| a.stream_id == id))
            .unwrap_or(&appends[0]);
        return StoreError::Conflict {
            stream_id: lost.stream_id,
            expected: lost.expected_version,
        };
    }
    StoreError::Database(error)
}

/// The stream id in a unique-violation detail of `events_pkey`.
fn conflicting_stream(detail: &str) -> Option<Uuid> {
    let start = detail.find(")=(")? + 3;
    let end = start + detail[start..].find(',')?;
    Uuid::try_parse(detail[start..end].trim()).ok()
}

/// Column arrays for the UNNEST insert.
#[derive(Default)]
pub(crate) struct Columns {
    stream_type: Vec<String>,
    stream_id: Vec<Uuid>,
    version: Vec<i64>,
    event_id: Vec<Uuid>,
    event_type: Vec<String>,
    schema_version: Vec<i32>,
    payload: Vec<String>,
    metadata: Vec<String>,
    prev_hash: Vec<Option<Vec<u8>>>,
    hash: Vec<Vec<u8>>,
    /// For every row of an append whose predecessor's hash came from the caller
    /// (`known_prev_hash`): that version and hash, which the insert checks against the log.
    check_version: Vec<Option<i64>>,
    check_hash: Vec<Option<Vec<u8>>>,
    recorded_at: DateTime<Utc>,
}

impl Columns {
    /// The rows of `appends` (sorted by stream), each hashed on its predecessor: `previous`
    /// holds, per append, the hash its first event chains on.
    pub(crate) fn of(appends: &[StreamAppend], previous: Vec<Option<Vec<u8>>>, total: usize) -> Self {
        // Postgres keeps microseconds; truncate first so the hashed text equals what is read back.
        let recorded_at = Utc::now().trunc_subsecs(6);
        let mut cols = Columns::with_capacity(total);
        cols.recorded_at = recorded_at;
        for (append, mut prev_hash) in appends.iter().zip(previous) {
            for (i, event) in append.events.iter().enumerate() {
                let version = append.expected_version + 1 + i as i64;
                let hash = event_hash(&hash::HashInput {
                    prev_hash: prev_hash.as_deref(),
                    stream_type: &append.stream_type,
                    stream_id: append.stream_id,
                    version,
                    event_id: event.event_id,
                    event_type: &event.event_type,
                    schema_version: event.schema_version,
                    recorded_at,
                    payload: &event.payload,
                    metadata: &event.metadata,
                });
                cols.push(append, event, version, prev_hash.take(), hash);
                prev_hash = Some(hash.to_vec());
            }
        }
        cols
    }

    /// Binds `$1` to `$13` of [`INSERT_EVENTS`].
    pub(crate) fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.stream_type)
            .bind(&self.stream_id)
            .bind(&self.version)
            .bind(&self.event_id)
            .bind(&self.event_type)
            .bind(&self.schema_version)
            .bind(&self.payload)
            .bind(&self.metadata)
            .bind(self.recorded_at)
            .bind(&self.prev_hash)
            .bind(&self.hash)
            .bind(&self.check_version)
            .bind(&self.check_hash)
    }

    /// Where each inserted row landed, from the `stream_id, version, position` rows the insert
    /// returned, sorted by stream and version.
    pub(crate) fn landed(&self, rows: &[sqlx::postgres::PgRow]) -> Result<Vec<AppendedEvent>, sqlx::Error> {
        let hashes: HashMap<(Uuid, i64), Hash> = self
            .stream_id
            .iter()
            .zip(&self.version)
            .zip(&self.hash)
            .map(|((stream, version), hash)| ((*stream, *version), hash.as_slice().try_into().expect("32 bytes")))
            .collect();
        let mut appended = rows
            .iter()
            .map(|row| {
                let stream_id: Uuid = row.try_get("stream_id")?;
                let version: i64 = row.try_get("version")?;
                Ok(AppendedEvent {
                    stream_id,
                    version,
                    position: row.try_get("position")?,
                    hash: hashes[&(stream_id, version)],
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        appended.sort_by_key(|e| (e.stream_id, e.version));
        Ok(appended)
    }

    fn with_capacity(n: usize) -> Self {
        Self {
            stream_type: Vec::with_capacity(n),
            stream_id: Vec::with_capacity(n),
            version: Vec::with_capacity(n),
            event_id: Vec::with_capacity(n),
            event_type: Vec::with_capacity(n),
            schema_version: Vec::with_capacity(n),
            payload: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            prev_hash: Vec::with_capacity(n),
            hash: Vec::with_capacity(n),
            check_version: Vec::with_capacity(n),
            check_hash: Vec::with_capacity(n),
            recorded_at: DateTime::<Utc>::MIN_UTC,
        }
    }

    fn push(&mut self, append: &StreamAppend, event: &NewEvent, version: i64, prev_hash: Option<Vec<u8>>, hash: Hash) {
        self.stream_type.push(append.stream_type.clone());
        self.stream_id.push(append.stream_id);
        self.version.push(version);
        self.event_id.push(event.event_id);
        self.event_type.push(event.event_type.clone());
        self.schema_version.push(event.schema_version);
        self.payload.push(event.payload.clone());
        self.metadata.push(event.metadata.clone());
        self.prev_hash.push(prev_hash);
        self.hash.push(hash.to_vec());
        let given = append.known_prev_hash.filter(|_| append.expected_version > 0);
        self.check_version.push(given.map(|_| append.expected_version));
        self.check_hash.push(given.map(|h| h.to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_key_violation_names_the_stream_that_lost() {
        let id = Uuid::now_v7();
        let detail = format!("Key (stream_id, version)=({id}, 7) already exists.");
        assert_eq!(conflicting_stream(&detail), Some(id));
        assert_eq!(conflicting_stream("Key (stream_id)=(nope) already exists."), None);
        assert_eq!(conflicting_stream("something else"), None);
    }

    #[test]
    fn a_server_going_away_is_unavailable_and_a_bad_statement_is_not() {
        for code in ["08006", "08003", "57P01", "57P02", "57P03", "57P05", "53300", "25006"] {
            assert!(is_unavailable_code(code), "{code}");
        }
        // Unique violation, check violation, syntax error, deadlock (retried, not a 503).
        for code in ["23505", "23514", "42601", "40P01", "57014"] {
            assert!(!is_unavailable_code(code), "{code}");
        }
    }

    #[test]
    fn a_router_with_no_server_behind_it_is_unavailable_and_a_missing_row_is_not() {
        // What sqlx reports when HAProxy accepts the connection during a failover and closes it.
        let router = StoreError::Database(sqlx::Error::Protocol(
            "unexpected response from SSLRequest: 0x00".into(),
        ));
        assert!(router.is_unavailable());
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_unavailable());
        assert!(!StoreError::InvalidAppend("no events".into()).is_unavailable());
    }
}
