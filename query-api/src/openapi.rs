//! The query API's OpenAPI document, built by utoipa from the handlers' `#[utoipa::path]`
//! annotations and the response types' `ToSchema` derives. It is served at `GET /openapi.json`
//! and checked in as `schemas/openapi/query-api.json` (`cargo xtask schemas` rewrites it); a
//! unit test fails when the two differ, so a change to the API shows up in review.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tally_service::Problem;
use utoipa::OpenApi;

use crate::routes::AccountView;

/// The routes and schemas of the query API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally query API",
        description = "Reads of the Tally ledger's read models. Money is an integer number of minor \
                       units with an ISO 4217 currency. Every error is an RFC 9457 \
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
    QueryApi::openapi()
}

/// The document as checked in and served: pretty-printed, with a trailing newline.
pub fn render() -> String {
    let mut text = document()
        .to_pretty_json()
        .expect("an OpenAPI document always serializes");
    text.push('\n');
    text
}

/// Where the rendered document is checked in.
pub fn checked_in_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives inside the workspace")
        .join("schemas/openapi/query-api.json")
}

/// Rendered once: the document is fixed at compile time.
static RENDERED: LazyLock<String> = LazyLock::new(render);

/// `GET /openapi.json`
pub(crate) async fn serve() -> Response {
    let mut response = RENDERED.as_str().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_served_document_matches_the_checked_in_file() {
        let response = serve().await;
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let served = String::from_utf8(body.to_vec()).unwrap();
        let path = checked_in_path();
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            served == checked_in,
            "{} differs from the document the query API serves; run `cargo xtask schemas` and \
             review the change",
            path.display()
        );
    }
}
