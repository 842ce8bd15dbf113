//! What every request to a Tally API passes before its handler, in this order: observation
//! (the request span, its ids, HTTP metrics), 5xx logging, the request timeout,
//! authentication ([`Authenticator::authenticate`]), the per-client rate limit. Both APIs wrap
//! their router with [`protect`], so the two cannot differ in how they bound, identify and
//! measure clients. All of it is one middleware ([`edge`]): each layer of a router clones the
//! services inside it for every request, so five layers cost fifteen clones a request.
//!
//! - **Observation**: each request runs in a span `request` carrying its `request_id` (the
//!   client's `X-Request-Id` when it is 1 to 128 visible ASCII characters, else a new UUID), its
//!   `correlation_id` (the client's `X-Correlation-Id` when it is a UUID, else a new one; the
//!   request's header is set to it, so handlers read the same value) and its `trace_id`: the
//!   span continues the client's W3C `traceparent`, or starts a trace. Both ids are echoed as
//!   response headers. Every request counts in `tally_http_requests_total` (`route` template,
//!   `method`, `status`) and `tally_http_request_duration_seconds`.
//! - **Timeout**: a request not answered within `TALLY_REQUEST_TIMEOUT_MS` (reading its body
//!   included) is answered `503 request-timeout` with `Retry-After`. The work may still finish
//!   (a command may commit): a client retries with the same `Idempotency-Key`.
//! - **Rate limit** (governor, a GCRA token bucket per client): a client may send
//!   `TALLY_RATE_LIMIT_BURST` requests at once and `TALLY_RATE_LIMIT_PER_S` per second after
//!   that; beyond it, `429 rate-limited` with `Retry-After`. A client is the token subject when
//!   the request carries a valid token, else the peer IP address (so a caller cannot dodge its
//!   limit by sending garbage tokens, and anonymous callers share their address's bucket).
//!   Buckets of clients idle for a while are dropped every [`RATE_LIMIT_PRUNE_INTERVAL`], so
//!   the limiter's memory is bounded by the clients of the last interval.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::Problem;
use crate::auth::{AuthConfig, AuthConfigError, Authentication, Authenticator};
use crate::errors::ErrorReport;

/// How often the rate limiter forgets clients whose buckets are full again.
pub const RATE_LIMIT_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Header naming one request (client-chosen or made here), echoed in the response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Header tying the requests of one business operation together; a UUID.
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";
/// Longest `X-Request-Id` taken from a client, in bytes; a longer one is replaced.
pub const REQUEST_ID_BYTES_MAX: usize = 128;
/// The `route` label of a request no route matched (so unknown paths cannot grow the series).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Requests per second one client may sustain unless configured otherwise: what a payment
/// API grants one API key (Stripe's default is 100 per second in live mode), so one client,
/// runaway or hostile, cannot take a server's capacity from the others. Load tests and the
/// benchmark lift it explicitly.
pub const RATE_LIMIT_PER_S_DEFAULT: u32 = 200;
/// Requests one client may send at once before [`RATE_LIMIT_PER_S_DEFAULT`] applies: two
/// seconds' worth, for a client catching up after a pause.
pub const RATE_LIMIT_BURST_DEFAULT: u32 = 400;

/// Request limits of a server (flags or `TALLY_*` variables), flattened into its `Config`.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitsConfig {
    /// Requests per second one client may sustain (token subject, else peer IP).
    #[arg(long, env = "TALLY_RATE_LIMIT_PER_S", default_value_t = RATE_LIMIT_PER_S_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000_000))]
    pub rate_limit_per_s: u32,
    /// Requests one client may send at once before the per-second rate applies.
    #[arg(long, env = "TALLY_RATE_LIMIT_BURST", default_value_t = RATE_LIMIT_BURST_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: u32,
    /// Longest time a request may take, body included, before it is answered 503.
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub request_timeout_ms: u64,
    /// Connections kept open at most; beyond, new ones wait to be accepted.
    #[arg(long, env = "TALLY_HTTP_CONNECTIONS_MAX", default_value_t = crate::connections::CONNECTIONS_MAX_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http_connections_max: u32,
    /// Longest wait for a request's headers (also how long a kept-alive connection may sit
    /// idle), in milliseconds.
    #[arg(long, env = "TALLY_HTTP_HEADER_READ_TIMEOUT_MS", default_value_t = crate::connections::HEADER_READ_TIMEOUT_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub http_header_read_timeout_ms: u64,
    /// Longest a read or write on a connection may wait without a byte moving, in
    /// milliseconds; keep it above the request timeout.
    #[arg(long, env = "TALLY_HTTP_IDLE_TIMEOUT_MS", default_value_t = crate::connections::IDLE_TIMEOUT_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub http_idle_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            rate_limit_per_s: RATE_LIMIT_PER_S_DEFAULT,
            rate_limit_burst: RATE_LIMIT_BURST_DEFAULT,
            request_timeout_ms: 10_000,
            http_connections_max: crate::connections::CONNECTIONS_MAX_DEFAULT,
            http_header_read_timeout_ms: crate::connections::HEADER_READ_TIMEOUT_MS_DEFAULT,
            http_idle_timeout_ms: crate::connections::IDLE_TIMEOUT_MS_DEFAULT,
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

/// What the [`edge`] middleware holds, shared by every request.
#[derive(Debug)]
pub struct Guard {
    authenticator: Authenticator,
    rate_limit: DefaultKeyedRateLimiter<Client>,
    timeout: Duration,
}

/// Wraps `router` (every route, the fallback included) in the [`edge`] middleware. Serve the
/// result with `into_make_service_with_connect_info::<SocketAddr>()`, so anonymous clients are
/// told apart by address.
pub fn protect(router: Router, edge: &Edge) -> Router {
    let guard = Arc::new(Guard {
        authenticator: edge.authenticator.clone(),
        rate_limit: rate_limiter(&edge.limits),
        timeout: Duration::from_millis(edge.limits.request_timeout_ms),
    });
    prune_idle_clients(Arc::downgrade(&guard));
    // The edge records metrics: make sure they are kept from the first request on.
    crate::metrics::install();
    router.layer(middleware::from_fn_with_state(guard, self::edge))
}

/// Middleware: everything of this module, outermost first. The 5xx log, refusals and
/// timeouts are inside the request's span and counted.
pub async fn edge(State(guard): State<Arc<Guard>>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let observed = Observed::start(&mut request);
    let method = request.method().clone();
    let uri = request.uri().clone();
    let response = async {
        let response = match tokio::time::timeout(guard.timeout, guard.admit(request, next)).await {
            Ok(response) => response,
            Err(_) => timed_out(guard.timeout),
        };
        crate::errors::log_server_error(&method, &uri, &response);
        response
    }
    .instrument(observed.span.clone())
    .await;
    observed.finish(&method, started, response)
}

impl Guard {
    /// Authenticates the request, then lets it through if its client is within its rate. A
    /// token not seen before is charged to the peer's address before its signature is checked.
    async fn admit(&self, mut request: Request, next: Next) -> Response {
        let (authentication, charged_to_peer) =
            match self.authenticator.authenticate_without_signature(request.headers()) {
                Some(known) => (known, false),
                None => {
                    if let Some(refused) = self.over_rate(&Client::peer(&request)) {
                        return refused;
                    }
                    (self.authenticator.authenticate(request.headers()), true)
                }
            };
        // A refused token's client is its peer, charged already.
        let charged = charged_to_peer && authentication.principal().is_none();
        if !charged && let Some(refused) = self.over_rate(&Client::of(&authentication, &request)) {
            return refused;
        }
        request.extensions_mut().insert(authentication);
        next.run(request).await
    }

    /// Takes one request from `client`'s bucket; the refusal to answer when it is empty.
    fn over_rate(&self, client: &Client) -> Option<Response> {
        let refusal = self.rate_limit.check_key(client).err()?;
        // Whole seconds rounded down, plus one: retrying then is never too early.
        let wait = refusal.wait_time_from(self.rate_limit.clock().now());
        Some(too_many_requests(wait.as_secs() + 1))
    }
}

/// A request's ids and span, from its arrival to its response.
struct Observed {
    span: tracing::Span,
    route: String,
    request_id: String,
    correlation: HeaderValue,
}

impl Observed {
    /// Takes (or makes) the request's ids, sets its correlation id header and opens its span.
    fn start(request: &mut Request) -> Self {
        // Layers of a `Router` run after routing, so the template of the matched route is known.
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or(UNMATCHED_ROUTE, MatchedPath::as_str)
            .to_owned();
        let method = request.method();
        let headers = request.headers();
        let request_id = headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| (1..=REQUEST_ID_BYTES_MAX).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
            .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned);
        let correlation_id = headers
            .get(CORRELATION_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Uuid::try_parse(v).ok())
            .unwrap_or_else(Uuid::now_v7);
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
        let span = tracing::info_span!(
            "request",
            otel.name = %format_args!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
            request_id = %request_id,
            correlation_id = %correlation_id,
            trace_id = tracing::field::Empty,
        );
        // Before anything reads the span's context: once built, its parent is fixed.
        let _ = span.set_parent(parent);
        if let Some(trace_id) = crate::telemetry::trace_id(&span) {
            span.record("trace_id", trace_id);
        }
        let mut buffer = Uuid::encode_buffer();
        let correlation = HeaderValue::from_str(correlation_id.hyphenated().encode_lower(&mut buffer))
            .expect("a UUID is a valid header value");
        request.headers_mut().insert(CORRELATION_ID_HEADER, correlation.clone());
        Self {
            span,
            route,
            request_id,
            correlation,
        }
    }

    /// Records the outcome on the span and in the metrics, and echoes the ids.
    fn finish(self, method: &axum::http::Method, started: Instant, mut response: Response) -> Response {
        let status = response.status();
        let span = self.span;
        span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        let elapsed = started.elapsed();
        span.in_scope(|| {
            tracing::debug!(
                status = status.as_u16(),
                elapsed_ms = elapsed.as_millis() as u64,
                "served"
            )
        });
        let method = method_label(method);
        metrics::counter!(
            "tally_http_requests_total",
            "route" => self.route.clone(),
            "method" => method,
            "status" => status.as_u16().to_string()
        )
        .increment(1);
        metrics::histogram!("tally_http_request_duration_seconds", "route" => self.route, "method" => method)
            .record(elapsed.as_secs_f64());
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&self.request_id) {
            headers.insert(REQUEST_ID_HEADER, value);
        }
        headers.insert(CORRELATION_ID_HEADER, self.correlation);
        response
    }
}

/// The `method` label: a standard method's name, else `other`, so a client inventing methods
/// cannot grow the series without bound.
fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Request headers as the trace-context propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

/// Who a request counts against: its token's subject, else its peer address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    Subject(String),
    Address(IpAddr),
    /// Neither is known (a router called without a socket, as in unit tests).
    Unknown,
}

impl Client {
    /// The client of `request`, authenticated as `authentication`.
    fn of(authentication: &Authentication, request: &Request) -> Self {
        if let Some(principal) = authentication.principal() {
            return Client::Subject(principal.subject.clone());
        }
        Self::peer(request)
    }

    /// The peer address of `request`.
    fn peer(request: &Request) -> Self {
        request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(Client::Unknown, |ConnectInfo(addr)| Client::Address(addr.ip()))
    }
}

fn rate_limiter(limits: &LimitsConfig) -> DefaultKeyedRateLimiter<Client> {
    let per_s = limits.rate_limit_per_s.max(1);
    // One request's worth of the bucket comes back every 1/per_s seconds.
    let period = Duration::from_nanos((1_000_000_000 / u64::from(per_s)).max(1));
    let burst = NonZeroU32::new(limits.rate_limit_burst).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period)
        .expect("the period is above zero")
        .allow_burst(burst);
    DefaultKeyedRateLimiter::keyed(quota)
}

/// Drops full buckets every [`RATE_LIMIT_PRUNE_INTERVAL`] while the edge is in use.
fn prune_idle_clients(guard: Weak<Guard>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(RATE_LIMIT_PRUNE_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(guard) = guard.upgrade() else {
                return;
            };
            guard.rate_limit.retain_recent();
            guard.rate_limit.shrink_to_fit();
        }
    });
}

/// The rate limiter's refusal as a problem.
fn too_many_requests(retry_after_s: u64) -> Response {
    Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", "Too many requests")
        .detail("This client sent more requests than its rate limit allows; retry after `Retry-After` seconds.")
        .retry_after(retry_after_s)
        .into_response()
}

/// The answer to a request the rest of the stack did not answer within `limit`.
fn timed_out(limit: Duration) -> Response {
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
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
            ..LimitsConfig::default()
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
    async fn a_request_gets_its_ids_echoed_and_is_counted_under_its_route_template() {
        let app = protect(
            Router::new().route("/things/{id}", get(|| async { "ok" })),
            &edge(1_000, 1_000, 10_000),
        );
        let request = axum::http::Request::get("/things/42")
            .header(REQUEST_ID_HEADER, "client-chosen-1")
            .header(CORRELATION_ID_HEADER, "not a uuid")
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[REQUEST_ID_HEADER], "client-chosen-1");
        let correlation = response.headers()[CORRELATION_ID_HEADER].to_str().unwrap();
        assert!(
            Uuid::try_parse(correlation).is_ok(),
            "a malformed one is replaced: {correlation}"
        );
        let unmatched = app.oneshot(get_with(None)).await.unwrap();
        assert_eq!(unmatched.status(), StatusCode::NOT_FOUND);
        assert!(Uuid::try_parse(unmatched.headers()[REQUEST_ID_HEADER].to_str().unwrap()).is_ok());

        let scrape = crate::metrics::install().render();
        let counted = |route: &str, status: &str| {
            scrape.lines().any(|l| {
                l.starts_with("tally_http_requests_total{")
                    && l.contains(&format!("route=\"{route}\""))
                    && l.contains(&format!("status=\"{status}\""))
            })
        };
        assert!(counted("/things/{id}", "200"), "{scrape}");
        assert!(counted(UNMATCHED_ROUTE, "404"), "{scrape}");
        assert!(!scrape.contains("/things/42"), "paths never become labels: {scrape}");
        assert_eq!(method_label(&"BREW".parse().unwrap()), "other");
        assert_eq!(method_label(&axum::http::Method::POST), "POST");
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
