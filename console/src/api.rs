//! The query API as the pages see it: every call carries the signed-in user's bearer token,
//! so the API's own role checks and limits apply to the console's users as to any client.
//! What the API sends is read into the types below (the fields the pages show); a failure is
//! an [`ApiError`], which becomes a page saying what happened, never a panic.

use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::session::Session;
use crate::views;

/// A client of one query API.
#[derive(Clone)]
pub struct QueryApi {
    client: reqwest::Client,
    base: String,
}

/// Why a call to the query API gave the page nothing to show.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No answer: refused, timed out, reset.
    #[error("the query API at {base} cannot be reached: {cause}")]
    Unreachable { base: String, cause: String },
    /// A problem answer (4xx/5xx), with its title and detail when it sent problem+json.
    #[error("the query API answered {status}: {title}")]
    Status {
        status: StatusCode,
        title: String,
        detail: Option<String>,
    },
    /// A 2xx whose body is not what this console expects (a version mismatch).
    #[error("the query API's answer could not be read: {0}")]
    Decode(String),
}

#[derive(Debug, Deserialize)]
struct ProblemBody {
    title: Option<String>,
    detail: Option<String>,
}

impl QueryApi {
    pub fn new(client: reqwest::Client, base: &str) -> Self {
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET {base}{path_and_query}` as `token`, the body as it came.
    pub async fn get_bytes(&self, token: &str, path_and_query: &str) -> Result<bytes::Bytes, ApiError> {
        let unreachable = |e: reqwest::Error| ApiError::Unreachable {
            base: self.base.clone(),
            cause: e.to_string(),
        };
        let response = self
            .client
            .get(format!("{}{path_and_query}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            return Ok(body);
        }
        let problem: Option<ProblemBody> = serde_json::from_slice(&body).ok();
        let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        Err(ApiError::Status {
            status,
            title: problem
                .as_ref()
                .and_then(|p| p.title.clone())
                .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned()),
            detail: problem.and_then(|p| p.detail),
        })
    }

    /// `GET {base}{path_and_query}` as `token`, read as `T`.
    pub async fn get<T: DeserializeOwned>(&self, token: &str, path_and_query: &str) -> Result<T, ApiError> {
        let body = self.get_bytes(token, path_and_query).await?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Decode(e.to_string()))
    }
}

impl ApiError {
    /// The page that tells the user what happened.
    pub fn page(&self, session: &Session) -> Response {
        match self {
            ApiError::Unreachable { .. } => views::message_page(
                StatusCode::BAD_GATEWAY,
                "Query API unavailable",
                &format!("{self}. The page will work again once it is back; reload to retry."),
                Some(session),
            ),
            ApiError::Status { status, title, detail } => {
                let text = match detail {
                    Some(detail) => format!("{title}: {detail}"),
                    None => title.clone(),
                };
                views::message_page(*status, title, &text, Some(session))
            }
            ApiError::Decode(_) => views::message_page(
                StatusCode::BAD_GATEWAY,
                "Unexpected answer",
                &self.to_string(),
                Some(session),
            ),
        }
    }

    /// Whether the API said there is no such thing.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

/// `GET /v1/accounts/{id}`.
#[derive(Debug, Deserialize)]
pub struct Account {
    pub account_id: Uuid,
    pub owner: String,
    pub currency: String,
    pub balance: i64,
    pub held: i64,
    pub available: i64,
    pub status: String,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

/// `GET /v1/accounts/{id}/statement`.
#[derive(Debug, Deserialize)]
pub struct Statement {
    pub lines: Vec<StatementLine>,
    pub has_more: bool,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct StatementLine {
    pub version: i64,
    pub recorded_at: DateTime<Utc>,
    pub kind: String,
    pub direction: String,
    pub amount: i64,
    pub currency: String,
    pub counterparty: Option<Uuid>,
    pub transfer_id: Option<Uuid>,
    pub reference: String,
    pub balance_after: i64,
}

/// `GET /v1/accounts/{id}/transfers`.
#[derive(Debug, Deserialize)]
pub struct Transfers {
    pub transfers: Vec<Transfer>,
    pub has_more: bool,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Transfer {
    pub transfer_id: Uuid,
    pub status: String,
    pub from_account: Option<Uuid>,
    pub to_account: Option<Uuid>,
    pub amount: i64,
    pub settled_amount: i64,
    pub currency: String,
    pub reference: String,
    pub created_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// `GET /v1/accounts/{id}/as-of`.
#[derive(Debug, Deserialize)]
pub struct AsOf {
    pub version: i64,
    pub recorded_at: DateTime<Utc>,
    pub owner: String,
    pub currency: String,
    pub balance: i64,
    pub held: i64,
    pub available: i64,
    pub status: String,
    pub overdraft_limit: i64,
}

/// An event exactly as stored (`/v1/audit/...`): payload and metadata as the hashed bytes.
#[derive(Debug, Deserialize)]
pub struct AuditEvent {
    pub position: i64,
    pub checkpoint: String,
    pub stream_type: String,
    pub stream_id: Uuid,
    pub version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: Box<RawValue>,
    pub metadata: Box<RawValue>,
    pub recorded_at: DateTime<Utc>,
    pub prev_hash: Option<String>,
    pub hash: String,
}

/// `GET /v1/audit/streams/{id}/events`.
#[derive(Debug, Deserialize)]
pub struct StreamHistory {
    pub events: Vec<AuditEvent>,
    pub next_after: Option<i64>,
}

/// `GET /v1/audit/events`.
#[derive(Debug, Deserialize)]
pub struct FeedPage {
    pub events: Vec<AuditEvent>,
    pub checkpoint: String,
    pub head_position: i64,
}

/// The same page with each event as the raw JSON the API sent, for the export.
#[derive(Debug, Deserialize)]
pub struct RawFeedPage {
    pub events: Vec<Box<RawValue>>,
    pub checkpoint: String,
}
