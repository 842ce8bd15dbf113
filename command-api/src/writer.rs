//! The writer: group commit, per-stream serialization and the aggregate cache.
//!
//! Every command goes through one [`Writer`]. Its dispatcher task keeps a queue of commands and
//! runs up to `lanes` batches at once, each batch in **one transaction** (group commit):
//!
//! - A stream is in at most one running batch, and its commands are taken in arrival order, so
//!   commands to one stream are serialized in this process and a hot account sees no version
//!   conflicts from its own writers. Several commands for the same stream may share a batch:
//!   they are decided one after the other on the state the previous one left, and appended
//!   together as one multi-event append.
//! - The state and version of each stream are kept in memory between batches (a bounded cache),
//!   so a command does not replay the stream. A stream the cache does not hold is loaded from
//!   its latest snapshot plus the events after it; snapshots are written every
//!   `snapshot_every` events.
//! - A job is one command or a **linked chain** of them (a batch's `linked` items): a chain's
//!   commands are decided one after the other like any others, but when one is refused every
//!   one of them is, its events are taken back out of the batch, and the others answer
//!   `linked-item-failed`. A chain is never split across transactions.
//! - One command never fails its neighbours: a refused command simply adds no events (its
//!   refusal is stored under its idempotency key, so a retry gets the same answer), a version conflict (another process wrote the stream)
//!   reloads that stream and re-runs the batch, and an unexpected database error re-runs each
//!   command of the batch alone so only the command that causes it fails.
//!
//! The cache is only an optimisation: the store still checks every expected version, so a
//! stale entry (another command-api instance wrote the stream) costs one conflict and a reload,
//! never a wrong write.
//!
//! Observed through `tally_commands_total` and `tally_command_duration_seconds` (by `command`
//! and `outcome`), `tally_idempotent_replays_total`, `tally_command_conflict_retries_total`,
//! `tally_append_batch_commands` / `tally_append_batch_events` and `tally_writer_queue_commands`.
//! Each batch runs in a span `writer.batch`, a child of its first command's request span that
//! links the others' (`tally_event_store::trace`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use rand::Rng;
use sqlx::postgres::PgConnection;
use tally_domain::{Account, AccountError, Metadata};
use tally_event_store::idempotency::{IdempotencyKey, StoredResponse};
use tally_event_store::snapshot::{self, Snapshot};
use tally_event_store::{EventStore, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;
use uuid::Uuid;

mod commit;

use self::commit::{BatchError, commit};
use crate::command::Command;
use crate::execute::{
    CONFLICT_BACKOFF_BASE, CONFLICT_RETRIES_MAX, CommandError, Executed, Idempotency, Loaded, Outcome, State,
    StreamKind, Touched, load_many,
};

/// Tuning of the writer (flags or `TALLY_GROUP_COMMIT_*` variables on the binary).
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Most commands in one transaction. 1 turns group commit off (one transaction per
    /// command); streams are still serialized and cached.
    pub batch_max: usize,
    /// Batches (transactions) running at once.
    pub lanes: usize,
    /// How long a free lane waits for more commands before committing a small batch. Zero:
    /// commit at once; batches then form from whatever arrived while the lanes were busy.
    pub linger: Duration,
    /// Commands waiting beyond this are refused with 503 (back-pressure, not an unbounded queue).
    pub queue_max: usize,
    /// Streams kept in memory.
    pub cache_streams_max: u64,
    /// A snapshot is written when a stream has grown this many events past its last one.
    pub snapshot_every: i64,
}

/// Largest accepted `batch_max`: a batch's events must fit one append
/// ([`tally_event_store::APPEND_EVENTS_MAX`]) even when every command writes three events (an
/// immediate transfer or a post: two legs and the transfer's record).
pub const BATCH_MAX_LIMIT: usize = tally_event_store::APPEND_EVENTS_MAX / 3;
/// How far down the queue the dispatcher looks for commands whose streams are free.
const SCAN_MAX: usize = 4_096;

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            batch_max: 256,
            lanes: 4,
            linger: Duration::ZERO,
            queue_max: 10_000,
            cache_streams_max: 100_000,
            snapshot_every: 1_000,
        }
    }
}

/// Builds the response of an accepted command (stored under its idempotency key, and
/// returned) from where its streams stand after it. It may be called before Postgres numbers the
/// command's events: every `position` it writes must sit in an object beside the
/// `consistency_token` of the same stream and version, where the writer fills it in (for the
/// answer and for every replay alike).
pub type Respond = Box<dyn Fn(&Executed) -> StoredResponse + Send + Sync>;

/// One command handed to the writer, alone or as an item of a linked chain.
pub struct Submission {
    pub command: Command,
    pub metadata: Metadata,
    pub idempotency: Option<Idempotency>,
    pub respond: Respond,
    /// Where the command sits in its request (a batch item's index; 0 alone): the item a
    /// chain's `linked-item-failed` refusals name.
    pub index: usize,
}

/// One command of a job.
struct Item {
    command: Command,
    /// The streams `command` touches, each once.
    streams: Vec<(Uuid, StreamKind)>,
    /// The exact metadata JSON stored with its events.
    metadata: String,
    idempotency: Option<Idempotency>,
    respond: Respond,
    index: usize,
}

/// One command, or one linked chain of commands, waiting for or in a batch.
struct Job {
    /// In order; more than one: a linked chain, written whole or not at all.
    items: Vec<Item>,
    /// Every stream the items touch, each once.
    streams: Vec<(Uuid, StreamKind)>,
    /// One result per item, in order.
    reply: oneshot::Sender<Vec<Result<Outcome, CommandError>>>,
    /// Version conflicts this command has run into.
    conflicts: u32,
    /// Run in a batch of its own (after a batch failed for a reason not tied to one command).
    solo: bool,
    enqueued: Instant,
    /// The span the command was submitted in (its request's): the batch joins its trace.
    span: tracing::Span,
}

impl Job {
    fn touches(&self, stream: Uuid) -> bool {
        self.streams.iter().any(|(s, _)| *s == stream)
    }

    fn keys(&self) -> impl Iterator<Item = &IdempotencyKey> {
        self.items.iter().filter_map(|i| i.idempotency.as_ref().map(|i| &i.key))
    }

    fn answer(self, results: Vec<Result<Outcome, CommandError>>) {
        // The client may have gone away; the commands' effect stands either way.
        let _ = self.reply.send(results);
    }

    /// Answers every item with `error`.
    fn fail(self, error: &CommandError) {
        let results = vec![Err(error.clone()); self.items.len()];
        self.answer(results);
    }
}

/// The results of queued commands, to await. Their metrics are recorded when they arrive.
pub struct Ticket {
    names: Vec<&'static str>,
    started: Instant,
    state: TicketState,
}

enum TicketState {
    Queued(oneshot::Receiver<Vec<Result<Outcome, CommandError>>>),
    /// Answered without reaching the queue.
    Done(Vec<Result<Outcome, CommandError>>),
}

impl Ticket {
    fn done(names: Vec<&'static str>, started: Instant, results: Vec<Result<Outcome, CommandError>>) -> Self {
        Self {
            names,
            started,
            state: TicketState::Done(results),
        }
    }

    /// One result per submitted command, in order.
    pub async fn results(self) -> Vec<Result<Outcome, CommandError>> {
        let results = match self.state {
            TicketState::Done(results) => results,
            TicketState::Queued(answer) => answer.await.unwrap_or_else(|_| {
                let dropped = CommandError::Internal("the writer dropped the command".into());
                vec![Err(dropped); self.names.len()]
            }),
        };
        let elapsed = self.started.elapsed().as_secs_f64();
        for (name, result) in self.names.iter().zip(&results) {
            let outcome = outcome_label(result);
            metrics::counter!("tally_commands_total", "command" => *name, "outcome" => outcome).increment(1);
            metrics::histogram!("tally_command_duration_seconds", "command" => *name, "outcome" => outcome)
                .record(elapsed);
            if matches!(result, Ok(Outcome::Replayed(_))) {
                metrics::counter!("tally_idempotent_replays_total", "command" => *name).increment(1);
            }
        }
        results
    }
}

/// The handle handlers use to run commands. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the dispatcher. It ends once every `Writer` clone is dropped and the queued
    /// commands are done; await the returned handle to drain on shutdown.
    pub fn spawn(store: EventStore, mut config: WriterConfig) -> (Self, tokio::task::JoinHandle<()>) {
        config.batch_max = config.batch_max.clamp(1, BATCH_MAX_LIMIT);
        config.lanes = config.lanes.max(1);
        config.queue_max = config.queue_max.max(1);
        let (jobs, queue) = mpsc::channel(config.queue_max);
        let dispatcher = Dispatcher {
            cache: moka::sync::Cache::new(config.cache_streams_max),
            store,
            config,
            queue,
            pending: VecDeque::new(),
            busy_streams: HashSet::new(),
            busy_keys: HashSet::new(),
            lanes: JoinSet::new(),
            connections: Vec::new(),
            claims: HashMap::new(),
            closed: false,
        };
        (Self { jobs }, tokio::spawn(dispatcher.run()))
    }

    /// Runs `command`. `respond` builds the response stored under the idempotency key (and
    /// returned) from the command's result.
    pub async fn execute(
        &self,
        command: Command,
        metadata: &Metadata,
        idempotency: Option<Idempotency>,
        respond: impl Fn(&Executed) -> StoredResponse + Send + Sync + 'static,
    ) -> Result<Outcome, CommandError> {
        let submission = Submission {
            command,
            metadata: metadata.clone(),
            idempotency,
            respond: Box::new(respond),
            index: 0,
        };
        // A full queue refuses at once (503): back-pressure on single requests.
        let ticket = self.queue(vec![submission], false).await;
        ticket
            .results()
            .await
            .pop()
            .unwrap_or_else(|| Err(CommandError::Internal("the writer gave no result".into())))
    }

    /// Queues `chain`, one command or a linked chain (written whole or not at all), waiting for
    /// room in the queue if it is full: a batch's items are queued in order, so each stream
    /// sees them in the order the batch lists them.
    pub async fn enqueue(&self, chain: Vec<Submission>) -> Ticket {
        self.queue(chain, true).await
    }

    async fn queue(&self, chain: Vec<Submission>, wait: bool) -> Ticket {
        let started = Instant::now();
        let names: Vec<&'static str> = chain.iter().map(|s| s.command.name()).collect();
        let (items, clash) = items_of(chain);
        if let Some((failed, refusal)) = clash {
            // Never queued, so nothing is stored: a retry meets the same refusal.
            let results = refuse_chain(&items, failed, Some(refusal), |_| None)
                .into_iter()
                .map(|verdict| match verdict {
                    Some(Verdict::Rejected(refusal)) => Err(CommandError::Rejected(refusal)),
                    _ => unreachable!("every item of a refused chain is refused"),
                })
                .collect();
            return Ticket::done(names, started, results);
        }
        let mut streams: Vec<(Uuid, StreamKind)> = items.iter().flat_map(|i| i.streams.iter().copied()).collect();
        streams.sort_unstable_by_key(|(s, _)| *s);
        streams.dedup_by_key(|(s, _)| *s);
        let (reply, answer) = oneshot::channel();
        let job = Job {
            items,
            streams,
            reply,
            conflicts: 0,
            solo: false,
            enqueued: Instant::now(),
            span: tracing::Span::current(),
        };
        let sent = if wait {
            self.jobs
                .send(job)
                .await
                .map_err(|_| CommandError::Unavailable("the writer has stopped".into()))
        } else {
            self.jobs.try_send(job).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => CommandError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => CommandError::Unavailable("the writer has stopped".into()),
            })
        };
        match sent {
            Ok(()) => Ticket {
                names,
                started,
                state: TicketState::Queued(answer),
            },
            Err(error) => {
                let results = vec![Err(error); names.len()];
                Ticket::done(names, started, results)
            }
        }
    }
}

/// The items of a job, and the first that names a stream as another kind than the job already
/// does (a transfer id equal to one of its accounts', an account an earlier item of the chain
/// made a transfer): that item is refused, and so the chain, before anything is loaded.
fn items_of(chain: Vec<Submission>) -> (Vec<Item>, Option<(usize, AccountError)>) {
    let mut kinds: HashMap<Uuid, StreamKind> = HashMap::new();
    let mut clash = None;
    let mut items = Vec::with_capacity(chain.len());
    for (k, submission) in chain.into_iter().enumerate() {
        let mut streams = submission.command.streams();
        streams.sort_unstable_by_key(|(s, _)| *s);
        if clash.is_none() {
            // Within the command: the id it names as a transfer or an entry is taken.
            let own = streams
                .windows(2)
                .find(|w| w[0].0 == w[1].0 && w[0].1 != w[1].1)
                .map(|w| (w[0].0, if w[0].1 == StreamKind::Account { w[1].1 } else { w[0].1 }));
            let earlier = || {
                streams
                    .iter()
                    .find(|(s, kind)| kinds.get(s).is_some_and(|k| k != kind))
                    .copied()
            };
            clash = own
                .or_else(earlier)
                .map(|(stream, kind)| (k, kind_refusal(&submission.command, stream, kind)));
        }
        streams.dedup_by_key(|(s, _)| *s);
        for (stream, kind) in &streams {
            kinds.entry(*stream).or_insert(*kind);
        }
        items.push(Item {
            command: submission.command,
            streams,
            metadata: serde_json::to_string(&submission.metadata).expect("metadata always serializes"),
            idempotency: submission.idempotency,
            respond: submission.respond,
            index: submission.index,
        });
    }
    (items, clash)
}

/// The refusal of `command`, which names `stream` as a `kind` it is not.
fn kind_refusal(command: &Command, stream: Uuid, kind: StreamKind) -> AccountError {
    match (kind, command) {
        (StreamKind::Transfer, Command::Transfer(_)) => AccountError::TransferExists { transfer_id: stream },
        (StreamKind::Transfer, _) => AccountError::TransferNotFound,
        (StreamKind::Entry, Command::Entry(_)) => AccountError::EntryExists { entry_id: stream },
        (StreamKind::Entry, _) => AccountError::EntryNotFound,
        (StreamKind::Account | StreamKind::ExternalId, _) => AccountError::AccountNotFound { account_id: stream },
    }
}

/// The verdicts of a job whose item `failed` is refused with `refusal`: that item keeps it,
/// every other item not answered already (`answered`) is refused too, with
/// `linked-item-failed`, or with the same stale state (which a retry gets past).
fn refuse_chain(
    items: &[Item],
    failed: usize,
    refusal: Option<AccountError>,
    answered: impl Fn(usize) -> Option<Verdict>,
) -> Vec<Option<Verdict>> {
    let stale = refusal == Some(AccountError::StaleState);
    let linked = if stale {
        AccountError::StaleState
    } else {
        AccountError::LinkedItemFailed {
            failed: items[failed].index,
        }
    };
    (0..items.len())
        .map(|k| match answered(k) {
            Some(verdict @ (Verdict::Replayed(_) | Verdict::KeyReused)) => Some(verdict),
            _ if k == failed => refusal.clone().map(Verdict::Rejected),
            _ => Some(Verdict::Rejected(linked.clone())),
        })
        .collect()
}

/// The `outcome` label of a command's metrics.
fn outcome_label(result: &Result<Outcome, CommandError>) -> &'static str {
    match result {
        Ok(Outcome::Fresh(_)) => "accepted",
        Ok(Outcome::Replayed(_)) => "replayed",
        Err(CommandError::Rejected(_)) => "rejected",
        Err(CommandError::ConflictRetriesExhausted) => "conflict",
        Err(CommandError::IdempotencyKeyReused) => "key_reused",
        Err(CommandError::Overloaded) => "overloaded",
        Err(CommandError::Unavailable(_) | CommandError::DatabaseUnavailable(_)) => "unavailable",
        Err(CommandError::Internal(_)) => "error",
    }
}

/// What a lane hands back to the dispatcher.
struct Finished {
    /// Current state of streams the batch touched; streams missing here are reloaded next time.
    states: Vec<(Uuid, Loaded)>,
    /// Commands to run again (after a conflict or a split), in arrival order.
    retry: Vec<Job>,
}

struct Dispatcher {
    store: EventStore,
    config: WriterConfig,
    queue: mpsc::Receiver<Job>,
    pending: VecDeque<Job>,
    busy_streams: HashSet<Uuid>,
    busy_keys: HashSet<IdempotencyKey>,
    cache: moka::sync::Cache<Uuid, Loaded>,
    lanes: JoinSet<(Finished, Option<PgConnection>)>,
    /// The lanes' own connections while no batch runs on them, and since when ([`lane_connection`]).
    connections: Vec<(PgConnection, Instant)>,
    /// The streams and keys each running lane holds, to free them even if it panics.
    claims: HashMap<tokio::task::Id, (Vec<Uuid>, Vec<IdempotencyKey>)>,
    closed: bool,
}

impl Dispatcher {
    async fn run(mut self) {
        loop {
            self.dispatch();
            metrics::gauge!("tally_writer_queue_commands").set(self.pending.len() as f64);
            if self.closed && self.pending.is_empty() && self.lanes.is_empty() {
                return;
            }
            let linger = self.linger_until();
            tokio::select! {
                job = self.queue.recv(), if !self.closed && self.pending.len() < self.config.queue_max => match job {
                    Some(job) => {
                        self.pending.push_back(job);
                        while self.pending.len() < self.config.queue_max {
                            let Ok(job) = self.queue.try_recv() else { break };
                            self.pending.push_back(job);
                        }
                    }
                    None => self.closed = true,
                },
                Some(done) = self.lanes.join_next_with_id(), if !self.lanes.is_empty() => self.finish(done),
                () = sleep_until(linger), if linger.is_some() => {}
                else => {
                    // Unreachable by construction (a queued command always has a lane running
                    // or starting); fail loudly rather than hang the callers.
                    tracing::error!(pending = self.pending.len(), "writer stalled; failing queued commands");
                    let stalled = CommandError::Internal("the writer stalled".into());
                    for job in self.pending.drain(..) {
                        job.fail(&stalled);
                    }
                    return;
                }
            }
        }
    }

    /// While lanes are free and the queue holds a small batch younger than `linger`, wait for
    /// more: returns until when.
    fn linger_until(&self) -> Option<Instant> {
        if self.config.linger.is_zero() || self.lanes.len() >= self.config.lanes {
            return None;
        }
        let oldest = self.pending.front()?;
        let until = oldest.enqueued + self.config.linger;
        (self.pending.len() < self.config.batch_max && Instant::now() < until).then_some(until)
    }

    /// Starts batches while lanes are free and queued commands have free streams.
    fn dispatch(&mut self) {
        while self.lanes.len() < self.config.lanes && !self.pending.is_empty() && self.linger_until().is_none() {
            let batch = self.take_batch();
            if batch.is_empty() {
                return;
            }
            let mut streams: Vec<Uuid> = batch.iter().flat_map(|j| j.streams.iter().map(|(s, _)| *s)).collect();
            streams.sort_unstable();
            streams.dedup();
            let keys: Vec<IdempotencyKey> = batch.iter().flat_map(|j| j.keys().cloned()).collect();
            self.busy_streams.extend(&streams);
            self.busy_keys.extend(keys.iter().cloned());
            // The lane owns the cached state while it runs; it hands back the new one.
            let states = streams
                .iter()
                .filter_map(|s| self.cache.remove(s).map(|loaded| (*s, loaded)))
                .collect();
            let commands: usize = batch.iter().map(|j| j.items.len()).sum();
            let span = tracing::info_span!("writer.batch", commands);
            tally_event_store::trace::join_batch(
                &span,
                batch.iter().filter_map(|j| tally_event_store::trace::of_span(&j.span)),
            );
            let connection = self.connections.pop();
            let lane = run_lane(
                self.store.clone(),
                connection,
                batch,
                states,
                self.config.snapshot_every,
            )
            .instrument(span);
            let id = self.lanes.spawn(lane).id();
            self.claims.insert(id, (streams, keys));
        }
    }

    /// The next batch: queued jobs in arrival order whose streams and keys are free, up to
    /// `batch_max` commands (a longer chain runs alone). A job skipped because its stream is
    /// busy blocks the later jobs of that stream, so each stream's commands stay in order.
    fn take_batch(&mut self) -> Vec<Job> {
        let mut batch: Vec<Job> = Vec::new();
        let mut commands = 0;
        let mut blocked: HashSet<Uuid> = HashSet::new();
        let mut keys: HashSet<IdempotencyKey> = HashSet::new();
        // One kind per stream id in a batch: a client naming an account's id as a transfer
        // (or the reverse) must not make its neighbours' streams load as the wrong kind.
        let mut kinds: HashMap<Uuid, StreamKind> = HashMap::new();
        let mut i = 0;
        while i < self.pending.len().min(SCAN_MAX) && commands < self.config.batch_max {
            let job = &self.pending[i];
            let stream_free = job.streams.iter().all(|(s, kind)| {
                !self.busy_streams.contains(s) && !blocked.contains(s) && kinds.get(s).is_none_or(|k| k == kind)
            });
            let key_free = job.keys().all(|k| !self.busy_keys.contains(k) && !keys.contains(k));
            let fits = batch.is_empty() || (!job.solo && commands + job.items.len() <= self.config.batch_max);
            if stream_free && key_free && fits {
                let job = self.pending.remove(i).expect("index is in range");
                kinds.extend(job.streams.iter().copied());
                keys.extend(job.keys().cloned());
                commands += job.items.len();
                let solo = job.solo;
                batch.push(job);
                if solo {
                    break;
                }
            } else {
                blocked.extend(job.streams.iter().map(|(s, _)| *s));
                i += 1;
            }
        }
        batch
    }

    fn finish(&mut self, done: Result<(tokio::task::Id, (Finished, Option<PgConnection>)), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        if let Some((streams, keys)) = self.claims.remove(&id) {
            for s in &streams {
                self.busy_streams.remove(s);
            }
            for k in &keys {
                self.busy_keys.remove(k);
            }
        }
        match done {
            Ok((_, (finished, connection))) => {
                self.connections.extend(connection.map(|c| (c, Instant::now())));
                for (stream, loaded) in finished.states {
                    self.cache.insert(stream, loaded);
                }
                for job in finished.retry.into_iter().rev() {
                    self.pending.push_front(job);
                }
            }
            // The lane's commands were dropped with it (their callers get an error) and its
            // streams left the cache, so they are reloaded from the store.
            Err(error) => tracing::error!(%error, "a writer lane panicked"),
        }
    }
}

async fn sleep_until(until: Option<Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until.into()).await,
        None => std::future::pending().await,
    }
}

/// What one command came to inside a batch.
#[derive(Clone)]
enum Verdict {
    Replayed(StoredResponse),
    KeyReused,
    Rejected(AccountError),
    /// Accepted: its streams after it; positions are known after the insert.
    Accepted(Vec<Touched>),
}

/// Runs one batch on a lane's own connection ([`tally_event_store::connect_writer`]): the
/// one it is given, else a new one. Hands the connection back unless it may be broken.
async fn run_lane(
    store: EventStore,
    connection: Option<(PgConnection, Instant)>,
    jobs: Vec<Job>,
    states: HashMap<Uuid, Loaded>,
    snapshot_every: i64,
) -> (Finished, Option<PgConnection>) {
    let mut connection = match lane_connection(&store, connection).await {
        Ok(connection) => connection,
        Err(error) => {
            let error = CommandError::from(error);
            for job in jobs {
                job.fail(&error);
            }
            let finished = Finished {
                states: states.into_iter().collect(),
                retry: Vec::new(),
            };
            return (finished, None);
        }
    };
    let mut intact = true;
    let finished = run_batch(&store, &mut connection, &mut intact, jobs, states, snapshot_every).await;
    (finished, intact.then_some(connection))
}

/// The connection a lane runs its batch on. One idle for a while is pinged first, like the
/// pool's ([`tally_event_store::IDLE_PING_AFTER`]): it may have died unseen (a server restart,
/// a failover), and is then replaced rather than failing the batch. One idle longer than
/// [`LANE_IDLE_MAX`] is replaced without asking (a firewall may have dropped it silently).
async fn lane_connection(
    store: &EventStore,
    idle: Option<(PgConnection, Instant)>,
) -> Result<PgConnection, sqlx::Error> {
    if let Some((mut connection, since)) = idle {
        let idle_for = since.elapsed();
        if idle_for < tally_event_store::IDLE_PING_AFTER {
            return Ok(connection);
        }
        if idle_for < LANE_IDLE_MAX && answers(&mut connection).await {
            return Ok(connection);
        }
    }
    tally_event_store::connect_writer(store.pool()).await
}

/// A lane's connection idle this long is closed and a new one opened (the pool's idle timeout).
const LANE_IDLE_MAX: Duration = Duration::from_secs(600);

/// Whether `connection` answers a ping within the time a pooled connection may take to be
/// handed out. The ping also sends what sqlx queued, such as the `ROLLBACK` of a transaction
/// dropped on an error: until then that transaction would hold its locks and its xid, which
/// holds the relay's gap-safe reads back.
async fn answers(connection: &mut PgConnection) -> bool {
    let ping = sqlx::Connection::ping(connection);
    matches!(
        tokio::time::timeout(tally_event_store::POOL_ACQUIRE_TIMEOUT, ping).await,
        Ok(Ok(()))
    )
}

/// Runs one batch: loads what the cache lacked, commits on `connection`, answers every
/// command. Clears `intact` when `connection` may be broken.
async fn run_batch(
    store: &EventStore,
    connection: &mut PgConnection,
    intact: &mut bool,
    mut jobs: Vec<Job>,
    mut states: HashMap<Uuid, Loaded>,
    snapshot_every: i64,
) -> Finished {
    let mut streams: Vec<(Uuid, StreamKind)> = jobs.iter().flat_map(|j| j.streams.iter().copied()).collect();
    streams.sort_unstable_by_key(|(s, _)| *s);
    streams.dedup_by_key(|(s, _)| *s);
    let cached: HashSet<Uuid> = states.keys().copied().collect();
    // A cached state of the wrong kind (a client named a transfer id as an account, or the
    // reverse) is reloaded, which refuses it.
    let missing: Vec<(Uuid, StreamKind)> = streams
        .into_iter()
        .filter(|(stream, kind)| !states.get(stream).is_some_and(|l| l.state.kind() == *kind))
        .collect();
    // On the lane's connection: its plans are made once (`connect_writer`), and it is the
    // connection the batch commits on anyway.
    match load_many(store, Some(&mut *connection), &missing).await {
        Ok(results) => {
            for (stream, result) in results {
                match result {
                    Ok(loaded) => {
                        states.insert(stream, loaded);
                    }
                    Err(error) => jobs = fail_stream(jobs, stream, &error),
                }
            }
        }
        Err(error) => {
            if matches!(
                error,
                CommandError::Unavailable(_) | CommandError::DatabaseUnavailable(_)
            ) {
                // The connection broke: nothing was written, and nothing can be on it.
                *intact = false;
                for job in jobs {
                    job.fail(&error);
                }
                return Finished {
                    states: states.into_iter().collect(),
                    retry: Vec::new(),
                };
            }
            for (stream, _) in &missing {
                jobs = fail_stream(jobs, *stream, &error);
            }
        }
    }

    if jobs.is_empty() {
        return Finished {
            states: states.into_iter().collect(),
            retry: Vec::new(),
        };
    }
    // Streams whose state came from the cache, possibly behind another instance's writes.
    let mut unverified = cached;
    // First without claiming keys; when a key turns out taken, again with claims. A batch
    // holding a command that already lost a race claims at once: were that command a retry of
    // a stored request, its replay must not depend on winning the race again.
    let mut claim = jobs.iter().any(|j| j.conflicts > 0);
    let committed = loop {
        match commit(store, connection, &jobs, &mut states, &mut unverified, claim).await {
            Err(BatchError::NeedsClaims { taken }) if !claim => {
                if taken > 0 {
                    metrics::counter!("tally_command_conflict_retries_total", "reason" => "key_taken").increment(1);
                }
                tracing::debug!(taken, "re-running the batch with claimed idempotency keys");
                claim = true;
            }
            other => break other,
        }
    };
    // After a failure the transaction may still be open on the connection (an early return
    // drops it, which only queues its ROLLBACK): the ping sends that now, before any back-off,
    // and shows whether the connection survived the error.
    *intact = match &committed {
        Ok(_) => true,
        Err(BatchError::CommitUnknown(_)) => false,
        // A server that refused as unavailable (a demoted leader answering read-only, one
        // shutting down) may still answer a ping; the next connection, through the router,
        // reaches the leader instead.
        Err(BatchError::Store(error)) if error.is_unavailable() => false,
        Err(_) => answers(connection).await,
    };
    match committed {
        Ok(committed) => {
            for (job, result) in jobs.into_iter().zip(committed.results) {
                job.answer(result);
            }
            let mut states = committed.states;
            for (stream, loaded) in &mut states {
                if loaded.version - loaded.snapshot_version >= snapshot_every {
                    save_snapshot(store, *stream, loaded);
                    loaded.snapshot_version = loaded.version;
                }
            }
            Finished {
                states,
                retry: Vec::new(),
            }
        }
        Err(BatchError::Store(error)) if error.is_transient() => {
            // A deadlock with another process's transaction, or similar: nothing to blame on a
            // command; run the batch again (each try counts, so this too is bounded).
            let mut retry = Vec::with_capacity(jobs.len());
            for mut job in jobs {
                job.conflicts += 1;
                if job.conflicts > CONFLICT_RETRIES_MAX {
                    job.fail(&CommandError::ConflictRetriesExhausted);
                } else {
                    retry.push(job);
                }
            }
            metrics::counter!("tally_command_conflict_retries_total", "reason" => "transient")
                .increment(retry.len() as u64);
            tracing::debug!(%error, "transient database error; re-running the batch");
            Finished {
                states: states.into_iter().collect(),
                retry,
            }
        }
        Err(BatchError::Store(StoreError::Conflict { stream_id, .. })) => {
            // Another process wrote `stream_id` (or a transaction ordering hazard, see
            // `previous_hash`): reload it, run the batch again; only its commands count a try.
            states.remove(&stream_id);
            let mut retry = Vec::with_capacity(jobs.len());
            let mut worst = 0;
            let mut retried = 0u64;
            for mut job in jobs {
                if job.touches(stream_id) {
                    job.conflicts += 1;
                    worst = worst.max(job.conflicts);
                    if job.conflicts > CONFLICT_RETRIES_MAX {
                        job.fail(&CommandError::ConflictRetriesExhausted);
                        continue;
                    }
                    retried += 1;
                }
                retry.push(job);
            }
            metrics::counter!("tally_command_conflict_retries_total", "reason" => "conflict").increment(retried);
            let ceiling = CONFLICT_BACKOFF_BASE * worst;
            let wait = rand::rng().random_range(Duration::ZERO..=ceiling);
            tracing::debug!(%stream_id, conflicts = worst, ?wait, "version conflict; re-running the batch");
            tokio::time::sleep(wait).await;
            Finished {
                states: states.into_iter().collect(),
                retry,
            }
        }
        Err(BatchError::NeedsClaims { .. }) => unreachable!("a batch with claims never asks for them"),
        Err(BatchError::CatchUp(error)) => {
            for job in jobs {
                job.fail(&error);
            }
            Finished {
                states: Vec::new(),
                retry: Vec::new(),
            }
        }
        Err(BatchError::CommitUnknown(error)) => {
            // The commit may have taken effect: re-running a command could apply it twice, so
            // every command gets the error (a retry with its key is safe) and nothing cached
            // is trusted.
            tracing::error!(%error, commands = jobs.len(), "COMMIT failed; outcome unknown");
            let error = CommandError::from(error);
            for job in jobs {
                job.fail(&error);
            }
            Finished {
                states: Vec::new(),
                retry: Vec::new(),
            }
        }
        Err(BatchError::Store(error)) => {
            let error = CommandError::from(error);
            // The connection broke (or only this command was in the batch): nothing to isolate.
            if jobs.len() == 1
                || matches!(
                    error,
                    CommandError::Unavailable(_) | CommandError::DatabaseUnavailable(_)
                )
            {
                for job in jobs {
                    job.fail(&error);
                }
                return Finished {
                    states: Vec::new(),
                    retry: Vec::new(),
                };
            }
            // Something in the batch upset the database: re-run each command alone, so only the
            // one that causes it fails.
            tracing::warn!(%error, commands = jobs.len(), "batch failed; re-running its commands one by one");
            Finished {
                states: Vec::new(),
                retry: jobs
                    .into_iter()
                    .map(|mut j| {
                        j.solo = true;
                        j
                    })
                    .collect(),
            }
        }
    }
}

/// Answers the commands of `stream` with `error`; returns the others.
fn fail_stream(jobs: Vec<Job>, stream: Uuid, error: &CommandError) -> Vec<Job> {
    let (failed, rest): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| j.touches(stream));
    for job in failed {
        job.fail(error);
    }
    rest
}

/// Writes a snapshot in the background: it is a cache, so a failure only costs a longer load.
fn save_snapshot(store: &EventStore, stream_id: Uuid, loaded: &Loaded) {
    // Transfer streams stay a few events long; only accounts grow.
    let State::Account(account) = &loaded.state else {
        return;
    };
    let state = match serde_json::to_value(account) {
        Ok(state) => state,
        Err(error) => return tracing::warn!(%stream_id, %error, "account state does not serialize; no snapshot"),
    };
    let snapshot = Snapshot {
        stream_type: tally_domain::account::STREAM_TYPE.to_owned(),
        version: loaded.version,
        state_version: Account::SNAPSHOT_VERSION as i32,
        state,
    };
    let pool = store.pool().clone();
    tokio::spawn(async move {
        if let Err(error) = snapshot::save(&pool, stream_id, &snapshot).await {
            tracing::warn!(%stream_id, %error, "saving a snapshot failed");
        }
    });
}
