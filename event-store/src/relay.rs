//! The relay: publishes the committed log to NATS JetStream. The log is the outbox.
//!
//! One relay is active per database, elected with a session-level advisory lock; others stand
//! by and take over when its session ends. The active relay reads the log gap-safely in commit
//! order (woken by the writers' commit notifications, see [`crate::notify`], and polling with
//! a back-off besides), publishes each event with `Nats-Msg-Id` = event id, keeps a bounded window of
//! publish acks in flight, and only after every ack of a batch stores its checkpoint. A crash
//! anywhere re-publishes from the last checkpoint: JetStream drops duplicates inside its
//! window, projectors drop the rest by stream version. Nothing is ever skipped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage as Publish};
use futures::stream::{FuturesOrdered, StreamExt};
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Connection, PgConnection};
use tally_schemas::envelope::{ENVELOPE_VERSION, EventEnvelope};
use tokio::sync::Notify;

use crate::partition::Topology;
use crate::{Checkpoint, EventStore, StoredEvent, hash::format_recorded_at};

/// Advisory lock key electing the active relay ("tallyrly" in ASCII).
pub const RELAY_LOCK_KEY: i64 = 0x7461_6c6c_7972_6c79;

/// How long the relay waits before listening again for commit notifications after losing them.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Tuning of the relay; every value bounded.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Checkpoint name: one per relay target.
    pub name: String,
    pub topology: Topology,
    /// Events read from Postgres per batch.
    pub batch_events_max: i64,
    /// Publishes awaiting their JetStream ack at once.
    pub in_flight_max: usize,
    /// Idle polling backs off from `poll_interval_min` to `poll_interval_max`.
    pub poll_interval_min: Duration,
    pub poll_interval_max: Duration,
    /// How often a standby tries to take the lock.
    pub standby_retry: Duration,
    /// How long to wait for one publish ack before the batch is retried.
    pub ack_timeout: Duration,
    /// **Test-only fault injection.** Abort the process (`std::process::abort`, no unwinding,
    /// no clean-up) right after the Nth batch's publishes were acknowledged by JetStream and
    /// before its checkpoint is stored: the narrowest crash window, which must re-publish.
    /// Counts batches since the process started. `None` (the default) in production.
    pub crash_after_publish_batches: Option<u32>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            name: "nats".into(),
            topology: Topology::default(),
            batch_events_max: 2_000,
            in_flight_max: 1_024,
            poll_interval_min: Duration::from_millis(2),
            poll_interval_max: Duration::from_millis(50),
            standby_retry: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(10),
            crash_after_publish_batches: None,
        }
    }
}

/// Builds the published message body of a stored event.
pub fn envelope(event: &StoredEvent) -> Result<EventEnvelope, serde_json::Error> {
    Ok(EventEnvelope {
        position: event.position,
        tx_id: event.tx_id,
        stream_type: event.stream_type.clone(),
        stream_id: event.stream_id,
        version: event.version,
        event_id: event.event_id,
        event_type: event.event_type.clone(),
        schema_version: u32::try_from(event.schema_version).unwrap_or(0),
        recorded_at: format_recorded_at(event.recorded_at),
        payload: serde_json::value::RawValue::from_string(event.payload.clone())?,
        metadata: serde_json::value::RawValue::from_string(event.metadata.clone())?,
        prev_hash: event.prev_hash.as_ref().map(hex::encode),
        hash: hex::encode(&event.hash),
    })
}

/// Reads the stored checkpoint of relay `name` (the log's start if none).
pub async fn load_checkpoint(pool: &PgPool, name: &str) -> Result<Checkpoint, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as("SELECT tx_id, position FROM relay_checkpoints WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await?;
    Ok(row
        .map(|(tx_id, position)| Checkpoint { tx_id, position })
        .unwrap_or_default())
}

/// Stores the checkpoint on the relay's own session, whose commits do not wait for the WAL
/// flush (see `lead`).
async fn store_checkpoint(conn: &mut PgConnection, name: &str, at: Checkpoint) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO relay_checkpoints (name, tx_id, position) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, updated_at = now()",
    )
    .bind(name)
    .bind(at.tx_id)
    .bind(at.position)
    .execute(conn)
    .await?;
    Ok(())
}

/// Runs the relay until `shutdown` resolves. Returns only on shutdown; every failure (Postgres
/// or NATS down, lock lost) is logged and retried, because a relay that exits stops the flow.
pub async fn run(pool: PgPool, js: jetstream::Context, config: RelayConfig, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut published_batches = 0;
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            result = lead(&pool, &js, &config, &mut published_batches) => {
                if let Err(error) = result {
                    tracing::warn!(%error, "relay interrupted; retrying");
                }
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(config.standby_retry) => {}
        }
    }
}

/// Waits to become the active relay, then relays until an error. `published_batches` counts
/// the batches published by this process (for [`RelayConfig::crash_after_publish_batches`]).
async fn lead(
    pool: &PgPool,
    js: &jetstream::Context,
    config: &RelayConfig,
    published_batches: &mut u32,
) -> anyhow::Result<()> {
    // The lock lives as long as this dedicated session: if the process dies, Postgres ends
    // the session and a standby acquires the lock.
    let mut lock_conn: PgConnection = pool.acquire().await?.detach();
    let mut announced = false;
    loop {
        let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(RELAY_LOCK_KEY)
            .fetch_one(&mut lock_conn)
            .await?;
        if acquired {
            break;
        }
        if !announced {
            tracing::info!("another relay is active; standing by");
            announced = true;
        }
        tokio::time::sleep(config.standby_retry).await;
    }
    // The checkpoint is written on this session, with commits that do not wait for their WAL
    // flush: a checkpoint lost in a Postgres crash only makes the relay re-publish from an
    // older one (JetStream drops the duplicates in its window, projectors by version), and a
    // flush per batch on the relay's critical path is a few milliseconds of lag per event.
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut lock_conn)
        .await?;
    tracing::info!(stream = %config.topology.stream_name, "relay is active");
    config.topology.ensure_stream(js).await?;

    let wake = Wake::listen(pool);
    let store = EventStore::new(pool.clone());
    let mut checkpoint = load_checkpoint(pool, &config.name).await?;
    let mut idle = config.poll_interval_min;
    let mut last_lock_check = tokio::time::Instant::now();
    loop {
        let events = store.read_all(checkpoint, config.batch_events_max).await?;
        if let Some(last) = events.last() {
            publish_batch(js, &config.topology, &events, config).await?;
            *published_batches += 1;
            if config.crash_after_publish_batches == Some(*published_batches) {
                tracing::error!(
                    batches = *published_batches,
                    "fault injection: aborting after publish, before the checkpoint"
                );
                std::process::abort();
            }
            // Only now is every event of the batch durably in JetStream.
            store_checkpoint(&mut lock_conn, &config.name, last.checkpoint()).await?;
            checkpoint = last.checkpoint();
            tracing::debug!(events = events.len(), position = checkpoint.position, "relayed batch");
            idle = config.poll_interval_min;
        } else if wake.wait(idle).await {
            idle = config.poll_interval_min;
        } else {
            idle = (idle * 2).min(config.poll_interval_max);
        }
        // A dead lock session means another relay may be active: stop and re-elect.
        if last_lock_check.elapsed() >= config.standby_retry {
            lock_conn.ping().await?;
            last_lock_check = tokio::time::Instant::now();
        }
    }
}

/// Wakes the relay on the writers' commit notifications ([`crate::notify`]); the listening
/// task stops when this is dropped.
struct Wake {
    notified: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Wake {
    /// Listens through a connection of `pool` of its own (re-connecting after a loss, as
    /// `PgListener` does); each notification stores one wake-up, many fold into one.
    fn listen(pool: &PgPool) -> Self {
        let notified = Arc::new(Notify::new());
        let wake = notified.clone();
        let pool = pool.clone();
        let task = tokio::spawn(async move {
            loop {
                let error = match PgListener::connect_with(&pool).await {
                    Ok(mut listener) => match listener.listen(crate::notify::LOG_CHANNEL).await {
                        Ok(()) => loop {
                            match listener.recv().await {
                                Ok(_) => wake.notify_one(),
                                Err(error) => break error,
                            }
                        },
                        Err(error) => error,
                    },
                    Err(error) => error,
                };
                tracing::warn!(%error, "commit notifications lost; polling until they are back");
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        });
        Self { notified, task }
    }

    /// Waits up to `idle` for a notification; returns whether one came.
    async fn wait(&self, idle: Duration) -> bool {
        tokio::time::timeout(idle, self.notified.notified()).await.is_ok()
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes `events` in order with at most `in_flight_max` acks outstanding, and returns once
/// JetStream has acknowledged every one of them.
async fn publish_batch(
    js: &jetstream::Context,
    topology: &Topology,
    events: &[StoredEvent],
    config: &RelayConfig,
) -> anyhow::Result<()> {
    let mut in_flight = FuturesOrdered::new();
    for event in events {
        if in_flight.len() >= config.in_flight_max {
            await_ack(&mut in_flight, config.ack_timeout).await?;
        }
        let body = serde_json::to_vec(&envelope(event)?)?;
        let message = Publish::build()
            .payload(body.into())
            .message_id(event.event_id.to_string())
            .header("Tally-Envelope-Version", ENVELOPE_VERSION.to_string().as_str())
            .header("Tally-Event-Id", event.event_id.to_string().as_str())
            .header("Tally-Event-Type", event.event_type.as_str())
            .header("Tally-Schema-Version", event.schema_version.to_string().as_str())
            .header("Tally-Stream-Type", event.stream_type.as_str())
            .header("Tally-Stream-Id", event.stream_id.to_string().as_str())
            .header("Tally-Stream-Version", event.version.to_string().as_str())
            .header("Tally-Position", event.position.to_string().as_str());
        let message = with_metadata_headers(message, &event.metadata);
        let subject = topology.subject(event.stream_id, &event.stream_type);
        let ack = js.send_publish(subject, message).await?;
        in_flight.push_back(ack.into_future());
    }
    while !in_flight.is_empty() {
        await_ack(&mut in_flight, config.ack_timeout).await?;
    }
    Ok(())
}

async fn await_ack<F, T, E>(in_flight: &mut FuturesOrdered<F>, timeout: Duration) -> anyhow::Result<()>
where
    F: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(timeout, in_flight.next()).await {
        Ok(Some(Ok(_))) | Ok(None) => Ok(()),
        Ok(Some(Err(e))) => anyhow::bail!("publish not acknowledged: {e}"),
        Err(_) => anyhow::bail!("publish ack timed out after {timeout:?}"),
    }
}

/// Copies the correlation id and trace context from the stored metadata into headers, so
/// consumers can trace without parsing the body.
fn with_metadata_headers(message: Publish, metadata: &str) -> Publish {
    #[derive(serde::Deserialize)]
    struct Trace {
        correlation_id: Option<String>,
        traceparent: Option<String>,
    }
    let Ok(trace) = serde_json::from_str::<Trace>(metadata) else {
        return message;
    };
    let mut message = message;
    if let Some(id) = trace.correlation_id {
        message = message.header("Tally-Correlation-Id", id.as_str());
    }
    if let Some(tp) = trace.traceparent {
        message = message.header("traceparent", tp.as_str());
    }
    message
}
