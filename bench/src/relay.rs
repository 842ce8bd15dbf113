//! Watches a running `tally-relay` drain a backlog by polling its checkpoint.
//!
//! The rate is measured from the first checkpoint the relay stores to the one at the end of
//! the backlog, so process start, the advisory-lock election and stream creation are not
//! part of it: what is left is reading, publishing, awaiting acks and checkpointing.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::PgPool;
use tally_event_store::Checkpoint;
use tally_event_store::relay::load_checkpoint;
use tokio::time::Instant;

use crate::measurement::Measurement;

/// How often the checkpoint is read while the relay runs.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Polls relay `name`'s checkpoint until it reaches `end`, failing after `timeout`.
pub async fn watch(pool: &PgPool, name: &str, end: Checkpoint, timeout: Duration) -> anyhow::Result<Measurement> {
    let deadline = Instant::now() + timeout;
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let at = load_checkpoint(pool, name).await?;
        let now = Instant::now();
        if at != Checkpoint::default() && first.is_none() {
            anyhow::ensure!(
                at < end,
                "the relay drained the backlog in one batch: too small to measure"
            );
            first = Some((now, events_through(pool, at).await?));
        }
        if let Some((from, relayed_before)) = first
            && at >= end
        {
            let relayed = events_through(pool, at).await? - relayed_before;
            return Ok(Measurement::throughput(
                relayed,
                (now - from).as_secs_f64(),
                BTreeMap::new(),
            ));
        }
        anyhow::ensure!(
            now < deadline,
            "the relay did not reach the end of the backlog within {timeout:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// How many events lie at or before `at` in commit order.
async fn events_through(pool: &PgPool, at: Checkpoint) -> Result<u64, sqlx::Error> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE (tx_id, position) <= ($1::text::xid8, $2)")
        .bind(at.tx_id.to_string())
        .bind(at.position)
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}
