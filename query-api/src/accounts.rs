//! `GET /v1/accounts/{id}`, its statement, and the account listing `GET /v1/accounts`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_service::Problem;
use tally_service::auth::{Reader, Require};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::consistency;
use crate::routes::{
    PROBLEM_JSON, Params, decode_cursor, encode_cursor, invalid_parameter, page_limit, path_id, read_row,
    source_reflecting, unavailable, versioned_json,
};
use crate::views::{ACCOUNT_COLUMNS, AccountView, StatementLine};

/// Lines per statement page when the client does not say.
pub const STATEMENT_LIMIT_DEFAULT: i64 = 50;
/// The most lines one statement page holds.
pub const STATEMENT_LIMIT_MAX: i64 = 500;

/// What every read accepts: the consistency token of a write to wait for.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsistentWith {
    /// A command response's `consistency_token` (or send it as `X-Consistency-Token`): the read
    /// waits until it reflects that write, else answers 503 `not-yet-consistent`.
    pub consistent_with: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{id}",
    tag = "accounts",
    security(("bearerAuth" = ["reader"])),
    summary = "An account's balance and status, as projected from its events",
    params(
        ("id" = Uuid, Path, description = "The account's id (a UUID)."),
        ("X-Consistency-Token" = Option<String>, Header, description = "A command response's consistency token: \
            wait until the account reflects that write."),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` from an earlier response: 304 while \
            the account is still at that version."),
        ConsistentWith,
    ),
    responses(
        (status = 200, description = "The account as of `version`.", body = AccountView,
         headers(("ETag" = String, description = "The account's version, quoted."))),
        (status = 304, description = "Not modified: still at the version `If-None-Match` named."),
        (status = 400, description = "`invalid-consistency-token` or `invalid-parameter`.", body = Problem,
         content_type = PROBLEM_JSON),
        (status = 404, description = "`account-not-found`: no account with this id (or the projection has not \
            reached it yet).", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`unknown-consistency-token`: the token names no write in the log.",
         body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = "`database-unavailable`: the read database is unreachable; `not-yet-consistent`: \
            the write of the consistency token is not visible yet. Retry after `Retry-After` seconds.",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_account(
    _: Require<Reader>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Params(query): Params<ConsistentWith>,
) -> Response {
    match account(&state, &id, &headers, query.consistent_with.as_deref()).await {
        Ok(view) => versioned_json(&headers, &*view),
        Err(response) => response,
    }
}

/// The account `id`, waiting for the request's consistency token if it has one.
async fn account(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    consistent_with: Option<&str>,
) -> Result<std::sync::Arc<AccountView>, Response> {
    let account_id = path_id(id, "account-not-found", "account")?;
    let token = consistency::requested(headers, consistent_with)?;
    read_row(
        state,
        &state.caches.accounts,
        account_id,
        token,
        |pool, id| async move { AccountView::load(&pool, id).await },
    )
    .await?
    .ok_or_else(account_not_found)
}

fn account_not_found() -> Response {
    Problem::not_found("account-not-found", "No account with this id.").into_response()
}

/// Filters and paging of a statement.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatementQuery {
    /// Lines per page, 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only lines recorded at or after this instant (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Only lines recorded before this instant (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// Only `credit` (money in) or `debit` (money out) lines.
    pub direction: Option<String>,
    /// A command response's consistency token (or send `X-Consistency-Token`).
    pub consistent_with: Option<String>,
}

/// One page of a statement.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatementPage {
    pub account_id: Uuid,
    /// In account version order, oldest first.
    pub lines: Vec<StatementLine>,
    /// Whether more lines matched than this page holds.
    pub has_more: bool,
    /// Pass as `cursor` to continue after this page (also after the last page, to see lines
    /// written since). Lines written later come after the last one returned, so walking the
    /// pages never repeats or skips a line. Absent only when nothing was read yet.
    pub next_cursor: Option<String>,
}

const STATEMENT_CURSOR: &str = "statement.v1";

#[utoipa::path(
    get,
    path = "/v1/accounts/{id}/statement",
    tag = "accounts",
    security(("bearerAuth" = ["reader"])),
    summary = "An account's statement: one line per posting, oldest first, in pages",
    params(
        ("id" = Uuid, Path, description = "The account's id (a UUID)."),
        ("X-Consistency-Token" = Option<String>, Header, description = "Wait until the statement reflects that write."),
        StatementQuery,
    ),
    responses(
        (status = 200, description = "One page of lines.", body = StatementPage),
        (status = 400, description = "`invalid-parameter` (a malformed cursor, date or direction) or \
            `invalid-consistency-token`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "`account-not-found`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`limit-out-of-range`; `unknown-consistency-token`: the token names no write \
            in the log.", body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = "`database-unavailable` (the database is away), `unavailable` (a read it could not finish, e.g. past its statement timeout) or `not-yet-consistent`; retry after `Retry-After` seconds.",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_statement(
    _: Require<Reader>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Params(query): Params<StatementQuery>,
) -> Response {
    match statement(&state, &id, &headers, query).await {
        Ok(page) => Json(page).into_response(),
        Err(response) => response,
    }
}

async fn statement(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query: StatementQuery,
) -> Result<StatementPage, Response> {
    let limit = page_limit(query.limit, STATEMENT_LIMIT_DEFAULT, STATEMENT_LIMIT_MAX)?;
    let direction = match query.direction.as_deref() {
        None => None,
        Some(d @ ("credit" | "debit")) => Some(d.to_owned()),
        Some(other) => {
            return Err(invalid_parameter(format!(
                "direction must be credit or debit; got {other:?}."
            )));
        }
    };
    let account_id = path_id(id, "account-not-found", "account")?;
    let after_version = match &query.cursor {
        None => 0,
        Some(cursor) => {
            let parts = decode_cursor(cursor, STATEMENT_CURSOR, 2)?;
            if parts[0] != account_id.simple().to_string() {
                return Err(invalid_parameter("cursor belongs to another account's statement"));
            }
            parts[1]
                .parse::<i64>()
                .map_err(|_| invalid_parameter("cursor is not one this API returned for this listing"))?
        }
    };
    // The account must exist. With a token, the page is read from a source whose balance row
    // reflects the write: statement lines commit in the same transaction as that row. Lines
    // are immutable and keyed by version, so a page read from any replica continues the
    // previous one exactly.
    let pool = match consistency::requested(headers, query.consistent_with.as_deref())? {
        Some(token) => source_reflecting(state, token, account_id, |pool, id| async move {
            sqlx::query_scalar::<_, i64>("SELECT version FROM account_balances WHERE account_id = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
        })
        .await?
        .ok_or_else(account_not_found)?,
        None => {
            account(state, id, headers, None).await?;
            state.sources.pick().0.clone()
        }
    };
    let rows = sqlx::query(
        "SELECT version, position, recorded_at, kind, direction, amount, currency, counterparty, transfer_id, \
                reference, balance_after, entry_id, leg \
         FROM account_statement \
         WHERE account_id = $1 AND version > $2 \
           AND ($3::timestamptz IS NULL OR recorded_at >= $3) \
           AND ($4::timestamptz IS NULL OR recorded_at < $4) \
           AND ($5::text IS NULL OR direction = $5) \
         ORDER BY version LIMIT $6",
    )
    .bind(account_id)
    .bind(after_version)
    .bind(query.from)
    .bind(query.to)
    .bind(direction)
    .bind(limit + 1)
    .fetch_all(&pool)
    .await
    .map_err(|e| unavailable(&e))?;
    let mut lines = rows
        .iter()
        .map(StatementLine::from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unavailable(&e))?;
    let has_more = lines.len() as i64 > limit;
    lines.truncate(limit as usize);
    let next_cursor = match lines.last() {
        Some(last) => Some(encode_cursor(&[
            STATEMENT_CURSOR,
            &account_id.simple().to_string(),
            &last.version.to_string(),
        ])),
        None => query.cursor,
    };
    Ok(StatementPage {
        account_id,
        lines,
        has_more,
        next_cursor,
    })
}

/// Accounts per listing page when the client does not say.
pub const ACCOUNTS_LIMIT_DEFAULT: i64 = 50;
/// The most accounts one listing page holds.
pub const ACCOUNTS_LIMIT_MAX: i64 = 500;
/// The statuses an account can be listed by.
const ACCOUNT_STATUSES: [&str; 3] = ["open", "frozen", "closed"];
/// The longest `owner` a listing accepts (the command API refuses longer owners).
const OWNER_FILTER_MAX: usize = 256;

/// Filters and paging of the account listing. Filters combine (all must match); a parameter
/// this listing does not know is a 400, so a misspelt filter never lists every account.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AccountsQuery {
    /// Only accounts of this owner (exact match).
    pub owner: Option<String>,
    /// Only accounts in this currency (ISO 4217 code).
    pub currency: Option<String>,
    /// Only accounts in this status: `open`, `frozen` or `closed`.
    pub status: Option<String>,
    /// Only the account with this external id (exact match).
    pub external_id: Option<String>,
    /// Accounts per page, 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// A command response's consistency token (or send `X-Consistency-Token`): the page
    /// reflects every account that write touched.
    pub consistent_with: Option<String>,
}

/// One page of the account listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountsPage {
    /// In account id order.
    pub accounts: Vec<AccountView>,
    /// Whether more accounts matched than this page holds.
    pub has_more: bool,
    /// Pass as `cursor` (with the same filters) to continue after this page. Absent only when
    /// nothing was read yet.
    pub next_cursor: Option<String>,
}

const ACCOUNTS_CURSOR: &str = "accounts.v1";

/// The prefix of a metadata filter's parameter name (`metadata.KEY=VALUE`).
const METADATA_FILTER_PREFIX: &str = "metadata.";

/// The listing's query: its known parameters, and its metadata filters by key. The names of
/// metadata filters are not known in advance, so they are taken out before the rest is read
/// (where an unknown name is still a 400).
pub(crate) struct ListingParams(AccountsQuery, BTreeMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for ListingParams {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let raw = parts.uri.query().unwrap_or_default();
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(raw).map_err(|e| invalid_parameter(format!("malformed query string: {e}")))?;
        let (filters, rest): (Vec<_>, Vec<_>) = pairs
            .into_iter()
            .partition(|(name, _)| name.starts_with(METADATA_FILTER_PREFIX));
        let mut metadata = BTreeMap::new();
        for (name, value) in filters {
            let key = &name[METADATA_FILTER_PREFIX.len()..];
            if !tally_domain::profile::is_metadata_key(key) {
                return Err(invalid_parameter(format!(
                    "a metadata filter is metadata.KEY=VALUE, KEY 1 to {} of A-Z a-z 0-9 _ - .",
                    tally_domain::profile::METADATA_KEY_LEN_MAX
                )));
            }
            if !tally_domain::profile::is_metadata_value(&value) {
                return Err(invalid_parameter(format!(
                    "the value of metadata.{key} is at most {} characters, without control characters.",
                    tally_domain::profile::METADATA_VALUE_LEN_MAX
                )));
            }
            if metadata.insert(key.to_owned(), value).is_some() {
                return Err(invalid_parameter(format!("metadata.{key} is given more than once.")));
            }
        }
        if metadata.len() > tally_domain::profile::METADATA_ENTRIES_MAX {
            return Err(invalid_parameter(format!(
                "at most {} metadata filters.",
                tally_domain::profile::METADATA_ENTRIES_MAX
            )));
        }
        let rest = serde_urlencoded::to_string(&rest).map_err(|e| invalid_parameter(e.to_string()))?;
        let query = serde_urlencoded::from_str(&rest).map_err(|e| invalid_parameter(e.to_string()))?;
        Ok(ListingParams(query, metadata))
    }
}

#[utoipa::path(
    get,
    path = "/v1/accounts",
    tag = "accounts",
    security(("bearerAuth" = ["reader"])),
    summary = "Find accounts by owner, currency, status, external id and metadata, in pages of account id order",
    description = "Filters combine: every one given must match. `metadata.KEY=VALUE` (repeatable, up to 16, \
        each key once) keeps the accounts whose metadata has KEY set to VALUE.",
    params(
        ("X-Consistency-Token" = Option<String>, Header, description = "Wait until the listing reflects that write."),
        AccountsQuery,
    ),
    responses(
        (status = 200, description = "One page of accounts.", body = AccountsPage),
        (status = 400, description = "`invalid-parameter`: a malformed cursor, currency or status, or a parameter \
            the listing does not know; `invalid-consistency-token`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`limit-out-of-range`; `unknown-consistency-token`: the token names no write \
            in the log.", body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = "`database-unavailable` (the database is away), `unavailable` (a read it could not finish, e.g. past its statement timeout) or `not-yet-consistent`; retry after `Retry-After` seconds.",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn list_accounts(
    _: Require<Reader>,
    State(state): State<AppState>,
    headers: HeaderMap,
    ListingParams(query, metadata): ListingParams,
) -> Response {
    match accounts(&state, &headers, query, metadata).await {
        Ok(page) => Json(page).into_response(),
        Err(response) => response,
    }
}

async fn accounts(
    state: &AppState,
    headers: &HeaderMap,
    query: AccountsQuery,
    metadata: BTreeMap<String, String>,
) -> Result<AccountsPage, Response> {
    let limit = page_limit(query.limit, ACCOUNTS_LIMIT_DEFAULT, ACCOUNTS_LIMIT_MAX)?;
    if let Some(status) = &query.status
        && !ACCOUNT_STATUSES.contains(&status.as_str())
    {
        return Err(invalid_parameter(format!(
            "status must be one of {}; got {status:?}.",
            ACCOUNT_STATUSES.join(", ")
        )));
    }
    if let Some(currency) = &query.currency
        && !(currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase()))
    {
        return Err(invalid_parameter(format!(
            "currency must be an ISO 4217 code (three capital letters); got {currency:?}."
        )));
    }
    // A NUL byte cannot be in any stored text (Postgres refuses it in a parameter too), so it
    // is the client's mistake, said here rather than left to fail the query.
    if let Some(owner) = &query.owner
        && (owner.is_empty() || owner.len() > OWNER_FILTER_MAX || owner.contains('\0'))
    {
        return Err(invalid_parameter(format!(
            "owner must be 1 to {OWNER_FILTER_MAX} bytes long, without NUL characters."
        )));
    }
    if let Some(external_id) = &query.external_id
        && !tally_domain::profile::is_external_id(external_id)
    {
        return Err(invalid_parameter(format!(
            "external_id must be 1 to {} visible ASCII characters.",
            tally_domain::profile::EXTERNAL_ID_LEN_MAX
        )));
    }
    let after = match &query.cursor {
        None => None,
        Some(cursor) => {
            let parts = decode_cursor(cursor, ACCOUNTS_CURSOR, 1)?;
            Some(
                Uuid::try_parse(&parts[0])
                    .map_err(|_| invalid_parameter("cursor is not one this API returned for this listing"))?,
            )
        }
    };
    let pool = match consistency::requested(headers, query.consistent_with.as_deref())? {
        None => state.sources.pick().0.clone(),
        Some(token) => {
            consistency::source_with_writes(
                state,
                &token,
                tally_domain::account::STREAM_TYPE,
                "account_balances",
                "account_id",
            )
            .await?
        }
    };
    // Only the filters given go into the statement, so the planner walks the index of the
    // most selective one (each is `(column, account_id)`, in page order).
    let mut sql = sqlx::QueryBuilder::new(format!("SELECT {ACCOUNT_COLUMNS} FROM account_balances WHERE true"));
    if let Some(after) = after {
        sql.push(" AND account_id > ").push_bind(after);
    }
    if let Some(owner) = &query.owner {
        sql.push(" AND owner = ").push_bind(owner);
    }
    if let Some(currency) = &query.currency {
        sql.push(" AND currency = ").push_bind(currency);
    }
    if let Some(status) = &query.status {
        sql.push(" AND status = ").push_bind(status);
    }
    if let Some(external_id) = &query.external_id {
        sql.push(" AND external_id = ").push_bind(external_id);
    }
    if !metadata.is_empty() {
        let wanted = serde_json::to_string(&metadata).expect("a map of strings serializes");
        sql.push(" AND metadata @> ").push_bind(wanted).push("::jsonb");
    }
    sql.push(" ORDER BY account_id LIMIT ").push_bind(limit + 1);
    let rows = sql.build().fetch_all(&pool).await.map_err(|e| unavailable(&e))?;
    let mut accounts = rows
        .iter()
        .map(AccountView::from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unavailable(&e))?;
    let has_more = accounts.len() as i64 > limit;
    accounts.truncate(limit as usize);
    let next_cursor = accounts
        .last()
        .map(|last| encode_cursor(&[ACCOUNTS_CURSOR, &last.account_id.simple().to_string()]))
        .or(query.cursor);
    Ok(AccountsPage {
        accounts,
        has_more,
        next_cursor,
    })
}
