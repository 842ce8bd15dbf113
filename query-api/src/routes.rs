//! HTTP routes of the query API. Each handler carries its `#[utoipa::path]` annotation, from
//! which [`crate::openapi`] builds the document served at `GET /openapi.json`.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use tally_service::Problem;
use tally_service::auth::{Reader, Require};
use tally_service::errors::ErrorReport;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;

/// Every route of the query API. Serve it wrapped in [`tally_service::edge::protect`] (see
/// [`crate::app`]): its handlers expect the authentication the edge performs.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/accounts/{id}", get(get_account))
        .route("/openapi.json", get(crate::openapi::serve))
        .route("/health", get(tally_service::problem::health))
        .route("/ready", get(ready))
        .fallback(tally_service::problem::fallback)
        .method_not_allowed_fallback(tally_service::problem::method_not_allowed)
        .with_state(state)
}

/// `GET /ready`: 200 when the read database answers, else 503.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "ops",
    summary = "Readiness: the read database answers",
    responses(
        (status = 200, description = "The read database is reachable.", body = String, content_type = "text/plain"),
        (status = 503, description = "`unavailable`: the read database is unreachable; `shutting-down`: the \
         instance is stopping (SIGTERM).", body = Problem,
         content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(&state.reads).await {
        Ok(_) => "ready".into_response(),
        Err(_) => Problem::unavailable(1)
            .detail("The read database is unreachable.")
            .into_response(),
    }
}

/// Content type of every error response.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// An account as its read model shows it (`GET /v1/accounts/{id}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountView {
    pub account_id: Uuid,
    #[schema(example = "Ada")]
    pub owner: String,
    /// ISO 4217 code.
    #[schema(example = "EUR")]
    pub currency: String,
    /// Minor units on the account.
    pub balance: i64,
    /// Minor units reserved by pending transfers (holds).
    pub held: i64,
    /// `balance - held`: what a debit may use (plus the overdraft limit).
    pub available: i64,
    /// `open`, `frozen` or `closed`.
    #[schema(example = "open")]
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

#[utoipa::path(
    get,
    path = "/v1/accounts/{id}",
    tag = "accounts",
    security(("bearerAuth" = ["reader"])),
    summary = "An account's balance and status, as projected from its events",
    params(("id" = Uuid, Path, description = "The account's id (a UUID).")),
    responses(
        (status = 200, description = "The account as of `version`.", body = AccountView),
        (status = 404, description = "`account-not-found`: no account with this id (or the projection has not \
            reached it yet).", body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = "`unavailable`: the read database is unreachable; retry after \
            `Retry-After` seconds.", body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_account(_: Require<Reader>, State(state): State<AppState>, Path(id): Path<String>) -> Response {
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
