//! Commit notifications: `NOTIFY tally_log` after events are committed, so the relay reads
//! them at once instead of at its next poll (it backs off to `poll_interval_max` when idle).
//!
//! A hint, never the only signal (sqlx's `PgListener` drops notifications while it
//! reconnects): the relay keeps polling, only less often. The `NOTIFY` is sent after the
//! commit, from its own autocommit statement, not inside the appending transaction: a
//! transaction that notifies holds a database-wide lock through its commit (Postgres keeps the
//! notification queue in commit order), which would serialize the command API's concurrent
//! group-commit lanes, fsync and all.
//!
//! At most one notification is sent per [`NOTIFY_INTERVAL`]: the first commit after a quiet
//! spell is notified at once, and commits within the interval after a notification are folded
//! into one sent when it ends. A notification is a statement of its own for Postgres: one per
//! commit was about a fifth of Postgres's CPU per command at one connection (BENCHMARKS.md,
//! 2026-12-07T19:26Z), while a relay already woken reads every commit since anyway.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;

/// The channel the writers notify and the relay listens on.
pub const LOG_CHANNEL: &str = "tally_log";

/// Least time between two notifications. A commit's wake-up of the relay is late by at most
/// this plus the previous notification's round trip, far below the relay's own idle back-off
/// (up to 50 ms).
pub const NOTIFY_INTERVAL: Duration = Duration::from_millis(2);

/// Sends [`LOG_CHANNEL`] notifications from a background task; cheap to clone and to poke.
#[derive(Debug, Clone)]
pub struct CommitNotifier {
    poke: Arc<Notify>,
}

impl CommitNotifier {
    /// Starts the task that notifies through `pool` (it runs as long as the runtime does).
    pub fn spawn(pool: PgPool) -> Self {
        let poke = Arc::new(Notify::new());
        let waiting = poke.clone();
        tokio::spawn(async move {
            loop {
                // A permit stored by any number of pokes wakes this once.
                waiting.notified().await;
                if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
                    .bind(LOG_CHANNEL)
                    .execute(&pool)
                    .await
                {
                    // The relay polls anyway; only its wake-up is late.
                    tracing::debug!(%error, "commit notification not sent");
                }
                // Pokes meanwhile store one permit: one notification when this ends.
                tokio::time::sleep(NOTIFY_INTERVAL).await;
            }
        });
        Self { poke }
    }

    /// Events were committed: notify now, or at the end of the current interval.
    pub fn committed(&self) {
        self.poke.notify_one();
    }
}
