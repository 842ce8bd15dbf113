//! The one place where command errors become HTTP problems.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tally_domain::AccountError;
use tally_event_store::idempotency::StoredResponse;
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

/// A refusal as stored under the command's idempotency key: a retry of a refused command gets
/// the same refusal back (and changes nothing), like a retry of an accepted one.
pub(crate) fn stored_refusal(error: &AccountError) -> StoredResponse {
    let problem = rejection(error);
    StoredResponse {
        status: problem.status,
        body: serde_json::to_value(&problem).expect("problems always serialize"),
    }
}

/// The problem for a refused command. The status follows the variant's documentation in
/// `tally_domain::AccountError`: 404 when the addressed account or transfer does not exist,
/// 409 when an id is already taken or the state moved under the command (a concurrency
/// conflict), 422 for every business-rule refusal. The match is exhaustive on purpose: a new
/// refusal cannot reach clients before someone decides its status.
///
/// Extension members carry the numbers and ids behind a refusal, so a client need not parse
/// `detail`.
pub(crate) fn rejection(error: &AccountError) -> Problem {
    let code = error.code();
    let detail = error.to_string();
    let refused = |title: &str| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, title).detail(detail.clone());
    match error {
        AccountError::NotFound => Problem::not_found(code, "No account with this id."),
        AccountError::AccountNotFound { account_id } => {
            Problem::not_found(code, detail.clone()).extension("account_id", account_id.to_string())
        }
        AccountError::TransferNotFound => Problem::not_found(code, "No transfer with this id."),
        AccountError::AlreadyExists => Problem::new(StatusCode::CONFLICT, code, "Account already exists")
            .detail("An account with this id was already opened."),
        AccountError::TransferExists { transfer_id } => {
            Problem::new(StatusCode::CONFLICT, code, "Transfer already exists")
                .detail(detail.clone())
                .extension("transfer_id", transfer_id.to_string())
        }
        // Reaches a client only once the writer's own reloads and retries ran out.
        AccountError::StaleState => conflict(),
        AccountError::LimitBelowUsage {
            available,
            overdraft_limit,
        } => refused("Limit below usage")
            .extension("available", *available)
            .extension("overdraft_limit", *overdraft_limit),
        AccountError::InsufficientFunds { available, requested } => refused("Insufficient funds")
            .extension("available", *available)
            .extension("requested", *requested),
        AccountError::Frozen { account_id } => {
            refused("Account frozen").extension("account_id", account_id.to_string())
        }
        AccountError::NotFrozen => refused("Account not frozen"),
        AccountError::Closed { account_id } => {
            refused("Account closed").extension("account_id", account_id.to_string())
        }
        AccountError::BalanceNotZero { balance } => refused("Balance not zero").extension("balance", *balance),
        AccountError::HoldsOutstanding { held } => refused("Holds outstanding").extension("held", *held),
        AccountError::TooManyHolds => refused("Too many holds"),
        AccountError::CurrencyMismatch { expected, actual } => refused("Currency mismatch")
            .extension("expected", expected.to_string())
            .extension("actual", actual.to_string()),
        AccountError::TransferNotPending { status } => refused("Transfer not pending")
            .extension("transfer_status", serde_json::to_value(status).unwrap_or_default()),
        AccountError::AmountExceedsHold { held, requested } => refused("Amount exceeds hold")
            .extension("held", *held)
            .extension("requested", *requested),
        AccountError::HoldExpired { expires_at } => {
            refused("Hold expired").extension("expires_at", expires_at.to_rfc3339())
        }
        AccountError::HoldNotExpired { expires_at } => {
            refused("Hold not expired").extension("expires_at", expires_at.to_rfc3339())
        }
        AccountError::InvalidOwner => refused("Invalid owner"),
        AccountError::InvalidReference => refused("Invalid reference"),
        AccountError::InvalidReason => refused("Invalid reason"),
        AccountError::InvalidOverdraftLimit => refused("Invalid overdraft limit"),
        AccountError::InvalidExpiry { .. } => refused("Invalid expiry"),
        AccountError::BalanceOverflow => refused("Balance overflow"),
        AccountError::TransferToSelf => refused("Transfer to self"),
        AccountError::ExceedsCredits { available, requested } => refused("Debits exceed credits")
            .extension("available", *available)
            .extension("requested", *requested),
        AccountError::ExceedsDebits { balance, requested } => refused("Credits exceed debits")
            .extension("balance", *balance)
            .extension("requested", *requested),
        AccountError::InvalidExternalId => refused("Invalid external id"),
        AccountError::ExternalIdTaken { account_id } => Problem::new(StatusCode::CONFLICT, code, "External id taken")
            .detail(detail.clone())
            .extension("account_id", account_id.to_string()),
        AccountError::InvalidMetadata { .. } => refused("Invalid metadata"),
        AccountError::InvalidFlags { .. } => refused("Invalid flags"),
        AccountError::EntryExists { entry_id } => Problem::new(StatusCode::CONFLICT, code, "Entry already exists")
            .detail(detail.clone())
            .extension("entry_id", entry_id.to_string()),
        AccountError::EntryNotFound => Problem::not_found(code, "No entry with this id."),
        AccountError::EntryNotPending { status } => {
            refused("Entry not pending").extension("entry_status", status.as_str())
        }
        AccountError::InvalidLegs { legs } => refused("Invalid legs").extension("legs", *legs as i64),
        AccountError::EntryUnbalanced {
            currency,
            debits,
            credits,
        } => refused("Entry unbalanced")
            .extension("currency", currency.to_string())
            .extension("debits", *debits)
            .extension("credits", *credits),
        AccountError::AccountRepeated { account_id, first } => refused("Account repeated")
            .extension("account_id", account_id.to_string())
            .extension("first_leg", *first as i64),
        // The leg's own refusal (its status, code and members), naming the leg.
        AccountError::Leg { leg, source } => rejection(source).detail(detail.clone()).extension("leg", *leg as i64),
        AccountError::LinkedItemFailed { failed } => {
            refused("Linked item failed").extension("failed_index", *failed as i64)
        }
    }
}

/// The 409 a client sees when the writer gave up on a stream that kept changing under it.
fn conflict() -> Problem {
    Problem::new(StatusCode::CONFLICT, "concurrency-conflict", "Too much contention")
        .detail("The account changed too often while this command ran; retry it.")
        .retry_after(1)
}

/// The problem a command error answers with, and the cause to report when it is a fault of
/// ours or an outage (logged with the request, never sent).
pub(crate) fn command_problem(error: CommandError) -> (Problem, Option<String>) {
    match error {
        CommandError::Rejected(e) => (rejection(&e), None),
        CommandError::ConflictRetriesExhausted => (conflict(), None),
        CommandError::IdempotencyKeyReused => (
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
            )
            .detail("This Idempotency-Key was already used for a different request; use a new key."),
            None,
        ),
        CommandError::Overloaded => (
            Problem::unavailable(1).detail("Too many commands are waiting; retry shortly."),
            None,
        ),
        CommandError::Unavailable(cause) => (Problem::unavailable(1), Some(cause)),
        CommandError::DatabaseUnavailable(cause) => (Problem::database_unavailable(1), Some(cause)),
        CommandError::Internal(cause) => (Problem::internal(), Some(cause)),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (problem, report) = match self {
            ApiError::Problem(p) => (p, None),
            ApiError::Command(error) => command_problem(error),
        };
        let mut response = problem.into_response();
        if let Some(cause) = report {
            response.extensions_mut().insert(ErrorReport(cause));
        }
        response
    }
}
