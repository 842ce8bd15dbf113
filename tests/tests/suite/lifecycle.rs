//! An account's life cycle through the real command API: freeze, unfreeze, close, and the
//! refusals each state brings; and the OpenAPI documents both APIs serve.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_tests::{Api, Reply, Stack, TestDb, command_api, problem_code};
use uuid::Uuid;

/// POSTs `body` to `/v1/accounts/{id}/{action}`, under `key` when given.
async fn post(api: &Api, id: Uuid, action: &str, key: Option<&str>, body: Value) -> Reply {
    api.post(&format!("/v1/accounts/{id}/{action}"), key, &body).await
}

/// A deposit or withdrawal, each under a fresh key (money-moving commands require one).
async fn post_money(api: &Api, id: Uuid, action: &str, amount: i64) -> Reply {
    api.post_keyed(&format!("/v1/accounts/{id}/{action}"), &json!({"amount": amount}))
        .await
}

/// Asserts a refusal with `status` and problem `code`.
#[track_caller]
fn assert_refused(result: &Reply, status: StatusCode, code: &str) {
    assert_eq!(result.0, status, "{}", result.1);
    assert_eq!(problem_code(&result.1), code, "{}", result.1);
    assert_eq!(result.1["status"], status.as_u16());
}

#[tokio::test]
async fn a_frozen_account_refuses_withdrawals_but_accepts_deposits_until_it_is_unfrozen() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let id = api.open("EUR").await;
    assert_eq!(post_money(&api, id, "deposits", 1000).await.0, StatusCode::CREATED);

    let freeze_key = Uuid::now_v7().to_string();
    let freeze = || {
        post(
            &api,
            id,
            "freeze",
            Some(&freeze_key),
            json!({"reason": "suspected fraud"}),
        )
    };
    let frozen = freeze().await;
    assert_eq!(frozen.0, StatusCode::CREATED, "{}", frozen.1);
    assert_eq!(frozen.1["status"], "frozen");
    assert_eq!(frozen.1["balance"], 1000);
    assert_eq!(frozen.1["version"], 3);
    let retried = freeze().await;
    assert_eq!(
        (retried.0, &retried.1),
        (frozen.0, &frozen.1),
        "a retried freeze under its key gets the first response"
    );

    let refused = post_money(&api, id, "withdrawals", 100).await;
    assert_refused(&refused, StatusCode::UNPROCESSABLE_ENTITY, "account-frozen");
    assert_eq!(refused.1["account_id"], id.to_string());
    let deposited = post_money(&api, id, "deposits", 500).await;
    assert_eq!(
        deposited.0,
        StatusCode::CREATED,
        "credits still arrive: {}",
        deposited.1
    );
    assert_eq!(deposited.1["balance"], 1500);
    assert_eq!(deposited.1["status"], "frozen");
    let again = post(&api, id, "freeze", None, json!({"reason": "twice"})).await;
    assert_refused(&again, StatusCode::UNPROCESSABLE_ENTITY, "account-frozen");

    let unfrozen = post(&api, id, "unfreeze", None, json!({})).await;
    assert_eq!(unfrozen.0, StatusCode::CREATED, "{}", unfrozen.1);
    assert_eq!(unfrozen.1["status"], "open");
    let withdrawn = post_money(&api, id, "withdrawals", 100).await;
    assert_eq!(withdrawn.0, StatusCode::CREATED, "{}", withdrawn.1);
    assert_eq!(withdrawn.1["balance"], 1400);
    assert_eq!(withdrawn.1["available"], 1400);
    let not_frozen = post(&api, id, "unfreeze", None, json!({})).await;
    assert_refused(&not_frozen, StatusCode::UNPROCESSABLE_ENTITY, "account-not-frozen");

    // Opened, deposit, frozen, deposit, unfrozen, withdrawal: the refusals and the replay
    // wrote nothing.
    assert_eq!(db.event_count(id).await, 6);
}

#[tokio::test]
async fn an_account_closes_only_at_zero_and_then_refuses_every_command() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let id = api.open("EUR").await;
    assert_eq!(post_money(&api, id, "deposits", 250).await.0, StatusCode::CREATED);

    let refused = post(&api, id, "close", None, json!({})).await;
    assert_refused(&refused, StatusCode::UNPROCESSABLE_ENTITY, "balance-not-zero");
    assert_eq!(refused.1["balance"], 250);

    assert_eq!(post_money(&api, id, "withdrawals", 250).await.0, StatusCode::CREATED);
    let closed = post(&api, id, "close", None, json!({})).await;
    assert_eq!(closed.0, StatusCode::CREATED, "{}", closed.1);
    assert_eq!(closed.1["status"], "closed");
    assert_eq!(closed.1["balance"], 0);

    let after = [
        post_money(&api, id, "deposits", 1).await,
        post_money(&api, id, "withdrawals", 1).await,
        post(&api, id, "freeze", None, json!({"reason": "late"})).await,
        post(&api, id, "unfreeze", None, json!({})).await,
        post(&api, id, "close", None, json!({})).await,
    ];
    for result in &after {
        assert_refused(result, StatusCode::UNPROCESSABLE_ENTITY, "account-closed");
    }
    let reopened = api
        .post(
            "/v1/accounts",
            None,
            &json!({"owner": "Ada", "currency": "EUR", "account_id": id}),
        )
        .await;
    assert_eq!(reopened.0, StatusCode::CONFLICT, "a closed account's id stays taken");

    // Opened, deposit, withdrawal, closed.
    assert_eq!(db.event_count(id).await, 4);
}

#[tokio::test]
async fn life_cycle_commands_with_bad_bodies_or_unknown_accounts_are_problems_that_change_nothing() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let id = api.open("EUR").await;
    let unknown = Uuid::now_v7();
    let client = tally_tests::client();

    let cases = [
        (
            "freeze",
            id,
            json!({"reason": "r", "extra": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (
            "freeze",
            id,
            json!({}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (
            "freeze",
            id,
            json!({"reason": "  "}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-reason",
        ),
        (
            "freeze",
            id,
            json!({"reason": "r".repeat(201)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-reason",
        ),
        (
            "unfreeze",
            id,
            json!({"please": true}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (
            "close",
            id,
            json!({"force": true}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (
            "freeze",
            unknown,
            json!({"reason": "r"}),
            StatusCode::NOT_FOUND,
            "account-not-found",
        ),
        (
            "unfreeze",
            unknown,
            json!({}),
            StatusCode::NOT_FOUND,
            "account-not-found",
        ),
        ("close", unknown, json!({}), StatusCode::NOT_FOUND, "account-not-found"),
    ];
    for (action, account, body, status, code) in cases {
        let result = post(&api, account, action, None, body.clone()).await;
        assert_eq!(result.0, status, "{action} {body}: {}", result.1);
        assert_eq!(problem_code(&result.1), code, "{action} {body}: {}", result.1);
    }
    let no_body = client
        .post(format!("{}/v1/accounts/{id}/close", api.base))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(no_body.status(), StatusCode::BAD_REQUEST, "close needs `{{}}`");
    let not_json = client
        .post(format!("{}/v1/accounts/{id}/close", api.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    assert_eq!(db.event_count(id).await, 1, "only the opening");
}

#[tokio::test]
async fn both_apis_serve_their_openapi_document() {
    let stack = Stack::start().await;
    let client = tally_tests::client();
    let documents = [
        (
            &stack.command,
            &[
                "/v1/accounts",
                "/v1/accounts/{id}/deposits",
                "/v1/accounts/{id}/withdrawals",
                "/v1/accounts/{id}/freeze",
                "/v1/accounts/{id}/unfreeze",
                "/v1/accounts/{id}/close",
                "/health",
                "/ready",
            ][..],
        ),
        (&stack.query, &["/v1/accounts/{id}", "/health", "/ready"][..]),
    ];
    for (base, paths) in documents {
        let response = client.get(format!("{base}/openapi.json")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{base}");
        assert_eq!(response.headers().get("content-type").unwrap(), "application/json");
        let document: Value = response.json().await.unwrap();
        assert!(document["openapi"].as_str().unwrap().starts_with("3."), "{document}");
        for path in paths {
            assert!(document["paths"][path].is_object(), "{base} documents {path}");
        }
        assert!(document["components"]["schemas"]["Problem"].is_object());
    }
}
