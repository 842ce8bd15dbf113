//! Authentication, roles and request limits, through the real binaries: every route refuses
//! callers without the role its OpenAPI document declares, the token subject is the actor of
//! the events, and a client over its limits gets 429, 413, 422 or 503 problems.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_service::auth::{Claims, Role, mint};
use tally_tests::{
    Api, JWT_SECRET, Proc, Stack, TestDb, bin_dir, client_with, command_api, free_port, problem_code, token,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// Every operation of the document at `{base}/openapi.json` that declares a role: (method, path
/// with its ids filled in, role).
async fn protected_routes(base: &str) -> Vec<(String, String, Role)> {
    let document: Value = reqwest::get(format!("{base}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut routes = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let Some(role) = operation["security"][0]["bearerAuth"][0].as_str() else {
                continue;
            };
            let concrete = path
                .replace("{id}", &Uuid::now_v7().to_string())
                .replace("{stream_id}", &Uuid::now_v7().to_string())
                .replace("{event_id}", &Uuid::now_v7().to_string());
            routes.push((method.to_uppercase(), concrete, role.parse().unwrap()));
        }
    }
    routes
}

/// Sends the route's request (an empty JSON object under a fresh key for a POST) with the
/// `Authorization` header `authorization`, if any.
async fn call(base: &str, method: &str, path: &str, authorization: Option<&str>) -> reqwest::Response {
    let client = reqwest::Client::new();
    let url = format!("{base}{path}");
    let mut request = match method {
        "GET" => client.get(&url),
        "POST" => client
            .post(&url)
            .header("Idempotency-Key", Uuid::now_v7().to_string())
            .json(&json!({})),
        other => panic!("no test request for {other}"),
    };
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.unwrap()
}

/// Checks a refusal's status, problem code and `WWW-Authenticate` challenge.
async fn assert_refused(response: reqwest::Response, status: StatusCode, code: &str, challenge: &str, what: &str) {
    assert_eq!(response.status(), status, "{what}");
    let header = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"))
        .to_owned();
    assert!(header.starts_with("Bearer "), "{what}: {header}");
    assert!(header.contains(challenge), "{what}: {header} lacks {challenge}");
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "application/problem+json",
        "{what}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(problem_code(&body), code, "{what}: {body}");
}

#[tokio::test]
async fn every_route_refuses_callers_without_the_role_its_document_declares() {
    let stack = Stack::start().await;
    let command_routes = protected_routes(&stack.command).await;
    let query_routes = protected_routes(&stack.query).await;
    // The matrix runs over what the documents declare; make sure they declare the routes.
    assert_eq!(command_routes.len(), 14, "{command_routes:?}");
    assert!(command_routes.iter().all(|(_, _, role)| *role == Role::Teller));
    assert_eq!(query_routes.len(), 12, "{query_routes:?}");
    let audit =
        |path: &str| path.starts_with("/v1/audit/") || path.starts_with("/v1/ledger/") || path.ends_with("/as-of");
    assert!(
        query_routes
            .iter()
            .all(|(_, path, role)| *role == if audit(path) { Role::Auditor } else { Role::Reader }),
        "{query_routes:?}"
    );

    let mut expired = Claims::new("mallory", &Role::ALL, 0);
    expired.exp -= 3600;
    let expired = mint(JWT_SECRET.as_bytes(), &expired);
    let forged = mint(
        b"not the server's secret, but long enough",
        &Claims::new("mallory", &Role::ALL, 3600),
    );
    for (base, routes) in [(&stack.command, command_routes), (&stack.query, query_routes)] {
        for (method, path, role) in routes {
            let what = |case: &str| format!("{method} {path} ({role}) with {case}");
            let response = call(base, &method, &path, None).await;
            assert_refused(
                response,
                StatusCode::UNAUTHORIZED,
                "missing-token",
                "realm=",
                &what("no token"),
            )
            .await;
            for (case, header) in [
                ("a malformed token", "Bearer not-a-jwt".to_owned()),
                ("a token signed with another key", format!("Bearer {forged}")),
                ("another scheme", format!("Basic {}", token("alice", &Role::ALL))),
            ] {
                let response = call(base, &method, &path, Some(&header)).await;
                assert_refused(
                    response,
                    StatusCode::UNAUTHORIZED,
                    "invalid-token",
                    "error=\"invalid_token\"",
                    &what(case),
                )
                .await;
            }
            let response = call(base, &method, &path, Some(&format!("Bearer {expired}"))).await;
            let case = what("an expired token");
            assert_refused(
                response,
                StatusCode::UNAUTHORIZED,
                "token-expired",
                "error=\"invalid_token\"",
                &case,
            )
            .await;

            let others: Vec<Role> = Role::ALL.into_iter().filter(|r| *r != role).collect();
            let wrong = format!("Bearer {}", token("alice", &others));
            let response = call(base, &method, &path, Some(&wrong)).await;
            let case = what("every other role");
            assert_refused(
                response,
                StatusCode::FORBIDDEN,
                "insufficient-role",
                "insufficient_scope",
                &case,
            )
            .await;

            // With the role the handler answers: for these made-up ids and empty bodies, a
            // 4xx of its own (404, 400, 422) or an empty listing, never an auth refusal or a
            // server error.
            let right = format!("Bearer {}", token("alice", &[role]));
            let response = call(base, &method, &path, Some(&right)).await;
            let status = response.status();
            assert!(
                (status.is_client_error() || (method == "GET" && status == StatusCode::OK))
                    && ![
                        StatusCode::UNAUTHORIZED,
                        StatusCode::FORBIDDEN,
                        StatusCode::TOO_MANY_REQUESTS
                    ]
                    .contains(&status),
                "{}: {status} {}",
                what("the right role"),
                response.text().await.unwrap_or_default()
            );
        }
        for open in tally_service::openapi::OPEN_PATHS {
            let response = reqwest::get(format!("{base}{open}")).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{base}{open} stays open");
        }
    }
}

#[tokio::test]
async fn the_token_subject_is_the_actor_of_every_event_a_command_appends() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    // Minted by the CLI, as an operator would.
    let output = std::process::Command::new(bin_dir().join("tally"))
        .args(["token", "--role", "teller", "--sub", "alice@example.com", "--ttl", "5m"])
        .env("TALLY_JWT_SECRET", JWT_SECRET)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let alice = Api::with_token(&api.base, String::from_utf8(output.stdout).unwrap().trim());

    let from = alice.funded("EUR", 500).await;
    let to = alice.open("EUR").await;
    let (status, body, _) = alice
        .transfer(json!({"from": from, "to": to, "amount": 200, "currency": "EUR", "mode": "immediate"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let transfer: Uuid = body["transfer_id"].as_str().unwrap().parse().unwrap();

    let mut events = 0;
    for stream in [from, to, transfer] {
        for event in db.read_whole_stream(stream).await {
            let metadata: Value = serde_json::from_str(&event.metadata).unwrap();
            assert_eq!(metadata["actor"], "alice@example.com", "{stream}: {metadata}");
            events += 1;
        }
    }
    assert_eq!(events, 6, "open, deposit, debit / open, credit / transfer");
}

/// A command API on `db` whose clients may send 3 requests at once and 1 a second after that,
/// with the bucket of this test's address full again when it returns.
async fn command_api_allowing_one_per_second_after_three(db: &TestDb) -> (Api, Proc) {
    let limits = [
        ("TALLY_RATE_LIMIT_PER_S", "1".to_owned()),
        ("TALLY_RATE_LIMIT_BURST", "3".to_owned()),
    ];
    let started = command_api(db, &limits).await;
    // The readiness polls were anonymous, charged to this address, which is also charged for
    // each token the server has not verified yet: let its bucket fill again.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    started
}

#[tokio::test]
async fn a_client_over_its_rate_limit_gets_429_with_retry_after_and_others_do_not() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api_allowing_one_per_second_after_three(&db).await;
    let alice = Api::with_token(&api.base, &token("alice", &[Role::Teller]));
    let bob = Api::with_token(&api.base, &token("bob", &[Role::Teller]));
    let open = json!({"owner": "Ada", "currency": "EUR"});

    for _ in 0..3 {
        let (status, body, _) = alice.post("/v1/accounts", None, &open).await;
        assert_eq!(status, StatusCode::CREATED, "within the burst: {body}");
    }
    let refused = client_with(&token("alice", &[Role::Teller]))
        .build()
        .unwrap()
        .post(format!("{}/v1/accounts", api.base))
        .json(&open)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(problem_code(&body), "rate-limited", "{body}");

    let (status, body, _) = bob.post("/v1/accounts", None, &open).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "another subject has its own budget: {body}"
    );
    tokio::time::sleep(Duration::from_millis(1100 * retry_after)).await;
    let (status, body, _) = alice.post("/v1/accounts", None, &open).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "after Retry-After the client is served: {body}"
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
            .fetch_one(&db.pool)
            .await
            .unwrap(),
        5,
        "the refused request appended nothing"
    );
}

#[tokio::test]
async fn oversized_deep_or_long_bodies_are_refused_before_they_reach_the_ledger() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[]).await;
    let id = api.open("EUR").await;
    let deposits = format!("/v1/accounts/{id}/deposits");

    let big = json!({"amount": 1, "reference": "x".repeat(20 * 1024)});
    let (status, body, _) = api.post_keyed(&deposits, &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(problem_code(&body), "payload-too-large");

    let mut deep = json!(1);
    for _ in 0..20 {
        deep = json!([deep]);
    }
    let (status, body, _) = api
        .post_keyed(&deposits, &json!({"amount": 1, "reference": deep}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(problem_code(&body), "json-too-deep");

    let long = json!({"amount": 1, "reference": "y".repeat(4 * 1024)});
    let (status, body, _) = api.post_keyed(&deposits, &long).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(problem_code(&body), "string-too-long");

    assert_eq!(db.event_count(id).await, 1, "only the opening");
}

#[tokio::test]
async fn a_request_whose_body_never_arrives_is_answered_503_request_timeout() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api(&db, &[("TALLY_REQUEST_TIMEOUT_MS", "300".to_owned())]).await;
    let address = api.base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    // Announces 100 bytes of body, sends 10, then stalls.
    let head = format!(
        "POST /v1/accounts HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"owner\":",
        token("slowpoke", &[Role::Teller])
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut answer))
        .await
        .expect("the server answers without waiting for the rest of the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after:"), "{answer}");
    assert!(answer.contains("request-timeout"), "{answer}");
}

#[tokio::test]
async fn a_server_without_a_token_key_refuses_to_start() {
    let db = TestDb::new().await;
    let mut proc = Proc::spawn(
        "tally-command-api",
        &[
            ("TALLY_DATABASE_URL", db.url.clone()),
            ("TALLY_COMMAND_LISTEN", format!("127.0.0.1:{}", free_port())),
            tally_tests::ops_listen("TALLY_COMMAND_OPS_LISTEN"),
        ],
    );
    let status = proc
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the server must exit, not serve");
    assert!(!status.success());
    // The whole log: a backtrace (RUST_BACKTRACE) may follow the message.
    let log = std::fs::read_to_string(&proc.log).unwrap();
    assert!(log.contains("no token key configured: set TALLY_JWT_SECRET"), "{log}");
}

/// A command API on `db` with nothing but its database, address and token secret: every limit
/// at its default.
async fn command_api_with_default_limits(db: &TestDb) -> (String, Proc) {
    let port = free_port();
    let proc = Proc::spawn(
        "tally-command-api",
        &[
            ("TALLY_DATABASE_URL", db.url.clone()),
            ("TALLY_COMMAND_LISTEN", format!("127.0.0.1:{port}")),
            tally_tests::ops_listen("TALLY_COMMAND_OPS_LISTEN"),
            ("TALLY_JWT_SECRET", JWT_SECRET.to_owned()),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    tally_tests::wait_ready(&base, &proc).await;
    (base, proc)
}

#[tokio::test]
async fn by_default_one_client_sending_thousands_of_rapid_requests_is_rate_limited() {
    use futures::StreamExt;

    let db = TestDb::new().await;
    let (base, _proc) = command_api_with_default_limits(&db).await;
    let greedy = client_with(&token("greedy", &[Role::Teller])).build().unwrap();
    let started = std::time::Instant::now();
    let statuses: Vec<StatusCode> = futures::stream::iter(0..5_000)
        .map(|_| {
            let request = greedy.get(format!("{base}/v1/accounts/{}", Uuid::nil())).send();
            async move { request.await.unwrap().status() }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let elapsed_s = started.elapsed().as_secs_f64();

    let limited = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    let served = statuses.len() - limited;
    let (per_s, burst) = (
        tally_service::edge::RATE_LIMIT_PER_S_DEFAULT as f64,
        tally_service::edge::RATE_LIMIT_BURST_DEFAULT as f64,
    );
    assert!(
        limited > 0,
        "5,000 rapid requests from one client must meet the default limit"
    );
    assert!(
        (served as f64) <= burst + per_s * elapsed_s + 1.0,
        "{served} served in {elapsed_s:.2} s: more than a burst of {burst} and {per_s}/s"
    );
    let other = client_with(&token("patient", &[Role::Teller])).build().unwrap();
    let status = other
        .get(format!("{base}/v1/accounts/{}", Uuid::nil()))
        .send()
        .await
        .unwrap()
        .status();
    assert_ne!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "another client keeps its own budget"
    );
}

#[tokio::test]
async fn forged_tokens_are_charged_to_their_address_before_their_signature_is_checked() {
    let db = TestDb::new().await;
    let (api, _proc) = command_api_allowing_one_per_second_after_three(&db).await;

    let mut statuses = Vec::new();
    for i in 0..20 {
        // A well-formed token for a new subject each time, signed with another key.
        let forged = mint(
            b"not-the-servers-secret-0123456789abcdef",
            &Claims::new(&format!("mallory-{i}"), &[Role::Teller], 60),
        );
        let response = client_with(&forged)
            .build()
            .unwrap()
            .post(format!("{}/v1/accounts", api.base))
            .json(&json!({"owner": "Mallory", "currency": "EUR"}))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses[..3],
        [401, 401, 401],
        "within the address's burst the signature is checked and refused"
    );
    assert!(
        statuses[3..].iter().all(|s| *s == 429),
        "beyond it, tokens never seen are refused before any signature check: {statuses:?}"
    );
}
