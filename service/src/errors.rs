//! Server errors are logged once, inside the request's span, and never sent to the client. A
//! handler's error type attaches an [`ErrorReport`] to its 5xx response; the edge
//! ([`crate::edge::protect`]) logs it with [`log_server_error`] (and a router without the edge
//! can use the [`log_server_errors`] middleware).

use axum::extract::Request;
use axum::http::{Method, Uri};
use axum::middleware::Next;
use axum::response::Response;

/// The internal cause of a 5xx, carried in the response extensions for logging only.
#[derive(Debug, Clone)]
pub struct ErrorReport(pub String);

/// Logs the [`ErrorReport`] of `response` if it is a 5xx.
pub fn log_server_error(method: &Method, uri: &Uri, response: &Response) {
    if response.status().is_server_error() {
        let cause = response
            .extensions()
            .get::<ErrorReport>()
            .map_or("(no report attached)", |r| r.0.as_str());
        let path = uri.path();
        tracing::error!(%method, %path, status = response.status().as_u16(), cause, "request failed");
    }
}

/// Middleware: logs the [`ErrorReport`] of every 5xx response.
pub async fn log_server_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let response = next.run(request).await;
    log_server_error(&method, &uri, &response);
    response
}
