//! Durable idempotency through the real command API and Postgres.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_tests::{Api, Stack};
use uuid::Uuid;

#[tokio::test]
async fn a_retry_with_the_same_key_and_body_returns_the_first_response_and_appends_nothing() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let url = format!("/v1/accounts/{id}/deposits");
    let key = Uuid::now_v7().to_string();

    let first = api
        .post(&url, Some(&key), &json!({"amount": 1000, "reference": "r"}))
        .await;
    // Same request, keys of the body in another order: still the same request.
    let retry = api
        .post(&url, Some(&key), &json!({"reference": "r", "amount": 1000}))
        .await;

    assert_eq!(first.0, StatusCode::CREATED);
    assert!(!first.2, "the first response is not a replay");
    assert_eq!(retry.0, StatusCode::CREATED);
    assert!(retry.2, "the retry must be marked Idempotent-Replayed: true");
    assert_eq!(retry.1, first.1, "the retry returns exactly the first response");
    assert_eq!(stack.db.event_count(id).await, 2, "opened + one deposit");
    let metadata: Value =
        serde_json::from_str(&stack.db.store().read_stream(id, 1, 1).await.unwrap()[0].metadata).unwrap();
    assert_eq!(
        metadata["idempotency_key"],
        key.as_str(),
        "the key is recorded in the event's metadata"
    );
}

#[tokio::test]
async fn the_same_key_with_a_different_request_is_refused_and_changes_nothing() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let deposits = format!("/v1/accounts/{id}/deposits");
    let withdrawals = format!("/v1/accounts/{id}/withdrawals");
    let key = Uuid::now_v7().to_string();
    api.post(&deposits, Some(&key), &json!({"amount": 1000})).await;

    let other_amount = api.post(&deposits, Some(&key), &json!({"amount": 999})).await;
    let other_route = api.post(&withdrawals, Some(&key), &json!({"amount": 1000})).await;

    for (status, body, _) in [other_amount, other_route] {
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["type"], "https://tally.dev/problems/idempotency-key-reused");
    }
    assert_eq!(stack.db.event_count(id).await, 2);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_produce_exactly_one_effect() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let url = format!("/v1/accounts/{id}/deposits");
    let key = Uuid::now_v7().to_string();

    let requests = (0..16).map(|_| api.post(&url, Some(&key), &json!({"amount": 250})));
    let responses = futures::future::join_all(requests).await;

    assert!(
        responses.iter().all(|(s, _, _)| *s == StatusCode::CREATED),
        "{responses:?}"
    );
    assert_eq!(
        responses.iter().filter(|(_, _, replayed)| !replayed).count(),
        1,
        "exactly one request ran"
    );
    assert!(
        responses.iter().all(|(_, body, _)| *body == responses[0].1),
        "all got the same response"
    );
    assert_eq!(stack.db.event_count(id).await, 2);
    assert_eq!(responses[0].1["balance"], 250);
}

#[tokio::test]
async fn a_refused_command_is_refused_again_on_retry_even_after_the_state_changed() {
    // A client that saw "insufficient funds" may have moved on (paid another way, under a new
    // key); a late retry of the old request must not move the money after all.
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let withdrawals = format!("/v1/accounts/{id}/withdrawals");
    let key = Uuid::now_v7().to_string();

    let refused = api.post(&withdrawals, Some(&key), &json!({"amount": 500})).await;
    api.post(
        &format!("/v1/accounts/{id}/deposits"),
        Some("funding"),
        &json!({"amount": 1000}),
    )
    .await;
    let retried = api.post(&withdrawals, Some(&key), &json!({"amount": 500})).await;

    assert_eq!(refused.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.1["type"], "https://tally.dev/problems/insufficient-funds");
    assert_eq!(retried.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", retried.1);
    assert!(retried.2, "the stored refusal is replayed");
    assert_eq!(retried.1, refused.1, "exactly the first answer");
    assert_eq!(stack.db.event_count(id).await, 2, "opened + the deposit; no withdrawal");
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_a_400_problem() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let url = format!("/v1/accounts/{id}/deposits");

    for key in ["has space", &"k".repeat(256)] {
        let (status, body, _) = api.post(&url, Some(key), &json!({"amount": 1})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key:?}");
        assert_eq!(body["type"], "https://tally.dev/problems/invalid-idempotency-key");
    }
    assert_eq!(stack.db.event_count(id).await, 1);
}

#[tokio::test]
async fn a_deposit_or_withdrawal_without_a_key_is_a_400_problem_and_changes_nothing() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    api.post_keyed(&format!("/v1/accounts/{id}/deposits"), &json!({"amount": 1000}))
        .await;

    let client = tally_tests::client();
    for route in ["deposits", "withdrawals"] {
        let response = client
            .post(format!("{}/v1/accounts/{id}/{route}", stack.command))
            .json(&json!({"amount": 100}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{route}");
        assert_eq!(
            response.headers().get("content-type").unwrap(),
            "application/problem+json",
            "{route}"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(
            problem["type"], "https://tally.dev/problems/idempotency-key-required",
            "{route}: {problem}"
        );
        assert_eq!(problem["status"], 400);
        assert!(
            problem["detail"].as_str().unwrap().contains("Idempotency-Key"),
            "the detail says how to send one: {problem}"
        );
    }
    assert_eq!(stack.db.event_count(id).await, 2, "opened + the keyed deposit only");
}

#[tokio::test]
async fn keys_stored_unclaimed_report_the_ones_taken_including_by_a_transaction_in_flight() {
    use tally_event_store::idempotency::{self, IdempotencyKey, StoredResponse};

    let db = tally_tests::TestDb::new().await;
    let pool = db.store().pool().clone();
    let key = |k: &str| IdempotencyKey::parse(k).unwrap();
    let (old, new, raced) = (key("old"), key("new"), key("raced"));
    let hash = [7u8; 32];
    let response = StoredResponse {
        status: 201,
        body: json!({"balance": 1}),
    };

    let mut tx = pool.begin().await.unwrap();
    let taken = idempotency::store_many(&mut tx, &[(&old, &hash, &response)])
        .await
        .unwrap();
    assert!(taken.is_empty());
    tx.commit().await.unwrap();

    // One transaction holds `raced`, uncommitted, while another stores `old`, `new` and `raced`:
    // the second waits for the first, then reports both keys it did not get.
    let mut holder = pool.begin().await.unwrap();
    idempotency::store_many(&mut holder, &[(&raced, &hash, &response)])
        .await
        .unwrap();
    let second = tokio::spawn({
        let pool = pool.clone();
        let (old, new, raced, response) = (old.clone(), new.clone(), raced.clone(), response.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let mut taken = idempotency::store_many(
                &mut tx,
                &[
                    (&new, &hash, &response),
                    (&raced, &hash, &response),
                    (&old, &hash, &response),
                ],
            )
            .await
            .unwrap();
            taken.sort();
            taken
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "the second store waits for the key's holder");
    holder.commit().await.unwrap();
    assert_eq!(second.await.unwrap(), ["old", "raced"]);
}
