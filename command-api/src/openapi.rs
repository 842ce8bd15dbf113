//! The command API's OpenAPI document, built by utoipa from the handlers' `#[utoipa::path]`
//! annotations and the request/response types' `ToSchema` derives, so it cannot describe a
//! route the code does not serve. It is served at `GET /openapi.json` and checked in as
//! `schemas/openapi/command-api.json` (`cargo xtask schemas` rewrites it); a unit test fails
//! when the two differ, so a change to the API shows up in review as a change to that file.

use std::sync::LazyLock;

use axum::response::Response;
use tally_service::Problem;
use utoipa::OpenApi;

use crate::routes::{
    AccountCommandResponse, EmptyRequest, FreezeRequest, LimitsRequest, OpenAccountRequest, PostingRequest,
};

/// The routes and schemas of the account commands and the ops endpoints.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally command API",
        description = "Commands on the Tally ledger. Money is an integer number of minor units with an \
                       ISO 4217 currency. Every error is an RFC 9457 `application/problem+json` whose \
                       `type` is `https://tally.dev/problems/<code>`, stable per kind of refusal. \
                       Every command needs a bearer token with the `teller` role (`bearerAuth`)."
    ),
    paths(
        crate::routes::open_account,
        crate::routes::deposit,
        crate::routes::withdraw,
        crate::routes::freeze,
        crate::routes::unfreeze,
        crate::routes::close,
        crate::routes::change_limits,
        tally_service::problem::health,
        crate::routes::ready,
    ),
    components(schemas(
        OpenAccountRequest,
        PostingRequest,
        FreezeRequest,
        LimitsRequest,
        EmptyRequest,
        AccountCommandResponse,
        Problem
    )),
    tags(
        (name = "accounts", description = "Open accounts and move money in and out of them."),
        (name = "ops", description = "Liveness and readiness probes."),
    )
)]
struct AccountsApi;

/// The whole document of the command API: the account routes plus every other route group.
///
/// To add a route group (e.g. transfers): annotate its handlers with `#[utoipa::path]`, derive
/// `OpenApi` on a struct next to them listing those paths and their schemas (say
/// `crate::transfers::TransfersApi`), chain `.merge_from(crate::transfers::TransfersApi::openapi())`
/// below, then run `cargo xtask schemas` to update the checked-in file.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut document = AccountsApi::openapi();
    document.merge(crate::transfers::TransfersApi::openapi());
    document.merge(crate::entries::EntriesApi::openapi());
    document.merge(crate::batches::BatchesApi::openapi());
    tally_service::openapi::secure(&mut document);
    document
}

/// The name of the checked-in document under `schemas/openapi/` (`cargo xtask schemas` writes it).
pub const FILE_NAME: &str = "command-api.json";

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

    #[test]
    fn every_command_route_is_documented_with_its_problems() {
        let document = document();
        for path in [
            "/v1/accounts",
            "/v1/accounts/{id}/deposits",
            "/v1/accounts/{id}/withdrawals",
            "/v1/accounts/{id}/freeze",
            "/v1/accounts/{id}/unfreeze",
            "/v1/accounts/{id}/close",
            "/v1/transfers",
            "/v1/transfers/{id}/post",
            "/v1/transfers/{id}/void",
        ] {
            let item = document
                .paths
                .paths
                .get(path)
                .unwrap_or_else(|| panic!("{path} is missing"));
            let post = item.post.as_ref().unwrap_or_else(|| panic!("{path} has no POST"));
            for status in ["400", "401", "403", "413", "415", "422", "429", "500", "503"] {
                let response = post
                    .responses
                    .responses
                    .get(status)
                    .unwrap_or_else(|| panic!("{path} does not document {status}"));
                let utoipa::openapi::RefOr::T(response) = response else {
                    panic!("{path} {status} is a reference")
                };
                assert!(
                    response.content.contains_key("application/problem+json"),
                    "{path} {status} is not a problem+json"
                );
            }
        }
    }
}
