//! The query API's OpenAPI document, built by utoipa from the handlers' `#[utoipa::path]`
//! annotations and the response types' `ToSchema` derives. It is served at `GET /openapi.json`
//! and checked in as `schemas/openapi/query-api.json` (`cargo xtask schemas` rewrites it); a
//! unit test fails when the two differ, so a change to the API shows up in review.

use std::sync::LazyLock;

use axum::response::Response;
use tally_service::Problem;
use utoipa::OpenApi;

use crate::accounts::{AccountsPage, StatementPage};
use crate::audit::{AccountAsOf, AuditEvent, FeedPage, StreamHistory};
use crate::entries::{EntryLegView, EntryView};
use crate::ledger::{CurrencyBalance, SystemAccountView, SystemAccounts, TrialBalance};
use crate::proofs::InclusionProofView;
use crate::routes::Readiness;
use crate::sources::ReplicaState;
use crate::transfers::TransfersPage;
use crate::views::{AccountView, StatementLine, TransferView};

/// The routes and schemas of the query API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally query API",
        description = "Reads of the Tally ledger's read models, and of its event log for auditors. Money \
                       is an integer number of minor units with an ISO 4217 currency. Reads need a bearer \
                       token with the `reader` role, audit reads the `auditor` role (`bearerAuth`). A read \
                       that sends a command response's consistency token (`X-Consistency-Token` or \
                       `consistent_with`) reflects that write, or answers 503 `not-yet-consistent`. Every \
                       error is an RFC 9457 `application/problem+json` whose `type` is \
                       `https://tally.dev/problems/<code>`."
    ),
    paths(
        crate::accounts::list_accounts,
        crate::accounts::get_account,
        crate::accounts::get_statement,
        crate::transfers::get_transfer,
        crate::transfers::list_account_transfers,
        crate::entries::get_entry,
        crate::audit::get_stream_events,
        crate::audit::get_feed,
        crate::audit::get_account_as_of,
        crate::proofs::get_event_proof,
        crate::ledger::get_trial_balance,
        crate::ledger::get_system_accounts,
        tally_service::problem::health,
        crate::routes::ready,
    ),
    components(schemas(
        AccountView,
        AccountsPage,
        StatementLine,
        StatementPage,
        TransferView,
        TransfersPage,
        EntryView,
        EntryLegView,
        AuditEvent,
        StreamHistory,
        FeedPage,
        AccountAsOf,
        InclusionProofView,
        TrialBalance,
        CurrencyBalance,
        SystemAccounts,
        SystemAccountView,
        Readiness,
        ReplicaState,
        Problem
    )),
    tags(
        (name = "accounts", description = "Account balances, status and statements."),
        (name = "transfers", description = "Transfers and their status."),
        (name = "entries", description = "Journal entries: balanced movements of many legs."),
        (name = "audit", description = "The event log itself: stream histories, the global feed, past states, \
            inclusion proofs against signed checkpoints."),
        (name = "ledger", description = "The ledger as a whole, for auditors: the trial balance and the system \
            accounts every deposit and withdrawal is booked against."),
        (name = "ops", description = "Liveness and readiness probes."),
    )
)]
struct QueryApi;

/// The whole document of the query API.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut document = QueryApi::openapi();
    tally_service::openapi::secure(&mut document);
    document
}

/// The name of the checked-in document under `schemas/openapi/` (`cargo xtask schemas` writes it).
pub const FILE_NAME: &str = "query-api.json";

/// Rendered once: the document is fixed at compile time.
static RENDERED: LazyLock<String> = LazyLock::new(|| tally_service::openapi::render(&document()));

/// `GET /openapi.json`
pub(crate) async fn serve() -> Response {
    tally_service::openapi::serve(RENDERED.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_document_matches_the_checked_in_file() {
        tally_service::openapi::assert_matches_checked_in(&document(), FILE_NAME);
    }

    #[test]
    fn every_route_but_the_probes_declares_its_role() {
        tally_service::openapi::assert_every_route_declares_a_role(&document());
    }
}
