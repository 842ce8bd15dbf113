//! Projections (`ops`): per projection and partition the status `tally projections status`
//! shows (generation, state, worker, checkpoint, lag, errors, dead letters), the buttons of
//! `pause`, `resume`, `retry` and `rebuild`, and each rebuild's progress bar, rate and ETA
//! until the switch. The table and the rebuilds are a fragment (`/projections/live`) the page
//! fetches again every couple of seconds.

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use tally_projectors::ops;
use tally_service::auth::Role;

use crate::AppState;
use crate::session::Session;
use crate::views::{self, Nav, badge};

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    /// What the last action did, shown once.
    note: Option<String>,
}

/// `GET /projections`.
pub async fn page(State(state): State<AppState>, session: Session, Query(query): Query<PageQuery>) -> Response {
    if let Err(refused) = session.require(Role::Ops) {
        return refused;
    }
    let body = html! {
        h1 { "Projections" }
        @if let Some(note) = &query.note { p.problem #note { (note) } }
        div #live data-live="/projections/live" data-every="1000" { (fragment(&state, &session).await) }
        p.hint {
            "Pause stops applying events after the batches in hand (reads go on); retry lets a partition "
            "stopped at a poison event try it again; rebuild builds a new generation from the log and "
            "switches readers to it in one transaction."
        }
    };
    views::page("Projections", &session, Nav::Projections, body)
}

/// `GET /projections/live`.
pub async fn live(State(state): State<AppState>, session: Session) -> Response {
    if !session.principal.has(Role::Ops) {
        return (StatusCode::FORBIDDEN, "the projections page needs the ops role").into_response();
    }
    Html(fragment(&state, &session).await.into_string()).into_response()
}

/// A button posting `action` for `projection`.
fn button(session: &Session, projection: &str, action: &str, label: &str) -> Markup {
    html! {
        form.inline method="post" action=(format!("/projections/{projection}/{action}")) {
            input type="hidden" name="csrf" value=(session.csrf);
            button type="submit" class=[(action == "rebuild").then_some("danger")] data-action=(format!("{action}-{projection}")) { (label) }
        }
    }
}

async fn fragment(state: &AppState, session: &Session) -> Markup {
    let status = ops::status(&state.pool).await;
    let jobs = state.rebuilds.jobs();
    let mut projections: Vec<String> = tally_projectors::catalog::PROJECTIONS
        .iter()
        .map(|p| (*p).to_owned())
        .collect();
    if let Ok(rows) = &status {
        for row in rows {
            if !projections.contains(&row.projection) {
                projections.push(row.projection.clone());
            }
        }
    }
    html! {
        h2 { "Controls" }
        table {
            tr { th { "projection" } th { "actions" } }
            @for p in &projections {
                tr {
                    td { (p) }
                    td {
                        (button(session, p, "pause", "Pause")) " "
                        (button(session, p, "resume", "Resume")) " "
                        (button(session, p, "retry", "Retry failed")) " "
                        (button(session, p, "rebuild", "Rebuild"))
                    }
                }
            }
        }
        h2 { "Rebuilds" }
        @if jobs.is_empty() { p.hint { "No rebuild started from this console yet." } }
        @for job in &jobs {
            div.rebuild #(format!("rebuild-{}", job.projection)) data-state=(match &job.outcome { None => "running", Some(Ok(_)) => "done", Some(Err(_)) => "failed" }) {
                strong { (job.projection) } " started " (job.started_at.format("%H:%M:%S UTC")) ": "
                progress max="1000" value=(job.per_mille()) {}
                " " (job.done) " / " (job.total) " events, "
                (format!("{:.0}", job.rate())) " events/s"
                @if let Some(eta) = job.eta() { ", ETA " (eta.as_secs()) " s" }
                @match &job.outcome {
                    None => { " " (badge(true, "running")) }
                    Some(Ok(report)) => { " " (badge(true, "switched")) " " span.report { (report) } }
                    Some(Err(e)) => { " " (badge(false, "failed")) " " span.report { (e) } }
                }
            }
        }
        h2 { "Partitions" }
        @match &status {
            Err(e) => (super::database_problem(e)),
            Ok(rows) => {
                table #partitions {
                    tr {
                        th { "projection" } th.num { "partition" } th.num { "generation" } th { "state" } th { "worker" }
                        th.num { "stream seq" } th.num { "position" } th.num { "lag events" } th.num { "lag s" }
                        th.num { "applied" } th.num { "duplicates" } th.num { "dead letters" } th { "last error" }
                    }
                    @for r in rows {
                        tr {
                            td { (r.projection) }
                            td.num { (r.partition) }
                            td.num {
                                (r.generation.map_or("–".to_owned(), |g| g.to_string()))
                                @if let Some(b) = r.building { " → " (b) " (building)" }
                            }
                            td { (badge(r.state == "running", &r.state)) }
                            td { (r.worker.as_deref().unwrap_or("–")) }
                            td.num { (r.stream_sequence) }
                            td.num { (r.position) }
                            td.num { (r.lag_events) }
                            td.num { (format!("{:.1}", r.lag_seconds)) }
                            td.num { (r.applied) }
                            td.num { (r.duplicates) }
                            td.num { (r.dead_letters) }
                            td {
                                @if let Some(e) = &r.last_error {
                                    (e) @if let Some(at) = r.last_error_at { span.hint { " (" (at.format("%H:%M:%S")) ")" } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ActionForm {
    csrf: String,
    /// `retry` only: one partition.
    partition: Option<i32>,
}

/// `POST /projections/{name}/{action}`: pause, resume, retry or rebuild; back to the page
/// with what was done.
pub async fn act(
    State(state): State<AppState>,
    session: Session,
    Path((name, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(refused) = session.require(Role::Ops) {
        return refused;
    }
    if let Err(refused) = session.check_csrf(&form.csrf) {
        return refused;
    }
    let note = match action.as_str() {
        "pause" | "resume" => ops::set_paused(&state.pool, &name, action == "pause")
            .await
            .map(|p| format!("{p}: {action}d")),
        "retry" => ops::retry(&state.pool, &name, form.partition)
            .await
            .map(|n| format!("{name}: {n} failed partition(s) will retry")),
        "rebuild" => {
            return match state.rebuilds.start(state.pool.clone(), &name, state.partitions) {
                Ok(p) => redirect_with(&format!("{p}: rebuild started")),
                Err(e) => views::message_page(StatusCode::CONFLICT, "Rebuild not started", &e, Some(&session)),
            };
        }
        _ => {
            return views::message_page(
                StatusCode::NOT_FOUND,
                "No such action",
                "Projections can be paused, resumed, retried or rebuilt.",
                Some(&session),
            );
        }
    };
    match note {
        Ok(note) => redirect_with(&note),
        Err(ops::OpsError::Unknown(..)) => views::message_page(
            StatusCode::NOT_FOUND,
            "No such projection",
            &format!("{name:?} is not a projection or read model."),
            Some(&session),
        ),
        Err(ops::OpsError::Database(e)) => views::message_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Database unavailable",
            &format!("The database (TALLY_DATABASE_URL) cannot be written: {e}. Nothing was changed."),
            Some(&session),
        ),
    }
}

fn redirect_with(note: &str) -> Response {
    let query: String = url_encode(note);
    Redirect::to(&format!("/projections?note={query}")).into_response()
}

/// Percent-encodes `text` for a query string value.
pub(crate) fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
