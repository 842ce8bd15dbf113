//! The event store against a real Postgres.

use std::time::Duration;

use tally_event_store::{Checkpoint, NewEvent, StoreError, StreamAppend, append_in};
use tally_tests::{TestDb, eventually};
use uuid::Uuid;

fn event(n: u32) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "FundsDeposited".into(),
        schema_version: 1,
        payload: format!(r#"{{"amount":{n},"currency":"EUR","reference":"r"}}"#),
        metadata: format!(
            r#"{{"correlation_id":"{}","causation_id":"{}"}}"#,
            Uuid::now_v7(),
            Uuid::now_v7()
        ),
    }
}

fn append(stream_id: Uuid, expected_version: i64, events: Vec<NewEvent>) -> StreamAppend {
    StreamAppend {
        stream_type: "account".into(),
        stream_id,
        expected_version,
        events,
    }
}

#[tokio::test]
async fn appending_to_a_new_stream_numbers_versions_from_one_and_chains_the_hashes() {
    let db = TestDb::new().await;
    let store = db.store();
    let id = Uuid::now_v7();

    store
        .append(vec![append(id, 0, vec![event(1), event(2)])])
        .await
        .unwrap();
    let appended = store.append(vec![append(id, 2, vec![event(3)])]).await.unwrap();

    assert_eq!(appended[0].version, 3);
    let events = store.read_stream(id, 0, 100).await.unwrap();
    assert_eq!(events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(events[0].prev_hash, None);
    for pair in events.windows(2) {
        assert_eq!(pair[1].prev_hash.as_deref(), Some(pair[0].hash.as_slice()));
    }
    for e in &events {
        assert_eq!(
            e.computed_hash().as_slice(),
            e.hash.as_slice(),
            "stored bytes must hash to the stored hash"
        );
    }
}

#[tokio::test]
async fn appending_at_a_stale_version_is_a_conflict_and_writes_nothing() {
    let db = TestDb::new().await;
    let store = db.store();
    let id = Uuid::now_v7();
    store.append(vec![append(id, 0, vec![event(1)])]).await.unwrap();
    store.append(vec![append(id, 1, vec![event(2)])]).await.unwrap();

    let stale = store.append(vec![append(id, 1, vec![event(3)])]).await;
    let from_the_future = store.append(vec![append(id, 5, vec![event(3)])]).await;
    let new_again = store.append(vec![append(id, 0, vec![event(3)])]).await;

    assert!(matches!(stale, Err(StoreError::Conflict { .. })), "{stale:?}");
    assert!(
        matches!(from_the_future, Err(StoreError::Conflict { .. })),
        "{from_the_future:?}"
    );
    assert!(matches!(new_again, Err(StoreError::Conflict { .. })), "{new_again:?}");
    assert_eq!(store.read_stream(id, 0, 100).await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_append_to_two_streams_is_all_or_nothing() {
    let db = TestDb::new().await;
    let store = db.store();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    store.append(vec![append(b, 0, vec![event(1)])]).await.unwrap();

    // `b` is at version 1, not 0: the whole append must fail, including `a`'s part.
    let result = store
        .append(vec![append(a, 0, vec![event(1)]), append(b, 0, vec![event(2)])])
        .await;

    assert!(matches!(result, Err(StoreError::Conflict { .. })), "{result:?}");
    assert!(store.read_stream(a, 0, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_database_refuses_to_update_delete_or_truncate_events() {
    let db = TestDb::new().await;
    let id = Uuid::now_v7();
    db.store().append(vec![append(id, 0, vec![event(1)])]).await.unwrap();

    for sql in [
        "UPDATE events SET payload = '{}'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let err = sqlx::query(sql).execute(&db.pool).await.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(db.store().read_stream(id, 0, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn reading_in_commit_order_never_skips_an_event_whose_transaction_commits_late() {
    let db = TestDb::new().await;
    let store = db.store();
    let (slow, fast) = (Uuid::now_v7(), Uuid::now_v7());

    // Transaction A takes the lower position and stays open…
    let mut a = db.pool.begin().await.unwrap();
    append_in(&mut a, vec![append(slow, 0, vec![event(1)])]).await.unwrap();
    // …while B takes a higher position and commits first.
    store.append(vec![append(fast, 0, vec![event(2)])]).await.unwrap();

    // A reader following "position > last" would now see B and later skip A for good.
    let while_a_is_open = store.read_all(Checkpoint::default(), 100).await.unwrap();
    assert!(
        while_a_is_open.iter().all(|e| e.stream_id != fast),
        "B must not be readable while an older transaction can still commit"
    );

    a.commit().await.unwrap();
    let after = eventually(Duration::from_secs(10), "both events to become readable", || async {
        let events = store.read_all(Checkpoint::default(), 100).await.unwrap();
        (events.len() == 2).then_some(events)
    })
    .await;
    assert_eq!(
        after[0].stream_id, slow,
        "A committed first in xid order and is read first"
    );
    assert_eq!(after[1].stream_id, fast);
    assert!(after[0].position < after[1].position);
    let resumed = store.read_all(after[1].checkpoint(), 100).await.unwrap();
    assert!(
        resumed.is_empty(),
        "resuming after the last checkpoint returns nothing twice"
    );
}
