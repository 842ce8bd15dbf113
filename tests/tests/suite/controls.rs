//! Account controls through the real command API and Postgres: external ids unique in the
//! ledger under racing opens, the two balance flags holding against racing debits, holds and
//! credits, and a clear refusal for every bad profile.

use cqrs_es::Aggregate;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_domain::{Account, AccountFlag};
use tally_tests::{Api, TestDb, command_api, problem_code};
use uuid::Uuid;

/// Opens an account with `extra` fields in its body; the response.
async fn open(api: &Api, extra: Value) -> (StatusCode, Value) {
    let mut body = json!({"owner": "Ada", "currency": "EUR"});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, reply, _) = api.post_keyed("/v1/accounts", &body).await;
    (status, reply)
}

fn id_of(body: &Value) -> Uuid {
    body["account_id"].as_str().unwrap().parse().unwrap()
}

/// The account `id` folded from the log, checking `rule` after every event.
async fn fold_checking(db: &TestDb, id: Uuid, rule: impl Fn(&Account) -> bool) -> Account {
    let mut account = Account::default();
    for event in db.store().read_stream(id, 0, 10_000).await.unwrap() {
        let decoded =
            tally_schemas::decode_account_event(&event.event_type, event.schema_version as u32, &event.payload)
                .unwrap();
        account.apply(decoded);
        assert!(rule(&account), "v{}: {account:?}", event.version);
    }
    account
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_external_id_names_one_account_however_many_opens_race_for_it() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    for round in 0..4 {
        let external_id = format!("cust-{round}");
        let opens = (0..16).map(|i| {
            let api = &api;
            let external_id = external_id.clone();
            async move {
                let body = json!({"owner": format!("racer {i}"), "external_id": external_id,
                                  "metadata": {"racer": i.to_string()}});
                open(api, body).await
            }
        });
        let replies = futures::future::join_all(opens).await;
        let winners: Vec<&Value> = replies
            .iter()
            .filter(|(s, _)| *s == StatusCode::CREATED)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {replies:?}");
        let winner = id_of(winners[0]);
        assert_eq!(winners[0]["external_id"], json!(external_id));
        for (status, body) in replies.iter().filter(|(s, _)| *s != StatusCode::CREATED) {
            assert_eq!(
                (*status, problem_code(body), &body["account_id"]),
                (StatusCode::CONFLICT, "external-id-taken", &json!(winner)),
                "round {round}: {body}"
            );
        }
        // The log holds one reservation, naming the winner, and one opened account with it.
        let stream = tally_domain::reservation::stream_id(&external_id);
        let reserved = db.store().read_stream(stream, 0, 10).await.unwrap();
        assert_eq!(reserved.len(), 1, "round {round}");
        assert_eq!(reserved[0].stream_type, "external_id");
        let payload: Value = serde_json::from_str(&reserved[0].payload).unwrap();
        assert_eq!(payload["account_id"], json!(winner));
        let opened: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE event_type = 'AccountOpened' AND payload::jsonb ->> 'external_id' = $1",
        )
        .bind(&external_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(opened, 1, "round {round}");
    }
    // A closed account keeps its external id: it still names that account.
    let (_, body) = open(&api, json!({"external_id": "kept"})).await;
    let kept = id_of(&body);
    let (status, _, _) = api.post_keyed(&format!("/v1/accounts/{kept}/close"), &json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = open(&api, json!({"external_id": "kept"})).await;
    assert_eq!(
        (status, problem_code(&body), &body["account_id"]),
        (StatusCode::CONFLICT, "external-id-taken", &json!(kept))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wallet_whose_debits_must_not_exceed_credits_never_goes_below_zero_under_racing_debits() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let sink = api.funded("EUR", 0).await;
    let (status, body) = open(&api, json!({"flags": ["debits_must_not_exceed_credits"]})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["flags"], json!(["debits_must_not_exceed_credits"]));
    let wallet = id_of(&body);
    let (status, _, _) = api
        .post_keyed(&format!("/v1/accounts/{wallet}/deposits"), &json!({"amount": 1_000}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // Thirty debits of 100 against 1,000: withdrawals, immediate and pending transfers, at once.
    let debits = (0..30).map(|i| {
        let api = &api;
        async move {
            match i % 3 {
                0 => {
                    api.post_keyed(&format!("/v1/accounts/{wallet}/withdrawals"), &json!({"amount": 100}))
                        .await
                }
                1 => {
                    api.post_keyed(
                        "/v1/transfers",
                        &json!({"from": wallet, "to": sink, "amount": 100, "currency": "EUR", "mode": "immediate"}),
                    )
                    .await
                }
                _ => {
                    api.post_keyed(
                        "/v1/transfers",
                        &json!({"from": wallet, "to": sink, "amount": 100, "currency": "EUR", "mode": "pending"}),
                    )
                    .await
                }
            }
        }
    });
    let replies = futures::future::join_all(debits).await;
    let accepted = replies.iter().filter(|(s, _, _)| s.is_success()).count();
    assert_eq!(accepted, 10, "exactly what the credits cover");
    for (status, body, _) in replies.iter().filter(|(s, _, _)| !s.is_success()) {
        assert_eq!(
            (*status, problem_code(body)),
            (StatusCode::UNPROCESSABLE_ENTITY, "debits-exceed-credits"),
            "{body}"
        );
    }
    let folded = fold_checking(&db, wallet, |a| a.available() >= 0).await;
    assert_eq!(folded.available(), 0);
    assert!(folded.has(AccountFlag::DebitsMustNotExceedCredits));
    // No overdraft can be granted to it.
    let (status, body, _) = api
        .post_keyed(&format!("/v1/accounts/{wallet}/limits"), &json!({"overdraft_limit": 1}))
        .await;
    assert_eq!(
        (status, problem_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid-flags")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_account_whose_credits_must_not_exceed_debits_never_goes_above_zero_under_racing_credits() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    // A funding account: it pays out first, on its overdraft, and is paid back at most that.
    let (status, body) = open(
        &api,
        json!({"overdraft_limit": 100_000, "flags": ["credits_must_not_exceed_debits"]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let funding = id_of(&body);
    let customer = api.funded("EUR", 0).await;
    let (status, body, _) = api
        .post_keyed(
            "/v1/transfers",
            &json!({"from": funding, "to": customer, "amount": 500, "currency": "EUR", "mode": "immediate"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Twenty credits of 50 at once: deposits and transfers back; only 500 of them fit.
    let credits = (0..20).map(|i| {
        let api = &api;
        async move {
            if i % 2 == 0 {
                api.post_keyed(&format!("/v1/accounts/{funding}/deposits"), &json!({"amount": 50}))
                    .await
            } else {
                api.post_keyed(
                    "/v1/transfers",
                    &json!({"from": customer, "to": funding, "amount": 50, "currency": "EUR", "mode": "immediate"}),
                )
                .await
            }
        }
    });
    let replies = futures::future::join_all(credits).await;
    assert_eq!(replies.iter().filter(|(s, _, _)| s.is_success()).count(), 10);
    for (status, body, _) in replies.iter().filter(|(s, _, _)| !s.is_success()) {
        assert_eq!(
            (*status, problem_code(body), body["requested"].as_i64()),
            (StatusCode::UNPROCESSABLE_ENTITY, "credits-exceed-debits", Some(50)),
            "{body}"
        );
    }
    let folded = fold_checking(&db, funding, |a| a.balance <= 0).await;
    assert_eq!(folded.balance, 0);
}

#[tokio::test]
async fn a_bad_profile_is_refused_with_its_reason_and_opens_nothing() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let many: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (extra, status, code) in [
        (
            json!({"external_id": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-external-id",
        ),
        (
            json!({"external_id": "has space"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-external-id",
        ),
        (
            json!({"external_id": "x".repeat(129)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-external-id",
        ),
        (
            json!({"metadata": many}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-metadata",
        ),
        (
            json!({"metadata": {"a b": "v"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-metadata",
        ),
        (
            json!({"metadata": {"k": "line\nbreak"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-metadata",
        ),
        (
            json!({"metadata": {"k": 5}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
        (
            json!({"flags": ["no_such_flag"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-flags",
        ),
        (
            json!({"flags": ["debits_must_not_exceed_credits", "credits_must_not_exceed_debits"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-flags",
        ),
        (
            json!({"flags": ["debits_must_not_exceed_credits"], "overdraft_limit": 10}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-flags",
        ),
        (
            json!({"flags": "debits_must_not_exceed_credits"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
        ),
    ] {
        let (got, body) = open(&api, extra.clone()).await;
        assert_eq!((got, problem_code(&body)), (status, code), "{extra}: {body}");
    }
    let opened: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(opened, 0, "no refusal wrote anything");
}
