//! One (projection, partition) unit: a durable pull consumer applied in batches.
//!
//! The consumer is filtered to the projection's stream type in its partition
//! (`<prefix>.<partition>.<stream_type>`), so JetStream delivers nothing the unit would skip.
//! Each batch is one Postgres transaction holding the read-model rows and the partition's
//! checkpoint, written on condition that the worker still holds its lease: a worker that lost
//! its lease cannot commit. A batch with nothing of the projection's stream type (a consumer
//! still on an earlier version's whole-partition filter, until it is narrowed) writes the
//! checkpoint alone.
//! Messages are acknowledged only after the commit; a redelivered one is dropped by version.
//! Every event is first checked against the log (`verify`): one that is not the log's is
//! refused (dead-lettered and acknowledged, never applied) and the partition goes on.
//!
//! Failures: a dependency failing (database unreachable, deadlock) is retried with back-off for
//! as long as it lasts (state `retrying`). A batch failing for its data is retried a bounded
//! number of times, then its events are applied one at a time to find the culprit: the events
//! before it are committed, the poison event is published to the dead-letter subject with the
//! error, and the partition **stops** (state `failed`, error in `tally projections status`)
//! until `tally projections retry` clears it. Nothing of the log is skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, consumer::pull};
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;
use tally_event_store::EventStore;
use tally_event_store::partition::Topology;
use tally_schemas::envelope::EventEnvelope;
use tokio::sync::watch;
use tracing::Instrument;

use crate::catalog;
use crate::model::{self, ApplyError, BatchOutcome, EventMeta, Incoming, Projection, WriteMode};
use crate::verify::{self, Claim, Refusal};
use tally_schemas::invalidation::{INVALIDATION_ROWS_MAX, InvalidatedRow, Invalidation, invalidation_subject};

/// How long JetStream waits for an ack before redelivering.
pub const ACK_WAIT: Duration = Duration::from_secs(10);
/// Unacknowledged messages a consumer may have outstanding.
const ACK_PENDING_MAX: i64 = 20_000;
/// How long a stopping unit hands back the messages it had pulled and not applied.
const GIVE_BACK_MAX: Duration = Duration::from_millis(100);
/// How often a stopped unit (paused, failed, needing a rebuild) looks whether it may go on.
const GATE_POLL: Duration = Duration::from_millis(500);

/// Retries of a failing batch.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts at a batch failing for its data before its poison event is dead-lettered.
    pub poison_attempts: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// Back-off before attempt `attempt` (1-based): doubling from the minimum, capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.backoff_min.saturating_mul(factor).min(self.backoff_max)
    }
}

/// What every unit of a worker shares.
pub(crate) struct Shared {
    pub pool: PgPool,
    pub store: EventStore,
    pub js: jetstream::Context,
    pub stream: jetstream::stream::Stream,
    pub topology: Topology,
    pub worker_id: String,
    pub batch_events_max: usize,
    pub batch_wait: Duration,
    pub retry: RetryPolicy,
}

/// The durable consumer name of a projection's partition.
pub fn consumer_name(projection: &str, partition: u32) -> String {
    format!("{projection}-p{partition}")
}

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The unit must stop taking messages: paused, failed, lease lost or wrong shape.
    #[error("partition not consumable: {0}")]
    Gate(Gate),
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        BatchError::Apply(ApplyError::Database(e))
    }
}

/// Whether a unit may apply events now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    Paused,
    Failed,
    NeedsRebuild,
    LeaseLost,
}

impl std::fmt::Display for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Gate::Open => "running",
            Gate::Paused => "paused",
            Gate::Failed => "failed",
            Gate::NeedsRebuild => "needs-rebuild",
            Gate::LeaseLost => "lease lost",
        })
    }
}

pub(crate) struct Unit<P> {
    shared: Arc<Shared>,
    partition: u32,
    labels: [(&'static str, String); 2],
    _projection: std::marker::PhantomData<P>,
}

impl<P: Projection> Unit<P> {
    pub(crate) fn new(shared: Arc<Shared>, partition: u32) -> Self {
        Self {
            shared,
            partition,
            labels: [
                ("projection", P::NAME.to_string()),
                ("partition", partition.to_string()),
            ],
            _projection: std::marker::PhantomData,
        }
    }

    /// Consumes until `stop` turns true; the batch in hand is finished (committed and acked)
    /// first.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let consumer = loop {
            match self.consumer().await {
                Ok(consumer) => break consumer,
                Err(error) => {
                    tracing::warn!(projection = P::NAME, partition = self.partition, %error, "cannot create consumer; retrying");
                    if sleep_or_stop(&mut stop, self.shared.retry.backoff_max).await {
                        return;
                    }
                }
            }
        };
        tracing::info!(projection = P::NAME, partition = self.partition, "consuming");
        while !*stop.borrow() {
            match self.gate().await {
                Ok(Gate::Open) => {}
                Ok(gate) => {
                    tracing::debug!(projection = P::NAME, partition = self.partition, %gate, "waiting");
                    if sleep_or_stop(&mut stop, GATE_POLL).await {
                        return;
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(projection = P::NAME, partition = self.partition, %error, "cannot read partition state");
                    if sleep_or_stop(&mut stop, self.shared.retry.backoff_max).await {
                        return;
                    }
                    continue;
                }
            }
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.shared.batch_events_max)
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await;
            let mut messages = match messages {
                Ok(m) => m,
                Err(error) => {
                    tracing::warn!(projection = P::NAME, partition = self.partition, %error, "cannot pull; retrying");
                    if sleep_or_stop(&mut stop, self.shared.retry.backoff_min).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                let first = tokio::select! {
                    _ = stop.changed() => {
                        give_back(&mut messages).await;
                        return;
                    }
                    next = messages.next() => next,
                };
                let mut batch = match first {
                    Some(Ok(m)) => vec![m],
                    Some(Err(error)) => {
                        tracing::warn!(projection = P::NAME, partition = self.partition, %error, "pull stream error; reconnecting");
                        break;
                    }
                    None => break,
                };
                // Take what has already arrived: under load, what was delivered while the
                // previous batch committed. A pull request's messages are pushed as they are
                // published, so they wait here, in the client, where JetStream's `pending`
                // count (messages not delivered yet) does not see them.
                let mut interrupted = None;
                while batch.len() < self.shared.batch_events_max {
                    match messages.next().now_or_never() {
                        Some(Some(Ok(m))) => batch.push(m),
                        None => break,
                        Some(end) => {
                            interrupted = Some(end);
                            break;
                        }
                    }
                }
                // Then wait for more only while JetStream says more are pending for this
                // consumer: at a light load the batch is committed at once (the wait would be
                // pure lag), under load it fills while the previous one commits anyway.
                let deadline = tokio::time::Instant::now() + self.shared.batch_wait;
                while interrupted.is_none() && batch.len() < self.shared.batch_events_max && more_pending(&batch) {
                    match tokio::time::timeout_at(deadline, messages.next()).await {
                        Ok(Some(Ok(m))) => batch.push(m),
                        Ok(end) => interrupted = Some(end),
                        Err(_) => break,
                    }
                }
                let span = self.batch_span(&batch);
                if !self.handle(batch, &mut stop).instrument(span).await {
                    break; // stop taking messages; the gate decides when to go on
                }
                if let Some(end) = interrupted {
                    if let Some(Err(error)) = end {
                        tracing::warn!(projection = P::NAME, partition = self.partition, %error, "pull stream error; reconnecting");
                    }
                    break;
                }
                if *stop.borrow() {
                    break;
                }
            }
            if *stop.borrow() {
                give_back(&mut messages).await;
            }
        }
    }

    /// The partition's durable consumer, filtered to `P`'s stream type (a partition's subject
    /// carries every stream type; JetStream leaves the others out). A consumer made by an
    /// earlier version with the whole partition as its filter is narrowed in place: it keeps
    /// its position, and what it drops is what this unit would have acknowledged unread.
    async fn consumer(&self) -> anyhow::Result<PullConsumer> {
        let name = consumer_name(P::NAME, self.partition);
        let config = pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: self
                .shared
                .topology
                .partition_stream_type_filter(self.partition, P::STREAM_TYPE),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: ACK_PENDING_MAX,
            ..Default::default()
        };
        let stream = &self.shared.stream;
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|e| anyhow::anyhow!("creating consumer {name}: {e}"))?;
        let filter = &consumer.cached_info().config.filter_subject;
        if *filter != config.filter_subject {
            tracing::info!(consumer = %name, from = %filter, to = %config.filter_subject, "narrowing the consumer's filter");
            consumer = stream
                .create_consumer(config)
                .await
                .map_err(|e| anyhow::anyhow!("updating consumer {name}: {e}"))?;
        }
        Ok(consumer)
    }

    /// The span a batch is handled in: it continues the trace of the batch's first event (the
    /// `traceparent` the relay copied from the event's metadata) and links the others'.
    fn batch_span(&self, batch: &[jetstream::Message]) -> tracing::Span {
        let span = tracing::info_span!(
            "projector.batch",
            projection = P::NAME,
            partition = self.partition,
            events = batch.len()
        );
        let traces = batch
            .iter()
            .filter_map(|m| m.headers.as_ref()?.get("traceparent"))
            .filter_map(|v| tally_event_store::trace::from_traceparent(v.as_str()));
        tally_event_store::trace::join_batch(&span, traces);
        span
    }

    /// Applies a batch, retrying as the failure deserves; acks what was applied. Returns
    /// whether the unit may keep taking messages.
    async fn handle(&self, batch: Vec<jetstream::Message>, stop: &mut watch::Receiver<bool>) -> bool {
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            match self.apply(&batch).await {
                Ok((outcome, refused)) => {
                    self.record(&outcome, batch.len(), started.elapsed());
                    self.refuse(&batch, &refused).await;
                    ack_all(&batch).await;
                    self.invalidate(&outcome).await;
                    return true;
                }
                Err(BatchError::Gate(gate)) => {
                    tracing::info!(projection = P::NAME, partition = self.partition, %gate, "stopping consumption");
                    nak_all(&batch, None).await;
                    return false;
                }
                Err(BatchError::Apply(error)) if error.is_transient() => {
                    attempt = attempt.saturating_add(1);
                    let backoff = self.shared.retry.backoff(attempt);
                    tracing::warn!(projection = P::NAME, partition = self.partition, %error, attempt, ?backoff, "batch failed; retrying");
                    self.set_state("retrying", &error.to_string()).await;
                    if sleep_or_stop(stop, backoff).await {
                        nak_all(&batch, None).await;
                        return false;
                    }
                }
                Err(BatchError::Apply(error)) => {
                    attempt = attempt.saturating_add(1);
                    if attempt < self.shared.retry.poison_attempts {
                        let backoff = self.shared.retry.backoff(attempt);
                        tracing::warn!(projection = P::NAME, partition = self.partition, %error, attempt, ?backoff, "batch failed; retrying");
                        if sleep_or_stop(stop, backoff).await {
                            nak_all(&batch, None).await;
                            return false;
                        }
                        continue;
                    }
                    return self.isolate(batch).await;
                }
            }
        }
    }

    /// Applies the batch one event at a time: the events before the culprit are committed and
    /// acked, the culprit is dead-lettered and the partition stopped.
    async fn isolate(&self, batch: Vec<jetstream::Message>) -> bool {
        for (i, message) in batch.iter().enumerate() {
            let one = std::slice::from_ref(message);
            let started = Instant::now();
            match self.apply(one).await {
                Ok((outcome, refused)) => {
                    self.record(&outcome, 1, started.elapsed());
                    self.refuse(one, &refused).await;
                    ack_all(one).await;
                    self.invalidate(&outcome).await;
                }
                Err(BatchError::Gate(_)) => {
                    nak_all(&batch[i..], None).await;
                    return false;
                }
                Err(BatchError::Apply(error)) if error.is_transient() => {
                    // Not this event's fault after all: let the whole rest come back.
                    nak_all(&batch[i..], Some(self.shared.retry.backoff_min)).await;
                    return true;
                }
                Err(BatchError::Apply(error)) => {
                    self.dead_letter(message, &error).await;
                    // Back in the stream at once, to be seen again after `retry`.
                    nak_all(&batch[i..], Some(GATE_POLL)).await;
                    return false;
                }
            }
        }
        true
    }

    /// Tells every query API which rows the committed batch changed (see
    /// `tally_schemas::invalidation`). Best effort by design: a query API that misses one
    /// has lost its connection, and it clears its cache when that happens.
    async fn invalidate(&self, outcome: &BatchOutcome) {
        if outcome.announce.is_empty() {
            return;
        }
        let subject = invalidation_subject(&self.shared.topology.subject_prefix, P::NAME);
        let client = self.shared.js.client();
        for rows in outcome.announce.chunks(INVALIDATION_ROWS_MAX) {
            let message = Invalidation {
                projection: P::NAME.to_owned(),
                rows: rows
                    .iter()
                    .map(|&(id, version)| InvalidatedRow { id, version })
                    .collect(),
            };
            let body = serde_json::to_vec(&message).expect("an invalidation always serializes");
            if let Err(error) = client.publish(subject.clone(), body.into()).await {
                tracing::warn!(projection = P::NAME, partition = self.partition, %error, "publishing cache invalidations failed");
            }
        }
    }

    /// Publishes each refused event to the dead-letter subject with its reason. Their count
    /// and the last reason were recorded in the batch's transaction.
    async fn refuse(&self, batch: &[jetstream::Message], refused: &[Refusal]) {
        for refusal in refused {
            let message = &batch[refusal.index];
            let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            tracing::error!(projection = P::NAME, partition = self.partition, sequence, reason = %refusal.reason, "refused an event the log does not hold: dead-lettered, not applied");
            metrics::counter!("tally_projection_refused_events_total", &self.labels).increment(1);
            self.publish_dead_letter(message, sequence, &refusal.reason).await;
        }
    }

    async fn dead_letter(&self, message: &jetstream::Message, error: &ApplyError) {
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let reason = error.to_string();
        tracing::error!(projection = P::NAME, partition = self.partition, sequence, %reason, "poison event: dead-lettered, partition stopped");
        self.publish_dead_letter(message, sequence, &reason).await;
        let recorded = sqlx::query(
            "UPDATE projection_partitions SET state = 'failed', last_error = $3, last_error_at = now(), \
                 dead_letters = dead_letters + 1, updated_at = now() \
             WHERE projection = $1 AND partition = $2",
        )
        .bind(P::NAME)
        .bind(self.partition as i32)
        .bind(format!("stream sequence {sequence}: {reason}"))
        .execute(&self.shared.pool)
        .await;
        if let Err(e) = recorded {
            tracing::error!(projection = P::NAME, partition = self.partition, error = %e, "cannot record the failure");
        }
    }

    /// The message, with the reason in headers, on the dead-letter subject (kept in the stream).
    async fn publish_dead_letter(&self, message: &jetstream::Message, sequence: u64, reason: &str) {
        metrics::counter!("tally_projection_dead_letters_total", &self.labels).increment(1);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Tally-Error", header_value(reason).as_str());
        headers.insert("Tally-Projection", P::NAME);
        headers.insert("Tally-Partition", self.partition.to_string().as_str());
        headers.insert("Tally-Stream-Sequence", sequence.to_string().as_str());
        headers.insert("Tally-Subject", message.subject.as_str());
        headers.insert("Nats-Msg-Id", format!("dead-letter-{}-{}", P::NAME, sequence).as_str());
        let subject = self.shared.topology.dead_letter_subject(P::NAME, self.partition);
        let published = match self
            .shared
            .js
            .publish_with_headers(subject, headers, message.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = published {
            // The error is in the partition's state and the log: nothing is lost.
            tracing::error!(projection = P::NAME, partition = self.partition, error = %e, "cannot publish the dead letter");
        }
    }

    /// Whether this unit may apply events: not paused, not failed, code shape = live shape.
    async fn gate(&self) -> Result<Gate, sqlx::Error> {
        let mut conn = self.shared.pool.acquire().await?;
        let live = catalog::live(&mut conn, P::NAME).await?;
        if live.paused {
            return Ok(Gate::Paused);
        }
        if live.shape != P::SHAPE {
            self.mark_needs_rebuild(&live).await;
            return Ok(Gate::NeedsRebuild);
        }
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM projection_partitions WHERE projection = $1 AND partition = $2")
                .bind(P::NAME)
                .bind(self.partition as i32)
                .fetch_optional(&mut *conn)
                .await?;
        Ok(match state.as_deref() {
            Some("failed") => Gate::Failed,
            _ => Gate::Open,
        })
    }

    async fn mark_needs_rebuild(&self, live: &catalog::Live) {
        let reason = format!(
            "generation {} was built by shape {}; this code writes shape {}: run `tally projections rebuild {}`",
            live.generation.number,
            live.shape,
            P::SHAPE,
            P::NAME
        );
        let _ = sqlx::query(
            "UPDATE projection_partitions SET state = 'needs-rebuild', last_error = $3, last_error_at = now(), updated_at = now() \
             WHERE projection = $1 AND partition = $2 AND state <> 'needs-rebuild'",
        )
        .bind(P::NAME)
        .bind(self.partition as i32)
        .bind(reason)
        .execute(&self.shared.pool)
        .await;
    }

    async fn set_state(&self, state: &str, error: &str) {
        let _ = sqlx::query(
            "UPDATE projection_partitions SET state = $3, last_error = $4, last_error_at = now(), updated_at = now() \
             WHERE projection = $1 AND partition = $2 AND state NOT IN ('failed', 'needs-rebuild')",
        )
        .bind(P::NAME)
        .bind(self.partition as i32)
        .bind(state)
        .bind(error)
        .execute(&self.shared.pool)
        .await;
    }

    /// One transaction: the check of the events against the log, the rows, and the checkpoint
    /// fenced by the lease. A batch holding nothing of this projection's stream type (a
    /// partition carries every stream type) writes the checkpoint alone. Returns what the batch
    /// did and the events it refused (`verify`), which the caller dead-letters.
    async fn apply(&self, batch: &[jetstream::Message]) -> Result<(BatchOutcome, Vec<Refusal>), BatchError> {
        let mut decoded = Vec::with_capacity(batch.len());
        let mut claims = Vec::with_capacity(batch.len());
        let mut last_sequence = 0u64;
        let mut pending = 0u64;
        for message in batch {
            let info = message.info().ok();
            let sequence = info.as_ref().map_or(0, |i| i.stream_sequence);
            last_sequence = last_sequence.max(sequence);
            pending = info.as_ref().map_or(pending, |i| i.pending);
            let (event, claim) = self.incoming(&message.payload, sequence)?;
            decoded.push(event);
            claims.push(claim);
        }
        let mut tx = self.shared.pool.begin().await?;
        let refused = verify::refusals(&mut tx, &claims).await?;
        let incoming: Vec<Incoming> = decoded
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !refused.iter().any(|r| r.index == *i))
            .map(|(_, event)| event)
            .collect();
        // Only the log's events move the checkpoint: a refused one's position means nothing.
        let last = incoming.iter().max_by_key(|e| e.meta.position);
        let progress = Progress {
            stream_sequence: last_sequence as i64,
            position: last.map_or(0, |e| e.meta.position),
            lag_events: pending as i64,
            last_event_at: last.map(|e| e.meta.recorded_at),
        };
        // Share-locked: a rebuild's switch or a pause waits for this batch, and it for them.
        let live = live_gate::<P>(&mut tx).await?;
        let outcome = if incoming.iter().any(|e| e.stream_type == P::STREAM_TYPE) {
            let mut rows = model::RowCache::<P>::new();
            model::apply_batch::<P>(
                &mut tx,
                &self.shared.store,
                &live.generation,
                &mut rows,
                &incoming,
                WriteMode::Live,
            )
            .await?
        } else {
            BatchOutcome {
                ignored: incoming.len() as u64,
                ..BatchOutcome::default()
            }
        };
        self.record_refusals(&mut tx, &refused).await?;
        self.checkpoint(&mut tx, &progress, &outcome).await?;
        tx.commit().await?;
        metrics::gauge!("tally_projection_lag_events", &self.labels).set(pending as f64);
        if let Some(last) = last {
            let lag = if pending == 0 {
                0.0
            } else {
                (Utc::now() - last.meta.recorded_at).num_milliseconds().max(0) as f64 / 1000.0
            };
            metrics::gauge!("tally_projection_lag_seconds", &self.labels).set(lag);
        }
        Ok((outcome, refused))
    }

    /// Counts the refused events as dead letters of the partition, with the last reason, in the
    /// batch's transaction; the state stays as it is.
    async fn record_refusals(&self, conn: &mut sqlx::PgConnection, refused: &[Refusal]) -> Result<(), sqlx::Error> {
        let Some(last) = refused.last() else {
            return Ok(());
        };
        sqlx::query(
            "UPDATE projection_partitions SET dead_letters = dead_letters + $3, last_error = $4, \
                 last_error_at = now(), updated_at = now() \
             WHERE projection = $1 AND partition = $2",
        )
        .bind(P::NAME)
        .bind(self.partition as i32)
        .bind(refused.len() as i64)
        .bind(format!("refused {} event(s); the last: {}", refused.len(), last.reason))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Records the batch's progress, on condition that this worker still holds the partition's
    /// lease and the partition has not failed: the fence. In the batch's transaction, it locks
    /// the partition's row until the commit, so the batch commits only if the lease was this
    /// worker's at its end (a worker taking the partition over waits for the commit, then
    /// sees the checkpoint).
    async fn checkpoint(
        &self,
        conn: &mut sqlx::PgConnection,
        progress: &Progress,
        outcome: &BatchOutcome,
    ) -> Result<(), BatchError> {
        let updated = sqlx::query(
            "UPDATE projection_partitions SET stream_sequence = GREATEST(stream_sequence, $4), \
                 position = GREATEST(position, $5), lag_events = $6, \
                 last_event_at = GREATEST(last_event_at, $7), applied = applied + $8, duplicates = duplicates + $9, \
                 state = 'running', last_error = CASE WHEN state = 'retrying' THEN NULL ELSE last_error END, \
                 updated_at = now() \
             WHERE projection = $1 AND partition = $2 AND worker = $3 AND lease_until > now() AND state <> 'failed'",
        )
        .bind(P::NAME)
        .bind(self.partition as i32)
        .bind(&self.shared.worker_id)
        .bind(progress.stream_sequence)
        .bind(progress.position)
        .bind(progress.lag_events)
        .bind(progress.last_event_at)
        .bind(outcome.applied as i64)
        .bind(outcome.duplicates as i64)
        .execute(&mut *conn)
        .await?;
        if updated.rows_affected() == 1 {
            return Ok(());
        }
        // Not ours to write: say why (the transaction, if any, rolls back when dropped).
        let failed: Option<bool> = sqlx::query_scalar(
            "SELECT state = 'failed' FROM projection_partitions \
             WHERE projection = $1 AND partition = $2 AND worker = $3 AND lease_until > now()",
        )
        .bind(P::NAME)
        .bind(self.partition as i32)
        .bind(&self.shared.worker_id)
        .fetch_optional(&mut *conn)
        .await?;
        Err(BatchError::Gate(match failed {
            Some(true) => Gate::Failed,
            _ => Gate::LeaseLost,
        }))
    }

    /// The event a message carries, and what it claims to be in the log.
    fn incoming(&self, payload: &[u8], sequence: u64) -> Result<(Incoming, Claim), ApplyError> {
        let bad = |reason: String| ApplyError::BadEnvelope { sequence, reason };
        let envelope: EventEnvelope = serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?;
        let recorded_at = DateTime::parse_from_rfc3339(&envelope.recorded_at)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| bad(format!("recorded_at: {e}")))?;
        let claim = Claim {
            position: envelope.position,
            stream_id: envelope.stream_id,
            version: envelope.version,
            hash: tally_event_store::relay::envelope_hash(&envelope),
        };
        let event = Incoming {
            meta: EventMeta {
                stream_id: envelope.stream_id,
                version: envelope.version,
                position: envelope.position,
                recorded_at,
                partition: self.partition as i32,
            },
            stream_type: envelope.stream_type,
            event_type: envelope.event_type,
            schema_version: envelope.schema_version,
            payload: envelope.payload.get().to_owned(),
        };
        Ok((event, claim))
    }

    fn record(&self, outcome: &BatchOutcome, events: usize, took: Duration) {
        metrics::histogram!("tally_projection_batch_size", &self.labels).record(events as f64);
        metrics::histogram!("tally_projection_apply_seconds", &self.labels).record(took.as_secs_f64());
        metrics::counter!("tally_projection_events_applied_total", &self.labels).increment(outcome.applied);
        metrics::counter!("tally_projection_duplicates_dropped_total", &self.labels).increment(outcome.duplicates);
        tracing::debug!(
            projection = P::NAME,
            partition = self.partition,
            applied = outcome.applied,
            duplicates = outcome.duplicates,
            filled = outcome.filled,
            "applied batch"
        );
    }
}

/// The live generation of `P`, or the gate that stops the unit: the projection is paused, or
/// its live generation was built by another shape of this code.
async fn live_gate<P: Projection>(conn: &mut sqlx::PgConnection) -> Result<catalog::Live, BatchError> {
    let live = catalog::live(conn, P::NAME).await?;
    if live.paused {
        return Err(BatchError::Gate(Gate::Paused));
    }
    if live.shape != P::SHAPE {
        return Err(BatchError::Gate(Gate::NeedsRebuild));
    }
    Ok(live)
}

/// Where a batch leaves its partition's checkpoint.
struct Progress {
    stream_sequence: i64,
    position: i64,
    /// Messages JetStream still had for the consumer after the batch.
    lag_events: i64,
    last_event_at: Option<DateTime<Utc>>,
}

/// Whether JetStream had more messages pending for the consumer when it delivered the last of
/// `batch` (a message without its metadata counts as "maybe": wait, as before).
fn more_pending(batch: &[jetstream::Message]) -> bool {
    batch
        .last()
        .and_then(|m| m.info().ok())
        .is_none_or(|info| info.pending > 0)
}

/// Acks are best effort: a lost ack means a redelivery, dropped as a duplicate by version.
async fn ack_all(batch: &[jetstream::Message]) {
    for message in batch {
        if let Err(error) = message.ack().await {
            tracing::warn!(%error, "ack failed; the event will be redelivered and dropped as a duplicate");
        }
    }
}

async fn nak_all(batch: &[jetstream::Message], delay: Option<Duration>) {
    for message in batch {
        let _ = message.ack_with(AckKind::Nak(delay)).await;
    }
}

/// Hands back what the pull had delivered and no batch took (a nak without delay), so the
/// unit's next owner gets it at once instead of after [`ACK_WAIT`]. Best effort, for at most
/// [`GIVE_BACK_MAX`]: a message missed here is redelivered after [`ACK_WAIT`], and meanwhile the
/// next owner fills the version gap from the log.
async fn give_back(messages: &mut pull::Stream) {
    let deadline = tokio::time::Instant::now() + GIVE_BACK_MAX;
    let mut returned = 0usize;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, messages.next()).await {
        let _ = message.ack_with(AckKind::Nak(None)).await;
        returned += 1;
    }
    if returned > 0 {
        tracing::debug!(returned, "pulled messages handed back on stop");
    }
}

/// Sleeps for `duration` unless `stop` turns true first; returns whether to stop.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, duration: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = stop.changed() => true,
        _ = tokio::time::sleep(duration) => *stop.borrow(),
    }
}

/// A NATS header value: one line, bounded.
fn header_value(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(1_000).collect()
}
