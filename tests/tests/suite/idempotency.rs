//! Durable idempotency through the real command API and Postgres.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_service::auth::Role;
use tally_tests::{Api, Stack, TEST_SUBJECT, token};
use uuid::Uuid;

#[tokio::test]
async fn a_retry_with_the_same_key_and_body_returns_the_first_response_and_appends_nothing() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let url = format!("/v1/accounts/{id}/deposits");
    let key = Uuid::now_v7().to_string();

    let first = api
        .post(&url, Some(&key), &json!({"amount": 1000, "reference": "r"}))
        .await;
    // Same request, keys of the body in another order: still the same request.
    let retry = api
        .post(&url, Some(&key), &json!({"reference": "r", "amount": 1000}))
        .await;

    assert_eq!(first.0, StatusCode::CREATED);
    assert!(!first.2, "the first response is not a replay");
    assert_eq!(retry.0, StatusCode::CREATED);
    assert!(retry.2, "the retry must be marked Idempotent-Replayed: true");
    assert_eq!(retry.1, first.1, "the retry returns exactly the first response");
    assert_eq!(stack.db.event_count(id).await, 2, "opened + one deposit");
    let metadata: Value =
        serde_json::from_str(&stack.db.store().read_stream(id, 1, 1).await.unwrap()[0].metadata).unwrap();
    assert_eq!(
        metadata["idempotency_key"],
        key.as_str(),
        "the key is recorded in the event's metadata"
    );
}

#[tokio::test]
async fn the_same_key_with_a_different_request_is_refused_and_changes_nothing() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let deposits = format!("/v1/accounts/{id}/deposits");
    let withdrawals = format!("/v1/accounts/{id}/withdrawals");
    let key = Uuid::now_v7().to_string();
    api.post(&deposits, Some(&key), &json!({"amount": 1000})).await;

    let other_amount = api.post(&deposits, Some(&key), &json!({"amount": 999})).await;
    let other_route = api.post(&withdrawals, Some(&key), &json!({"amount": 1000})).await;

    for (status, body, _) in [other_amount, other_route] {
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["type"], "https://tally.dev/problems/idempotency-key-reused");
    }
    assert_eq!(stack.db.event_count(id).await, 2);
}

#[tokio::test]
async fn two_callers_sharing_one_key_each_get_their_own_effect_and_their_own_replay() {
    // Keys belong to their caller: a second client that happens to pick (or guesses) another's
    // key neither gets that client's stored response nor blocks its own command.
    let stack = Stack::start().await;
    let alice = Api::new(&stack.command);
    let bob = Api::with_token(&stack.command, &token("bob", &[Role::Teller]));
    let id = alice.open("EUR").await;
    let url = format!("/v1/accounts/{id}/deposits");
    let key = "order-1";

    let from_alice = alice.post(&url, Some(key), &json!({"amount": 100})).await;
    let from_bob = bob.post(&url, Some(key), &json!({"amount": 100})).await;
    let bob_again = bob.post(&url, Some(key), &json!({"amount": 100})).await;
    let alice_again = alice.post(&url, Some(key), &json!({"amount": 100})).await;
    // The same key with another body is another request only for its own caller.
    let bob_other = bob.post(&url, Some(key), &json!({"amount": 7})).await;

    assert_eq!(
        (from_alice.0, from_alice.2),
        (StatusCode::CREATED, false),
        "{}",
        from_alice.1
    );
    assert_eq!(
        (from_bob.0, from_bob.2),
        (StatusCode::CREATED, false),
        "bob's deposit runs: {}",
        from_bob.1
    );
    assert_eq!(from_alice.1["balance"], 100);
    assert_eq!(from_bob.1["balance"], 200, "both deposits took effect");
    assert!(bob_again.2 && alice_again.2, "each retry is a replay");
    assert_eq!(bob_again.1, from_bob.1, "bob's retry replays bob's response");
    assert_eq!(alice_again.1, from_alice.1, "alice's retry replays alice's response");
    assert_eq!(bob_other.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bob_other.1["type"], "https://tally.dev/problems/idempotency-key-reused");
    assert_eq!(stack.db.event_count(id).await, 3, "opened + one deposit per caller");
    let actors: Vec<String> = stack.db.read_whole_stream(id).await[1..]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e.metadata).unwrap()["actor"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(actors, [TEST_SUBJECT, "bob"]);
}

#[tokio::test]
async fn keys_stored_before_keys_had_callers_keep_answering_after_the_migration() {
    use tally_event_store::idempotency::{self, Claim, IdempotencyKey, StoredResponse};

    let db = tally_tests::TestDb::unmigrated().await;
    let pool = db.store().pool().clone();
    let mut before = tally_event_store::migrator();
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < 5)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&pool).await.unwrap();
    // As the command API stored them before: a key whose deposit wrote an event (its metadata
    // names the actor and the key), and a refusal, which writes no event.
    sqlx::query(
        "INSERT INTO events (stream_type, stream_id, version, event_id, event_type, schema_version, payload, \
         metadata, recorded_at, prev_hash, hash) VALUES ('account', $1, 1, $2, 'AccountOpened', 2, '{}', \
         $3::json, now(), NULL, $4)",
    )
    .bind(Uuid::now_v7())
    .bind(Uuid::now_v7())
    .bind(json!({"actor": "alice", "idempotency_key": "paid", "correlation_id": Uuid::nil(), "causation_id": Uuid::nil()}).to_string())
    .bind(vec![0u8; 32])
    .execute(&pool)
    .await
    .unwrap();
    for (key, status) in [("paid", 201i16), ("refused", 422)] {
        sqlx::query(
            "INSERT INTO idempotency_keys (key, request_hash, response_status, response_body) \
             VALUES ($1, $2, $3, $4::json)",
        )
        .bind(key)
        .bind(vec![1u8; 32])
        .bind(status)
        .bind(json!({"stored": key}).to_string())
        .execute(&pool)
        .await
        .unwrap();
    }

    tally_event_store::migrate(&pool).await.unwrap();

    let callers: Vec<(String, String)> = sqlx::query_as("SELECT key, caller FROM idempotency_keys ORDER BY key")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        callers,
        [("paid".into(), "alice".into()), ("refused".into(), String::new())],
        "a key takes the actor of the events it wrote; one that wrote none keeps no caller"
    );
    let hash = [1u8; 32];
    let key = |caller: &str, k: &str| IdempotencyKey::parse(caller, k).unwrap();
    let stored = |k: &str| {
        Claim::Replay(StoredResponse {
            status: if k == "paid" { 201 } else { 422 },
            body: json!({"stored": k}),
        })
    };
    let (alice_paid, bob_paid, carol_refused) = (key("alice", "paid"), key("bob", "paid"), key("carol", "refused"));
    let mut tx = pool.begin().await.unwrap();
    let claims = idempotency::claim_many(
        &mut tx,
        &[(&alice_paid, &hash), (&bob_paid, &hash), (&carol_refused, &hash)],
    )
    .await
    .unwrap();
    assert_eq!(
        claims,
        [stored("paid"), Claim::Claimed, stored("refused")],
        "alice's retry replays, bob's key is his own, a key stored without a caller answers anyone"
    );
    let other_request = [2u8; 32];
    let dave_refused = key("dave", "refused");
    let mismatch = idempotency::claim_many(&mut tx, &[(&dave_refused, &other_request)])
        .await
        .unwrap();
    assert_eq!(mismatch, [Claim::Mismatch]);
    let response = StoredResponse {
        status: 201,
        body: json!({}),
    };
    let taken = idempotency::store_many(&mut tx, &[(&dave_refused, &other_request, &response)])
        .await
        .unwrap();
    assert_eq!(
        taken,
        [dave_refused],
        "a key without a caller is taken for every caller"
    );
}

#[tokio::test]
async fn concurrent_requests_with_one_key_produce_exactly_one_effect() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let url = format!("/v1/accounts/{id}/deposits");
    let key = Uuid::now_v7().to_string();

    let requests = (0..16).map(|_| api.post(&url, Some(&key), &json!({"amount": 250})));
    let responses = futures::future::join_all(requests).await;

    assert!(
        responses.iter().all(|(s, _, _)| *s == StatusCode::CREATED),
        "{responses:?}"
    );
    assert_eq!(
        responses.iter().filter(|(_, _, replayed)| !replayed).count(),
        1,
        "exactly one request ran"
    );
    assert!(
        responses.iter().all(|(_, body, _)| *body == responses[0].1),
        "all got the same response"
    );
    assert_eq!(stack.db.event_count(id).await, 2);
    assert_eq!(responses[0].1["balance"], 250);
}

#[tokio::test]
async fn a_refused_command_is_refused_again_on_retry_even_after_the_state_changed() {
    // A client that saw "insufficient funds" may have moved on (paid another way, under a new
    // key); a late retry of the old request must not move the money after all.
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let withdrawals = format!("/v1/accounts/{id}/withdrawals");
    let key = Uuid::now_v7().to_string();

    let refused = api.post(&withdrawals, Some(&key), &json!({"amount": 500})).await;
    api.post(
        &format!("/v1/accounts/{id}/deposits"),
        Some("funding"),
        &json!({"amount": 1000}),
    )
    .await;
    let retried = api.post(&withdrawals, Some(&key), &json!({"amount": 500})).await;

    assert_eq!(refused.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.1["type"], "https://tally.dev/problems/insufficient-funds");
    assert_eq!(retried.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", retried.1);
    assert!(retried.2, "the stored refusal is replayed");
    assert_eq!(retried.1, refused.1, "exactly the first answer");
    assert_eq!(stack.db.event_count(id).await, 2, "opened + the deposit; no withdrawal");
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_a_400_problem() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let url = format!("/v1/accounts/{id}/deposits");

    for key in ["has space", &"k".repeat(256)] {
        let (status, body, _) = api.post(&url, Some(key), &json!({"amount": 1})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key:?}");
        assert_eq!(body["type"], "https://tally.dev/problems/invalid-idempotency-key");
    }
    assert_eq!(stack.db.event_count(id).await, 1);
}

#[tokio::test]
async fn a_deposit_or_withdrawal_without_a_key_is_a_400_problem_and_changes_nothing() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    api.post_keyed(&format!("/v1/accounts/{id}/deposits"), &json!({"amount": 1000}))
        .await;

    let client = tally_tests::client();
    for route in ["deposits", "withdrawals"] {
        let response = client
            .post(format!("{}/v1/accounts/{id}/{route}", stack.command))
            .json(&json!({"amount": 100}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{route}");
        assert_eq!(
            response.headers().get("content-type").unwrap(),
            "application/problem+json",
            "{route}"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(
            problem["type"], "https://tally.dev/problems/idempotency-key-required",
            "{route}: {problem}"
        );
        assert_eq!(problem["status"], 400);
        assert!(
            problem["detail"].as_str().unwrap().contains("Idempotency-Key"),
            "the detail says how to send one: {problem}"
        );
    }
    assert_eq!(stack.db.event_count(id).await, 2, "opened + the keyed deposit only");
}

#[tokio::test]
async fn keys_stored_unclaimed_report_the_ones_taken_including_by_a_transaction_in_flight() {
    use tally_event_store::idempotency::{self, IdempotencyKey, StoredResponse};

    let db = tally_tests::TestDb::new().await;
    let pool = db.store().pool().clone();
    let key = |k: &str| IdempotencyKey::parse("tally-tests", k).unwrap();
    let (old, new, raced) = (key("old"), key("new"), key("raced"));
    let hash = [7u8; 32];
    let response = StoredResponse {
        status: 201,
        body: json!({"balance": 1}),
    };

    let mut tx = pool.begin().await.unwrap();
    let taken = idempotency::store_many(&mut tx, &[(&old, &hash, &response)])
        .await
        .unwrap();
    assert!(taken.is_empty());
    tx.commit().await.unwrap();

    // One transaction holds `raced`, uncommitted, while another stores `old`, `new` and `raced`:
    // the second waits for the first, then reports both keys it did not get.
    let mut holder = pool.begin().await.unwrap();
    idempotency::store_many(&mut holder, &[(&raced, &hash, &response)])
        .await
        .unwrap();
    let second = tokio::spawn({
        let pool = pool.clone();
        let (old, new, raced, response) = (old.clone(), new.clone(), raced.clone(), response.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let mut taken = idempotency::store_many(
                &mut tx,
                &[
                    (&new, &hash, &response),
                    (&raced, &hash, &response),
                    (&old, &hash, &response),
                ],
            )
            .await
            .unwrap();
            taken.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            taken.iter().map(|k| k.as_str().to_owned()).collect::<Vec<_>>()
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "the second store waits for the key's holder");
    holder.commit().await.unwrap();
    assert_eq!(second.await.unwrap(), ["old", "raced"]);
}

#[tokio::test]
async fn one_autocommitted_statement_writes_events_and_keys_together_or_neither() {
    use tally_event_store::autocommit::{self, AutocommitError};
    use tally_event_store::idempotency::{self, IdempotencyKey, StoredResponse};
    use tally_event_store::{NewEvent, StoreError, StreamAppend};

    let db = tally_tests::TestDb::new().await;
    let store = db.store();
    let pool = store.pool().clone();
    let key = |k: &str| IdempotencyKey::parse("tally-tests", k).unwrap();
    let hash = [7u8; 32];
    let response = StoredResponse {
        status: 201,
        body: json!({"position": 0}),
    };
    let event = || NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "FundsDeposited".into(),
        schema_version: 1,
        payload: r#"{"amount":1,"currency":"EUR","reference":"r"}"#.into(),
        metadata: "{}".into(),
    };
    let append = |stream_id, expected_version, known_prev_hash| StreamAppend {
        stream_type: "account".into(),
        stream_id,
        expected_version,
        known_prev_hash,
        events: vec![event()],
    };
    let keys_stored = |k: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM idempotency_keys WHERE key = $1")
                .bind(k)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (id, other) = (Uuid::now_v7(), Uuid::now_v7());
    let mut connection = pool.acquire().await.unwrap();

    // Both take effect: the events (positions returned) and the record.
    let landed = autocommit::append_with_keys(
        &mut connection,
        vec![append(id, 0, None)],
        &[(&key("a"), &hash, &response)],
    )
    .await
    .unwrap();
    assert_eq!((landed.len(), landed[0].version), (1, 1));
    assert!(landed[0].position > 0);
    assert_eq!(keys_stored("a").await, 1);
    let positions = autocommit::positions_at(&mut connection, &[(id, 1), (id, 2)])
        .await
        .unwrap();
    assert_eq!(positions.len(), 1, "only the event the log holds");
    assert_eq!(positions[&(id, 1)], landed[0].position);

    // A key taken already: the statement raises and its events are not kept.
    let mut tx = pool.begin().await.unwrap();
    idempotency::store_many(&mut tx, &[(&key("taken"), &hash, &response)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let result = autocommit::append_with_keys(
        &mut connection,
        vec![append(other, 0, None)],
        &[(&key("b"), &hash, &response), (&key("taken"), &hash, &response)],
    )
    .await;
    assert!(matches!(result, Err(AutocommitError::KeysTaken(1))), "{result:?}");
    assert_eq!(db.event_count(other).await, 0, "no event of a statement that raised");
    assert_eq!(keys_stored("b").await, 0, "nor its free key");

    // A predecessor hash the log does not hold: a conflict naming the stream, and no key kept.
    let result = autocommit::append_with_keys(
        &mut connection,
        vec![append(id, 1, Some([0u8; 32])), append(other, 0, None)],
        &[(&key("c"), &hash, &response)],
    )
    .await;
    assert!(
        matches!(result, Err(AutocommitError::RolledBack(StoreError::Conflict { stream_id, .. })) if stream_id == id),
        "{result:?}"
    );
    assert_eq!((db.event_count(id).await, db.event_count(other).await), (1, 0));
    assert_eq!(keys_stored("c").await, 0);

    // Nothing at all (keyless refusals): nothing sent, nothing refused.
    assert!(
        autocommit::append_with_keys(&mut connection, vec![], &[])
            .await
            .unwrap()
            .is_empty()
    );

    // Only records, no events (a batch of refusals): stored.
    autocommit::append_with_keys(&mut connection, vec![], &[(&key("d"), &hash, &response)])
        .await
        .unwrap();
    assert_eq!(keys_stored("d").await, 1);
}
