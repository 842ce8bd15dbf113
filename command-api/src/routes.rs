//! HTTP routes of the command API. Bodies are parsed into domain types here, at the edge.
//!
//! Each handler carries its `#[utoipa::path]` annotation (statuses, problem codes, headers),
//! from which [`crate::openapi`] builds the document served at `GET /openapi.json`.

use axum::Router;
use axum::extract::{DefaultBodyLimit, OriginalUri, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tally_domain::{Account, AccountCommand, AmountMinor, Currency, Metadata};
use tally_event_store::idempotency::{IdempotencyKey, StoredResponse, request_hash};
use tally_service::auth::{Principal, Require, Teller};
use tally_service::token::ConsistencyToken;
use tally_service::{Json, Problem};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::command::Command;
use crate::error::ApiError;
use crate::execute::{Executed, Idempotency, Outcome, Touched};
use crate::writer::Respond;

/// The request header carrying a client's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Set to `true` on a response that repeats a stored one.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

/// Largest accepted request body. Commands are a few hundred bytes.
pub const REQUEST_BODY_MAX_BYTES: usize = 16 * 1024;
/// Longest accepted correlation id header, in bytes.
const CORRELATION_ID_LEN_MAX: usize = 128;

/// Every route of the command API. Serve it wrapped in [`tally_service::edge::protect`]
/// (see [`crate::app`]): its handlers expect the authentication the edge performs.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/accounts", post(open_account))
        .route("/v1/accounts/{id}/deposits", post(deposit))
        .route("/v1/accounts/{id}/withdrawals", post(withdraw))
        .route("/v1/accounts/{id}/freeze", post(freeze))
        .route("/v1/accounts/{id}/unfreeze", post(unfreeze))
        .route("/v1/accounts/{id}/close", post(close))
        .route("/v1/accounts/{id}/limits", post(change_limits))
        .route("/openapi.json", get(crate::openapi::serve))
        .route("/health", get(tally_service::problem::health))
        .route("/ready", get(ready))
        .merge(crate::transfers::routes())
        .merge(crate::entries::routes())
        .merge(crate::batches::routes())
        .fallback(tally_service::problem::fallback)
        .method_not_allowed_fallback(tally_service::problem::method_not_allowed)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_MAX_BYTES))
        .with_state(state)
}

/// The operations listener: `/metrics`, `/health` and `/ready` (`tally_service::probes`).
pub fn ops_router(state: AppState) -> Router {
    tally_service::probes::router(get(ready)).with_state(state)
}

/// `GET /ready`: 200 when the event store answers, else 503 (a load balancer stops routing here).
#[utoipa::path(
    get,
    path = "/ready",
    tag = "ops",
    summary = "Readiness: the event store answers",
    responses(
        (status = 200, description = "The event store is reachable.", body = String, content_type = "text/plain"),
        (status = 503, description = "`unavailable`: the event store is unreachable; `shutting-down`: the \
         instance is stopping (SIGTERM).", body = Problem,
         content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(state.store.pool()).await {
        Ok(_) => "ready".into_response(),
        Err(_) => Problem::unavailable(1)
            .detail("The event store is unreachable.")
            .into_response(),
    }
}

/// The body of `POST /v1/accounts`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    /// Who owns the account (1 to 200 characters).
    #[schema(example = "Ada")]
    pub owner: String,
    /// ISO 4217 code; the account holds only this currency.
    #[schema(schema_with = currency_schema)]
    pub currency: String,
    /// Minor units the account may go below zero; default 0.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub overdraft_limit: i64,
    /// A client-chosen id (UUID); a new UUIDv7 when absent.
    #[serde(default)]
    pub account_id: Option<Uuid>,
    /// The account's id in the client's own system: 1 to 128 visible ASCII characters,
    /// unique in the ledger and never reused (`409 external-id-taken` names the holder).
    #[serde(default)]
    #[schema(example = "cust-42/eur")]
    pub external_id: Option<String>,
    /// Up to 16 labels: keys of 1 to 64 `A-Z a-z 0-9 _ - .`, values up to 256 characters.
    /// The listing filters on them (`metadata.KEY=VALUE`).
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    #[schema(schema_with = crate::profile::flags_schema)]
    pub flags: Option<Vec<String>>,
}

/// The body of `POST /v1/accounts/{id}/deposits` and `/withdrawals`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostingRequest {
    /// Integer minor units (cents for EUR), > 0.
    #[schema(minimum = 1, example = 1000)]
    pub amount: i64,
    /// Free text for the statement (at most 200 characters).
    #[serde(default)]
    #[schema(example = "salary")]
    pub reference: String,
}

/// The body of `POST /v1/accounts/{id}/freeze`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    /// Why, for auditors (1 to 200 characters); stored in the `AccountFrozen` event.
    #[schema(example = "suspected fraud")]
    pub reason: String,
}

/// The body of `POST /v1/accounts/{id}/limits`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// How far below zero `available` may go, in minor units (0: no overdraft). Lowering it
    /// below what the account already uses (pending holds included) is refused.
    #[schema(minimum = 0, example = 5000)]
    pub overdraft_limit: i64,
}

/// The body of `POST /v1/accounts/{id}/unfreeze` and `/close`: nothing to say but the command
/// itself. Still a JSON object, so every command has one shape on the wire, unknown fields are
/// refused like everywhere else, and an optional field can be added later without breaking
/// clients.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[schema(description = "The body of `POST /v1/accounts/{id}/unfreeze` and `/close`: the empty object `{}`.")]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

/// Every accepted account command answers with where the stream now stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountCommandResponse {
    pub account_id: Uuid,
    /// The account stream's version after the command (1 after opening).
    pub version: i64,
    /// Global log position of the command's last event.
    pub position: i64,
    #[schema(example = "EUR")]
    pub currency: String,
    /// `open`, `frozen` or `closed`.
    #[schema(example = "open")]
    pub status: String,
    /// Minor units on the account.
    pub balance: i64,
    /// Minor units reserved by pending transfers.
    pub held: i64,
    /// `balance - held`: what a debit may use (plus the overdraft limit).
    pub available: i64,
    /// How far below zero `available` may go, in minor units.
    pub overdraft_limit: i64,
    /// The client's id for the account, if it gave one.
    pub external_id: Option<String>,
    /// The account's labels.
    pub metadata: BTreeMap<String, String>,
    /// Bounds on the balance: `debits_must_not_exceed_credits`, `credits_must_not_exceed_debits`.
    pub flags: Vec<String>,
    /// Pass as `X-Consistency-Token` to a read to see at least this write.
    pub consistency_token: String,
}

/// The schema of a currency a client sends: one of the ISO 4217 codes the domain accepts
/// (`Currency::iso_codes`), so clients and schemathesis see the allowed values.
pub(crate) fn currency_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .description(Some(
            "An ISO 4217 alphabetic code with a minor unit (e.g. `EUR`, `USD`, `JPY`); any other \
             value is refused with `422 invalid-currency`. Accounts opened before codes were checked \
             may hold other codes.",
        ))
        .enum_values(Some(Currency::iso_codes().iter().copied()))
        .examples(["EUR"])
        .build()
}

/// `text` as a currency, or `422 invalid-currency` with the refused value in `currency`.
pub(crate) fn parse_currency(text: &str) -> Result<Currency, Problem> {
    text.parse().map_err(|e: tally_domain::MoneyError| {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-currency", "Invalid currency")
            .detail(e.to_string())
            // Bodies allow long strings: echo no more than a code could be.
            .extension("currency", text.chars().take(16).collect::<String>())
    })
}

pub(crate) fn parse_amount(amount: i64) -> Result<AmountMinor, Problem> {
    AmountMinor::new(amount).map_err(|e| {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount", "Invalid amount").detail(e.to_string())
    })
}

fn parse_account_id(raw: &str) -> Result<Uuid, Problem> {
    Uuid::try_parse(raw).map_err(|_| Problem::not_found("account-not-found", "No account with this id."))
}

/// The request's idempotency key, if it sent one, scoped to its caller, with the hash of the
/// request it guards.
fn idempotency(
    caller: &Principal,
    headers: &HeaderMap,
    path: &str,
    body: &impl Serialize,
) -> Result<Option<Idempotency>, Problem> {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .and_then(|raw| IdempotencyKey::parse(&caller.subject, raw))
        .ok_or_else(|| {
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

/// The idempotency key a money-moving command must carry: without one, a client that retries
/// after a timeout could move the money twice.
pub(crate) fn required_idempotency(
    caller: &Principal,
    headers: &HeaderMap,
    path: &str,
    body: &impl Serialize,
) -> Result<Idempotency, Problem> {
    idempotency(caller, headers, path, body)?.ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "idempotency-key-required",
            "Idempotency-Key required",
        )
        .detail(
            "Money-moving commands need an Idempotency-Key header (1 to 255 visible ASCII characters, \
             e.g. a UUID); retry with the same key to get the first response back.",
        )
    })
}

/// Metadata from the request: the caller (its token's subject) as the actor, the correlation
/// id (the client's, or the one the edge made for the request) and the request's trace context.
pub(crate) fn metadata(caller: &Principal, headers: &HeaderMap, idempotency: Option<&Idempotency>) -> Metadata {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let correlation_id = header("x-correlation-id")
        .filter(|v| v.len() <= CORRELATION_ID_LEN_MAX)
        .and_then(|v| Uuid::try_parse(&v).ok())
        .unwrap_or_else(Uuid::now_v7);
    Metadata {
        actor: Some(caller.subject.clone()),
        correlation_id,
        // Each command is its own cause; events it emits all point at it.
        causation_id: Uuid::now_v7(),
        idempotency_key: idempotency.map(|i| i.key.as_str().to_owned()),
        // The request span's own context (a child of the client's `traceparent`, or a new
        // trace): whoever handles the events continues the trace of the request that wrote them.
        traceparent: tally_service::telemetry::traceparent(&tracing::Span::current())
            .or_else(|| header("traceparent").filter(|v| v.len() <= CORRELATION_ID_LEN_MAX)),
    }
}

impl AccountCommandResponse {
    /// Where account `touched` stands after a command.
    pub fn new(account: &Account, touched: &Touched) -> Self {
        let token = ConsistencyToken {
            stream_id: touched.stream_id,
            version: touched.version,
        };
        Self {
            account_id: touched.stream_id,
            version: touched.version,
            position: touched.position,
            currency: account.currency.map(String::from).unwrap_or_default(),
            status: account.status.as_str().to_owned(),
            balance: account.balance,
            overdraft_limit: account.overdraft_limit,
            held: account.held,
            available: account.available(),
            external_id: account.external_id.clone(),
            metadata: account.metadata.clone(),
            flags: crate::profile::flag_names(account),
            consistency_token: token.to_string(),
        }
    }
}

/// The body every accepted account command answers with.
fn accepted(account_id: Uuid, executed: &Executed) -> StoredResponse {
    let (account, touched) = executed.account(account_id);
    StoredResponse {
        status: StatusCode::CREATED.as_u16(),
        body: serde_json::to_value(AccountCommandResponse::new(account, touched)).expect("responses always serialize"),
    }
}

/// Runs an account command through the writer; an accepted one answers with [`accepted`].
async fn run(
    state: &AppState,
    account_id: Uuid,
    command: AccountCommand,
    metadata: &Metadata,
    idempotency: Option<Idempotency>,
) -> Result<Outcome, ApiError> {
    let respond = move |executed: &Executed| accepted(account_id, executed);
    let command = Command::Account { account_id, command };
    Ok(state.writer.execute(command, metadata, idempotency, respond).await?)
}

/// Sends a fresh or replayed response, with its consistency token (and `Location` for a new
/// account) as headers.
pub(crate) fn respond(outcome: Outcome, location: bool) -> Response {
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
    let problem = status.is_client_error() || status.is_server_error();
    let mut response = (status, axum::Json(stored.body)).into_response();
    let headers = response.headers_mut();
    if problem {
        // A stored refusal, replayed.
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
    }
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

#[utoipa::path(
    post,
    path = "/v1/accounts",
    tag = "accounts",
    security(("bearerAuth" = ["teller"])),
    summary = "Open an account",
    params(("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_KEY_OPTIONAL)),
    request_body = OpenAccountRequest,
    responses(
        (status = 201, description = "Opened.", body = AccountCommandResponse, headers(
            ("Location" = String, description = "`/v1/accounts/{id}` of the new account."),
            ("X-Consistency-Token" = String, description = "The `consistency_token` of the body."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST, body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = "`account-exists`: the `account_id` is taken; `external-id-taken` (with the \
            holder's `account_id`); `concurrency-conflict`.",
         body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`invalid-body`, `invalid-currency`, `invalid-owner`, \
            `invalid-overdraft-limit`, `invalid-external-id`, `invalid-metadata`, `invalid-flags`, \
            `idempotency-key-reused`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn open_account(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<OpenAccountRequest>,
) -> Result<Response, ApiError> {
    let idempotency = idempotency(&caller, &headers, uri.path(), &body)?;
    let currency = parse_currency(&body.currency)?;
    let profile = crate::profile::requested(body.external_id, body.metadata, body.flags)?;
    let account_id = body.account_id.unwrap_or_else(Uuid::now_v7);
    let metadata = metadata(&caller, &headers, idempotency.as_ref());
    let command = AccountCommand::Open {
        account_id,
        owner: body.owner,
        currency,
        overdraft_limit: body.overdraft_limit,
        profile,
    };
    let outcome = run(&state, account_id, command, &metadata, idempotency).await?;
    Ok(respond(outcome, true))
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/deposits",
    tag = "accounts",
    security(("bearerAuth" = ["teller"])),
    summary = "Deposit money from outside the ledger",
    params(("id" = Uuid, Path, description = ACCOUNT_ID), ("Idempotency-Key" = String, Header, description = IDEMPOTENCY_KEY_REQUIRED)),
    request_body = PostingRequest,
    responses(
        (status = 201, description = "Deposited.", body = AccountCommandResponse, headers(
            ("X-Consistency-Token" = String, description = "The `consistency_token` of the body."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST_KEYED, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = NOT_FOUND, body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = CONFLICT, body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`invalid-body`, `invalid-amount`, `invalid-reference`, \
            `balance-overflow`, `account-closed`, `idempotency-key-reused`. A frozen account accepts deposits.",
         body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn deposit(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<PostingRequest>,
) -> Result<Response, ApiError> {
    posting(state, &caller, &id, uri.path(), headers, body, |amount, reference| {
        AccountCommand::Deposit { amount, reference }
    })
    .await
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/withdrawals",
    tag = "accounts",
    security(("bearerAuth" = ["teller"])),
    summary = "Withdraw money out of the ledger",
    params(("id" = Uuid, Path, description = ACCOUNT_ID), ("Idempotency-Key" = String, Header, description = IDEMPOTENCY_KEY_REQUIRED)),
    request_body = PostingRequest,
    responses(
        (status = 201, description = "Withdrawn.", body = AccountCommandResponse, headers(
            ("X-Consistency-Token" = String, description = "The `consistency_token` of the body."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST_KEYED, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = NOT_FOUND, body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = CONFLICT, body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`insufficient-funds` (with `available` and `requested`), \
            `account-frozen`, `account-closed`, `invalid-body`, `invalid-amount`, `invalid-reference`, \
            `balance-overflow`, `idempotency-key-reused`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn withdraw(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<PostingRequest>,
) -> Result<Response, ApiError> {
    posting(state, &caller, &id, uri.path(), headers, body, |amount, reference| {
        AccountCommand::Withdraw { amount, reference }
    })
    .await
}

/// Deposits and withdrawals differ only in the command they build.
async fn posting(
    state: AppState,
    caller: &Principal,
    id: &str,
    path: &str,
    headers: HeaderMap,
    body: PostingRequest,
    command: impl FnOnce(AmountMinor, String) -> AccountCommand,
) -> Result<Response, ApiError> {
    let account_id = parse_account_id(id)?;
    run_keyed(&state, caller, &headers, path, body, |body| {
        posting_command(account_id, body, command)
    })
    .await
}

/// Runs the money-moving command `build` makes of `body`, under the request's required
/// Idempotency-Key (checked first, on the body as sent), and answers as the single routes do.
pub(crate) async fn run_keyed<B: Serialize>(
    state: &AppState,
    caller: &Principal,
    headers: &HeaderMap,
    path: &str,
    body: B,
    build: impl FnOnce(B) -> Result<(Command, Respond), Problem>,
) -> Result<Response, ApiError> {
    let idempotency = required_idempotency(caller, headers, path, &body)?;
    let (command, respond_with) = build(body)?;
    let metadata = metadata(caller, headers, Some(&idempotency));
    let outcome = state
        .writer
        .execute(command, &metadata, Some(idempotency), respond_with)
        .await?;
    Ok(respond(outcome, false))
}

/// The deposit or withdrawal (`command`) of `body` on `account_id` and the answer it gets once
/// accepted (also a batch's `deposit` and `withdrawal` items).
pub(crate) fn posting_command(
    account_id: Uuid,
    body: PostingRequest,
    command: impl FnOnce(AmountMinor, String) -> AccountCommand,
) -> Result<(Command, Respond), Problem> {
    let command = command(parse_amount(body.amount)?, body.reference);
    Ok((
        Command::Account { account_id, command },
        Box::new(move |executed: &Executed| accepted(account_id, executed)),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/freeze",
    tag = "accounts",
    security(("bearerAuth" = ["teller"])),
    summary = "Freeze an account: it refuses debits until unfrozen but still accepts credits",
    params(("id" = Uuid, Path, description = ACCOUNT_ID), ("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_KEY_OPTIONAL)),
    request_body = FreezeRequest,
    responses(
        (status = 201, description = "Frozen.", body = AccountCommandResponse, headers(
            ("X-Consistency-Token" = String, description = "The `consistency_token` of the body."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = NOT_FOUND, body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = CONFLICT, body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`account-frozen` (already frozen), `account-closed`, `invalid-reason`, \
            `invalid-body`, `idempotency-key-reused`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn freeze(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<FreezeRequest>,
) -> Result<Response, ApiError> {
    let command = AccountCommand::Freeze {
        reason: body.reason.clone(),
    };
    bare_command(state, &caller, &id, uri.path(), headers, &body, command).await
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/unfreeze",
    tag = "accounts",
    security(("bearerAuth" = ["teller"])),
    summary = "Unfreeze a frozen account: debits are accepted again",
    params(("id" = Uuid, Path, description = ACCOUNT_ID), ("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_KEY_OPTIONAL)),
    request_body = EmptyRequest,
    responses(
        (status = 201, description = "Unfrozen.", body = AccountCommandResponse, headers(
            ("X-Consistency-Token" = String, description = "The `consistency_token` of the body."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = NOT_FOUND, body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = CONFLICT, body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`account-not-frozen`, `account-closed`, `invalid-body`, \
            `idempotency-key-reused`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn unfreeze(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<EmptyRequest>,
) -> Result<Response, ApiError> {
    bare_command(
        state,
        &caller,
        &id,
        uri.path(),
        headers,
        &body,
        AccountCommand::Unfreeze,
    )
    .await
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/close",
    tag = "accounts",
    security(("bearerAuth" = ["teller"])),
    summary = "Close an account at a zero balance with no holds; final",
    params(("id" = Uuid, Path, description = ACCOUNT_ID), ("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_KEY_OPTIONAL)),
    request_body = EmptyRequest,
    responses(
        (status = 201, description = "Closed.", body = AccountCommandResponse, headers(
            ("X-Consistency-Token" = String, description = "The `consistency_token` of the body."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = NOT_FOUND, body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = CONFLICT, body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`balance-not-zero` (with `balance`), `holds-outstanding` (with `held`), \
            `account-closed`, `invalid-body`, `idempotency-key-reused`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn close(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<EmptyRequest>,
) -> Result<Response, ApiError> {
    bare_command(state, &caller, &id, uri.path(), headers, &body, AccountCommand::Close).await
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{id}/limits",
    tag = "accounts",
    security(("bearerAuth" = ["teller"])),
    summary = "Change an account's overdraft limit, checked against its balance and pending holds",
    params(("id" = Uuid, Path, description = ACCOUNT_ID), ("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_KEY_OPTIONAL)),
    request_body = LimitsRequest,
    responses(
        (status = 201, description = "Changed.", body = AccountCommandResponse, headers(
            ("X-Consistency-Token" = String, description = "The `consistency_token` of the body."),
            ("Idempotent-Replayed" = String, description = "`true` when this repeats the response stored under the Idempotency-Key."),
        )),
        (status = 400, description = BAD_REQUEST, body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = NOT_FOUND, body = Problem, content_type = PROBLEM_JSON),
        (status = 409, description = CONFLICT, body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = PAYLOAD_TOO_LARGE, body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = UNSUPPORTED_MEDIA_TYPE, body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`limit-below-usage` (with `available` and `overdraft_limit`): the account \
            already uses more than the new limit, pending holds included; `invalid-overdraft-limit`, \
            `account-closed`, `invalid-body`, `idempotency-key-reused`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 500, description = INTERNAL, body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = UNAVAILABLE, body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn change_limits(
    Require { caller, .. }: Require<Teller>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Json(body): Json<LimitsRequest>,
) -> Result<Response, ApiError> {
    let command = AccountCommand::ChangeLimit {
        overdraft_limit: body.overdraft_limit,
    };
    bare_command(state, &caller, &id, uri.path(), headers, &body, command).await
}

/// Freeze, unfreeze, close and limit changes: commands that move no money, so their key stays
/// optional (repeating one is refused by the account's rules or changes nothing). `body` is
/// what the key's fingerprint covers.
async fn bare_command<B: Serialize>(
    state: AppState,
    caller: &Principal,
    id: &str,
    path: &str,
    headers: HeaderMap,
    body: &B,
    command: AccountCommand,
) -> Result<Response, ApiError> {
    let account_id = parse_account_id(id)?;
    let idempotency = idempotency(caller, &headers, path, body)?;
    let metadata = metadata(caller, &headers, idempotency.as_ref());
    let outcome = run(&state, account_id, command, &metadata, idempotency).await?;
    Ok(respond(outcome, false))
}

// Texts shared by the handlers' OpenAPI annotations (and available to other route modules),
// so one wording serves every route.

/// Content type of every error response.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";
const ACCOUNT_ID: &str = "The account's id (a UUID).";
pub(crate) const IDEMPOTENCY_KEY_REQUIRED: &str = "Required: 1 to 255 visible ASCII characters unique to this \
    operation (e.g. a UUID). A retry with the same key and request returns the first response \
    (`Idempotent-Replayed: true`) and takes effect once; the same key with another request is \
    `422 idempotency-key-reused`.";
pub(crate) const IDEMPOTENCY_KEY_OPTIONAL: &str = "Optional: 1 to 255 visible ASCII characters unique to this \
    operation. A retry with the same key and request returns the first response (`Idempotent-Replayed: true`) \
    and takes effect once; the same key with another request is `422 idempotency-key-reused`.";
pub(crate) const BAD_REQUEST: &str = "`malformed-json`, `invalid-idempotency-key`.";
pub(crate) const BAD_REQUEST_KEYED: &str = "`idempotency-key-required`: no Idempotency-Key header; \
    `invalid-idempotency-key`; `malformed-json`.";
const NOT_FOUND: &str = "`account-not-found`: no account with this id.";
pub(crate) const CONFLICT: &str = "`concurrency-conflict`: the account kept changing while the server retried; \
    retry after `Retry-After` seconds.";
pub(crate) const PAYLOAD_TOO_LARGE: &str = "`payload-too-large`: the body is over 16 KiB.";
pub(crate) const UNSUPPORTED_MEDIA_TYPE: &str = "`unsupported-media-type`: send `Content-Type: application/json`.";
pub(crate) const INTERNAL: &str =
    "`internal`: a fault on the server's side; the body says nothing internal, the cause is logged.";
pub(crate) const UNAVAILABLE: &str = "`database-unavailable`: the event store's database is unreachable or \
    failing over; `unavailable`: too many commands are waiting, or the server is stopping. Retry after \
    `Retry-After` seconds, with the same Idempotency-Key.";
