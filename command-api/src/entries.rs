//! `POST /v1/entries`: a journal entry, a balanced movement with 2 to 64 legs (ADR 0004). One
//! command over every leg's account stream and the entry's own stream, appended atomically by
//! the writer: all legs or none.

use axum::Router;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_domain::entry::{Direction, LEGS_MAX, LEGS_MIN};
use tally_domain::transfer::EXPIRES_IN_S_MAX;
use tally_domain::{AccountError, EntryCommand, EntryMode as DomainMode, EntryStatus, LegRequest, journal};
use tally_event_store::idempotency::StoredResponse;
use tally_service::auth::{Principal, Require, Teller};
use tally_service::token::ConsistencyToken;
use tally_service::{Json, Problem};
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::command::{Command, EntryAction};
use crate::error::{ApiError, rejection};
use crate::execute::{CommandError, Executed, StreamKind, load};
use crate::routes::{
    BAD_REQUEST_KEYED, IDEMPOTENCY_KEY_REQUIRED, INTERNAL, PAYLOAD_TOO_LARGE, PROBLEM_JSON, UNAVAILABLE,
    UNSUPPORTED_MEDIA_TYPE, metadata, parse_amount, required_idempotency, respond, run_keyed,
};
use crate::transfers::DEFAULT_EXPIRES_IN_S;
use crate::writer::Respond;

/// The entry routes' part of the OpenAPI document (merged in [`crate::openapi::document`]).
#[derive(OpenApi)]
#[openapi(
    paths(create, post_pending, void),
    components(schemas(EntryMode, LegDirection, LegBody, EntryRequest, FinishRequest, EntryLegResponse, EntryResponse)),
    tags((name = "entries", description = "Journal entries: balanced movements with many legs, all or nothing."))
)]
pub struct EntriesApi;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/entries", post(create))
        .route("/v1/entries/{id}/post", post(post_pending))
        .route("/v1/entries/{id}/void", post(void))
}

/// `immediate` books every leg now; `pending` holds every debit leg's amount on its account
/// until the whole entry is posted, voided or expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryMode {
    Immediate,
    Pending,
}

/// `debit` takes money out of the account (its balance goes down); `credit` puts it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LegDirection {
    Debit,
    Credit,
}

impl From<LegDirection> for Direction {
    fn from(d: LegDirection) -> Self {
        match d {
            LegDirection::Debit => Direction::Debit,
            LegDirection::Credit => Direction::Credit,
        }
    }
}

/// One leg of `POST /v1/entries`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LegBody {
    pub account: Uuid,
    pub direction: LegDirection,
    /// Integer minor units of the account's currency, > 0.
    pub amount: i64,
}

/// `POST /v1/entries`
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryRequest {
    /// A client-chosen id (UUID), usable once; a new UUIDv7 when absent.
    #[serde(default)]
    pub entry_id: Option<Uuid>,
    pub mode: EntryMode,
    /// Pending only: seconds until the holds expire (1 to 30 days; default 7 days).
    #[serde(default)]
    pub expires_in_s: Option<i64>,
    #[serde(default)]
    pub reference: String,
    /// 2 to 64 legs, each account in one leg only. For each currency, the debits must equal
    /// the credits.
    pub legs: Vec<LegBody>,
}

/// `POST /v1/entries/{id}/post` and `/void`: the whole entry, so nothing to say.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {}

/// One leg of an accepted entry, with its account after the entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntryLegResponse {
    pub account: Uuid,
    /// `debit` or `credit`.
    pub direction: &'static str,
    pub amount: i64,
    #[schema(example = "EUR")]
    pub currency: String,
    /// The account's balance after the entry, in minor units.
    pub balance: i64,
    pub held: i64,
    pub available: i64,
    /// The account stream's version after the entry.
    pub version: i64,
    /// Read-your-writes token for this account.
    pub consistency_token: String,
}

/// Every accepted entry answers with its legs and their accounts after it.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntryResponse {
    pub entry_id: Uuid,
    /// `completed`, `pending`, `posted`, `voided` or `expired`.
    pub status: &'static str,
    pub reference: String,
    /// A pending entry's deadline.
    pub expires_at: Option<DateTime<Utc>>,
    pub legs: Vec<EntryLegResponse>,
    /// The entry stream's version.
    pub version: i64,
    /// Global log position of the entry's own event (its legs' events sit just before it).
    pub position: i64,
    /// Read-your-writes token for the entry (`GET /v1/entries/{id}` on the query API).
    pub consistency_token: String,
}

/// The response of an accepted entry.
fn accepted(entry_id: Uuid, executed: &Executed) -> StoredResponse {
    let (entry, touched) = executed.entry(entry_id);
    let legs = entry
        .legs
        .iter()
        .map(|leg| {
            let (account, at) = executed.account(leg.account);
            EntryLegResponse {
                account: leg.account,
                direction: leg.direction.as_str(),
                amount: leg.amount.get(),
                currency: leg.currency.to_string(),
                balance: account.balance,
                held: account.held,
                available: account.available(),
                version: at.version,
                consistency_token: ConsistencyToken {
                    stream_id: leg.account,
                    version: at.version,
                }
                .to_string(),
            }
        })
        .collect();
    let body = EntryResponse {
        entry_id,
        status: entry.status.as_str(),
        reference: entry.reference.clone(),
        expires_at: entry.expires_at,
        legs,
        version: touched.version,
        position: touched.position,
        consistency_token: ConsistencyToken {
            stream_id: entry_id,
            version: touched.version,
        }
        .to_string(),
    };
    StoredResponse {
        status: StatusCode::CREATED.as_u16(),
        body: serde_json::to_value(body).expect("responses always serialize"),
    }
}

#[utoipa::path(
    post,
    path = "/v1/entries",
    tag = "entries",
    security(("bearerAuth" = ["teller"])),
    summary = "Book a balanced journal entry of 2 to 64 legs, all legs or none",
    params(("Idempotency-Key" = String, Header, description = IDEMPOTENCY_KEY_REQUIRED)),
    request_body = EntryRequest,
    responses(
        (status = 201, description = "Booked (immediate) or held (pending): every leg, with its account after the entry.", body = EntryResponse, headers(
            ("X-Consistency-Token" = String, description = "The entry's `consistency_token`."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST_KEYED, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "`account-not-found` with `leg`: that leg's account does not exist.", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "`concurrency-conflict`: the accounts kept changing while the server retried; retry after `Retry-After` seconds, or `entry-exists`: this entry id is taken.", body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`entry-unbalanced` (with `currency`, `debits`, `credits`), `invalid-legs`, `invalid-expiry`, `invalid-reference`, `invalid-body`, `idempotency-key-reused`; a refused leg carries `leg` (its index) with its own code: `account-repeated`, `insufficient-funds`, `account-frozen`, `account-closed`, `invalid-amount`, `debits-exceed-credits`, `credits-exceed-debits`, `balance-overflow`, `too-many-holds`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn create(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<EntryRequest>,
) -> Result<Response, ApiError> {
    run_keyed(&state, &caller, &headers, uri.path(), body, entry_command).await
}

/// The command of a `POST /v1/entries` body and the answer it gets once accepted (also a
/// batch's `entry` item).
pub(crate) fn entry_command(body: EntryRequest) -> Result<(Command, Respond), Problem> {
    let mode = match (body.mode, body.expires_in_s) {
        (EntryMode::Immediate, None) => DomainMode::Immediate,
        (EntryMode::Immediate, Some(_)) => {
            return Err(
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-expiry", "Invalid expiry")
                    .detail("expires_in_s applies to pending entries only."),
            );
        }
        (EntryMode::Pending, expires_in_s) => DomainMode::Pending {
            expires_in_s: expires_in_s.unwrap_or(DEFAULT_EXPIRES_IN_S.min(EXPIRES_IN_S_MAX)),
        },
    };
    if !(LEGS_MIN..=LEGS_MAX).contains(&body.legs.len()) {
        return Err(rejection(&AccountError::InvalidLegs { legs: body.legs.len() }));
    }
    let mut legs = Vec::with_capacity(body.legs.len());
    for (i, leg) in body.legs.iter().enumerate() {
        let amount = parse_amount(leg.amount).map_err(|problem| problem.extension("leg", i as i64))?;
        legs.push(LegRequest {
            account: leg.account,
            direction: leg.direction.into(),
            amount,
        });
    }
    // Before queueing: the writer locks each leg's stream once, so an account named twice is
    // refused here.
    journal::check_legs(&legs).map_err(|e| rejection(&e))?;
    let entry_id = body.entry_id.unwrap_or_else(Uuid::now_v7);
    let command = Command::Entry(EntryCommand {
        entry_id,
        legs,
        reference: body.reference,
        mode,
    });
    Ok((
        command,
        Box::new(move |executed: &Executed| accepted(entry_id, executed)),
    ))
}

/// Posting or voiding pending entry `entry_id`, whose legs' accounts are `accounts` in leg
/// order (also a batch's `post` and `void` items).
pub(crate) fn finish_command(entry_id: Uuid, accounts: Vec<Uuid>, action: EntryAction) -> (Command, Respond) {
    let command = Command::FinishEntry {
        entry_id,
        accounts,
        action,
    };
    (
        command,
        Box::new(move |executed: &Executed| accepted(entry_id, executed)),
    )
}

/// The legs' accounts of entry `raw_id`, in leg order, read from its stream (they never
/// change); 404 when there is no such entry.
async fn legs_of(state: &AppState, raw_id: &str) -> Result<(Uuid, Vec<Uuid>), ApiError> {
    let not_found = || Problem::not_found("entry-not-found", "No entry with this id.");
    let entry_id = Uuid::try_parse(raw_id).map_err(|_| not_found())?;
    let loaded = match load(&state.store, entry_id, StreamKind::Entry).await {
        Ok(loaded) => loaded,
        // Another kind of stream under this id.
        Err(CommandError::Rejected(AccountError::EntryExists { .. })) => return Err(not_found().into()),
        Err(other) => return Err(other.into()),
    };
    match loaded.entry() {
        Some(entry) if entry.status != EntryStatus::NotCreated => {
            Ok((entry_id, entry.legs.iter().map(|leg| leg.account).collect()))
        }
        _ => Err(not_found().into()),
    }
}

/// Posts or voids entry `raw_id` through the writer.
async fn finish(
    state: &AppState,
    caller: &Principal,
    path: &str,
    headers: &HeaderMap,
    raw_id: &str,
    body: &FinishRequest,
    action: EntryAction,
) -> Result<Response, ApiError> {
    let idempotency = required_idempotency(caller, headers, path, body)?;
    let (entry_id, accounts) = legs_of(state, raw_id).await?;
    let metadata = metadata(caller, headers, Some(&idempotency));
    let (command, respond_with) = finish_command(entry_id, accounts, action);
    let outcome = state
        .writer
        .execute(command, &metadata, Some(idempotency), respond_with)
        .await?;
    Ok(respond(outcome, false))
}

#[utoipa::path(
    post,
    path = "/v1/entries/{id}/post",
    tag = "entries",
    security(("bearerAuth" = ["teller"])),
    summary = "Post a pending entry: every leg moves, the holds become debits",
    params(("id" = Uuid, Path, description = "The entry's id (a UUID)."), ("Idempotency-Key" = String, Header, description = IDEMPOTENCY_KEY_REQUIRED)),
    request_body = FinishRequest,
    responses(
        (status = 201, description = "Posted.", body = EntryResponse),
        (status = 400, description = BAD_REQUEST_KEYED, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "`entry-not-found`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "`concurrency-conflict`; retry after `Retry-After` seconds.", body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`entry-not-pending` (with `entry_status`), `hold-expired`, `invalid-body`, `idempotency-key-reused`; a refused credit leg carries `leg` with its own code (`account-closed`, `credits-exceed-debits`, `balance-overflow`).", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn post_pending(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<FinishRequest>,
) -> Result<Response, ApiError> {
    finish(&state, &caller, uri.path(), &headers, &id, &body, EntryAction::Post).await
}

#[utoipa::path(
    post,
    path = "/v1/entries/{id}/void",
    tag = "entries",
    security(("bearerAuth" = ["teller"])),
    summary = "Void a pending entry: every hold is released, nothing moves",
    params(("id" = Uuid, Path, description = "The entry's id (a UUID)."), ("Idempotency-Key" = String, Header, description = IDEMPOTENCY_KEY_REQUIRED)),
    request_body = FinishRequest,
    responses(
        (status = 201, description = "Voided.", body = EntryResponse),
        (status = 400, description = BAD_REQUEST_KEYED, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "`entry-not-found`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "`concurrency-conflict`; retry after `Retry-After` seconds.", body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`entry-not-pending` (with `entry_status`), `invalid-body`, `idempotency-key-reused`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn void(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<FinishRequest>,
) -> Result<Response, ApiError> {
    finish(&state, &caller, uri.path(), &headers, &id, &body, EntryAction::Void).await
}
