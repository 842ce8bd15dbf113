//! Read-your-writes: a read that carries the consistency token of a command response waits
//! (bounded, `TALLY_CONSISTENCY_WAIT_MS`, default 2 s) until what it reads reflects that write,
//! else answers 503 `not-yet-consistent` with `Retry-After`. A read without a token is served
//! at once from the cache or a replica.
//!
//! A token names one stream version (`v1.<stream id>.<version>`). A read of that stream waits
//! for that version. A read of another stream (the account of a transfer's token, say) waits
//! for whatever the token's transaction wrote to it, which this source's copy of the log
//! tells: the events sharing the token event's `tx_id`. A transaction that did not touch the
//! stream asks for nothing beyond the source having the token's event.

use std::future::Future;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tally_service::Problem;
use tally_service::token::ConsistencyToken;
use uuid::Uuid;

use crate::AppState;
use crate::routes::unavailable;

/// The header a client sends the token in (as the command API returned it).
pub const HEADER: &str = "x-consistency-token";
/// The first pause between two looks at the source; it doubles up to [`POLL_MAX`].
const POLL_MIN: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(25);

/// The token of a request: the `X-Consistency-Token` header or the `consistent_with` query
/// parameter (the header wins when both are sent). Text that is not a token is a 400.
pub fn requested(headers: &HeaderMap, query: Option<&str>) -> Result<Option<ConsistencyToken>, Response> {
    let text = match headers.get(HEADER) {
        Some(value) => Some(value.to_str().map_err(|_| invalid_token())?),
        None => query,
    };
    text.map(|t| t.parse::<ConsistencyToken>().map_err(|_| invalid_token()))
        .transpose()
}

fn invalid_token() -> Response {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-consistency-token",
        "Invalid consistency token",
    )
    .detail("Send the consistency_token of a command response as it was returned.")
    .into_response()
}

/// The answer when the wait runs out.
fn not_yet_consistent(waited: Duration) -> Response {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not-yet-consistent",
        "Not yet consistent",
    )
    .detail(format!(
        "This instance has not caught up with the write named by the consistency token within {} ms; retry.",
        waited.as_millis()
    ))
    .retry_after(1)
    .into_response()
}

/// Runs `attempt` until it yields a value, for at most `state.consistency_wait`. `attempt`
/// answers `None` while the data it reads does not reflect the write of `token` yet.
///
/// A token naming a write that is not in the log (forged, or of another deployment) is a 422
/// at once: the first time `attempt` finds nothing, the primary is asked whether it has the
/// token's event. A command is answered only after its commit, so a real token's event is
/// always on the primary; without this check every read with a far-future token would poll a
/// replica for the whole wait. When the wait runs out, a write not replicated yet is a 503.
pub async fn wait_until<T, F, Fut>(state: &AppState, token: &ConsistencyToken, mut attempt: F) -> Result<T, Response>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, sqlx::Error>>,
{
    let wait = state.consistency_wait;
    let started = Instant::now();
    let deadline = started + wait;
    let mut pause = POLL_MIN;
    // Whether the primary has the token's event; `None` until asked (or while it cannot tell).
    let mut on_primary: Option<bool> = None;
    loop {
        // A failed look (a replica cancelling a query for a recovery conflict, a dropped
        // connection) is retried like one that found the write missing: the next look may go
        // to another replica, and the wait is bounded anyway.
        let failed = match attempt().await {
            Ok(Some(value)) => {
                metrics::histogram!("tally_query_consistency_wait_seconds").record(started.elapsed().as_secs_f64());
                return Ok(value);
            }
            Ok(None) => None,
            Err(error) => {
                tracing::debug!(%error, "a read-your-writes look failed; looking again");
                Some(error)
            }
        };
        if on_primary.is_none() {
            on_primary = log_has(state.sources.primary(), token).await.ok();
            if on_primary == Some(false) {
                return Err(unknown_token());
            }
        }
        let now = Instant::now();
        if now >= deadline {
            if let Some(error) = failed {
                return Err(unavailable(&error));
            }
            // The primary could not be asked before: ask once more now.
            let known = match on_primary {
                Some(known) => Ok(known),
                None => log_has(state.sources.primary(), token).await,
            };
            return Err(match known {
                Ok(false) => unknown_token(),
                Ok(true) | Err(_) => {
                    metrics::counter!("tally_query_consistency_timeouts_total").increment(1);
                    not_yet_consistent(wait)
                }
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(POLL_MAX);
    }
}

fn unknown_token() -> Response {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown-consistency-token",
        "Unknown consistency token",
    )
    .detail("The consistency token names a write that is not in the log.")
    .into_response()
}

/// The version of `stream_id` a read must reflect for `token`: the token's own version for its
/// stream; for another stream what the token's transaction wrote to it, or 0 when it wrote
/// nothing there. `None` while `pool` has not got the token's event yet.
pub async fn version_wanted(
    pool: &PgPool,
    token: &ConsistencyToken,
    stream_id: Uuid,
) -> Result<Option<i64>, sqlx::Error> {
    if token.stream_id == stream_id {
        return Ok(Some(token.version));
    }
    let (seen, version): (bool, Option<i64>) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM events WHERE stream_id = $1 AND version = $2), \
                (SELECT max(e.version) FROM events t \
                 JOIN events e ON e.tx_id = t.tx_id AND e.stream_id = $3 \
                 WHERE t.stream_id = $1 AND t.version = $2)",
    )
    .bind(token.stream_id)
    .bind(token.version)
    .bind(stream_id)
    .fetch_one(pool)
    .await?;
    Ok(seen.then_some(version.unwrap_or(0)))
}

/// The streams of `stream_type` the token's transaction wrote, with their versions; `None`
/// while `pool` has not got the token's event yet.
pub async fn writes_of_type(
    pool: &PgPool,
    token: &ConsistencyToken,
    stream_type: &str,
) -> Result<Option<Vec<(Uuid, i64)>>, sqlx::Error> {
    if !log_has(pool, token).await? {
        return Ok(None);
    }
    let writes = sqlx::query_as(
        "SELECT e.stream_id, max(e.version) FROM events t \
         JOIN events e ON e.tx_id = t.tx_id AND e.stream_type = $3 \
         WHERE t.stream_id = $1 AND t.version = $2 GROUP BY e.stream_id",
    )
    .bind(token.stream_id)
    .bind(token.version)
    .bind(stream_type)
    .fetch_all(pool)
    .await?;
    Ok(Some(writes))
}

/// A source whose read model `table` (keyed by `id_column`) shows every stream of
/// `stream_type` the token's transaction wrote at least at the version it wrote, for a listing
/// read with a token: the listing is then read from that same source.
pub async fn source_with_writes(
    state: &AppState,
    token: &ConsistencyToken,
    stream_type: &str,
    table: &str,
    id_column: &str,
) -> Result<PgPool, Response> {
    let behind_sql = format!(
        "SELECT count(*) FROM UNNEST($1::uuid[], $2::bigint[]) AS w(id, version) \
         LEFT JOIN {table} t ON t.{id_column} = w.id \
         WHERE t.version IS NULL OR t.version < w.version"
    );
    let behind_sql = behind_sql.as_str();
    wait_until(state, token, || async move {
        let (pool, _) = state.sources.pick();
        let Some(writes) = writes_of_type(pool, token, stream_type).await? else {
            return Ok(None);
        };
        let (ids, versions): (Vec<Uuid>, Vec<i64>) = writes.into_iter().unzip();
        let behind: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(behind_sql))
            .bind(&ids)
            .bind(&versions)
            .fetch_one(pool)
            .await?;
        Ok((behind == 0).then(|| pool.clone()))
    })
    .await
}

/// Whether `pool`'s copy of the log has the token's event.
pub async fn log_has(pool: &PgPool, token: &ConsistencyToken) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE stream_id = $1 AND version = $2)")
        .bind(token.stream_id)
        .bind(token.version)
        .fetch_one(pool)
        .await
}
