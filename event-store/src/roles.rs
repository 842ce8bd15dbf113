//! Least privilege in Postgres: one login role per service, each allowed only what its service
//! does, so no service holds the power of the tables' owner.
//!
//! The owner (who runs `tally migrate`) can drop the append-only trigger, rewrite a stream and
//! recompute its hashes; no service role can:
//!
//! | role | may |
//! |---|---|
//! | [`COMMAND`] (command API) | read and append `events`; read and write `idempotency_keys` and `snapshots` (a deletable cache) |
//! | [`RELAY`] | read `events`; read and write `relay_checkpoints` |
//! | [`PROJECTOR`] | read `events`; own the read models (it creates, fills and drops their generations) and write their control tables |
//! | [`QUERY`] (query API) | read `events`, the read models' views and `audit_checkpoints` |
//! | [`SEALER`] (`tally audit seal`, the sealer) | read three columns of `events` (`tx_id`, `position`, `hash`: the Merkle tree's leaves); insert into `audit_checkpoints` (and read its `tree_size`, the conflict target) |
//!
//! None owns `events` or may update, delete or truncate it, alter it or its triggers, or set
//! `session_replication_role` (which would skip triggers): those need ownership or a superuser.
//! Each role also carries its own `statement_timeout`, set when the role is created (an
//! operator may change it later; `migrate` leaves an existing role's settings alone).
//!
//! Roles belong to the whole Postgres cluster; their grants to each database. [`ensure`] is
//! idempotent and safe to run from several migrations at once. The projectors' crate grants
//! what concerns its own tables (`tally_projectors::migrate`).

use sqlx::PgPool;

/// The command API's role.
pub const COMMAND: &str = "tally_command";
/// The relay's role.
pub const RELAY: &str = "tally_relay";
/// The projectors' role; it owns the read models.
pub const PROJECTOR: &str = "tally_projector";
/// The query API's role.
pub const QUERY: &str = "tally_query";
/// The sealer's role (`tally audit seal`, once or `--every`): it reads only what the Merkle
/// tree is made of and publishes checkpoints, so a leaked sealer password reads no payload and
/// writes nothing that is trusted.
pub const SEALER: &str = "tally_sealer";

/// Every service role, with the `statement_timeout` it is created with: long enough for the
/// longest statement its service runs (a projector's rebuild copies and indexes whole tables),
/// short enough that a runaway statement does not hold locks and a connection for long.
pub const ALL: [(&str, &str); 5] = [
    (COMMAND, "15s"),
    (RELAY, "30s"),
    (PROJECTOR, "15min"),
    (QUERY, "5s"),
    // A page of leaves is an index range scan; a minute is far beyond one.
    (SEALER, "1min"),
];

/// The roles that read whole events (the sealer reads three columns only).
const EVENT_READERS: [&str; 4] = [COMMAND, RELAY, PROJECTOR, QUERY];

/// How often creating a role is retried when another migration creates it at the same moment
/// (Postgres reports that as a duplicate, or as a concurrently updated catalog row).
const CREATE_ATTEMPTS_MAX: u32 = 5;

/// Creates the service roles that do not exist yet and grants each what it needs on the event
/// store's tables of the connected database. Runs as the tables' owner, who must be allowed to
/// create roles (a superuser, or `CREATEROLE`).
pub async fn ensure(pool: &PgPool) -> Result<(), sqlx::Error> {
    for (role, statement_timeout) in ALL {
        create(pool, role, statement_timeout).await?;
    }
    let database: String = sqlx::query_scalar("SELECT current_database()").fetch_one(pool).await?;
    let every = ALL.map(|(role, _)| role).join(", ");
    let readers = EVENT_READERS.join(", ");
    let position_sequence: String = sqlx::query_scalar("SELECT pg_get_serial_sequence('events', 'position')")
        .fetch_one(pool)
        .await?;
    let grants = [
        format!("GRANT CONNECT ON DATABASE {} TO {every}", quote_ident(&database)),
        format!("GRANT USAGE ON SCHEMA public TO {every}"),
        // Only the projectors create tables (their read models' generations).
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned(),
        format!("GRANT SELECT ON events TO {readers}"),
        // The leaves of the Merkle tree, and nothing of what the events say.
        format!("GRANT SELECT (tx_id, position, hash) ON events TO {SEALER}"),
        format!("GRANT INSERT ON events TO {COMMAND}"),
        format!("GRANT USAGE ON SEQUENCE {position_sequence} TO {COMMAND}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys, snapshots TO {COMMAND}"),
        format!("GRANT SELECT, INSERT, UPDATE ON relay_checkpoints TO {RELAY}"),
        // The query API serves inclusion proofs against the published signed checkpoints;
        // the sealer publishes them (`INSERT … ON CONFLICT (tree_size) DO NOTHING`, which
        // needs SELECT on its conflict target). Nothing is verified against this copy, so
        // whoever may write it can forge nothing.
        format!("GRANT SELECT ON audit_checkpoints TO {QUERY}"),
        format!("GRANT INSERT, SELECT (tree_size) ON audit_checkpoints TO {SEALER}"),
    ];
    for grant in grants {
        sqlx::query(sqlx::AssertSqlSafe(grant)).execute(pool).await?;
    }
    Ok(())
}

/// Sets the password `role` logs in with. Postgres takes no parameters in `ALTER ROLE`, so
/// the password is a quoted literal here; the statement is not logged by this code.
pub async fn set_password(pool: &PgPool, role: &str, password: &str) -> Result<(), sqlx::Error> {
    let literal = format!("'{}'", password.replace('\'', "''"));
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER ROLE {role} PASSWORD {literal}")))
        .execute(pool)
        .await?;
    Ok(())
}

/// Creates `role` (a login role with `statement_timeout`) unless it exists.
async fn create(pool: &PgPool, role: &str, statement_timeout: &str) -> Result<(), sqlx::Error> {
    let mut attempt = 1;
    loop {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(pool)
            .await?;
        if exists {
            return Ok(());
        }
        let mut tx = pool.begin().await?;
        let created = async {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN")))
                .execute(&mut *tx)
                .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER ROLE {role} SET statement_timeout = '{statement_timeout}'"
            )))
            .execute(&mut *tx)
            .await?;
            Ok::<_, sqlx::Error>(())
        }
        .await;
        match created {
            Ok(()) => return tx.commit().await,
            Err(error) if attempt < CREATE_ATTEMPTS_MAX && created_concurrently(&error) => {
                drop(tx);
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50 * u64::from(attempt))).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Whether `error` says another session created the same role at the same moment.
fn created_concurrently(error: &sqlx::Error) -> bool {
    let Some(db) = error.as_database_error() else {
        return false;
    };
    // duplicate_object, unique_violation, and "tuple concurrently updated" (internal_error).
    matches!(db.code().as_deref(), Some("42710" | "23505" | "XX000"))
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
