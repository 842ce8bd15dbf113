//! The overview (`ops`): write rate, command outcomes, latency quantiles, writer queue, relay
//! leader and lag, projection lag per partition, replica lag and rotation, and charts of the
//! last minutes, all from the sampler's ring. The live part is a fragment
//! (`/overview/live`) the page fetches again every couple of seconds.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{Markup, html};
use tally_service::auth::Role;

use crate::AppState;
use crate::sampler::{self, Point};
use crate::session::Session;
use crate::views::{self, Nav, badge, number, sparkline};

/// The window the latency quantiles and the rate cards are computed over.
const WINDOW_S: i64 = 30;
/// How often the page fetches the fragment again (milliseconds).
const REFRESH_MS: u32 = 2_000;

/// `GET /`.
pub async fn page(State(state): State<AppState>, session: Session) -> Response {
    if let Err(refused) = session.require(Role::Ops) {
        return refused;
    }
    let body = html! {
        h1 { "Overview" }
        div #live data-live="/overview/live" data-every=(REFRESH_MS) { (fragment(&state.samples.points())) }
    };
    views::page("Overview", &session, Nav::Overview, body)
}

/// `GET /overview/live`: the fragment alone.
pub async fn live(State(state): State<AppState>, session: Session) -> Response {
    if !session.principal.has(Role::Ops) {
        return (StatusCode::FORBIDDEN, "the overview needs the ops role").into_response();
    }
    Html(fragment(&state.samples.points()).into_string()).into_response()
}

/// The point at least [`WINDOW_S`] before `latest`, or the oldest one.
fn window_start(points: &[Point]) -> Option<&Point> {
    let latest = points.last()?;
    points
        .iter()
        .rev()
        .find(|p| (latest.at - p.at).num_seconds() >= WINDOW_S)
        .or_else(|| points.first())
}

fn fragment(points: &[Point]) -> Markup {
    let Some(latest) = points.last() else {
        return html! { p.hint { "No samples yet: the first scrape of the services' /metrics is under way." } };
    };
    let start = window_start(points).unwrap_or(latest);
    let rate = sampler::rate(start, latest);
    let p50 = sampler::quantile(start, latest, 0.5);
    let p99 = sampler::quantile(start, latest, 0.99);
    let pairs: Vec<(&Point, &Point)> = points.iter().zip(points.iter().skip(1)).collect();
    let rates: Vec<f64> = pairs.iter().map(|(a, b)| sampler::rate(a, b)).collect();
    let p99s: Vec<f64> = pairs
        .iter()
        .map(|(a, b)| sampler::quantile(a, b, 0.99).unwrap_or(0.0) * 1000.0)
        .collect();
    let queue: Vec<f64> = points.iter().map(|p| p.queue_commands).collect();
    let relay_lag: Vec<f64> = points.iter().map(Point::relay_lag_events).collect();
    let projection_lag: Vec<f64> = points.iter().map(Point::projection_lag_events).collect();
    let replica_lag: Vec<f64> = points.iter().map(Point::replica_lag_seconds_max).collect();
    let leader = latest.relays.iter().find(|r| r.leader);
    let ms = |s: Option<f64>| s.map_or("–".to_owned(), |s| format!("{} ms", number(s * 1000.0)));
    html! {
        p.hint { "Sampled " (latest.at.format("%H:%M:%S UTC")) "; rates and latencies over the last "
            (WINDOW_S) " s; charts over the last " (points.len()) " samples." }
        div.cards {
            div.card #write-rate { div.value { (number(rate)) " /s" } div.label { "commands (write rate)" } }
            div.card #commands-total { div.value { (number(latest.commands_total())) } div.label { "commands since start" } }
            div.card { div.value { (ms(p50)) } div.label { "p50 command latency" } }
            div.card { div.value { (ms(p99)) } div.label { "p99 command latency" } }
            div.card { div.value { (number(latest.queue_commands)) } div.label { "writer queue (commands)" } }
            div.card {
                div.value { @match leader { Some(r) => (r.url), None => "none" } }
                div.label { "relay leader" }
            }
            div.card { div.value { (number(latest.relay_lag_events())) " events" } div.label { "relay lag" } }
        }
        h2 { "Command outcomes (since each command API started)" }
        table #outcomes {
            tr { th { "outcome" } th.num { "commands" } }
            @for (outcome, count) in &latest.commands {
                tr { td { (outcome) } td.num { (number(*count)) } }
            }
            @if latest.commands.is_empty() { tr { td colspan="2" { "no command yet" } } }
        }
        div.charts {
            (sparkline("write rate", "/s", &rates))
            (sparkline("p99 latency", "ms", &p99s))
            (sparkline("writer queue", "commands", &queue))
            (sparkline("relay lag", "events", &relay_lag))
            (sparkline("projection lag (all partitions)", "events", &projection_lag))
            (sparkline("replica lag (max)", "s", &replica_lag))
        }
        h2 { "Relays" }
        table {
            tr { th { "relay" } th { "role" } th.num { "lag events" } th.num { "lag s" } }
            @for r in &latest.relays {
                tr {
                    td { (r.url) }
                    td { @if r.leader { (badge(true, "leader")) } @else { "standby" } }
                    td.num { (number(r.lag_events)) }
                    td.num { (number(r.lag_seconds)) }
                }
            }
        }
        h2 { "Projection lag per partition" }
        table {
            tr { th { "projection" } th.num { "partition" } th.num { "lag events" } th.num { "lag s" } }
            @for p in &latest.projections {
                tr { td { (p.projection) } td.num { (p.partition) } td.num { (number(p.lag_events)) } td.num { (number(p.lag_seconds)) } }
            }
            @if latest.projections.is_empty() { tr { td colspan="4" { "no projector reported yet" } } }
        }
        h2 { "Replicas" }
        table {
            tr { th { "query API" } th { "replica" } th { "rotation" } th.num { "lag bytes" } th.num { "lag s" } }
            @for r in &latest.replicas {
                tr {
                    td { (r.instance) } td { (r.replica) }
                    td { (badge(r.usable, if r.usable { "in rotation" } else { "out of rotation" })) }
                    td.num { (r.lag_bytes.map_or("–".to_owned(), number)) }
                    td.num { (r.lag_seconds.map_or("–".to_owned(), number)) }
                }
            }
            @if latest.replicas.is_empty() { tr { td colspan="5" { "no replica reported (reads may go to the primary)" } } }
        }
        h2 { "Services" }
        table #services {
            tr { th { "service" } th { "metrics at" } th { "state" } }
            @for t in &latest.targets {
                tr {
                    td { (t.kind) } td { (t.url) }
                    td {
                        @match &t.error {
                            None => (badge(true, "up")),
                            Some(e) => { (badge(false, "down")) " " span.hint { (e) } }
                        }
                    }
                }
            }
        }
    }
}
