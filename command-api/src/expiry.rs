//! The expiry worker: releases the holds of pending transfers and pending journal entries past
//! their deadline.
//!
//! Every command-api instance runs one. It finds due transfers and entries in the log and
//! submits an expiry command for each through the writer, like any client command. Two workers (two
//! instances) racing on one transfer are safe: the second one's command finds the transfer no
//! longer pending (or loses the version race and then finds that), so a hold is released
//! exactly once.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use tally_domain::{AccountError, Metadata};
use tally_event_store::EventStore;
use tally_event_store::idempotency::StoredResponse;
use uuid::Uuid;

use crate::command::{Command, EntryAction};
use crate::execute::CommandError;
use crate::writer::Writer;

/// Most transfers expired per sweep; the next sweep takes the rest.
pub const SWEEP_MAX: i64 = 500;
/// The actor recorded in the metadata of expiry events.
pub const ACTOR: &str = "system:expiry-worker";

/// Sweeps every `interval` until the process stops.
pub async fn run(store: EventStore, writer: Writer, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match sweep(&store, &writer).await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "expired pending transfers and entries"),
            Err(error) => tracing::warn!(%error, "expiry sweep failed; will retry"),
        }
    }
}

/// Expires the pending transfers and entries due now; returns how many this sweep expired.
pub async fn sweep(store: &EventStore, writer: &Writer) -> Result<usize, sqlx::Error> {
    let transfers = due_transfers(store, SWEEP_MAX).await?;
    let entries = due_entries(store, SWEEP_MAX).await?;
    let commands = transfers
        .into_iter()
        .map(|(transfer_id, from)| (transfer_id, Command::Expire { transfer_id, from }))
        .chain(entries.into_iter().map(|(entry_id, accounts)| {
            (
                entry_id,
                Command::FinishEntry {
                    entry_id,
                    accounts,
                    action: EntryAction::Expire,
                },
            )
        }));
    let expiries = commands.map(|(id, command)| async move {
        let metadata = Metadata {
            actor: Some(ACTOR.to_owned()),
            correlation_id: id,
            causation_id: Uuid::now_v7(),
            idempotency_key: None,
            traceparent: None,
        };
        let ignore = |_: &crate::execute::Executed| StoredResponse {
            status: 201,
            body: serde_json::Value::Null,
        };
        match writer.execute(command, &metadata, None, ignore).await {
            Ok(_) => true,
            // Another worker got there first, or the clock here is a little behind the text
            // comparison: nothing to do.
            Err(CommandError::Rejected(
                AccountError::TransferNotPending { .. }
                | AccountError::EntryNotPending { .. }
                | AccountError::HoldNotExpired { .. },
            )) => false,
            Err(error) => {
                tracing::warn!(%id, %error, "expiring a transfer or an entry failed; next sweep retries");
                false
            }
        }
    });
    let results = futures::future::join_all(expiries).await;
    Ok(results.into_iter().filter(|expired| *expired).count())
}

/// Pending entries (id, the legs' accounts in leg order) whose deadline has passed (index of
/// migration 0007).
async fn due_entries(store: &EventStore, limit: i64) -> Result<Vec<(Uuid, Vec<Uuid>)>, sqlx::Error> {
    due(
        store,
        "EntryPending",
        "ARRAY(SELECT (l.leg ->> 'account')::uuid \
               FROM json_array_elements(e.payload -> 'legs') WITH ORDINALITY AS l(leg, n) ORDER BY l.n)",
        limit,
    )
    .await
}

/// Pending transfers (id, source account) whose deadline has passed (index of migration 0004).
async fn due_transfers(store: &EventStore, limit: i64) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
    due(store, "TransferPending", "(e.payload ->> 'from')::uuid", limit).await
}

/// The streams whose last event is still their `pending_type` event and whose `expires_at` has
/// passed, earliest first: each stream's id and `parties`, an expression over that event `e`.
/// Both arguments are constants of this module, never input.
async fn due<T>(
    store: &EventStore,
    pending_type: &str,
    parties: &str,
    limit: i64,
) -> Result<Vec<(Uuid, T)>, sqlx::Error>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let sql = format!(
        "SELECT e.stream_id, {parties} \
         FROM events e \
         WHERE e.event_type = '{pending_type}' AND e.payload ->> 'expires_at' <= $1 \
           AND NOT EXISTS (SELECT 1 FROM events f WHERE f.stream_id = e.stream_id AND f.version > e.version) \
         ORDER BY e.payload ->> 'expires_at' \
         LIMIT $2"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(limit)
        .fetch_all(store.pool())
        .await
}
