//! Runs one command against one stream: load, decide, append, retry on conflict.

use std::time::Duration;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use rand::Rng;
use tally_domain::{Account, AccountCommand, AccountError, Metadata};
use tally_event_store::idempotency::{self, Claim, IdempotencyKey, StoredResponse};
use tally_event_store::{EventStore, NewEvent, READ_LIMIT_MAX, StoreError, StreamAppend, append_in};
use tally_schemas::{UpcastError, decode_account_event};
use uuid::Uuid;

/// How many times a command is re-run after losing an optimistic-concurrency race before the
/// client sees a 409. Each retry reloads the stream, so a retry can still be refused by a rule.
pub const CONFLICT_RETRIES_MAX: u32 = 16;
/// Base of the jittered back-off between retries; attempt `n` waits up to `n * base`.
pub const CONFLICT_BACKOFF_BASE: Duration = Duration::from_millis(2);

/// Why a command did not produce events.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Rejected(#[from] AccountError),
    #[error("gave up after {CONFLICT_RETRIES_MAX} concurrency conflicts")]
    ConflictRetriesExhausted,
    #[error("stored event could not be decoded: {0}")]
    Corrupt(#[from] UpcastError),
    #[error("the idempotency key was already used for a different request")]
    IdempotencyKeyReused,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for CommandError {
    fn from(e: sqlx::Error) -> Self {
        CommandError::Store(StoreError::Database(e))
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

/// The outcome of an accepted command.
#[derive(Debug, Clone)]
pub struct Executed {
    /// The account state after the command.
    pub account: Account,
    pub version: i64,
    pub position: i64,
}

/// Folds the stream into its current state and version.
pub async fn load_account(store: &EventStore, stream_id: Uuid) -> Result<(Account, i64), CommandError> {
    let mut account = Account::default();
    let mut version = 0;
    loop {
        let page = store.read_stream(stream_id, version, READ_LIMIT_MAX).await?;
        let full = page.len() as i64 == READ_LIMIT_MAX;
        for stored in page {
            let event = decode_account_event(&stored.event_type, stored.schema_version as u32, &stored.payload)?;
            account.apply(event);
            version = stored.version;
        }
        if !full {
            return Ok((account, version));
        }
    }
}

/// Executes `command` on account `stream_id`, retrying internally on concurrency conflicts.
///
/// With an idempotency key, the key is claimed, the events appended and `respond`'s response
/// stored in one transaction; a repeat of the same request gets that response back.
pub async fn execute_account(
    store: &EventStore,
    stream_id: Uuid,
    command: AccountCommand,
    metadata: &Metadata,
    idempotency: Option<&Idempotency>,
    respond: impl Fn(&Executed) -> StoredResponse,
) -> Result<Outcome, CommandError> {
    let metadata_json = serde_json::to_string(metadata).expect("metadata always serializes");
    for attempt in 0..=CONFLICT_RETRIES_MAX {
        // Load and decide before the transaction's first write. The first write assigns its
        // xid, and the global feed orders by xid: a transaction that got its xid before an
        // append it then read on top of would be read *before* that append (versions out of
        // order). The store refuses such an append as a conflict too; this keeps it rare.
        let (mut account, version) = load_account(store, stream_id).await?;
        let sink = EventSink::default();
        let decided = account.handle(command.clone(), &(), &sink).await;
        let mut tx = store.pool().begin().await?;
        if let Some(idem) = idempotency {
            match idempotency::claim(&mut tx, &idem.key, &idem.request_hash).await? {
                Claim::Claimed => {}
                Claim::Replay(stored) => return Ok(Outcome::Replayed(stored)),
                Claim::Mismatch => return Err(CommandError::IdempotencyKeyReused),
            }
        }
        // A refusal drops `tx`, which rolls back and releases the key for a later retry.
        decided?;
        let events = sink
            .collect()
            .await
            .into_iter()
            .map(|event| NewEvent {
                event_id: Uuid::now_v7(),
                event_type: event.type_name().to_owned(),
                schema_version: event.schema_version() as i32,
                payload: event.to_payload(),
                metadata: metadata_json.clone(),
            })
            .collect();
        let append = StreamAppend {
            stream_type: tally_domain::account::STREAM_TYPE.to_owned(),
            stream_id,
            expected_version: version,
            events,
        };
        match append_in(&mut tx, vec![append]).await {
            Ok(appended) => {
                let a = &appended[0];
                let executed = Executed {
                    account,
                    version: a.version,
                    position: a.position,
                };
                let response = respond(&executed);
                if let Some(idem) = idempotency {
                    idempotency::complete(&mut tx, &idem.key, &response).await?;
                }
                tx.commit().await?;
                return Ok(Outcome::Fresh(response));
            }
            Err(StoreError::Conflict { .. }) => {
                drop(tx);
                let ceiling = CONFLICT_BACKOFF_BASE * (attempt + 1);
                let wait = rand::rng().random_range(Duration::ZERO..=ceiling);
                tracing::debug!(%stream_id, attempt, ?wait, "version conflict; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(other) => return Err(other.into()),
        }
    }
    Err(CommandError::ConflictRetriesExhausted)
}
