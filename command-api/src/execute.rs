//! What running a command means: its outcome, its errors, and how a stream's state is loaded.
//! The running itself (batches, retries, cache) is in [`crate::writer`].

use std::time::Duration;

use cqrs_es::Aggregate;
use sqlx::postgres::PgConnection;
use tally_domain::{Account, AccountError, Entry, Reservation, Transfer};
use tally_event_store::idempotency::{IdempotencyKey, StoredResponse};
use tally_event_store::{EventStore, READ_LIMIT_MAX, StoreError, StoredEvent, snapshot};
use tally_schemas::{
    UpcastError, decode_account_event, decode_entry_event, decode_reservation_event, decode_transfer_event,
};
use uuid::Uuid;

/// How many times a command is re-run after losing an optimistic-concurrency race before the
/// client sees a 409. Each retry reloads the stream, so a retry can still be refused by a rule.
pub const CONFLICT_RETRIES_MAX: u32 = 16;
/// Base of the jittered back-off between retries; attempt `n` waits up to `n * base`.
pub const CONFLICT_BACKOFF_BASE: Duration = Duration::from_millis(2);

/// Why a command did not produce events. Cloneable: one database failure can answer every
/// command of a batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Rejected(#[from] AccountError),
    #[error("gave up after {CONFLICT_RETRIES_MAX} concurrency conflicts")]
    ConflictRetriesExhausted,
    #[error("the idempotency key was already used for a different request")]
    IdempotencyKeyReused,
    /// The writer's queue is full: the client should back off (503 with Retry-After).
    #[error("too many commands are waiting")]
    Overloaded,
    /// The writer is stopping (503 `unavailable`).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The event store's database is unreachable, broke the connection, or is restarting,
    /// in recovery or a standby after a failover (503 `database-unavailable`).
    #[error("database unavailable: {0}")]
    DatabaseUnavailable(String),
    /// A fault on our side: a stored event that does not decode, an unexpected database error.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            CommandError::DatabaseUnavailable(e.to_string())
        } else {
            CommandError::Internal(e.to_string())
        }
    }
}

impl From<sqlx::Error> for CommandError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e).into()
    }
}

impl From<UpcastError> for CommandError {
    fn from(e: UpcastError) -> Self {
        CommandError::Internal(format!("stored event could not be decoded: {e}"))
    }
}

/// The idempotency key of a request and the hash of the request it was sent with.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub key: IdempotencyKey,
    pub request_hash: [u8; 32],
}

/// The response to send, and whether it is a replay of an earlier one.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Fresh(StoredResponse),
    Replayed(StoredResponse),
}

/// What kind of stream a stream id names; decides how its events decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Account,
    Transfer,
    /// The stream that reserves one external id for one account (`tally_domain::reservation`).
    ExternalId,
    /// A journal entry's own stream (`tally_domain::entry`).
    Entry,
}

impl StreamKind {
    pub fn stream_type(self) -> &'static str {
        match self {
            StreamKind::Account => tally_domain::account::STREAM_TYPE,
            StreamKind::Transfer => tally_domain::transfer::STREAM_TYPE,
            StreamKind::ExternalId => tally_domain::reservation::STREAM_TYPE,
            StreamKind::Entry => tally_domain::entry::STREAM_TYPE,
        }
    }
}

/// A stream's folded state.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Account(Account),
    Transfer(Transfer),
    ExternalId(Reservation),
    Entry(Entry),
}

impl State {
    fn empty(kind: StreamKind) -> Self {
        match kind {
            StreamKind::Account => State::Account(Account::default()),
            StreamKind::Transfer => State::Transfer(Transfer::default()),
            StreamKind::ExternalId => State::ExternalId(Reservation::default()),
            StreamKind::Entry => State::Entry(Entry::default()),
        }
    }

    pub fn kind(&self) -> StreamKind {
        match self {
            State::Account(_) => StreamKind::Account,
            State::Transfer(_) => StreamKind::Transfer,
            State::ExternalId(_) => StreamKind::ExternalId,
            State::Entry(_) => StreamKind::Entry,
        }
    }

    /// Folds one stored event in.
    fn apply_stored(&mut self, stored: &StoredEvent) -> Result<(), UpcastError> {
        let version = stored.schema_version as u32;
        match self {
            State::Account(a) => a.apply(decode_account_event(&stored.event_type, version, &stored.payload)?),
            State::Transfer(t) => t.apply(decode_transfer_event(&stored.event_type, version, &stored.payload)?),
            State::ExternalId(r) => r.apply(decode_reservation_event(&stored.event_type, version, &stored.payload)?),
            State::Entry(e) => e.apply(decode_entry_event(&stored.event_type, version, &stored.payload)?),
        }
        Ok(())
    }
}

/// A stream's state as the writer knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub state: State,
    pub version: i64,
    /// Global position of the last event folded in (0 when it came from a snapshot alone).
    pub position: i64,
    /// Version of the stream's latest snapshot (0: none).
    pub snapshot_version: i64,
    /// Hash of the event at `version`, when it was seen committed before the transaction that
    /// appends after it wrote anything: it then saves that append reading it back
    /// (`StreamAppend::known_prev_hash`). `None` after a snapshot, or when unknown.
    pub last_hash: Option<tally_event_store::Hash>,
}

impl Loaded {
    pub fn account(&self) -> Option<&Account> {
        match &self.state {
            State::Account(a) => Some(a),
            _ => None,
        }
    }

    pub fn transfer(&self) -> Option<&Transfer> {
        match &self.state {
            State::Transfer(t) => Some(t),
            _ => None,
        }
    }

    pub fn reservation(&self) -> Option<&Reservation> {
        match &self.state {
            State::ExternalId(r) => Some(r),
            _ => None,
        }
    }

    pub fn entry(&self) -> Option<&Entry> {
        match &self.state {
            State::Entry(e) => Some(e),
            _ => None,
        }
    }
}

/// Where one stream a command touched stands after it.
#[derive(Debug, Clone)]
pub struct Touched {
    pub stream_id: Uuid,
    pub state: State,
    pub version: i64,
    /// Global position of the stream's last event (0 if not known in memory).
    pub position: i64,
}

/// The outcome of an accepted command: every stream it touched, after it.
#[derive(Debug, Clone)]
pub struct Executed {
    pub streams: Vec<Touched>,
}

impl Executed {
    pub fn stream(&self, stream_id: Uuid) -> &Touched {
        self.streams
            .iter()
            .find(|t| t.stream_id == stream_id)
            .expect("a command's response only asks for streams it touched")
    }

    /// The account `stream_id` after the command.
    pub fn account(&self, stream_id: Uuid) -> (&Account, &Touched) {
        let touched = self.stream(stream_id);
        match &touched.state {
            State::Account(a) => (a, touched),
            _ => unreachable!("{stream_id} is not an account stream"),
        }
    }

    /// The transfer `stream_id` after the command.
    pub fn transfer(&self, stream_id: Uuid) -> (&Transfer, &Touched) {
        let touched = self.stream(stream_id);
        match &touched.state {
            State::Transfer(t) => (t, touched),
            _ => unreachable!("{stream_id} is not a transfer stream"),
        }
    }

    /// The entry `stream_id` after the command.
    pub fn entry(&self, stream_id: Uuid) -> (&Entry, &Touched) {
        let touched = self.stream(stream_id);
        match &touched.state {
            State::Entry(e) => (e, touched),
            _ => unreachable!("{stream_id} is not an entry stream"),
        }
    }
}

/// Folds a stream into its current state: an account from its latest snapshot when there is
/// a usable one, then the events after it.
pub async fn load(store: &EventStore, stream_id: Uuid, kind: StreamKind) -> Result<Loaded, CommandError> {
    let mut loaded = load_many(store, None, &[(stream_id, kind)]).await?;
    loaded.pop().map(|(_, result)| result).expect("one result per stream")
}

/// [`load`] for an account stream.
pub async fn load_account(store: &EventStore, stream_id: Uuid) -> Result<Loaded, CommandError> {
    load(store, stream_id, StreamKind::Account).await
}

/// [`load`] for many streams in one round trip (each snapshot with the events after it, `snapshot::load_streams`),
/// whatever their number, on `connection` when given (a writer lane's own), else through the
/// pool. Each stream gets its own result: one that cannot be loaded (a client named a transfer
/// as an account, a corrupt event) does not fail the others.
pub async fn load_many(
    store: &EventStore,
    connection: Option<&mut PgConnection>,
    streams: &[(Uuid, StreamKind)],
) -> Result<Vec<(Uuid, Result<Loaded, CommandError>)>, CommandError> {
    let ids: Vec<Uuid> = streams.iter().map(|(id, _)| *id).collect();
    let stored = match connection {
        Some(connection) => snapshot::load_streams(connection, &ids, READ_LIMIT_MAX).await?,
        None => snapshot::load_streams(store.pool(), &ids, READ_LIMIT_MAX).await?,
    };
    let mut loaded = Vec::with_capacity(streams.len());
    for (id, kind) in streams {
        let stream = stored.get(id);
        let snapshot = stream.and_then(|s| s.snapshot.clone());
        let had_snapshot = snapshot.is_some();
        // Only accounts keep snapshots; one under another kind's id is not this stream's.
        let mut state = from_snapshot(*id, *kind, snapshot.filter(|_| *kind == StreamKind::Account));
        if state.version > 0 {
            // Where the stream stands if no event follows the snapshot: a response naming this
            // stream's position tells the truth even when the command writes nothing to it.
            state.position = stream.map_or(0, |s| s.snapshot_position);
        }
        let events = stream.map_or(&[][..], |s| s.events.as_slice());
        // The events read start after the snapshot: one not used (an old shape, another kind)
        // means reading from the start, and a full page means reading on.
        let result = if had_snapshot && state.snapshot_version == 0 {
            catch_up(store, *id, &mut state).await.map(|()| state)
        } else {
            match events.iter().try_for_each(|event| fold(event, &mut state)) {
                Ok(()) if events.len() as i64 == READ_LIMIT_MAX => {
                    catch_up(store, *id, &mut state).await.map(|()| state)
                }
                folded => folded.map(|()| state),
            }
        };
        loaded.push((*id, result));
    }
    Ok(loaded)
}

/// The starting point of a load: a usable snapshot, or the empty state.
fn from_snapshot(stream_id: Uuid, kind: StreamKind, snapshot: Option<snapshot::Snapshot>) -> Loaded {
    let empty = Loaded {
        state: State::empty(kind),
        version: 0,
        position: 0,
        snapshot_version: 0,
        last_hash: None,
    };
    let Some(snap) = snapshot else {
        return empty;
    };
    if snap.stream_type != kind.stream_type() || snap.state_version != Account::SNAPSHOT_VERSION as i32 {
        // An old shape: replay instead, and the next snapshot replaces it.
        return empty;
    }
    match serde_json::from_value::<Account>(snap.state) {
        Ok(account) => Loaded {
            state: State::Account(account),
            version: snap.version,
            position: 0,
            snapshot_version: snap.version,
            last_hash: None,
        },
        Err(error) => {
            tracing::warn!(%stream_id, %error, "ignoring an unreadable snapshot");
            empty
        }
    }
}

/// Folds one stored event into `loaded`.
fn fold(stored: &StoredEvent, loaded: &mut Loaded) -> Result<(), CommandError> {
    if stored.stream_type != loaded.state.kind().stream_type() {
        // A client named, say, a transfer id where an account id belongs: for this kind of
        // stream, there is nothing there.
        return Err(CommandError::Rejected(match loaded.state.kind() {
            StreamKind::Account => AccountError::AccountNotFound {
                account_id: stored.stream_id,
            },
            StreamKind::Transfer => AccountError::TransferNotFound,
            // An entry id that names another kind of stream is taken.
            StreamKind::Entry => AccountError::EntryExists {
                entry_id: stored.stream_id,
            },
            // Its id is derived from the external id (UUIDv5): another kind of stream there is
            // a corrupt log, not a client's mistake.
            StreamKind::ExternalId => {
                return Err(CommandError::Internal(format!(
                    "stream {} holds {} events where an external-id reservation belongs",
                    stored.stream_id, stored.stream_type
                )));
            }
        }));
    }
    loaded.state.apply_stored(stored)?;
    loaded.version = stored.version;
    loaded.position = stored.position;
    loaded.last_hash = stored.hash.as_slice().try_into().ok();
    Ok(())
}

/// Folds in the events appended to the stream after `loaded.version` (by anyone).
pub async fn catch_up(store: &EventStore, stream_id: Uuid, loaded: &mut Loaded) -> Result<(), CommandError> {
    loop {
        let page = store.read_stream(stream_id, loaded.version, READ_LIMIT_MAX).await?;
        let full = page.len() as i64 == READ_LIMIT_MAX;
        for stored in &page {
            fold(stored, loaded)?;
        }
        if !full {
            return Ok(());
        }
    }
}
