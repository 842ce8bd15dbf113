//! HTTP routes of the query API.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use tally_service::Problem;
use tally_service::errors::ErrorReport;
use uuid::Uuid;

use crate::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/accounts/{id}", get(get_account))
        .route("/health", get(tally_service::problem::health))
        .route("/ready", get(ready))
        .fallback(tally_service::problem::fallback)
        .method_not_allowed_fallback(tally_service::problem::method_not_allowed)
        .layer(middleware::from_fn(tally_service::errors::log_server_errors))
        .with_state(state)
}

async fn ready(State(state): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(&state.reads).await {
        Ok(_) => "ready".into_response(),
        Err(_) => Problem::unavailable(1)
            .detail("The read database is unreachable.")
            .into_response(),
    }
}

/// `GET /v1/accounts/{id}`
#[derive(Debug, Serialize)]
pub struct AccountView {
    pub account_id: Uuid,
    pub owner: String,
    pub currency: String,
    pub balance: i64,
    pub held: i64,
    pub available: i64,
    pub status: String,
    /// The account stream version this view reflects.
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

/// A database failure: 503 (retryable) with the cause logged, never sent.
fn unavailable(error: &sqlx::Error) -> Response {
    let mut response = Problem::unavailable(1).into_response();
    // 503 is a server error: the logging middleware reports the attached cause.
    response.extensions_mut().insert(ErrorReport(error.to_string()));
    response
}

async fn get_account(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Ok(account_id) = Uuid::try_parse(&id) else {
        return Problem::not_found("account-not-found", "No account with this id.").into_response();
    };
    let row = sqlx::query(
        "SELECT account_id, owner, currency, balance, held, status, version, updated_at \
         FROM account_balances WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(&state.reads)
    .await;
    let row = match row {
        Ok(Some(row)) => row,
        Ok(None) => return Problem::not_found("account-not-found", "No account with this id.").into_response(),
        Err(error) => return unavailable(&error),
    };
    let view = (|| -> Result<AccountView, sqlx::Error> {
        let balance: i64 = row.try_get("balance")?;
        let held: i64 = row.try_get("held")?;
        Ok(AccountView {
            account_id: row.try_get("account_id")?,
            owner: row.try_get("owner")?,
            currency: row.try_get("currency")?,
            balance,
            held,
            available: balance - held,
            status: row.try_get("status")?,
            version: row.try_get("version")?,
            updated_at: row.try_get("updated_at")?,
        })
    })();
    match view {
        Ok(view) => Json(view).into_response(),
        Err(error) => unavailable(&error),
    }
}
