//! Rebuild: a new generation of a projection, filled straight from the Postgres log, swapped in
//! for readers atomically while writes go on.
//!
//! 1. Under an advisory lock (one rebuild of a projection at a time), create generation N+1's
//!    tables from the code's current DDL.
//! 2. Read the log in commit order, gap-safely, in chunks, folding each chunk into N+1 with the
//!    same [`model::apply_batch`] the live path uses. Nothing else writes or reads N+1 yet, so
//!    rows stay in memory between chunks and derived rows go in with binary `COPY`
//!    ([`WriteMode::Fresh`]); the next chunks are read on another connection while one is
//!    written ([`READ_AHEAD_CHUNKS`]).
//! 3. When a chunk comes back short (near the head), `ANALYZE` the tables: until autovacuum
//!    gets to them, the planner would plan the workers' statements for empty tables.
//! 4. Lock the projection's control row: live batches finish and then wait. Read the rest of
//!    the log in that transaction, point the views at N+1, record it as live with this code's
//!    shape, drop N, commit.
//!
//! Why nothing is lost: every event a live worker applied to N was published by the relay, which
//! only publishes events below the log's gap-safe horizon, and that horizon only moves forward,
//! so the final read covers them. Events after it reach the workers through NATS as usual and
//! are applied to N+1 (or dropped by version when N+1 has them). Readers see N until the commit
//! and N+1 after, never a half-built model.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgPool};
use tally_event_store::partition::partition_of;
use tally_event_store::verify::Progress;
use tally_event_store::{Checkpoint, EventStore, StoreError, StoredEvent};
use tokio::sync::mpsc;

use crate::accounts::Accounts;
use crate::catalog;
use crate::model::{self, Generation, Incoming, Projection, RowCache, WriteMode};
use crate::transfers::Transfers;

/// Events read from the log per chunk.
pub const CHUNK_EVENTS: i64 = 10_000;
/// Chunks read ahead of the one being written (memory: this many chunks of events).
pub const READ_AHEAD_CHUNKS: usize = 2;
/// Rows kept in memory between chunks before the cache is dropped (they are in the table and
/// are loaded again when needed).
const ROW_CACHE_MAX: usize = 500_000;

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildReport {
    pub projection: &'static str,
    pub generation: i32,
    pub replaced: Option<i32>,
    /// Events read from the log (all stream types).
    pub events: u64,
    /// Events applied to the new generation.
    pub applied: u64,
    pub elapsed: Duration,
}

impl RebuildReport {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("no projection or read model is called {0:?} (projections: {1})")]
    Unknown(String, String),
    #[error("a rebuild of {0} is already running")]
    AlreadyRunning(&'static str),
    #[error(transparent)]
    Apply(#[from] model::ApplyError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Rebuilds the projection owning `name` (a projection or one of its read models).
/// `partitions` must be the deployment's partition count (it keys per-partition rows such as
/// `ledger_totals`). `progress` is called after every chunk.
pub async fn rebuild(
    pool: &PgPool,
    name: &str,
    partitions: u32,
    progress: impl FnMut(Progress),
) -> Result<RebuildReport, RebuildError> {
    match catalog::resolve(name) {
        Some(Accounts::NAME) => rebuild_projection::<Accounts>(pool, partitions, progress).await,
        Some(Transfers::NAME) => rebuild_projection::<Transfers>(pool, partitions, progress).await,
        _ => Err(RebuildError::Unknown(name.to_owned(), catalog::PROJECTIONS.join(", "))),
    }
}

/// Advisory lock key of a projection's rebuild.
fn lock_key(projection: &str) -> i64 {
    projection.bytes().fold(0x7461_6c6c_7962_6c64_i64, |h, b| {
        h.wrapping_mul(31).wrapping_add(i64::from(b))
    })
}

pub async fn rebuild_projection<P: Projection>(
    pool: &PgPool,
    partitions: u32,
    mut progress: impl FnMut(Progress),
) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    catalog::ensure::<P>(pool, partitions).await?;
    // Session-level: held until this connection closes, whatever happens.
    let mut lock = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(lock_key(P::NAME))
        .fetch_one(&mut lock)
        .await?;
    if !locked {
        return Err(RebuildError::AlreadyRunning(P::NAME));
    }
    let result = run::<P>(pool, partitions, &mut progress, started).await;
    let _ = lock.close().await;
    result
}

async fn run<P: Projection>(
    pool: &PgPool,
    partitions: u32,
    progress: &mut impl FnMut(Progress),
    started: Instant,
) -> Result<RebuildReport, RebuildError> {
    let store = EventStore::new(pool.clone());
    let target = prepare::<P>(pool).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    tracing::info!(
        projection = P::NAME,
        generation = target.number,
        events = total,
        "rebuilding from the log"
    );
    let mut cursor: Cursor<'_, P> = Cursor {
        store: &store,
        target: &target,
        partitions,
        after: Checkpoint::default(),
        cache: RowCache::<P>::new(),
        progress: Progress {
            done: 0,
            total: total as u64,
        },
        applied: 0,
    };
    // Bulk phase: chunks in their own transactions, nobody else writes `target`; the reader
    // runs ahead until a chunk comes back short (near the head of the log).
    let (sender, mut chunks) = mpsc::channel(READ_AHEAD_CHUNKS);
    let reader = AbortOnDrop(tokio::spawn(read_ahead(store.clone(), cursor.after, sender)));
    while let Some(chunk) = chunks.recv().await {
        let mut tx = pool.begin().await?;
        // No flush per chunk: a crash loses the generation anyway (the next rebuild drops
        // what this one left), and the switch's own, synchronous commit flushes the WAL of
        // every chunk before it.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        let chunk = chunk.map_err(model::ApplyError::from)?;
        cursor.apply(&mut tx, chunk, WriteMode::Fresh, progress).await?;
        tx.commit().await?;
        if cursor.cache.len() > ROW_CACHE_MAX {
            cursor.cache.clear();
        }
    }
    drop(reader);
    // Statistics, so the workers' first plans on the new tables are not made for empty ones.
    let mut conn = pool.acquire().await?;
    catalog::analyze_tables::<P>(&mut conn, &target).await?;
    drop(conn);
    // Switch: live batches wait on the control row while the last events are folded in.
    let mut tx = pool.begin().await?;
    let replaced: Option<i32> = sqlx::query_scalar("SELECT generation FROM projections WHERE name = $1 FOR UPDATE")
        .bind(P::NAME)
        .fetch_one(&mut *tx)
        .await?;
    while cursor.step(&mut tx, progress).await? > 0 {}
    catalog::point_views::<P>(&mut tx, &target).await?;
    sqlx::query(
        "UPDATE projections SET generation = $2, shape = $3, building = NULL, updated_at = now() WHERE name = $1",
    )
    .bind(P::NAME)
    .bind(target.number)
    .bind(P::SHAPE)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE projection_partitions SET state = 'running', last_error = NULL, updated_at = now() \
         WHERE projection = $1 AND state = 'needs-rebuild'",
    )
    .bind(P::NAME)
    .execute(&mut *tx)
    .await?;
    if let Some(old) = replaced.filter(|g| *g != target.number) {
        catalog::drop_tables::<P>(&mut tx, &Generation { number: old }).await?;
    }
    tx.commit().await?;
    let report = RebuildReport {
        projection: P::NAME,
        generation: target.number,
        replaced,
        events: cursor.progress.done,
        applied: cursor.applied,
        elapsed: started.elapsed(),
    };
    tracing::info!(
        projection = P::NAME,
        generation = target.number,
        events = report.events,
        rate = format!("{:.0}/s", report.events_per_second()),
        "rebuilt and switched"
    );
    Ok(report)
}

/// Creates the tables of the next generation (dropping those of a rebuild that died midway).
async fn prepare<P: Projection>(pool: &PgPool) -> Result<Generation, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (live, building): (Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT generation, building FROM projections WHERE name = $1 FOR UPDATE")
            .bind(P::NAME)
            .fetch_one(&mut *tx)
            .await?;
    if let Some(abandoned) = building {
        catalog::drop_tables::<P>(&mut tx, &Generation { number: abandoned }).await?;
    }
    let target = Generation {
        number: live.unwrap_or(0).max(building.unwrap_or(0)) + 1,
    };
    catalog::create_tables::<P>(&mut tx, &target).await?;
    sqlx::query("UPDATE projections SET building = $2, updated_at = now() WHERE name = $1")
        .bind(P::NAME)
        .bind(target.number)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(target)
}

/// Where a rebuild stands in the log.
struct Cursor<'a, P: Projection> {
    store: &'a EventStore,
    target: &'a Generation,
    partitions: u32,
    after: Checkpoint,
    cache: RowCache<P>,
    progress: Progress,
    applied: u64,
}

impl<P: Projection> Cursor<'_, P> {
    /// Reads the next chunk of the log and folds it into the target inside `conn`'s
    /// transaction, as live writes; returns how many events it read (0 at the gap-safe end of
    /// the log).
    async fn step(
        &mut self,
        conn: &mut sqlx::PgConnection,
        progress: &mut impl FnMut(Progress),
    ) -> Result<usize, model::ApplyError> {
        let chunk = self.store.read_all(self.after, CHUNK_EVENTS).await?;
        self.apply(conn, chunk, WriteMode::Live, progress).await
    }

    /// Folds `chunk`, the events after `self.after`, into the target inside `conn`'s
    /// transaction; returns how many events it held.
    async fn apply(
        &mut self,
        conn: &mut sqlx::PgConnection,
        chunk: Vec<StoredEvent>,
        mode: WriteMode,
        progress: &mut impl FnMut(Progress),
    ) -> Result<usize, model::ApplyError> {
        let Some(last) = chunk.last() else { return Ok(0) };
        self.after = last.checkpoint();
        let read = chunk.len();
        let incoming: Vec<Incoming> = chunk
            .into_iter()
            .filter(|e| e.stream_type == P::STREAM_TYPE)
            .map(|e| {
                let partition = partition_of(e.stream_id, self.partitions) as i32;
                Incoming::from_owned(e, partition)
            })
            .collect();
        let outcome = model::apply_batch::<P>(conn, self.store, self.target, &mut self.cache, &incoming, mode).await?;
        self.applied += outcome.applied;
        self.progress.done += read as u64;
        progress(self.progress);
        Ok(read)
    }
}

/// Reads the log from `after` in chunks into `chunks` until a chunk comes back short (the
/// gap-safe head is near), the first error, or the receiver is gone.
async fn read_ahead(
    store: EventStore,
    mut after: Checkpoint,
    chunks: mpsc::Sender<Result<Vec<StoredEvent>, StoreError>>,
) {
    loop {
        let chunk = store.read_all(after, CHUNK_EVENTS).await;
        let next = match &chunk {
            Ok(events) if events.len() as i64 >= CHUNK_EVENTS => events.last().map(StoredEvent::checkpoint),
            _ => None,
        };
        if chunks.send(chunk).await.is_err() {
            return;
        }
        match next {
            Some(checkpoint) => after = checkpoint,
            None => return,
        }
    }
}

/// A spawned task that is stopped when its handle is dropped (a rebuild that fails midway
/// leaves no reader behind).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
