//! The control tables: which generation of each projection readers see, the partitions'
//! checkpoints and states, and the generation tables and views themselves.

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
    let generation: Option<i32> = sqlx::query_scalar("SELECT generation FROM projections WHERE name = $1 FOR UPDATE")
        .bind(P::NAME)
        .fetch_one(&mut *tx)
        .await?;
    if generation.is_none() {
        let first = Generation { number: 1 };
        create_tables::<P>(&mut tx, &first).await?;
        point_views::<P>(&mut tx, &first).await?;
        sqlx::query("UPDATE projections SET generation = 1, shape = $2, updated_at = now() WHERE name = $1")
            .bind(P::NAME)
            .bind(P::SHAPE)
            .execute(&mut *tx)
            .await?;
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

pub(crate) async fn create_tables<P: Projection>(
    conn: &mut PgConnection,
    generation: &Generation,
) -> Result<(), sqlx::Error> {
    for table in P::TABLES {
        for ddl in table.ddl {
            let sql = ddl.replace("{table}", &generation.table(table.name));
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await?;
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

/// Points the readers' views at `generation`. Inside a transaction, readers see the old
/// generation or the new one, never neither.
pub(crate) async fn point_views<P: Projection>(
    conn: &mut PgConnection,
    generation: &Generation,
) -> Result<(), sqlx::Error> {
    for table in P::TABLES {
        let Some(select) = table.view else { continue };
        let drop = format!("DROP VIEW IF EXISTS {}", table.name);
        sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut *conn).await?;
        let create = format!(
            "CREATE VIEW {} AS {}",
            table.name,
            select.replace("{table}", &generation.table(table.name))
        );
        sqlx::query(sqlx::AssertSqlSafe(create)).execute(&mut *conn).await?;
    }
    Ok(())
}
