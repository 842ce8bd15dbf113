//! The command side's writer against real Postgres: group commit, per-stream serialization,
//! the aggregate cache across several command-api processes, and snapshots.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_command_api::execute::load_account;
use tally_event_store::verify::ChainChecker;
use tally_tests::{TestDb, command_api};
use uuid::Uuid;

/// The ids of the transactions that wrote `stream`'s events after `after_version`.
async fn writing_transactions(db: &TestDb, stream: Uuid, after_version: i64) -> HashSet<i64> {
    let events = db.read_whole_stream(stream).await;
    events
        .iter()
        .filter(|e| e.version > after_version)
        .map(|e| e.tx_id)
        .collect()
}

/// One group-commit lane that waits up to half a second to fill a batch, so commands sent
/// together share transactions.
fn one_patient_lane() -> [(&'static str, String); 2] {
    [
        ("TALLY_GROUP_COMMIT_LANES", "1".into()),
        ("TALLY_GROUP_COMMIT_WAIT_US", "500000".into()),
    ]
}

#[tokio::test]
async fn a_hot_account_under_64_concurrent_clients_sees_no_conflicts() {
    let db = TestDb::new().await;
    let (api, api_proc) = command_api(&db, &[]).await;
    let id = api.open("EUR").await;
    const CLIENTS: usize = 64;
    const FOR: std::time::Duration = std::time::Duration::from_secs(10);

    let until = std::time::Instant::now() + FOR;
    let clients = (0..CLIENTS).map(|c| {
        let api = api.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0.. {
                if std::time::Instant::now() >= until {
                    break;
                }
                let key = format!("hot-{c}-{i}");
                let (status, body, _) = api
                    .post(
                        &format!("/v1/accounts/{id}/deposits"),
                        Some(&key),
                        &json!({"amount": 3}),
                    )
                    .await;
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
    let sent = results.len();

    let refused: Vec<_> = results.iter().filter(|(s, _)| *s != StatusCode::CREATED).collect();
    assert!(
        refused.is_empty(),
        "{} of {} commands were refused, e.g. {:?}\n{}",
        refused.len(),
        results.len(),
        refused.first(),
        api_proc.log_tail()
    );
    let (account, version) = db.replay_account(id).await;
    assert_eq!(version, 1 + sent as i64, "every command appended exactly one event");
    assert_eq!(account.balance, 3 * sent as i64);
    let versions: HashSet<i64> = results.iter().map(|(_, b)| b["version"].as_i64().unwrap()).collect();
    assert_eq!(versions.len(), sent, "each command got its own version");
    let transactions = writing_transactions(&db, id, 1).await;
    assert!(
        transactions.len() < sent,
        "commands that queue on one stream are appended together ({} transactions for {} commands)",
        transactions.len(),
        sent
    );
}

#[tokio::test]
async fn commands_that_arrive_together_share_a_transaction_and_a_refusal_fails_no_neighbour() {
    let db = TestDb::new().await;
    // Everything below is sent at once, so it lands in one or two transactions.
    let (api, api_proc) = command_api(&db, &one_patient_lane()).await;
    let mut accounts = Vec::new();
    for _ in 0..8 {
        accounts.push(api.open("EUR").await);
    }
    let key_used = "earlier-request";
    let first_deposits = format!("/v1/accounts/{}/deposits", accounts[0]);
    let earlier = api.post(&first_deposits, Some(key_used), &json!({"amount": 5})).await;
    assert_eq!(earlier.0, StatusCode::CREATED);

    let deposits = accounts
        .iter()
        .map(|id| api.post_keyed(&format!("/v1/accounts/{id}/deposits"), &json!({"amount": 100})));
    let overdrafts = accounts[..4]
        .iter()
        .map(|id| api.post_keyed(&format!("/v1/accounts/{id}/withdrawals"), &json!({"amount": 1_000_000})));
    let (deposits, overdrafts, replay, reused) = tokio::join!(
        futures::future::join_all(deposits),
        futures::future::join_all(overdrafts),
        api.post(&first_deposits, Some(key_used), &json!({"amount": 5})),
        api.post(&first_deposits, Some(key_used), &json!({"amount": 6})),
    );

    for (status, body, _) in &deposits {
        assert_eq!(*status, StatusCode::CREATED, "{body}\n{}", api_proc.log_tail());
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
        let (account, _) = db.replay_account(*id).await;
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
    let (api, api_proc) = command_api(&db, &one_patient_lane()).await;
    let mut accounts = Vec::new();
    for _ in 0..6 {
        accounts.push(api.open("EUR").await);
    }

    let healthy = accounts.iter().map(|id| {
        api.post_keyed(
            &format!("/v1/accounts/{id}/deposits"),
            &json!({"amount": 7, "reference": "fine"}),
        )
    });
    let poisoned = api.post_keyed(
        &format!("/v1/accounts/{}/deposits", accounts[0]),
        &json!({"amount": 7, "reference": "poison"}),
    );
    let (healthy, poisoned) = tokio::join!(futures::future::join_all(healthy), poisoned);

    assert_eq!(poisoned.0, StatusCode::INTERNAL_SERVER_ERROR, "{}", poisoned.1);
    assert_eq!(poisoned.1["type"], "https://tally.dev/problems/internal");
    for (status, body, _) in &healthy {
        assert_eq!(*status, StatusCode::CREATED, "{body}\n{}", api_proc.log_tail());
    }
    for id in &accounts {
        assert_eq!(db.replay_account(*id).await.0.balance, 7);
    }
}

#[tokio::test]
async fn two_command_apis_on_one_account_reload_instead_of_failing() {
    let db = TestDb::new().await;
    let (a, api_a) = command_api(&db, &[]).await;
    let (b, api_b) = command_api(&db, &[]).await;
    let id = a.open("EUR").await;
    let (deposits, withdrawals) = (
        format!("/v1/accounts/{id}/deposits"),
        format!("/v1/accounts/{id}/withdrawals"),
    );

    // A caches the account; B then moves it on behind A's back.
    assert_eq!(
        a.post_keyed(&deposits, &json!({"amount": 100})).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        b.post_keyed(&deposits, &json!({"amount": 200})).await.0,
        StatusCode::CREATED
    );
    let (status, body, _) = a.post_keyed(&withdrawals, &json!({"amount": 250})).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "A's stale cache costs a reload, not an error: {body}"
    );
    assert_eq!(body["balance"], 50, "A decided on the state B left");
    assert_eq!(body["version"], 4);

    // Both instances hammering the same account: every command lands once, none is refused.
    let requests = (0..48).map(|i| {
        let api = if i % 2 == 0 { &a } else { &b };
        api.post(&deposits, Some(&format!("both-{i}")), &json!({"amount": 1}))
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
    let (account, version) = db.replay_account(id).await;
    assert_eq!(account.balance, 50 + 48);
    assert_eq!(version, 4 + 48);
    // Each instance chains its appends on the hash it remembers from its own last one; after
    // the other's writes that memory is stale, and the chain must still hold.
    let mut chain = ChainChecker::new();
    for event in db.read_whole_stream(id).await {
        chain.check(&event).expect("an unbroken hash chain");
    }
}

#[tokio::test]
async fn one_key_sent_to_two_command_apis_at_once_has_one_effect() {
    // Keys are stored with the responses at the end of a batch, unclaimed; a key found taken
    // there rolls the batch back and runs it again with claims, which replay.
    let db = TestDb::new().await;
    let (a, _api_a) = command_api(&db, &[]).await;
    let (b, _api_b) = command_api(&db, &[]).await;
    let id = a.open("EUR").await;
    let deposits = format!("/v1/accounts/{id}/deposits");
    let key = Uuid::now_v7().to_string();

    let requests = (0..24).map(|i| {
        let api = if i % 2 == 0 { &a } else { &b };
        api.post(&deposits, Some(&key), &json!({"amount": 7}))
    });
    let results = futures::future::join_all(requests).await;

    assert!(results.iter().all(|(s, _, _)| *s == StatusCode::CREATED), "{results:?}");
    assert_eq!(
        results.iter().filter(|(_, _, replayed)| !replayed).count(),
        1,
        "one ran"
    );
    assert!(results.iter().all(|(_, body, _)| *body == results[0].1), "one answer");
    let (account, version) = db.replay_account(id).await;
    assert_eq!((account.balance, version), (7, 2), "opened + one deposit");

    // A later retry on either instance replays too, and a new key still runs.
    let (status, body, replayed) = b.post(&deposits, Some(&key), &json!({"amount": 7})).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    assert_eq!(body, results[0].1);
    let (status, body, replayed) = a.post_keyed(&deposits, &json!({"amount": 1})).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{body}");
    assert_eq!(body["balance"], 8);
}

#[tokio::test]
async fn a_long_stream_is_loaded_from_its_snapshot_and_a_stale_shape_is_replayed() {
    let db = TestDb::new().await;
    let (api, api_proc) = command_api(&db, &[("TALLY_SNAPSHOT_EVERY", "10".into())]).await;
    let id = api.open("EUR").await;
    for _ in 0..25 {
        let (status, body, _) = api
            .post_keyed(&format!("/v1/accounts/{id}/deposits"), &json!({"amount": 2}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}\n{}", api_proc.log_tail());
    }
    let snapshot_version = tally_tests::eventually(std::time::Duration::from_secs(10), "a snapshot", || async {
        let snapshot = tally_event_store::snapshot::load(&db.pool, id).await.unwrap()?;
        (snapshot.version >= 20).then_some(snapshot.version)
    })
    .await;

    let (reference, version) = db.replay_account(id).await;
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

    let head_position: i64 = sqlx::query_scalar("SELECT position FROM events WHERE stream_id = $1 AND version = $2")
        .bind(id)
        .bind(version)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(loaded.position, head_position, "the position of the last event folded");
    // A snapshot at the head, no event after it: the position is still the head's (a response
    // naming this stream tells it even when the command writes nothing to the stream).
    let snapshot = tally_event_store::snapshot::load(&db.pool, id).await.unwrap().unwrap();
    let head = tally_event_store::snapshot::Snapshot {
        version,
        state: serde_json::to_value(&reference).unwrap(),
        ..snapshot
    };
    tally_event_store::snapshot::save(&db.pool, id, &head).await.unwrap();
    let loaded = load_account(&db.store(), id).await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.version), (version, version));
    assert_eq!(loaded.position, head_position);

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

#[tokio::test]
async fn a_retry_decided_on_a_stale_cache_still_replays_the_stored_response() {
    // B created a pending transfer and keeps it cached as pending; A posts it. After B reloads
    // the source account (its hold is gone), a retry of A's post sent to B is refused on stale
    // state by the rules; the writer must then claim the key, which finds A's stored response.
    let db = TestDb::new().await;
    let (a, _api_a) = command_api(&db, &[]).await;
    let (b, _api_b) = command_api(&db, &[]).await;
    let (from, to) = (a.open("EUR").await, a.open("EUR").await);
    let fund = a
        .post_keyed(&format!("/v1/accounts/{from}/deposits"), &json!({"amount": 1000}))
        .await;
    assert_eq!(fund.0, StatusCode::CREATED, "{}", fund.1);
    let pending = json!({"from": from, "to": to, "amount": 300, "currency": "EUR",
                         "mode": "pending", "expires_in_s": 86400});
    let (status, created, _) = b.post_keyed("/v1/transfers", &pending).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let transfer = created["transfer_id"].as_str().unwrap().to_owned();
    let post = format!("/v1/transfers/{transfer}/post");
    let key = Uuid::now_v7().to_string();
    let (status, posted, _) = a.post(&post, Some(&key), &json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{posted}");
    // B moves the source account on: its stale copy costs a reload, the transfer's stays.
    let (status, body, _) = b
        .post_keyed(&format!("/v1/accounts/{from}/deposits"), &json!({"amount": 1}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let (status, retried, replayed) = b.post(&post, Some(&key), &json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{retried}");
    assert!(replayed, "the stored response, not a new decision");
    assert_eq!(retried, posted);
}
