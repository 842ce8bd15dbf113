//! Least privilege in Postgres: each service's role (`tally_event_store::roles`) connects to a
//! real database and tries what the table owner could do to the log. Every attempt is refused.
//! (That the services work as these roles is shown by the rest of the suite: the kit's stack
//! runs every service as its own role; `sealer.rs` runs the sealer as `tally_sealer`.)

use sqlx::{Connection, PgConnection};
use tally_event_store::roles;
use tally_tests::{Api, Stack};

/// What the owner of `events` could do to rewrite or hide history, and must not be possible
/// for a service.
const TAMPERING: [&str; 10] = [
    "UPDATE events SET payload = payload",
    "DELETE FROM events",
    "TRUNCATE events",
    "ALTER TABLE events DISABLE TRIGGER events_no_update_or_delete",
    "ALTER TABLE events DISABLE TRIGGER ALL",
    "DROP TRIGGER events_no_update_or_delete ON events",
    "CREATE OR REPLACE FUNCTION events_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    "SET session_replication_role = replica",
    "ALTER TABLE events OWNER TO CURRENT_USER",
    "DROP TABLE events",
];

#[tokio::test]
async fn no_service_role_can_alter_disable_or_bypass_the_append_only_log() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let account = api.funded("EUR", 100).await;
    let events_before = stack.db.event_count(account).await;

    for (role, _) in roles::ALL {
        let mut conn = PgConnection::connect(&stack.db.url_as(role)).await.unwrap();
        let user: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(user, role);
        for statement in TAMPERING {
            let error = sqlx::query(statement)
                .execute(&mut conn)
                .await
                .expect_err(&format!("{role} may not: {statement}"));
            let code = error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
            assert_eq!(
                code.as_deref(),
                Some("42501"),
                "{role}: {statement}: refused for lack of privilege, not by accident: {error}"
            );
        }
        let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_ne!(timeout, "0", "{role} has a statement_timeout");
    }
    assert_eq!(
        stack.db.event_count(account).await,
        events_before,
        "the log is untouched"
    );
}

#[tokio::test]
async fn only_the_command_role_may_append_and_only_the_relay_may_move_its_checkpoint() {
    let stack = Stack::start().await;
    let insert = "INSERT INTO events (stream_type, stream_id, version, event_id, event_type, schema_version, \
                  payload, metadata, recorded_at, hash) VALUES ('account', gen_random_uuid(), 1, gen_random_uuid(), \
                  'AccountOpened', 2, '{}', '{}', now(), decode(repeat('00', 32), 'hex'))";
    let checkpoint = "UPDATE relay_checkpoints SET tx_id = tx_id";
    for (role, _) in roles::ALL {
        let mut conn = PgConnection::connect(&stack.db.url_as(role)).await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        let appended = sqlx::query(insert).execute(&mut *tx).await;
        assert_eq!(
            appended.is_ok(),
            role == roles::COMMAND,
            "{role} appending: {appended:?}"
        );
        tx.rollback().await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        let moved = sqlx::query(checkpoint).execute(&mut *tx).await;
        assert_eq!(
            moved.is_ok(),
            role == roles::RELAY,
            "{role} moving the relay's checkpoint: {moved:?}"
        );
        tx.rollback().await.unwrap();
    }
}

#[tokio::test]
async fn the_sealer_role_reads_only_the_leaves_of_the_log_and_may_only_add_checkpoints() {
    let stack = Stack::start().await;
    Api::new(&stack.command).funded("EUR", 100).await;
    let mut conn = PgConnection::connect(&stack.db.url_as(roles::SEALER)).await.unwrap();
    let refused = |result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>, what: &str| {
        let error = result.expect_err(what);
        let code = error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{what}: {error}");
    };

    // What a seal reads: the leaves, gap-safely.
    let leaves: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT tx_id::text::bigint, position, hash FROM events \
         WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY tx_id, position) leaves",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(leaves >= 0);
    // Not what the events say.
    for column in ["payload", "metadata", "stream_id", "*"] {
        refused(
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {column} FROM events LIMIT 1")))
                .execute(&mut conn)
                .await,
            &format!("the sealer may not read events.{column}"),
        );
    }
    // Publishing a checkpoint, as `seal::publish` does; changing or reading them, no.
    sqlx::query(
        "INSERT INTO audit_checkpoints (tree_size, checkpoint) VALUES (0, '{}'::json) \
         ON CONFLICT (tree_size) DO NOTHING",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    for statement in [
        "UPDATE audit_checkpoints SET checkpoint = '{}'::json",
        "DELETE FROM audit_checkpoints",
        "SELECT checkpoint FROM audit_checkpoints",
        "SELECT account_id FROM account_balances",
        "UPDATE relay_checkpoints SET tx_id = tx_id",
        "SELECT key FROM idempotency_keys",
    ] {
        refused(sqlx::query(statement).execute(&mut conn).await, statement);
    }
}
