//! The router of the query API, its probes, and what every handler shares: the cached,
//! version-aware read of one row, query parameters as problems, cursors and `ETag`s. Each
//! handler carries its `#[utoipa::path]` annotation, from which [`crate::openapi`] builds the
//! document served at `GET /openapi.json`.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use tally_service::Problem;
use tally_service::auth::{Authentication, Role};
use tally_service::errors::ErrorReport;
use tally_service::token::ConsistencyToken;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::cache::{Read, ReadFailed, Versioned, VersionedCache};
use crate::consistency;
use crate::sources::ReplicaState;

/// Every route of the query API. Serve it wrapped in [`tally_service::edge::protect`] (see
/// [`crate::app`]): its handlers expect the authentication the edge performs.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/accounts", get(crate::accounts::list_accounts))
        .route("/v1/accounts/{id}", get(crate::accounts::get_account))
        .route("/v1/accounts/{id}/statement", get(crate::accounts::get_statement))
        .route(
            "/v1/accounts/{id}/transfers",
            get(crate::transfers::list_account_transfers),
        )
        .route("/v1/accounts/{id}/as-of", get(crate::audit::get_account_as_of))
        .route("/v1/transfers/{id}", get(crate::transfers::get_transfer))
        .route("/v1/entries/{id}", get(crate::entries::get_entry))
        .route(
            "/v1/audit/streams/{stream_id}/events",
            get(crate::audit::get_stream_events),
        )
        .route("/v1/audit/events", get(crate::audit::get_feed))
        .route("/v1/audit/events/{event_id}/proof", get(crate::proofs::get_event_proof))
        .route("/v1/ledger/trial-balance", get(crate::ledger::get_trial_balance))
        .route("/v1/ledger/system-accounts", get(crate::ledger::get_system_accounts))
        .route("/openapi.json", get(crate::openapi::serve))
        .route("/health", get(tally_service::problem::health))
        .route("/ready", get(ready))
        .fallback(tally_service::problem::fallback)
        .method_not_allowed_fallback(tally_service::problem::method_not_allowed)
        .with_state(state)
}

/// The operations listener: `/metrics`, `/health` and `/ready` (`tally_service::probes`).
/// Its `/ready` is the anonymous one: no replica hosts or error texts.
pub fn ops_router(state: AppState) -> Router {
    tally_service::probes::router(get(ready)).with_state(state)
}

/// What `/ready` reports.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// Where reads go now: `replica`, `primary` (no replica configured) or `primary-fallback`
    /// (no replica is usable).
    #[schema(example = "replica")]
    pub source: &'static str,
    /// Whether the cache is in use (it is off while the invalidation feed from NATS is down).
    pub cache_live: bool,
    /// Each replica: its host, lag, and why it is out of rotation. Only for a caller with the
    /// `ops` role: an anonymous caller (a load balancer) learns no host names or error texts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Vec<ReplicaState>>,
}

/// `GET /ready`: 200 when the database reads go to answers, else 503; the body says where
/// reads go, and, to a caller with the `ops` role, why each replica is in or out of the
/// rotation.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "ops",
    summary = "Readiness: where reads go, and (to the ops role) each replica's lag",
    responses(
        (status = 200, description = "Reads are served.", body = Readiness),
        (status = 503, description = "The database reads go to is unreachable (the body says which). While the \
         instance is stopping (SIGTERM) a `shutting-down` problem instead.", body = Readiness),
    )
)]
pub(crate) async fn ready(State(state): State<AppState>, caller: Option<Extension<Authentication>>) -> Response {
    let (pool, source) = state.sources.pick();
    let reachable = sqlx::query("SELECT 1").execute(pool).await.is_ok();
    let ops = caller
        .as_ref()
        .and_then(|Extension(a)| a.principal())
        .is_some_and(|p| p.has(Role::Ops));
    let readiness = Readiness {
        status: if reachable { "ready" } else { "unavailable" },
        source: source.as_str(),
        cache_live: state.caches.is_live(),
        replicas: ops.then(|| state.sources.replicas().iter().map(|r| r.state()).collect()),
    };
    let status = if reachable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

/// Content type of every error response.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// A database failure, with the cause logged, never sent: 503 `database-unavailable` when the
/// database is away or failing over (`is_unavailable_error`), else a plain 503 `unavailable`
/// (e.g. a statement timeout): retryable, but not a failover to wait out.
pub(crate) fn unavailable(error: &sqlx::Error) -> Response {
    if tally_event_store::is_unavailable_error(error) {
        return unavailable_because(error.to_string());
    }
    let mut response = Problem::unavailable(1).into_response();
    response.extensions_mut().insert(ErrorReport(error.to_string()));
    response
}

pub(crate) fn unavailable_because(cause: String) -> Response {
    let mut response = Problem::database_unavailable(1).into_response();
    // 503 is a server error: the logging middleware reports the attached cause.
    response.extensions_mut().insert(ErrorReport(cause));
    response
}

/// A path segment that must be a UUID; anything else is the resource's 404.
pub(crate) fn path_id(text: &str, code: &str, what: &str) -> Result<Uuid, Response> {
    Uuid::try_parse(text).map_err(|_| Problem::not_found(code, format!("No {what} with this id.")).into_response())
}

/// Query parameters as `T`; a malformed one is a 400 problem naming it.
pub(crate) struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(params)| Params(params))
            .map_err(|rejection| invalid_parameter(rejection.body_text()))
    }
}

pub(crate) fn invalid_parameter(detail: impl Into<String>) -> Response {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-parameter", "Invalid query parameter")
        .detail(detail)
        .into_response()
}

/// `limit` checked against its bounds (1..=`max`), `default` when absent.
pub(crate) fn page_limit(limit: Option<i64>, default: i64, max: i64) -> Result<i64, Response> {
    match limit {
        None => Ok(default),
        Some(limit) if (1..=max).contains(&limit) => Ok(limit),
        Some(limit) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "limit-out-of-range",
            "Page size out of range",
        )
        .detail(format!("limit must be between 1 and {max}; got {limit}."))
        .extension("limit_max", max)
        .into_response()),
    }
}

/// An opaque cursor: `parts` joined and hex-encoded. Clients pass it back unchanged.
pub(crate) fn encode_cursor(parts: &[&str]) -> String {
    hex::encode(parts.join("|"))
}

/// The parts of a cursor made by [`encode_cursor`] with `tag` first; a cursor of another kind
/// or from elsewhere is a 400.
pub(crate) fn decode_cursor(cursor: &str, tag: &str, parts: usize) -> Result<Vec<String>, Response> {
    let bad = || invalid_parameter("cursor is not one this API returned for this listing");
    let bytes = hex::decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let fields: Vec<String> = text.split('|').map(str::to_owned).collect();
    if fields.len() != parts + 1 || fields[0] != tag {
        return Err(bad());
    }
    Ok(fields[1..].to_vec())
}

/// The strong `ETag` of a resource at `version`.
pub(crate) fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// A versioned resource as JSON with its `ETag`, or `304 Not Modified` when the client's
/// `If-None-Match` already names that version.
pub(crate) fn versioned_json<V: Serialize + Versioned>(headers: &HeaderMap, value: &V) -> Response {
    let tag = etag(value.version());
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().trim_start_matches("W/"))
        .any(|v| v == tag || v == "*");
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Json(value).into_response()
    };
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&tag) {
        headers.insert(header::ETAG, value);
    }
    // Clients and proxies may keep it, but must ask again before using it.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
    response
}

/// One row by stream id: through `cache` without a token; with one, from the source until the
/// row reflects the token's write (see [`crate::consistency`]). `Ok(None)`: no such row.
pub(crate) async fn read_row<V, L, Fut>(
    state: &AppState,
    cache: &VersionedCache<V>,
    id: Uuid,
    token: Option<ConsistencyToken>,
    load: L,
) -> Result<Option<Arc<V>>, Response>
where
    V: Versioned,
    L: Fn(PgPool, Uuid) -> Fut,
    Fut: Future<Output = Result<Option<V>, sqlx::Error>>,
{
    let Some(token) = token else {
        let (pool, _) = state.sources.pick();
        return match cache.get_or_load(id, load(pool.clone(), id)).await {
            Ok(Read::Found(value)) => Ok(Some(value)),
            Ok(Read::Missing) => Ok(None),
            Err(ReadFailed(cause)) => Err(unavailable_because(cause)),
        };
    };
    let load = &load;
    consistency::wait_until(state, &token, || async move {
        let (pool, _) = state.sources.pick();
        let Some(wanted) = consistency::version_wanted(pool, &token, id).await? else {
            return Ok(None);
        };
        if let Some(value) = cache.cached(id, wanted).await {
            return Ok(Some(Some(value)));
        }
        match load(pool.clone(), id).await? {
            Some(value) if value.version() >= wanted => {
                let value = Arc::new(value);
                cache.offer(id, value.clone()).await;
                Ok(Some(Some(value)))
            }
            // The token's write did not touch this stream, and it does not exist.
            None if wanted == 0 => Ok(Some(None)),
            _ => Ok(None),
        }
    })
    .await
}

/// For a listing read with a token: a source whose copy of `id`'s row (`version_of` reads its
/// version there, `None` when absent) reflects the token's write, so the listing can then be
/// read from that same source. `Ok(None)`: the row does not exist there and the token's write
/// did not create it.
pub(crate) async fn source_reflecting<F, Fut>(
    state: &AppState,
    token: ConsistencyToken,
    id: Uuid,
    version_of: F,
) -> Result<Option<PgPool>, Response>
where
    F: Fn(PgPool, Uuid) -> Fut,
    Fut: Future<Output = Result<Option<i64>, sqlx::Error>>,
{
    let version_of = &version_of;
    consistency::wait_until(state, &token, || async move {
        let (pool, _) = state.sources.pick();
        let Some(wanted) = consistency::version_wanted(pool, &token, id).await? else {
            return Ok(None);
        };
        Ok(match version_of(pool.clone(), id).await? {
            Some(version) if version >= wanted => Some(Some(pool.clone())),
            None if wanted == 0 => Some(None),
            _ => None,
        })
    })
    .await
}
