//! The control tables: which generation of each projection readers see, the partitions'
//! checkpoints and states, and the generation tables and views themselves.

use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row};

use crate::accounts::Accounts;
use crate::model::{Generation, Projection, TableDef};
use crate::transfers::Transfers;

/// Every projection this code maintains, by name.
pub const PROJECTIONS: &[&str] = &[Accounts::NAME, Transfers::NAME];

/// The projection owning `name`, which may be a projection or one of its read models
/// (`account_statement` → `accounts`).
pub fn resolve(name: &str) -> Option<&'static str> {
    let owns = |tables: &[TableDef]| tables.iter().any(|t| t.name == name);
    if name == Accounts::NAME || owns(Accounts::TABLES) {
        Some(Accounts::NAME)
    } else if name == Transfers::NAME || owns(Transfers::TABLES) {
        Some(Transfers::NAME)
    } else {
        None
    }
}

/// What the live batch of a partition needs to know, read under a share lock so a switch or a
/// pause waits for batches in flight (and batches wait for them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub generation: Generation,
    pub shape: i32,
    pub paused: bool,
}

/// Creates the projection's control rows and, when it has none, its first (empty) generation
/// with its views. Safe to run from many processes at once.
pub async fn ensure<P: Projection>(pool: &PgPool, partitions: u32) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO projections (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(P::NAME)
        .execute(&mut *tx)
        .await?;
    let (generation, shape): (Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT generation, shape FROM projections WHERE name = $1 FOR UPDATE")
            .bind(P::NAME)
            .fetch_one(&mut *tx)
            .await?;
    match generation {
        None => {
            let first = Generation { number: 1 };
            create_tables::<P>(&mut tx, &first).await?;
            point_views::<P>(&mut tx, &first).await?;
            sqlx::query("UPDATE projections SET generation = 1, shape = $2, updated_at = now() WHERE name = $1")
                .bind(P::NAME)
                .bind(P::SHAPE)
                .execute(&mut *tx)
                .await?;
        }
        // A generation made before a column or an index was added to the code gets it now
        // (writes to the table wait while an index is built: once, at the upgrade's `tally
        // migrate`); its views are made again to show a new column, or replaced in place
        // with the code's (`refresh_views`). A generation
        // of another shape gets nothing: its columns may not be this code's, and it is
        // replaced by a rebuild (`tally projections rebuild`), which makes every index.
        Some(number) if shape == Some(P::SHAPE) => {
            let live = Generation { number };
            act_as_read_model_owner(&mut tx).await?;
            if add_columns::<P>(&mut tx, &live).await? {
                point_views::<P>(&mut tx, &live).await?;
            } else {
                refresh_views::<P>(&mut tx, &live).await?;
            }
            create_indexes::<P>(&mut tx, &live).await?;
        }
        Some(_) => {}
    }
    sqlx::query(
        "INSERT INTO projection_partitions (projection, partition) \
         SELECT $1, p FROM generate_series(0, $2 - 1) AS p ON CONFLICT DO NOTHING",
    )
    .bind(P::NAME)
    .bind(partitions as i32)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Grants the projectors' role ([`tally_event_store::roles::PROJECTOR`]) the control tables
/// and the read models, and the query API's role ([`tally_event_store::roles::QUERY`]) the
/// readers' views; read models created before roles existed are handed to the projectors'
/// role. Idempotent; runs as the database owner after the event store made the roles.
pub async fn grant_roles(pool: &PgPool) -> Result<(), sqlx::Error> {
    use tally_event_store::roles::{PROJECTOR, QUERY};
    let mut tx = pool.begin().await?;
    let member: bool = sqlx::query_scalar("SELECT pg_has_role($1, 'MEMBER')")
        .bind(PROJECTOR)
        .fetch_one(&mut *tx)
        .await?;
    if !member {
        // The owner must be able to act as the read models' owner (`act_as_read_model_owner`).
        sqlx::query(sqlx::AssertSqlSafe(format!("GRANT {PROJECTOR} TO CURRENT_USER")))
            .execute(&mut *tx)
            .await?;
    }
    let statements = [
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON projections, projection_partitions, projector_workers TO {PROJECTOR}"
        ),
        format!("GRANT CREATE ON SCHEMA public TO {PROJECTOR}"),
        format!("ALTER DEFAULT PRIVILEGES FOR ROLE {PROJECTOR} IN SCHEMA public GRANT SELECT ON TABLES TO {QUERY}"),
    ];
    for statement in statements {
        sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut *tx).await?;
    }
    // Every read model's views and generation tables, by name, that are not the projectors'
    // or not readable by the query API yet: changing an owner locks the relation out of every
    // reader (ACCESS EXCLUSIVE, even to the same owner), so a migrate of a live ledger touches
    // only what it changes.
    let names: Vec<&str> = [Accounts::TABLES, Transfers::TABLES]
        .concat()
        .iter()
        .map(|t| t.name)
        .collect();
    let relations: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, c.relkind::text FROM pg_class c \
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v') \
           AND EXISTS (SELECT 1 FROM UNNEST($1::text[]) AS n(name) \
                       WHERE c.relname = n.name OR c.relname ~ ('^' || n.name || '_g[0-9]+$')) \
           AND (c.relowner <> to_regrole($2) OR NOT has_table_privilege($3, c.oid, 'SELECT'))",
    )
    .bind(&names)
    .bind(PROJECTOR)
    .bind(QUERY)
    .fetch_all(&mut *tx)
    .await?;
    for (relation, kind) in relations {
        let kind = if kind == "v" { "VIEW" } else { "TABLE" };
        for statement in [
            format!("ALTER {kind} {relation} OWNER TO {PROJECTOR}"),
            format!("GRANT SELECT ON {relation} TO {QUERY}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut *tx).await?;
        }
    }
    tx.commit().await
}

/// Creates every projection's control rows and first generation.
pub async fn ensure_all(pool: &PgPool, partitions: u32) -> Result<(), sqlx::Error> {
    ensure::<Accounts>(pool, partitions).await?;
    ensure::<Transfers>(pool, partitions).await
}

/// The live generation, share-locked for the caller's transaction.
pub async fn live(conn: &mut PgConnection, projection: &str) -> Result<Live, sqlx::Error> {
    let row = sqlx::query("SELECT generation, shape, paused FROM projections WHERE name = $1 FOR SHARE")
        .bind(projection)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Live {
        generation: Generation {
            number: row.try_get::<Option<i32>, _>("generation")?.unwrap_or(0),
        },
        shape: row.try_get::<Option<i32>, _>("shape")?.unwrap_or(0),
        paused: row.try_get("paused")?,
    })
}

/// Makes the rest of the caller's transaction act as the read models' owner
/// ([`tally_event_store::roles::PROJECTOR`]), so the tables and views it creates belong to that
/// role whoever runs it (a projector, or `tally migrate` and `tally projections rebuild` as the
/// database owner, a member of it): any of them can then replace or drop them later, and the
/// query API's role can read them (default privileges).
async fn act_as_read_model_owner(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let owner = tally_event_store::roles::PROJECTOR;
    let switch: bool = sqlx::query_scalar(
        "SELECT current_user <> $1 AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) \
         AND pg_has_role($1, 'MEMBER')",
    )
    .bind(owner)
    .fetch_one(&mut *conn)
    .await?;
    if switch {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {owner}")))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

pub(crate) async fn create_tables<P: Projection>(
    conn: &mut PgConnection,
    generation: &Generation,
) -> Result<(), sqlx::Error> {
    act_as_read_model_owner(conn).await?;
    for table in P::TABLES {
        for ddl in table.ddl {
            let sql = ddl.replace("{table}", &generation.table(table.name));
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await?;
        }
    }
    create_indexes::<P>(conn, generation).await
}

/// Adds the columns of [`crate::model::TableDef::columns_added`] that `generation`'s tables
/// lack; whether it added any. Instant for a constant default (Postgres 11 and later), so
/// batches wait on it only for a moment.
async fn add_columns<P: Projection>(conn: &mut PgConnection, generation: &Generation) -> Result<bool, sqlx::Error> {
    let mut added = false;
    for table in P::TABLES {
        let name = generation.table(table.name);
        for (column, definition) in table.columns_added {
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_attribute \
                 WHERE attrelid = $1::regclass AND attname = $2 AND NOT attisdropped)",
            )
            .bind(&name)
            .bind(column)
            .fetch_one(&mut *conn)
            .await?;
            if !exists {
                let sql = format!("ALTER TABLE {name} ADD COLUMN {column} {definition}");
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await?;
                added = true;
            }
        }
    }
    Ok(added)
}

/// The secondary indexes of `generation`'s tables ([`crate::model::TableDef::indexes`]) that it
/// does not have yet.
async fn create_indexes<P: Projection>(conn: &mut PgConnection, generation: &Generation) -> Result<(), sqlx::Error> {
    for table in P::TABLES {
        let name = generation.table(table.name);
        for (index, definition) in table.indexes {
            // Looked up first: `CREATE INDEX IF NOT EXISTS` share-locks the table (holding
            // the projector's batches) before it finds the index there.
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(format!("{name}_{index}"))
                .fetch_one(&mut *conn)
                .await?;
            if !exists {
                let sql = format!("CREATE INDEX IF NOT EXISTS {name}_{index} ON {name} {definition}");
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await?;
            }
        }
    }
    Ok(())
}

/// Refreshes the planner statistics of the tables of `generation` (after a bulk load: until
/// autovacuum gets to them, the planner would take the tables for the empty ones they were).
pub(crate) async fn analyze_tables<P: Projection>(
    conn: &mut PgConnection,
    generation: &Generation,
) -> Result<(), sqlx::Error> {
    each_table::<P>(conn, generation, "ANALYZE").await
}

pub(crate) async fn drop_tables<P: Projection>(
    conn: &mut PgConnection,
    generation: &Generation,
) -> Result<(), sqlx::Error> {
    act_as_read_model_owner(conn).await?;
    each_table::<P>(conn, generation, "DROP TABLE IF EXISTS").await
}

/// Runs `{command} <table>` on each table of `generation`.
async fn each_table<P: Projection>(
    conn: &mut PgConnection,
    generation: &Generation,
    command: &str,
) -> Result<(), sqlx::Error> {
    for table in P::TABLES {
        let sql = format!("{command} {}", generation.table(table.name));
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await?;
    }
    Ok(())
}

/// The code's definition of `table`'s view over `generation`, or `None` when it has no view.
fn view_definition(table: &TableDef, generation: &Generation) -> Option<String> {
    table
        .view
        .map(|select| select.replace("{table}", &generation.table(table.name)))
}

/// The comment a view made by this code carries: the SHA-256 of its definition. A start finds
/// a view that already shows the code's definition by it and leaves it alone.
fn view_mark(definition: &str) -> String {
    format!("tally:{}", hex::encode(Sha256::digest(definition.as_bytes())))
}

/// Marks `view` with [`view_mark`] of the definition it was just made with.
async fn mark_view(conn: &mut PgConnection, view: &str, definition: &str) -> Result<(), sqlx::Error> {
    // The mark is hex: safe inside the literal.
    let sql = format!("COMMENT ON VIEW {view} IS '{}'", view_mark(definition));
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

/// Replaces the readers' views of the live `generation` with the code's, in place: a view that
/// gained columns at its end (a sum the readers need) shows them with no rebuild, and readers
/// never find it missing (`CREATE OR REPLACE` keeps the view itself). A view whose columns
/// changed otherwise is left as it is: that is a new shape, which a rebuild brings.
///
/// A view whose mark says it already shows the code's definition is not touched. Replacing it
/// takes an ACCESS EXCLUSIVE lock until the transaction commits (replayed as such on every
/// replica): readers queue behind it, and a reader holding a lock on another of the views
/// deadlocks with it. Every projector start runs this, so without the mark a restart or a
/// scale-up would stall the query API's reads and fail some with `deadlock detected`.
async fn refresh_views<P: Projection>(conn: &mut PgConnection, generation: &Generation) -> Result<(), sqlx::Error> {
    for table in P::TABLES {
        let Some(definition) = view_definition(table, generation) else {
            continue;
        };
        let marked: Option<String> = sqlx::query_scalar("SELECT obj_description(to_regclass($1), 'pg_class')")
            .bind(table.name)
            .fetch_one(&mut *conn)
            .await?;
        if marked.as_deref() == Some(view_mark(&definition).as_str()) {
            continue;
        }
        let replace = format!("CREATE OR REPLACE VIEW {} AS {definition}", table.name);
        sqlx::query("SAVEPOINT refresh_view").execute(&mut *conn).await?;
        match sqlx::query(sqlx::AssertSqlSafe(replace)).execute(&mut *conn).await {
            Ok(_) => {
                mark_view(conn, table.name, &definition).await?;
                sqlx::query("RELEASE SAVEPOINT refresh_view")
                    .execute(&mut *conn)
                    .await?
            }
            Err(error) => {
                tracing::warn!(view = table.name, %error, "the live view differs from the code's; a rebuild replaces it");
                sqlx::query("ROLLBACK TO SAVEPOINT refresh_view")
                    .execute(&mut *conn)
                    .await?
            }
        };
    }
    Ok(())
}

/// Points the readers' views at `generation`. Inside a transaction, readers see the old
/// generation or the new one, never neither.
pub(crate) async fn point_views<P: Projection>(
    conn: &mut PgConnection,
    generation: &Generation,
) -> Result<(), sqlx::Error> {
    act_as_read_model_owner(conn).await?;
    for table in P::TABLES {
        let Some(definition) = view_definition(table, generation) else {
            continue;
        };
        let drop = format!("DROP VIEW IF EXISTS {}", table.name);
        sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut *conn).await?;
        let create = format!("CREATE VIEW {} AS {definition}", table.name);
        sqlx::query(sqlx::AssertSqlSafe(create)).execute(&mut *conn).await?;
        mark_view(conn, table.name, &definition).await?;
    }
    Ok(())
}
