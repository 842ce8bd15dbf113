//! The `projection-lag` scenario: deposits at a steady rate through the command API, and for
//! each the time from its `201` to the `account_balances` row showing its version (the whole
//! path: log, relay, JetStream, projector, commit).
//!
//! When a row shows a version is learnt from the projector itself: right after each commit it
//! announces the rows it changed, with their versions, on its cache-invalidation subject
//! (`tally_schemas::invalidation`), and this scenario listens there. Polling the table for
//! every awaited account every 2 ms, as an earlier version did, cost Postgres hundreds of
//! sequential scans of the balances a second (the planner's right choice for hundreds of ids
//! in a table of ten thousand rows), competing with the pipeline it measured. Announcements
//! are best effort, so the table is still read, rarely ([`POLL`]), for deposits awaited longer
//! than that: a lost announcement is charged the time until that read, never dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use sqlx::PgPool;
use tally_projectors::accounts::Accounts;
use tally_projectors::model::Projection;
use tally_schemas::invalidation::{Invalidation, invalidation_subject};
use uuid::Uuid;

use crate::Measurement;
use crate::measurement::latency_summary;

/// Accounts the deposits spread over.
const ACCOUNTS: usize = 200;
/// How often the read model is read for the deposits awaited longer than this (the safety net
/// for lost announcements).
const POLL: Duration = Duration::from_millis(250);
/// How long the read model may take to show the last deposits before the run fails.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub struct LagPlan {
    pub command_url: String,
    /// The NATS server and subject prefix the projector announces its commits on.
    pub nats: tally_event_store::nats_users::NatsArgs,
    pub subject_prefix: String,
    pub token: String,
    pub rate_per_s: f64,
    pub duration: Duration,
}

/// Deposits answered and versions shown, matched as either arrives.
struct Tracker {
    /// Per account, the deposits answered but not yet shown: the version each made, and when
    /// its `201` arrived.
    awaited: HashMap<Uuid, Vec<(i64, Instant)>>,
    /// Per account, the highest version shown so far (a commit can be announced before its
    /// deposit's `201` reaches this process).
    shown: HashMap<Uuid, i64>,
    lags: Histogram<u64>,
}

impl Tracker {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            awaited: HashMap::new(),
            shown: HashMap::new(),
            lags: Histogram::new(3)?,
        })
    }

    /// A deposit into `account` was answered `at`, having made `version`.
    fn answered(&mut self, account: Uuid, version: i64, at: Instant) {
        if self.shown.get(&account).is_some_and(|shown| *shown >= version) {
            let _ = self.lags.record(0);
        } else {
            self.awaited.entry(account).or_default().push((version, at));
        }
    }

    /// `account`'s row was seen at `version` at `now`: every deposit it covers is shown.
    fn shown(&mut self, account: Uuid, version: i64, now: Instant) {
        let shown = self.shown.entry(account).or_insert(version);
        *shown = (*shown).max(version);
        let Some(waiting) = self.awaited.get_mut(&account) else {
            return;
        };
        let lags = &mut self.lags;
        waiting.retain(|(wanted, answered)| {
            if *wanted <= version {
                let _ = lags.record(now.saturating_duration_since(*answered).as_micros() as u64);
                false
            } else {
                true
            }
        });
    }

    fn waiting(&self) -> bool {
        self.awaited.values().any(|v| !v.is_empty())
    }

    /// Accounts with a deposit answered longer than `age` ago and not shown yet.
    fn overdue(&self, age: Duration) -> Vec<Uuid> {
        self.awaited
            .iter()
            .filter(|(_, v)| v.iter().any(|(_, answered)| answered.elapsed() >= age))
            .map(|(id, _)| *id)
            .collect()
    }
}

type Shared = Arc<Mutex<Tracker>>;

pub async fn measure(pool: &PgPool, plan: &LagPlan) -> anyhow::Result<Measurement> {
    let client = reqwest::Client::new();
    let post = |path: String, body: Value, key: bool| {
        let mut request = client
            .post(format!("{}{path}", plan.command_url))
            .bearer_auth(&plan.token)
            .json(&body);
        if key {
            request = request.header("Idempotency-Key", Uuid::now_v7().to_string());
        }
        request.send()
    };
    let mut accounts = Vec::with_capacity(ACCOUNTS);
    for _ in 0..ACCOUNTS {
        let reply: Value = post("/v1/accounts".into(), json!({"owner": "lag", "currency": "EUR"}), false)
            .await?
            .error_for_status()?
            .json()
            .await?;
        accounts.push(reply["account_id"].as_str().unwrap_or_default().parse::<Uuid>()?);
    }
    let tracker: Shared = Arc::new(Mutex::new(Tracker::new()?));
    let nats = plan.nats.options().connect(plan.nats.servers()?).await?;
    let announcements = nats
        .subscribe(invalidation_subject(&plan.subject_prefix, Accounts::NAME))
        .await?;
    nats.flush().await?;
    let listener = tokio::spawn(listen(announcements, tracker.clone()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = tokio::spawn(poll(pool.clone(), tracker.clone(), done.clone()));

    let interval = Duration::from_secs_f64(1.0 / plan.rate_per_s.max(1.0));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut requests = tokio::task::JoinSet::new();
    while started.elapsed() < plan.duration {
        let due = started + interval.mul_f64(sent as f64);
        tokio::time::sleep_until(due.into()).await;
        let account = accounts[sent as usize % accounts.len()];
        let request = post(format!("/v1/accounts/{account}/deposits"), json!({"amount": 1}), true);
        let tracker = tracker.clone();
        requests.spawn(async move {
            let reply: Value = request.await?.error_for_status()?.json().await?;
            let version = reply["version"].as_i64().unwrap_or(i64::MAX);
            tracker.lock().expect("lock").answered(account, version, Instant::now());
            anyhow::Ok(())
        });
        sent += 1;
    }
    let mut errors = std::collections::BTreeMap::new();
    while let Some(result) = requests.join_next().await {
        if result.map_err(anyhow::Error::from).and_then(|r| r).is_err() {
            *errors.entry("request".to_owned()).or_insert(0) += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let drained = Instant::now();
    while tracker.lock().expect("lock").waiting() {
        anyhow::ensure!(
            drained.elapsed() < DRAIN_TIMEOUT,
            "the read model never showed every deposit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.await??;
    listener.abort();
    let tracker = tracker.lock().expect("lock");
    let mut measured = Measurement::throughput(tracker.lags.len(), seconds, errors);
    measured.latency_ms = Some(latency_summary(&tracker.lags));
    Ok(measured)
}

/// Takes the projector's commit announcements: each shows its rows at their versions.
async fn listen(mut announcements: async_nats::Subscriber, tracker: Shared) {
    while let Some(message) = announcements.next().await {
        let Ok(announced) = serde_json::from_slice::<Invalidation>(&message.payload) else {
            continue;
        };
        let now = Instant::now();
        let mut tracker = tracker.lock().expect("lock");
        for row in announced.rows {
            tracker.shown(row.id, row.version, now);
        }
    }
}

/// Every [`POLL`], reads the rows of the accounts with a deposit awaited longer than that.
async fn poll(pool: PgPool, tracker: Shared, done: Arc<std::sync::atomic::AtomicBool>) -> anyhow::Result<()> {
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(POLL).await;
        let overdue = tracker.lock().expect("lock").overdue(POLL);
        if overdue.is_empty() {
            continue;
        }
        let rows: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT account_id, version FROM account_balances WHERE account_id = ANY($1)")
                .bind(&overdue)
                .fetch_all(&pool)
                .await?;
        let now = Instant::now();
        let mut tracker = tracker.lock().expect("lock");
        for (id, version) in rows {
            tracker.shown(id, version, now);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deposit_is_shown_by_its_version_or_a_later_one_even_when_announced_first() {
        let mut tracker = Tracker::new().unwrap();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let t0 = Instant::now();
        tracker.answered(a, 3, t0);
        tracker.answered(a, 4, t0);
        tracker.shown(a, 3, t0 + Duration::from_millis(5));
        assert!(tracker.waiting(), "version 4 is not shown yet");
        // Announced before its 201 arrived: no wait at all.
        tracker.shown(b, 7, t0);
        tracker.answered(b, 6, t0 + Duration::from_millis(1));
        tracker.shown(a, 9, t0 + Duration::from_millis(20));
        assert!(!tracker.waiting());
        assert_eq!(tracker.lags.len(), 3);
        assert_eq!(tracker.lags.min(), 0);
        assert_eq!(tracker.lags.max(), tracker.lags.highest_equivalent(20_000));
    }
}
