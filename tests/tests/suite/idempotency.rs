//! Durable idempotency through the real command API and Postgres.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_tests::Stack;
use uuid::Uuid;

async fn open(client: &reqwest::Client, stack: &Stack) -> String {
    let response = client
        .post(format!("{}/v1/accounts", stack.command))
        .json(&json!({"owner": "Ada", "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    body["account_id"].as_str().unwrap().to_owned()
}

async fn post_with_key(client: &reqwest::Client, url: &str, key: &str, body: Value) -> (StatusCode, bool, Value) {
    let response = client
        .post(url)
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    (status, replayed, response.json().await.unwrap_or(Value::Null))
}

async fn event_count(stack: &Stack, account_id: &str) -> usize {
    stack
        .db
        .store()
        .read_stream(account_id.parse().unwrap(), 0, 1000)
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn a_retry_with_the_same_key_and_body_returns_the_first_response_and_appends_nothing() {
    let stack = Stack::start().await;
    let client = reqwest::Client::new();
    let id = open(&client, &stack).await;
    let url = format!("{}/v1/accounts/{id}/deposits", stack.command);
    let key = Uuid::now_v7().to_string();

    let first = post_with_key(&client, &url, &key, json!({"amount": 1000, "reference": "r"})).await;
    // Same request, keys of the body in another order: still the same request.
    let retry = post_with_key(&client, &url, &key, json!({"reference": "r", "amount": 1000})).await;

    assert_eq!(first.0, StatusCode::CREATED);
    assert!(!first.1, "the first response is not a replay");
    assert_eq!(retry.0, StatusCode::CREATED);
    assert!(retry.1, "the retry must be marked Idempotent-Replayed: true");
    assert_eq!(retry.2, first.2, "the retry returns exactly the first response");
    assert_eq!(event_count(&stack, &id).await, 2, "opened + one deposit");
    let metadata: Value =
        serde_json::from_str(&stack.db.store().read_stream(id.parse().unwrap(), 1, 1).await.unwrap()[0].metadata)
            .unwrap();
    assert_eq!(
        metadata["idempotency_key"],
        key.as_str(),
        "the key is recorded in the event's metadata"
    );
}

#[tokio::test]
async fn the_same_key_with_a_different_request_is_refused_and_changes_nothing() {
    let stack = Stack::start().await;
    let client = reqwest::Client::new();
    let id = open(&client, &stack).await;
    let deposits = format!("{}/v1/accounts/{id}/deposits", stack.command);
    let withdrawals = format!("{}/v1/accounts/{id}/withdrawals", stack.command);
    let key = Uuid::now_v7().to_string();
    post_with_key(&client, &deposits, &key, json!({"amount": 1000})).await;

    let other_amount = post_with_key(&client, &deposits, &key, json!({"amount": 999})).await;
    let other_route = post_with_key(&client, &withdrawals, &key, json!({"amount": 1000})).await;

    for (status, _, body) in [other_amount, other_route] {
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["type"], "https://tally.dev/problems/idempotency-key-reused");
    }
    assert_eq!(event_count(&stack, &id).await, 2);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_produce_exactly_one_effect() {
    let stack = Stack::start().await;
    let client = reqwest::Client::new();
    let id = open(&client, &stack).await;
    let url = format!("{}/v1/accounts/{id}/deposits", stack.command);
    let key = Uuid::now_v7().to_string();

    let requests = (0..16).map(|_| post_with_key(&client, &url, &key, json!({"amount": 250})));
    let responses = futures::future::join_all(requests).await;

    assert!(
        responses.iter().all(|(s, _, _)| *s == StatusCode::CREATED),
        "{responses:?}"
    );
    assert_eq!(
        responses.iter().filter(|(_, replayed, _)| !replayed).count(),
        1,
        "exactly one request ran"
    );
    assert!(
        responses.iter().all(|(_, _, body)| *body == responses[0].2),
        "all got the same response"
    );
    assert_eq!(event_count(&stack, &id).await, 2);
    assert_eq!(responses[0].2["balance"], 250);
}

#[tokio::test]
async fn a_refused_command_is_refused_again_on_retry_even_after_the_state_changed() {
    // A client that saw "insufficient funds" may have moved on (paid another way, under a new
    // key); a late retry of the old request must not move the money after all.
    let stack = Stack::start().await;
    let client = reqwest::Client::new();
    let id = open(&client, &stack).await;
    let withdrawals = format!("{}/v1/accounts/{id}/withdrawals", stack.command);
    let key = Uuid::now_v7().to_string();

    let refused = post_with_key(&client, &withdrawals, &key, json!({"amount": 500})).await;
    post_with_key(
        &client,
        &format!("{}/v1/accounts/{id}/deposits", stack.command),
        "funding",
        json!({"amount": 1000}),
    )
    .await;
    let retried = post_with_key(&client, &withdrawals, &key, json!({"amount": 500})).await;

    assert_eq!(refused.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.2["type"], "https://tally.dev/problems/insufficient-funds");
    assert_eq!(retried.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", retried.2);
    assert!(retried.1, "the stored refusal is replayed");
    assert_eq!(retried.2, refused.2, "exactly the first answer");
    assert_eq!(event_count(&stack, &id).await, 2, "opened + the deposit; no withdrawal");
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_a_400_problem() {
    let stack = Stack::start().await;
    let client = reqwest::Client::new();
    let id = open(&client, &stack).await;
    let url = format!("{}/v1/accounts/{id}/deposits", stack.command);

    for key in ["has space", &"k".repeat(256)] {
        let (status, _, body) = post_with_key(&client, &url, key, json!({"amount": 1})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key:?}");
        assert_eq!(body["type"], "https://tally.dev/problems/invalid-idempotency-key");
    }
    assert_eq!(event_count(&stack, &id).await, 1);
}

#[tokio::test]
async fn a_deposit_or_withdrawal_without_a_key_is_a_400_problem_and_changes_nothing() {
    let stack = Stack::start().await;
    let client = reqwest::Client::new();
    let id = open(&client, &stack).await;
    post_with_key(
        &client,
        &format!("{}/v1/accounts/{id}/deposits", stack.command),
        &Uuid::now_v7().to_string(),
        json!({"amount": 1000}),
    )
    .await;

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
    assert_eq!(event_count(&stack, &id).await, 2, "opened + the keyed deposit only");
}
