//! `GET /v1/accounts`: finding accounts by owner, currency, status, external id and metadata, in
//! cursor pages, on the real stack (command API, relay, projectors, query API on a replica).

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

/// Runs `tally migrate` on the database at `url`, which must succeed.
fn migrate(url: &str) {
    let output = std::process::Command::new(tally_tests::bin_dir().join("tally"))
        .arg("migrate")
        .env("TALLY_DATABASE_URL", url)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
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
        // No stored owner holds a NUL; Postgres would refuse it as a parameter (schemathesis).
        ("owner=%08%07%00", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("external_id=has%20space", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("metadata.=x", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("metadata.a%20b=x", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("metadata.region=a%00", StatusCode::BAD_REQUEST, "invalid-parameter"),
        (
            "metadata.region=eu&metadata.region=us",
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
        ),
        ("metadata[region]=eu", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("cursor=zz", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("limit=0", StatusCode::UNPROCESSABLE_ENTITY, "limit-out-of-range"),
        ("limit=501", StatusCode::UNPROCESSABLE_ENTITY, "limit-out-of-range"),
    ] {
        let (got, body) = get(&format!("{list}?{query}")).await;
        assert_eq!((got, problem_code(&body)), (status, code), "{query}: {body}");
    }
    // External ids and metadata: an exact id finds its one account; metadata filters combine
    // with each other and with the other filters.
    let mut labelled = Vec::new();
    for (i, (region, tier)) in [("eu", "gold"), ("eu", "silver"), ("us", "gold"), ("eu", "gold")]
        .into_iter()
        .enumerate()
    {
        let (status, body, _) = api
            .post_keyed(
                "/v1/accounts",
                &json!({"owner": "dora", "currency": "EUR", "external_id": format!("dora/{i}"),
                        "metadata": {"region": region, "tier": tier}}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["metadata"]["region"], region, "{body}");
        labelled.push((
            Uuid::try_parse(body["account_id"].as_str().unwrap()).unwrap(),
            region,
            tier,
        ));
    }
    let wanted = |region: Option<&str>, tier: Option<&str>| -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = labelled
            .iter()
            .filter(|(_, r, t)| region.is_none_or(|w| w == *r) && tier.is_none_or(|w| w == *t))
            .map(|(id, ..)| *id)
            .collect();
        ids.sort();
        ids
    };
    tally_tests::eventually(
        std::time::Duration::from_secs(30),
        "labelled accounts listed",
        || async { (walk(&format!("{list}?owner=dora"), 500).await.len() == labelled.len()).then_some(()) },
    )
    .await;
    for (query, want) in [
        ("external_id=dora/2".to_owned(), vec![labelled[2].0]),
        ("external_id=dora/9".to_owned(), vec![]),
        ("metadata.region=eu".to_owned(), wanted(Some("eu"), None)),
        (
            "metadata.region=eu&metadata.tier=gold".to_owned(),
            wanted(Some("eu"), Some("gold")),
        ),
        (
            "metadata.tier=gold&owner=dora&currency=EUR".to_owned(),
            wanted(None, Some("gold")),
        ),
        ("metadata.tier=gold&owner=ada".to_owned(), vec![]),
        ("metadata.tier=platinum".to_owned(), vec![]),
    ] {
        let got = walk(&format!("{list}?{query}"), 1).await;
        assert_eq!(got, want, "{query}");
    }
    let (_, page) = get(&format!("{list}?external_id=dora/2")).await;
    let shown = &page["accounts"][0];
    assert_eq!(
        (&shown["external_id"], &shown["metadata"], &shown["flags"]),
        (&json!("dora/2"), &json!({"region": "us", "tier": "gold"}), &json!([])),
        "{page}"
    );

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
        "account_balances_g1_external_id",
        "account_balances_g1_metadata",
        "account_balances_g1_owner",
        "account_balances_g1_status",
    ] {
        assert!(made.iter().any(|i| i == name), "{name} in {made:?}");
    }
    sqlx::query("DROP INDEX account_balances_g1_owner, account_balances_g1_status, account_balances_g1_metadata")
        .execute(&stack.db.pool)
        .await
        .unwrap();
    migrate(&stack.db.url);
    assert_eq!(indexes().await, made, "migrate put the dropped indexes back");

    // A generation made before accounts had external ids, metadata and flags (its view without
    // them) gets the columns, their indexes and a view showing them from `tally migrate`,
    // without a rebuild; its rows read as accounts with none.
    sqlx::raw_sql(
        "DROP VIEW account_balances; \
         ALTER TABLE account_balances_g1 DROP COLUMN external_id, DROP COLUMN metadata, DROP COLUMN flags; \
         CREATE VIEW account_balances AS SELECT account_id, owner, currency, balance, held, available, status, \
             overdraft_limit, holds, opened_at, version, last_position, updated_at FROM account_balances_g1",
    )
    .execute(&stack.db.pool)
    .await
    .unwrap();
    migrate(&stack.db.url);
    assert_eq!(indexes().await, made, "migrate put the columns' indexes back");
    // The query API reads a replica: the new view reaches it by replication.
    let page = tally_tests::eventually(
        std::time::Duration::from_secs(10),
        "the new view replicated",
        || async {
            let (status, page) = get(&format!("{list}?owner=ada&limit=1")).await;
            (status == StatusCode::OK).then_some(page)
        },
    )
    .await;
    let shown = &page["accounts"][0];
    assert_eq!(
        (&shown["external_id"], &shown["metadata"], &shown["flags"]),
        (&Value::Null, &json!({}), &json!([])),
        "{page}"
    );
}
