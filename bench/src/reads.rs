//! The read scenarios (`reads-cached`, `reads-uncached`, `statement-pages`): the accounts
//! they read, and their limits, two minimal axum servers on the query API's paths that
//! `tally load` drives like the real one:
//!
//! - [`LimitMode::Fixed`]: a fixed JSON body for every request, no database (the limit of a
//!   cached read: all a cache hit can do is answer);
//! - [`LimitMode::Row`]: one sqlx query per request on copies of the read models
//!   (`bench_account_balances`, `bench_account_statement`: the same columns, keys and rows as
//!   `account_balances` and `account_statement`), one row for an account, a keyset page of
//!   lines for a statement (the limit of an uncached read and of a statement page).
//!
//! Neither authenticates nor logs: they are the floor under any real handler.

use std::net::SocketAddr;
use std::path::Path;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use sqlx::{PgPool, Row};
use tally_event_store::EventStore;
use uuid::Uuid;

use crate::Measurement;

/// What the limit server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LimitMode {
    /// The same JSON body every time.
    Fixed,
    /// One query per request on the copies of the read models.
    Row,
}

/// The most statement lines one page of the limit server returns.
const PAGE_LINES_MAX: i64 = 1_000;

/// Writes a log of `events` account events (an opening and deposits per account), builds the
/// `accounts` read models from it (a rebuild), copies them into the limit's tables and lists
/// the accounts in `accounts_file`.
pub async fn prepare(
    store: &EventStore,
    events: u64,
    partitions: u32,
    accounts_file: &Path,
) -> anyhow::Result<Measurement> {
    let preloaded = crate::rebuild::preload(store, events).await?;
    crate::rebuild::rebuild(store, partitions).await?;
    let pool = store.pool();
    for statement in [
        "DROP TABLE IF EXISTS bench_account_balances, bench_account_statement",
        "CREATE TABLE bench_account_balances AS SELECT * FROM account_balances",
        "ALTER TABLE bench_account_balances ADD PRIMARY KEY (account_id)",
        "CREATE TABLE bench_account_statement AS SELECT * FROM account_statement",
        "ALTER TABLE bench_account_statement ADD PRIMARY KEY (account_id, version)",
        "ANALYZE bench_account_balances, bench_account_statement, account_balances, account_statement",
    ] {
        sqlx::query(statement).execute(pool).await?;
    }
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT account_id FROM account_balances ORDER BY account_id")
        .fetch_all(pool)
        .await?;
    let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
    std::fs::write(accounts_file, text)?;
    Ok(preloaded)
}

#[derive(Clone)]
struct Limit {
    pool: Option<PgPool>,
}

/// Serves the limit on `listen` until the process is killed; prints the address it bound
/// (a JSON object) once it accepts connections.
pub async fn serve(mode: LimitMode, database_url: &str, listen: SocketAddr, connections: u32) -> anyhow::Result<()> {
    let state = Limit {
        pool: match mode {
            LimitMode::Fixed => None,
            LimitMode::Row => Some(tally_event_store::connect(database_url, connections)?),
        },
    };
    let router = match mode {
        LimitMode::Fixed => Router::new()
            .route("/v1/accounts/{id}", get(fixed_account))
            .route("/v1/accounts/{id}/statement", get(fixed_page)),
        LimitMode::Row => Router::new()
            .route("/v1/accounts/{id}", get(row_account))
            .route("/v1/accounts/{id}/statement", get(row_page)),
    }
    .route("/ready", get(|| async { "ready" }))
    .with_state(state);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("{}", json!({ "listening": listener.local_addr()?.to_string() }));
    axum::serve(listener, router).await?;
    Ok(())
}

/// An account as the query API shows it, a fixed one.
const FIXED_ACCOUNT: &str = r#"{"account_id":"0190f1d2-7a2b-7c3d-8e4f-5a6b7c8d9e0f","owner":"bench","currency":"EUR","balance":99,"held":0,"available":99,"status":"open","version":100,"updated_at":"2026-11-24T06:00:00Z"}"#;

async fn fixed_account() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], FIXED_ACCOUNT).into_response()
}

async fn fixed_page() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"lines":[],"has_more":false,"next_cursor":null}"#,
    )
        .into_response()
}

fn failed(error: &sqlx::Error) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response()
}

async fn row_account(State(limit): State<Limit>, UrlPath(id): UrlPath<Uuid>) -> Response {
    let Some(pool) = &limit.pool else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let row = sqlx::query(
        "SELECT account_id, owner, currency, balance, held, available, status, version, updated_at \
         FROM bench_account_balances WHERE account_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await;
    match row {
        Ok(Some(row)) => account_json(&row).map_or_else(|e| failed(&e), |body| Json(body).into_response()),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(error) => failed(&error),
    }
}

fn account_json(row: &sqlx::postgres::PgRow) -> Result<serde_json::Value, sqlx::Error> {
    Ok(json!({
        "account_id": row.try_get::<Uuid, _>("account_id")?,
        "owner": row.try_get::<String, _>("owner")?,
        "currency": row.try_get::<String, _>("currency")?,
        "balance": row.try_get::<i64, _>("balance")?,
        "held": row.try_get::<i64, _>("held")?,
        "available": row.try_get::<i64, _>("available")?,
        "status": row.try_get::<String, _>("status")?,
        "version": row.try_get::<i64, _>("version")?,
        "updated_at": row.try_get::<DateTime<Utc>, _>("updated_at")?,
    }))
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    limit: Option<i64>,
    /// The version after which the page starts (the previous page's `next_cursor`).
    cursor: Option<String>,
}

async fn row_page(State(limit): State<Limit>, UrlPath(id): UrlPath<Uuid>, Query(query): Query<PageQuery>) -> Response {
    let Some(pool) = &limit.pool else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let lines = query.limit.unwrap_or(50).clamp(1, PAGE_LINES_MAX);
    // One more than asked: whether there are more, as the query API tells.
    let after: i64 = query.cursor.as_deref().and_then(|c| c.parse().ok()).unwrap_or(0);
    let rows = sqlx::query(
        "SELECT version, position, recorded_at, kind, direction, amount, currency, counterparty, transfer_id, \
                reference, balance_after \
         FROM bench_account_statement WHERE account_id = $1 AND version > $2 ORDER BY version LIMIT $3",
    )
    .bind(id)
    .bind(after)
    .bind(lines + 1)
    .fetch_all(pool)
    .await;
    let mut rows = match rows {
        Ok(rows) => rows,
        Err(error) => return failed(&error),
    };
    let has_more = rows.len() as i64 > lines;
    rows.truncate(lines as usize);
    let page = rows.iter().map(line_json).collect::<Result<Vec<_>, _>>();
    match page {
        Ok(page) => {
            let next = page.last().map(|line| line["version"].to_string());
            Json(json!({ "account_id": id, "lines": page, "has_more": has_more, "next_cursor": next })).into_response()
        }
        Err(error) => failed(&error),
    }
}

fn line_json(row: &sqlx::postgres::PgRow) -> Result<serde_json::Value, sqlx::Error> {
    Ok(json!({
        "version": row.try_get::<i64, _>("version")?,
        "position": row.try_get::<i64, _>("position")?,
        "recorded_at": row.try_get::<DateTime<Utc>, _>("recorded_at")?,
        "kind": row.try_get::<String, _>("kind")?,
        "direction": row.try_get::<String, _>("direction")?,
        "amount": row.try_get::<i64, _>("amount")?,
        "currency": row.try_get::<String, _>("currency")?,
        "counterparty": row.try_get::<Option<Uuid>, _>("counterparty")?,
        "transfer_id": row.try_get::<Option<Uuid>, _>("transfer_id")?,
        "reference": row.try_get::<String, _>("reference")?,
        "balance_after": row.try_get::<i64, _>("balance_after")?,
    }))
}
