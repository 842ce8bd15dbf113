//! The expiry worker: releases the holds of pending transfers past their deadline.
//!
//! Every command-api instance runs one. It finds due transfers in the log and submits an
//! `Expire` command for each through the writer, like any client command. Two workers (two
//! instances) racing on one transfer are safe: the second one's command finds the transfer no
//! longer pending (or loses the version race and then finds that), so a hold is released
//! exactly once.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use tally_domain::{AccountError, Metadata};
use tally_event_store::EventStore;
use tally_event_store::idempotency::StoredResponse;
use uuid::Uuid;

use crate::command::Command;
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
            Ok(expired) => tracing::info!(expired, "expired pending transfers"),
            Err(error) => tracing::warn!(%error, "expiry sweep failed; will retry"),
        }
    }
}

/// Expires the pending transfers due now; returns how many this sweep expired.
pub async fn sweep(store: &EventStore, writer: &Writer) -> Result<usize, sqlx::Error> {
    let due = due_transfers(store, SWEEP_MAX).await?;
    let expiries = due.into_iter().map(|(transfer_id, from)| async move {
        let metadata = Metadata {
            actor: Some(ACTOR.to_owned()),
            correlation_id: transfer_id,
            causation_id: Uuid::now_v7(),
            idempotency_key: None,
            traceparent: None,
        };
        let command = Command::Expire { transfer_id, from };
        let ignore = |_: &crate::execute::Executed| StoredResponse {
            status: 201,
            body: serde_json::Value::Null,
        };
        match writer.execute(command, &metadata, None, ignore).await {
            Ok(_) => true,
            // Another worker got there first, or the clock here is a little behind the text
            // comparison: nothing to do.
            Err(CommandError::Rejected(
                AccountError::TransferNotPending { .. } | AccountError::HoldNotExpired { .. },
            )) => false,
            Err(error) => {
                tracing::warn!(%transfer_id, %error, "expiring a transfer failed; next sweep retries");
                false
            }
        }
    });
    let results = futures::future::join_all(expiries).await;
    Ok(results.into_iter().filter(|expired| *expired).count())
}

/// Pending transfers (id, source account) whose deadline has passed: the transfer stream's
/// last event is still its `TransferPending`.
async fn due_transfers(store: &EventStore, limit: i64) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    sqlx::query_as(
        "SELECT e.stream_id, (e.payload ->> 'from')::uuid \
         FROM events e \
         WHERE e.event_type = 'TransferPending' AND e.payload ->> 'expires_at' <= $1 \
           AND NOT EXISTS (SELECT 1 FROM events f WHERE f.stream_id = e.stream_id AND f.version > e.version) \
         ORDER BY e.payload ->> 'expires_at' \
         LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(store.pool())
    .await
}
