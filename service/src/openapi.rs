//! How both APIs render, serve and check in their OpenAPI documents, so the two cannot drift
//! apart in format. Each API builds its own document (`openapi::document()` in its crate); this
//! module turns a document into the text that is served at `GET /openapi.json` and checked in as
//! `schemas/openapi/<file name>` (`cargo xtask schemas` rewrites it), and gives the unit test
//! that fails when the two differ. [`secure`] adds what [`crate::edge::protect`] does to every
//! route: the `bearerAuth` scheme, the 401/403 of protected routes, 429 and the request timeout.

use std::path::{Path, PathBuf};

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

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

/// The name of the security scheme a protected route names with its role:
/// `security(("bearerAuth" = ["teller"]))` in its `#[utoipa::path]`.
pub const BEARER_AUTH: &str = "bearerAuth";

/// Adds to `document` what every route of a server wrapped in [`crate::edge::protect`] does
/// beyond its handler: the `bearerAuth` scheme; on every route that requires a role, its 401
/// and 403; on every route, 429 and the request timeout's 503.
pub fn secure(document: &mut OpenApi) {
    let scheme = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT")
        .description(Some(
            "A JWT (HS256, RS256 or ES256, as the server is configured) whose `sub` names the \
             caller and whose `roles` claim lists its roles: `teller` (write commands), `reader` \
             (account and transfer reads), `auditor` (audit endpoints and export), `ops` (admin and \
             projection control). Each protected route names the one role it needs.",
        ))
        .build();
    document
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(BEARER_AUTH, SecurityScheme::Http(scheme));
    for item in document.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            secure_operation(operation);
        }
    }
}

fn secure_operation(operation: &mut Operation) {
    let protected = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let responses = &mut operation.responses.responses;
    if protected {
        responses.entry("401".into()).or_insert_with(|| {
            problem_response(
                "`missing-token`, `invalid-token`, `token-expired`: no valid bearer token. Carries \
                 `WWW-Authenticate: Bearer` with the RFC 6750 error code.",
                Some("WWW-Authenticate"),
            )
        });
        responses.entry("403".into()).or_insert_with(|| {
            problem_response(
                "`insufficient-role`: the token is valid but lacks the role this route needs \
                 (`required_role`).",
                Some("WWW-Authenticate"),
            )
        });
    }
    responses.entry("429".into()).or_insert_with(|| {
        problem_response(
            "`rate-limited`: this client (token subject, else address) is over its rate limit; \
             retry after `Retry-After` seconds.",
            Some("Retry-After"),
        )
    });
    const TIMEOUT: &str = "`request-timeout`: the request took longer than the server allows; \
        retry after `Retry-After` seconds (a command may have taken effect: use the same Idempotency-Key).";
    match responses.get_mut("503") {
        Some(RefOr::T(response)) => {
            if !response.description.contains("request-timeout") {
                response.description = format!("{} {TIMEOUT}", response.description);
            }
        }
        Some(RefOr::Ref(_)) => {}
        None => {
            responses.insert("503".into(), problem_response(TIMEOUT, Some("Retry-After")));
        }
    }
}

/// Routes of an API's main listener that stay open to everyone: probes and `/openapi.json`.
/// (`/metrics` is served only on the operations listener, `crate::probes`.)
pub const OPEN_PATHS: [&str; 3] = ["/health", "/ready", "/openapi.json"];

/// For each API's tests: panics unless every operation of `document` outside [`OPEN_PATHS`]
/// names exactly one known role under [`BEARER_AUTH`], and the open ones name none.
#[track_caller]
pub fn assert_every_route_declares_a_role(document: &OpenApi) {
    for (path, item) in &document.paths.paths {
        let operations = [&item.get, &item.put, &item.post, &item.delete, &item.patch];
        for operation in operations.into_iter().flatten() {
            let security = serde_json::to_value(&operation.security).expect("security serializes");
            if OPEN_PATHS.contains(&path.as_str()) {
                assert!(security.is_null(), "{path} is open but declares {security}");
                continue;
            }
            let roles = security
                .as_array()
                .filter(|requirements| requirements.len() == 1)
                .and_then(|requirements| requirements[0].get(BEARER_AUTH))
                .and_then(|roles| roles.as_array())
                .unwrap_or_else(|| panic!("{path} declares no {BEARER_AUTH} role: {security}"));
            assert!(
                roles.len() == 1
                    && roles[0]
                        .as_str()
                        .is_some_and(|r| r.parse::<crate::auth::Role>().is_ok()),
                "{path} must declare exactly one known role, not {roles:?}"
            );
            assert!(
                operation.responses.responses.contains_key("401") && operation.responses.responses.contains_key("403"),
                "{path} does not document 401 and 403 (is `secure` applied?)"
            );
        }
    }
}

fn problem_response(description: &str, header: Option<&str>) -> RefOr<utoipa::openapi::Response> {
    let mut builder = ResponseBuilder::new().description(description).content(
        "application/problem+json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    );
    if let Some(name) = header {
        builder = builder.header(
            name,
            HeaderBuilder::new()
                .schema(Some(utoipa::openapi::schema::Object::with_type(
                    utoipa::openapi::schema::Type::String,
                )))
                .build(),
        );
    }
    RefOr::T(builder.build())
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
