//! The `projection-lag` scenario: deposits at a steady rate through the command API, and for
//! each the time from its `201` to the `account_balances` row showing its version (the whole
//! path: log, relay, JetStream, projector, commit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::Measurement;
use crate::measurement::latency_summary;

/// Accounts the deposits spread over.
const ACCOUNTS: usize = 200;
/// How often the read model is polled for the versions still awaited.
const POLL: Duration = Duration::from_millis(2);
/// How long the read model may take to show the last deposits before the run fails.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A deposit answered but not yet seen in the read model: the version it made, and when.
type Awaited = Arc<Mutex<HashMap<Uuid, Vec<(i64, Instant)>>>>;

pub struct LagPlan {
    pub command_url: String,
    pub token: String,
    pub rate_per_s: f64,
    pub duration: Duration,
}

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
    let awaited: Awaited = Arc::default();
    let lags = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = tokio::spawn(poll(pool.clone(), awaited.clone(), lags.clone(), done.clone()));

    let interval = Duration::from_secs_f64(1.0 / plan.rate_per_s.max(1.0));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut requests = tokio::task::JoinSet::new();
    while started.elapsed() < plan.duration {
        let due = started + interval.mul_f64(sent as f64);
        tokio::time::sleep_until(due.into()).await;
        let account = accounts[sent as usize % accounts.len()];
        let request = post(format!("/v1/accounts/{account}/deposits"), json!({"amount": 1}), true);
        let awaited = awaited.clone();
        requests.spawn(async move {
            let reply: Value = request.await?.error_for_status()?.json().await?;
            let version = reply["version"].as_i64().unwrap_or(i64::MAX);
            awaited
                .lock()
                .expect("lock")
                .entry(account)
                .or_default()
                .push((version, Instant::now()));
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
    while awaited.lock().expect("lock").values().any(|v| !v.is_empty()) {
        anyhow::ensure!(
            drained.elapsed() < DRAIN_TIMEOUT,
            "the read model never showed every deposit"
        );
        tokio::time::sleep(POLL).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.await??;
    let lags = lags.lock().expect("lock");
    let mut measured = Measurement::throughput(lags.len(), seconds, errors);
    measured.latency_ms = Some(latency_summary(&lags));
    Ok(measured)
}

/// Polls the versions of the accounts with deposits awaited; records each deposit's lag when
/// its row reaches its version.
async fn poll(
    pool: PgPool,
    awaited: Awaited,
    lags: Arc<Mutex<Histogram<u64>>>,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let ids: Vec<Uuid> = awaited
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(id, _)| *id)
            .collect();
        if !ids.is_empty() {
            let rows: Vec<(Uuid, i64)> =
                sqlx::query_as("SELECT account_id, version FROM account_balances WHERE account_id = ANY($1)")
                    .bind(&ids)
                    .fetch_all(&pool)
                    .await?;
            let now = Instant::now();
            let mut awaited = awaited.lock().expect("lock");
            let mut lags = lags.lock().expect("lock");
            for (id, version) in rows {
                if let Some(waiting) = awaited.get_mut(&id) {
                    waiting.retain(|(wanted, answered)| {
                        if *wanted <= version {
                            let _ = lags.record(now.duration_since(*answered).as_micros() as u64);
                            false
                        } else {
                            true
                        }
                    });
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}
