//! `tally audit verify` against a real Postgres: the real binary, its output and exit codes,
//! on intact logs and on logs a superuser tampered with behind the append-only trigger.

use std::process::Command;

use tally_event_store::verify::VERIFY_PAGE_EVENTS;
use tally_event_store::{APPEND_EVENTS_MAX, NewEvent, StoredEvent, StreamAppend};
use tally_tests::TestDb;
use uuid::Uuid;

/// What every seeded deposit carries; the tampering tests rewrite it to [`TAMPERED_PAYLOAD`].
const PAYLOAD: &str = r#"{"amount":1000,"currency":"EUR","reference":"r"}"#;
const TAMPERED_PAYLOAD: &str = r#"{"amount":9000,"currency":"EUR","reference":"r"}"#;

fn deposit() -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "FundsDeposited".into(),
        schema_version: 1,
        payload: PAYLOAD.into(),
        metadata: format!(
            r#"{{"correlation_id":"{}","causation_id":"{}"}}"#,
            Uuid::now_v7(),
            Uuid::now_v7()
        ),
    }
}

/// Appends `events` deposits to a new stream, in appends of at most `APPEND_EVENTS_MAX` (and
/// of two events at least twice, so chains span transactions).
pub(crate) async fn seed_stream(db: &TestDb, events: usize) -> Uuid {
    let stream_id = Uuid::now_v7();
    let chunk = APPEND_EVENTS_MAX.min(events.div_ceil(2)).max(1);
    let mut version = 0;
    while (version as usize) < events {
        let n = chunk.min(events - version as usize);
        db.store()
            .append(vec![StreamAppend {
                stream_type: "account".into(),
                stream_id,
                expected_version: version,
                known_prev_hash: None,
                events: (0..n).map(|_| deposit()).collect(),
            }])
            .await
            .unwrap();
        version += n as i64;
    }
    stream_id
}

async fn seed_streams(db: &TestDb, streams: usize, events_each: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for _ in 0..streams {
        ids.push(seed_stream(db, events_each).await);
    }
    ids
}

pub(crate) async fn stored(db: &TestDb, stream_id: Uuid, version: i64) -> StoredEvent {
    let events = db.store().read_stream(stream_id, version - 1, 1).await.unwrap();
    events.into_iter().next().expect("the event exists")
}

/// Runs `sql` (binding `stream_id` and `version`) the way a superuser could: with the
/// append-only trigger switched off for this one transaction.
pub(crate) async fn tamper_as_superuser(db: &TestDb, sql: &str, stream_id: Uuid, version: i64) {
    let mut tx = db.pool.begin().await.unwrap();
    // Ordinary triggers do not fire in replica mode; SET LOCAL ends with the transaction, so
    // the pooled connection goes back with the trigger armed.
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    let changed = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(stream_id)
        .bind(version)
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(changed.rows_affected(), 1, "the tampering hit exactly one event");
    tx.commit().await.unwrap();
}

async fn edit_payload(db: &TestDb, stream_id: Uuid, version: i64) {
    tamper_as_superuser(
        db,
        &format!("UPDATE events SET payload = '{TAMPERED_PAYLOAD}'::json WHERE stream_id = $1 AND version = $2"),
        stream_id,
        version,
    )
    .await;
}

/// What a run of the binary printed and how it exited.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs the real `tally audit verify` against `database_url`.
pub(crate) async fn tally_audit_verify(database_url: &str, extra_args: &[&str]) -> Run {
    let args: Vec<&str> = ["audit", "verify"].iter().chain(extra_args).copied().collect();
    tally(database_url, &args).await
}

/// Runs the real `tally` with `args` against `database_url`.
pub(crate) async fn tally(database_url: &str, args: &[&str]) -> Run {
    let bin = tally_tests::bin_dir().join("tally");
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins, or use cargo xtask test)",
        bin.display()
    );
    let mut command = Command::new(bin);
    command.args(args).env("TALLY_DATABASE_URL", database_url);
    // Blocking wait for the child, off the test's runtime thread.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("running tally");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test]
async fn audit_verify_passes_on_an_untouched_log() {
    let db = TestDb::new().await;
    seed_streams(&db, 3, 4).await;

    let run = tally_audit_verify(&db.url, &[]).await;

    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout.trim(),
        "OK: 12 events in 3 streams verified, chains intact",
        "{run:?}"
    );
    assert!(run.stderr.contains("verified 12/12 events"), "{run:?}");
}

#[tokio::test]
async fn audit_verify_follows_a_chain_across_page_boundaries() {
    let db = TestDb::new().await;
    let long = VERIFY_PAGE_EVENTS as usize + 1_500;
    seed_streams(&db, 2, 3).await;
    seed_stream(&db, long).await;

    let run = tally_audit_verify(&db.url, &[]).await;

    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout.trim(),
        format!("OK: {} events in 3 streams verified, chains intact", long + 6),
        "{run:?}"
    );
}

#[tokio::test]
async fn audit_verify_names_the_first_event_a_superuser_edited() {
    let db = TestDb::new().await;
    let streams = seed_streams(&db, 3, 3).await;
    let victim = streams[1];
    edit_payload(&db, victim, 2).await;
    let edited = stored(&db, victim, 2).await;

    let run = tally_audit_verify(&db.url, &[]).await;

    assert_eq!(run.code, Some(1), "{run:?}");
    let expected = format!(
        "BROKEN: stream {victim} version 2 (position {}, event {}): hash mismatch",
        edited.position, edited.event_id
    );
    assert!(run.stdout.starts_with(&expected), "expected {expected:?} in {run:?}");
}

#[tokio::test]
async fn audit_verify_detects_a_deleted_event() {
    let db = TestDb::new().await;
    let streams = seed_streams(&db, 2, 3).await;
    let victim = streams[0];
    let after_the_hole = stored(&db, victim, 3).await;
    tamper_as_superuser(
        &db,
        "DELETE FROM events WHERE stream_id = $1 AND version = $2",
        victim,
        2,
    )
    .await;

    let run = tally_audit_verify(&db.url, &[]).await;

    assert_eq!(run.code, Some(1), "{run:?}");
    let expected = format!(
        "BROKEN: stream {victim} version 3 (position {}, event {}): version gap (expected version 2, found 3)",
        after_the_hole.position, after_the_hole.event_id
    );
    assert_eq!(run.stdout.trim(), expected, "{run:?}");
}

#[tokio::test]
async fn audit_verify_with_stream_checks_only_that_stream() {
    let db = TestDb::new().await;
    let streams = seed_streams(&db, 2, 3).await;
    let (tampered, clean) = (streams[0], streams[1]);
    edit_payload(&db, tampered, 2).await;

    let clean_run = tally_audit_verify(&db.url, &["--stream", &clean.to_string()]).await;
    let tampered_run = tally_audit_verify(&db.url, &["--stream", &tampered.to_string()]).await;

    assert_eq!(clean_run.code, Some(0), "{clean_run:?}");
    assert_eq!(
        clean_run.stdout.trim(),
        "OK: 3 events in 1 stream verified, chains intact",
        "{clean_run:?}"
    );
    assert_eq!(tampered_run.code, Some(1), "{tampered_run:?}");
    assert!(
        tampered_run
            .stdout
            .starts_with(&format!("BROKEN: stream {tampered} version 2 ")),
        "{tampered_run:?}"
    );
}

#[tokio::test]
async fn audit_verify_exits_2_when_it_cannot_read_the_log() {
    let db = TestDb::new().await;
    let base = db.url.rsplit_once('/').map_or(db.url.as_str(), |(b, _)| b);
    let missing_database = format!("{base}/t_missing_{}", Uuid::now_v7().simple());

    let run = tally_audit_verify(&missing_database, &[]).await;

    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(run.stderr.contains("error: cannot verify the event log"), "{run:?}");
}
