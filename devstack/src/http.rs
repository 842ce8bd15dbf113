//! Plain HTTP/1.0 to the servers' own loopback control endpoints (NATS `/healthz`, etcd
//! `/health`, Patroni's REST API).
//!
//! Hand-written rather than a client crate: these are a handful of one-shot requests to
//! loopback ports we opened ourselves, from synchronous code (tests, xtask) that must not
//! need a runtime; HTTP/1.0 makes the server close the connection, so the whole answer is
//! simply everything read until EOF.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Timeout for each of connect, write and read of one request.
const IO_TIMEOUT_MS: u64 = 2_000;
/// Control answers are small (a status, a few headers, a JSON document).
const MAX_RESPONSE_BYTES: u64 = 1024 * 1024;

/// A response: the status code and the body.
#[derive(Debug, Clone)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: String,
}

/// `method path` on `127.0.0.1:port`, with a JSON `body` when given; each of connect, write
/// and read may take `timeout`.
pub(crate) fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Response> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n");
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body.as_bytes())?;
    }
    let mut response = String::new();
    stream.take(MAX_RESPONSE_BYTES).read_to_string(&mut response)?;
    let status = response
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:.80}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok(Response { status, body })
}

/// `GET path`, within [`IO_TIMEOUT_MS`] for each step.
pub(crate) fn get(port: u16, path: &str) -> std::io::Result<Response> {
    request(port, "GET", path, None, Duration::from_millis(IO_TIMEOUT_MS))
}
