//! What a projection is, and the one routine that applies events to it (live and rebuild alike).
//!
//! A projection folds the events of one stream type into rows that remember the stream
//! version they reflect. [`apply_batch`] drops what a row already reflects (a duplicate),
//! fills a version jump from the log of record, decodes, folds and stores, all inside the
//! caller's transaction.

use std::collections::{HashMap, HashSet};
use std::future::Future;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tally_event_store::{EventStore, StoredEvent};
use uuid::Uuid;

/// One table of a projection. Its rows live in `<name>_g<generation>`; readers use a view
/// named `name` over the live generation (when `view` is set; else the table is internal).
#[derive(Debug, Clone, Copy)]
pub struct TableDef {
    pub name: &'static str,
    /// Statements creating the table and its indexes; `{table}` stands for the generation's
    /// table name.
    pub ddl: &'static [&'static str],
    /// The `SELECT` of the readers' view, over `{table}`.
    pub view: Option<&'static str>,
    /// Secondary indexes as `(name, definition)`, named `{table}_{name}`; the definition is
    /// what follows `ON {table}` (`(owner, account_id)`, `USING gin (...)`). Made with each new
    /// generation, and added to a live generation made before them (`catalog::ensure`, run by
    /// `tally migrate`), so an index added to the code needs no rebuild.
    pub indexes: &'static [(&'static str, &'static str)],
    /// Columns added to the table after its shape was first released, as `(name, definition)`;
    /// `ddl` has them too. A live generation made before them gets them from `catalog::ensure`
    /// (`tally migrate`), and its view is made again to show them, so an added column needs no
    /// rebuild. Only for columns whose default is what the older code's rows mean (e.g. an
    /// account opened before external ids had none), and that the older code need not write.
    pub columns_added: &'static [(&'static str, &'static str)],
}

/// The tables of one generation of a projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub number: i32,
}

impl Generation {
    /// The name of `table`'s rows in this generation, e.g. `account_balances_g3`.
    pub fn table(&self, table: &str) -> String {
        format!("{table}_g{}", self.number)
    }
}

/// Where an event sits: its stream, version, place in the log and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    pub stream_id: Uuid,
    pub version: i64,
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
    /// The partition whose rows (e.g. `ledger_totals`) this event's effects go to.
    pub partition: i32,
}

/// An event to apply, not yet decoded: from a NATS envelope or read from the log.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub meta: EventMeta,
    pub stream_type: String,
    pub event_type: String,
    pub schema_version: u32,
    pub payload: String,
}

impl Incoming {
    pub fn from_stored(event: &StoredEvent, partition: i32) -> Self {
        Self::from_owned(event.clone(), partition)
    }

    /// [`Incoming::from_stored`] without copying the strings (a rebuild reads a million).
    pub fn from_owned(event: StoredEvent, partition: i32) -> Self {
        Self {
            meta: EventMeta {
                stream_id: event.stream_id,
                version: event.version,
                position: event.position,
                recorded_at: event.recorded_at,
                partition,
            },
            stream_type: event.stream_type,
            event_type: event.event_type,
            schema_version: u32::try_from(event.schema_version).unwrap_or(0),
            payload: event.payload,
        }
    }
}

/// Why events could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The event's bytes cannot be read: a poison event until the code learns its shape.
    #[error("cannot decode {event_type} v{schema_version} at version {version} of stream {stream_id}: {reason}")]
    Undecodable {
        stream_id: Uuid,
        version: i64,
        event_type: String,
        schema_version: u32,
        reason: String,
    },
    /// A NATS message that is not an event envelope.
    #[error("message {sequence} is not an event envelope: {reason}")]
    BadEnvelope { sequence: u64, reason: String },
    #[error("the log has no version {version} of stream {stream_id} to fill a gap")]
    MissingInLog { stream_id: Uuid, version: i64 },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event store: {0}")]
    Store(#[from] tally_event_store::StoreError),
}

impl ApplyError {
    /// A failure of infrastructure (connection lost, pool exhausted, serialization), worth
    /// retrying for as long as it lasts; anything else is the data's fault and, retried a
    /// bounded number of times, makes the event a poison event.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Database(e) => transient_sqlx(e),
            ApplyError::Store(e) => e.is_transient() || e.is_unavailable(),
            ApplyError::Undecodable { .. } | ApplyError::BadEnvelope { .. } | ApplyError::MissingInLog { .. } => false,
        }
    }
}

/// Retried for as long as it lasts, never blamed on the event: a conflict, a database away,
/// and any other operator intervention (class 57P, e.g. the database dropped under us), which
/// would otherwise dead-letter good events.
fn transient_sqlx(error: &sqlx::Error) -> bool {
    tally_event_store::is_transient_error(error)
        || tally_event_store::is_unavailable_error(error)
        || matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|code| code.starts_with("57P")))
}

/// A read model built by folding the events of one stream type.
pub trait Projection: Send + Sync + 'static {
    /// Name in the control tables, consumer names and the CLI.
    const NAME: &'static str;
    /// The shape of the tables this code writes. Bump it with any change to `TABLES` or to what
    /// `apply` computes; the live generation then needs a rebuild (`tally projections rebuild`).
    const SHAPE: i32;
    /// The stream type whose events this projection folds; others are acknowledged unread.
    const STREAM_TYPE: &'static str;
    const TABLES: &'static [TableDef];

    type Event: Send + Sync;
    /// The folded state of one stream, as kept in its row.
    type Row: Clone + Send + Sync;
    /// What a batch produces besides rows (e.g. statement lines, totals deltas).
    type Effects: Default + Send;

    fn decode(event_type: &str, schema_version: u32, payload: &str) -> Result<Self::Event, String>;
    fn empty(stream_id: Uuid) -> Self::Row;
    /// The stream version `row` reflects (0: none yet).
    fn version(row: &Self::Row) -> i64;
    /// Folds the event at `meta.version == version(row) + 1` into `row` (which must then
    /// reflect `meta.version`) and records its other effects.
    fn apply(row: &mut Self::Row, event: &Self::Event, meta: &EventMeta, effects: &mut Self::Effects);

    /// Loads and locks the rows of `ids` that exist.
    fn load(
        conn: &mut PgConnection,
        generation: &Generation,
        ids: &[Uuid],
    ) -> impl Future<Output = Result<Vec<Self::Row>, sqlx::Error>> + Send;
    /// Writes changed rows (never moving one to a lower version) and the batch's effects, as
    /// `mode` allows.
    fn store(
        conn: &mut PgConnection,
        generation: &Generation,
        rows: Vec<Self::Row>,
        effects: Self::Effects,
        mode: WriteMode,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    fn stream_id_of(row: &Self::Row) -> Uuid;
}

/// Who else may touch the generation a batch is written to, and so how its rows may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// The live generation (workers, readers, a rebuild's switch): every write is an upsert
    /// that never moves a row backwards, and a derived row (a statement line) is written once
    /// whoever wrote it first (`ON CONFLICT DO NOTHING`).
    Live,
    /// A generation no one else writes or reads yet (a rebuild's bulk phase), written by one
    /// caller whose [`RowCache`] knows every row's version: derived rows carry versions above
    /// their stream row's and so cannot exist yet, and go in with binary `COPY`
    /// ([`crate::copy`]), several times faster than multi-row `INSERT`s.
    Fresh,
}

/// What a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub applied: u64,
    pub duplicates: u64,
    /// Events taken from the log to fill version gaps.
    pub filled: u64,
    /// Events of other stream types, acknowledged without reading.
    pub ignored: u64,
    /// Every row an event of the batch was for: `(stream id, version it now reflects)`, what
    /// the live path publishes as cache invalidations once the batch has committed. A row whose
    /// events were all duplicates is here too, at the version it already had: see
    /// [`apply_batch`] for why.
    pub announce: Vec<(Uuid, i64)>,
}

/// Rows already loaded, kept across batches by a caller that is the only writer of the
/// generation (a rebuild); the live path starts each batch with an empty one.
pub type RowCache<P> = HashMap<Uuid, <P as Projection>::Row>;

/// Applies `events` (in delivery order) to generation `generation` inside `conn`'s
/// transaction. Rows not in `cache` are loaded (and locked) first. `mode` says who else may
/// write the generation (see [`WriteMode`]).
pub async fn apply_batch<P: Projection>(
    conn: &mut PgConnection,
    store: &EventStore,
    generation: &Generation,
    cache: &mut RowCache<P>,
    events: &[Incoming],
    mode: WriteMode,
) -> Result<BatchOutcome, ApplyError> {
    let mut outcome = BatchOutcome::default();
    let missing: Vec<Uuid> = events
        .iter()
        .filter(|e| e.stream_type == P::STREAM_TYPE && !cache.contains_key(&e.meta.stream_id))
        .map(|e| e.meta.stream_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if !missing.is_empty() {
        for row in P::load(conn, generation, &missing).await? {
            cache.insert(P::stream_id_of(&row), row);
        }
    }
    let mut effects = P::Effects::default();
    let mut changed = HashSet::new();
    let mut seen = HashSet::new();
    for incoming in events {
        if incoming.stream_type != P::STREAM_TYPE {
            outcome.ignored += 1;
            continue;
        }
        let meta = &incoming.meta;
        seen.insert(meta.stream_id);
        let row = cache.entry(meta.stream_id).or_insert_with(|| P::empty(meta.stream_id));
        let current = P::version(row);
        if meta.version <= current {
            outcome.duplicates += 1;
            continue;
        }
        if meta.version > current + 1 {
            // Something before this event never reached us (e.g. it aged out of JetStream
            // before this consumer existed): take it from the log of record.
            let gap = store
                .read_stream(meta.stream_id, current, meta.version - current - 1)
                .await?;
            for stored in &gap {
                let fill = Incoming::from_stored(stored, meta.partition);
                let event = decode::<P>(&fill)?;
                P::apply(row, &event, &fill.meta, &mut effects);
                outcome.filled += 1;
            }
            if P::version(row) != meta.version - 1 {
                return Err(ApplyError::MissingInLog {
                    stream_id: meta.stream_id,
                    version: P::version(row) + 1,
                });
            }
        }
        let event = decode::<P>(incoming)?;
        P::apply(row, &event, meta, &mut effects);
        debug_assert_eq!(
            P::version(row),
            meta.version,
            "{} must reflect the applied version",
            P::NAME
        );
        changed.insert(meta.stream_id);
        outcome.applied += 1;
    }
    let rows: Vec<P::Row> = changed.iter().filter_map(|id| cache.get(id).cloned()).collect();
    // Rows whose events were all duplicates are announced too, at the version they reflect.
    // Whoever applied those events may have announced nothing: a rebuild's switch folds the
    // events still in flight into the new generation itself, and the live worker then
    // receives them here as duplicates. A query API that cached the row from the old
    // generation would otherwise keep it until its TTL (ARCHITECTURE.md, query-api invariant).
    outcome.announce = seen
        .iter()
        .filter_map(|id| cache.get(id))
        .map(|row| (P::stream_id_of(row), P::version(row)))
        .collect();
    P::store(conn, generation, rows, effects, mode).await?;
    Ok(outcome)
}

fn decode<P: Projection>(incoming: &Incoming) -> Result<P::Event, ApplyError> {
    P::decode(&incoming.event_type, incoming.schema_version, &incoming.payload).map_err(|reason| {
        ApplyError::Undecodable {
            stream_id: incoming.meta.stream_id,
            version: incoming.meta.version,
            event_type: incoming.event_type.clone(),
            schema_version: incoming.schema_version,
            reason,
        }
    })
}
