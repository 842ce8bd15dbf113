//! Runs one command against one stream: load, decide, append, retry on conflict.

use std::time::Duration;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use rand::Rng;
use tally_domain::{Account, AccountCommand, AccountError, Metadata};
use tally_event_store::{EventStore, NewEvent, READ_LIMIT_MAX, StoreError, StreamAppend};
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
    #[error(transparent)]
    Store(#[from] StoreError),
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
pub async fn execute_account(
    store: &EventStore,
    stream_id: Uuid,
    command: AccountCommand,
    metadata: &Metadata,
) -> Result<Executed, CommandError> {
    let metadata_json = serde_json::to_string(metadata).expect("metadata always serializes");
    for attempt in 0..=CONFLICT_RETRIES_MAX {
        let (mut account, version) = load_account(store, stream_id).await?;
        let sink = EventSink::default();
        account.handle(command.clone(), &(), &sink).await?;
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
        match store.append(vec![append]).await {
            Ok(appended) => {
                let a = &appended[0];
                return Ok(Executed {
                    account,
                    version: a.version,
                    position: a.position,
                });
            }
            Err(StoreError::Conflict { .. }) => {
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
