//! Signed checkpoints against a real Postgres: the real `tally audit keygen`, `seal` and
//! `verify --checkpoint`, on an untouched log and on logs the table owner rewrote behind the
//! append-only trigger in ways the hash chains alone cannot see; and the query API's inclusion
//! proofs, checked offline against the signed checkpoint.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sqlx::{Postgres, Transaction};
use tally_event_store::checkpoint::{self, SignedCheckpoint};
use tally_event_store::hash::{HashInput, event_hash};
use tally_event_store::merkle::{self, Hash};
use tally_event_store::nats_users;
use tally_service::auth::Role;
use tally_tests::{Proc, TestDb, TestNats, auth_env, client_with, eventually, free_port, token, wait_ready};
use uuid::Uuid;

use crate::audit::{Run, seed_stream, stored, tally, tally_audit_verify};

/// A log of three streams of four events each (two appends per stream), sealed once.
struct Sealed {
    db: TestDb,
    dir: PathBuf,
    history: PathBuf,
    public_key: PathBuf,
    streams: Vec<Uuid>,
}

impl Sealed {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let mut streams = Vec::new();
        for _ in 0..3 {
            streams.push(seed_stream(&db, 4).await);
        }
        let dir = std::env::temp_dir().join(format!("tally-checkpoints-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("seal.key");
        let run = tally(&db.url, &["audit", "keygen", "--out", path(&key)]).await;
        assert_eq!(run.code, Some(0), "{run:?}");
        wait_until_sealable(&db, 12).await;
        let sealed = Self {
            history: dir.join("history.jsonl"),
            public_key: checkpoint::public_key_path(&key),
            db,
            dir,
            streams,
        };
        let run = sealed.seal().await;
        assert!(run.stdout.starts_with("sealed: tree size 12 (+12)"), "{run:?}");
        sealed
    }

    async fn seal(&self) -> Run {
        let key = self.dir.join("seal.key");
        let run = tally(
            &self.db.url,
            &[
                "audit",
                "seal",
                "--key-file",
                path(&key),
                "--history",
                path(&self.history),
            ],
        )
        .await;
        assert_eq!(run.code, Some(0), "{run:?}");
        run
    }

    /// `tally audit verify --checkpoint <history> --public-key <pub>`.
    async fn verify(&self) -> Run {
        tally_audit_verify(
            &self.db.url,
            &[
                "--checkpoint",
                path(&self.history),
                "--public-key",
                path(&self.public_key),
            ],
        )
        .await
    }

    /// The chains alone pass, and the checkpoint catches the tampering with `expected` in its
    /// report.
    async fn assert_only_the_checkpoint_catches_it(&self, expected: &str) {
        let chains = tally_audit_verify(&self.db.url, &[]).await;
        assert_eq!(chains.code, Some(0), "the hash chains alone do not see it: {chains:?}");
        let run = self.verify().await;
        assert_eq!(run.code, Some(1), "{run:?}");
        assert!(run.stdout.contains("\nBROKEN: checkpoint at tree size 12: "), "{run:?}");
        assert!(run.stdout.contains(expected), "expected {expected:?} in {run:?}");
    }
}

impl Drop for Sealed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until the log's first `events` are below the xmin horizon, so a seal covers them all.
/// xids are cluster-wide: a transaction of another test, on another database of the same
/// server, holds the horizon back while it runs (ADR 0001).
async fn wait_until_sealable(db: &TestDb, events: i64) {
    eventually(
        Duration::from_secs(30),
        "the events to fall below the xmin horizon",
        || async {
            let sealable: i64 =
                sqlx::query_scalar("SELECT count(*) FROM events WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())")
                    .fetch_one(&db.pool)
                    .await
                    .ok()?;
            (sealable >= events).then_some(())
        },
    )
    .await;
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

/// A transaction of the table's owner with the append-only trigger off, as a superuser or the
/// owner could (`SET LOCAL` ends with it, so the pooled connection goes back armed).
async fn as_owner(db: &TestDb) -> Transaction<'static, Postgres> {
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Runs `sql` on `stream_id` ($1) as the owner, as [`as_owner`]; the rows it changed.
async fn as_owner_on_stream(db: &TestDb, sql: &str, stream_id: Uuid) -> u64 {
    let mut tx = as_owner(db).await;
    let changed = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(stream_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    changed.rows_affected()
}

#[tokio::test]
async fn a_log_verifies_against_its_checkpoint_history_and_a_new_seal_extends_it() {
    let sealed = Sealed::new().await;
    seed_stream(&sealed.db, 3).await;
    wait_until_sealable(&sealed.db, 15).await;

    let second = sealed.seal().await;
    let unchanged = sealed.seal().await;
    let run = sealed.verify().await;

    assert!(second.stdout.starts_with("sealed: tree size 15 (+3)"), "{second:?}");
    assert!(unchanged.stdout.starts_with("unchanged: tree size 15"), "{unchanged:?}");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout
            .contains("OK: the log matches 2 signed checkpoint(s), up to tree size 15"),
        "{run:?}"
    );
    let published: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_checkpoints")
        .fetch_one(&sealed.db.pool)
        .await
        .unwrap();
    assert_eq!(published, 2);
}

#[tokio::test]
async fn checkpoint_verify_catches_a_rehashed_tail_that_the_chains_alone_pass() {
    let sealed = Sealed::new().await;
    let stream = sealed.streams[1];
    let mut last = stored(&sealed.db, stream, 4).await;
    last.payload = r#"{"amount":9000,"currency":"EUR","reference":"r"}"#.into();
    let rehashed = last.computed_hash();

    let mut tx = as_owner(&sealed.db).await;
    sqlx::query("UPDATE events SET payload = $1::json, hash = $2 WHERE stream_id = $3 AND version = 4")
        .bind(&last.payload)
        .bind(rehashed.as_slice())
        .bind(stream)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    sealed.assert_only_the_checkpoint_catches_it("re-hashed").await;
}

#[tokio::test]
async fn checkpoint_verify_catches_a_truncated_stream() {
    let sealed = Sealed::new().await;

    let cut = as_owner_on_stream(
        &sealed.db,
        "DELETE FROM events WHERE stream_id = $1 AND version > 2",
        sealed.streams[0],
    )
    .await;
    assert_eq!(cut, 2);

    sealed
        .assert_only_the_checkpoint_catches_it(
            "the log holds only 10 events in commit order, the checkpoint sealed 12: events were deleted",
        )
        .await;
}

#[tokio::test]
async fn checkpoint_verify_catches_a_deleted_stream() {
    let sealed = Sealed::new().await;

    let deleted = as_owner_on_stream(&sealed.db, "DELETE FROM events WHERE stream_id = $1", sealed.streams[1]).await;
    assert_eq!(deleted, 4);

    sealed
        .assert_only_the_checkpoint_catches_it("events were deleted")
        .await;
}

#[tokio::test]
async fn checkpoint_verify_catches_an_event_inserted_into_the_past() {
    let sealed = Sealed::new().await;
    // A whole new, correctly chained stream, placed in the first transaction of the log.
    let first = stored(&sealed.db, sealed.streams[0], 1).await;
    let (stream_id, event_id) = (Uuid::now_v7(), Uuid::now_v7());
    let (payload, metadata) = (r#"{"amount":1,"currency":"EUR","reference":"r"}"#, "{}");
    let hash = event_hash(&HashInput {
        prev_hash: None,
        stream_type: "account",
        stream_id,
        version: 1,
        event_id,
        event_type: "FundsDeposited",
        schema_version: 1,
        recorded_at: first.recorded_at,
        payload,
        metadata,
    });

    let mut tx = as_owner(&sealed.db).await;
    sqlx::query(
        "INSERT INTO events (position, tx_id, stream_type, stream_id, version, event_id, event_type, \
                             schema_version, payload, metadata, recorded_at, prev_hash, hash) \
         OVERRIDING SYSTEM VALUE \
         VALUES (0, $1::text::xid8, 'account', $2, 1, $3, 'FundsDeposited', 1, $4::json, $5::json, $6, NULL, $7)",
    )
    .bind(first.tx_id.to_string())
    .bind(stream_id)
    .bind(event_id)
    .bind(payload)
    .bind(metadata)
    .bind(first.recorded_at)
    .bind(hash.as_slice())
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    sealed
        .assert_only_the_checkpoint_catches_it("events were inserted into or deleted")
        .await;
}

#[tokio::test]
async fn checkpoint_verify_catches_a_reordered_feed() {
    let sealed = Sealed::new().await;
    // Versions 1 and 2 of the first stream were appended together: swap their positions.
    let (a, b) = (
        stored(&sealed.db, sealed.streams[0], 1).await.position,
        stored(&sealed.db, sealed.streams[0], 2).await.position,
    );

    let mut tx = as_owner(&sealed.db).await;
    for sql in [
        "ALTER TABLE events ALTER COLUMN position SET GENERATED BY DEFAULT".to_owned(),
        format!("UPDATE events SET position = -1 WHERE position = {a}"),
        format!("UPDATE events SET position = {a} WHERE position = {b}"),
        format!("UPDATE events SET position = {b} WHERE position = -1"),
        "ALTER TABLE events ALTER COLUMN position SET GENERATED ALWAYS".to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();

    sealed.assert_only_the_checkpoint_catches_it("reordered").await;
}

#[tokio::test]
async fn checkpoint_verify_refuses_an_altered_checkpoint_and_a_key_that_did_not_sign_it() {
    let sealed = Sealed::new().await;
    let text = std::fs::read_to_string(&sealed.history).unwrap();
    let mut altered: SignedCheckpoint = serde_json::from_str(text.trim()).unwrap();
    altered.tree_size = 11;
    let altered_path = sealed.dir.join("altered.json");
    std::fs::write(&altered_path, serde_json::to_string(&altered).unwrap()).unwrap();
    let other_key = sealed.dir.join("other.key");
    assert_eq!(
        tally(&sealed.db.url, &["audit", "keygen", "--out", path(&other_key)])
            .await
            .code,
        Some(0)
    );

    let forged = tally_audit_verify(
        &sealed.db.url,
        &[
            "--checkpoint",
            path(&altered_path),
            "--public-key",
            path(&sealed.public_key),
        ],
    )
    .await;
    let wrong_key = tally_audit_verify(
        &sealed.db.url,
        &[
            "--checkpoint",
            path(&sealed.history),
            "--public-key",
            path(&checkpoint::public_key_path(&other_key)),
        ],
    )
    .await;

    assert_eq!(forged.code, Some(1), "{forged:?}");
    assert!(forged.stdout.contains("bad signature"), "{forged:?}");
    assert_eq!(wrong_key.code, Some(2), "{wrong_key:?}");
    assert!(wrong_key.stderr.contains("not by the given key"), "{wrong_key:?}");
}

/// A query API on `db` alone (reading the primary), started and ready.
async fn query_api(db: &TestDb, nats: &TestNats) -> (String, Proc) {
    let port = free_port();
    let mut env = nats.env(nats_users::QUERY);
    env.extend(auth_env());
    env.push(("TALLY_DATABASE_URL", db.url.clone()));
    env.push(("TALLY_REPLICA_URLS", db.url.clone()));
    env.push(("TALLY_QUERY_LISTEN", format!("127.0.0.1:{port}")));
    env.push(tally_tests::ops_listen("TALLY_QUERY_OPS_LISTEN"));
    let proc = Proc::spawn("tally-query-api", &env);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base, &proc).await;
    (base, proc)
}

fn hash_of(value: &Value) -> Hash {
    hex::decode(value.as_str().unwrap()).unwrap().try_into().unwrap()
}

#[tokio::test]
async fn a_served_inclusion_proof_verifies_offline_against_the_signed_checkpoint() {
    let sealed = Sealed::new().await;
    let later = seed_stream(&sealed.db, 2).await;
    let nats = TestNats::new();
    let (query, _proc) = query_api(&sealed.db, &nats).await;
    let auditor = client_with(&token("auditor", &[Role::Auditor])).build().unwrap();
    let public_key = checkpoint::read_verifying_key(&sealed.public_key).unwrap();
    let event = stored(&sealed.db, sealed.streams[1], 3).await;

    let response = auditor
        .get(format!("{query}/v1/audit/events/{}/proof?tree_size=12", event.event_id))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let proof: Value = response.json().await.unwrap();

    // Offline, trusting neither the server nor the database: the signature, then the path
    // from a leaf computed here from the event as read.
    let signed: SignedCheckpoint = serde_json::from_value(proof["signed_checkpoint"].clone()).unwrap();
    let head = checkpoint::verify_signature(&signed, &public_key).unwrap();
    let leaf = merkle::event_leaf_hash(event.tx_id, event.position, &event.hash);
    let path: Vec<Hash> = proof["audit_path"].as_array().unwrap().iter().map(hash_of).collect();
    let index = proof["leaf_index"].as_u64().unwrap();
    assert_eq!(head.tree_size, 12);
    assert_eq!(
        index, 6,
        "the second stream's third event is the seventh in commit order"
    );
    assert_eq!(hash_of(&proof["leaf_hash"]), leaf);
    assert!(merkle::verify_inclusion(
        &leaf,
        index,
        head.tree_size,
        &path,
        &head.root
    ));
    assert!(!merkle::verify_inclusion(
        &leaf,
        index + 1,
        head.tree_size,
        &path,
        &head.root
    ));

    // Bad input is a problem: an unknown event, a checkpoint never sealed, an event after the
    // checkpoint, a size out of range or not a number.
    let later_event = stored(&sealed.db, later, 1).await.event_id;
    let cases = [
        (format!("{}/proof", Uuid::now_v7()), 404, "event-not-found"),
        (
            format!("{}/proof?tree_size=5", event.event_id),
            404,
            "checkpoint-not-found",
        ),
        (format!("{later_event}/proof"), 422, "event-not-in-checkpoint"),
        (
            format!("{}/proof?tree_size=0", event.event_id),
            422,
            "tree-size-out-of-range",
        ),
        (
            format!("{}/proof?tree_size=x", event.event_id),
            400,
            "invalid-parameter",
        ),
        ("not-a-uuid/proof".to_owned(), 404, "event-not-found"),
    ];
    for (path, status, code) in cases {
        let response = auditor
            .get(format!("{query}/v1/audit/events/{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(tally_tests::problem_code(&body), code, "{path}: {body}");
    }
}

#[tokio::test]
async fn an_inclusion_proof_is_refused_when_the_log_no_longer_matches_the_checkpoint() {
    let sealed = Sealed::new().await;
    let nats = TestNats::new();
    let (query, _proc) = query_api(&sealed.db, &nats).await;
    let auditor = client_with(&token("auditor", &[Role::Auditor])).build().unwrap();
    let event = stored(&sealed.db, sealed.streams[0], 1).await;
    let deleted = as_owner_on_stream(
        &sealed.db,
        "DELETE FROM events WHERE stream_id = $1 AND version = 4",
        sealed.streams[2],
    )
    .await;
    assert_eq!(deleted, 1);

    let response = auditor
        .get(format!("{query}/v1/audit/events/{}/proof", event.event_id))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        tally_tests::problem_code(&body),
        "log-does-not-match-checkpoint",
        "{body}"
    );
}
