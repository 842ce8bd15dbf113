//! HTTP routes of the command API. Bodies are parsed into domain types here, at the edge.

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use serde::{Deserialize, Serialize};
use tally_domain::{AccountCommand, AmountMinor, Currency, Metadata};
use tally_service::token::ConsistencyToken;
use tally_service::{Json, Problem};
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;
use crate::execute::{Executed, execute_account};

/// Largest accepted request body. Commands are a few hundred bytes.
pub const REQUEST_BODY_MAX_BYTES: usize = 16 * 1024;
/// Longest accepted correlation id header, in bytes.
const CORRELATION_ID_LEN_MAX: usize = 128;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/accounts", post(open_account))
        .route("/v1/accounts/{id}/deposits", post(deposit))
        .route("/v1/accounts/{id}/withdrawals", post(withdraw))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .fallback(tally_service::problem::fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_MAX_BYTES))
        .layer(middleware::from_fn(tally_service::errors::log_server_errors))
        .with_state(state)
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
    )
}

async fn health() -> &'static str {
    "ok"
}

async fn ready(State(state): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(state.store.pool()).await {
        Ok(_) => "ready".into_response(),
        Err(_) => Problem::unavailable(1)
            .detail("The event store is unreachable.")
            .into_response(),
    }
}

/// `POST /v1/accounts`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    pub owner: String,
    pub currency: String,
    /// Minor units the account may go below zero; default 0.
    #[serde(default)]
    pub overdraft_limit: i64,
    /// A client-chosen id (UUID); a new UUIDv7 when absent.
    #[serde(default)]
    pub account_id: Option<Uuid>,
}

/// `POST /v1/accounts/{id}/deposits` and `/withdrawals`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostingRequest {
    /// Integer minor units, > 0.
    pub amount: i64,
    #[serde(default)]
    pub reference: String,
}

/// Every accepted account command answers with where the stream now stands.
#[derive(Debug, Serialize)]
pub struct AccountCommandResponse {
    pub account_id: Uuid,
    pub version: i64,
    pub position: i64,
    pub currency: String,
    pub balance: i64,
    pub available: i64,
    /// Pass as `X-Consistency-Token` to a read to see at least this write.
    pub consistency_token: String,
}

fn parse_currency(text: &str) -> Result<Currency, Problem> {
    text.parse().map_err(|e: tally_domain::MoneyError| {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-currency", "Invalid currency").detail(e.to_string())
    })
}

fn parse_amount(amount: i64) -> Result<AmountMinor, Problem> {
    AmountMinor::new(amount).map_err(|e| {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount", "Invalid amount").detail(e.to_string())
    })
}

fn parse_account_id(raw: &str) -> Result<Uuid, Problem> {
    Uuid::try_parse(raw).map_err(|_| Problem::not_found("account-not-found", "No account with this id."))
}

/// Metadata from the request: correlation id and trace context when the client sent them.
fn metadata(headers: &HeaderMap) -> Metadata {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let correlation_id = header("x-correlation-id")
        .filter(|v| v.len() <= CORRELATION_ID_LEN_MAX)
        .and_then(|v| Uuid::try_parse(&v).ok())
        .unwrap_or_else(Uuid::now_v7);
    Metadata {
        actor: None,
        correlation_id,
        // Each command is its own cause; events it emits all point at it.
        causation_id: Uuid::now_v7(),
        idempotency_key: None,
        traceparent: header("traceparent").filter(|v| v.len() <= CORRELATION_ID_LEN_MAX),
    }
}

fn created(account_id: Uuid, executed: Executed) -> Response {
    let token = ConsistencyToken {
        stream_id: account_id,
        version: executed.version,
    };
    let body = AccountCommandResponse {
        account_id,
        version: executed.version,
        position: executed.position,
        currency: executed.account.currency.map(String::from).unwrap_or_default(),
        balance: executed.account.balance,
        available: executed.account.available(),
        consistency_token: token.to_string(),
    };
    let mut response = (StatusCode::CREATED, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&token.to_string()) {
        response.headers_mut().insert("x-consistency-token", value);
    }
    response
}

async fn open_account(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<OpenAccountRequest>,
) -> Result<Response, ApiError> {
    let currency = parse_currency(&body.currency)?;
    let account_id = body.account_id.unwrap_or_else(Uuid::now_v7);
    let command = AccountCommand::Open {
        account_id,
        owner: body.owner,
        currency,
        overdraft_limit: body.overdraft_limit,
    };
    let executed = execute_account(&state.store, account_id, command, &metadata(&headers)).await?;
    let mut response = created(account_id, executed);
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/accounts/{account_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn deposit(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<PostingRequest>,
) -> Result<Response, ApiError> {
    let account_id = parse_account_id(&id)?;
    let command = AccountCommand::Deposit {
        amount: parse_amount(body.amount)?,
        reference: body.reference,
    };
    let executed = execute_account(&state.store, account_id, command, &metadata(&headers)).await?;
    Ok(created(account_id, executed))
}

async fn withdraw(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<PostingRequest>,
) -> Result<Response, ApiError> {
    let account_id = parse_account_id(&id)?;
    let command = AccountCommand::Withdraw {
        amount: parse_amount(body.amount)?,
        reference: body.reference,
    };
    let executed = execute_account(&state.store, account_id, command, &metadata(&headers)).await?;
    Ok(created(account_id, executed))
}
