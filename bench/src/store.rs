//! Single-event appends through the real event store (`EventStore::append`): optimistic
//! concurrency, hash chain, canonical ordering, all of it. Each worker writes its own streams
//! and tracks their versions, so a conflict here would be a bug, and is counted as an error.
//! It also keeps each stream's head hash from the append's answer and chains the next append on
//! it (`known_prev_hash`), as the command API's writer does from its cache: the store then reads
//! no predecessor (each stream's first append after the start reads it once).

use std::collections::HashMap;

use tally_event_store::{EventStore, Hash, NewEvent, StoreError, StreamAppend};
use uuid::Uuid;

use crate::runner::Operation;
use crate::sample::{self, OwnStreams};

/// One event-store writer: appends one event to the next of its own streams per operation.
#[derive(Debug)]
pub struct StoreAppend {
    store: EventStore,
    streams: OwnStreams,
    heads: HashMap<Uuid, Hash>,
}

impl StoreAppend {
    pub fn new(store: EventStore) -> Self {
        Self {
            store,
            streams: OwnStreams::new(sample::STREAMS_PER_WORKER),
            heads: HashMap::new(),
        }
    }
}

impl Operation for StoreAppend {
    async fn run(&mut self) -> Result<(), &'static str> {
        let (stream_id, version) = self.streams.current();
        let append = StreamAppend {
            stream_type: sample::STREAM_TYPE.to_owned(),
            stream_id,
            expected_version: version,
            known_prev_hash: self.heads.get(&stream_id).copied(),
            events: vec![deposit()],
        };
        let result = self.store.append(vec![append]).await;
        match &result {
            Ok(appended) => {
                for head in appended {
                    self.heads.insert(head.stream_id, head.hash);
                }
            }
            Err(_) => {
                self.heads.remove(&stream_id);
            }
        }
        self.streams.advance(result.is_ok());
        result.map(drop).map_err(|e| error_kind(&e))
    }
}

/// A deposit event as the command API would append it.
pub fn deposit() -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: sample::EVENT_TYPE.to_owned(),
        schema_version: sample::SCHEMA_VERSION,
        payload: sample::payload(),
        metadata: sample::metadata(),
    }
}

fn error_kind(error: &StoreError) -> &'static str {
    match error {
        StoreError::Conflict { .. } => "conflict",
        StoreError::Database(_) => "database",
        _ => "store",
    }
}
