//! `GET /v1/transfers/{id}` and an account's transfers.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_service::Problem;
use tally_service::auth::{Reader, Require};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::accounts::ConsistentWith;
use crate::consistency;
use crate::routes::{
    PROBLEM_JSON, Params, decode_cursor, encode_cursor, invalid_parameter, page_limit, path_id, read_row, unavailable,
    versioned_json,
};
use crate::views::{TRANSFER_COLUMNS, TransferView};

/// Transfers per page when the client does not say.
pub const TRANSFERS_LIMIT_DEFAULT: i64 = 50;
/// The most transfers one page holds.
pub const TRANSFERS_LIMIT_MAX: i64 = 500;
/// The statuses a transfer can be in (the `status` filter).
pub const TRANSFER_STATUSES: [&str; 5] = ["completed", "pending", "posted", "voided", "expired"];

#[utoipa::path(
    get,
    path = "/v1/transfers/{id}",
    tag = "transfers",
    security(("bearerAuth" = ["reader"])),
    summary = "A transfer's status and amounts, as projected from its events",
    params(
        ("id" = Uuid, Path, description = "The transfer's id (a UUID)."),
        ("X-Consistency-Token" = Option<String>, Header, description = "Wait until the transfer reflects that write."),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` from an earlier response: 304 while \
            the transfer is still at that version."),
        ConsistentWith,
    ),
    responses(
        (status = 200, description = "The transfer as of `version`.", body = TransferView,
         headers(("ETag" = String, description = "The transfer's version, quoted."))),
        (status = 304, description = "Not modified: still at the version `If-None-Match` named."),
        (status = 400, description = "`invalid-consistency-token` or `invalid-parameter`.", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 404, description = "`transfer-not-found`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`unknown-consistency-token`: the token names no write in the log.",
         body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = "`database-unavailable` (the database is away), `unavailable` (a read it could not finish, e.g. past its statement timeout) or `not-yet-consistent`; retry after `Retry-After` seconds.",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_transfer(
    _: Require<Reader>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Params(query): Params<ConsistentWith>,
) -> Response {
    let read = async {
        let transfer_id = path_id(&id, "transfer-not-found", "transfer")?;
        let token = consistency::requested(&headers, query.consistent_with.as_deref())?;
        read_row(
            &state,
            &state.caches.transfers,
            transfer_id,
            token,
            |pool, id| async move { TransferView::load(&pool, id).await },
        )
        .await?
        .ok_or_else(|| Problem::not_found("transfer-not-found", "No transfer with this id.").into_response())
    };
    match read.await {
        Ok(view) => versioned_json(&headers, &*view),
        Err(response) => response,
    }
}

/// Filters and paging of an account's transfers.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AccountTransfersQuery {
    /// Only transfers in this status: `completed`, `pending`, `posted`, `voided` or `expired`.
    pub status: Option<String>,
    /// Transfers per page, 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// A command response's consistency token (or send `X-Consistency-Token`).
    pub consistent_with: Option<String>,
}

/// One page of an account's transfers.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransfersPage {
    pub account_id: Uuid,
    /// Transfers from or to the account, oldest first (by creation time, then id).
    pub transfers: Vec<TransferView>,
    /// Whether more transfers matched than this page holds.
    pub has_more: bool,
    /// Pass as `cursor` to continue after this page. Absent only when nothing was read yet.
    pub next_cursor: Option<String>,
}

const TRANSFERS_CURSOR: &str = "transfers.v1";

#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/transfers",
    tag = "transfers",
    security(("bearerAuth" = ["reader"])),
    summary = "The transfers from or to an account, oldest first, in pages",
    params(
        ("id" = Uuid, Path, description = "The account's id (a UUID)."),
        ("X-Consistency-Token" = Option<String>, Header, description = "Wait until the listing reflects that write."),
        AccountTransfersQuery,
    ),
    responses(
        (status = 200, description = "One page of transfers.", body = TransfersPage),
        (status = 400, description = "`invalid-parameter` (a malformed cursor or an unknown status) or \
            `invalid-consistency-token`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "`account-not-found`: the id is not an account id (a UUID).", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 422, description = "`limit-out-of-range`; `unknown-consistency-token`: the token names no write \
            in the log.", body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = "`database-unavailable` (the database is away), `unavailable` (a read it could not finish, e.g. past its statement timeout) or `not-yet-consistent`; retry after `Retry-After` seconds.",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn list_account_transfers(
    _: Require<Reader>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Params(query): Params<AccountTransfersQuery>,
) -> Response {
    match account_transfers(&state, &id, &headers, query).await {
        Ok(page) => Json(page).into_response(),
        Err(response) => response,
    }
}

async fn account_transfers(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query: AccountTransfersQuery,
) -> Result<TransfersPage, Response> {
    let limit = page_limit(query.limit, TRANSFERS_LIMIT_DEFAULT, TRANSFERS_LIMIT_MAX)?;
    if let Some(status) = &query.status
        && !TRANSFER_STATUSES.contains(&status.as_str())
    {
        return Err(invalid_parameter(format!(
            "status must be one of {}; got {status:?}.",
            TRANSFER_STATUSES.join(", ")
        )));
    }
    let account_id = path_id(id, "account-not-found", "account")?;
    let bad_cursor = || invalid_parameter("cursor is not one this API returned for this listing");
    let after = match &query.cursor {
        None => None,
        Some(cursor) => {
            let parts = decode_cursor(cursor, TRANSFERS_CURSOR, 3)?;
            if parts[0] != account_id.simple().to_string() {
                return Err(invalid_parameter("cursor belongs to another account's listing"));
            }
            let micros = parts[1].parse::<i64>().map_err(|_| bad_cursor())?;
            let created_at = DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad_cursor)?;
            let transfer_id = Uuid::try_parse(&parts[2]).map_err(|_| bad_cursor())?;
            Some((created_at, transfer_id))
        }
    };
    let pool = match consistency::requested(headers, query.consistent_with.as_deref())? {
        None => state.sources.pick().0.clone(),
        // Every transfer the token's transaction wrote must show at least that version.
        Some(token) => {
            consistency::source_with_writes(
                state,
                &token,
                tally_domain::transfer::STREAM_TYPE,
                "transfers",
                "transfer_id",
            )
            .await?
        }
    };
    let sql = format!(
        "SELECT {TRANSFER_COLUMNS} FROM transfers \
         WHERE (from_account = $1 OR to_account = $1) AND created_at IS NOT NULL \
           AND ($2::text IS NULL OR status = $2) \
           AND ($3::timestamptz IS NULL OR (created_at, transfer_id) > ($3, $4)) \
         ORDER BY created_at, transfer_id LIMIT $5"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(account_id)
        .bind(query.status)
        .bind(after.map(|(at, _)| at))
        .bind(after.map(|(_, id)| id))
        .bind(limit + 1)
        .fetch_all(&pool)
        .await
        .map_err(|e| unavailable(&e))?;
    let mut transfers = rows
        .iter()
        .map(TransferView::from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unavailable(&e))?;
    let has_more = transfers.len() as i64 > limit;
    transfers.truncate(limit as usize);
    let next_cursor = transfers
        .last()
        .and_then(|last| Some((last.created_at?, last.transfer_id)))
        .map(|(at, transfer_id)| {
            encode_cursor(&[
                TRANSFERS_CURSOR,
                &account_id.simple().to_string(),
                &at.timestamp_micros().to_string(),
                &transfer_id.to_string(),
            ])
        })
        .or(query.cursor);
    Ok(TransfersPage {
        account_id,
        transfers,
        has_more,
        next_cursor,
    })
}
