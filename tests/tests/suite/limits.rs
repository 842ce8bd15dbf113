//! `POST /v1/accounts/{id}/limits` through the real command API and Postgres: a limit change
//! racing pending holds and debits never leaves an account using more than its limit.

use cqrs_es::Aggregate;
use reqwest::StatusCode;
use serde_json::json;
use tally_domain::Account;
use tally_tests::{TestDb, command_api, problem_code};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_limit_change_racing_holds_never_leaves_an_account_beyond_its_limit() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let sink = api.funded("EUR", 0).await;
    for round in 0..8 {
        // No money, an overdraft of 1,000: holds of 100 draw on the overdraft alone.
        let (status, body, _) = api
            .post_keyed(
                "/v1/accounts",
                &json!({"owner": "Ada", "currency": "EUR", "overdraft_limit": 1_000}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let account: Uuid = body["account_id"].as_str().unwrap().parse().unwrap();
        // Twelve holds of 100 (two more than the limit allows) and, in the middle of them, the
        // limit lowered to 500: whichever commits first, the other is judged on what it left.
        let mut requests = Vec::new();
        for i in 0..12 {
            if i == 6 {
                requests.push(api.post_keyed(
                    &format!("/v1/accounts/{account}/limits"),
                    &json!({"overdraft_limit": 500}),
                ));
            }
            requests.push(api.post_keyed(
                "/v1/transfers",
                &json!({"from": account, "to": sink, "amount": 100, "currency": "EUR",
                        "mode": "pending", "reference": format!("hold {round}/{i}")}),
            ));
        }
        let replies = futures::future::join_all(requests).await;
        let mut limit_changed = false;
        for (status, body, _) in &replies {
            let code = if status.is_success() {
                String::new()
            } else {
                problem_code(body).to_owned()
            };
            assert!(
                matches!(
                    (status.as_u16(), code.as_str()),
                    (201, "") | (422, "insufficient-funds" | "limit-below-usage")
                ),
                "{status} {body}"
            );
            if status.is_success() && body["overdraft_limit"] == 500 && body["transfer_id"].is_null() {
                limit_changed = true;
            }
            if code == "limit-below-usage" {
                assert!(body["available"].as_i64().unwrap() < -500, "{body}");
            }
        }

        // The account as the log says: never beyond the limit in force, after every event.
        let events = db.store().read_stream(account, 0, 1_000).await.unwrap();
        let mut folded = Account::default();
        for event in &events {
            let decoded =
                tally_schemas::decode_account_event(&event.event_type, event.schema_version as u32, &event.payload)
                    .unwrap();
            folded.apply(decoded);
            assert!(
                folded.available() >= -folded.overdraft_limit,
                "round {round}, v{}: available {} under a limit of {}",
                event.version,
                folded.available(),
                folded.overdraft_limit
            );
        }
        let expected_limit = if limit_changed { 500 } else { 1_000 };
        assert_eq!(folded.overdraft_limit, expected_limit, "round {round}");
        let holds = replies
            .iter()
            .filter(|(s, b, _)| s.is_success() && !b["transfer_id"].is_null())
            .count() as i64;
        assert_eq!(
            folded.held,
            holds * 100,
            "round {round}: every accepted hold, nothing else"
        );
    }
}

#[tokio::test]
async fn a_limit_change_is_refused_with_a_reason_and_raises_what_a_debit_may_use() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let account = api.funded("EUR", 100).await;
    let limits = format!("/v1/accounts/{account}/limits");
    for (body, status, code) in [
        (
            json!({"overdraft_limit": -1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-overdraft-limit",
        ),
        (
            json!({"overdraft_limit": "5"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (json!({"limit": 5}), StatusCode::UNPROCESSABLE_ENTITY, "invalid-body"),
    ] {
        let (got, reply, _) = api.post_keyed(&limits, &body).await;
        assert_eq!((got, problem_code(&reply)), (status, code), "{body}: {reply}");
    }
    let (status, body, _) = api
        .post_keyed(&format!("/v1/accounts/{account}/withdrawals"), &json!({"amount": 300}))
        .await;
    assert_eq!(
        (status, problem_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "insufficient-funds")
    );
    let (status, body, _) = api.post_keyed(&limits, &json!({"overdraft_limit": 200})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        (body["overdraft_limit"].as_i64(), body["version"].as_i64()),
        (Some(200), Some(3))
    );
    let (status, body, _) = api
        .post_keyed(&format!("/v1/accounts/{account}/withdrawals"), &json!({"amount": 300}))
        .await;
    assert_eq!(
        (status, body["available"].as_i64()),
        (StatusCode::CREATED, Some(-200)),
        "{body}"
    );
    // Using 200 of it now: 199 would not cover that.
    let (status, body, _) = api.post_keyed(&limits, &json!({"overdraft_limit": 199})).await;
    assert_eq!(
        (status, problem_code(&body), body["available"].as_i64()),
        (StatusCode::UNPROCESSABLE_ENTITY, "limit-below-usage", Some(-200))
    );
    let (status, body, _) = api
        .post_keyed(
            &format!("/v1/accounts/{}/limits", Uuid::now_v7()),
            &json!({"overdraft_limit": 1}),
        )
        .await;
    assert_eq!(
        (status, problem_code(&body)),
        (StatusCode::NOT_FOUND, "account-not-found")
    );
}
