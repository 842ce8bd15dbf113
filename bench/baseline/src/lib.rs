//! The benchmark's baseline: Tally's account domain on **stock cqrs-es + postgres-es**, behind
//! minimal axum routes with the same paths and bodies as Tally's command API, so `tally load`
//! drives both with the same scenarios and every `tally/baseline` ratio in BENCHMARKS.md is
//! measured against the libraries the design started from, used as their documentation shows.
//!
//! What it is, on purpose:
//! - `postgres_es::postgres_cqrs(pool, vec![], ())`: a `CqrsFramework` over a
//!   `PostgresEventRepository` on postgres-es's documented tables (`schema.sql`), no
//!   snapshots, no queries (a query would only add work the command path of Tally does not do);
//! - the aggregate is `tally_domain::Account` itself (it implements cqrs-es `Aggregate`);
//! - one `CqrsFramework::execute` per command; a lost optimistic-concurrency race is answered
//!   with a 409 (`AggregateConflict`), as cqrs-es reports it: no retries in the server;
//! - an immediate transfer is two commands, as cqrs-es has no transaction spanning aggregates:
//!   a withdrawal from the source, then a deposit into the destination, and a compensating
//!   deposit back into the source when the second is refused. Once the source is debited, a
//!   lost race on either later command is retried (up to [`LEG_ATTEMPTS_MAX`] times), since
//!   the transfer must end one way or the other. Not atomic: a crash between the commands
//!   loses the money in flight, which Tally's one-transaction transfer cannot;
//! - no idempotency keys (cqrs-es has none): the `Idempotency-Key` header is ignored.
//!
//! The request bodies are Tally's own types ([`tally_command_api::routes`]), parsed with the same
//! [`tally_service::Json`] extractor, so malformed input gets the same problem+json answers.
//! Accepted commands answer `204 No Content` (cqrs-es returns no state), except opening an
//! account, which answers `201` with the new `account_id`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use cqrs_es::AggregateError;
use postgres_es::PostgresCqrs;
use sqlx_08::PgPool;
use sqlx_08::postgres::PgPoolOptions;
use tally_command_api::routes::{OpenAccountRequest, PostingRequest, REQUEST_BODY_MAX_BYTES};
use tally_command_api::transfers::{Mode, TransferRequest};
use tally_domain::{Account, AccountCommand, AccountError, AmountMinor, Currency};
use tally_service::errors::ErrorReport;
use tally_service::{Json, Problem};
use uuid::Uuid;

/// postgres-es's documented tables.
const SCHEMA: &str = include_str!("../schema.sql");
/// Attempts at the credit leg of a transfer, and then at its refund, while they lose
/// optimistic-concurrency races: the source is already debited, so giving up early strands
/// the money.
pub const LEG_ATTEMPTS_MAX: usize = 10;
/// How long a request waits for a pooled connection before it fails with a 503.
const POOL_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Configuration of the `tally-baseline` binary (flags or `TALLY_*` variables).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "tally-baseline",
    about = "Tally's domain on stock cqrs-es + postgres-es (benchmark baseline)"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "TALLY_BASELINE_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Postgres database holding postgres-es's tables (created at start when absent). Not
    /// Tally's database: both name their log table `events`.
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tally_baseline",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Upper bound on connections; the default is the command API's, so both get the same.
    #[arg(long, env = "TALLY_DB_CONNECTIONS_MAX", default_value_t = 32)]
    pub db_connections_max: u32,
}

/// The stock framework: postgres-es's repository, no snapshots, no queries.
pub type Cqrs = PostgresCqrs<Account>;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub cqrs: Arc<Cqrs>,
    /// The pool behind `cqrs`, for `/ready`.
    pub pool: PgPool,
}

impl AppState {
    pub fn new(pool: PgPool) -> Self {
        Self {
            cqrs: Arc::new(postgres_es::postgres_cqrs(pool.clone(), vec![], ())),
            pool,
        }
    }
}

/// A lazily connecting pool (sqlx 0.8, the version postgres-es is built on).
pub fn connect(database_url: &str, max_connections: u32) -> Result<PgPool, sqlx_08::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
        .connect_lazy(database_url)
}

/// Creates postgres-es's tables when absent.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx_08::Error> {
    sqlx_08::raw_sql(SCHEMA).execute(pool).await?;
    Ok(())
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/accounts", post(open_account))
        .route("/v1/accounts/{id}/deposits", post(deposit))
        .route("/v1/transfers", post(transfer))
        .route("/health", get(tally_service::problem::health))
        .route("/ready", get(ready))
        .fallback(tally_service::problem::fallback)
        .method_not_allowed_fallback(tally_service::problem::method_not_allowed)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_MAX_BYTES))
        .layer(middleware::from_fn(tally_service::errors::log_server_errors))
        .with_state(state)
}

/// Serves the baseline on `listener` until `shutdown` resolves.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A handler's error: a problem to send, with the cause of a 5xx for the log.
#[derive(Debug)]
pub struct ApiError(Problem, Option<String>);

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        Self(problem, None)
    }
}

impl From<AggregateError<AccountError>> for ApiError {
    /// Refusals get the status `AccountError` documents per variant (404, 409 or 422); a lost
    /// race is the 409 cqrs-es reports it as; storage failures are 503 or 500, cause logged.
    fn from(error: AggregateError<AccountError>) -> Self {
        match error {
            AggregateError::UserError(refusal) => Self(refused(&refusal), None),
            AggregateError::AggregateConflict => Self(
                Problem::new(StatusCode::CONFLICT, "concurrency-conflict", "Concurrency conflict")
                    .detail("Another command changed the account first; retry.")
                    .retry_after(1),
                None,
            ),
            AggregateError::DatabaseConnectionError(cause) => Self(Problem::unavailable(1), Some(cause.to_string())),
            AggregateError::DeserializationError(cause) | AggregateError::UnexpectedError(cause) => {
                Self(Problem::internal(), Some(cause.to_string()))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.0.into_response();
        if let Some(cause) = self.1 {
            response.extensions_mut().insert(ErrorReport(cause));
        }
        response
    }
}

fn refused(error: &AccountError) -> Problem {
    let status = match error {
        AccountError::NotFound | AccountError::AccountNotFound { .. } | AccountError::TransferNotFound => {
            StatusCode::NOT_FOUND
        }
        AccountError::AlreadyExists | AccountError::TransferExists { .. } | AccountError::StaleState => {
            StatusCode::CONFLICT
        }
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    Problem::new(status, error.code(), "Command refused").detail(error.to_string())
}

fn invalid(code: &str, title: &str, detail: impl ToString) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, title).detail(detail.to_string())
}

fn amount(minor: i64) -> Result<AmountMinor, Problem> {
    AmountMinor::new(minor).map_err(|e| invalid("invalid-amount", "Invalid amount", e))
}

fn currency(code: &str) -> Result<Currency, Problem> {
    code.parse()
        .map_err(|e: tally_domain::MoneyError| invalid("invalid-currency", "Invalid currency", e))
}

/// An account id from the path; one that is not a UUID names no account.
fn account_id(raw: &str) -> Result<Uuid, Problem> {
    Uuid::try_parse(raw).map_err(|_| Problem::not_found("account-not-found", "No account with this id."))
}

async fn ready(State(state): State<AppState>) -> Response {
    match sqlx_08::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => "ready".into_response(),
        Err(_) => Problem::unavailable(1)
            .detail("The database is unreachable.")
            .into_response(),
    }
}

/// `POST /v1/accounts`: `201 {"account_id"}`.
async fn open_account(
    State(state): State<AppState>,
    Json(body): Json<OpenAccountRequest>,
) -> Result<Response, ApiError> {
    let account_id = body.account_id.unwrap_or_else(Uuid::now_v7);
    let command = AccountCommand::Open {
        account_id,
        owner: body.owner,
        currency: currency(&body.currency)?,
        overdraft_limit: body.overdraft_limit,
        profile: tally_domain::AccountProfile::default(),
    };
    state.cqrs.execute(&account_id.to_string(), command).await?;
    let body = axum::Json(serde_json::json!({ "account_id": account_id }));
    Ok((StatusCode::CREATED, body).into_response())
}

/// `POST /v1/accounts/{id}/deposits`: `204`.
async fn deposit(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<PostingRequest>,
) -> Result<StatusCode, ApiError> {
    let id = account_id(&id)?;
    let command = AccountCommand::Deposit {
        amount: amount(body.amount)?,
        reference: body.reference,
    };
    state.cqrs.execute(&id.to_string(), command).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/transfers` (immediate only): `204`. Two commands, source first; when the
/// destination refuses the credit, the source gets its money back and the client the refusal.
async fn transfer(State(state): State<AppState>, Json(body): Json<TransferRequest>) -> Result<StatusCode, ApiError> {
    let amount = amount(body.amount)?;
    currency(&body.currency)?;
    if body.mode != Mode::Immediate || body.expires_in_s.is_some() {
        return Err(invalid(
            "unsupported-mode",
            "Unsupported mode",
            "The baseline implements immediate transfers only.",
        )
        .into());
    }
    if body.from == body.to {
        return Err(ApiError(refused(&AccountError::TransferToSelf), None));
    }
    let transfer_id = body.transfer_id.unwrap_or_else(Uuid::now_v7);
    let reference = format!("transfer {transfer_id}");
    let debit = AccountCommand::Withdraw {
        amount,
        reference: reference.clone(),
    };
    let from = body.from.to_string();
    state.cqrs.execute(&from, debit).await.map_err(|e| match e {
        // The source is the account the client names first: say which one is missing.
        AggregateError::UserError(AccountError::NotFound) => {
            AggregateError::UserError(AccountError::AccountNotFound { account_id: body.from })
        }
        other => other,
    })?;
    let credit = AccountCommand::Deposit {
        amount,
        reference: reference.clone(),
    };
    if let Err(refusal) = execute_leg(&state.cqrs, &body.to.to_string(), credit).await {
        let refund = AccountCommand::Deposit {
            amount,
            reference: format!("reversal of {reference}"),
        };
        if let Err(error) = execute_leg(&state.cqrs, &from, refund).await {
            // The money left the source and reached nobody: what a non-atomic transfer risks.
            let cause = format!("transfer {transfer_id}: credit refused ({refusal}) and the refund failed ({error})");
            return Err(ApiError(Problem::internal(), Some(cause)));
        }
        return Err(match refusal {
            AggregateError::UserError(AccountError::NotFound) => {
                AggregateError::UserError(AccountError::AccountNotFound { account_id: body.to })
            }
            other => other,
        }
        .into());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a leg of a transfer whose source is already debited, again while it loses a race.
async fn execute_leg(
    cqrs: &Cqrs,
    account_id: &str,
    command: AccountCommand,
) -> Result<(), AggregateError<AccountError>> {
    let mut attempts = 1;
    loop {
        match cqrs.execute(account_id, command.clone()).await {
            Err(AggregateError::AggregateConflict) if attempts < LEG_ATTEMPTS_MAX => attempts += 1,
            outcome => return outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(error: AggregateError<AccountError>) -> u16 {
        ApiError::from(error).0.status
    }

    #[test]
    fn refusals_get_the_status_their_variant_documents_and_a_lost_race_is_a_409() {
        assert_eq!(status(AggregateError::UserError(AccountError::NotFound)), 404);
        assert_eq!(status(AggregateError::UserError(AccountError::AlreadyExists)), 409);
        let insufficient = AccountError::InsufficientFunds {
            available: 0,
            requested: 1,
        };
        assert_eq!(status(AggregateError::UserError(insufficient)), 422);
        assert_eq!(status(AggregateError::AggregateConflict), 409);
    }

    #[test]
    fn storage_failures_are_server_errors_whose_cause_is_kept_for_the_log_only() {
        let error = ApiError::from(AggregateError::<AccountError>::DatabaseConnectionError(
            "connection refused".into(),
        ));
        assert_eq!(error.0.status, 503);
        assert_eq!(error.1.as_deref(), Some("connection refused"));
        let body = serde_json::to_string(&error.0).unwrap();
        assert!(!body.contains("connection refused"), "{body}");
    }
}
