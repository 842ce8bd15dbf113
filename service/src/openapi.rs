//! How both APIs render, serve and check in their OpenAPI documents, so the two cannot drift
//! apart in format. Each API builds its own document (`openapi::document()` in its crate); this
//! module turns a document into the text that is served at `GET /openapi.json` and checked in as
//! `schemas/openapi/<file name>` (`cargo xtask schemas` rewrites it), and gives the unit test
//! that fails when the two differ.

use std::path::{Path, PathBuf};

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::OpenApi;

/// The document as checked in and served: pretty-printed, with a trailing newline.
pub fn render(document: &OpenApi) -> String {
    let mut text = document
        .to_pretty_json()
        .expect("an OpenAPI document always serializes");
    text.push('\n');
    text
}

/// Where the document named `file_name` (e.g. `command-api.json`) is checked in.
pub fn checked_in_path(file_name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives inside the workspace")
        .join("schemas/openapi")
        .join(file_name)
}

/// The `GET /openapi.json` response for a `rendered` document. Each API renders its document
/// once (it is fixed at compile time) and answers every request with that text.
pub fn serve(rendered: &'static str) -> Response {
    let mut response = rendered.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// For the drift test of each API: panics unless `document`, rendered as it is served, is
/// exactly the checked-in `schemas/openapi/<file_name>`.
#[track_caller]
pub fn assert_matches_checked_in(document: &OpenApi, file_name: &str) {
    let served = render(document);
    let path = checked_in_path(file_name);
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        served == checked_in,
        "{} differs from the document the {} serves; run `cargo xtask schemas` and review the change",
        path.display(),
        document.info.title
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_served_document_is_the_rendered_text_as_json() {
        let response = serve("{}\n");
        assert_eq!(
            response.headers().get(header::CONTENT_TYPE).unwrap(),
            "application/json"
        );
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert_eq!(&body[..], b"{}\n");
    }

    #[test]
    fn a_document_is_checked_in_under_schemas_openapi() {
        let path = checked_in_path("command-api.json");
        assert!(path.ends_with("schemas/openapi/command-api.json"), "{}", path.display());
        assert!(path.exists(), "{}", path.display());
    }
}
