//! Currencies are ISO 4217 codes, against a real command API: a made-up code is refused as a
//! problem before anything is written, real ones open accounts, and an account stored in a
//! made-up code before codes were checked still reads and takes commands.

use reqwest::StatusCode;
use serde_json::json;
use tally_event_store::{NewEvent, StreamAppend};
use tally_tests::{Api, TestDb, command_api, problem_code};
use uuid::Uuid;

#[tokio::test]
async fn a_currency_that_is_not_iso_4217_is_refused_with_422_invalid_currency_and_nothing_is_written() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;

    for code in ["ZZZ", "XAU", "eur"] {
        let (status, body, _) = open_in(&api, code).await;

        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{code}: {body}");
        assert_eq!(problem_code(&body), "invalid-currency", "{code}: {body}");
        assert_eq!(body["currency"], code, "the problem names the refused value: {body}");
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events, 0, "a refused currency writes nothing");
}

#[tokio::test]
async fn usd_jpy_and_eur_open_accounts() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;

    for code in ["USD", "JPY", "EUR"] {
        let (status, body, _) = open_in(&api, code).await;

        assert_eq!(status, StatusCode::CREATED, "{code}: {body}");
        assert_eq!(body["currency"], code);
    }
}

#[tokio::test]
async fn a_transfer_in_a_currency_that_is_not_iso_4217_is_refused_as_invalid_currency() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let (from, to) = (api.funded("EUR", 100).await, api.funded("EUR", 0).await);

    let (status, body, _) = api
        .transfer(json!({"from": from, "to": to, "amount": 10, "currency": "ZZZ", "mode": "immediate"}))
        .await;

    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(problem_code(&body), "invalid-currency", "{body}");
}

#[tokio::test]
async fn an_account_stored_in_a_made_up_currency_before_codes_were_checked_still_reads_and_takes_deposits() {
    let db = TestDb::new().await;
    let account_id = Uuid::now_v7();
    // What an account opened before ISO 4217 was checked looks like in the log.
    db.store()
        .append(vec![StreamAppend {
            stream_type: "account".into(),
            stream_id: account_id,
            expected_version: 0,
            known_prev_hash: None,
            events: vec![NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "AccountOpened".into(),
                schema_version: 2,
                payload: format!(
                    r#"{{"account_id":"{account_id}","owner":"Old","currency":"ZZZ","overdraft_limit":0}}"#
                ),
                metadata: "{}".into(),
            }],
        }])
        .await
        .unwrap();
    let (api, _proc) = command_api(&db, &[]).await;

    let (status, body, _) = deposit(&api, account_id).await;

    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["currency"], "ZZZ");
    assert_eq!(body["balance"], 250);
    let (account, version) = db.replay_account(account_id).await;
    assert_eq!(version, 2);
    assert_eq!(account.currency.map(String::from).as_deref(), Some("ZZZ"));
}

/// `POST /v1/accounts` for Ada in `code`.
async fn open_in(api: &Api, code: &str) -> tally_tests::Reply {
    api.post("/v1/accounts", None, &json!({"owner": "Ada", "currency": code}))
        .await
}

async fn deposit(api: &Api, account_id: Uuid) -> tally_tests::Reply {
    api.post_keyed(&format!("/v1/accounts/{account_id}/deposits"), &json!({"amount": 250}))
        .await
}
