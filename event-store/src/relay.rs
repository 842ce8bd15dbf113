//! The relay: publishes the committed log to NATS JetStream. The log is the outbox.
//!
//! One relay is active per database, elected with a session-level advisory lock; others stand
//! by and take over when its session ends. The active relay reads the log gap-safely in commit
//! order (woken by the writers' commit notifications, see [`crate::notify`], and polling with
//! a back-off besides), publishes each event with `Nats-Msg-Id` = event id, keeps a bounded window of
//! publish acks in flight, and only after every ack of a batch stores its checkpoint. A crash
//! anywhere re-publishes from the last checkpoint: JetStream drops duplicates inside its
//! window, projectors drop the rest by stream version. Nothing is ever skipped.
//!
//! Observed through [`RelayStatus`] (is this instance the active one: the binary's `/ready`)
//! and the metrics `tally_relay_leader`, `tally_relay_published_events_total`,
//! `tally_relay_batch_events`, `tally_relay_batch_duration_seconds`, `tally_relay_errors_total`
//! and, sampled every [`LAG_SAMPLE_INTERVAL`] from the database by every instance,
//! `tally_relay_lag_events` / `tally_relay_lag_seconds`. Each batch is published in a span
//! `relay.batch` that joins the traces of its events (`crate::trace`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage as Publish};
use futures::stream::{FuturesOrdered, StreamExt};
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Connection, PgConnection};
use tally_schemas::envelope::{ENVELOPE_VERSION, EventEnvelope};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::hash::{Hash, HashInput, event_hash, format_recorded_at};
use crate::partition::Topology;
use crate::{Checkpoint, EventStore, StoredEvent};

/// Advisory lock key electing the active relay ("tallyrly" in ASCII).
pub const RELAY_LOCK_KEY: i64 = 0x7461_6c6c_7972_6c79;
/// How often the relay's lag behind the log is measured.
pub const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// The most unpublished events the lag sample counts (`tally_relay_lag_events` saturates
/// there), so measuring a large backlog stays cheap.
pub const LAG_EVENTS_COUNT_MAX: i64 = 100_000;

/// What the relay's HTTP probes report about this instance.
#[derive(Debug, Default)]
pub struct RelayStatus {
    leader: AtomicBool,
}

impl RelayStatus {
    /// Whether this instance holds the lock and publishes.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
        metrics::gauge!("tally_relay_leader").set(if leader { 1.0 } else { 0.0 });
    }
}

/// Which relay publishes, as seen from one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// This instance holds the lock.
    Leader,
    /// Another session of this database holds it.
    Standby,
    /// Nobody holds it (an election is under way, or every relay is down).
    None,
}

/// Who holds the relay lock of `pool`'s database. Always asks Postgres, so an error also
/// means Postgres is unreachable from here, the leader included.
pub async fn leadership(pool: &PgPool, status: &RelayStatus) -> Result<Leadership, sqlx::Error> {
    // A bigint advisory lock shows in pg_locks as its high and low 32 bits; the lock is per
    // database, and pg_locks shows the whole cluster's.
    let held: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1)",
    )
    .bind(RELAY_LOCK_KEY >> 32)
    .bind(RELAY_LOCK_KEY & 0xffff_ffff)
    .fetch_one(pool)
    .await?;
    Ok(if status.is_leader() {
        Leadership::Leader
    } else if held {
        Leadership::Standby
    } else {
        Leadership::None
    })
}

/// How far behind the log relay `name` is: events committed but not yet published (at most
/// [`LAG_EVENTS_COUNT_MAX`]) and the age in seconds of the oldest of them (0 when none).
pub async fn lag(pool: &PgPool, name: &str) -> Result<(i64, f64), sqlx::Error> {
    let at = load_checkpoint(pool, name).await?;
    // The relay's own read order (`EventStore::read_all`), so what it already published is
    // never counted, however positions interleaved at commit.
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(recorded_at))::float8, 0) \
         FROM (SELECT recorded_at FROM events \
               WHERE (tx_id, position) > ($1::text::xid8, $2) \
                 AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
               ORDER BY tx_id, position LIMIT $3) AS behind",
    )
    // Planned at each call, as `EventStore::read_all` is: never a plan cached on a small log.
    .persistent(false)
    .bind(at.tx_id.to_string())
    .bind(at.position)
    .bind(LAG_EVENTS_COUNT_MAX)
    .fetch_one(pool)
    .await
}

/// Sets the lag gauges every [`LAG_SAMPLE_INTERVAL`], forever.
async fn sample_lag(pool: PgPool, name: String) {
    let mut tick = tokio::time::interval(LAG_SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match lag(&pool, &name).await {
            Ok((events, seconds)) => {
                metrics::gauge!("tally_relay_lag_events").set(events as f64);
                metrics::gauge!("tally_relay_lag_seconds").set(seconds.max(0.0));
            }
            Err(error) => tracing::debug!(%error, "cannot measure the relay lag"),
        }
    }
}

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

/// The hash a received envelope states, when its own fields hash to it; otherwise why not.
///
/// Anyone can compute an unkeyed hash, so this alone proves nothing about where the envelope
/// came from: what makes it an event of the log is that the log holds this same hash at its
/// position (the projectors check both before they apply an event).
pub fn envelope_hash(envelope: &EventEnvelope) -> Result<Hash, String> {
    let decode = |hex_text: &str, field: &str| -> Result<Hash, String> {
        let bytes = hex::decode(hex_text).map_err(|e| format!("{field} is not hex: {e}"))?;
        Hash::try_from(bytes.as_slice()).map_err(|_| format!("{field} is not 32 bytes"))
    };
    let stated = decode(&envelope.hash, "hash")?;
    let prev_hash = envelope
        .prev_hash
        .as_deref()
        .map(|h| decode(h, "prev_hash"))
        .transpose()?;
    let recorded_at = chrono::DateTime::parse_from_rfc3339(&envelope.recorded_at)
        .map_err(|e| format!("recorded_at: {e}"))?
        .with_timezone(&chrono::Utc);
    let computed = event_hash(&HashInput {
        prev_hash: prev_hash.as_ref().map(|h| h.as_slice()),
        stream_type: &envelope.stream_type,
        stream_id: envelope.stream_id,
        version: envelope.version,
        event_id: envelope.event_id,
        event_type: &envelope.event_type,
        schema_version: i32::try_from(envelope.schema_version).map_err(|_| "schema_version out of range".to_owned())?,
        recorded_at,
        payload: envelope.payload.get(),
        metadata: envelope.metadata.get(),
    });
    if computed == stated {
        Ok(stated)
    } else {
        Err(format!(
            "its fields hash to {}, not to the hash it states ({})",
            hex::encode(computed),
            envelope.hash
        ))
    }
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

/// Runs the relay until `shutdown` resolves. Every failure (Postgres or NATS down, lock lost)
/// is logged and retried, because a relay that exits stops the flow. `status` tells the probes
/// whether this instance is the active one.
///
/// On shutdown the active relay finishes the batch in hand (publish, acks, checkpoint), then
/// unlocks and closes its lock session, so a standby takes over at its next try
/// ([`RelayConfig::standby_retry`]) and re-publishes nothing. A standby just leaves. When that
/// takes longer than `drain`, the work is dropped: the lock goes with the process's session and
/// the next relay re-publishes from the last checkpoint (duplicates are dropped downstream).
pub async fn run(
    pool: PgPool,
    js: jetstream::Context,
    config: RelayConfig,
    status: &RelayStatus,
    drain: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop) = watch::channel(false);
    let signal = async {
        shutdown.await;
        let _ = stop_tx.send(true);
        tokio::time::sleep(drain).await;
        tracing::warn!(?drain, "the relay did not stop in time; dropping the batch in hand");
    };
    tokio::select! {
        () = relay(&pool, &js, &config, status, stop) => tracing::info!("relay stopped"),
        () = signal => {}
    }
    status.set_leader(false);
}

/// Leads or stands by, again and again, until `stop` turns true.
async fn relay(
    pool: &PgPool,
    js: &jetstream::Context,
    config: &RelayConfig,
    status: &RelayStatus,
    mut stop: watch::Receiver<bool>,
) {
    let mut published_batches = 0;
    status.set_leader(false);
    let sampler = tokio::spawn(sample_lag(pool.clone(), config.name.clone()));
    let _sampler = AbortOnDrop(sampler);
    loop {
        let result = lead(pool, js, config, status, &mut published_batches, &mut stop).await;
        status.set_leader(false);
        if let Err(error) = result {
            metrics::counter!("tally_relay_errors_total").increment(1);
            tracing::warn!(%error, "relay interrupted; retrying");
        }
        if sleep_or_stop(&mut stop, config.standby_retry).await {
            return;
        }
    }
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sleeps for `duration` unless `stop` turns true first; returns whether to stop.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, duration: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = stop.changed() => true,
        () = tokio::time::sleep(duration) => *stop.borrow(),
    }
}

/// Waits to become the active relay, then relays until an error or until `stop` turns true
/// (then returns `Ok` after the batch in hand, with the lock released). `published_batches`
/// counts the batches published by this process (for
/// [`RelayConfig::crash_after_publish_batches`]).
async fn lead(
    pool: &PgPool,
    js: &jetstream::Context,
    config: &RelayConfig,
    status: &RelayStatus,
    published_batches: &mut u32,
    stop: &mut watch::Receiver<bool>,
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
        if sleep_or_stop(stop, config.standby_retry).await {
            lock_conn.close().await?;
            return Ok(());
        }
    }
    status.set_leader(true);
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
        if *stop.borrow() {
            break;
        }
        let events = store.read_all(checkpoint, config.batch_events_max).await?;
        if let Some(last) = events.last() {
            let started = Instant::now();
            let traces: Vec<Trace> = events.iter().map(|e| Trace::of(&e.metadata)).collect();
            let span = tracing::info_span!("relay.batch", events = events.len());
            crate::trace::join_batch(
                &span,
                traces
                    .iter()
                    .filter_map(|t| t.traceparent.as_deref())
                    .filter_map(crate::trace::from_traceparent),
            );
            publish_batch(js, &config.topology, &events, &traces, config)
                .instrument(span)
                .await?;
            metrics::counter!("tally_relay_published_events_total").increment(events.len() as u64);
            metrics::histogram!("tally_relay_batch_events").record(events.len() as f64);
            metrics::histogram!("tally_relay_batch_duration_seconds").record(started.elapsed().as_secs_f64());
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
        } else {
            tokio::select! {
                woken = wake.wait(idle) => {
                    idle = if woken {
                        config.poll_interval_min
                    } else {
                        (idle * 2).min(config.poll_interval_max)
                    };
                }
                // Stopping (or the sender gone): hand the lock over below.
                _ = stop.changed() => break,
            }
        }
        // A dead lock session means another relay may be active: stop and re-elect.
        if last_lock_check.elapsed() >= config.standby_retry {
            lock_conn.ping().await?;
            last_lock_check = tokio::time::Instant::now();
        }
    }
    // Every batch read is published and checkpointed: hand the lock over.
    let _: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
        .bind(RELAY_LOCK_KEY)
        .fetch_one(&mut lock_conn)
        .await?;
    lock_conn.close().await?;
    tracing::info!(position = checkpoint.position, "checkpoint stored, lock released");
    Ok(())
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
/// JetStream has acknowledged every one of them. `traces` are the events' trace metadata.
async fn publish_batch(
    js: &jetstream::Context,
    topology: &Topology,
    events: &[StoredEvent],
    traces: &[Trace],
    config: &RelayConfig,
) -> anyhow::Result<()> {
    let mut in_flight = FuturesOrdered::new();
    for (event, trace) in events.iter().zip(traces) {
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
        let message = trace.headers(message);
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

/// The correlation id and trace context of an event's stored metadata.
#[derive(Debug, Default, serde::Deserialize)]
struct Trace {
    correlation_id: Option<String>,
    traceparent: Option<String>,
}

impl Trace {
    /// Read from metadata JSON; none when it does not parse.
    fn of(metadata: &str) -> Self {
        serde_json::from_str(metadata).unwrap_or_default()
    }

    /// Copies them into headers, so consumers can trace without parsing the body.
    fn headers(&self, message: Publish) -> Publish {
        let mut message = message;
        if let Some(id) = &self.correlation_id {
            message = message.header("Tally-Correlation-Id", id.as_str());
        }
        if let Some(tp) = &self.traceparent {
            message = message.header("traceparent", tp.as_str());
        }
        message
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    use super::*;

    fn stored(payload: &str) -> StoredEvent {
        let recorded_at: DateTime<Utc> = DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap();
        let prev_hash = [7u8; 32];
        let (stream_id, event_id) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let hash = event_hash(&HashInput {
            prev_hash: Some(&prev_hash),
            stream_type: "account",
            stream_id,
            version: 2,
            event_id,
            event_type: "FundsDeposited",
            schema_version: 1,
            recorded_at,
            payload,
            metadata: "{}",
        });
        StoredEvent {
            position: 10,
            tx_id: 5,
            stream_type: "account".into(),
            stream_id,
            version: 2,
            event_id,
            event_type: "FundsDeposited".into(),
            schema_version: 1,
            payload: payload.into(),
            metadata: "{}".into(),
            recorded_at,
            prev_hash: Some(prev_hash.to_vec()),
            hash: hash.to_vec(),
        }
    }

    #[test]
    fn a_published_envelope_hashes_to_the_hash_it_states() {
        let event = stored(r#"{"amount":5,"currency":"EUR"}"#);
        let envelope = envelope(&event).unwrap();
        assert_eq!(envelope_hash(&envelope).unwrap().to_vec(), event.hash);
    }

    #[test]
    fn an_envelope_with_a_changed_field_does_not() {
        let mut forged = envelope(&stored(r#"{"amount":5,"currency":"EUR"}"#)).unwrap();
        forged.payload =
            serde_json::value::RawValue::from_string(r#"{"amount":5000,"currency":"EUR"}"#.into()).unwrap();
        assert!(
            envelope_hash(&forged)
                .unwrap_err()
                .contains("not to the hash it states")
        );
        let mut renumbered = envelope(&stored("{}")).unwrap();
        renumbered.version = 3;
        assert!(envelope_hash(&renumbered).is_err());
        renumbered.hash = "zz".into();
        assert!(envelope_hash(&renumbered).unwrap_err().contains("not hex"));
    }
}
