//! Stopping cleanly: the signal ([`signal`]) and how an HTTP server drains ([`serve`]).
//!
//! On SIGTERM (or Ctrl-C) a server served by [`serve`] goes through two phases, so that no
//! request it has accepted is cut off and no client on a kept-alive connection is surprised:
//!
//! 1. **Grace** (`TALLY_SHUTDOWN_GRACE_MS`, 0 by default): it keeps accepting and serving, but
//!    `/ready` answers `503 shutting-down` (a load balancer takes the instance out of rotation)
//!    and every response carries `Connection: close` (a client does not reuse its connection
//!    to this instance). Set it to the time your load balancer needs to notice (its health-check
//!    interval times its failure count).
//! 2. **Drain** (bounded by `TALLY_SHUTDOWN_DRAIN_MS`): the listening socket is closed, so a new
//!    connection is refused at connect (a client or balancer moves on to another instance);
//!    requests in flight run to their end and are answered with `Connection: close`; idle
//!    kept-alive connections are closed. When the bound passes first, the connections still
//!    open are dropped with the process and a warning is logged.
//!
//! What a client can see, then: answers to everything it sent before the listener closed;
//! `connection refused` for a connection opened after; and, as with any server closing an idle
//! kept-alive connection, a request written onto such a connection at the very instant it
//! closes fails in transit. A command retried with the same `Idempotency-Key` is safe in every
//! case.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use crate::Problem;
use crate::edge::LimitsConfig;

/// Waits for Ctrl-C or SIGTERM. Servers pass this to `run(listener, shutdown)`.
pub async fn signal() {
    let ctrl_c = async {
        // If installing the handler fails we cannot be interrupted this way: wait forever on
        // this branch and rely on SIGTERM.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// How an HTTP server stops (flags or `TALLY_*` variables), flattened into its `Config`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long to keep accepting and serving (with `/ready` answering 503 and
    /// `Connection: close` on every response) before the listener closes, in milliseconds.
    #[arg(long, env = "TALLY_SHUTDOWN_GRACE_MS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub shutdown_grace_ms: u64,
    /// Once the listener is closed, the longest wait for requests in flight to finish, in
    /// milliseconds. Longer than the request timeout, so a request is never cut off by it.
    #[arg(long, env = "TALLY_SHUTDOWN_DRAIN_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub shutdown_drain_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            shutdown_grace_ms: 0,
            shutdown_drain_ms: 15_000,
        }
    }
}

impl ShutdownConfig {
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.shutdown_drain_ms)
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains as the module says.
/// Connections are accepted and bounded as `limits` says ([`crate::connections`]); each
/// request carries its peer's address (`ConnectInfo<SocketAddr>`), which the rate limit keys
/// anonymous clients by. Returns once every connection has closed or the drain bound has
/// passed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: &LimitsConfig,
    config: &ShutdownConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let draining = Arc::new(AtomicBool::new(false));
    serve_draining(listener, app, draining, limits, config, shutdown).await;
    Ok(())
}

/// The two listeners of an API: `main` for its routes, `ops` for its probes and metrics
/// ([`crate::probes`]).
#[derive(Debug)]
pub struct Listeners {
    pub main: tokio::net::TcpListener,
    pub ops: tokio::net::TcpListener,
}

impl Listeners {
    /// Binds both addresses; an address in use is an error naming it.
    pub async fn bind(main: std::net::SocketAddr, ops: std::net::SocketAddr) -> std::io::Result<Self> {
        let bind = |addr: std::net::SocketAddr, what: &'static str| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("binding the {what} listener {addr}: {e}")))
        };
        Ok(Self {
            main: bind(main, "API").await?,
            ops: bind(ops, "operations").await?,
        })
    }
}

/// Longest wait, once the main listener has drained, for scrapes in flight on the operations
/// listener to finish.
const OPS_DRAIN_MAX: Duration = Duration::from_secs(1);

/// [`serve`] for an API: `app` on `listeners.main`, `ops` on `listeners.ops`. The operations
/// listener keeps answering (metrics, `/ready` at 503 once draining) until the main one has
/// drained, so the last scrapes see the shutdown; then it closes too.
pub async fn serve_with_ops(
    listeners: Listeners,
    app: Router,
    ops: Router,
    limits: &LimitsConfig,
    config: &ShutdownConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let draining = Arc::new(AtomicBool::new(false));
    let ops = ops.layer(middleware::from_fn_with_state(draining.clone(), mark_draining));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ops_limits = limits.clone();
    let ops_served = tokio::spawn(async move {
        let closing = async {
            // Resolves when told to stop, or when the sender is dropped.
            let _ = stopped.await;
        };
        let open = crate::connections::accept(listeners.ops, ops, &ops_limits, closing).await;
        let _ = tokio::time::timeout(OPS_DRAIN_MAX, open.shutdown()).await;
    });
    serve_draining(listeners.main, app, draining, limits, config, shutdown).await;
    let _ = stop.send(());
    ops_served.await.map_err(std::io::Error::other)
}

/// [`serve`], with `draining` raised when `shutdown` resolves.
async fn serve_draining(
    listener: tokio::net::TcpListener,
    app: Router,
    draining: Arc<AtomicBool>,
    limits: &LimitsConfig,
    config: &ShutdownConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = app.layer(middleware::from_fn_with_state(draining.clone(), mark_draining));
    let grace = config.grace();
    let closing = async move {
        shutdown.await;
        draining.store(true, Ordering::SeqCst);
        if !grace.is_zero() {
            tracing::info!(?grace, "draining: /ready answers 503, still accepting");
            tokio::time::sleep(grace).await;
        }
        tracing::info!("no longer accepting connections; finishing the requests in flight");
    };
    let open = crate::connections::accept(listener, app, limits, closing).await;
    let drain = config.drain();
    // Requests in flight run to their end; idle kept-alive connections close now.
    if tokio::time::timeout(drain, open.shutdown()).await.is_ok() {
        tracing::info!("every connection closed");
    } else {
        tracing::warn!(
            ?drain,
            "requests still in flight after the drain bound; they are dropped"
        );
    }
}

/// Middleware: once draining, `/ready` answers `503 shutting-down` and every response closes
/// its connection.
async fn mark_draining(State(draining): State<Arc<AtomicBool>>, request: Request, next: Next) -> Response {
    if !draining.load(Ordering::SeqCst) {
        return next.run(request).await;
    }
    let mut response = if request.uri().path() == "/ready" {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "shutting-down", "Shutting down")
            .detail("This instance is stopping; send requests to another one.")
            .retry_after(1)
            .into_response()
    } else {
        next.run(request).await
    };
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
