//! The query API against real replicas: the cache under replica lag, read-your-writes,
//! pagination under concurrent writes, transfers, audit reads, as-of folds, two instances.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cqrs_es::Aggregate;
use rand::Rng;
use rand::seq::IndexedRandom;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_domain::Account;
use tally_service::auth::Role;
use tally_tests::{Api, PrivateCluster, Stack, TestDb, client, client_with, eventually, problem_code, token};
use uuid::Uuid;

/// A GET on the query API: status, headers, body (`null` when not JSON).
async fn get(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = client.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    if !status.is_success() && status != StatusCode::NOT_MODIFIED {
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{url}: every refusal is a problem"
        );
    }
    (status, headers, response.json().await.unwrap_or(Value::Null))
}

/// A client with the `auditor` role.
fn auditor() -> reqwest::Client {
    client_with(&token("auditor", &[Role::Auditor])).build().unwrap()
}

/// Deposits `amount` and returns the response's consistency token and the new version.
async fn deposit(api: &Api, account: Uuid, amount: i64) -> (String, i64) {
    let (status, body, _) = api
        .post_keyed(&format!("/v1/accounts/{account}/deposits"), &json!({"amount": amount}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    (
        body["consistency_token"].as_str().unwrap().to_owned(),
        body["version"].as_i64().unwrap(),
    )
}

/// The account as the query API at `base` shows it (after it exists there).
async fn account_at(base: &str, account: Uuid, version_min: i64) -> Value {
    let url = format!("{base}/v1/accounts/{account}");
    eventually(
        Duration::from_secs(20),
        "the account to reach the query API",
        || async {
            let (status, _, body) = get(&client(), &url, &[]).await;
            (status == StatusCode::OK && body["version"].as_i64() >= Some(version_min)).then_some(body)
        },
    )
    .await
}

/// Waits until `(name, labels...)` in the Prometheus text at `{base}/metrics` reaches `min`.
async fn metric_reaches(base: &str, series: &str, min: f64) {
    let url = format!("{base}/metrics");
    eventually(Duration::from_secs(20), series, || async {
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        let value: f64 = text
            .lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (value >= min).then_some(())
    })
    .await
}

/// A stack on a private primary + replica, so this test can pause the replica's replay.
async fn private_stack(query_env: &[(&'static str, String)]) -> (PrivateCluster, Stack) {
    let cluster = PrivateCluster::start();
    let db = TestDb::on(&cluster.services()).await;
    let stack = Stack::start_on(db, query_env).await;
    (cluster, stack)
}

#[tokio::test]
async fn a_cache_never_keeps_a_row_older_than_an_invalidation_it_has_seen() {
    // A lag bound far above this test's pause keeps the paused replica in rotation.
    let (cluster, stack) = private_stack(&[("TALLY_REPLICA_LAG_MAX_MS", "600000".into())]).await;
    let api = Api::new(&stack.command);
    let account = api.funded("EUR", 100).await;
    let cached = account_at(&stack.query, account, 2).await;
    assert_eq!(cached["balance"], 100);
    let url = format!("{}/v1/accounts/{account}", stack.query);
    // Served from the cache from now on (a hit is counted).
    get(&client(), &url, &[]).await;
    metric_reaches(
        stack.ops_of(&stack.query),
        "tally_query_cache_requests_total{cache=\"accounts\",result=\"hit\"}",
        1.0,
    )
    .await;

    cluster.pause_replay(true).await;
    let (_, version) = deposit(&api, account, 50).await;
    // The projector commits version 3 on the primary and publishes the invalidation; the
    // query API applies it while its replica still has version 2.
    eventually(
        Duration::from_secs(20),
        "the projector to commit the deposit",
        || async {
            let v: Option<i64> = sqlx::query_scalar("SELECT version FROM account_balances WHERE account_id = $1")
                .bind(account)
                .fetch_optional(&stack.db.pool)
                .await
                .ok()
                .flatten();
            (v >= Some(version)).then_some(())
        },
    )
    .await;
    metric_reaches(
        stack.ops_of(&stack.query),
        "tally_query_cache_invalidations_total{cache=\"accounts\"}",
        1.0,
    )
    .await;

    // The replica still serves the old row: it is served (that is what the replica has), but
    // not cached.
    for _ in 0..3 {
        let (status, _, body) = get(&client(), &url, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["version"], 2, "the paused replica's row");
    }
    metric_reaches(
        stack.ops_of(&stack.query),
        "tally_query_cache_requests_total{cache=\"accounts\",result=\"stale\"}",
        1.0,
    )
    .await;

    cluster.pause_replay(false).await;
    stack.db.sync_replica().await;
    // The very first read after the replica caught up shows the deposit: had the stale row
    // been cached, it would be served until the TTL (a minute).
    let (status, _, body) = get(&client(), &url, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["version"], version, "{}", stack.logs());
    assert_eq!(body["balance"], 150);
}

#[tokio::test]
async fn a_read_with_a_token_waits_for_the_write_then_answers_503_until_the_replica_has_it() {
    let (cluster, stack) = private_stack(&[
        ("TALLY_REPLICA_LAG_MAX_MS", "600000".into()),
        ("TALLY_CONSISTENCY_WAIT_MS", "1000".into()),
    ])
    .await;
    let api = Api::new(&stack.command);
    let account = api.funded("EUR", 100).await;
    account_at(&stack.query, account, 2).await;
    let url = format!("{}/v1/accounts/{account}", stack.query);

    // Replay paused: the write cannot reach the replica, so the wait runs out.
    cluster.pause_replay(true).await;
    let (token, version) = deposit(&api, account, 25).await;
    let started = Instant::now();
    let (status, headers, body) = get(&client(), &url, &[("X-Consistency-Token", &token)]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(problem_code(&body), "not-yet-consistent");
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited {:?}",
        started.elapsed()
    );
    // Without a token the old row is served at once.
    let (status, _, body) = get(&client(), &url, &[]).await;
    assert_eq!((status, body["version"].as_i64()), (StatusCode::OK, Some(2)));

    // Replay resumed: the same read, now with the query parameter, sees its write.
    cluster.pause_replay(false).await;
    let (status, _, body) = get(&client(), &format!("{url}?consistent_with={token}"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["version"].as_i64() >= Some(version));
    assert_eq!(body["balance"], 125);

    // A well-formed token of a write that never happened: 422.
    let forged = format!("v1.{}.7", Uuid::now_v7().simple());
    let (status, _, body) = get(&client(), &url, &[("X-Consistency-Token", &forged)]).await;
    assert_eq!(
        (status, problem_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "unknown-consistency-token")
    );
    // A token that is not one is a 400, not a wait.
    let (status, _, body) = get(&client(), &url, &[("X-Consistency-Token", "v1.nope.1")]).await;
    assert_eq!(
        (status, problem_code(&body)),
        (StatusCode::BAD_REQUEST, "invalid-consistency-token")
    );
}

#[tokio::test]
async fn a_token_beyond_the_head_of_the_log_is_refused_at_once_without_waiting() {
    let wait = Duration::from_secs(10);
    let stack = Stack::start_on(
        TestDb::new().await,
        &[("TALLY_CONSISTENCY_WAIT_MS", wait.as_millis().to_string())],
    )
    .await;
    let api = Api::new(&stack.command);
    let account = api.funded("EUR", 100).await;
    let (_, version) = deposit(&api, account, 5).await;
    account_at(&stack.query, account, version).await;
    // The account's own stream far in the future, and a stream that does not exist: each
    // would otherwise keep its request polling the replica for the whole wait.
    for forged in [
        format!("v1.{}.{}", account.simple(), version + 1_000_000),
        format!("v1.{}.1", Uuid::now_v7().simple()),
    ] {
        for path in ["", "/statement"] {
            let started = Instant::now();
            let (status, _, body) = get(
                &client(),
                &format!("{}/v1/accounts/{account}{path}", stack.query),
                &[("X-Consistency-Token", &forged)],
            )
            .await;
            assert_eq!(
                (status, problem_code(&body)),
                (StatusCode::UNPROCESSABLE_ENTITY, "unknown-consistency-token"),
                "{path} {forged}: {body}"
            );
            assert!(
                started.elapsed() < wait / 2,
                "{path} {forged}: answered after {:?}, as if it had waited",
                started.elapsed()
            );
        }
    }
}

#[tokio::test]
async fn a_replica_that_is_down_or_too_far_behind_leaves_the_rotation_and_ready_says_so() {
    // One replica that answers (and can be paused) and one nobody listens on.
    let dead = format!("postgres://postgres@127.0.0.1:{}/tally", tally_tests::free_port());
    let cluster = PrivateCluster::start();
    let db = TestDb::on(&cluster.services()).await;
    let replicas = format!("{},{dead}", db.replica_url.clone().unwrap());
    let stack = Stack::start_on(
        db,
        &[
            ("TALLY_REPLICA_URLS", replicas),
            ("TALLY_REPLICA_LAG_MAX_MS", "300".into()),
            ("TALLY_REPLICA_CHECK_MS", "100".into()),
        ],
    )
    .await;
    let api = Api::new(&stack.command);
    let ops = client_with(&token("oncall", &[Role::Ops])).build().unwrap();
    let ready = |want_source: &'static str| {
        let url = format!("{}/ready", stack.query);
        let ops = ops.clone();
        eventually(Duration::from_secs(20), want_source, move || {
            let (url, ops) = (url.clone(), ops.clone());
            async move {
                let body: Value = ops.get(&url).send().await.ok()?.json().await.ok()?;
                // Both replicas checked at least once, and reads going where expected.
                let checked = body["replicas"].as_array()?.iter().all(|r| !r["checked_at"].is_null());
                (checked && body["source"] == want_source).then_some(body)
            }
        })
    };
    let body = ready("replica").await;
    let replicas = body["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{body}");
    assert_eq!(replicas[0]["usable"], true, "{body}");
    assert_eq!(replicas[1]["usable"], false, "{body}");
    assert!(
        replicas[1]["reason"].as_str().unwrap().contains("unreachable"),
        "{body}"
    );
    assert!(
        !body.to_string().contains("postgres://"),
        "no URL (or credentials) in /ready: {body}"
    );
    let anonymous: Value = reqwest::get(format!("{}/ready", stack.query))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(anonymous["status"], "ready", "{anonymous}");
    assert!(
        anonymous.get("replicas").is_none() && !anonymous.to_string().contains("127.0.0.1"),
        "an anonymous caller learns no hosts and no error texts: {anonymous}"
    );

    // Paused past the 300 ms bound while the primary moves on: out of rotation, reads go to
    // the primary and see the newest write at once.
    let account = api.funded("EUR", 10).await;
    cluster.pause_replay(true).await;
    let (_, version) = deposit(&api, account, 5).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    deposit(&api, account, 5).await;
    let body = ready("primary-fallback").await;
    assert_eq!(body["replicas"][0]["usable"], false, "{body}");
    assert!(body["replicas"][0]["lag_bytes"].as_u64() > Some(0), "{body}");
    account_at(&stack.query, account, version + 1).await;
    metric_reaches(stack.ops_of(&stack.query), "tally_replica_lag_bytes", 1.0).await;

    cluster.pause_replay(false).await;
    ready("replica").await;
}

#[tokio::test]
async fn walking_statement_pages_while_writes_continue_returns_every_line_once_in_order() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let account = api.funded("EUR", 1).await;
    account_at(&stack.query, account, 2).await;
    const DEPOSITS: i64 = 240;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let api = api.clone();
            tokio::spawn(async move {
                for i in 0..DEPOSITS / 4 {
                    // Amounts 2..=241, each once: a line's amount names its deposit.
                    deposit(&api, account, 2 + w + 4 * i).await;
                }
            })
        })
        .collect();
    let statement = format!("{}/v1/accounts/{account}/statement", stack.query);
    let mut versions = Vec::new();
    let mut amounts = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut writers_done = false;
    loop {
        let url = match &cursor {
            Some(c) => format!("{statement}?limit=7&cursor={c}"),
            None => format!("{statement}?limit=7"),
        };
        let (status, _, page) = get(&client(), &url, &[]).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for line in page["lines"].as_array().unwrap() {
            versions.push(line["version"].as_i64().unwrap());
            assert!(
                amounts.insert(line["amount"].as_i64().unwrap()),
                "a line came twice: {line}"
            );
        }
        if let Some(next) = page["next_cursor"].as_str() {
            cursor = Some(next.to_owned());
        }
        if page["has_more"] == true {
            continue;
        }
        if writers_done && amounts.len() as i64 == DEPOSITS + 1 {
            break;
        }
        if !writers_done && writers.iter().all(|w| w.is_finished()) {
            writers_done = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "lines in version order: {versions:?}"
    );
    assert_eq!(amounts, (1..=DEPOSITS + 1).collect::<BTreeSet<_>>());

    // Filters: only credits (all of them), a time window with nothing in it, bad input.
    let (_, _, page) = get(&client(), &format!("{statement}?direction=debit"), &[]).await;
    assert_eq!(page["lines"].as_array().unwrap().len(), 0, "{page}");
    let (_, _, page) = get(&client(), &format!("{statement}?direction=credit&limit=500"), &[]).await;
    assert_eq!(page["lines"].as_array().unwrap().len() as i64, DEPOSITS + 1);
    let (_, _, page) = get(&client(), &format!("{statement}?to=2000-01-01T00:00:00Z"), &[]).await;
    assert_eq!(page["lines"].as_array().unwrap().len(), 0, "{page}");
    for (query, status, code) in [
        ("limit=501", StatusCode::UNPROCESSABLE_ENTITY, "limit-out-of-range"),
        ("limit=0", StatusCode::UNPROCESSABLE_ENTITY, "limit-out-of-range"),
        ("limit=many", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("cursor=zz", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("direction=sideways", StatusCode::BAD_REQUEST, "invalid-parameter"),
        ("from=yesterday", StatusCode::BAD_REQUEST, "invalid-parameter"),
    ] {
        let (got, _, body) = get(&client(), &format!("{statement}?{query}"), &[]).await;
        assert_eq!((got, problem_code(&body)), (status, code), "{query}: {body}");
    }
    // A cursor of another account's statement is refused.
    let other = api.funded("EUR", 1).await;
    account_at(&stack.query, other, 2).await;
    let (_, _, page) = get(&client(), &format!("{statement}?limit=1"), &[]).await;
    let foreign = page["next_cursor"].as_str().unwrap();
    let (status, _, _) = get(
        &client(),
        &format!("{}/v1/accounts/{other}/statement?cursor={foreign}", stack.query),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_account_carries_an_etag_and_an_unchanged_one_answers_304() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let account = api.funded("EUR", 100).await;
    account_at(&stack.query, account, 2).await;
    let url = format!("{}/v1/accounts/{account}", stack.query);
    let (status, headers, _) = get(&client(), &url, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let etag = headers.get("etag").unwrap().to_str().unwrap().to_owned();
    assert_eq!(etag, "\"2\"");
    let (status, headers, _) = get(&client(), &url, &[("If-None-Match", &etag)]).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert_eq!(headers.get("etag").unwrap().to_str().unwrap(), etag);
    // After a write (read with its token) the old tag no longer matches.
    let (token, _) = deposit(&api, account, 1).await;
    let (status, headers, body) = get(
        &client(),
        &url,
        &[("If-None-Match", &etag), ("X-Consistency-Token", &token)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers.get("etag").unwrap().to_str().unwrap(), "\"3\"");
    let (status, _, body) = get(&client(), &format!("{}/v1/accounts/not-a-uuid", stack.query), &[]).await;
    assert_eq!(
        (status, problem_code(&body)),
        (StatusCode::NOT_FOUND, "account-not-found")
    );
}

#[tokio::test]
async fn transfers_are_read_by_id_and_listed_per_account_with_filters_and_pages() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let (ada, bob) = (api.funded("EUR", 1_000).await, api.funded("EUR", 0).await);
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    let mut last_token = String::new();
    for (amount, mode) in [(10, "immediate"), (20, "immediate"), (30, "pending"), (40, "immediate")] {
        let id = Uuid::now_v7();
        let (status, body, _) = api
            .transfer(
                json!({"transfer_id": id, "from": ada, "to": bob, "amount": amount, "currency": "EUR", "mode": mode}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        last_token = body["consistency_token"].as_str().unwrap().to_owned();
        tokens.push(last_token.clone());
        ids.push(id);
    }
    // The last transfer, read with its own token.
    let url = format!("{}/v1/transfers/{}", stack.query, ids[3]);
    let (status, headers, body) = get(&client(), &url, &[("X-Consistency-Token", &last_token)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["amount"].as_i64()),
        (Some("completed"), Some(40))
    );
    assert_eq!(body["from_account"], json!(ada));
    assert!(headers.contains_key("etag"));
    // The destination account, read with the transfer's token, shows the credit.
    let (status, _, body) = get(
        &client(),
        &format!("{}/v1/accounts/{bob}", stack.query),
        &[("X-Consistency-Token", &last_token)],
    )
    .await;
    assert_eq!((status, body["balance"].as_i64()), (StatusCode::OK, Some(70)), "{body}");

    // A token covers its own write: the transfers sit in different partitions, projected
    // independently, so each is read with its token before the listing counts on them all.
    for (id, token) in ids.iter().zip(&tokens) {
        let url = format!("{}/v1/transfers/{id}", stack.query);
        let (status, _, body) = get(&client(), &url, &[("X-Consistency-Token", token)]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let list = format!("{}/v1/accounts/{bob}/transfers", stack.query);
    let (_, _, page) = get(&client(), &format!("{list}?consistent_with={last_token}"), &[]).await;
    let listed: Vec<Value> = page["transfers"].as_array().unwrap().clone();
    assert_eq!(
        listed.iter().map(|t| t["transfer_id"].clone()).collect::<Vec<_>>(),
        ids.iter().map(|id| json!(id)).collect::<Vec<_>>(),
        "oldest first"
    );
    let (_, _, page) = get(&client(), &format!("{list}?status=pending"), &[]).await;
    assert_eq!(page["transfers"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["transfers"][0]["transfer_id"], json!(ids[2]));
    // One at a time, by cursor.
    let mut walked = Vec::new();
    let mut url = format!("{list}?limit=1");
    loop {
        let (status, _, page) = get(&client(), &url, &[]).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        walked.extend(
            page["transfers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["transfer_id"].clone()),
        );
        if page["has_more"] != true {
            break;
        }
        url = format!("{list}?limit=1&cursor={}", page["next_cursor"].as_str().unwrap());
    }
    assert_eq!(walked.len(), 4);
    let (status, _, body) = get(&client(), &format!("{list}?status=lost"), &[]).await;
    assert_eq!(
        (status, problem_code(&body)),
        (StatusCode::BAD_REQUEST, "invalid-parameter")
    );
    let (status, _, body) = get(
        &client(),
        &format!("{}/v1/transfers/{}", stack.query, Uuid::now_v7()),
        &[],
    )
    .await;
    assert_eq!(
        (status, problem_code(&body)),
        (StatusCode::NOT_FOUND, "transfer-not-found")
    );
}

#[tokio::test]
async fn audit_reads_show_each_stream_and_the_global_feed_exactly_as_stored() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let account = api.funded("EUR", 100).await;
    let (token, _) = deposit(&api, account, 7).await;
    let auditor = auditor();

    // The stream's history, with its hash chain intact.
    let url = format!("{}/v1/audit/streams/{account}/events?limit=2", stack.query);
    let (status, _, page) = get(&auditor, &url, &[("X-Consistency-Token", &token)]).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(page["next_after"], 2);
    assert_eq!(events[0]["event_type"], "AccountOpened");
    assert_eq!(events[0]["prev_hash"], Value::Null);
    assert_eq!(events[1]["prev_hash"], events[0]["hash"]);
    assert_eq!(events[1]["payload"]["amount"], 100);
    let stored = stack.db.read_whole_stream(account).await;
    assert_eq!(events[1]["hash"], hex_of(&stored[1].hash));
    let (_, _, rest) = get(&auditor, &format!("{url}&after=2"), &[]).await;
    assert_eq!(rest["events"][0]["version"], 3);
    assert_eq!(rest["next_after"], Value::Null);
    // A reader may not read the log.
    let (status, _, _) = get(&client(), &url, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, body) = get(
        &auditor,
        &format!("{}/v1/audit/streams/{}/events", stack.query, Uuid::now_v7()),
        &[],
    )
    .await;
    assert_eq!(
        (status, problem_code(&body)),
        (StatusCode::NOT_FOUND, "stream-not-found")
    );

    // The global feed, walked in pages of 2 from the start, is the log in commit order. (It
    // only shows transactions older than the oldest one running on the shared server, so a
    // walk may end early while another test's transaction is open: walk again.)
    let in_commit_order: Vec<(Value, i64)> =
        sqlx::query_as::<_, (Uuid, i64)>("SELECT stream_id, version FROM events ORDER BY tx_id, position")
            .fetch_all(&stack.db.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(s, v)| (json!(s), v))
            .collect();
    let query = stack.query.clone();
    eventually(Duration::from_secs(30), "the feed to show the whole log", || {
        let (auditor, query, token, expected) =
            (auditor.clone(), query.clone(), token.clone(), in_commit_order.clone());
        async move {
            let mut feed = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let url = match &after {
                    Some(a) => format!("{query}/v1/audit/events?limit=2&after={a}"),
                    None => format!("{query}/v1/audit/events?limit=2"),
                };
                let (status, _, page) = get(&auditor, &url, &[("X-Consistency-Token", &token)]).await;
                assert_eq!(status, StatusCode::OK, "{page}");
                let events = page["events"].as_array().unwrap();
                if events.is_empty() {
                    // An empty first page (the gap-safe feed shows nothing while an older
                    // transaction is open) answers the start of the log.
                    assert_eq!(
                        page["checkpoint"].as_str(),
                        after.as_deref().or(Some("0.0")),
                        "an empty page keeps the checkpoint"
                    );
                    break;
                }
                feed.extend(
                    events
                        .iter()
                        .map(|e| (e["stream_id"].clone(), e["version"].as_i64().unwrap())),
                );
                after = Some(page["checkpoint"].as_str().unwrap().to_owned());
            }
            (feed == expected).then_some(())
        }
    })
    .await;
    let (status, _, body) = get(&auditor, &format!("{}/v1/audit/events?after=nope", stack.query), &[]).await;
    assert_eq!(
        (status, problem_code(&body)),
        (StatusCode::BAD_REQUEST, "invalid-parameter")
    );
}

fn hex_of(bytes: &[u8]) -> Value {
    json!(hex_string(bytes))
}

#[tokio::test]
async fn as_of_equals_a_fold_of_the_log_for_random_accounts_and_points() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let mut accounts = Vec::new();
    for _ in 0..4 {
        accounts.push(api.funded("EUR", 500).await);
    }
    let mut rng = rand::rng();
    for _ in 0..40 {
        let account = *accounts.choose(&mut rng).unwrap();
        let amount = rng.random_range(1..60);
        match rng.random_range(0..3) {
            0 => {
                deposit(&api, account, amount).await;
            }
            1 => {
                // May be refused for lack of funds: refusals add no event, which is fine.
                api.post_keyed(
                    &format!("/v1/accounts/{account}/withdrawals"),
                    &json!({"amount": amount}),
                )
                .await;
            }
            _ => {
                let to = *accounts.choose(&mut rng).unwrap();
                if to != account {
                    api.transfer(json!({
                        "transfer_id": Uuid::now_v7(), "from": account, "to": to, "amount": amount,
                        "currency": "EUR", "mode": "immediate"
                    }))
                    .await;
                }
            }
        }
    }
    stack.db.sync_replica().await;
    let auditor = auditor();
    for _ in 0..16 {
        let account = *accounts.choose(&mut rng).unwrap();
        let log = stack.db.read_whole_stream(account).await;
        let cut = rng.random_range(0..log.len());
        // Half by version, half by the time of that event (every event recorded at or before).
        let by_time = rng.random_bool(0.5);
        let query = if by_time {
            format!(
                "at={}",
                log[cut]
                    .recorded_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            )
        } else {
            format!("version={}", log[cut].version)
        };
        let mut expected = Account::default();
        let mut last = 0;
        for stored in log.iter().filter(|e| {
            if by_time {
                e.recorded_at <= log[cut].recorded_at
            } else {
                e.version <= log[cut].version
            }
        }) {
            let event =
                tally_schemas::decode_account_event(&stored.event_type, stored.schema_version as u32, &stored.payload)
                    .unwrap();
            expected.apply(event);
            last = stored.version;
        }
        let url = format!(
            "{}/v1/accounts/{account}/as-of?{}",
            stack.query,
            query.replace('+', "%2B")
        );
        let (status, _, body) = get(&auditor, &url, &[]).await;
        assert_eq!(status, StatusCode::OK, "{url}: {body}");
        assert_eq!(body["version"], last, "{url}");
        assert_eq!(body["balance"], expected.balance, "{url}");
        assert_eq!(body["held"], expected.held, "{url}");
        assert_eq!(body["status"], expected.status.as_str(), "{url}");
    }
    // Before the account existed, past its last version, or for a transfer's id: 404.
    let account = accounts[0];
    for query in ["at=2000-01-01T00:00:00Z", "version=100000"] {
        let (status, _, body) = get(
            &auditor,
            &format!("{}/v1/accounts/{account}/as-of?{query}", stack.query),
            &[],
        )
        .await;
        assert_eq!(
            (status, problem_code(&body)),
            (StatusCode::NOT_FOUND, "account-not-found"),
            "{query}"
        );
    }
    for query in ["", "at=2000-01-01T00:00:00Z&version=1", "version=0", "at=noon"] {
        let (status, _, body) = get(
            &auditor,
            &format!("{}/v1/accounts/{account}/as-of?{query}", stack.query),
            &[],
        )
        .await;
        assert_eq!(
            (status, problem_code(&body)),
            (StatusCode::BAD_REQUEST, "invalid-parameter"),
            "{query}"
        );
    }
}

#[tokio::test]
async fn two_instances_read_alternately_with_tokens_always_reflect_the_write() {
    let mut stack = Stack::start().await;
    let second = stack.spawn_query_api(&[]).await;
    let instances = [stack.query.clone(), second];
    let api = Api::new(&stack.command);
    let account = api.funded("EUR", 0).await;
    for i in 0..40i64 {
        let (token, version) = deposit(&api, account, 1).await;
        let base = &instances[(i % 2) as usize];
        let (status, _, body) = get(
            &client(),
            &format!("{base}/v1/accounts/{account}"),
            &[("X-Consistency-Token", &token)],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{base}: {body}\n{}", stack.logs());
        assert!(body["version"].as_i64() >= Some(version), "{base}: {body}");
        assert!(body["balance"].as_i64() >= Some(i + 1), "{base}: {body}");
    }
}

#[tokio::test]
async fn an_audit_export_writes_the_feed_as_json_lines_with_its_sha256() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let before = chrono::Utc::now();
    let account = api.funded("EUR", 100).await;
    let (written, _) = deposit(&api, account, 5).await;
    stack.db.sync_replica().await;
    let dir = std::env::temp_dir().join(format!("tally-export-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let output = dir.join("feed.jsonl");
    let auditor_token = token("auditor", &[Role::Auditor]);
    let run = |extra: Vec<String>| {
        let mut command = std::process::Command::new(tally_tests::bin_dir().join("tally"));
        command
            .args([
                "audit",
                "export",
                "--url",
                &stack.query,
                "--token",
                &auditor_token,
                "--output",
            ])
            .arg(&output)
            .args(extra);
        command.output().unwrap()
    };
    // Make sure the replica has the deposit before exporting everything.
    let (status, _, _) = get(
        &auditor(),
        &format!("{}/v1/audit/streams/{account}/events", stack.query),
        &[("X-Consistency-Token", &written)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    // The feed shows transactions older than the oldest running on the shared server: export
    // again if another test's transaction hid the last ones.
    let (done, text, lines) = eventually(Duration::from_secs(30), "an export of the whole log", || {
        let done = run(vec![]);
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
        let text = std::fs::read_to_string(&output).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        async move { (lines.len() as i64 == events).then_some((done, text, lines)) }
    })
    .await;
    assert_eq!(lines[0]["event_type"], "AccountOpened");
    // The printed digest is the file's, and so is the .sha256 beside it.
    let stdout = String::from_utf8_lossy(&done.stdout).into_owned();
    let digest = {
        use sha2::Digest;
        hex_string(&sha2::Sha256::digest(text.as_bytes()))
    };
    assert!(stdout.contains(&format!("sha256 {digest}")), "{stdout}");
    let beside = std::fs::read_to_string(dir.join("feed.jsonl.sha256")).unwrap();
    assert_eq!(beside, format!("{digest}  feed.jsonl\n"));

    // A window that ends before anything was written exports nothing.
    let done = run(vec!["--to".into(), before.to_rfc3339()]);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "");
    // A reader's token is refused, with the API's answer in the error.
    let reader = token("reader", &[Role::Reader]);
    let refused = std::process::Command::new(tally_tests::bin_dir().join("tally"))
        .args(["audit", "export", "--url", &stack.query, "--token", &reader, "--output"])
        .arg(&output)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("403"));
    std::fs::remove_dir_all(&dir).ok();
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
