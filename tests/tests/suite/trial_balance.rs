//! Double-entry against real Postgres and NATS (ADR 0003): deposits and withdrawals booked
//! against the currency's `world` system account, the trial balance of the read models zero at
//! every read under 64 concurrent clients and equal to the log's after every batch, and a log
//! written before system accounts (v1 deposit events) still folding to a zero trial balance.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_domain::{Currency, SystemAccount};
use tally_event_store::{NewEvent, StreamAppend};
use tally_service::auth::Role;
use tally_tests::{Api, Stack, client_with, eventually, fold, problem_code, token};
use uuid::Uuid;

use super::projections::{drive, open_accounts};

/// Batches of writes; after each, the read models are compared with the log.
const BATCHES: usize = 4;
const CLIENTS: usize = 64;
const COMMANDS_PER_BATCH: usize = 1_200;

fn auditor() -> reqwest::Client {
    client_with(&token("auditor-1", &[Role::Auditor])).build().unwrap()
}

async fn get(client: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The trial balance, checked on the way: every currency balances (debits equal credits, and
/// every balance, system accounts included, sums to zero). `None` on a retryable 503 (a
/// replica not usable yet), as a client would retry.
async fn try_balanced(client: &reqwest::Client, query: &str) -> Option<Value> {
    let (status, body) = get(client, &format!("{query}/v1/ledger/trial-balance")).await;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        assert_eq!(problem_code(&body), "database-unavailable", "{body}");
        return None;
    }
    assert_eq!(status, StatusCode::OK, "{body}");
    for c in body["currencies"].as_array().unwrap() {
        assert_eq!(c["balance"], 0, "the trial balance is not zero: {body}");
        assert_eq!(c["debits"], c["credits"], "debits differ from credits: {body}");
        let parts =
            c["client_balances"].as_i64().unwrap() + c["world"].as_i64().unwrap() + c["in_transit"].as_i64().unwrap();
        assert_eq!(parts, 0, "{body}");
    }
    Some(body)
}

/// [`try_balanced`], retried through 503s.
async fn balanced(client: &reqwest::Client, query: &str) -> Value {
    eventually(Duration::from_secs(30), "a trial balance read", || {
        try_balanced(client, query)
    })
    .await
}

fn find_currency<'a>(body: &'a Value, code: &str) -> Option<&'a Value> {
    body["currencies"].as_array()?.iter().find(|c| c["currency"] == code)
}

fn currency_of<'a>(body: &'a Value, code: &str) -> &'a Value {
    find_currency(body, code).unwrap_or_else(|| panic!("no {code} in {body}"))
}

/// Waits until the read models equal the fold of the log, and returns the fold.
async fn converged(stack: &Stack) -> fold::Expected {
    fold::converged(&stack.db.pool, Duration::from_secs(90), || stack.logs()).await
}

/// The log's own trial balance: for each currency, the accounts' balances plus the `world`
/// account's (folded from the events that name it) sum to zero; returns the world balances.
fn log_balances(expected: &fold::Expected) -> BTreeMap<String, i64> {
    let mut world = BTreeMap::new();
    for (code, totals) in &expected.totals {
        let currency: Currency = code.parse().unwrap();
        let world_balance = expected
            .system
            .get(&SystemAccount::World.id(&currency))
            .copied()
            .unwrap_or(0);
        assert_eq!(totals.3 + world_balance, 0, "the log's {code} does not balance");
        world.insert(code.clone(), world_balance);
    }
    let named: usize = expected.system.len();
    assert!(
        named <= expected.totals.len(),
        "events name only world accounts: {:?}",
        expected.system
    );
    world
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_trial_balance_is_zero_at_every_read_and_equals_the_log_after_every_batch_of_64_clients() {
    let stack = Stack::start_with(&[("TALLY_TRIAL_BALANCE_INTERVAL_S", "1".into())]).await;
    let api = Api::new(&stack.command);
    let auditor = auditor();
    let eur = open_accounts(&api, 48).await;
    let usd = futures::future::join_all((0..4).map(|_| api.funded("USD", 5_000))).await;

    // Readers only: the trial balance is an auditor's read.
    let (status, body) = get(
        &tally_tests::client(),
        &format!("{}/v1/ledger/trial-balance", stack.query),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    let mut reads = 0;
    for batch in 0..BATCHES {
        // While the batch runs, the trial balance is read again and again: each read is one
        // snapshot of the read models, which balance at every commit of the projector.
        let stop = Arc::new(AtomicBool::new(false));
        let read = Arc::new(AtomicUsize::new(0));
        let watcher = {
            let (auditor, query, stop, read) = (auditor.clone(), stack.query.clone(), stop.clone(), read.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if try_balanced(&auditor, &query).await.is_some() {
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let usd_writes = futures::future::join_all(usd.iter().enumerate().map(|(i, id)| {
            let path = if i % 2 == 0 { "deposits" } else { "withdrawals" };
            api.post_keyed(&format!("/v1/accounts/{id}/{path}"), &json!({"amount": 10 + batch}))
        }));
        let (sent, usd_replies) = tokio::join!(drive(&api, &eur, CLIENTS, COMMANDS_PER_BATCH, None), usd_writes);
        assert!(sent >= COMMANDS_PER_BATCH);
        assert!(
            usd_replies.iter().all(|(s, _, _)| *s == StatusCode::CREATED),
            "{usd_replies:?}"
        );

        // After the batch: the read models catch up with the log, and their trial balance is
        // the log's own.
        let expected = converged(&stack).await;
        stop.store(true, Ordering::Relaxed);
        watcher.await.expect("every read during the batch balanced");
        reads += read.load(Ordering::Relaxed);
        let world = log_balances(&expected);
        // The replica may still be behind the primary the fold was compared on.
        eventually(
            Duration::from_secs(30),
            "the replica's trial balance equals the log's",
            || {
                let (auditor, query, world, expected) =
                    (auditor.clone(), stack.query.clone(), world.clone(), expected.clone());
                async move {
                    let body = balanced(&auditor, &query).await;
                    expected
                        .totals
                        .iter()
                        .all(|(code, totals)| {
                            find_currency(&body, code).is_some_and(|c| {
                                c["world"] == world[code]
                                    && c["client_balances"] == totals.3
                                    && c["accounts"] == totals.0
                                    && c["in_transit"] == 0
                            })
                        })
                        .then_some(())
                }
            },
        )
        .await;
    }
    assert!(
        reads >= BATCHES,
        "the trial balance was read during the batches ({reads} reads)"
    );

    // The system accounts, with the ids the events name.
    let (status, body) = get(&auditor, &format!("{}/v1/ledger/system-accounts", stack.query)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let accounts = body["system_accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 4, "world and transit of EUR and USD: {body}");
    let trial = balanced(&auditor, &stack.query).await;
    for code in ["EUR", "USD"] {
        let currency: Currency = code.parse().unwrap();
        let world = accounts
            .iter()
            .find(|a| a["name"] == "world" && a["currency"] == code)
            .unwrap();
        assert_eq!(world["account_id"], SystemAccount::World.id(&currency).to_string());
        assert_eq!(world["balance"], currency_of(&trial, code)["world"]);
        assert!(world["balance"].as_i64().unwrap() < 0, "money came in: {world}");
    }
    // A deposit's event names the world account of its currency.
    let events = stack.db.read_whole_stream(eur[0]).await;
    let deposit = events.iter().find(|e| e.event_type == "FundsDeposited").unwrap();
    assert_eq!(deposit.schema_version, 2);
    let payload: Value = serde_json::from_str(&deposit.payload).unwrap();
    assert_eq!(
        payload["system_account"],
        SystemAccount::World.id(&"EUR".parse().unwrap()).to_string()
    );

    // The gauge says the same (the query API reads it every second here).
    let metrics_url = format!("{}/metrics", stack.ops_of(&stack.query));
    gauge_shows(&metrics_url, "EUR", 0).await;

    // A balance row edited behind the projectors' back (as someone with write access to the
    // read models could) throws the trial balance off, and the gauge says so.
    sqlx::query("UPDATE account_balances SET balance = balance + 7, available = available + 7 WHERE account_id = $1")
        .bind(eur[1])
        .execute(&stack.db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the trial balance shows the edited row",
        || {
            let (auditor, url) = (auditor.clone(), format!("{}/v1/ledger/trial-balance", stack.query));
            async move {
                let (_, body) = get(&auditor, &url).await;
                (find_currency(&body, "EUR")?["balance"] == 7).then_some(())
            }
        },
    )
    .await;
    gauge_shows(&metrics_url, "EUR", 7).await;
}

/// Waits until the query API's `/metrics` shows `tally_trial_balance_minor{currency} value`.
async fn gauge_shows(metrics_url: &str, currency: &str, value: i64) {
    let line = format!("tally_trial_balance_minor{{currency=\"{currency}\"}} {value}\n");
    eventually(Duration::from_secs(10), &format!("the gauge at {value}"), || {
        let (url, line) = (metrics_url.to_owned(), line.clone());
        async move {
            let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
            text.contains(&line).then_some(())
        }
    })
    .await;
}

/// An event as a test stores it directly (an older schema version, say).
fn event(event_type: &str, schema_version: i32, payload: String) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event_type.into(),
        schema_version,
        payload,
        metadata: format!(r#"{{"correlation_id":"{}"}}"#, Uuid::now_v7()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_written_before_system_accounts_folds_and_balances_against_the_world_account() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    // An account whose deposit and withdrawal were stored as v1 (no system account named),
    // as a log from before this change holds them.
    let old = Uuid::now_v7();
    stack
        .db
        .store()
        .append(vec![StreamAppend {
            stream_type: "account".into(),
            stream_id: old,
            expected_version: 0,
            known_prev_hash: None,
            events: vec![
                event(
                    "AccountOpened",
                    1,
                    format!(r#"{{"account_id":"{old}","owner":"Ada","currency":"EUR"}}"#),
                ),
                event(
                    "FundsDeposited",
                    1,
                    r#"{"amount":700,"currency":"EUR","reference":"old"}"#.into(),
                ),
                event(
                    "FundsWithdrawn",
                    1,
                    r#"{"amount":200,"currency":"EUR","reference":"old"}"#.into(),
                ),
            ],
        }])
        .await
        .unwrap();
    // The new code writes on top of it: a v2 deposit on the same account.
    let (status, body, _) = api
        .post_keyed(&format!("/v1/accounts/{old}/deposits"), &json!({"amount": 50}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["balance"], 550);
    let new = api.funded("EUR", 1_000).await;
    let (status, body, _) = api
        .transfer(json!({"from": new, "to": old, "amount": 300, "currency": "EUR", "mode": "immediate"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // The stored v1 events stay as they were (upcast on read, never rewritten) ...
    let stored = stack.db.read_whole_stream(old).await;
    let versions: Vec<(&str, i32)> = stored
        .iter()
        .map(|e| (e.event_type.as_str(), e.schema_version))
        .collect();
    assert_eq!(
        versions[..4],
        [
            ("AccountOpened", 1),
            ("FundsDeposited", 1),
            ("FundsWithdrawn", 1),
            ("FundsDeposited", 2)
        ]
    );
    // ... and the log, folded, balances against the world account.
    let expected = converged(&stack).await;
    let world = log_balances(&expected);
    assert_eq!(world["EUR"], -(700 - 200 + 50 + 1_000));
    let body = eventually(Duration::from_secs(30), "the replica shows every write", || {
        let (auditor, query) = (auditor(), stack.query.clone());
        async move {
            let body = balanced(&auditor, &query).await;
            let eur = find_currency(&body, "EUR")?;
            (eur["world"] == -1_550 && eur["in_transit"] == 0 && eur["client_balances"] == 1_550)
                .then_some(body.clone())
        }
    })
    .await;
    let eur = currency_of(&body, "EUR");
    assert_eq!(
        (eur["client_balances"].as_i64(), eur["accounts"].as_i64()),
        (Some(1_550), Some(2))
    );
    assert_eq!(eur["debits"], eur["credits"]);
    assert!(body["position"].as_i64().unwrap() > 0, "{body}");

    // The hash chain still verifies over both versions.
    tally_tests::assert_audit_verifies(&stack.db.url);
}
