//! Careful clients under a fault: each keeps depositing with a fresh Idempotency-Key, and
//! retries a `503` (and a `409 concurrency-conflict`) with the same key until it gets an
//! answer, as the README tells clients to.
//! Afterwards, [`assert_each_acknowledged_once`] checks the log against what they were told.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::{Api, problem_code};

/// A deposit a client was told had happened (201).
#[derive(Debug, Clone)]
pub struct Acknowledged {
    pub key: String,
    pub account: Uuid,
    pub amount: i64,
    /// When the first try of this key was sent.
    pub first_sent: Instant,
    /// When its 201 arrived.
    pub acked: Instant,
}

/// Writers running in the background until [`Writers::stop`].
pub struct Writers {
    stop: Arc<AtomicBool>,
    /// The first answer that should never happen, with the writer that got it.
    failure: Arc<Mutex<Option<String>>>,
    unavailable: Arc<AtomicUsize>,
    acknowledged: Arc<AtomicUsize>,
    handles: Vec<JoinHandle<Vec<Acknowledged>>>,
}

impl Writers {
    /// `count` writers depositing into `accounts` through `apis` (writer `w` uses
    /// `apis[w % len]`). A writer stops, and the next [`Writers::wait_for_more`] or
    /// [`Writers::stop`] fails, on any answer but 201, a 503 `database-unavailable`,
    /// `unavailable` or `request-timeout`, and a 409 `concurrency-conflict`, or on retries
    /// for longer than `patience`.
    pub fn spawn(apis: &[Api], accounts: &[Uuid], count: usize, patience: Duration) -> Self {
        Self::spawn_paced(apis, accounts, count, patience, Duration::ZERO)
    }

    /// [`Writers::spawn`], each writer waiting `pace` after each acknowledged deposit: a steady
    /// load below what the machine sustains, for a test whose fault needs spare capacity to
    /// heal (a restarted NATS server catching its streams up while the writes go on).
    pub fn spawn_paced(apis: &[Api], accounts: &[Uuid], count: usize, patience: Duration, pace: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failure = Arc::new(Mutex::new(None));
        let unavailable = Arc::new(AtomicUsize::new(0));
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let handles = (0..count)
            .map(|w| {
                let api = apis[w % apis.len()].clone();
                let accounts = accounts.to_vec();
                let (stop, unavailable, acked_count) = (stop.clone(), unavailable.clone(), acknowledged.clone());
                let failure = failure.clone();
                let fail = move |what: String| {
                    failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(format!("writer {w}: {what}"));
                };
                tokio::spawn(async move {
                    let mut acknowledged = Vec::new();
                    let mut n = 0;
                    'writing: while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let key = format!("w{w}-{n}");
                        let account = accounts[(w + n) % accounts.len()];
                        let amount = (n % 97 + 1) as i64;
                        let path = format!("/v1/accounts/{account}/deposits");
                        let first_sent = Instant::now();
                        let deadline = first_sent + patience;
                        loop {
                            let (status, body, _) = api.post(&path, Some(&key), &json!({"amount": amount})).await;
                            match status {
                                StatusCode::CREATED => {
                                    acked_count.fetch_add(1, Ordering::Relaxed);
                                    acknowledged.push(Acknowledged {
                                        key,
                                        account,
                                        amount,
                                        first_sent,
                                        acked: Instant::now(),
                                    });
                                    if !pace.is_zero() {
                                        tokio::time::sleep(pace).await;
                                    }
                                    break;
                                }
                                StatusCode::SERVICE_UNAVAILABLE | StatusCode::CONFLICT
                                    if matches!(
                                        problem_code(&body),
                                        "database-unavailable"
                                            | "unavailable"
                                            | "request-timeout"
                                            | "concurrency-conflict"
                                    ) =>
                                {
                                    if status == StatusCode::SERVICE_UNAVAILABLE {
                                        unavailable.fetch_add(1, Ordering::Relaxed);
                                    }
                                    if Instant::now() > deadline {
                                        fail(format!("retried for {patience:?}: {body}"));
                                        break 'writing;
                                    }
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                                other => {
                                    fail(format!("a deposit answered {other}: {body}"));
                                    break 'writing;
                                }
                            }
                        }
                    }
                    acknowledged
                })
            })
            .collect();
        Self {
            stop,
            failure,
            unavailable,
            acknowledged,
            handles,
        }
    }

    /// 503 answers so far.
    pub fn unavailable(&self) -> usize {
        self.unavailable.load(Ordering::Relaxed)
    }

    /// 201 answers so far.
    pub fn acknowledged(&self) -> usize {
        self.acknowledged.load(Ordering::Relaxed)
    }

    /// Panics with `logs()` if a writer got an answer it should never get.
    fn check(&self, logs: &impl Fn() -> String) {
        let failure = self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(failure) = failure {
            panic!("{failure}\n{}", logs());
        }
    }

    /// Waits until `more` further deposits are acknowledged; panics with `logs()` if `timeout`
    /// passes first or a writer failed.
    pub async fn wait_for_more(&self, more: usize, timeout: Duration, logs: impl Fn() -> String) {
        let target = self.acknowledged() + more;
        let deadline = Instant::now() + timeout;
        while self.acknowledged() < target {
            self.check(&logs);
            assert!(
                Instant::now() < deadline,
                "writes did not resume within {timeout:?}\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every writer after its current deposit, and returns what they were told; panics
    /// with `logs()` if a writer failed.
    pub async fn stop(self, logs: impl Fn() -> String) -> Vec<Acknowledged> {
        self.check(&logs);
        self.stop.store(true, Ordering::Relaxed);
        let mut acknowledged = Vec::new();
        for handle in self.handles {
            acknowledged.extend(handle.await.unwrap_or_else(|e| panic!("{e}\n{}", logs())));
        }
        acknowledged
    }
}

/// Every acknowledged deposit is in the log exactly once, under its key, and no deposit with a
/// key is there that no client was told about.
pub async fn assert_each_acknowledged_once(url: &str, acknowledged: &[Acknowledged]) {
    let pool = PgPool::connect(url).await.expect("connecting to the log");
    let stored: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT stream_id, payload::text, metadata::text FROM events WHERE event_type = 'FundsDeposited'",
    )
    .fetch_all(&pool)
    .await
    .expect("reading the deposits");
    pool.close().await;
    let mut by_key: HashMap<String, (Uuid, i64)> = HashMap::new();
    for (stream, payload, metadata) in &stored {
        let metadata: serde_json::Value = serde_json::from_str(metadata).unwrap();
        let payload: serde_json::Value = serde_json::from_str(payload).unwrap();
        let Some(key) = metadata["idempotency_key"].as_str() else {
            continue;
        };
        let previous = by_key.insert(key.to_owned(), (*stream, payload["amount"].as_i64().unwrap()));
        assert!(previous.is_none(), "key {key} took effect twice");
    }
    for a in acknowledged {
        assert_eq!(
            by_key.get(&a.key),
            Some(&(a.account, a.amount)),
            "acknowledged {} is in the log",
            a.key
        );
    }
    assert_eq!(
        by_key.len(),
        acknowledged.len(),
        "nothing in the log that no client was told about"
    );
}
