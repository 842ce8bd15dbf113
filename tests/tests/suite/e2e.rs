//! The first end-to-end path, through the real binaries: command API → Postgres → relay →
//! NATS JetStream → projector → read model → replica → query API.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_tests::{Api, Stack, eventually, problem_code};

/// The request with a fresh, unique `Idempotency-Key`.
fn keyed(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    request.header("Idempotency-Key", uuid::Uuid::now_v7().to_string())
}

#[tokio::test]
async fn an_account_opened_and_moved_through_the_command_api_shows_its_balance_on_the_query_api() {
    let stack = Stack::start().await;
    let client = tally_tests::client();
    let api = Api::new(&stack.command);

    let (status, opened, _) = api
        .post_keyed("/v1/accounts", &json!({"owner": "Ada", "currency": "EUR"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");
    assert_eq!(opened["version"], 1);
    let id = opened["account_id"].as_str().unwrap().to_owned();

    let (status, deposited, _) = api
        .post_keyed(
            &format!("/v1/accounts/{id}/deposits"),
            &json!({"amount": 1000, "reference": "salary"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{deposited}");
    assert_eq!(deposited["version"], 2);
    let (status, withdrawn, _) = api
        .post_keyed(
            &format!("/v1/accounts/{id}/withdrawals"),
            &json!({"amount": 300, "reference": "rent"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{withdrawn}");
    assert_eq!(withdrawn["version"], 3);
    assert_eq!(withdrawn["balance"], 700);

    let account = eventually(Duration::from_secs(20), "the query API to show balance 700", || {
        let client = client.clone();
        let url = format!("{}/v1/accounts/{id}", stack.query);
        async move {
            let response = client.get(&url).send().await.ok()?;
            if response.status() != StatusCode::OK {
                return None;
            }
            let body: Value = response.json().await.ok()?;
            (body["version"] == 3).then_some(body)
        }
    })
    .await;
    assert_eq!(account["balance"], 700, "{account}\n{}", stack.logs());
    assert_eq!(account["owner"], "Ada");
    assert_eq!(account["currency"], "EUR");
    assert_eq!(account["account_id"], id.as_str());

    // Exactly three events, hash-chained, and exactly one read-model row reflecting them.
    let events = stack.db.store().read_stream(id.parse().unwrap(), 0, 100).await.unwrap();
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e.computed_hash().as_slice() == e.hash.as_slice()));
}

#[tokio::test]
async fn refused_and_malformed_commands_get_problem_details_with_the_right_status() {
    let stack = Stack::start().await;
    let client = tally_tests::client();
    let id = Api::new(&stack.command).open("EUR").await;
    let withdrawals = format!("{}/v1/accounts/{id}/withdrawals", stack.command);
    // The server answers 413 without reading the rest of a huge body and closes the
    // connection; a pooled connection would then fail the *next* case, so that one gets its own.
    let unpooled = tally_tests::client_with(&tally_tests::token(
        tally_tests::TEST_SUBJECT,
        &[tally_service::auth::Role::Teller],
    ))
    .pool_max_idle_per_host(0)
    .build()
    .unwrap();

    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            "overdraw",
            keyed(client.post(&withdrawals)).json(&json!({"amount": 1})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "insufficient-funds",
        ),
        (
            "zero amount",
            keyed(client.post(&withdrawals)).json(&json!({"amount": 0})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-amount",
        ),
        (
            "fractional amount",
            keyed(client.post(&withdrawals)).json(&json!({"amount": 1.5})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (
            "unknown field",
            keyed(client.post(&withdrawals)).json(&json!({"amount": 1, "extra": true})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (
            "malformed JSON",
            keyed(client.post(&withdrawals))
                .header("content-type", "application/json")
                .body("{\"amount\":"),
            StatusCode::BAD_REQUEST,
            "malformed-json",
        ),
        (
            "no content type",
            keyed(client.post(&withdrawals)).body("{\"amount\":1}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
        ),
        (
            "huge body",
            keyed(unpooled.post(&withdrawals))
                .header("content-type", "application/json")
                .body(format!("{{\"reference\":\"{}\"}}", "x".repeat(100_000))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
        ),
        (
            "unknown account",
            keyed(client.post(format!(
                "{}/v1/accounts/{}/deposits",
                stack.command,
                uuid::Uuid::now_v7()
            )))
            .json(&json!({"amount": 1})),
            StatusCode::NOT_FOUND,
            "account-not-found",
        ),
        (
            "not a uuid",
            keyed(client.post(format!("{}/v1/accounts/nope/deposits", stack.command))).json(&json!({"amount": 1})),
            StatusCode::NOT_FOUND,
            "account-not-found",
        ),
        (
            "bad currency",
            client
                .post(format!("{}/v1/accounts", stack.command))
                .json(&json!({"owner": "B", "currency": "euro"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-currency",
        ),
        (
            "opened twice",
            client
                .post(format!("{}/v1/accounts", stack.command))
                .json(&json!({"owner": "B", "currency": "EUR", "account_id": id})),
            StatusCode::CONFLICT,
            "account-exists",
        ),
    ];
    for (name, request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{name}");
        assert_eq!(
            response.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{name}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(problem_code(&body), code, "{name}: {body}");
        assert_eq!(body["status"], status.as_u16(), "{name}");
    }

    // Nothing refused was written: the stream still holds only the opening.
    let events = stack.db.store().read_stream(id, 0, 100).await.unwrap();
    assert_eq!(events.len(), 1);

    let response = client
        .get(format!("{}/v1/accounts/{}", stack.query, uuid::Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "application/problem+json"
    );
}
