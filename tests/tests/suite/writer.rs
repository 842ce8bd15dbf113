//! The command side's writer against real Postgres: group commit, per-stream serialization,
//! the aggregate cache across several command-api processes, and snapshots.

use std::collections::HashSet;

use cqrs_es::Aggregate;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_command_api::execute::load_account;
use tally_domain::Account;
use tally_tests::{TestDb, command_api};
use uuid::Uuid;

async fn open(client: &reqwest::Client, base: &str) -> Uuid {
    let response = client
        .post(format!("{base}/v1/accounts"))
        .json(&json!({"owner": "Ada", "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    body["account_id"].as_str().unwrap().parse().unwrap()
}

/// POSTs `body` to `{base}/v1/accounts/{id}/{action}` under `key`, or a fresh unique key when
/// `None` (deposits and withdrawals require one); returns status, body and whether it was a
/// replay.
async fn post(
    client: &reqwest::Client,
    base: &str,
    id: Uuid,
    action: &str,
    key: Option<&str>,
    body: Value,
) -> (StatusCode, Value, bool) {
    let key = key.map_or_else(|| Uuid::now_v7().to_string(), str::to_owned);
    let request = client
        .post(format!("{base}/v1/accounts/{id}/{action}"))
        .header("Idempotency-Key", key)
        .json(&body);
    let response = request.send().await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (status, response.json().await.unwrap_or(Value::Null), replayed)
}

/// The ids of the transactions that wrote `stream`'s events after `after_version`.
async fn writing_transactions(db: &TestDb, stream: Uuid, after_version: i64) -> HashSet<i64> {
    let events = db.store().read_stream(stream, after_version, 10_000).await.unwrap();
    events.iter().map(|e| e.tx_id).collect()
}

/// Replays a whole stream without snapshots: the reference the writer's state is checked against.
async fn replayed(db: &TestDb, stream: Uuid) -> (Account, i64) {
    let mut account = Account::default();
    let events = db.store().read_stream(stream, 0, 10_000).await.unwrap();
    for stored in &events {
        let event =
            tally_schemas::decode_account_event(&stored.event_type, stored.schema_version as u32, &stored.payload)
                .unwrap();
        account.apply(event);
    }
    (account, events.last().map_or(0, |e| e.version))
}

#[tokio::test]
async fn a_hot_account_under_64_concurrent_clients_sees_no_conflicts() {
    let db = TestDb::new().await;
    let (base, api) = command_api(&db, &[]).await;
    let client = reqwest::Client::new();
    let id = open(&client, &base).await;
    const CLIENTS: usize = 64;
    const EACH: usize = 15;

    let clients = (0..CLIENTS).map(|c| {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..EACH {
                let key = format!("hot-{c}-{i}");
                let (status, body, _) = post(&client, &base, id, "deposits", Some(&key), json!({"amount": 3})).await;
                statuses.push((status, body));
            }
            statuses
        })
    });
    let results: Vec<(StatusCode, Value)> = futures::future::join_all(clients)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();

    let refused: Vec<_> = results.iter().filter(|(s, _)| *s != StatusCode::CREATED).collect();
    assert!(
        refused.is_empty(),
        "{} of {} commands were refused, e.g. {:?}\n{}",
        refused.len(),
        results.len(),
        refused.first(),
        api.log_tail()
    );
    let (account, version) = replayed(&db, id).await;
    assert_eq!(
        version,
        1 + (CLIENTS * EACH) as i64,
        "every command appended exactly one event"
    );
    assert_eq!(account.balance, 3 * (CLIENTS * EACH) as i64);
    let versions: HashSet<i64> = results.iter().map(|(_, b)| b["version"].as_i64().unwrap()).collect();
    assert_eq!(versions.len(), CLIENTS * EACH, "each command got its own version");
    let transactions = writing_transactions(&db, id, 1).await;
    assert!(
        transactions.len() < CLIENTS * EACH,
        "commands that queue on one stream are appended together ({} transactions for {} commands)",
        transactions.len(),
        CLIENTS * EACH
    );
}

#[tokio::test]
async fn commands_that_arrive_together_share_a_transaction_and_a_refusal_fails_no_neighbour() {
    let db = TestDb::new().await;
    // One lane that waits up to half a second to fill a batch: everything below is sent at
    // once, so it lands in one or two transactions.
    let (base, api) = command_api(
        &db,
        &[
            ("TALLY_GROUP_COMMIT_LANES", "1".into()),
            ("TALLY_GROUP_COMMIT_WAIT_US", "500000".into()),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let mut accounts = Vec::new();
    for _ in 0..8 {
        accounts.push(open(&client, &base).await);
    }
    let key_used = "earlier-request";
    let earlier = post(
        &client,
        &base,
        accounts[0],
        "deposits",
        Some(key_used),
        json!({"amount": 5}),
    )
    .await;
    assert_eq!(earlier.0, StatusCode::CREATED);

    let deposits = accounts
        .iter()
        .map(|id| post(&client, &base, *id, "deposits", None, json!({"amount": 100})));
    let overdrafts = accounts[..4]
        .iter()
        .map(|id| post(&client, &base, *id, "withdrawals", None, json!({"amount": 1_000_000})));
    let (deposits, overdrafts, replay, reused) = tokio::join!(
        futures::future::join_all(deposits),
        futures::future::join_all(overdrafts),
        post(
            &client,
            &base,
            accounts[0],
            "deposits",
            Some(key_used),
            json!({"amount": 5})
        ),
        post(
            &client,
            &base,
            accounts[0],
            "deposits",
            Some(key_used),
            json!({"amount": 6})
        ),
    );

    for (status, body, _) in &deposits {
        assert_eq!(*status, StatusCode::CREATED, "{body}\n{}", api.log_tail());
    }
    for (status, body, _) in &overdrafts {
        assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["type"], "https://tally.dev/problems/insufficient-funds");
    }
    assert_eq!(replay.0, StatusCode::CREATED);
    assert!(replay.2, "the same request under a used key is a replay");
    assert_eq!(replay.1, earlier.1);
    assert_eq!(reused.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.1["type"], "https://tally.dev/problems/idempotency-key-reused");

    let mut transactions = HashSet::new();
    for id in &accounts {
        let (account, _) = replayed(&db, *id).await;
        let expected = if *id == accounts[0] { 105 } else { 100 };
        assert_eq!(
            account.balance, expected,
            "no refusal or replay touched a neighbour's deposit"
        );
        let events = db.store().read_stream(*id, 0, 100).await.unwrap();
        let deposit = events.iter().rev().find(|e| e.event_type == "FundsDeposited").unwrap();
        transactions.insert(deposit.tx_id);
    }
    assert!(
        transactions.len() < accounts.len(),
        "deposits sent together share transactions (group commit): {} transactions for {} deposits",
        transactions.len(),
        accounts.len()
    );
}

#[tokio::test]
async fn a_command_the_database_rejects_fails_alone() {
    let db = TestDb::new().await;
    // Stand-in for any per-command database failure: this database refuses one payload.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.payload::text LIKE '%poison%' THEN RAISE EXCEPTION 'poisoned event'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (base, api) = command_api(
        &db,
        &[
            ("TALLY_GROUP_COMMIT_LANES", "1".into()),
            ("TALLY_GROUP_COMMIT_WAIT_US", "500000".into()),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let mut accounts = Vec::new();
    for _ in 0..6 {
        accounts.push(open(&client, &base).await);
    }

    let healthy = accounts.iter().map(|id| {
        post(
            &client,
            &base,
            *id,
            "deposits",
            None,
            json!({"amount": 7, "reference": "fine"}),
        )
    });
    let poisoned = post(
        &client,
        &base,
        accounts[0],
        "deposits",
        None,
        json!({"amount": 7, "reference": "poison"}),
    );
    let (healthy, poisoned) = tokio::join!(futures::future::join_all(healthy), poisoned);

    assert_eq!(poisoned.0, StatusCode::INTERNAL_SERVER_ERROR, "{}", poisoned.1);
    assert_eq!(poisoned.1["type"], "https://tally.dev/problems/internal");
    for (status, body, _) in &healthy {
        assert_eq!(*status, StatusCode::CREATED, "{body}\n{}", api.log_tail());
    }
    for id in &accounts {
        assert_eq!(replayed(&db, *id).await.0.balance, 7);
    }
}

#[tokio::test]
async fn two_command_apis_on_one_account_reload_instead_of_failing() {
    let db = TestDb::new().await;
    let (a, api_a) = command_api(&db, &[]).await;
    let (b, api_b) = command_api(&db, &[]).await;
    let client = reqwest::Client::new();
    let id = open(&client, &a).await;

    // A caches the account; B then moves it on behind A's back.
    assert_eq!(
        post(&client, &a, id, "deposits", None, json!({"amount": 100})).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        post(&client, &b, id, "deposits", None, json!({"amount": 200})).await.0,
        StatusCode::CREATED
    );
    let (status, body, _) = post(&client, &a, id, "withdrawals", None, json!({"amount": 250})).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "A's stale cache costs a reload, not an error: {body}"
    );
    assert_eq!(body["balance"], 50, "A decided on the state B left");
    assert_eq!(body["version"], 4);

    // Both instances hammering the same account: every command lands once, none is refused.
    let requests = (0..48).map(|i| {
        let base = if i % 2 == 0 { &a } else { &b };
        let key = format!("both-{i}");
        let client = client.clone();
        async move { post(&client, base, id, "deposits", Some(&key), json!({"amount": 1})).await }
    });
    let results = futures::future::join_all(requests).await;
    for (status, body, _) in &results {
        assert_eq!(
            *status,
            StatusCode::CREATED,
            "{body}\n--- a ---\n{}\n--- b ---\n{}",
            api_a.log_tail(),
            api_b.log_tail()
        );
    }
    let (account, version) = replayed(&db, id).await;
    assert_eq!(account.balance, 50 + 48);
    assert_eq!(version, 4 + 48);
}

#[tokio::test]
async fn a_long_stream_is_loaded_from_its_snapshot_and_a_stale_shape_is_replayed() {
    let db = TestDb::new().await;
    let (base, api) = command_api(&db, &[("TALLY_SNAPSHOT_EVERY", "10".into())]).await;
    let client = reqwest::Client::new();
    let id = open(&client, &base).await;
    for _ in 0..25 {
        let (status, body, _) = post(&client, &base, id, "deposits", None, json!({"amount": 2})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}\n{}", api.log_tail());
    }
    let snapshot_version = tally_tests::eventually(std::time::Duration::from_secs(10), "a snapshot", || async {
        let snapshot = tally_event_store::snapshot::load(&db.pool, id).await.unwrap()?;
        (snapshot.version >= 20).then_some(snapshot.version)
    })
    .await;

    let (reference, version) = replayed(&db, id).await;
    let loaded = load_account(&db.store(), id).await.unwrap();
    assert_eq!(
        loaded.snapshot_version, snapshot_version,
        "the load started at the snapshot"
    );
    assert_eq!(loaded.version, version);
    assert_eq!(
        loaded.account().unwrap(),
        &reference,
        "snapshot + later events = full replay"
    );

    // A snapshot in a shape this code does not know is ignored, not misread.
    sqlx::query(
        "UPDATE snapshots SET state_version = state_version + 1, state = '{\"balance\": -1}' WHERE stream_id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    let loaded = load_account(&db.store(), id).await.unwrap();
    assert_eq!(loaded.snapshot_version, 0, "replayed from the start");
    assert_eq!(loaded.account().unwrap(), &reference);
    assert_eq!(reference.balance, 50);
}
