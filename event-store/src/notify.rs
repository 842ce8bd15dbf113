//! Commit notifications: `NOTIFY tally_log` after events are committed, so the relay reads
//! them at once instead of at its next poll (it backs off to `poll_interval_max` when idle).
//!
//! A hint, never the only signal (sqlx's `PgListener` drops notifications while it
//! reconnects): the relay keeps polling, only less often. The `NOTIFY` is sent after the
//! commit, from its own autocommit statement, not inside the appending transaction: a
//! transaction that notifies holds a database-wide lock through its commit (Postgres keeps the
//! notification queue in commit order), which would serialize the command API's concurrent
//! group-commit lanes, fsync and all. At most one notification is on its way at a time;
//! commits meanwhile are folded into the next one.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;

/// The channel the writers notify and the relay listens on.
pub const LOG_CHANNEL: &str = "tally_log";

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
            }
        });
        Self { poke }
    }

    /// Events were committed: notify (now, or after the notification on its way).
    pub fn committed(&self) {
        self.poke.notify_one();
    }
}
