//! Accounts (`reader`): find an account by id or owner; its balance, holds (its pending
//! transfers), statement pages and transfers; and, for a user who is also an `auditor`, its
//! state as of a chosen time (folded from the log by the query API).
//!
//! An id is looked up through the query API with the user's token. The query API has no
//! owner lookup, so an owner search reads the live `account_balances` view through
//! `tally_projectors::ops::accounts_by_owner`; the account page itself is read through the
//! API. An external id does not exist in Tally yet, so there is nothing to search it by.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;
use tally_projectors::ops;
use tally_service::auth::Role;
use uuid::Uuid;

use super::projections::url_encode;
use crate::AppState;
use crate::api::{Account, AsOf, Statement, Transfers};
use crate::session::Session;
use crate::views::{self, Nav, badge, money};

/// Statement lines and transfers per page.
const PAGE_LINES: u32 = 50;

#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    q: Option<String>,
}

fn search_form(q: &str) -> Markup {
    html! {
        form.search method="get" action="/accounts" {
            label { "Account id or owner " input type="search" name="q" value=(q) size="40" autofocus; }
            button type="submit" { "Find" }
        }
        p.hint { "Owner search matches the start of the owner's name, case-insensitively. "
            "Accounts have no external id in Tally yet, so there is none to search by." }
    }
}

/// `GET /accounts?q=`: by id, straight to the account; else accounts by owner.
pub async fn search(State(state): State<AppState>, session: Session, Query(query): Query<SearchQuery>) -> Response {
    if let Err(refused) = session.require(Role::Reader) {
        return refused;
    }
    let q = query.q.as_deref().map(str::trim).unwrap_or_default();
    if let Ok(id) = Uuid::try_parse(q) {
        return Redirect::to(&format!("/accounts/{id}")).into_response();
    }
    let matches = if q.is_empty() {
        None
    } else {
        Some(ops::accounts_by_owner(&state.pool, q).await)
    };
    let body = html! {
        h1 { "Accounts" }
        (search_form(q))
        @match &matches {
            None => {}
            Some(Err(e)) => (super::database_problem(e)),
            Some(Ok(rows)) if rows.is_empty() => p { "No account's owner starts with " code { (q) } "." },
            Some(Ok(rows)) => {
                table #matches {
                    tr { th { "account" } th { "owner" } th.num { "balance" } th { "status" } }
                    @for r in rows {
                        tr {
                            td { a.mono href=(format!("/accounts/{}", r.account_id)) { (r.account_id) } }
                            td { (r.owner) }
                            td.num { (money(r.balance, &r.currency)) }
                            td { (r.status) }
                        }
                    }
                }
                @if rows.len() as i64 == ops::OWNER_MATCHES_MAX { p.hint { "Only the first " (rows.len()) " are shown: narrow the search." } }
            }
        }
    };
    views::page("Accounts", &session, Nav::Accounts, body)
}

#[derive(Debug, Deserialize)]
pub struct AccountQuery {
    /// The statement page to show (the API's opaque cursor).
    cursor: Option<String>,
    /// As-of time: RFC 3339, or a `datetime-local` value taken as UTC.
    at: Option<String>,
}

/// `datetime-local` sends `2026-12-05T06:30` (or with seconds), without a zone: taken as UTC.
fn parse_at(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .map(|t| t.and_utc())
}

/// `GET /accounts/{id}`.
pub async fn account(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Query(query): Query<AccountQuery>,
) -> Response {
    if let Err(refused) = session.require(Role::Reader) {
        return refused;
    }
    let Ok(id) = Uuid::try_parse(&id) else {
        return views::message_page(
            StatusCode::NOT_FOUND,
            "No such account",
            "An account id is a UUID.",
            Some(&session),
        );
    };
    let account: Account = match state.api.get(&session.token, &format!("/v1/accounts/{id}")).await {
        Ok(a) => a,
        Err(e) if e.is_not_found() => {
            return views::message_page(
                StatusCode::NOT_FOUND,
                "No such account",
                &format!("No account {id} is known to the read model (a new one may take a moment to appear)."),
                Some(&session),
            );
        }
        Err(e) => return e.page(&session),
    };
    let mut statement_path = format!("/v1/accounts/{id}/statement?limit={PAGE_LINES}");
    if let Some(cursor) = &query.cursor {
        statement_path.push_str(&format!("&cursor={}", url_encode(cursor)));
    }
    let statement = state.api.get::<Statement>(&session.token, &statement_path).await;
    let transfers = state
        .api
        .get::<Transfers>(
            &session.token,
            &format!("/v1/accounts/{id}/transfers?limit={PAGE_LINES}"),
        )
        .await;
    let at = query.at.as_deref().filter(|a| !a.is_empty());
    let as_of = match at {
        Some(text) if session.principal.has(Role::Auditor) => Some(match parse_at(text) {
            Some(at) => state
                .api
                .get::<AsOf>(
                    &session.token,
                    &format!("/v1/accounts/{id}/as-of?at={}", url_encode(&at.to_rfc3339())),
                )
                .await
                .map(|a| (at, a))
                .map_err(|e| e.to_string()),
            None => Err(format!("{text:?} is not a time (use the picker, or RFC 3339)")),
        }),
        _ => None,
    };
    let c = account.currency.as_str();
    let body = html! {
        h1 { "Account " span.mono { (account.account_id) } }
        (search_form(""))
        div.cards #account {
            div.card { div.value { (account.owner) } div.label { "owner" } }
            div.card #balance { div.value { (money(account.balance, c)) } div.label { "balance" } }
            div.card { div.value { (money(account.held, c)) } div.label { "held" } }
            div.card #available { div.value { (money(account.available, c)) } div.label { "available" } }
            div.card { div.value { (badge(account.status == "open", &account.status)) } div.label { "status" } }
            div.card { div.value { (account.version) } div.label { "version (updated " (account.updated_at.format("%Y-%m-%d %H:%M:%S UTC")) ")" } }
        }
        @if session.principal.has(Role::Auditor) {
            p { a href=(format!("/audit/streams/{id}")) { "Its events and hash chain (audit)" } }
        }
        h2 { "Holds (pending transfers from this account)" }
        @match &transfers {
            Err(e) => p.problem { (e) },
            Ok(t) => (holds(id, t)),
        }
        h2 { "As of a time" }
        @if session.principal.has(Role::Auditor) {
            form.search method="get" action=(format!("/accounts/{id}")) {
                label { "At (UTC) " input type="datetime-local" name="at" step="1" value=(at.unwrap_or_default()); }
                button type="submit" { "Show" }
            }
            @match &as_of {
                None => {}
                Some(Err(e)) => p.problem { (e) },
                Some(Ok((at, a))) => table #as-of {
                    tr { th { "as of" } th { "version" } th { "owner" } th.num { "balance" } th.num { "held" } th.num { "available" } th { "status" } th.num { "overdraft limit" } }
                    tr {
                        td { (at.format("%Y-%m-%d %H:%M:%S UTC")) } td { (a.version) " (" (a.recorded_at.format("%H:%M:%S")) ")" } td { (a.owner) }
                        td.num { (money(a.balance, &a.currency)) } td.num { (money(a.held, &a.currency)) }
                        td.num { (money(a.available, &a.currency)) } td { (a.status) } td.num { (money(a.overdraft_limit, &a.currency)) }
                    }
                }
            }
        } @else {
            p.hint { "The as-of view is an audit read: it needs the " code { "auditor" } " role as well." }
        }
        h2 { "Statement" }
        @match &statement {
            Err(e) => p.problem { (e) },
            Ok(s) => (statement_table(id, s)),
        }
        h2 { "Transfers" }
        @match &transfers {
            Err(e) => p.problem { (e) },
            Ok(t) => (transfers_table(t)),
        }
    };
    views::page("Account", &session, Nav::Accounts, body)
}

fn holds(id: Uuid, transfers: &Transfers) -> Markup {
    let pending: Vec<_> = transfers
        .transfers
        .iter()
        .filter(|t| t.status == "pending" && t.from_account == Some(id))
        .collect();
    html! {
        @if pending.is_empty() { p.hint { "No hold among its first " (transfers.transfers.len()) " transfers." } }
        @else {
            table #holds {
                tr { th { "transfer" } th.num { "held" } th { "expires" } th { "reference" } }
                @for t in pending {
                    tr {
                        td.mono { (t.transfer_id) } td.num { (money(t.amount, &t.currency)) }
                        td { (t.expires_at.map(|e| e.format("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_default()) }
                        td { (t.reference) }
                    }
                }
            }
        }
    }
}

fn statement_table(id: Uuid, statement: &Statement) -> Markup {
    html! {
        table #statement {
            tr { th.num { "version" } th { "recorded" } th { "kind" } th.num { "amount" } th.num { "balance after" } th { "counterparty" } th { "reference" } }
            @for l in &statement.lines {
                tr {
                    td.num { (l.version) }
                    td { (l.recorded_at.format("%Y-%m-%d %H:%M:%S")) }
                    td { (l.kind) }
                    td.num { @if l.direction == "debit" { "−" } (money(l.amount, &l.currency)) }
                    td.num { (money(l.balance_after, &l.currency)) }
                    td.mono { (l.counterparty.map(|c| c.to_string()).unwrap_or_default())
                        @if let Some(t) = l.transfer_id { span.hint { " (transfer " (t) ")" } } }
                    td { (l.reference) }
                }
            }
            @if statement.lines.is_empty() { tr { td colspan="7" { "no line on this page" } } }
        }
        @if let (true, Some(cursor)) = (statement.has_more, &statement.next_cursor) {
            a href=(format!("/accounts/{id}?cursor={}", url_encode(cursor))) { "Next page →" }
        }
    }
}

fn transfers_table(transfers: &Transfers) -> Markup {
    html! {
        table #transfers {
            tr { th { "transfer" } th { "status" } th { "from" } th { "to" } th.num { "amount" } th.num { "settled" } th { "created" } th { "reference" } }
            @for t in &transfers.transfers {
                tr {
                    td.mono { (t.transfer_id) } td { (t.status) }
                    td.mono { (t.from_account.map(|a| a.to_string()).unwrap_or_default()) }
                    td.mono { (t.to_account.map(|a| a.to_string()).unwrap_or_default()) }
                    td.num { (money(t.amount, &t.currency)) } td.num { (money(t.settled_amount, &t.currency)) }
                    td { (t.created_at.map(|c| c.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()) }
                    td { (t.reference) }
                }
            }
            @if transfers.transfers.is_empty() { tr { td colspan="8" { "no transfer" } } }
        }
        @if transfers.has_more { p.hint { "Only the first " (transfers.transfers.len()) " transfers are shown." } }
    }
}
