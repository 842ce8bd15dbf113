//! The operations and audit console: server-rendered pages for the people who look at the
//! whole system rather than one request (ops and auditors), served by `tally-console`.
//!
//! - `session`: sign-in with a bearer token kept in an `HttpOnly`, `SameSite=Strict` cookie,
//!   verified with the APIs' own [`tally_service::auth`] configuration; the role each page
//!   needs; the CSRF token of every form and the `Origin` check of every POST.
//! - `api`: the query API client; every call carries the signed-in user's token, so the API
//!   decides what the user may read, exactly as it would for `curl`.
//! - `sampler`: scrapes every service's `/metrics` every few seconds into a bounded ring of
//!   compact points, for the overview's numbers and charts.
//! - `rebuilds`: projection rebuilds started from the page, with their progress.
//! - `pages`: one module per page (overview, projections, accounts, audit); `views` the
//!   layout, money formatting and charts they share.
//!
//! The console reads through the query API and the projection ops functions
//! (`tally_projectors::ops`, as `tally projections` does); it never writes an event.

pub mod api;
pub mod pages;
pub mod rebuilds;
pub mod sampler;
pub mod session;
pub mod views;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use sqlx::PgPool;
use tally_service::auth::{AuthConfig, Authenticator};
use tally_service::shutdown::ShutdownConfig;

/// Configuration of the `tally-console` binary (flags or `TALLY_*` variables). The defaults
/// are the addresses `cargo xtask up` gives the services.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tally-console", about = "Tally operations and audit console", version)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "TALLY_CONSOLE_LISTEN", default_value = "127.0.0.1:8083")]
    pub listen: SocketAddr,
    /// Base URL of the query API the pages read through (with the user's token).
    #[arg(long, env = "TALLY_QUERY_URL", default_value = "http://127.0.0.1:8081")]
    pub query_url: String,
    /// Base URLs of the command APIs' operations listeners (`TALLY_COMMAND_OPS_LISTEN`), whose
    /// `/metrics` the overview samples, comma-separated.
    #[arg(
        long,
        env = "TALLY_CONSOLE_COMMAND_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:9180"
    )]
    pub command_urls: Vec<String>,
    /// Base URLs of the query APIs' operations listeners (`TALLY_QUERY_OPS_LISTEN`), whose
    /// `/metrics` the overview samples (replica lag and rotation), comma-separated.
    #[arg(
        long,
        env = "TALLY_CONSOLE_QUERY_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:9181,http://127.0.0.1:9182"
    )]
    pub query_urls: Vec<String>,
    /// Base URLs of the relays' probe listeners (`/metrics`: leader and lag), comma-separated.
    #[arg(
        long,
        env = "TALLY_CONSOLE_RELAY_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:9092"
    )]
    pub relay_urls: Vec<String>,
    /// Base URLs of the projector workers' listeners (`/metrics`), comma-separated.
    #[arg(
        long,
        env = "TALLY_CONSOLE_PROJECTOR_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:9090,http://127.0.0.1:9091"
    )]
    pub projector_urls: Vec<String>,
    /// How often the services' `/metrics` are sampled (milliseconds).
    #[arg(long, env = "TALLY_CONSOLE_SAMPLE_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(250..=60_000))]
    pub sample_ms: u64,
    /// Postgres primary, for the projection pages (status, pause, resume, retry, rebuild),
    /// through the same functions as `tally projections`.
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tally",
        hide_env_values = true
    )]
    pub database_url: String,
    /// The deployment's partition count (a rebuild keys per-partition rows by it).
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = tally_event_store::partition::PARTITIONS_DEFAULT)]
    pub partitions: u32,
    /// Mark the session cookie `Secure` (set it when the console is served over HTTPS).
    #[arg(long, env = "TALLY_CONSOLE_COOKIE_SECURE")]
    pub cookie_secure: bool,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub shutdown: ShutdownConfig,
}

/// Connections the console's pool may hold: status reads, a pause, and one rebuild (which
/// takes a second connection to read ahead).
const DB_CONNECTIONS_MAX: u32 = 4;
/// The longest a call to another service may take before the page says it is unreachable.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub sessions: Arc<session::Sessions>,
    pub api: api::QueryApi,
    pub pool: PgPool,
    pub samples: Arc<sampler::Samples>,
    pub rebuilds: Arc<rebuilds::Rebuilds>,
    pub partitions: u32,
}

impl AppState {
    /// The state `config` describes, or why the console cannot start (no way to check
    /// tokens, a malformed database URL).
    pub fn new(config: &Config) -> anyhow::Result<(Self, sampler::Targets)> {
        let authenticator: Authenticator = config.auth.authenticator()?;
        let client = reqwest::Client::builder()
            .timeout(UPSTREAM_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("building the HTTP client: {e}"))?;
        let pool = tally_event_store::connect(&config.database_url, DB_CONNECTIONS_MAX)?;
        let targets = sampler::Targets {
            command: config.command_urls.clone(),
            query: config.query_urls.clone(),
            relay: config.relay_urls.clone(),
            projector: config.projector_urls.clone(),
            interval: Duration::from_millis(config.sample_ms),
            client: client.clone(),
        };
        let state = Self {
            sessions: Arc::new(session::Sessions::new(authenticator, config.cookie_secure)),
            api: api::QueryApi::new(client, &config.query_url),
            pool,
            samples: Arc::new(sampler::Samples::default()),
            rebuilds: Arc::new(rebuilds::Rebuilds::default()),
            partitions: config.partitions,
        };
        Ok((state, targets))
    }
}

/// Every page and form of the console.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(pages::overview::page))
        .route("/overview/live", get(pages::overview::live))
        .route("/projections", get(pages::projections::page))
        .route("/projections/live", get(pages::projections::live))
        .route("/projections/{name}/{action}", post(pages::projections::act))
        .route("/accounts", get(pages::accounts::search))
        .route("/accounts/{id}", get(pages::accounts::account))
        .route("/audit", get(pages::audit::page))
        .route("/audit/streams/{id}", get(pages::audit::stream))
        .route("/audit/export", get(pages::audit::export))
        .route("/sign-in", get(session::sign_in_form).post(session::sign_in))
        .route("/sign-out", post(session::sign_out))
        .route("/assets/console.css", get(views::stylesheet))
        .route("/assets/console.js", get(views::script))
        .route("/health", get(tally_service::problem::health))
        .route("/ready", get(ready))
        .fallback(views::not_found)
        .layer(axum::middleware::from_fn(session::same_origin))
        .with_state(state)
}

/// `GET /ready`: the console itself is up (the services it shows may not be; its pages say so).
async fn ready() -> &'static str {
    "ready"
}

/// Serves the console on `listener` until `shutdown` resolves, sampling the services
/// meanwhile.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    targets: sampler::Targets,
    shutdown_config: &ShutdownConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sampling = tokio::spawn(sampler::run(targets, state.samples.clone()));
    // The APIs' connection bounds at their defaults (connection cap, header-read and idle
    // timeouts): the console has a handful of users and no settings of its own for them.
    let connections = tally_service::edge::LimitsConfig::default();
    let served = tally_service::shutdown::serve(listener, router(state), &connections, shutdown_config, shutdown).await;
    sampling.abort();
    served
}
