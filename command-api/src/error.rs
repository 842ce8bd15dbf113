//! The one place where command errors become HTTP problems.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tally_domain::AccountError;
use tally_event_store::StoreError;
use tally_service::Problem;
use tally_service::errors::ErrorReport;

use crate::execute::CommandError;

/// A handler's error: either a problem to send as is, or a command error to translate.
#[derive(Debug)]
pub enum ApiError {
    Problem(Problem),
    Command(CommandError),
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        ApiError::Problem(p)
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        ApiError::Command(e)
    }
}

fn rejection(error: &AccountError) -> Problem {
    let title = error.to_string();
    match error {
        AccountError::AlreadyExists => Problem::new(StatusCode::CONFLICT, error.code(), "Account already exists"),
        AccountError::NotFound => Problem::not_found(error.code(), "No account with this id."),
        AccountError::InsufficientFunds { available, requested } => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, error.code(), "Insufficient funds")
                .detail(title)
                .extension("available", *available)
                .extension("requested", *requested)
        }
        _ => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, error.code(), "Command refused").detail(title),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (problem, report) = match self {
            ApiError::Problem(p) => (p, None),
            ApiError::Command(CommandError::Rejected(e)) => (rejection(&e), None),
            ApiError::Command(CommandError::ConflictRetriesExhausted) => (
                Problem::new(StatusCode::CONFLICT, "concurrency-conflict", "Too much contention")
                    .detail("The account changed too often while this command ran; retry it.")
                    .retry_after(1),
                None,
            ),
            ApiError::Command(CommandError::IdempotencyKeyReused) => (
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency-key-reused",
                    "Idempotency key reused",
                )
                .detail("This Idempotency-Key was already used for a different request; use a new key."),
                None,
            ),
            ApiError::Command(CommandError::Store(StoreError::Database(e)))
                if matches!(
                    e,
                    sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
                ) =>
            {
                (Problem::unavailable(1), Some(e.to_string()))
            }
            ApiError::Command(other) => (Problem::internal(), Some(other.to_string())),
        };
        let mut response = problem.into_response();
        if let Some(cause) = report {
            response.extensions_mut().insert(ErrorReport(cause));
        }
        response
    }
}
