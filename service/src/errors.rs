//! Server errors are logged once, here, inside the request's span, and never sent to the
//! client. A handler's error type attaches an [`ErrorReport`] to its 5xx response; the
//! [`log_server_errors`] middleware logs it.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

/// The internal cause of a 5xx, carried in the response extensions for logging only.
#[derive(Debug, Clone)]
pub struct ErrorReport(pub String);

/// Logs the [`ErrorReport`] of every 5xx response.
pub async fn log_server_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    if response.status().is_server_error() {
        let cause = response
            .extensions()
            .get::<ErrorReport>()
            .map_or("(no report attached)", |r| r.0.as_str());
        tracing::error!(%method, %path, status = response.status().as_u16(), cause, "request failed");
    }
    response
}
