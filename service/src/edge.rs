//! What every request to a Tally API passes before its handler, in this order (outermost
//! first): 5xx logging, the request timeout, authentication ([`crate::auth::authenticate`]),
//! the per-client rate limit. Both APIs wrap their router with [`protect`], so the two cannot
//! differ in how they bound and identify clients.
//!
//! - **Timeout**: a request not answered within `TALLY_REQUEST_TIMEOUT_MS` (reading its body
//!   included) is answered `503 request-timeout` with `Retry-After`. The work may still finish
//!   (a command may commit): a client retries with the same `Idempotency-Key`.
//! - **Rate limit** (tower_governor, a GCRA token bucket per client): a client may send
//!   `TALLY_RATE_LIMIT_BURST` requests at once and `TALLY_RATE_LIMIT_PER_S` per second after
//!   that; beyond it, `429 rate-limited` with `Retry-After`. A client is the token subject when
//!   the request carries a valid token, else the peer IP address (so a caller cannot dodge its
//!   limit by sending garbage tokens, and anonymous callers share their address's bucket).
//!   Buckets of clients idle for a while are dropped every [`RATE_LIMIT_PRUNE_INTERVAL`], so
//!   the limiter's memory is bounded by the clients of the last interval.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use governor::middleware::NoOpMiddleware;
use tower_governor::GovernorError;
use tower_governor::governor::{GovernorConfig, GovernorConfigBuilder};
use tower_governor::key_extractor::KeyExtractor;

use crate::Problem;
use crate::auth::{AuthConfig, AuthConfigError, Authentication, Authenticator};
use crate::errors::ErrorReport;

/// How often the rate limiter forgets clients whose buckets are full again.
pub const RATE_LIMIT_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Request limits of a server (flags or `TALLY_*` variables), flattened into its `Config`.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitsConfig {
    /// Requests per second one client may sustain (token subject, else peer IP).
    #[arg(long, env = "TALLY_RATE_LIMIT_PER_S", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000_000))]
    pub rate_limit_per_s: u32,
    /// Requests one client may send at once before the per-second rate applies.
    #[arg(long, env = "TALLY_RATE_LIMIT_BURST", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: u32,
    /// Longest time a request may take, body included, before it is answered 503.
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub request_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            rate_limit_per_s: 10_000,
            rate_limit_burst: 20_000,
            request_timeout_ms: 10_000,
        }
    }
}

/// Everything [`protect`] needs: how to authenticate and how far to trust a client.
#[derive(Debug, Clone)]
pub struct Edge {
    pub authenticator: Authenticator,
    pub limits: LimitsConfig,
}

impl Edge {
    /// The edge a server's configuration describes; an error (the server must not start)
    /// when no token key is configured and `--insecure-no-auth` was not given.
    pub fn from_config(auth: &AuthConfig, limits: &LimitsConfig) -> Result<Self, AuthConfigError> {
        let authenticator = auth.authenticator()?;
        if matches!(authenticator, Authenticator::Disabled) {
            tracing::warn!("--insecure-no-auth: every request acts with every role; never run this way in production");
        }
        Ok(Self {
            authenticator,
            limits: limits.clone(),
        })
    }
}

/// Wraps `router` (every route, the fallback included) in the layers of this module.
/// Serve the result with `into_make_service_with_connect_info::<SocketAddr>()`, so anonymous
/// clients are told apart by address.
pub fn protect(router: Router, edge: &Edge) -> Router {
    let rate_limit = rate_limit_config(&edge.limits);
    prune_idle_clients(Arc::downgrade(&rate_limit));
    let governor = tower_governor::GovernorLayer::new(rate_limit).error_handler(too_many_requests);
    let timeout = Duration::from_millis(edge.limits.request_timeout_ms);
    // The last layer added runs first.
    router
        .layer(governor)
        .layer(middleware::from_fn_with_state(
            edge.authenticator.clone(),
            crate::auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(timeout, time_out))
        .layer(middleware::from_fn(crate::errors::log_server_errors))
}

/// Who a request counts against: its token's subject, else its peer address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    Subject(String),
    Address(IpAddr),
    /// Neither is known (a router called without a socket, as in unit tests).
    Unknown,
}

/// The rate limiter's key: [`Client`].
#[derive(Debug, Clone, Copy)]
pub struct ClientKey;

impl KeyExtractor for ClientKey {
    type Key = Client;

    fn extract<T>(&self, request: &axum::http::Request<T>) -> Result<Self::Key, GovernorError> {
        let extensions = request.extensions();
        if let Some(principal) = extensions.get::<Authentication>().and_then(Authentication::principal) {
            return Ok(Client::Subject(principal.subject.clone()));
        }
        Ok(extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(Client::Unknown, |ConnectInfo(addr)| Client::Address(addr.ip())))
    }
}

type RateLimit = GovernorConfig<ClientKey, NoOpMiddleware>;

fn rate_limit_config(limits: &LimitsConfig) -> Arc<RateLimit> {
    let per_s = limits.rate_limit_per_s.max(1);
    // One request's worth of the bucket comes back every 1/per_s seconds.
    let period = Duration::from_nanos((1_000_000_000 / u64::from(per_s)).max(1));
    let burst = NonZeroU32::new(limits.rate_limit_burst).map_or(1, NonZeroU32::get);
    let config = GovernorConfigBuilder::default()
        .period(period)
        .burst_size(burst)
        .key_extractor(ClientKey)
        .finish()
        .expect("period and burst are above zero");
    Arc::new(config)
}

/// Drops full buckets every [`RATE_LIMIT_PRUNE_INTERVAL`] while the limiter is in use.
fn prune_idle_clients(limiter: Weak<RateLimit>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(RATE_LIMIT_PRUNE_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(config) = limiter.upgrade() else {
                return;
            };
            config.limiter().retain_recent();
            config.limiter().shrink_to_fit();
        }
    });
}

/// The rate limiter's refusals as problems.
fn too_many_requests(error: GovernorError) -> Response<Body> {
    match error {
        GovernorError::TooManyRequests { wait_time, .. } => {
            // `wait_time` is whole seconds, rounded down: one more is never too early.
            Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", "Too many requests")
                .detail("This client sent more requests than its rate limit allows; retry after `Retry-After` seconds.")
                .retry_after(wait_time + 1)
                .into_response()
        }
        other => {
            let mut response = Problem::internal().into_response();
            response
                .extensions_mut()
                .insert(ErrorReport(format!("rate limiter: {other}")));
            response
        }
    }
}

/// Middleware: answers 503 when the rest of the stack takes longer than `limit`.
async fn time_out(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "request-timeout", "Request timed out")
                .detail(
                    "The request took longer than this server allows. A command may still have taken \
                     effect: retry with the same Idempotency-Key.",
                )
                .retry_after(1)
                .into_response();
            response
                .extensions_mut()
                .insert(ErrorReport(format!("request timed out after {limit:?}")));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;
    use crate::auth::{Claims, Role, mint};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn edge(per_s: u32, burst: u32, timeout_ms: u64) -> Edge {
        let auth = AuthConfig {
            jwt_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        };
        let limits = LimitsConfig {
            rate_limit_per_s: per_s,
            rate_limit_burst: burst,
            request_timeout_ms: timeout_ms,
        };
        Edge::from_config(&auth, &limits).unwrap()
    }

    fn get_with(token: Option<&str>) -> Request {
        let mut request = axum::http::Request::get("/").body(Body::empty()).unwrap();
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    }

    #[tokio::test]
    async fn a_client_over_its_burst_gets_a_429_problem_with_retry_after_while_others_pass() {
        let app = protect(Router::new().route("/", get(|| async { "ok" })), &edge(1, 2, 10_000));
        let alice = mint(SECRET.as_bytes(), &Claims::new("alice", &[Role::Reader], 60));
        let bob = mint(SECRET.as_bytes(), &Claims::new("bob", &[Role::Reader], 60));
        for _ in 0..2 {
            let response = app.clone().oneshot(get_with(Some(&alice))).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        let refused = app.clone().oneshot(get_with(Some(&alice))).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()["content-type"], "application/problem+json");
        let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry_after), "{retry_after}");
        let other = app.oneshot(get_with(Some(&bob))).await.unwrap();
        assert_eq!(other.status(), StatusCode::OK, "another subject has its own bucket");
    }

    #[tokio::test]
    async fn a_slow_handler_is_answered_503_request_timeout() {
        let slow = Router::new().route(
            "/",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
        let app = protect(slow, &edge(1_000, 1_000, 50));
        let response = app.oneshot(get_with(None)).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key("retry-after"));
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["type"], "https://tally.dev/problems/request-timeout");
    }
}
