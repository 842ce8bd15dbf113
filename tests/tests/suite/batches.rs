//! `POST /v1/batches` through the real services (ADR 0005): each item's own result in order,
//! exactly what its single route answers; a malformed item failing alone; linked chains
//! written whole or not at all (a refusal in item 5 writes nothing of the chain); a retried
//! batch replaying every item; oversized batches refused; and concurrent batches conserving
//! money in few transactions.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_tests::{Api, TestDb, command_api, fold, problem_code};
use uuid::Uuid;

fn transfer(key: &str, from: Uuid, to: Uuid, amount: i64) -> Value {
    json!({"kind": "transfer", "idempotency_key": key, "from": from, "to": to, "amount": amount,
           "currency": "EUR", "mode": "immediate"})
}

fn linked(mut item: Value) -> Value {
    item["linked"] = json!(true);
    item
}

/// Sends `items` as one batch; checks the answer is 200 with one result per item, in order.
async fn batch(api: &Api, items: &[Value]) -> Vec<Value> {
    let (status, body, _) = api.post("/v1/batches", None, &json!({ "items": items })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().expect("results").clone();
    assert_eq!(results.len(), items.len());
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result["index"], i, "results come in order");
    }
    results
}

fn status_of(result: &Value) -> u64 {
    result["status"].as_u64().unwrap()
}

async fn events(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_batch_answers_each_item_as_its_single_route_would_and_a_retry_replays_them() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let (a, b, c) = (
        api.funded("EUR", 1_000).await,
        api.funded("EUR", 0).await,
        api.funded("EUR", 0).await,
    );
    let pending = Uuid::now_v7();
    let items = vec![
        json!({"kind": "deposit", "idempotency_key": "d-1", "account_id": a, "amount": 100}),
        transfer("t-1", a, b, 300),
        json!({"kind": "entry", "idempotency_key": "e-1", "mode": "immediate", "legs": [
            {"account": a, "direction": "debit", "amount": 100},
            {"account": b, "direction": "credit", "amount": 97},
            {"account": c, "direction": "credit", "amount": 3}]}),
        json!({"kind": "transfer", "idempotency_key": "p-1", "transfer_id": pending, "from": a, "to": c,
               "amount": 50, "currency": "EUR", "mode": "pending"}),
        // Posts the transfer the item before created, in the same batch.
        json!({"kind": "post", "idempotency_key": "p-2", "transfer_id": pending, "amount": 20}),
        json!({"kind": "withdrawal", "idempotency_key": "w-1", "account_id": b, "amount": 10}),
        json!({"kind": "deposit", "idempotency_key": "bad-1", "account_id": a, "amount": 0}),
        json!("not an item"),
        json!({"kind": "transfer", "idempotency_key": "bad-2", "from": a, "to": b, "amount": 1,
               "currency": "EUR", "mode": "immediate", "colour": "blue"}),
        json!({"kind": "void", "idempotency_key": "bad-3", "transfer_id": Uuid::now_v7()}),
        json!({"kind": "deposit", "account_id": a, "amount": 5}),
        json!({"kind": "withdrawal", "idempotency_key": "w-2", "account_id": c, "amount": 100_000}),
        json!({"kind": "deposit", "idempotency_key": "d-1", "account_id": c, "amount": 1}),
    ];
    let before = events(&db).await;
    let first = batch(&api, &items).await;
    let statuses: Vec<u64> = first.iter().map(status_of).collect();
    assert_eq!(
        statuses,
        [201, 201, 201, 201, 201, 201, 422, 422, 422, 404, 400, 422, 422],
        "{first:#?}"
    );
    let codes: Vec<&str> = first[6..].iter().map(|r| problem_code(&r["body"])).collect();
    assert_eq!(
        codes,
        [
            "invalid-amount",
            "invalid-body",
            "invalid-body",
            "transfer-not-found",
            "idempotency-key-required",
            "insufficient-funds",
            "idempotency-key-repeated"
        ]
    );
    assert_eq!(first[12]["body"]["first_index"], 0);
    // The bodies are the single routes' own shapes.
    assert_eq!(first[0]["body"]["balance"], 1_100);
    assert_eq!(first[1]["body"]["status"], "completed");
    assert_eq!(first[1]["body"]["to"]["balance"], 300);
    assert_eq!(first[2]["body"]["legs"][2]["balance"], 3);
    assert_eq!(first[3]["body"]["status"], "pending");
    assert_eq!(first[4]["body"]["status"], "posted");
    assert_eq!(first[4]["body"]["from"]["balance"], 1_100 - 300 - 100 - 20);
    assert_eq!(first[4]["body"]["from"]["held"], 0);
    assert_eq!(first[4]["body"]["to"]["balance"], 23);
    assert_eq!(first[5]["body"]["balance"], 300 + 97 - 10);
    assert_eq!(first[11]["body"]["available"], 23);
    // One deposit, one transfer (3 events), one entry (4), a pending transfer (2: the hold and
    // the transfer's record) and its post (3), one withdrawal.
    assert_eq!(events(&db).await - before, 1 + 3 + 4 + 2 + 3 + 1);

    // The same batch again: every item the writer saw replays its stored result (refusal
    // included); the ones refused before it are refused the same way again; nothing is written.
    let again = batch(&api, &items).await;
    for (i, (first, again)) in first.iter().zip(&again).enumerate() {
        assert_eq!(
            (&first["status"], &first["body"]),
            (&again["status"], &again["body"]),
            "item {i}"
        );
        let stored = matches!(i, 0..=5 | 11);
        assert_eq!(again["replayed"], stored, "item {i}: {again}");
    }
    assert_eq!(events(&db).await - before, 14, "a retried batch writes nothing");

    // A key of the batch sent with another item is a reused key.
    let other = vec![json!({"kind": "deposit", "idempotency_key": "d-1", "account_id": a, "amount": 101})];
    let reused = batch(&api, &other).await;
    assert_eq!(problem_code(&reused[0]["body"]), "idempotency-key-reused");
}

#[tokio::test]
async fn a_linked_chain_is_written_whole_or_not_at_all() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let mut accounts = Vec::new();
    for _ in 0..6 {
        accounts.push(api.funded("EUR", 100).await);
    }
    let count = |stream: Uuid| db.event_count(stream);
    let mut counts = Vec::new();
    for &account in &accounts {
        counts.push(count(account).await);
    }
    let items = vec![
        json!({"kind": "deposit", "idempotency_key": "free-0", "account_id": accounts[0], "amount": 7}),
        // The chain: items 1 to 6; item 2 spends what item 1 brought; item 5 is refused.
        linked(transfer("c-1", accounts[1], accounts[2], 50)),
        linked(transfer("c-2", accounts[2], accounts[3], 150)),
        linked(
            json!({"kind": "entry", "idempotency_key": "c-3", "mode": "immediate", "legs": [
            {"account": accounts[3], "direction": "debit", "amount": 30},
            {"account": accounts[4], "direction": "credit", "amount": 30}]}),
        ),
        linked(json!({"kind": "deposit", "idempotency_key": "c-4", "account_id": accounts[4], "amount": 1})),
        linked(transfer("c-5", accounts[5], accounts[0], 1_000)),
        transfer("c-6", accounts[4], accounts[5], 10),
        // Not chained: runs on its own.
        transfer("free-7", accounts[5], accounts[0], 10),
    ];
    let results = batch(&api, &items).await;
    let statuses: Vec<u64> = results.iter().map(status_of).collect();
    assert_eq!(statuses, [201, 422, 422, 422, 422, 422, 422, 201], "{results:#?}");
    assert_eq!(problem_code(&results[5]["body"]), "insufficient-funds");
    for i in [1, 2, 3, 4, 6] {
        assert_eq!(
            problem_code(&results[i]["body"]),
            "linked-item-failed",
            "{}",
            results[i]
        );
        assert_eq!(results[i]["body"]["failed_index"], 5);
    }
    for (i, &account) in accounts.iter().enumerate().skip(1).take(4) {
        assert_eq!(
            count(account).await,
            counts[i],
            "nothing of the chain reached account {i}"
        );
    }
    assert_eq!(count(accounts[5]).await, counts[5] + 1, "only the free transfer");
    assert_eq!(results[7]["body"]["from"]["balance"], 90);

    // A retry replays the chain's refusals: stored like any refusal.
    let again = batch(&api, &items).await;
    for (first, again) in results.iter().zip(&again) {
        assert_eq!(first["body"], again["body"]);
        assert_eq!(again["replayed"], true);
    }

    // A chain whose item does not parse fails whole before anything runs, and so does a chain
    // left open at the end of the batch.
    let items = vec![
        linked(transfer("m-0", accounts[1], accounts[2], 1)),
        linked(json!({"kind": "deposit", "idempotency_key": "m-1", "account_id": accounts[1], "amount": -5})),
        transfer("m-2", accounts[2], accounts[3], 1),
        linked(transfer("m-3", accounts[1], accounts[2], 1)),
    ];
    let results = batch(&api, &items).await;
    let codes: Vec<&str> = results.iter().map(|r| problem_code(&r["body"])).collect();
    assert_eq!(
        codes,
        [
            "linked-item-failed",
            "invalid-amount",
            "linked-item-failed",
            "linked-chain-open"
        ]
    );
    assert_eq!(count(accounts[1]).await, counts[1]);

    // A chain that holds, then posts what it held: both in, in one transaction.
    let hold = Uuid::now_v7();
    let items = vec![
        linked(
            json!({"kind": "transfer", "idempotency_key": "h-1", "transfer_id": hold,
                      "from": accounts[1], "to": accounts[2], "amount": 40, "currency": "EUR",
                      "mode": "pending"}),
        ),
        json!({"kind": "post", "idempotency_key": "h-2", "transfer_id": hold}),
    ];
    let results = batch(&api, &items).await;
    assert_eq!(
        results.iter().map(status_of).collect::<Vec<_>>(),
        [201, 201],
        "{results:#?}"
    );
    assert_eq!(results[1]["body"]["from"]["balance"], 60);
    let stream = db.read_whole_stream(hold).await;
    let transactions: HashSet<i64> = stream.iter().map(|e| e.tx_id).collect();
    assert_eq!(transactions.len(), 1, "a chain commits in one transaction");
}

#[tokio::test]
async fn oversized_empty_and_malformed_batches_are_refused_whole() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let account = api.funded("EUR", 10).await;
    let item =
        |i: usize| json!({"kind": "deposit", "idempotency_key": format!("k-{i}"), "account_id": account, "amount": 1});
    let too_many: Vec<Value> = (0..8_191).map(item).collect();
    let (status, problem, _) = api.post("/v1/batches", None, &json!({ "items": too_many })).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{problem}");
    assert_eq!(problem_code(&problem), "batch-too-large");
    assert_eq!(problem["items_max"], 8_190);

    let (status, problem, _) = api.post("/v1/batches", None, &json!({ "items": [] })).await;
    assert_eq!(
        (status, problem_code(&problem)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid-batch")
    );
    let (status, problem, _) = api.post("/v1/batches", None, &json!({ "items": {} })).await;
    assert_eq!(
        (status, problem_code(&problem)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid-body")
    );
    assert_eq!(db.event_count(account).await, 2, "nothing ran");

    // The most items a batch takes are all answered.
    let most: Vec<Value> = (0..8_190).map(item).collect();
    let results = batch(&api, &most).await;
    assert!(results.iter().all(|r| status_of(r) == 201));
    assert_eq!(db.read_whole_stream(account).await.len(), 2 + 8_190);
}

#[tokio::test]
async fn concurrent_batches_conserve_money_in_few_transactions_and_retries_take_effect_once() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let mut accounts = Vec::new();
    for _ in 0..100 {
        accounts.push(api.funded("EUR", 1_000).await);
    }
    let before: i64 = sqlx::query_scalar("SELECT COALESCE(max(position), 0) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|client| {
            let (api, accounts) = (api.clone(), accounts.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::from_os_rng();
                let mut moved = 0;
                for round in 0..4 {
                    let items: Vec<Value> = (0..250)
                        .map(|i| {
                            let from = accounts[rng.random_range(0..accounts.len())];
                            let mut to = from;
                            while to == from {
                                to = accounts[rng.random_range(0..accounts.len())];
                            }
                            let item = transfer(&format!("{client}-{round}-{i}"), from, to, rng.random_range(1..400));
                            // Every tenth item opens a chain of three.
                            if i % 10 < 2 { linked(item) } else { item }
                        })
                        .collect();
                    let first = batch(&api, &items).await;
                    // A client that lost the answer retries: every item replays.
                    let again = batch(&api, &items).await;
                    for (first, again) in first.iter().zip(&again) {
                        assert_eq!(first["body"], again["body"]);
                        assert_eq!(again["replayed"], true, "{again}");
                    }
                    for chain in first.chunks(10).map(|c| &c[..3]) {
                        let ok: Vec<bool> = chain.iter().map(|r| status_of(r) == 201).collect();
                        assert!(
                            ok.iter().all(|&o| o) || ok.iter().all(|&o| !o),
                            "a chain is whole: {chain:?}"
                        );
                    }
                    for result in &first {
                        match status_of(result) {
                            201 => moved += 1,
                            422 => assert!(
                                ["insufficient-funds", "linked-item-failed"].contains(&problem_code(&result["body"])),
                                "{result}"
                            ),
                            other => panic!("{other}: {result}"),
                        }
                    }
                }
                moved
            })
        })
        .collect();
    let mut moved = 0;
    for task in tasks {
        moved += task.await.unwrap();
    }
    assert!(moved > 4_000, "most transfers went through ({moved} of 8000)");

    let expected = fold::expected(&db.pool).await;
    let total: i64 = expected.balances.values().map(|b| b.balance).sum();
    assert_eq!(total, 100 * 1_000, "batches move money, never make or lose it");
    assert!(expected.balances.values().all(|b| b.balance >= 0), "no overdraft");
    let (events, transactions): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT tx_id) FROM events WHERE position > $1")
            .bind(before)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(events, 3 * moved, "each accepted transfer once, retries included");
    eprintln!("{moved} transfers in {transactions} transactions");
    assert!(
        transactions * 10 <= moved,
        "group commit shares transactions: {moved} transfers in {transactions}"
    );
}

#[tokio::test]
async fn a_post_follows_the_transfer_the_log_holds_and_a_chain_key_replays_only_in_its_own_chain() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let (a, b, c, d) = (
        api.funded("EUR", 100).await,
        api.funded("EUR", 0).await,
        api.funded("EUR", 100).await,
        api.funded("EUR", 0).await,
    );
    // A pending transfer a -> b exists; a batch item claims its id for c -> d (refused: the id
    // is taken), and the post after it posts the transfer the log holds.
    let held = Uuid::now_v7();
    let (status, body, _) = api
        .transfer(json!({"transfer_id": held, "from": a, "to": b, "amount": 30, "currency": "EUR", "mode": "pending"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let items = vec![
        json!({"kind": "transfer", "idempotency_key": "x-1", "transfer_id": held, "from": c, "to": d,
               "amount": 5, "currency": "EUR", "mode": "pending"}),
        json!({"kind": "post", "idempotency_key": "x-2", "transfer_id": held}),
    ];
    let results = batch(&api, &items).await;
    assert_eq!(problem_code(&results[0]["body"]), "transfer-exists");
    assert_eq!(status_of(&results[1]), 201, "{}", results[1]);
    assert_eq!(results[1]["body"]["from"]["account_id"], json!(a));
    assert_eq!(results[1]["body"]["to"]["balance"], 30);

    // A new id created twice in one batch: the first (refused) names c -> d, the second
    // (accepted) a -> b. The post read its parties from the first, so it is refused as stale
    // (409, nothing written, the server keeps running) and a retry on its own posts it.
    let twice = Uuid::now_v7();
    let items = vec![
        json!({"kind": "transfer", "idempotency_key": "y-1", "transfer_id": twice, "from": c, "to": d,
               "amount": 1_000, "currency": "EUR", "mode": "pending"}),
        json!({"kind": "transfer", "idempotency_key": "y-2", "transfer_id": twice, "from": a, "to": b,
               "amount": 10, "currency": "EUR", "mode": "pending"}),
        json!({"kind": "post", "idempotency_key": "y-3", "transfer_id": twice}),
    ];
    let results = batch(&api, &items).await;
    assert_eq!(
        results.iter().map(status_of).collect::<Vec<_>>(),
        [422, 201, 409],
        "{results:#?}"
    );
    let again = batch(
        &api,
        &[json!({"kind": "post", "idempotency_key": "y-4", "transfer_id": twice})],
    )
    .await;
    assert_eq!(status_of(&again[0]), 201, "{}", again[0]);
    assert_eq!(again[0]["body"]["to"]["balance"], 40);

    // A chain refused at its second item; the first item's key sent again in a chain whose
    // second item is mended (under a new key) is a reused key: that chain fails whole too.
    let refused = vec![linked(transfer("z-1", c, d, 10)), transfer("z-2", c, d, 1_000)];
    let results = batch(&api, &refused).await;
    assert_eq!(problem_code(&results[0]["body"]), "linked-item-failed");
    assert_eq!(problem_code(&results[1]["body"]), "insufficient-funds");
    let before = db.event_count(d).await;
    let mended = vec![linked(transfer("z-1", c, d, 10)), transfer("z-3", c, d, 20)];
    let results = batch(&api, &mended).await;
    assert_eq!(
        problem_code(&results[0]["body"]),
        "idempotency-key-reused",
        "{results:#?}"
    );
    assert_eq!(problem_code(&results[1]["body"]), "linked-item-failed");
    assert_eq!(
        db.event_count(d).await,
        before,
        "nothing of the mended chain is written"
    );
}
