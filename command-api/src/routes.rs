//! HTTP routes of the command API. Bodies are parsed into domain types here, at the edge.

use axum::extract::{DefaultBodyLimit, OriginalUri, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use serde::{Deserialize, Serialize};
use tally_domain::{AccountCommand, AmountMinor, Currency, Metadata};
use tally_event_store::idempotency::{IdempotencyKey, StoredResponse, request_hash};
use tally_service::token::ConsistencyToken;
use tally_service::{Json, Problem};
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;
use crate::execute::{Executed, Idempotency, Outcome, execute_account};

/// The request header carrying a client's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Set to `true` on a response that repeats a stored one.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

/// Largest accepted request body. Commands are a few hundred bytes.
pub const REQUEST_BODY_MAX_BYTES: usize = 16 * 1024;
/// Longest accepted correlation id header, in bytes.
const CORRELATION_ID_LEN_MAX: usize = 128;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/accounts", post(open_account))
        .route("/v1/accounts/{id}/deposits", post(deposit))
        .route("/v1/accounts/{id}/withdrawals", post(withdraw))
        .route("/health", get(tally_service::problem::health))
        .route("/ready", get(ready))
        .fallback(tally_service::problem::fallback)
        .method_not_allowed_fallback(tally_service::problem::method_not_allowed)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_MAX_BYTES))
        .layer(middleware::from_fn(tally_service::errors::log_server_errors))
        .with_state(state)
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
#[derive(Debug, Deserialize, Serialize)]
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
#[derive(Debug, Deserialize, Serialize)]
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

/// The request's idempotency key, if it sent one, with the hash of the request it guards.
fn idempotency(headers: &HeaderMap, path: &str, body: &impl Serialize) -> Result<Option<Idempotency>, Problem> {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let key = raw.to_str().ok().and_then(IdempotencyKey::parse).ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
        )
        .detail("An Idempotency-Key is 1 to 255 visible ASCII characters.")
    })?;
    let body = serde_json::to_value(body).expect("request bodies always serialize");
    Ok(Some(Idempotency {
        key,
        request_hash: request_hash("POST", path, &body),
    }))
}

/// Metadata from the request: correlation id and trace context when the client sent them.
fn metadata(headers: &HeaderMap, idempotency: Option<&Idempotency>) -> Metadata {
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
        idempotency_key: idempotency.map(|i| i.key.as_str().to_owned()),
        traceparent: header("traceparent").filter(|v| v.len() <= CORRELATION_ID_LEN_MAX),
    }
}

/// The body every accepted account command answers with.
fn accepted(account_id: Uuid, executed: &Executed) -> StoredResponse {
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
    StoredResponse {
        status: StatusCode::CREATED.as_u16(),
        body: serde_json::to_value(body).expect("responses always serialize"),
    }
}

/// Sends a fresh or replayed response, with its consistency token (and `Location` for a new
/// account) as headers.
fn respond(outcome: Outcome, location: bool) -> Response {
    let (stored, replayed) = match outcome {
        Outcome::Fresh(r) => (r, false),
        Outcome::Replayed(r) => (r, true),
    };
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::CREATED);
    let token = stored
        .body
        .get("consistency_token")
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    let account_id = stored
        .body
        .get("account_id")
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    let mut response = (status, axum::Json(stored.body)).into_response();
    let headers = response.headers_mut();
    if let Some(value) = token.and_then(|t| HeaderValue::from_str(&t).ok()) {
        headers.insert("x-consistency-token", value);
    }
    if location && let Some(value) = account_id.and_then(|id| HeaderValue::from_str(&format!("/v1/accounts/{id}")).ok())
    {
        headers.insert(header::LOCATION, value);
    }
    if replayed {
        headers.insert(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

async fn open_account(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<OpenAccountRequest>,
) -> Result<Response, ApiError> {
    let idempotency = idempotency(&headers, uri.path(), &body)?;
    let currency = parse_currency(&body.currency)?;
    let account_id = body.account_id.unwrap_or_else(Uuid::now_v7);
    let metadata = metadata(&headers, idempotency.as_ref());
    let command = AccountCommand::Open {
        account_id,
        owner: body.owner,
        currency,
        overdraft_limit: body.overdraft_limit,
    };
    let outcome = execute_account(
        &state.store,
        account_id,
        command,
        &metadata,
        idempotency.as_ref(),
        |e| accepted(account_id, e),
    )
    .await?;
    Ok(respond(outcome, true))
}

async fn deposit(
    State(state): State<AppState>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<PostingRequest>,
) -> Result<Response, ApiError> {
    posting(state, &id, uri.path(), headers, body, |amount, reference| {
        AccountCommand::Deposit { amount, reference }
    })
    .await
}

async fn withdraw(
    State(state): State<AppState>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<PostingRequest>,
) -> Result<Response, ApiError> {
    posting(state, &id, uri.path(), headers, body, |amount, reference| {
        AccountCommand::Withdraw { amount, reference }
    })
    .await
}

/// Deposits and withdrawals differ only in the command they build.
async fn posting(
    state: AppState,
    id: &str,
    path: &str,
    headers: HeaderMap,
    body: PostingRequest,
    command: impl FnOnce(AmountMinor, String) -> AccountCommand,
) -> Result<Response, ApiError> {
    let account_id = parse_account_id(id)?;
    let idempotency = idempotency(&headers, path, &body)?;
    let metadata = metadata(&headers, idempotency.as_ref());
    let command = command(parse_amount(body.amount)?, body.reference);
    let outcome = execute_account(
        &state.store,
        account_id,
        command,
        &metadata,
        idempotency.as_ref(),
        |e| accepted(account_id, e),
    )
    .await?;
    Ok(respond(outcome, false))
}
