//! The query API's OpenAPI document, built by utoipa from the handlers' `#[utoipa::path]`
//! annotations and the response types' `ToSchema` derives. It is served at `GET /openapi.json`
//! and checked in as `schemas/openapi/query-api.json` (`cargo xtask schemas` rewrites it); a
//! unit test fails when the two differ, so a change to the API shows up in review.

use std::sync::LazyLock;

use axum::response::Response;
use tally_service::Problem;
use utoipa::OpenApi;

use crate::routes::AccountView;

/// The routes and schemas of the query API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally query API",
        description = "Reads of the Tally ledger's read models. Money is an integer number of minor \
                       units with an ISO 4217 currency. Reads need a bearer token with the `reader` role \
                       (`bearerAuth`). Every error is an RFC 9457 \
                       `application/problem+json` whose `type` is `https://tally.dev/problems/<code>`."
    ),
    paths(
        crate::routes::get_account,
        tally_service::problem::health,
        crate::routes::ready,
    ),
    components(schemas(AccountView, Problem)),
    tags(
        (name = "accounts", description = "Account balances and status."),
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
