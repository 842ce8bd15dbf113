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
        known_prev_hash: None,
        events,
    }
}

#[tokio::test]
async fn an_append_chained_on_a_given_hash_is_kept_only_if_the_log_holds_that_hash() {
    let db = TestDb::new().await;
    let store = db.store();
    let (id, other) = (Uuid::now_v7(), Uuid::now_v7());
    store
        .append(vec![
            append(id, 0, vec![event(1), event(2)]),
            append(other, 0, vec![event(9)]),
        ])
        .await
        .unwrap();
    let head: [u8; 32] = store.read_stream(id, 1, 1).await.unwrap()[0]
        .hash
        .as_slice()
        .try_into()
        .unwrap();
    let chained = |expected, hash| StreamAppend {
        known_prev_hash: Some(hash),
        ..append(id, expected, vec![event(3), event(4)])
    };

    // A state ahead of the log (version 3 is not there) and a wrong hash: conflicts, and with
    // the other stream's append in the same call, nothing of either is kept.
    for (expected, hash) in [(3, head), (2, [0u8; 32])] {
        let result = store
            .append(vec![chained(expected, hash), append(other, 1, vec![event(10)])])
            .await;
        assert!(
            matches!(result, Err(StoreError::Conflict { stream_id, .. }) if stream_id == id),
            "{result:?}"
        );
    }
    assert_eq!(store.read_stream(id, 0, 100).await.unwrap().len(), 2);
    assert_eq!(store.read_stream(other, 0, 100).await.unwrap().len(), 1);

    // The right hash at the head: appended, the chain unbroken.
    let appended = store.append(vec![chained(2, head)]).await.unwrap();
    assert_eq!(appended[0].version, 4);
    let events = store.read_stream(id, 0, 100).await.unwrap();
    for pair in events.windows(2) {
        assert_eq!(pair[1].prev_hash.as_deref(), Some(pair[0].hash.as_slice()));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_writers_with_random_commit_delays_and_one_tailer_see_every_event_exactly_once() {
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use tally_event_store::{EventStore, StoredEvent};

    const WRITERS: usize = 32;
    const COMMITS_EACH: usize = 60;
    /// Shared by all writers, so appends race for the same streams and some lose (Conflict).
    const STREAMS: usize = 48;
    /// Attempts per commit before a writer gives up (it never should).
    const ATTEMPTS_MAX: usize = 500;
    const PAGE: i64 = 500;

    let db = TestDb::new().await;
    // One connection per writer, one for the tailer, and some slack.
    let pool = tally_event_store::connect(&db.url, 40).unwrap();
    let store = EventStore::new(pool.clone());
    let streams: Arc<Vec<Uuid>> = Arc::new((0..STREAMS).map(|_| Uuid::now_v7()).collect());

    // The tailer follows the log gap-safely the whole time, as the relay does.
    let stop_tailing = Arc::new(AtomicBool::new(false));
    let tailed_count = Arc::new(AtomicUsize::new(0));
    let tailer = {
        let (store, stop, count) = (store.clone(), stop_tailing.clone(), tailed_count.clone());
        tokio::spawn(async move {
            let mut checkpoint = Checkpoint::default();
            let mut tailed: Vec<StoredEvent> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let page = store.read_all(checkpoint, PAGE).await.expect("tailing the log");
                match page.last() {
                    Some(last) => {
                        checkpoint = last.checkpoint();
                        tailed.extend(page);
                        count.store(tailed.len(), Ordering::Relaxed);
                    }
                    None => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            }
            tailed
        })
    };

    let started = std::time::Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (pool, streams) = (pool.clone(), streams.clone());
            tokio::spawn(async move {
                let mut committed: Vec<Uuid> = Vec::new();
                let mut conflicts = 0usize;
                for _ in 0..COMMITS_EACH {
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        assert!(attempt <= ATTEMPTS_MAX, "a writer lost {ATTEMPTS_MAX} races in a row");
                        // One or two distinct shared streams, one or two events each.
                        let first = rand::random_range(0..STREAMS);
                        let mut picked = vec![streams[first]];
                        if rand::random_bool(0.3) {
                            picked.push(streams[(first + rand::random_range(1..STREAMS)) % STREAMS]);
                        }
                        let mut tx = pool.begin().await.expect("begin");
                        let mut appends = Vec::new();
                        for id in picked {
                            let version: i64 =
                                sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = $1")
                                    .bind(id)
                                    .fetch_one(&mut *tx)
                                    .await
                                    .expect("current version");
                            let events = (0..rand::random_range(1..=2)).map(event).collect();
                            appends.push(append(id, version, events));
                        }
                        let ids: Vec<Uuid> = appends
                            .iter()
                            .flat_map(|a| a.events.iter().map(|e| e.event_id))
                            .collect();
                        match append_in(&mut tx, appends).await {
                            Ok(_) => {
                                // Hold the transaction (and its xid) open for a while: commits
                                // land out of position order.
                                let delay = rand::random_range(0..=20);
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                                tx.commit().await.expect("commit");
                                committed.extend(ids);
                                break;
                            }
                            Err(StoreError::Conflict { .. }) => {
                                conflicts += 1;
                                drop(tx);
                            }
                            Err(other) => panic!("append failed: {other}"),
                        }
                    }
                }
                (committed, conflicts)
            })
        })
        .collect();
    let mut committed_by_writers: Vec<Uuid> = Vec::new();
    let mut conflicts = 0;
    for writer in writers {
        let (ids, lost) = writer.await.expect("a writer failed");
        committed_by_writers.extend(ids);
        conflicts += lost;
    }
    let writing = started.elapsed();

    let in_log: Vec<(Uuid, Uuid, i64)> = sqlx::query_as("SELECT event_id, stream_id, version FROM events")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let expected = in_log.len();
    // A timeout here means the tailer skipped events for good: it never reaches the count.
    eventually(
        Duration::from_secs(30),
        "the tailer to read every committed event",
        || {
            let count = tailed_count.clone();
            async move { (count.load(Ordering::Relaxed) >= expected).then_some(()) }
        },
    )
    .await;
    stop_tailing.store(true, Ordering::Relaxed);
    let tailed = tailer.await.expect("the tailer failed");
    println!(
        "{} commits, {conflicts} lost races, {expected} events written in {writing:?}; tailed {} events",
        WRITERS * COMMITS_EACH,
        tailed.len()
    );

    // Exactly once: no duplicates, and the tailed set is the committed set.
    let mut seen = HashSet::new();
    let duplicates: Vec<Uuid> = tailed
        .iter()
        .map(|e| e.event_id)
        .filter(|id| !seen.insert(*id))
        .collect();
    assert!(duplicates.is_empty(), "tailed twice: {duplicates:?}");
    let log_set: HashSet<Uuid> = in_log.iter().map(|(id, _, _)| *id).collect();
    let writers_set: HashSet<Uuid> = committed_by_writers.iter().copied().collect();
    assert_eq!(writers_set.len(), committed_by_writers.len());
    assert_eq!(log_set, writers_set, "the log holds exactly what the writers committed");
    let missing = log_set.difference(&seen).count();
    let extra = seen.difference(&log_set).count();
    assert!(
        missing == 0 && extra == 0,
        "the tailer skipped {missing} committed events and saw {extra} unknown ones"
    );

    // Commit order: checkpoints strictly increase, and each stream's versions come 1, 2, 3...
    for pair in tailed.windows(2) {
        assert!(pair[0].checkpoint() < pair[1].checkpoint(), "the tail went backwards");
    }
    let mut versions: HashMap<Uuid, i64> = HashMap::new();
    for e in &tailed {
        let previous = versions.insert(e.stream_id, e.version).unwrap_or(0);
        assert_eq!(
            e.version,
            previous + 1,
            "stream {} delivered version {} after {previous}",
            e.stream_id,
            e.version
        );
    }
    assert_eq!(
        versions.len(),
        in_log.iter().map(|(_, s, _)| *s).collect::<HashSet<_>>().len()
    );
    pool.close().await;
}

#[tokio::test]
async fn an_append_from_a_transaction_older_than_the_streams_last_event_is_a_conflict() {
    let db = TestDb::new().await;
    let store = db.store();
    let id = Uuid::now_v7();
    store.append(vec![append(id, 0, vec![event(1)])]).await.unwrap();

    // A takes its xid first (any write does)…
    let mut a = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *a)
        .await
        .unwrap();
    // …B appends version 2 and commits with a newer xid…
    store.append(vec![append(id, 1, vec![event(2)])]).await.unwrap();
    // …and A, having read version 2, tries to append version 3 on top of it.
    let result = append_in(&mut a, vec![append(id, 2, vec![event(3)])]).await;

    assert!(
        matches!(result, Err(StoreError::Conflict { .. })),
        "the feed orders by xid: A's version 3 would be read before B's version 2; got {result:?}"
    );
}
