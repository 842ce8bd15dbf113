//! RFC 9457 `application/problem+json` responses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Prefix of every problem `type`; the suffix is a stable, documented code.
pub const PROBLEM_TYPE_BASE: &str = "https://tally.dev/problems/";

/// A problem detail. `type` is stable per refusal so clients can branch on it; `detail` is for
/// humans. 5xx problems never carry internals: use [`Problem::internal`].
///
/// It is also the `Problem` schema of both OpenAPI documents (served as
/// `application/problem+json`), so the field docs below are written for API clients.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(description = "An RFC 9457 problem detail. `type` is stable per kind of refusal \
                   (`https://tally.dev/problems/<code>`): branch on it, not on `title` or `detail`. \
                   Extension members carry the numbers behind a refusal (e.g. `available` and \
                   `requested` on insufficient-funds).")]
pub struct Problem {
    /// `https://tally.dev/problems/<code>`, one stable code per kind of refusal.
    #[serde(rename = "type")]
    #[schema(format = "uri", example = "https://tally.dev/problems/insufficient-funds")]
    pub type_uri: String,
    /// A short summary of the kind of problem, for humans.
    #[schema(example = "Insufficient funds")]
    pub title: String,
    /// The HTTP status code, repeated.
    #[schema(example = 422)]
    pub status: u16,
    /// What went wrong in this occurrence, for humans.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, example = "insufficient funds: 700 available, 800 requested")]
    pub detail: Option<String>,
    /// Extension members (RFC 9457 §3.2), e.g. `available` on insufficient funds.
    #[serde(flatten, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extensions: serde_json::Map<String, serde_json::Value>,
    /// Sent as the `Retry-After` header, not in the body.
    #[serde(skip)]
    pub retry_after_s: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &str, title: &str) -> Self {
        Self {
            type_uri: format!("{PROBLEM_TYPE_BASE}{code}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: None,
            extensions: serde_json::Map::new(),
            retry_after_s: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn extension(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extensions.insert(key.to_owned(), value.into());
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    pub fn not_found(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, "Not found").detail(detail)
    }

    /// A 500 that says nothing about why: the cause is logged by the caller, not sent.
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal server error")
            .detail("The request could not be completed. It has been logged; retry later.")
    }

    /// A 503 for a dependency that is down; the client may retry.
    pub fn unavailable(retry_after_s: u64) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable")
            .detail("A dependency is unavailable; retry later.")
            .retry_after(retry_after_s)
    }

    /// A 503 for a database that cannot be reached, broke the connection, is restarting or in
    /// recovery, or is a standby after a failover. The request itself is fine: retry it (with
    /// its Idempotency-Key, a command that did commit before the failure is replayed, not
    /// applied twice; without one, it may have taken effect).
    pub fn database_unavailable(retry_after_s: u64) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database-unavailable",
            "Database unavailable",
        )
        .detail("The database is unreachable or failing over; retry later (a command with the same Idempotency-Key).")
        .retry_after(retry_after_s)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after_s;
        let mut response = (status, axum::Json(self)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

/// Turns any unmatched route into a problem instead of an empty 404.
pub async fn fallback() -> Problem {
    Problem::not_found("no-route", "No such endpoint.")
}

/// Turns a known route called with the wrong method into a problem instead of an empty 405.
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
    )
}

/// `GET /health`: the process is alive and serving (dependencies are `/ready`'s business).
#[utoipa::path(
    get,
    path = "/health",
    tag = "ops",
    summary = "Liveness: the process is alive and serving",
    responses((status = 200, description = "The process is alive.", body = String, content_type = "text/plain"))
)]
pub async fn health() -> &'static str {
    "ok"
}
