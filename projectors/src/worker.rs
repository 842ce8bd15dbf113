//! A projector process: it beats a heartbeat, claims (projection, partition) units with
//! leases in Postgres, and runs one consuming task per unit it holds.
//!
//! Every tick each worker renews its leases and aims at its fair share,
//! `ceil(units / live workers)`: it gives back units above it and claims free or expired ones
//! below it. A second worker therefore takes half the units within a tick or two, and the units
//! of a worker that dies move when its leases expire (`lease_ttl`). The lease is also checked in
//! every batch's transaction, so a worker that lost one cannot commit for it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgPool, Row};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::accounts::Accounts;
use crate::catalog;
use crate::consumer::{Shared, Unit};
use crate::model::Projection;
use crate::transfers::Transfers;

/// A (projection, partition) pair: what a lease covers.
pub type UnitKey = (String, i32);

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub(crate) struct Leases {
    pub pool: PgPool,
    pub worker_id: String,
    pub ttl: Duration,
    pub partitions: u32,
    /// On shutdown, the longest wait for the units to finish their batches in hand.
    pub drain: Duration,
}

impl Leases {
    fn ttl_ms(&self) -> i64 {
        self.ttl.as_millis() as i64
    }

    /// Beats the heartbeat and returns how many workers are alive (this one included).
    async fn heartbeat(&self) -> Result<i64, sqlx::Error> {
        sqlx::query(
            "INSERT INTO projector_workers (worker_id) VALUES ($1) \
             ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = now()",
        )
        .bind(&self.worker_id)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM projector_workers WHERE heartbeat_at < now() - $1 * interval '1 millisecond'")
            .bind(self.ttl_ms() * 4)
            .execute(&self.pool)
            .await?;
        sqlx::query_scalar(
            "SELECT count(*) FROM projector_workers WHERE heartbeat_at > now() - $1 * interval '1 millisecond'",
        )
        .bind(self.ttl_ms())
        .fetch_one(&self.pool)
        .await
    }

    /// Extends every lease this worker holds; returns them.
    async fn renew(&self) -> Result<Vec<UnitKey>, sqlx::Error> {
        let rows = sqlx::query(
            "UPDATE projection_partitions SET lease_until = now() + $2 * interval '1 millisecond' \
             WHERE worker = $1 RETURNING projection, partition",
        )
        .bind(&self.worker_id)
        .bind(self.ttl_ms())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(unit_key).collect()
    }

    /// Claims up to `count` units nobody holds (or whose lease expired).
    async fn claim(&self, count: i64) -> Result<Vec<UnitKey>, sqlx::Error> {
        let rows = sqlx::query(
            "UPDATE projection_partitions SET worker = $1, lease_until = now() + $2 * interval '1 millisecond' \
             WHERE (projection, partition) IN ( \
                 SELECT projection, partition FROM projection_partitions \
                 WHERE (worker IS NULL OR lease_until < now()) AND projection = ANY($4) AND partition < $5 \
                 ORDER BY partition, projection LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING projection, partition",
        )
        .bind(&self.worker_id)
        .bind(self.ttl_ms())
        .bind(count)
        .bind(catalog::PROJECTIONS)
        .bind(self.partitions as i32)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(unit_key).collect()
    }

    async fn release(&self, unit: &UnitKey) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE projection_partitions SET worker = NULL, lease_until = NULL \
             WHERE projection = $1 AND partition = $2 AND worker = $3",
        )
        .bind(&unit.0)
        .bind(unit.1)
        .bind(&self.worker_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn leave(&self) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE projection_partitions SET worker = NULL, lease_until = NULL WHERE worker = $1")
            .bind(&self.worker_id)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM projector_workers WHERE worker_id = $1")
            .bind(&self.worker_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn unit_key(row: &sqlx::postgres::PgRow) -> Result<UnitKey, sqlx::Error> {
    Ok((row.try_get("projection")?, row.try_get("partition")?))
}

/// Runs the lease loop and the units this worker holds until `shutdown` resolves; then every
/// unit finishes its batch, and the leases are given back for others to take at once.
pub(crate) async fn run(shared: Arc<Shared>, leases: Leases, shutdown: impl Future<Output = ()>) {
    let total_units = (catalog::PROJECTIONS.len() as i64) * i64::from(shared.topology.partitions);
    let mut running: HashMap<UnitKey, Running> = HashMap::new();
    let tick = (leases.ttl / 4).max(Duration::from_millis(100));
    tokio::pin!(shutdown);
    loop {
        if let Err(error) = balance(&shared, &leases, total_units, &mut running).await {
            tracing::warn!(%error, "lease round failed; the units keep running until their leases lapse");
        }
        metrics::gauge!("tally_projector_units_held").set(running.len() as f64);
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(tick) => {}
        }
    }
    tracing::info!(units = running.len(), "stopping: finishing the batches in hand");
    // Every unit is told at once and they finish side by side, within one bound.
    let mut tasks = Vec::with_capacity(running.len());
    for (_, unit) in running.drain() {
        let _ = unit.stop.send(true);
        tasks.push(unit.task);
    }
    let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
    if tokio::time::timeout(leases.drain, futures::future::join_all(tasks))
        .await
        .is_err()
    {
        // A dropped batch rolls back and its messages are redelivered: nothing is lost. The
        // lease fence (`FOR UPDATE` on the partition row) makes the release below wait for
        // a commit still in flight.
        tracing::warn!(drain = ?leases.drain, "units did not finish their batches in time; abandoning them");
        for abort in aborts {
            abort.abort();
        }
    }
    match leases.leave().await {
        Ok(()) => tracing::info!("leases given back; stopped"),
        Err(error) => tracing::warn!(%error, "cannot give back the leases; they lapse on their own"),
    }
}

async fn balance(
    shared: &Arc<Shared>,
    leases: &Leases,
    total_units: i64,
    running: &mut HashMap<UnitKey, Running>,
) -> Result<(), sqlx::Error> {
    let alive = leases.heartbeat().await?.max(1);
    let held = leases.renew().await?;
    // Units another worker took (our lease lapsed): stop them here.
    let lost: Vec<UnitKey> = running.keys().filter(|k| !held.contains(k)).cloned().collect();
    for key in lost {
        tracing::warn!(projection = %key.0, partition = key.1, "lease lost");
        stop(running, &key).await;
    }
    for key in &held {
        if !running.contains_key(key) {
            start(shared, running, key.clone());
        }
    }
    let fair_share = (total_units + alive - 1) / alive;
    let held_count = running.len() as i64;
    if held_count > fair_share {
        let mut keys: Vec<UnitKey> = running.keys().cloned().collect();
        keys.sort();
        for key in keys.into_iter().rev().take((held_count - fair_share) as usize) {
            tracing::info!(projection = %key.0, partition = key.1, fair_share, "handing over");
            stop(running, &key).await;
            leases.release(&key).await?;
        }
    } else if held_count < fair_share {
        for key in leases.claim(fair_share - held_count).await? {
            tracing::info!(projection = %key.0, partition = key.1, "claimed");
            start(shared, running, key);
        }
    }
    Ok(())
}

fn start(shared: &Arc<Shared>, running: &mut HashMap<UnitKey, Running>, key: UnitKey) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let partition = key.1 as u32;
    let shared = shared.clone();
    let task = match key.0.as_str() {
        Accounts::NAME => tokio::spawn(Unit::<Accounts>::new(shared, partition).run(stop_rx)),
        Transfers::NAME => tokio::spawn(Unit::<Transfers>::new(shared, partition).run(stop_rx)),
        other => {
            tracing::warn!(
                projection = other,
                "a lease for a projection this code does not know; ignored"
            );
            return;
        }
    };
    running.insert(key, Running { stop: stop_tx, task });
}

async fn stop(running: &mut HashMap<UnitKey, Running>, key: &UnitKey) {
    if let Some(unit) = running.remove(key) {
        let _ = unit.stop.send(true);
        let _ = unit.task.await;
    }
}
