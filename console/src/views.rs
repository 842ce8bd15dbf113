//! What the pages share: the layout and navigation, problem pages, money in minor units,
//! and the small SVG charts of the overview.
//!
//! Charts are drawn here, on the server, as inline SVG polylines: no charting library and no
//! JavaScript toolchain is needed, and a page polled every few seconds (`assets/console.js`
//! swaps the fragment in) stays a few kilobytes.

use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use tally_service::auth::Role;

use crate::session::Session;

/// Which page the navigation marks as current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    None,
    Overview,
    Projections,
    Accounts,
    Audit,
}

/// The navigation entries: page, path, label and the role it needs.
const NAV: [(Nav, &str, &str, Role); 4] = [
    (Nav::Overview, "/", "Overview", Role::Ops),
    (Nav::Projections, "/projections", "Projections", Role::Ops),
    (Nav::Accounts, "/accounts", "Accounts", Role::Reader),
    (Nav::Audit, "/audit", "Audit", Role::Auditor),
];

/// A whole page with status 200.
pub fn page(title: &str, session: &Session, nav: Nav, body: Markup) -> Response {
    page_with_status(StatusCode::OK, title, Some(session), nav, body)
}

/// A whole page: header with the links the user's roles open, then `body`.
pub fn page_with_status(
    status: StatusCode,
    title: &str,
    session: Option<&Session>,
    nav: Nav,
    body: Markup,
) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tally console" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "Tally" }
                    @if let Some(session) = session {
                        nav {
                            @for (entry, path, label, role) in NAV {
                                @if session.principal.has(role) {
                                    a href=(path) class=[(entry == nav).then_some("current")] { (label) }
                                }
                            }
                        }
                        form.signout method="post" action="/sign-out" {
                            span.who { (session.principal.subject) " · "
                                (session.principal.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")) }
                            input type="hidden" name="csrf" value=(session.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    };
    (status, Html(markup.into_string())).into_response()
}

/// A page that only says what went wrong (and what to do).
pub fn message_page(status: StatusCode, title: &str, message: &str, session: Option<&Session>) -> Response {
    let body = html! {
        h1 { (title) }
        p.problem { (message) }
    };
    page_with_status(status, title, session, Nav::None, body)
}

/// Any path the console does not serve.
pub async fn not_found() -> Response {
    message_page(
        StatusCode::NOT_FOUND,
        "Not found",
        "The console has no page here.",
        None,
    )
}

/// `GET /assets/console.css`.
pub async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../assets/console.css"),
    )
        .into_response()
}

/// `GET /assets/console.js`: the live refresh of fragments (`data-live`), and nothing else.
pub async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/console.js"),
    )
        .into_response()
}

/// Digits after the decimal point of an ISO 4217 currency: 2 unless listed.
pub fn minor_digits(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX" | "UYI" | "VND"
        | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        "CLF" | "UYW" => 4,
        _ => 2,
    }
}

/// `amount_minor` of `currency` in major units for people (`-1234` EUR → `-12.34 EUR`),
/// computed on integers only.
pub fn money(amount_minor: i64, currency: &str) -> String {
    let digits = minor_digits(currency);
    let sign = if amount_minor < 0 { "-" } else { "" };
    let magnitude = amount_minor.unsigned_abs();
    if digits == 0 {
        return format!("{sign}{magnitude} {currency}");
    }
    let scale = 10u64.pow(digits);
    format!(
        "{sign}{}.{:0width$} {currency}",
        magnitude / scale,
        magnitude % scale,
        width = digits as usize
    )
}

/// A small line chart of `points` (oldest first), with its latest value as a caption.
pub fn sparkline(title: &str, unit: &str, points: &[f64]) -> Markup {
    const WIDTH: f64 = 300.0;
    const HEIGHT: f64 = 60.0;
    let max = points.iter().copied().fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let step = if points.len() > 1 {
        WIDTH / (points.len() - 1) as f64
    } else {
        WIDTH
    };
    let coordinates: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, HEIGHT - (v.max(0.0) / top) * HEIGHT))
        .collect();
    let latest = points.last().copied();
    html! {
        figure.chart {
            figcaption {
                (title) ": "
                strong { @match latest { Some(v) => { (number(v)) " " (unit) }, None => "no samples yet" } }
                span.hint { " (max " (number(max)) ", " (points.len()) " samples)" }
            }
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) width="300" height="60" role="img" aria-label=(title) {
                line x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) class="axis" {}
                @if coordinates.len() > 1 {
                    polyline points=(coordinates.join(" ")) {}
                }
            }
        }
    }
}

/// A measurement for people: integers as integers, small values with three significant digits.
pub fn number(value: f64) -> String {
    if !value.is_finite() {
        "–".to_owned()
    } else if value == value.trunc() || value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.4}")
    }
}

/// A status badge: green when `ok`.
pub fn badge(ok: bool, text: &str) -> Markup {
    html! { span class=(if ok { "badge ok" } else { "badge bad" }) { (text) } }
}

/// Raw JSON for a `<pre>`, escaped.
pub fn json_block(text: &str) -> Markup {
    html! { pre.json { (text) } }
}

/// Marks markup built elsewhere as already escaped (only for maud's own output).
pub fn trusted(markup: String) -> Markup {
    PreEscaped(markup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_rendered_with_the_currencys_minor_units() {
        assert_eq!(money(123_456, "EUR"), "1234.56 EUR");
        assert_eq!(money(-5, "EUR"), "-0.05 EUR");
        assert_eq!(money(1500, "JPY"), "1500 JPY");
        assert_eq!(money(1_234, "KWD"), "1.234 KWD");
        assert_eq!(money(i64::MIN, "EUR"), "-92233720368547758.08 EUR");
    }

    #[test]
    fn a_sparkline_with_no_samples_says_so() {
        let svg = sparkline("write rate", "/s", &[]).into_string();
        assert!(svg.contains("no samples yet"));
    }
}
