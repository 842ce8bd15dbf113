//! The periodic sealer: [`crate::seal::seal_into_history`] every `every`, for as long as the
//! process runs (`tally audit seal --every 5m`).
//!
//! What it guarantees:
//! - **Every committed event is under a signed checkpoint within about `every`** (plus the
//!   time its transaction's older neighbours take to commit: sealing is gap-safe), for as long
//!   as the database answers. Events appended after the last checkpoint are covered by the hash
//!   chains alone, so the interval is the window a table owner has to rewrite history unseen.
//! - **Writers never wait for it.** A round takes no lock and writes nothing to `events`; it
//!   reads the leaves committed since the last round (three columns each) and appends one line
//!   to the history file.
//! - **It does not stop on its own.** A failed round (the database down or restarting, a
//!   statement timeout, a history file it cannot write) is logged, counted and retried with a
//!   doubling back-off from [`BACKOFF_MIN`] up to `every` (at most [`BACKOFF_MAX`]); a panic is
//!   never how it fails. A round cut off by a shutdown or a crash leaves the history whole (see
//!   `seal_into_history`), and the next round extends it.
//! - **It stops cleanly**: on shutdown it finishes the round in hand (bounded by
//!   [`SHUTDOWN_DRAIN`]) and returns.
//!
//! Observed through `tally_sealer_seals_total{result="sealed"|"unchanged"}`,
//! `tally_sealer_failures_total`, `tally_sealer_tree_size` (of the history's last checkpoint)
//! and `tally_sealer_last_success_timestamp_seconds`; [`SealerStatus`] is what its `/ready`
//! reports. One sealer per history file: two would append to the same file.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use sqlx::PgPool;
use tokio::time::Instant;

use crate::seal::{self, Round};

/// The first wait after a failed round.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait after failed rounds (shorter when `every` is).
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// On shutdown, the longest wait for the round in hand. A round cut off is harmless (the
/// history stays whole); this only bounds how long a stop may take.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// What the sealer does.
#[derive(Debug, Clone)]
pub struct SealerConfig {
    /// Time from the start of one round to the start of the next.
    pub every: Duration,
    /// The history file (JSON Lines) the sealer extends.
    pub history: PathBuf,
    /// Copy each checkpoint into `audit_checkpoints` (the query API's proofs read it).
    pub publish: bool,
}

/// The sealer's last round, for its `/ready` and for tests.
#[derive(Debug, Default)]
pub struct SealerStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default, Clone)]
struct StatusInner {
    last_success: Option<(DateTime<Utc>, u64)>,
    last_round_failed: bool,
}

/// A copy of [`SealerStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSnapshot {
    /// When the last successful round ended, and the tree size it left in the history.
    pub last_success: Option<(DateTime<Utc>, u64)>,
    /// Whether the latest round failed (the sealer is backing off).
    pub last_round_failed: bool,
}

impl SealerStatus {
    pub fn snapshot(&self) -> StatusSnapshot {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        StatusSnapshot {
            last_success: inner.last_success,
            last_round_failed: inner.last_round_failed,
        }
    }

    fn record(&self, result: Result<u64, ()>) {
        let mut inner = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match result {
            Ok(tree_size) => {
                inner.last_success = Some((Utc::now(), tree_size));
                inner.last_round_failed = false;
            }
            Err(()) => inner.last_round_failed = true,
        }
    }
}

/// The wait after `failures` failed rounds in a row (1 or more): doubling from
/// [`BACKOFF_MIN`], never beyond `every` or [`BACKOFF_MAX`].
pub fn backoff(failures: u32, every: Duration) -> Duration {
    let doubled = BACKOFF_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(BACKOFF_MAX).min(every.max(BACKOFF_MIN))
}

/// Seals every `config.every` until `shutdown` resolves (then finishes the round in hand,
/// bounded by [`SHUTDOWN_DRAIN`]). Never returns an error: failures are logged and retried.
pub async fn run(
    pool: PgPool,
    key: SigningKey,
    config: SealerConfig,
    status: &SealerStatus,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let signal = async {
        shutdown.await;
        tracing::info!("sealer stopping after the round in hand");
        let _ = stop_tx.send(true);
        tokio::time::sleep(SHUTDOWN_DRAIN).await;
        tracing::warn!(drain = ?SHUTDOWN_DRAIN, "the sealer's round did not end in time; leaving it");
    };
    tokio::select! {
        () = rounds(&pool, &key, &config, status, stop) => tracing::info!("sealer stopped"),
        () = signal => {}
    }
}

async fn rounds(
    pool: &PgPool,
    key: &SigningKey,
    config: &SealerConfig,
    status: &SealerStatus,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tracing::info!(
        every = ?config.every,
        history = %config.history.display(),
        publish = config.publish,
        "sealer started"
    );
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let wait = match seal::seal_into_history(pool, key, &config.history, config.publish).await {
            Ok(round) => {
                failures = 0;
                report_success(&round, started.elapsed());
                status.record(Ok(round.checkpoint.tree_size));
                config.every.saturating_sub(started.elapsed())
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                metrics::counter!("tally_sealer_failures_total").increment(1);
                status.record(Err(()));
                let wait = backoff(failures, config.every);
                tracing::warn!(%error, failures, retry_in = ?wait, "sealing failed; retrying");
                wait
            }
        };
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

fn report_success(round: &Round, took: Duration) {
    let cp = &round.checkpoint;
    metrics::gauge!("tally_sealer_tree_size").set(cp.tree_size as f64);
    metrics::gauge!("tally_sealer_last_success_timestamp_seconds").set(Utc::now().timestamp_millis() as f64 / 1000.0);
    if round.appended {
        metrics::counter!("tally_sealer_seals_total", "result" => "sealed").increment(1);
        tracing::info!(
            tree_size = cp.tree_size,
            new_events = round.new_events,
            root = %cp.root,
            last_event = %format!("{}.{}", cp.last_tx_id, cp.last_position),
            took_ms = took.as_millis() as u64,
            "sealed"
        );
    } else {
        metrics::counter!("tally_sealer_seals_total", "result" => "unchanged").increment(1);
        tracing::debug!(tree_size = cp.tree_size, "nothing new to seal");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_back_off_doubles_from_a_second_and_stops_at_the_interval_or_half_a_minute() {
        let hour = Duration::from_secs(3600);
        let waits: Vec<u64> = (1..=7).map(|n| backoff(n, hour).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(5, Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(backoff(1, Duration::from_millis(10)), BACKOFF_MIN);
        assert_eq!(backoff(u32::MAX, hour), BACKOFF_MAX);
    }

    #[test]
    fn the_status_remembers_the_last_success_across_a_failure() {
        let status = SealerStatus::default();
        assert_eq!(status.snapshot().last_success, None);

        status.record(Ok(12));
        status.record(Err(()));

        let snapshot = status.snapshot();
        assert!(snapshot.last_round_failed);
        assert_eq!(snapshot.last_success.map(|(_, size)| size), Some(12));
    }
}
