//! The consuming loop: one task per partition, each with its own durable pull consumer.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, consumer::pull};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use sqlx::PgPool;
use tally_event_store::EventStore;
use tally_schemas::decode_account_event;
use tally_schemas::envelope::EventEnvelope;
use uuid::Uuid;

use crate::Config;
use crate::balances::{self, PROJECTION};

/// How long JetStream waits for an ack before redelivering.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Unacknowledged messages a consumer may have outstanding.
const ACK_PENDING_MAX: i64 = 20_000;
/// Back-off after a failed batch before trying again.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// Why a batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("undecodable message at stream sequence {sequence}: {reason}")]
    Undecodable { sequence: u64, reason: String },
    #[error("the log has no version {version} of stream {stream_id} to fill a gap")]
    MissingInLog { stream_id: Uuid, version: i64 },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Store(#[from] tally_event_store::StoreError),
}

/// The durable consumer name of a projection's partition.
pub fn consumer_name(projection: &str, partition: u32) -> String {
    format!("{projection}-p{partition}")
}

/// Runs every partition of the account-balances projection until `shutdown` resolves.
pub async fn run(
    pool: PgPool,
    js: jetstream::Context,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let topology = config.topology();
    let stream = topology.ensure_stream(&js).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for partition in 0..topology.partitions {
        let consumer: PullConsumer = stream
            .get_or_create_consumer(
                &consumer_name(PROJECTION, partition),
                pull::Config {
                    durable_name: Some(consumer_name(PROJECTION, partition)),
                    filter_subject: topology.partition_filter(partition),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: ACK_PENDING_MAX,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("creating consumer for partition {partition}: {e}"))?;
        let worker = PartitionWorker {
            pool: pool.clone(),
            store: EventStore::new(pool.clone()),
            partition,
            batch_events_max: config.batch_events_max,
            batch_wait: config.batch_wait(),
        };
        let stop = stop_rx.clone();
        tasks.spawn(async move { worker.run(consumer, stop).await });
    }
    tracing::info!(
        partitions = topology.partitions,
        projection = PROJECTION,
        "projector running"
    );
    shutdown.await;
    // Each partition finishes (commits and acks) the batch it is on, then stops.
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

struct PartitionWorker {
    pool: PgPool,
    store: EventStore,
    partition: u32,
    batch_events_max: usize,
    batch_wait: Duration,
}

impl PartitionWorker {
    async fn run(self, consumer: PullConsumer, mut stop: tokio::sync::watch::Receiver<bool>) {
        while !*stop.borrow() {
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.batch_events_max)
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await;
            let mut messages = match messages {
                Ok(m) => m,
                Err(error) => {
                    tracing::warn!(partition = self.partition, %error, "cannot pull; retrying");
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue;
                }
            };
            loop {
                let first = tokio::select! {
                    _ = stop.changed() => return,
                    next = messages.next() => next,
                };
                let mut batch = match first {
                    Some(Ok(m)) => vec![m],
                    Some(Err(error)) => {
                        tracing::warn!(partition = self.partition, %error, "pull stream error; reconnecting");
                        break;
                    }
                    None => break,
                };
                let deadline = tokio::time::Instant::now() + self.batch_wait;
                while batch.len() < self.batch_events_max {
                    match tokio::time::timeout_at(deadline, messages.next()).await {
                        Ok(Some(Ok(m))) => batch.push(m),
                        _ => break,
                    }
                }
                self.handle(batch).await;
            }
            tokio::time::sleep(RETRY_BACKOFF).await;
        }
    }

    /// Applies a batch and acknowledges it, or asks for redelivery after a back-off.
    async fn handle(&self, batch: Vec<jetstream::Message>) {
        match self.apply(&batch).await {
            Ok((applied, duplicates)) => {
                for message in &batch {
                    // Acks are best effort: a lost ack means redelivery, which is dropped as a
                    // duplicate by version.
                    if let Err(error) = message.ack().await {
                        tracing::warn!(%error, "ack failed; the event will be redelivered and dropped as a duplicate");
                    }
                }
                tracing::debug!(partition = self.partition, applied, duplicates, "applied batch");
            }
            Err(error) => {
                tracing::error!(partition = self.partition, %error, events = batch.len(), "batch failed; will be redelivered");
                for message in &batch {
                    let _ = message.ack_with(AckKind::Nak(Some(RETRY_BACKOFF))).await;
                }
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
        }
    }

    /// One transaction: read-model rows and checkpoint. Returns (applied, duplicates).
    async fn apply(&self, batch: &[jetstream::Message]) -> Result<(usize, usize), ApplyError> {
        let mut envelopes = Vec::with_capacity(batch.len());
        let mut last_sequence = 0;
        for message in batch {
            let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            let envelope: EventEnvelope =
                serde_json::from_slice(&message.payload).map_err(|e| ApplyError::Undecodable {
                    sequence,
                    reason: e.to_string(),
                })?;
            last_sequence = last_sequence.max(sequence);
            envelopes.push((sequence, envelope));
        }
        let ids: Vec<Uuid> = envelopes
            .iter()
            .filter(|(_, e)| e.stream_type == tally_domain::account::STREAM_TYPE)
            .map(|(_, e)| e.stream_id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();

        let mut tx = self.pool.begin().await?;
        let mut rows = balances::load_for_update(&mut tx, &ids).await?;
        let mut changed = HashSet::new();
        let (mut applied, mut duplicates) = (0, 0);
        let mut last_position = 0;
        for (sequence, envelope) in &envelopes {
            last_position = last_position.max(envelope.position);
            let Some(row) = rows.get_mut(&envelope.stream_id) else {
                continue; // not an account stream
            };
            if envelope.version <= row.version {
                duplicates += 1;
                continue;
            }
            if envelope.version > row.version + 1 {
                // Something before this event never reached us (e.g. published before this
                // consumer existed and expired): take it from the log of record.
                let missing = self
                    .store
                    .read_stream(envelope.stream_id, row.version, envelope.version - row.version - 1)
                    .await?;
                for stored in &missing {
                    let event = decode_account_event(&stored.event_type, stored.schema_version as u32, &stored.payload)
                        .map_err(|e| ApplyError::Undecodable {
                            sequence: *sequence,
                            reason: e.to_string(),
                        })?;
                    row.apply(&event, stored.version, stored.position, stored.recorded_at);
                }
                if row.version != envelope.version - 1 {
                    return Err(ApplyError::MissingInLog {
                        stream_id: envelope.stream_id,
                        version: row.version + 1,
                    });
                }
            }
            let event = decode_account_event(&envelope.event_type, envelope.schema_version, envelope.payload.get())
                .map_err(|e| ApplyError::Undecodable {
                    sequence: *sequence,
                    reason: e.to_string(),
                })?;
            let recorded_at = DateTime::parse_from_rfc3339(&envelope.recorded_at)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| ApplyError::Undecodable {
                    sequence: *sequence,
                    reason: e.to_string(),
                })?;
            row.apply(&event, envelope.version, envelope.position, recorded_at);
            changed.insert(envelope.stream_id);
            applied += 1;
        }
        balances::store(&mut tx, &rows, &changed).await?;
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, partition, stream_sequence, position) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (projection, partition) DO UPDATE SET stream_sequence = GREATEST(projection_checkpoints.stream_sequence, EXCLUDED.stream_sequence), \
                 position = GREATEST(projection_checkpoints.position, EXCLUDED.position), updated_at = now()",
        )
        .bind(PROJECTION)
        .bind(self.partition as i32)
        .bind(last_sequence as i64)
        .bind(last_position)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((applied, duplicates))
    }
}
