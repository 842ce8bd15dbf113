//! `GET /v1/accounts`: finding accounts by owner, currency and status, in cursor pages, on the
//! real stack (command API, relay, projectors, query API on a replica).

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_tests::{Api, Stack, client, problem_code};
use uuid::Uuid;

async fn get(url: &str) -> (StatusCode, Value) {
    let response = client().get(url).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Opens an account and returns its id and the response's consistency token.
async fn open(api: &Api, owner: &str, currency: &str) -> (Uuid, String) {
    let (status, body, _) = api
        .post_keyed("/v1/accounts", &json!({"owner": owner, "currency": currency}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    (
        Uuid::try_parse(body["account_id"].as_str().unwrap()).unwrap(),
        body["consistency_token"].as_str().unwrap().to_owned(),
    )
}

/// Every account the listing at `url` (filters, no cursor) shows, walked `limit` at a time.
async fn walk(url: &str, limit: usize) -> Vec<Uuid> {
    let sep = if url.contains('?') { '&' } else { '?' };
    let mut next = format!("{url}{sep}limit={limit}");
    let mut ids = Vec::new();
    loop {
        let (status, page) = get(&next).await;
        assert_eq!(status, StatusCode::OK, "{next}: {page}");
        let accounts = page["accounts"].as_array().unwrap();
        assert!(accounts.len() <= limit, "{page}");
        ids.extend(
            accounts
                .iter()
                .map(|a| Uuid::try_parse(a["account_id"].as_str().unwrap()).unwrap()),
        );
        if page["has_more"] != true {
            return ids;
        }
        next = format!(
            "{url}{sep}limit={limit}&cursor={}",
            page["next_cursor"].as_str().unwrap()
        );
    }
}

#[tokio::test]
async fn accounts_are_found_by_owner_currency_and_status_in_pages_of_id_order() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let mut opened: Vec<(Uuid, &str, &str)> = Vec::new();
    let mut last_token = String::new();
    for (owner, currency, n) in [("ada", "EUR", 7), ("ada", "USD", 3), ("bob", "EUR", 5)] {
        for _ in 0..n {
            let (id, token) = open(&api, owner, currency).await;
            opened.push((id, owner, currency));
            last_token = token;
        }
    }
    let frozen = opened[2].0;
    let (status, body, _) = api
        .post_keyed(
            &format!("/v1/accounts/{frozen}/freeze"),
            &json!({"reason": "a listing test"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let freeze_token = body["consistency_token"].as_str().unwrap().to_owned();

    let list = format!("{}/v1/accounts", stack.query);
    // With the tokens of the last writes, the listing reflects them (each token covers the
    // accounts its own write touched; they sit in different partitions).
    for token in [&last_token, &freeze_token] {
        let (status, page) = get(&format!("{list}?consistent_with={token}&limit=500")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
    }
    let (_, page) = get(&format!("{list}?status=frozen&consistent_with={freeze_token}")).await;
    assert_eq!(page["accounts"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["accounts"][0]["account_id"], json!(frozen));
    assert_eq!(page["accounts"][0]["status"], "frozen");

    // Every account opened is projected by now (eventually); then each filter and their
    // combinations list exactly the matching accounts, in id order, walked 2 at a time.
    let all: BTreeSet<Uuid> = opened.iter().map(|(id, ..)| *id).collect();
    tally_tests::eventually(std::time::Duration::from_secs(30), "every account listed", || async {
        let ids: BTreeSet<Uuid> = walk(&list, 500).await.into_iter().collect();
        all.is_subset(&ids).then_some(())
    })
    .await;
    let expect = |owner: Option<&str>, currency: Option<&str>, status: Option<&str>| -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = opened
            .iter()
            .filter(|(id, o, c)| {
                owner.is_none_or(|w| w == *o)
                    && currency.is_none_or(|w| w == *c)
                    && status.is_none_or(|w| (w == "frozen") == (*id == frozen))
            })
            .map(|(id, ..)| *id)
            .collect();
        ids.sort();
        ids
    };
    for (query, want) in [
        ("owner=ada", expect(Some("ada"), None, None)),
        ("owner=bob", expect(Some("bob"), None, None)),
        ("currency=EUR", expect(None, Some("EUR"), None)),
        ("owner=ada&currency=EUR", expect(Some("ada"), Some("EUR"), None)),
        (
            "owner=ada&currency=EUR&status=open",
            expect(Some("ada"), Some("EUR"), Some("open")),
        ),
        ("owner=ada&status=frozen", vec![frozen]),
        ("owner=carol", vec![]),
    ] {
        let got = walk(&format!("{list}?{query}"), 2).await;
        assert_eq!(got, want, "{query}");
    }
    // A whole walk of an unfiltered listing is in strictly increasing id order.
    let everything = walk(&list, 3).await;
    assert!(everything.windows(2).all(|w| w[0] < w[1]), "id order, no repeats");

    // Bad input: a clear 400 or 422, never a listing that ignores it.
    for (query, status, code) in [
        ("status=lost", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("currency=eur", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("ownr=ada", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("cursor=zz", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("limit=0", StatusCode::UNPROCESSABLE_ENTITY, "limit-out-of-range"),
        ("limit=501", StatusCode::UNPROCESSABLE_ENTITY, "limit-out-of-range"),
    ] {
        let (got, body) = get(&format!("{list}?{query}")).await;
        assert_eq!((got, problem_code(&body)), (status, code), "{query}: {body}");
    }
    // Readers only: no token, no listing.
    let response = reqwest::Client::new().get(&list).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // A generation made before the listing's indexes existed gets them from `tally migrate`,
    // without a rebuild.
    let indexes = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'account_balances_g1' ORDER BY 1",
        )
        .fetch_all(&stack.db.pool)
        .await
        .unwrap()
    };
    let made = indexes().await;
    for name in [
        "account_balances_g1_currency",
        "account_balances_g1_owner",
        "account_balances_g1_status",
    ] {
        assert!(made.iter().any(|i| i == name), "{name} in {made:?}");
    }
    sqlx::query("DROP INDEX account_balances_g1_owner, account_balances_g1_status")
        .execute(&stack.db.pool)
        .await
        .unwrap();
    let output = std::process::Command::new(tally_tests::bin_dir().join("tally"))
        .arg("migrate")
        .env("TALLY_DATABASE_URL", &stack.db.url)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(indexes().await, made, "migrate put the dropped indexes back");
}
