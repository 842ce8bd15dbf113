//! Journal entries through the real services (ADR 0004): a payment with a fee booked
//! atomically, a 64-leg entry, refusals that name the leg and write nothing (a refusal in leg
//! 17 of 20), idempotent retries, the entry read back from the query API, its legs on the
//! accounts' statements, and the books still balancing under 32 concurrent clients.

use std::collections::HashSet;
use std::time::Duration;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_service::auth::Role;
use tally_tests::{Api, Stack, TestDb, client, client_with, command_api, eventually, fold, problem_code, token};
use uuid::Uuid;

fn leg(account: Uuid, direction: &str, amount: i64) -> Value {
    json!({"account": account, "direction": direction, "amount": amount})
}

fn entry(legs: Vec<Value>) -> Value {
    json!({"mode": "immediate", "reference": "card payment", "legs": legs})
}

#[tokio::test]
async fn a_payment_with_a_fee_books_every_leg_in_one_transaction_and_a_retry_replays_it() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let (customer, merchant, fees) = (
        api.funded("EUR", 100).await,
        api.funded("EUR", 0).await,
        api.funded("EUR", 0).await,
    );
    let body = entry(vec![
        leg(customer, "debit", 100),
        leg(merchant, "credit", 97),
        leg(fees, "credit", 3),
    ]);

    let (status, first, _) = api.post("/v1/entries", Some("payment-1"), &body).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["status"], "completed");
    let balances: Vec<i64> = first["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["balance"].as_i64().unwrap())
        .collect();
    assert_eq!(balances, [0, 97, 3]);
    assert_eq!(first["legs"][1]["direction"], "credit");
    assert_eq!(first["legs"][0]["available"], 0);
    let entry_id: Uuid = first["entry_id"].as_str().unwrap().parse().unwrap();

    let (status, again, replayed) = api.post("/v1/entries", Some("payment-1"), &body).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    assert_eq!(again, first, "a retry gets the first response and moves nothing");

    let store = db.store();
    let mut events = Vec::new();
    // The customer's stream holds its opening and deposit; the others only their opening.
    for (stream, after) in [(customer, 2), (merchant, 1), (fees, 1), (entry_id, 0)] {
        let page = store.read_stream(stream, after, 10).await.unwrap();
        assert_eq!(page.len(), 1, "one event per stream, none from the retry");
        events.push(page.into_iter().next().unwrap());
    }
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["EntryDebited", "EntryCredited", "EntryCredited", "EntryCompleted"]
    );
    let transactions: HashSet<i64> = events.iter().map(|e| e.tx_id).collect();
    assert_eq!(transactions.len(), 1, "every leg and the entry commit together");

    // The same entry id again, under another key: the id is used once.
    let mut reused = body.clone();
    reused["entry_id"] = json!(entry_id);
    let (status, problem, _) = api.post("/v1/entries", Some("payment-2"), &reused).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem_code(&problem), "entry-exists");
}

#[tokio::test]
async fn a_refused_leg_is_named_and_nothing_of_the_entry_is_written() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let mut accounts = Vec::new();
    for _ in 0..20 {
        accounts.push(api.funded("EUR", 10).await);
    }
    let usd = api.funded("USD", 10).await;
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Ten debits of 10 and ten credits of 10; each case breaks one thing.
    let mut legs: Vec<Value> = (0..20)
        .map(|i| leg(accounts[i], if i < 10 { "debit" } else { "credit" }, 10))
        .collect();
    let cases: Vec<(Vec<Value>, StatusCode, &str, Option<i64>)> = vec![
        // An amount of 0 in leg 12 (the first bad amount is named).
        (
            {
                let mut l = legs.clone();
                l[17] = leg(accounts[17], "debit", 11);
                l[3] = leg(accounts[3], "credit", 1);
                l[12] = leg(accounts[12], "credit", 0);
                l
            },
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-amount",
            Some(12),
        ),
        (
            {
                let mut l: Vec<Value> = (0..20)
                    .map(|i| leg(accounts[i], if i % 2 == 0 { "debit" } else { "credit" }, 10))
                    .collect();
                l[16] = leg(accounts[16], "debit", 20);
                l[17] = leg(accounts[17], "credit", 20);
                l
            },
            StatusCode::UNPROCESSABLE_ENTITY,
            "insufficient-funds",
            Some(16),
        ),
        (
            {
                let mut l = legs.clone();
                l[17] = leg(usd, "credit", 10);
                l
            },
            StatusCode::UNPROCESSABLE_ENTITY,
            "entry-unbalanced",
            None,
        ),
        (
            {
                let mut l = legs.clone();
                l[17] = leg(Uuid::now_v7(), "credit", 10);
                l
            },
            StatusCode::NOT_FOUND,
            "account-not-found",
            Some(17),
        ),
        (
            {
                let mut l = legs.clone();
                l[17] = leg(accounts[2], "credit", 10);
                l
            },
            StatusCode::UNPROCESSABLE_ENTITY,
            "account-repeated",
            Some(17),
        ),
        (
            {
                let mut l = legs.clone();
                l[19]["amount"] = json!(9);
                l
            },
            StatusCode::UNPROCESSABLE_ENTITY,
            "entry-unbalanced",
            None,
        ),
        (
            vec![legs[0].clone()],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-legs",
            None,
        ),
    ];
    for (i, (case_legs, status, code, leg_index)) in cases.into_iter().enumerate() {
        let (got, problem, _) = api
            .post("/v1/entries", Some(&format!("refused-{i}")), &entry(case_legs))
            .await;
        assert_eq!((got, problem_code(&problem)), (status, code), "case {i}: {problem}");
        assert_eq!(problem["leg"].as_i64(), leg_index, "case {i}: {problem}");
    }
    // A frozen account in leg 5 refuses its debit.
    let (status, _, _) = api
        .post(
            &format!("/v1/accounts/{}/freeze", accounts[5]),
            None,
            &json!({"reason": "lost card"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, problem, _) = api.post("/v1/entries", Some("frozen"), &entry(legs.clone())).await;
    assert_eq!(
        (status, problem_code(&problem)),
        (StatusCode::UNPROCESSABLE_ENTITY, "account-frozen")
    );
    assert_eq!(problem["leg"], 5, "{problem}");
    // Nothing of any refused entry was written (the freeze is the one new event).
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(after, before + 1);

    // Without the frozen account, the same shape books.
    legs[5] = leg(api.funded("EUR", 10).await, "debit", 10);
    legs.push(leg(usd, "debit", 10));
    legs.push(leg(api.funded("USD", 0).await, "credit", 10));
    let (status, body, _) = api.post("/v1/entries", Some("fine"), &entry(legs)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["legs"].as_array().unwrap().len(), 22);
}

#[tokio::test]
async fn a_64_leg_entry_is_read_back_and_its_legs_are_on_the_statements() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let source = api.funded("EUR", 6_300).await;
    let mut legs = vec![leg(source, "debit", 6_300)];
    let mut credited = Vec::new();
    for _ in 0..63 {
        let id = api.open("EUR").await;
        credited.push(id);
        legs.push(leg(id, "credit", 100));
    }
    let (status, body, _) = api
        .post("/v1/entries", Some(&Uuid::now_v7().to_string()), &entry(legs))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let entry_id = body["entry_id"].as_str().unwrap().to_owned();
    let token = body["consistency_token"].as_str().unwrap().to_owned();

    // The entry on the query API, with a token: at once.
    let reader = client();
    let response = reader
        .get(format!("{}/v1/entries/{entry_id}", stack.query))
        .header("X-Consistency-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["status"], "completed");
    assert_eq!(view["legs"].as_array().unwrap().len(), 64);
    assert_eq!(view["legs"][63]["leg"], 63);
    assert_eq!(view["legs"][63]["account"], credited[62].to_string());
    assert_eq!(view["legs"][0]["direction"], "debit");
    // Another id, or no role: refused.
    let missing = reader
        .get(format!("{}/v1/entries/{}", stack.query, Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let auditor_only = client_with(&token_of(Role::Auditor)).build().unwrap();
    let refused = auditor_only
        .get(format!("{}/v1/entries/{entry_id}", stack.query))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    // Each leg on its account's statement, naming the entry and the leg.
    let line = eventually(Duration::from_secs(30), "the last leg on its statement", || {
        let (reader, url) = (
            reader.clone(),
            format!("{}/v1/accounts/{}/statement", stack.query, credited[62]),
        );
        async move {
            let page: Value = reader.get(url).send().await.ok()?.json().await.ok()?;
            page["lines"].as_array()?.first().cloned()
        }
    })
    .await;
    assert_eq!(line["kind"], "entry");
    assert_eq!(line["entry_id"], entry_id);
    assert_eq!(line["leg"], 63);
    assert_eq!(
        (line["direction"].as_str(), line["amount"].as_i64()),
        (Some("credit"), Some(100))
    );

    // The read models equal the log, and the books balance.
    let expected = fold::expected(&stack.db.pool).await;
    eventually(Duration::from_secs(60), "the read models match the fold", || {
        let (pool, expected) = (stack.db.pool.clone(), expected.clone());
        async move { expected.shown_by(&fold::actual(&pool).await).then_some(()) }
    })
    .await;
    assert_eq!(expected.balances[&source].balance, 0);
}

fn token_of(role: Role) -> String {
    token("entries-test", &[role])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_clients_booking_entries_conserve_money_and_the_trial_balance_stays_zero() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let mut accounts = Vec::new();
    for _ in 0..24 {
        accounts.push(api.funded("EUR", 1_000).await);
    }
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (api, accounts) = (api.clone(), accounts.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::from_os_rng();
                let mut booked = 0;
                for _ in 0..25 {
                    // A payment with a fee: three distinct accounts.
                    let picked: Vec<Uuid> = accounts.choose_multiple(&mut rng, 3).copied().collect();
                    let amount = rng.random_range(2..200);
                    let fee = rng.random_range(1..amount);
                    let (status, body, _) = api
                        .post_keyed(
                            "/v1/entries",
                            &entry(vec![
                                leg(picked[0], "debit", amount),
                                leg(picked[1], "credit", amount - fee),
                                leg(picked[2], "credit", fee),
                            ]),
                        )
                        .await;
                    match status {
                        StatusCode::CREATED => booked += 1,
                        StatusCode::UNPROCESSABLE_ENTITY => {
                            assert_eq!(problem_code(&body), "insufficient-funds", "{body}");
                            assert_eq!(body["leg"], 0, "{body}");
                        }
                        other => panic!("{other}: {body}"),
                    }
                }
                booked
            })
        })
        .collect();
    let mut booked = 0;
    for task in tasks {
        booked += task.await.unwrap();
    }
    assert!(booked > 100, "most entries were booked ({booked})");

    let expected = fold::expected(&stack.db.pool).await;
    let total: i64 = expected.balances.values().map(|b| b.balance).sum();
    assert_eq!(total, 24 * 1_000, "entries move money, never make or lose it");
    assert!(expected.balances.values().all(|b| b.balance >= 0), "no overdraft");
    eventually(Duration::from_secs(60), "the read models match the fold", || {
        let (pool, expected) = (stack.db.pool.clone(), expected.clone());
        async move { expected.shown_by(&fold::actual(&pool).await).then_some(()) }
    })
    .await;
    let auditor = client_with(&token_of(Role::Auditor)).build().unwrap();
    let trial = eventually(Duration::from_secs(30), "the trial balance caught up", || {
        let (auditor, url) = (auditor.clone(), format!("{}/v1/ledger/trial-balance", stack.query));
        async move {
            let body: Value = auditor.get(url).send().await.ok()?.json().await.ok()?;
            let eur = body["currencies"].as_array()?.first()?.clone();
            (eur["in_transit"] == 0 && eur["client_balances"] == 24_000).then_some(eur)
        }
    })
    .await;
    assert_eq!(trial["balance"], 0, "{trial}");
    assert_eq!(trial["world"], -24_000, "{trial}");
}

#[tokio::test]
async fn a_pending_entry_holds_its_debits_until_posted_voided_or_expired() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[("TALLY_EXPIRY_INTERVAL_MS", "100".to_owned())]).await;
    let (customer, merchant, fees) = (
        api.funded("EUR", 300).await,
        api.funded("EUR", 0).await,
        api.funded("EUR", 0).await,
    );
    let pending = |expires_in_s: i64| {
        json!({"mode": "pending", "expires_in_s": expires_in_s, "reference": "hotel", "legs": [
            leg(customer, "debit", 100), leg(merchant, "credit", 97), leg(fees, "credit", 3)]})
    };
    let balance_of = |body: &Value, leg: usize| {
        let l = &body["legs"][leg];
        (
            l["balance"].as_i64().unwrap(),
            l["held"].as_i64().unwrap(),
            l["available"].as_i64().unwrap(),
        )
    };

    // Held: the debit leaves `available`, nothing moves yet.
    let (status, held, _) = api.post("/v1/entries", Some("hold-1"), &pending(3600)).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    assert_eq!(held["status"], "pending");
    assert!(held["expires_at"].is_string(), "{held}");
    assert_eq!(balance_of(&held, 0), (300, 100, 200));
    assert_eq!(balance_of(&held, 1), (0, 0, 0));
    let first = held["entry_id"].as_str().unwrap().to_owned();

    // Posted: every leg moves; a second post or a void is refused and moves nothing.
    let (status, posted, _) = api
        .post(&format!("/v1/entries/{first}/post"), Some("post-1"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{posted}");
    assert_eq!(posted["status"], "posted");
    assert_eq!(
        [balance_of(&posted, 0), balance_of(&posted, 1), balance_of(&posted, 2)],
        [(200, 0, 200), (97, 0, 97), (3, 0, 3)]
    );
    let (status, again, replayed) = api
        .post(&format!("/v1/entries/{first}/post"), Some("post-1"), &json!({}))
        .await;
    assert_eq!((status, replayed, &again), (StatusCode::CREATED, true, &posted));
    for (path, key) in [("void", "void-after-post"), ("post", "post-again")] {
        let (status, problem, _) = api
            .post(&format!("/v1/entries/{first}/{path}"), Some(key), &json!({}))
            .await;
        assert_eq!(
            (status, problem_code(&problem)),
            (StatusCode::UNPROCESSABLE_ENTITY, "entry-not-pending")
        );
        assert_eq!(problem["entry_status"], "posted");
    }

    // Voided: the hold returns, nothing moves.
    let (_, held, _) = api.post("/v1/entries", Some("hold-2"), &pending(3600)).await;
    let second = held["entry_id"].as_str().unwrap().to_owned();
    assert_eq!(balance_of(&held, 0), (200, 100, 100));
    let (status, voided, _) = api
        .post(&format!("/v1/entries/{second}/void"), Some("void-2"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{voided}");
    assert_eq!(voided["status"], "voided");
    assert_eq!(balance_of(&voided, 0), (200, 0, 200));
    assert_eq!(balance_of(&voided, 1), (97, 0, 97));

    // A hold beyond what is available is refused, naming the leg.
    let mut greedy = pending(3600);
    for (i, amount) in [(0, 201), (1, 198)] {
        greedy["legs"][i]["amount"] = json!(amount);
    }
    let (status, problem, _) = api.post("/v1/entries", Some("hold-greedy"), &greedy).await;
    assert_eq!(
        (status, problem_code(&problem), problem["leg"].as_i64()),
        (StatusCode::UNPROCESSABLE_ENTITY, "insufficient-funds", Some(0))
    );

    // Expired: the worker releases the hold once, and a late post is refused.
    let (_, held, _) = api.post("/v1/entries", Some("hold-3"), &pending(1)).await;
    let third = held["entry_id"].as_str().unwrap().to_owned();
    let store = db.store();
    let third_id: Uuid = third.parse().unwrap();
    let events = eventually(
        Duration::from_secs(20),
        "the expiry worker to release the entry",
        || {
            let store = store.clone();
            async move {
                let events = store.read_stream(third_id, 0, 10).await.ok()?;
                (events.len() == 2).then_some(events)
            }
        },
    )
    .await;
    assert_eq!(events[1].event_type, "EntryExpired");
    let (status, problem, _) = api
        .post(&format!("/v1/entries/{third}/post"), Some("post-3"), &json!({}))
        .await;
    assert_eq!(
        (status, problem_code(&problem)),
        (StatusCode::UNPROCESSABLE_ENTITY, "entry-not-pending")
    );
    let (account, _) = db.replay_account(customer).await;
    assert_eq!((account.balance, account.held), (200, 0));
    // Unknown entries are 404s.
    let (status, problem, _) = api
        .post(
            &format!("/v1/entries/{}/post", Uuid::now_v7()),
            Some("post-none"),
            &json!({}),
        )
        .await;
    assert_eq!(
        (status, problem_code(&problem)),
        (StatusCode::NOT_FOUND, "entry-not-found")
    );
}
