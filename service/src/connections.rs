//! How the APIs accept and keep connections: a cap on how many are open, a bound on the wait
//! for a request's headers, and a bound on a connection where nothing moves.
//!
//! `axum::serve` does neither (it gives hyper no timer, so hyper's header-read timeout never
//! fires, and it accepts without bound), so [`crate::shutdown::serve`] runs this accept loop:
//!
//! - **Connection cap** (`TALLY_HTTP_CONNECTIONS_MAX`): at the cap, the server stops accepting
//!   until a connection closes; new ones wait in the kernel's listen backlog, so a flood of
//!   connections cannot exhaust file descriptors or memory.
//! - **Header-read timeout** (`TALLY_HTTP_HEADER_READ_TIMEOUT_MS`): from the moment the server
//!   waits for a request, its headers must be complete within this time, or the connection is
//!   closed. This stops a client that sends half a request line and stops (or trickles bytes)
//!   from holding a connection, and it is also how long a kept-alive connection may sit idle
//!   between two requests. A load balancer in front should drop its idle connections to the
//!   server sooner.
//! - **Idle timeout** (`TALLY_HTTP_IDLE_TIMEOUT_MS`): a connection where a read or a write has
//!   waited this long without a byte moving is closed: a client that stops reading its
//!   response, or stalls in the middle of a body. Longer than the request timeout, so a slow
//!   handler is answered (503) before its connection is cut.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tower::ServiceExt;

use crate::edge::LimitsConfig;

/// Connections an API keeps open at most, unless configured otherwise.
pub const CONNECTIONS_MAX_DEFAULT: u32 = 4_096;
/// The longest wait for a request's headers, unless configured otherwise, in milliseconds.
pub const HEADER_READ_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// The longest a read or write may wait without a byte moving, unless configured otherwise, in
/// milliseconds.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 60_000;
/// Pause after an accept error that is not one connection's (out of file descriptors, say),
/// so the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` and serves `app` on each, within `limits`, until `closing`
/// resolves; then stops accepting and returns the connections still open, to be drained.
pub(crate) async fn accept(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: &LimitsConfig,
    closing: impl Future<Output = ()>,
) -> GracefulShutdown {
    // HTTP/1.1 only: hyper's protocol-sniffing builder (HTTP/1 or HTTP/2) waits for a
    // connection's first bytes with no timeout, so a connection that sends nothing would be
    // held until the idle timeout. Clients and load balancers speak HTTP/1.1 to the APIs.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.http_header_read_timeout_ms));
    let idle = Duration::from_millis(limits.http_idle_timeout_ms);
    let permits = Arc::new(Semaphore::new(limits.http_connections_max as usize));
    let open = GracefulShutdown::new();
    tokio::pin!(closing);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut closing => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if !is_connection_error(&error) {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    continue;
                }
            },
            () = &mut closing => break,
        };
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_read_timeout(Some(idle));
        stream.set_write_timeout(Some(idle));
        let io = TokioIo::new(Box::pin(stream));
        let connection = builder.serve_connection(io, TowerToHyperService::new(with_peer(app.clone(), peer)));
        let connection = open.watch(connection);
        tokio::spawn(async move {
            // An error here is the client's (it went away, or timed out): nothing to report.
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    open
}

/// `app` with the peer's address in every request's extensions (what `ConnectInfo` reads;
/// the rate limit keys anonymous clients by it).
fn with_peer(
    app: Router,
    peer: SocketAddr,
) -> impl tower::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Clone {
    tower::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(request)
    })
}

/// Errors of one connection (the client gave up before it was accepted), after which the loop
/// simply accepts the next.
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(error.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}
