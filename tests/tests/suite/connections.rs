//! How the APIs bound connections, through the real binary and raw sockets: a client that
//! sends half a request, or stalls mid-body, loses its connection; at the connection cap, new
//! connections wait until one closes.

use std::time::{Duration, Instant};

use tally_service::auth::Role;
use tally_tests::{TestDb, command_api, token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (or `within` passes: then `None`); returns
/// what it sent before.
async fn closed_by_server(socket: &mut TcpStream, within: Duration) -> Option<String> {
    let mut received = Vec::new();
    let outcome = tokio::time::timeout(within, async {
        let mut buffer = [0u8; 4096];
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    outcome.ok().map(|()| String::from_utf8_lossy(&received).into_owned())
}

#[tokio::test]
async fn connections_that_send_half_a_request_line_are_closed_after_the_header_read_timeout() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[("TALLY_HTTP_HEADER_READ_TIMEOUT_MS", "1000".to_owned())]).await;
    let address = api.base.trim_start_matches("http://").to_owned();

    let mut sockets = Vec::new();
    for _ in 0..100 {
        let mut socket = TcpStream::connect(&address).await.unwrap();
        socket.write_all(b"GET /v1/acc").await.unwrap();
        sockets.push(socket);
    }
    let started = Instant::now();
    for socket in &mut sockets {
        closed_by_server(socket, Duration::from_secs(10))
            .await
            .expect("a connection whose headers never complete is closed by the server");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "all 100 closed about a second in, not {:?}",
        started.elapsed()
    );

    // A well-behaved client on a new connection is served as before.
    let (status, body, _) = api
        .post(
            "/v1/accounts",
            None,
            &serde_json::json!({"owner": "Ada", "currency": "EUR"}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn a_connection_where_nothing_moves_is_closed_after_the_idle_timeout() {
    let db = TestDb::new().await;
    let env = [
        ("TALLY_HTTP_IDLE_TIMEOUT_MS", "1000".to_owned()),
        // Longer than the test: only the idle timeout can end the request below.
        ("TALLY_REQUEST_TIMEOUT_MS", "60000".to_owned()),
    ];
    let (api, _proc) = command_api(&db, &env).await;
    let address = api.base.trim_start_matches("http://");
    let mut socket = TcpStream::connect(address).await.unwrap();
    // Announces 100 bytes of body, sends 10, then stalls.
    let head = format!(
        "POST /v1/accounts HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"owner\":",
        token("staller", &[Role::Teller])
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    closed_by_server(&mut socket, Duration::from_secs(15))
        .await
        .expect("a stalled connection is closed by the server");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[tokio::test]
async fn at_the_connection_cap_a_new_connection_waits_until_one_closes() {
    let db = TestDb::new().await;
    let env = [
        ("TALLY_HTTP_CONNECTIONS_MAX", "4".to_owned()),
        ("TALLY_HTTP_HEADER_READ_TIMEOUT_MS", "2000".to_owned()),
    ];
    let (api, _proc) = command_api(&db, &env).await;
    let address = api.base.trim_start_matches("http://").to_owned();
    // Let the readiness polls' kept-alive connection be closed by the header-read timeout.
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(&address).await.unwrap());
    }
    let opened = Instant::now();
    let mut fifth = TcpStream::connect(&address).await.unwrap();
    fifth
        .write_all(format!("GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = closed_by_server(&mut fifth, Duration::from_secs(10))
        .await
        .expect("the fifth connection is served once a slot frees");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        opened.elapsed() >= Duration::from_millis(1_500),
        "the fifth connection was served after {:?}, before the four silent ones timed out",
        opened.elapsed()
    );
}
