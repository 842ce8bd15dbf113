//! The relay scenario's backlog: events written with the real event store while no relay
//! runs, in appends as large as the store allows, so writing it takes seconds, not minutes.

use serde::{Deserialize, Serialize};
use tally_event_store::{APPEND_EVENTS_MAX, Checkpoint, EventStore, StreamAppend};
use tokio::time::Instant;
use uuid::Uuid;

use crate::sample;
use crate::store::deposit;

/// Events per stream in the backlog: many streams, so the relay publishes across every
/// partition, each stream long enough to be a realistic account history.
const EVENTS_PER_STREAM: usize = 100;
/// How many stored events are sampled to size the messages of the JetStream limit.
const SIZE_SAMPLE_EVENTS: i64 = 1_000;

/// What was preloaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preloaded {
    pub events: u64,
    pub seconds: f64,
    /// The last event in commit order: the relay has drained the backlog when its checkpoint
    /// gets here.
    pub last: Checkpoint,
    /// Mean size of a published envelope body (what the relay sends per event), in bytes.
    pub message_bytes: usize,
}

/// Appends `events` events with one writer (so positions follow commit order) and sizes them.
pub async fn preload(store: &EventStore, events: u64) -> anyhow::Result<Preloaded> {
    anyhow::ensure!(events > 0, "nothing to preload");
    let started = Instant::now();
    let mut left = events;
    while left > 0 {
        let batch = left.min(APPEND_EVENTS_MAX as u64);
        store.append(backlog_append(batch as usize)).await?;
        left -= batch;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Preloaded {
        events,
        seconds,
        last: last_checkpoint(store).await?,
        message_bytes: mean_envelope_bytes(store).await?,
    })
}

/// `events` new events over fresh streams of [`EVENTS_PER_STREAM`] (the last one shorter).
fn backlog_append(events: usize) -> Vec<StreamAppend> {
    let mut appends = Vec::new();
    let mut left = events;
    while left > 0 {
        let n = left.min(EVENTS_PER_STREAM);
        appends.push(StreamAppend {
            stream_type: sample::STREAM_TYPE.to_owned(),
            stream_id: Uuid::now_v7(),
            expected_version: 0,
            known_prev_hash: None,
            events: (0..n).map(|_| deposit()).collect(),
        });
        left -= n;
    }
    appends
}

async fn last_checkpoint(store: &EventStore) -> Result<Checkpoint, sqlx::Error> {
    let (tx_id, position): (i64, i64) =
        sqlx::query_as("SELECT tx_id::text::bigint, position FROM events ORDER BY tx_id DESC, position DESC LIMIT 1")
            .fetch_one(store.pool())
            .await?;
    Ok(Checkpoint { tx_id, position })
}

async fn mean_envelope_bytes(store: &EventStore) -> anyhow::Result<usize> {
    let sample = store.read_all(Checkpoint::default(), SIZE_SAMPLE_EVENTS).await?;
    anyhow::ensure!(!sample.is_empty(), "the preloaded events are not readable yet");
    let mut bytes = 0;
    for event in &sample {
        bytes += serde_json::to_vec(&tally_event_store::relay::envelope(event)?)?.len();
    }
    Ok(bytes / sample.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_append_spreads_its_events_over_fresh_streams() {
        let appends = backlog_append(250);
        let sizes: Vec<usize> = appends.iter().map(|a| a.events.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        assert!(appends.iter().all(|a| a.expected_version == 0));
    }
}
