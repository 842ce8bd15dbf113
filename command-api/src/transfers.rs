//! Transfer routes: immediate and two-phase (pending → post | void) transfers between two
//! accounts. Each is one command over both account streams and the transfer's own stream,
//! appended atomically by the writer.

use axum::Router;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_domain::transfer::EXPIRES_IN_S_MAX;
use tally_domain::{AccountError, AmountMinor, TransferCommand, TransferMode};
use tally_event_store::idempotency::StoredResponse;
use tally_service::auth::{Require, Teller};
use tally_service::token::ConsistencyToken;
use tally_service::{Json, Problem};
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::command::Command;
use crate::error::ApiError;
use crate::execute::{CommandError, Executed, StreamKind, load};
use crate::routes::run_keyed;
use crate::routes::{
    AccountCommandResponse, BAD_REQUEST_KEYED, IDEMPOTENCY_KEY_REQUIRED, INTERNAL, PAYLOAD_TOO_LARGE, PROBLEM_JSON,
    UNAVAILABLE, UNSUPPORTED_MEDIA_TYPE, metadata, parse_amount, parse_currency, required_idempotency, respond,
};
use crate::writer::Respond;

/// Deadline of a pending transfer's hold when the request names none: a week, as card
/// authorizations usually get.
pub const DEFAULT_EXPIRES_IN_S: i64 = 7 * 24 * 60 * 60;

/// The transfer routes' part of the OpenAPI document (merged in [`crate::openapi::document`]).
#[derive(OpenApi)]
#[openapi(
    paths(create, post_pending, void),
    components(schemas(Mode, TransferRequest, PostRequest, VoidRequest, TransferResponse)),
    tags((name = "transfers", description = "Move money between two accounts, at once or in two phases."))
)]
pub struct TransfersApi;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/transfers", post(create))
        .route("/v1/transfers/{id}/post", post(post_pending))
        .route("/v1/transfers/{id}/void", post(void))
}

/// `immediate` moves the money now; `pending` holds it on the source until posted or voided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Immediate,
    Pending,
}

/// `POST /v1/transfers`
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub from: Uuid,
    pub to: Uuid,
    /// Integer minor units, > 0.
    pub amount: i64,
    /// Must be both accounts' currency.
    #[schema(schema_with = crate::routes::currency_schema)]
    pub currency: String,
    pub mode: Mode,
    /// Pending only: seconds until the hold expires (1 to 30 days; default 7 days).
    #[serde(default)]
    pub expires_in_s: Option<i64>,
    /// A client-chosen id (UUID), usable once; a new UUIDv7 when absent.
    #[serde(default)]
    pub transfer_id: Option<Uuid>,
    #[serde(default)]
    pub reference: String,
}

/// `POST /v1/transfers/{id}/post`
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostRequest {
    /// Minor units to move, at most the amount held; default: all of it.
    #[serde(default)]
    pub amount: Option<i64>,
}

/// `POST /v1/transfers/{id}/void`
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidRequest {}

/// Every accepted transfer command answers with the transfer and both accounts after it.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransferResponse {
    pub transfer_id: Uuid,
    /// `completed`, `pending`, `posted`, `voided` or `expired`.
    pub status: String,
    /// Amount transferred (completed) or held (pending).
    pub amount: i64,
    /// Amount that reached the destination so far.
    pub posted_amount: i64,
    pub currency: String,
    pub expires_at: Option<DateTime<Utc>>,
    /// The transfer stream's version.
    pub version: i64,
    pub position: i64,
    pub from: AccountCommandResponse,
    /// The destination, when the command touched it (not on void).
    pub to: Option<AccountCommandResponse>,
    /// Read-your-writes token for the transfer; each account carries its own.
    pub consistency_token: String,
}

/// The response of an accepted command on transfer `transfer_id`.
fn accepted(transfer_id: Uuid, from: Uuid, to: Option<Uuid>, executed: &Executed) -> StoredResponse {
    let (transfer, touched) = executed.transfer(transfer_id);
    let leg = |id: Uuid| {
        let (account, touched) = executed.account(id);
        AccountCommandResponse::new(account, touched)
    };
    let body = TransferResponse {
        transfer_id,
        status: serde_json::to_value(transfer.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        amount: transfer.amount,
        posted_amount: transfer.posted_amount,
        currency: transfer.currency.map(String::from).unwrap_or_default(),
        expires_at: transfer.expires_at,
        version: touched.version,
        position: touched.position,
        from: leg(from),
        to: to.map(leg),
        consistency_token: ConsistencyToken {
            stream_id: transfer_id,
            version: touched.version,
        }
        .to_string(),
    };
    StoredResponse {
        status: StatusCode::CREATED.as_u16(),
        body: serde_json::to_value(body).expect("responses always serialize"),
    }
}

fn invalid_expiry(detail: &str) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-expiry", "Invalid expiry").detail(detail.to_owned())
}

#[utoipa::path(
    post,
    path = "/v1/transfers",
    tag = "transfers",
    security(("bearerAuth" = ["teller"])),
    summary = "Transfer money between two accounts, now or held until posted",
    params(("Idempotency-Key" = String, Header, description = IDEMPOTENCY_KEY_REQUIRED)),
    request_body = TransferRequest,
    responses(
        (status = 201, description = "Transferred (immediate) or held (pending).", body = TransferResponse, headers(
            ("X-Consistency-Token" = String, description = "The transfer's `consistency_token`."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST_KEYED, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "`account-not-found`: the source or destination does not exist.", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "`concurrency-conflict`: the accounts kept changing while the server retried; retry after `Retry-After` seconds, or `transfer-exists`: this transfer id is taken.", body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`insufficient-funds` (with `available` and `requested`), `transfer-to-self`, `currency-mismatch`, `account-frozen` (source), `account-closed`, `invalid-amount`, `invalid-currency`, `invalid-expiry`, `invalid-reference`, `too-many-holds`, `balance-overflow`, `invalid-body`, `idempotency-key-reused`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn create(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<TransferRequest>,
) -> Result<Response, ApiError> {
    run_keyed(&state, &caller, &headers, uri.path(), body, transfer_command).await
}

/// The command of a `POST /v1/transfers` body and the answer it gets once accepted (also a
/// batch's `transfer` item).
pub(crate) fn transfer_command(body: TransferRequest) -> Result<(Command, Respond), Problem> {
    let amount = parse_amount(body.amount)?;
    let currency = parse_currency(&body.currency)?;
    let mode = match (body.mode, body.expires_in_s) {
        (Mode::Immediate, None) => TransferMode::Immediate,
        (Mode::Immediate, Some(_)) => {
            return Err(invalid_expiry("expires_in_s applies to pending transfers only."));
        }
        (Mode::Pending, expires_in_s) => TransferMode::Pending {
            expires_in_s: expires_in_s.unwrap_or(DEFAULT_EXPIRES_IN_S.min(EXPIRES_IN_S_MAX)),
        },
    };
    let transfer_id = body.transfer_id.unwrap_or_else(Uuid::now_v7);
    let command = Command::Transfer(TransferCommand {
        transfer_id,
        from: body.from,
        to: body.to,
        amount,
        currency: Some(currency),
        reference: body.reference,
        mode,
    });
    let (from, to) = (body.from, body.to);
    Ok((
        command,
        Box::new(move |executed: &Executed| accepted(transfer_id, from, Some(to), executed)),
    ))
}

/// Posting (`amount` of the hold, or all of it) pending transfer `transfer_id`, whose parties
/// are `from` and `to` (also a batch's `post` item).
pub(crate) fn post_command(transfer_id: Uuid, from: Uuid, to: Uuid, amount: Option<AmountMinor>) -> (Command, Respond) {
    let command = Command::Post {
        transfer_id,
        from,
        to,
        amount,
    };
    (
        command,
        Box::new(move |executed: &Executed| accepted(transfer_id, from, Some(to), executed)),
    )
}

/// Voiding pending transfer `transfer_id` from `from` (also a batch's `void` item).
pub(crate) fn void_command(transfer_id: Uuid, from: Uuid) -> (Command, Respond) {
    (
        Command::Void { transfer_id, from },
        Box::new(move |executed: &Executed| accepted(transfer_id, from, None, executed)),
    )
}

/// The source and destination of transfer `raw_id`, read from its stream (they never change);
/// 404 when there is no such transfer.
async fn parties(state: &AppState, raw_id: &str) -> Result<(Uuid, Uuid, Uuid), ApiError> {
    let not_found = || Problem::not_found("transfer-not-found", "No transfer with this id.");
    let transfer_id = Uuid::try_parse(raw_id).map_err(|_| not_found())?;
    let loaded = match load(&state.store, transfer_id, StreamKind::Transfer).await {
        Ok(loaded) => loaded,
        Err(CommandError::Rejected(AccountError::TransferNotFound)) => return Err(not_found().into()),
        Err(other) => return Err(other.into()),
    };
    match loaded.transfer() {
        Some(t) if loaded.version > 0 => Ok((transfer_id, t.from, t.to)),
        _ => Err(not_found().into()),
    }
}

#[utoipa::path(
    post,
    path = "/v1/transfers/{id}/post",
    tag = "transfers",
    security(("bearerAuth" = ["teller"])),
    summary = "Post a pending transfer: move all or part of the held amount",
    params(("id" = Uuid, Path, description = "The transfer's id (a UUID)."), ("Idempotency-Key" = String, Header, description = IDEMPOTENCY_KEY_REQUIRED)),
    request_body = PostRequest,
    responses(
        (status = 201, description = "Posted; the rest of the hold, if any, is released.", body = TransferResponse, headers(
            ("X-Consistency-Token" = String, description = "The transfer's `consistency_token`."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST_KEYED, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "`transfer-not-found`: no transfer with this id.", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "`concurrency-conflict`: the accounts kept changing while the server retried; retry after `Retry-After` seconds, or `transfer-exists`: this transfer id is taken.", body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`transfer-not-pending`, `hold-expired`, `amount-exceeds-hold`, `account-frozen` (source), `account-closed`, `invalid-amount`, `invalid-body`, `idempotency-key-reused`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn post_pending(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<PostRequest>,
) -> Result<Response, ApiError> {
    let idempotency = required_idempotency(&caller, &headers, uri.path(), &body)?;
    let amount: Option<AmountMinor> = body.amount.map(parse_amount).transpose()?;
    let (transfer_id, from, to) = parties(&state, &id).await?;
    let metadata = metadata(&caller, &headers, Some(&idempotency));
    let (command, respond_with) = post_command(transfer_id, from, to, amount);
    let outcome = state
        .writer
        .execute(command, &metadata, Some(idempotency), respond_with)
        .await?;
    Ok(respond(outcome, false))
}

#[utoipa::path(
    post,
    path = "/v1/transfers/{id}/void",
    tag = "transfers",
    security(("bearerAuth" = ["teller"])),
    summary = "Void a pending transfer: release its hold, move nothing",
    params(("id" = Uuid, Path, description = "The transfer's id (a UUID)."), ("Idempotency-Key" = String, Header, description = IDEMPOTENCY_KEY_REQUIRED)),
    request_body = VoidRequest,
    responses(
        (status = 201, description = "Voided.", body = TransferResponse, headers(
            ("X-Consistency-Token" = String, description = "The transfer's `consistency_token`."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST_KEYED, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "`transfer-not-found`: no transfer with this id.", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "`concurrency-conflict`: the accounts kept changing while the server retried; retry after `Retry-After` seconds, or `transfer-exists`: this transfer id is taken.", body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`transfer-not-pending`, `invalid-body`, `idempotency-key-reused`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn void(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<VoidRequest>,
) -> Result<Response, ApiError> {
    let idempotency = required_idempotency(&caller, &headers, uri.path(), &body)?;
    let (transfer_id, from, _) = parties(&state, &id).await?;
    let metadata = metadata(&caller, &headers, Some(&idempotency));
    let (command, respond_with) = void_command(transfer_id, from);
    let outcome = state
        .writer
        .execute(command, &metadata, Some(idempotency), respond_with)
        .await?;
    Ok(respond(outcome, false))
}
