//! Audit reads: the event store itself (via a replica), for people who check the books rather
//! than read them. A stream's full history, the global feed in commit order, and an account's
//! state as of a time or version, folded from the log by the domain's own aggregate.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::PgPool;
use tally_domain::Account;
use tally_event_store::{Checkpoint, EventStore, READ_LIMIT_MAX, StoredEvent};
use tally_service::Problem;
use tally_service::auth::{Auditor, Require};
use tally_service::errors::ErrorReport;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::consistency;
use crate::routes::{PROBLEM_JSON, Params, invalid_parameter, page_limit, path_id, unavailable_because};

/// Events per audit page when the client does not say.
pub const AUDIT_LIMIT_DEFAULT: i64 = 100;
/// The most events one audit page holds.
pub const AUDIT_LIMIT_MAX: i64 = 1_000;

/// An event exactly as stored: its place in the log, its hash-chain link and its payload and
/// metadata as the bytes that were hashed.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEvent {
    /// Global position (unique; commit order is `checkpoint` order, not position order).
    pub position: i64,
    /// Where this event is in commit order: pass as `after` to `/v1/audit/events` to resume
    /// after it.
    #[schema(example = "74531.1042")]
    pub checkpoint: String,
    #[schema(example = "account")]
    pub stream_type: String,
    pub stream_id: Uuid,
    pub version: i64,
    pub event_id: Uuid,
    #[schema(example = "FundsDeposited")]
    pub event_type: String,
    pub schema_version: i32,
    /// The payload, byte for byte as stored (its schema: `events/<event_type>.v<schema_version>.json`).
    #[schema(value_type = Object)]
    pub payload: Box<RawValue>,
    /// Actor, correlation and causation ids, idempotency key, trace context.
    #[schema(value_type = Object)]
    pub metadata: Box<RawValue>,
    pub recorded_at: DateTime<Utc>,
    /// Hex SHA-256 of the previous event of the stream; absent on version 1.
    pub prev_hash: Option<String>,
    /// Hex SHA-256 chaining this event to `prev_hash` (see HASH_CHAIN.md).
    pub hash: String,
}

/// `tx_id.position`, the text form of a place in commit order.
pub fn checkpoint_text(checkpoint: Checkpoint) -> String {
    format!("{}.{}", checkpoint.tx_id, checkpoint.position)
}

/// The inverse of [`checkpoint_text`].
pub fn parse_checkpoint(text: &str) -> Option<Checkpoint> {
    let (tx_id, position) = text.split_once('.')?;
    let checkpoint = Checkpoint {
        tx_id: tx_id.parse().ok()?,
        position: position.parse().ok()?,
    };
    (checkpoint.tx_id >= 0 && checkpoint.position >= 0).then_some(checkpoint)
}

impl AuditEvent {
    fn from_stored(event: StoredEvent) -> Result<Self, Response> {
        let raw = |text: String| RawValue::from_string(text).map_err(|e| corrupt(e.to_string()));
        Ok(Self {
            position: event.position,
            checkpoint: checkpoint_text(event.checkpoint()),
            stream_type: event.stream_type,
            stream_id: event.stream_id,
            version: event.version,
            event_id: event.event_id,
            event_type: event.event_type,
            schema_version: event.schema_version,
            payload: raw(event.payload)?,
            metadata: raw(event.metadata)?,
            recorded_at: event.recorded_at,
            prev_hash: event.prev_hash.map(hex::encode),
            hash: hex::encode(event.hash),
        })
    }
}

/// Stored data Tally cannot read: a 500 whose cause is logged, not sent.
pub(crate) fn corrupt(cause: String) -> Response {
    let mut response = Problem::internal().into_response();
    response.extensions_mut().insert(ErrorReport(cause));
    response
}

pub(crate) fn store_unavailable(error: tally_event_store::StoreError) -> Response {
    unavailable_because(error.to_string())
}

/// The source to read the log from: any, or with a token one whose copy has its event.
pub(crate) async fn log_source(
    state: &AppState,
    headers: &HeaderMap,
    consistent_with: Option<&str>,
) -> Result<PgPool, Response> {
    match consistency::requested(headers, consistent_with)? {
        None => Ok(state.sources.pick().0.clone()),
        Some(token) => {
            consistency::wait_until(state, &token, || async move {
                let (pool, _) = state.sources.pick();
                Ok(consistency::log_has(pool, &token).await?.then(|| pool.clone()))
            })
            .await
        }
    }
}

/// Paging of a stream's history.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamEventsQuery {
    /// Only versions after this one (the `next_after` of the previous page); default 0.
    pub after: Option<i64>,
    /// Events per page, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// A command response's consistency token (or send `X-Consistency-Token`).
    pub consistent_with: Option<String>,
}

/// One page of a stream's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamHistory {
    pub stream_id: Uuid,
    /// In version order.
    pub events: Vec<AuditEvent>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/v1/audit/streams/{stream_id}/events",
    tag = "audit",
    security(("bearerAuth" = ["auditor"])),
    summary = "A stream's full history from the event store: versions, hashes, metadata, payloads",
    params(
        ("stream_id" = Uuid, Path, description = "An account's or a transfer's id."),
        ("X-Consistency-Token" = Option<String>, Header, description = "Wait until the log has that write."),
        StreamEventsQuery,
    ),
    responses(
        (status = 200, description = "One page of the stream's events.", body = StreamHistory),
        (status = 400, description = "`invalid-parameter` or `invalid-consistency-token`.", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 404, description = "`stream-not-found`: no event has this stream id.", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 422, description = "`limit-out-of-range`; `unknown-consistency-token`: the token names no write \
            in the log.", body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = "`database-unavailable` or `not-yet-consistent`; retry after `Retry-After` seconds.",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_stream_events(
    _: Require<Auditor>,
    State(state): State<AppState>,
    Path(stream_id): Path<String>,
    headers: HeaderMap,
    Params(query): Params<StreamEventsQuery>,
) -> Response {
    let read = async {
        let limit = page_limit(query.limit, AUDIT_LIMIT_DEFAULT, AUDIT_LIMIT_MAX)?;
        let after = query.after.unwrap_or(0);
        if after < 0 {
            return Err(invalid_parameter("after must be a version, 0 or more."));
        }
        let stream_id = path_id(&stream_id, "stream-not-found", "stream")?;
        let pool = log_source(&state, &headers, query.consistent_with.as_deref()).await?;
        let mut events = EventStore::new(pool)
            .read_stream(stream_id, after, limit + 1)
            .await
            .map_err(store_unavailable)?;
        if events.is_empty() && after == 0 {
            return Err(Problem::not_found("stream-not-found", "No event has this stream id.").into_response());
        }
        let more = events.len() as i64 > limit;
        events.truncate(limit as usize);
        let next_after = more.then(|| events.last().map_or(after, |e| e.version));
        Ok(StreamHistory {
            stream_id,
            events: events
                .into_iter()
                .map(AuditEvent::from_stored)
                .collect::<Result<_, _>>()?,
            next_after,
        })
    };
    match read.await {
        Ok(history) => Json(history).into_response(),
        Err(response) => response,
    }
}

/// Where to resume the global feed.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FeedQuery {
    /// The `checkpoint` of the previous page (or of any event); from the start of the log when
    /// absent.
    pub after: Option<String>,
    /// Events per page, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// A command response's consistency token (or send `X-Consistency-Token`).
    pub consistent_with: Option<String>,
}

/// One page of the global feed.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedPage {
    /// In commit order.
    pub events: Vec<AuditEvent>,
    /// Resume here (`after=`): the last event's checkpoint, or the one asked for when the page
    /// is empty. Feeds never skip: an event committed later always sorts after it.
    #[schema(example = "74531.1042")]
    pub checkpoint: String,
    /// The highest position in the log when this page was read: how far the feed goes now,
    /// for progress estimates (positions are nearly dense; commit order is not position order).
    pub head_position: i64,
}

#[utoipa::path(
    get,
    path = "/v1/audit/events",
    tag = "audit",
    security(("bearerAuth" = ["auditor"])),
    summary = "The global feed: every event in commit order, gap-safe, resumable from a checkpoint",
    params(
        ("X-Consistency-Token" = Option<String>, Header, description = "Wait until the log has that write."),
        FeedQuery,
    ),
    responses(
        (status = 200, description = "One page of the feed.", body = FeedPage),
        (status = 400, description = "`invalid-parameter` (a malformed checkpoint) or `invalid-consistency-token`.",
         body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`limit-out-of-range`; `unknown-consistency-token`: the token names no write \
            in the log.", body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = "`database-unavailable` or `not-yet-consistent`; retry after `Retry-After` seconds.",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_feed(
    _: Require<Auditor>,
    State(state): State<AppState>,
    headers: HeaderMap,
    Params(query): Params<FeedQuery>,
) -> Response {
    let read = async {
        let limit = page_limit(query.limit, AUDIT_LIMIT_DEFAULT, AUDIT_LIMIT_MAX)?;
        let after = match query.after.as_deref() {
            None => Checkpoint::default(),
            Some(text) => parse_checkpoint(text)
                .ok_or_else(|| invalid_parameter("after must be a checkpoint from this feed (`<tx>.<position>`)."))?,
        };
        let pool = log_source(&state, &headers, query.consistent_with.as_deref()).await?;
        let head_position: i64 = sqlx::query_scalar("SELECT COALESCE(max(position), 0) FROM events")
            .fetch_one(&pool)
            .await
            .map_err(|e| unavailable_because(e.to_string()))?;
        let events = EventStore::new(pool)
            .read_all(after, limit)
            .await
            .map_err(store_unavailable)?;
        let checkpoint = events.last().map_or(after, StoredEvent::checkpoint);
        Ok(FeedPage {
            head_position,
            events: events
                .into_iter()
                .map(AuditEvent::from_stored)
                .collect::<Result<_, _>>()?,
            checkpoint: checkpoint_text(checkpoint),
        })
    };
    match read.await {
        Ok(page) => Json(page).into_response(),
        Err(response) => response,
    }
}

/// The point in an account's history to rebuild: exactly one of `at` and `version`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AsOfQuery {
    /// Every event recorded at or before this instant (RFC 3339).
    pub at: Option<DateTime<Utc>>,
    /// Every event up to and including this version.
    pub version: Option<i64>,
    /// A command response's consistency token (or send `X-Consistency-Token`).
    pub consistent_with: Option<String>,
}

/// An account as it stood at a point of its history, folded from the log.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountAsOf {
    pub account_id: Uuid,
    /// The last version folded in.
    pub version: i64,
    /// When that version was recorded.
    pub recorded_at: DateTime<Utc>,
    pub owner: String,
    #[schema(example = "EUR")]
    pub currency: String,
    pub balance: i64,
    pub held: i64,
    pub available: i64,
    /// `open`, `frozen` or `closed`.
    #[schema(example = "open")]
    pub status: String,
    pub overdraft_limit: i64,
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/as-of",
    tag = "audit",
    security(("bearerAuth" = ["auditor"])),
    summary = "An account's state at a time or version, rebuilt from the event log",
    params(
        ("id" = Uuid, Path, description = "The account's id (a UUID)."),
        ("X-Consistency-Token" = Option<String>, Header, description = "Wait until the log has that write."),
        AsOfQuery,
    ),
    responses(
        (status = 200, description = "The account as of the last event at or before the point.", body = AccountAsOf),
        (status = 400, description = "`invalid-parameter`: not exactly one of `at` and `version`, or malformed.",
         body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "`account-not-found`: no such account at that point (not opened yet, or \
            no such version).", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`unknown-consistency-token`: the token names no write in the log.",
         body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = "`database-unavailable` or `not-yet-consistent`; retry after `Retry-After` seconds.",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_account_as_of(
    _: Require<Auditor>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Params(query): Params<AsOfQuery>,
) -> Response {
    let read = async {
        let point = match (query.at, query.version) {
            (Some(at), None) => Point::At(at),
            (None, Some(version)) if version >= 1 => Point::Version(version),
            (None, Some(_)) => return Err(invalid_parameter("version must be 1 or more.")),
            _ => return Err(invalid_parameter("give exactly one of at (RFC 3339) and version.")),
        };
        let account_id = path_id(&id, "account-not-found", "account")?;
        let pool = log_source(&state, &headers, query.consistent_with.as_deref()).await?;
        as_of(&EventStore::new(pool), account_id, point).await?.ok_or_else(|| {
            Problem::not_found("account-not-found", "The account did not exist at that point.").into_response()
        })
    };
    match read.await {
        Ok(view) => Json(view).into_response(),
        Err(response) => response,
    }
}

/// Where an as-of fold stops.
#[derive(Debug, Clone, Copy)]
pub enum Point {
    At(DateTime<Utc>),
    Version(i64),
}

impl Point {
    fn includes(self, event: &StoredEvent) -> bool {
        match self {
            Point::At(at) => event.recorded_at <= at,
            Point::Version(version) => event.version <= version,
        }
    }
}

/// Folds the account's events up to `point` with the domain's aggregate; `None` when no event
/// is that early, or the version asked for does not exist.
async fn as_of(store: &EventStore, account_id: Uuid, point: Point) -> Result<Option<AccountAsOf>, Response> {
    let mut account = Account::default();
    let mut last: Option<(i64, DateTime<Utc>)> = None;
    'pages: loop {
        let after = last.map_or(0, |(v, _)| v);
        let page = store
            .read_stream(account_id, after, READ_LIMIT_MAX)
            .await
            .map_err(store_unavailable)?;
        let full = page.len() as i64 == READ_LIMIT_MAX;
        for stored in page {
            if stored.stream_type != tally_domain::account::STREAM_TYPE {
                // Another kind of stream (a transfer's id): no account by that id.
                return Ok(None);
            }
            if !point.includes(&stored) {
                break 'pages;
            }
            let event =
                tally_schemas::decode_account_event(&stored.event_type, stored.schema_version as u32, &stored.payload)
                    .map_err(|e| {
                        corrupt(format!(
                            "{} v{} of {account_id}: {e}",
                            stored.event_type, stored.version
                        ))
                    })?;
            account.apply(event);
            last = Some((stored.version, stored.recorded_at));
        }
        if !full {
            break;
        }
    }
    let Some((version, recorded_at)) = last else {
        return Ok(None);
    };
    if let Point::Version(wanted) = point
        && wanted > version
    {
        return Ok(None);
    }
    Ok(Some(AccountAsOf {
        account_id,
        version,
        recorded_at,
        available: account.available(),
        owner: account.owner,
        currency: account.currency.map(String::from).unwrap_or_default(),
        balance: account.balance,
        held: account.held,
        status: account.status.as_str().to_owned(),
        overdraft_limit: account.overdraft_limit,
    }))
}
