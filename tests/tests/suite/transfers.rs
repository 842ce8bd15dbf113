//! Transfers through the real command API and Postgres: atomic legs, two-phase holds, expiry,
//! and a 64-client random workload that must conserve money exactly.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::json;
use tally_tests::{TestDb, command_api, eventually, problem_code};
use uuid::Uuid;

#[tokio::test]
async fn an_immediate_transfer_books_both_legs_in_one_transaction() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let (a, b) = (api.funded("EUR", 1_000).await, api.funded("EUR", 0).await);
    let key = "transfer-once";
    let body = json!({"from": a, "to": b, "amount": 300, "currency": "EUR", "mode": "immediate", "reference": "rent"});

    let (status, first, _) = api.post("/v1/transfers", Some(key), &body).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["status"], "completed");
    assert_eq!(first["from"]["balance"], 700);
    assert_eq!(first["to"]["balance"], 300);
    let transfer_id: Uuid = first["transfer_id"].as_str().unwrap().parse().unwrap();

    let (status, again, replayed) = api.post("/v1/transfers", Some(key), &body).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    assert_eq!(again, first, "a retry gets the first response and moves nothing");

    let store = db.store();
    let debit = store.read_stream(a, 2, 10).await.unwrap();
    let credit = store.read_stream(b, 1, 10).await.unwrap();
    let record = store.read_stream(transfer_id, 0, 10).await.unwrap();
    assert_eq!(
        (debit.len(), credit.len(), record.len()),
        (1, 1, 1),
        "one event per stream, none from the retry"
    );
    assert_eq!(debit[0].event_type, "TransferDebited");
    assert_eq!(credit[0].event_type, "TransferCredited");
    assert_eq!(record[0].event_type, "TransferCompleted");
    let transactions: HashSet<i64> = [&debit[0], &credit[0], &record[0]].iter().map(|e| e.tx_id).collect();
    assert_eq!(transactions.len(), 1, "both legs and the record commit together");
}

#[tokio::test]
async fn each_refused_transfer_says_why_and_moves_nothing() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let (a, b, usd) = (
        api.funded("EUR", 100).await,
        api.funded("EUR", 0).await,
        api.funded("USD", 0).await,
    );
    let t = |from: Uuid, to: Uuid, amount: i64, currency: &str| json!({"from": from, "to": to, "amount": amount, "currency": currency, "mode": "immediate"});
    let cases = [
        (t(a, a, 10, "EUR"), StatusCode::UNPROCESSABLE_ENTITY, "transfer-to-self"),
        (
            t(a, usd, 10, "EUR"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "currency-mismatch",
        ),
        (
            t(a, b, 10, "USD"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "currency-mismatch",
        ),
        (
            t(a, b, 101, "EUR"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "insufficient-funds",
        ),
        (
            t(a, Uuid::now_v7(), 10, "EUR"),
            StatusCode::NOT_FOUND,
            "account-not-found",
        ),
        (t(a, b, 0, "EUR"), StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount"),
        (
            json!({"from": a, "to": b, "amount": 1, "currency": "EUR", "mode": "immediate", "expires_in_s": 5}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-expiry",
        ),
        (
            json!({"from": a, "to": b, "amount": 1, "currency": "EUR", "mode": "pending", "expires_in_s": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-expiry",
        ),
    ];
    for (body, status, kind) in cases {
        let (got, problem, _) = api.transfer(body.clone()).await;
        assert_eq!((got, problem_code(&problem)), (status, kind), "{body} → {problem}");
    }
    let (status, problem, _) = api.post("/v1/transfers", None, &t(a, b, 10, "EUR")).await;
    assert_eq!(
        (status, problem_code(&problem)),
        (StatusCode::BAD_REQUEST, "idempotency-key-required")
    );

    // A transfer id that is an account's id is taken too (and a neighbour's deposit sent at the
    // same moment is not disturbed by it).
    let key = Uuid::now_v7().to_string();
    let (clash, deposit) = tokio::join!(
        api.transfer(
            json!({"from": a, "to": b, "amount": 1, "currency": "EUR", "mode": "immediate", "transfer_id": b})
        ),
        api.post(&format!("/v1/accounts/{b}/deposits"), Some(&key), &json!({"amount": 1})),
    );
    assert_eq!(
        (clash.0, problem_code(&clash.1)),
        (StatusCode::CONFLICT, "transfer-exists")
    );
    assert_eq!(deposit.0, StatusCode::CREATED, "{}", deposit.1);

    let used = Uuid::now_v7();
    let with_id = json!({"from": a, "to": b, "amount": 1, "currency": "EUR", "mode": "immediate", "transfer_id": used});
    assert_eq!(api.transfer(with_id.clone()).await.0, StatusCode::CREATED);
    let (status, problem, _) = api.transfer(with_id).await;
    assert_eq!(
        (status, problem_code(&problem)),
        (StatusCode::CONFLICT, "transfer-exists")
    );

    let events = db.store().read_stream(a, 0, 100).await.unwrap();
    assert_eq!(
        events.len(),
        3,
        "opened, deposited, one transfer: refusals appended nothing"
    );
}

#[tokio::test]
async fn a_pending_transfer_holds_funds_until_posted_or_voided() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let (a, b) = (api.funded("EUR", 1_000).await, api.funded("EUR", 0).await);

    let (status, pending, _) = api
        .transfer(json!({"from": a, "to": b, "amount": 400, "currency": "EUR", "mode": "pending", "expires_in_s": 600}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pending}");
    assert_eq!(pending["status"], "pending");
    assert_eq!(
        (
            &pending["from"]["balance"],
            &pending["from"]["held"],
            &pending["from"]["available"]
        ),
        (&json!(1000), &json!(400), &json!(600))
    );
    let id = pending["transfer_id"].as_str().unwrap();
    let (status, refused, _) = api
        .transfer(json!({"from": a, "to": b, "amount": 601, "currency": "EUR", "mode": "immediate"}))
        .await;
    assert_eq!(
        (status, problem_code(&refused)),
        (StatusCode::UNPROCESSABLE_ENTITY, "insufficient-funds"),
        "held money is not available"
    );

    let (status, posted, _) = api
        .post_keyed(&format!("/v1/transfers/{id}/post"), &json!({"amount": 250}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{posted}");
    assert_eq!(posted["status"], "posted");
    assert_eq!(posted["posted_amount"], 250);
    assert_eq!(
        (&posted["from"]["balance"], &posted["from"]["held"]),
        (&json!(750), &json!(0))
    );
    assert_eq!(posted["to"]["balance"], 250);
    let (status, again, _) = api.post_keyed(&format!("/v1/transfers/{id}/void"), &json!({})).await;
    assert_eq!(
        (status, problem_code(&again)),
        (StatusCode::UNPROCESSABLE_ENTITY, "transfer-not-pending")
    );

    let (_, second, _) = api
        .transfer(json!({"from": a, "to": b, "amount": 100, "currency": "EUR", "mode": "pending"}))
        .await;
    let id = second["transfer_id"].as_str().unwrap();
    let (status, voided, _) = api.post_keyed(&format!("/v1/transfers/{id}/void"), &json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{voided}");
    assert_eq!(voided["status"], "voided");
    assert_eq!(
        (&voided["from"]["balance"], &voided["from"]["held"]),
        (&json!(750), &json!(0))
    );

    let missing = Uuid::now_v7();
    let (status, problem, _) = api
        .post_keyed(&format!("/v1/transfers/{missing}/post"), &json!({}))
        .await;
    assert_eq!(
        (status, problem_code(&problem)),
        (StatusCode::NOT_FOUND, "transfer-not-found")
    );
}

#[tokio::test]
async fn two_expiry_workers_release_an_overdue_hold_exactly_once() {
    let db = TestDb::new().await;
    let fast = [("TALLY_EXPIRY_INTERVAL_MS", "50".to_owned())];
    let (api, _one) = command_api(&db, &fast).await;
    let (_, _two) = command_api(&db, &fast).await;
    let (a, b) = (api.funded("EUR", 500).await, api.funded("EUR", 0).await);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (status, pending, _) = api
            .transfer(
                json!({"from": a, "to": b, "amount": 100, "currency": "EUR", "mode": "pending", "expires_in_s": 1}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{pending}");
        ids.push(pending["transfer_id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }

    let store = db.store();
    for id in &ids {
        eventually(Duration::from_secs(15), "the hold to expire", || async {
            let events = store.read_stream(*id, 0, 10).await.unwrap();
            events.iter().any(|e| e.event_type == "TransferExpired").then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &ids {
        let types: Vec<String> = store
            .read_stream(*id, 0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_type)
            .collect();
        assert_eq!(types, ["TransferPending", "TransferExpired"], "expired once");
    }
    let releases = store
        .read_stream(a, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "HoldReleased")
        .count();
    assert_eq!(releases, 5, "each hold released exactly once");
    let (status, body, _) = api
        .post_keyed(&format!("/v1/accounts/{a}/withdrawals"), &json!({"amount": 500}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "all funds are available again: {body}");
}

/// What a random client did, to check against the log afterwards.
#[derive(Default)]
struct Ledger {
    /// Accepted effects by kind.
    immediate: usize,
    pending: usize,
    posted: usize,
    voided: usize,
    /// Pending transfers not (yet) posted or voided by a client.
    open_pending: Vec<String>,
}

#[tokio::test]
async fn sixty_four_clients_moving_money_at_random_conserve_it_exactly() {
    const ACCOUNTS: usize = 100;
    const CLIENTS: usize = 64;
    const TRANSFERS: usize = 10_000;
    const FUNDS: i64 = 1_000;
    let db = TestDb::new().await;
    let (api, api_proc) = command_api(&db, &[("TALLY_EXPIRY_INTERVAL_MS", "100".to_owned())]).await;
    let mut accounts = Vec::new();
    for _ in 0..ACCOUNTS {
        accounts.push(api.funded("EUR", FUNDS).await);
    }

    let clients = (0..CLIENTS).map(|_| {
        let (api, accounts) = (api.clone(), accounts.clone());
        tokio::spawn(async move {
            let mut ledger = Ledger::default();
            let mut rng = rand::rngs::StdRng::from_os_rng();
            for _ in 0..TRANSFERS / CLIENTS {
                let from = *accounts.choose(&mut rng).unwrap();
                let to = *accounts.choose(&mut rng).unwrap();
                let amount = rng.random_range(1..=300);
                let body = match rng.random_range(0..10) {
                    0..6 => json!({"from": from, "to": to, "amount": amount, "currency": "EUR", "mode": "immediate"}),
                    // Short holds: some expire before a client posts or voids them.
                    _ => json!({"from": from, "to": to, "amount": amount, "currency": "EUR", "mode": "pending",
                                "expires_in_s": rng.random_range(1..=3)}),
                };
                let key = Uuid::now_v7().to_string();
                let first = api.post("/v1/transfers", Some(&key), &body).await;
                if rng.random_ratio(1, 10) {
                    let retry = api.post("/v1/transfers", Some(&key), &body).await;
                    assert_eq!(
                        (retry.0, &retry.1),
                        (first.0, &first.1),
                        "a retry returns the first response"
                    );
                    assert!(
                        retry.2 || first.0 != StatusCode::CREATED,
                        "an accepted retry is marked replayed"
                    );
                }
                match first.0 {
                    StatusCode::CREATED if body["mode"] == "immediate" => ledger.immediate += 1,
                    StatusCode::CREATED => {
                        ledger.pending += 1;
                        ledger
                            .open_pending
                            .push(first.1["transfer_id"].as_str().unwrap().to_owned());
                    }
                    StatusCode::UNPROCESSABLE_ENTITY => {
                        let kind = problem_code(&first.1);
                        assert!(
                            ["insufficient-funds", "transfer-to-self"].contains(&kind),
                            "unexpected refusal {}",
                            first.1
                        );
                    }
                    other => panic!("{other}: {}", first.1),
                }
                // Now and then settle one of this client's pending transfers.
                if !ledger.open_pending.is_empty() && rng.random_ratio(1, 4) {
                    let id = ledger
                        .open_pending
                        .swap_remove(rng.random_range(0..ledger.open_pending.len()));
                    let (action, body) = if rng.random_bool(0.5) {
                        ("post", json!({}))
                    } else {
                        ("void", json!({}))
                    };
                    let (status, reply, _) = api.post_keyed(&format!("/v1/transfers/{id}/{action}"), &body).await;
                    match (status, problem_code(&reply)) {
                        (StatusCode::CREATED, _) if action == "post" => ledger.posted += 1,
                        (StatusCode::CREATED, _) => ledger.voided += 1,
                        // The worker expired it first, or (post) its deadline has passed.
                        (StatusCode::UNPROCESSABLE_ENTITY, "transfer-not-pending" | "hold-expired") => {}
                        other => panic!("{action}: {other:?} {reply}"),
                    }
                }
            }
            ledger
        })
    });
    let ledgers: Vec<Ledger> = futures::future::join_all(clients)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let sum = |f: fn(&Ledger) -> usize| ledgers.iter().map(f).sum::<usize>();
    let (immediate, pending, posted, voided) = (
        sum(|l| l.immediate),
        sum(|l| l.pending),
        sum(|l| l.posted),
        sum(|l| l.voided),
    );

    // Let every remaining hold expire (deadlines are at most 3 s away).
    let store = db.store();
    let balances: HashMap<Uuid, (i64, i64)> =
        eventually(Duration::from_secs(30), "every hold to be settled", || async {
            let mut balances = HashMap::new();
            for id in &accounts {
                let loaded = tally_command_api::execute::load_account(&store, *id).await.unwrap();
                let account = loaded.account().unwrap();
                balances.insert(*id, (account.balance, account.held));
            }
            balances.values().all(|(_, held)| *held == 0).then_some(balances)
        })
        .await;

    let total: i64 = balances.values().map(|(balance, _)| balance).sum();
    assert_eq!(total, FUNDS * ACCOUNTS as i64, "money is conserved exactly");
    assert!(
        balances.values().all(|(balance, _)| *balance >= 0),
        "no account went below its (zero) overdraft limit"
    );
    let count = |event_type: &'static str| {
        let pool = db.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1")
                .bind(event_type)
                .fetch_one(&pool)
                .await
                .unwrap();
            n as usize
        }
    };
    assert_eq!(
        count("TransferCompleted").await,
        immediate,
        "one record per accepted immediate transfer"
    );
    assert_eq!(count("TransferDebited").await, immediate);
    assert_eq!(count("TransferPending").await, pending);
    assert_eq!(count("HoldPlaced").await, pending);
    assert_eq!(count("TransferPosted").await, posted);
    assert_eq!(count("TransferVoided").await, voided);
    assert_eq!(
        count("TransferExpired").await,
        pending - posted - voided,
        "every other pending transfer expired, once\n{}",
        api_proc.log_tail()
    );
    assert_eq!(count("TransferCredited").await, immediate + posted);
}
