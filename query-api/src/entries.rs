//! `GET /v1/entries/{id}`: a journal entry and its legs, folded from the entry's own stream in
//! the log (ADR 0004). The stream holds one event per state change of the entry, so reading it
//! is one short indexed read; no read model is needed for it, and it is never stale beyond the
//! replica's lag (a consistency token waits for the write).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tally_domain::{Entry, EntryStatus};
use tally_event_store::{EventStore, READ_LIMIT_MAX};
use tally_service::Problem;
use tally_service::auth::{Reader, Require};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::accounts::ConsistentWith;
use crate::audit::{corrupt, log_source, store_unavailable};
use crate::routes::{PROBLEM_JSON, Params, path_id};

/// One leg of an entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntryLegView {
    /// The leg's index in the entry.
    pub leg: usize,
    pub account: Uuid,
    /// `debit` (the account's balance went down) or `credit`.
    pub direction: &'static str,
    pub amount: i64,
    #[schema(example = "EUR")]
    pub currency: String,
}

/// A journal entry as its stream in the log shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntryView {
    pub entry_id: Uuid,
    /// `completed`, `pending`, `posted`, `voided` or `expired`.
    pub status: &'static str,
    pub reference: String,
    pub legs: Vec<EntryLegView>,
    pub created_at: Option<DateTime<Utc>>,
    /// A pending entry's deadline.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it became final (completed, posted, voided or expired).
    pub finished_at: Option<DateTime<Utc>>,
    /// The entry stream's version.
    pub version: i64,
    /// Global log position of the entry's last event.
    pub position: i64,
}

#[utoipa::path(
    get,
    path = "/v1/entries/{id}",
    tag = "entries",
    security(("bearerAuth" = ["reader"])),
    summary = "A journal entry and every leg of it, folded from its stream in the log",
    params(
        ("id" = Uuid, Path, description = "The entry's id (a UUID)."),
        ("X-Consistency-Token" = Option<String>, Header, description = "Wait until the log has that write."),
        ConsistentWith,
    ),
    responses(
        (status = 200, description = "The entry.", body = EntryView),
        (status = 400, description = "`invalid-consistency-token`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 404, description = "`entry-not-found`.", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "`unknown-consistency-token`: the token names no write in the log.",
         body = Problem, content_type = PROBLEM_JSON),
        (status = 503, description = "`database-unavailable` or `not-yet-consistent`; retry after `Retry-After` seconds.",
         body = Problem, content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_entry(
    _: Require<Reader>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Params(query): Params<ConsistentWith>,
) -> Response {
    let read = async {
        let entry_id = path_id(&id, "entry-not-found", "entry")?;
        let pool = log_source(&state, &headers, query.consistent_with.as_deref()).await?;
        let not_found = || Problem::not_found("entry-not-found", "No entry with this id.").into_response();
        let events = EventStore::new(pool)
            .read_stream(entry_id, 0, READ_LIMIT_MAX)
            .await
            .map_err(store_unavailable)?;
        let mut entry = Entry::default();
        let mut at = (0, 0);
        for stored in &events {
            if stored.stream_type != tally_domain::entry::STREAM_TYPE {
                return Err(not_found());
            }
            let event =
                tally_schemas::decode_entry_event(&stored.event_type, stored.schema_version as u32, &stored.payload)
                    .map_err(|e| corrupt(format!("{} v{} of {entry_id}: {e}", stored.event_type, stored.version)))?;
            entry.apply(event);
            at = (stored.version, stored.position);
        }
        if entry.status == EntryStatus::NotCreated {
            return Err(not_found());
        }
        Ok(EntryView {
            entry_id,
            status: entry.status.as_str(),
            legs: entry
                .legs
                .iter()
                .enumerate()
                .map(|(leg, l)| EntryLegView {
                    leg,
                    account: l.account,
                    direction: l.direction.as_str(),
                    amount: l.amount.get(),
                    currency: l.currency.to_string(),
                })
                .collect(),
            reference: entry.reference,
            created_at: entry.created_at,
            expires_at: entry.expires_at,
            finished_at: entry.finished_at,
            version: at.0,
            position: at.1,
        })
    };
    match read.await {
        Ok(view) => Json(view).into_response(),
        Err(response) => response,
    }
}
