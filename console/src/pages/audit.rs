//! Audit (`auditor`): an account's events exactly as stored, with their hashes, and its hash
//! chain checked in the page with the event store's own rules
//! ([`tally_event_store::verify::ChainChecker`], which recomputes each hash from the stored
//! bytes: the console does not hash anything itself): green, or the first broken link in red.
//! Also the global feed in commit order, and an export of it as the JSON Lines `tally audit
//! export` writes (one event per line, as the API sent it).

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use bytes::Bytes;
use maud::{Markup, html};
use serde::Deserialize;
use tally_event_store::StoredEvent;
use tally_event_store::verify::{ChainBreak, ChainChecker};
use tally_service::auth::Role;
use uuid::Uuid;

use super::projections::url_encode;
use crate::AppState;
use crate::api::{ApiError, AuditEvent, FeedPage, RawFeedPage, StreamHistory};
use crate::session::Session;
use crate::views::{self, Nav, json_block};

/// Events of one stream read (and chain-checked) for its page; a longer stream is checked
/// this far and the page says so.
const STREAM_EVENTS_MAX: usize = 10_000;
/// Events asked for per request (the API's page maximum).
const API_PAGE_EVENTS: usize = 1_000;
/// Feed events per page of the feed table.
const FEED_PAGE_EVENTS: usize = 50;

#[derive(Debug, Deserialize)]
pub struct FeedQuery {
    /// The feed checkpoint to continue after.
    after: Option<String>,
    /// A stream (account) id typed in the form.
    stream: Option<String>,
}

/// `GET /audit`: the stream form and the global feed.
pub async fn page(State(state): State<AppState>, session: Session, Query(query): Query<FeedQuery>) -> Response {
    if let Err(refused) = session.require(Role::Auditor) {
        return refused;
    }
    if let Some(stream) = query.stream.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        return match Uuid::try_parse(stream) {
            Ok(id) => Redirect::to(&format!("/audit/streams/{id}")).into_response(),
            Err(_) => views::message_page(
                StatusCode::BAD_REQUEST,
                "Not a stream id",
                "A stream id is a UUID.",
                Some(&session),
            ),
        };
    }
    let mut path = format!("/v1/audit/events?limit={FEED_PAGE_EVENTS}");
    if let Some(after) = &query.after {
        path.push_str(&format!("&after={}", url_encode(after)));
    }
    let feed = match state.api.get::<FeedPage>(&session.token, &path).await {
        Ok(feed) => feed,
        Err(e) => return e.page(&session),
    };
    let body = html! {
        h1 { "Audit" }
        form.search method="get" action="/audit" {
            label { "Account (stream) id " input type="search" name="stream" size="40"; }
            button type="submit" { "Show its events and check its chain" }
        }
        p {
            a href="/audit/export" download { button type="button" #export { "Export the feed (JSON Lines)" } }
            span.hint { " The same lines as " code { "tally audit export" } ": every event, in commit order, as stored." }
        }
        h2 { "Global feed (commit order)" }
        p.hint { "Head of the log: position " (feed.head_position) "." }
        table #feed {
            tr { th.num { "position" } th { "checkpoint" } th { "recorded" } th { "stream" } th.num { "version" } th { "event" } th { "hash" } }
            @for e in &feed.events {
                tr {
                    td.num { (e.position) } td.mono { (e.checkpoint) }
                    td { (e.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f")) }
                    td { (e.stream_type) " " a.mono href=(format!("/audit/streams/{}", e.stream_id)) { (e.stream_id) } }
                    td.num { (e.version) } td { (e.event_type) " v" (e.schema_version) }
                    td.mono { (short(&e.hash)) }
                }
            }
            @if feed.events.is_empty() { tr { td colspan="7" { "no event after this checkpoint" } } }
        }
        @if feed.events.len() == FEED_PAGE_EVENTS {
            a href=(format!("/audit?after={}", url_encode(&feed.checkpoint))) { "Next page →" }
        }
    };
    views::page("Audit", &session, Nav::Audit, body)
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(16)]
}

/// An event as the store holds it, rebuilt from what the API sent (the API sends payload
/// and metadata as the stored bytes and the hashes in hex), for the chain rules.
fn stored(event: &AuditEvent) -> Result<StoredEvent, String> {
    let decode = |what: &str, text: &str| hex::decode(text).map_err(|_| format!("the {what} {text:?} is not hex"));
    let tx_id = event
        .checkpoint
        .split_once('.')
        .and_then(|(tx, _)| tx.parse().ok())
        .unwrap_or_default();
    Ok(StoredEvent {
        position: event.position,
        tx_id,
        stream_type: event.stream_type.clone(),
        stream_id: event.stream_id,
        version: event.version,
        event_id: event.event_id,
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        payload: event.payload.get().to_owned(),
        metadata: event.metadata.get().to_owned(),
        recorded_at: event.recorded_at,
        prev_hash: event.prev_hash.as_deref().map(|h| decode("prev_hash", h)).transpose()?,
        hash: decode("hash", &event.hash)?,
    })
}

/// What the chain check found.
enum Chain {
    Intact { events: u64 },
    Broken(ChainBreak),
    Unreadable { version: i64, why: String },
}

fn check_chain(events: &[AuditEvent]) -> Chain {
    let mut checker = ChainChecker::new();
    for event in events {
        let stored = match stored(event) {
            Ok(s) => s,
            Err(why) => {
                return Chain::Unreadable {
                    version: event.version,
                    why,
                };
            }
        };
        if let Err(broken) = checker.check(&stored) {
            return Chain::Broken(broken);
        }
    }
    Chain::Intact {
        events: checker.events_checked(),
    }
}

/// Every event of a stream, up to [`STREAM_EVENTS_MAX`]; whether there were more.
async fn read_stream(state: &AppState, token: &str, id: Uuid) -> Result<(Vec<AuditEvent>, bool), ApiError> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page: StreamHistory = state
            .api
            .get(
                token,
                &format!("/v1/audit/streams/{id}/events?after={after}&limit={API_PAGE_EVENTS}"),
            )
            .await?;
        let full = page.events.len() == API_PAGE_EVENTS;
        events.extend(page.events);
        match page.next_after {
            Some(next) if full && events.len() < STREAM_EVENTS_MAX => after = next,
            _ => return Ok((events, full)),
        }
    }
}

/// `GET /audit/streams/{id}`: the events as stored, and the chain checked.
pub async fn stream(State(state): State<AppState>, session: Session, Path(id): Path<String>) -> Response {
    if let Err(refused) = session.require(Role::Auditor) {
        return refused;
    }
    let Ok(id) = Uuid::try_parse(&id) else {
        return views::message_page(
            StatusCode::NOT_FOUND,
            "No such stream",
            "A stream id is a UUID.",
            Some(&session),
        );
    };
    let (events, truncated) = match read_stream(&state, &session.token, id).await {
        Ok(read) => read,
        Err(e) => return e.page(&session),
    };
    let chain = check_chain(&events);
    let broken_version = match &chain {
        Chain::Broken(b) => Some(b.version),
        Chain::Unreadable { version, .. } => Some(*version),
        Chain::Intact { .. } => None,
    };
    let body = html! {
        h1 { "Stream " span.mono { (id) } }
        @if session.principal.has(Role::Reader) { p { a href=(format!("/accounts/{id}")) { "Its account page" } } }
        (chain_banner(&chain, truncated))
        @if events.is_empty() { p { "No event in this stream." } }
        @else { (events_table(&events, broken_version)) }
    };
    views::page("Stream", &session, Nav::Audit, body)
}

fn chain_banner(chain: &Chain, truncated: bool) -> Markup {
    html! {
        @match chain {
            Chain::Intact { events } => div.chain.ok #chain data-chain="intact" {
                "✔ Chain intact: " (events) " event(s), every hash recomputed from the stored bytes and every link followed."
                @if truncated { " (The first " (STREAM_EVENTS_MAX) " events only; `tally audit verify --stream` checks all.)" }
            },
            Chain::Broken(b) => div.chain.bad #chain data-chain="broken" data-version=(b.version) {
                "✘ Chain broken at version " (b.version) " (position " (b.position) ", event " (b.event_id) "): "
                (b.kind) ": " (b.detail) ". The events after it cannot be trusted either."
            },
            Chain::Unreadable { version, why } => div.chain.bad #chain data-chain="broken" data-version=(version) {
                "✘ Chain cannot be checked at version " (version) ": " (why) "."
            },
        }
    }
}

fn events_table(events: &[AuditEvent], broken: Option<i64>) -> Markup {
    html! {
        table #events {
            tr { th.num { "version" } th.num { "position" } th { "recorded" } th { "event" } th { "payload (as stored)" } th { "metadata" } th { "prev_hash / hash" } }
            @for e in events {
                @let class = match broken { Some(v) if v == e.version => "broken", Some(v) if e.version > v => "after-break", _ => "intact" };
                tr class=(class) data-version=(e.version) {
                    td.num { (e.version) } td.num { (e.position) }
                    td { (e.recorded_at.format("%Y-%m-%d %H:%M:%S%.6f")) }
                    td { (e.event_type) " v" (e.schema_version) br; span.hint.mono { (e.event_id) } }
                    td { (json_block(e.payload.get())) }
                    td { (json_block(e.metadata.get())) }
                    td.mono.link { (e.prev_hash.as_deref().unwrap_or("(chain start)")) br; (e.hash) }
                }
            }
        }
    }
}

/// `GET /audit/export`: the whole feed as JSON Lines, streamed page by page with the user's
/// token. A failure mid-way ends the download with an error (the browser shows it failed)
/// rather than a file that looks whole.
pub async fn export(State(state): State<AppState>, session: Session) -> Response {
    if let Err(refused) = session.require(Role::Auditor) {
        return refused;
    }
    // The first page is read before answering, so an outage is a page, not a broken file.
    let first: RawFeedPage = match state
        .api
        .get(&session.token, &format!("/v1/audit/events?limit={API_PAGE_EVENTS}"))
        .await
    {
        Ok(page) => page,
        Err(e) => return e.page(&session),
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let api = state.api.clone();
    let token = session.token.clone();
    tokio::spawn(async move {
        let mut page = first;
        loop {
            let mut chunk = Vec::new();
            for event in &page.events {
                chunk.extend_from_slice(event.get().as_bytes());
                chunk.push(b'\n');
            }
            if sender.send(Ok(Bytes::from(chunk))).await.is_err() || page.events.is_empty() {
                return;
            }
            let path = format!(
                "/v1/audit/events?limit={API_PAGE_EVENTS}&after={}",
                url_encode(&page.checkpoint)
            );
            page = match api.get(&token, &path).await {
                Ok(next) => next,
                Err(e) => {
                    let _ = sender.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
        }
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let filename = format!("tally-audit-{}.jsonl", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"));
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
