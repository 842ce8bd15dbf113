//! Observability through the real binaries: the Prometheus series every service exposes after
//! known traffic, the relay's probes, request and correlation ids on the log lines of a
//! request, and one trace followed from an HTTP request through the relay to the projector,
//! exported over OTLP to a collector this test runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::IntoResponse;
use prost::Message as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_event_store::nats_users;
use tally_event_store::partition::Topology;
use tally_event_store::{EventStore, NewEvent, StreamAppend};
use tally_service::auth::Role;
use tally_tests::{Api, Proc, Stack, TestDb, TestNats, command_api, eventually, free_port};
use uuid::Uuid;

/// Generous bound for anything asynchronous on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// A sample of a scrape: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// One scrape of a `/metrics` endpoint: every sample.
#[derive(Debug)]
struct Scrape(Vec<Sample>);

impl Scrape {
    async fn of(base: &str) -> Self {
        let response = reqwest::get(format!("{base}/metrics")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{base}/metrics needs no token");
        Self::parse(&response.text().await.unwrap())
    }

    /// The text exposition format: `name{k="v",…} value` per line, `#` comments.
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.strip_suffix('}').expect("labels end with }")),
                    None => (series, ""),
                };
                let labels = labels
                    .split("\",")
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once("=\"").expect("a label is k=\"v\"");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels, value.parse().expect("a numeric value"))
            })
            .collect();
        Self(samples)
    }

    /// The sum of the samples of `name` that carry every one of `labels`; `None` when there
    /// are none.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .0
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|(_, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like [`Scrape::get`], failing the test with the whole scrape when the series is absent.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name} {labels:?} in the scrape: {self:#?}"))
    }
}

#[tokio::test]
async fn metrics_of_both_apis_count_the_commands_and_requests_they_served() {
    let stack = Stack::start().await;
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let deposits = format!("/v1/accounts/{id}/deposits");
    for _ in 0..5 {
        let (status, body, _) = api.post_keyed(&deposits, &json!({"amount": 100})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, _, replayed) = api.post(&deposits, Some("obs-replay"), &json!({"amount": 1})).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    let (status, _, replayed) = api.post(&deposits, Some("obs-replay"), &json!({"amount": 1})).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    let (status, body, _) = api
        .post_keyed(&format!("/v1/accounts/{id}/withdrawals"), &json!({"amount": 1_000_000}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let unmatched = reqwest::get(format!("{}/no/such/route", stack.command)).await.unwrap();
    assert_eq!(unmatched.status(), StatusCode::NOT_FOUND);
    // Metrics are for operators: only on the operations listener, which also answers probes.
    for base in [&stack.command, &stack.query] {
        let public = reqwest::get(format!("{base}/metrics")).await.unwrap();
        assert_eq!(
            public.status(),
            StatusCode::NOT_FOUND,
            "{base}/metrics is not served to clients"
        );
        for probe in ["/health", "/ready"] {
            let response = reqwest::get(format!("{}{probe}", stack.ops_of(base))).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{probe} on the operations listener");
        }
    }

    let scrape = Scrape::of(stack.ops_of(&stack.command)).await;
    assert_eq!(commands(&scrape, "open", "accepted"), 1.0);
    assert_eq!(commands(&scrape, "deposit", "accepted"), 6.0);
    assert_eq!(commands(&scrape, "deposit", "replayed"), 1.0);
    assert_eq!(commands(&scrape, "withdraw", "rejected"), 1.0);
    assert_eq!(
        scrape.value("tally_idempotent_replays_total", &[("command", "deposit")]),
        1.0
    );
    let latency = [("command", "deposit"), ("outcome", "accepted")];
    assert_eq!(scrape.value("tally_command_duration_seconds_count", &latency), 6.0);
    assert_eq!(
        scrape.value(
            "tally_command_duration_seconds_bucket",
            &[latency[0], latency[1], ("le", "+Inf")]
        ),
        6.0
    );
    let spent = scrape.value("tally_command_duration_seconds_sum", &latency);
    assert!(spent > 0.0 && spent < 60.0, "6 deposits took {spent} s in all");
    // Every command went through exactly one committed batch; only the acceptances appended
    // (the open and six deposits, one event each).
    assert_eq!(scrape.value("tally_append_batch_commands_sum", &[]), 9.0);
    assert_eq!(scrape.value("tally_append_batch_events_sum", &[]), 7.0);
    assert!(scrape.value("tally_append_batch_events_count", &[]) >= 1.0);
    assert_eq!(scrape.value("tally_writer_queue_commands", &[]), 0.0);
    let http = |route: &str, status: &str| {
        scrape.value(
            "tally_http_requests_total",
            &[("route", route), ("method", "POST"), ("status", status)],
        )
    };
    assert_eq!(http("/v1/accounts/{id}/deposits", "201"), 7.0);
    assert_eq!(http("/v1/accounts/{id}/withdrawals", "422"), 1.0);
    assert_eq!(http("/v1/accounts", "201"), 1.0);
    // Two unmatched GETs: `/no/such/route` and `/metrics` asked of the main port.
    assert_eq!(
        scrape.value(
            "tally_http_requests_total",
            &[("route", "unmatched"), ("method", "GET"), ("status", "404")]
        ),
        2.0
    );
    assert_eq!(
        scrape.value(
            "tally_http_request_duration_seconds_count",
            &[("route", "/v1/accounts/{id}/deposits"), ("method", "POST")]
        ),
        7.0
    );

    // A second command API writes the same account: the first one's cached version is stale,
    // so its next command meets a version conflict, reloads and retries, and counts it.
    let (other, _other_proc) = command_api(&stack.db, &[]).await;
    let (status, body, _) = other.post_keyed(&deposits, &json!({"amount": 1})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body, _) = api.post_keyed(&deposits, &json!({"amount": 1})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let scrape = Scrape::of(stack.ops_of(&stack.command)).await;
    assert_eq!(
        scrape.value("tally_command_conflict_retries_total", &[("reason", "conflict")]),
        1.0
    );
    assert_eq!(commands(&scrape, "deposit", "accepted"), 7.0);

    // The query API, whatever its answers while the projection catches up.
    let reader = tally_tests::client_with(&tally_tests::token("obs", &[Role::Reader]))
        .build()
        .unwrap();
    for account in [id, id, id, Uuid::now_v7(), Uuid::now_v7()] {
        let response = reader
            .get(format!("{}/v1/accounts/{account}", stack.query))
            .send()
            .await
            .unwrap();
        assert!([StatusCode::OK, StatusCode::NOT_FOUND].contains(&response.status()));
    }
    let scrape = Scrape::of(stack.ops_of(&stack.query)).await;
    let route = [("route", "/v1/accounts/{id}"), ("method", "GET")];
    assert_eq!(scrape.value("tally_http_requests_total", &route), 5.0);
    assert!(scrape.value("tally_http_requests_total", &[route[0], route[1], ("status", "404")]) >= 2.0);
    assert_eq!(scrape.value("tally_http_request_duration_seconds_count", &route), 5.0);

    // The projector's own series, once it has applied the account's events.
    eventually(PATIENCE, "the projector to report its applied events", || async {
        let scrape = Scrape::of(&stack.projector).await;
        let applied = scrape.get("tally_projection_events_applied_total", &[("projection", "accounts")])?;
        (applied >= 9.0).then_some(())
    })
    .await;
}

/// `tally_commands_total` of one command and outcome.
fn commands(scrape: &Scrape, command: &str, outcome: &str) -> f64 {
    scrape.value("tally_commands_total", &[("command", command), ("outcome", outcome)])
}

/// Appends `events` deposits to a new account stream.
async fn append_events(store: &EventStore, events: usize) {
    let stream = StreamAppend {
        stream_type: "account".into(),
        stream_id: Uuid::now_v7(),
        expected_version: 0,
        known_prev_hash: None,
        events: (0..events)
            .map(|_| NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "FundsDeposited".into(),
                schema_version: 1,
                payload: r#"{"amount":1,"currency":"EUR","reference":"obs"}"#.into(),
                metadata: format!(r#"{{"correlation_id":"{}"}}"#, Uuid::now_v7()),
            })
            .collect(),
    };
    store.append(vec![stream]).await.unwrap();
}

/// A relay on `db` and `nats` whose probes listen on a port of its own; returns its base URL.
fn relay(db: &TestDb, nats: &TestNats, nats_url: &str) -> (String, Proc) {
    let port = free_port();
    let mut env = nats.env(nats_users::RELAY);
    env.retain(|(k, _)| *k != "TALLY_NATS_URL");
    env.extend([
        ("TALLY_NATS_URL", nats_url.to_owned()),
        ("TALLY_DATABASE_URL", db.url.clone()),
        ("TALLY_PARTITIONS", "4".into()),
        ("TALLY_RELAY_LISTEN", format!("127.0.0.1:{port}")),
    ]);
    (format!("http://127.0.0.1:{port}"), Proc::spawn("tally-relay", &env))
}

/// `GET {base}/ready`: its status and, when 200, the role it reports.
async fn readiness(base: &str) -> Option<(StatusCode, Option<String>)> {
    let response = reqwest::get(format!("{base}/ready")).await.ok()?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Some((status, body["role"].as_str().map(str::to_owned)))
}

/// Waits until the relay at `base` is ready; the role it reports then.
async fn role_once_ready(base: &str) -> String {
    eventually(PATIENCE, &format!("the relay at {base} to be ready"), || async {
        match readiness(base).await? {
            (StatusCode::OK, role) => role,
            _ => None,
        }
    })
    .await
}

#[tokio::test]
async fn relay_metrics_and_probes_report_lag_publishes_and_which_instance_leads() {
    let db = TestDb::new().await;
    let nats = TestNats::new();
    let store = db.store();

    // A relay that cannot reach NATS is alive, not ready, and sees the backlog grow.
    let dead_nats = format!("nats://127.0.0.1:{}", free_port());
    let (stuck, mut stuck_proc) = relay(&db, &nats, &dead_nats);
    let health = eventually(PATIENCE, "the stuck relay's /health", || async {
        reqwest::get(format!("{stuck}/health")).await.ok()
    })
    .await;
    assert_eq!(health.status(), StatusCode::OK);
    append_events(&store, 12).await;
    let (status, _) = readiness(&stuck).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", stuck_proc.log_tail());
    eventually(PATIENCE, "the stuck relay to count 12 events behind", || async {
        let scrape = Scrape::of(&stuck).await;
        let behind = scrape.get("tally_relay_lag_events", &[])?;
        let seconds = scrape.get("tally_relay_lag_seconds", &[])?;
        (behind == 12.0 && seconds > 0.0).then_some(())
    })
    .await;
    stuck_proc.kill9();

    // Two healthy relays: one leads and publishes the backlog, the other stands by.
    let (first, mut first_proc) = relay(&db, &nats, &nats.url);
    assert_eq!(role_once_ready(&first).await, "leader", "{}", first_proc.log_tail());
    let (second, second_proc) = relay(&db, &nats, &nats.url);
    assert_eq!(role_once_ready(&second).await, "standby", "{}", second_proc.log_tail());
    append_events(&store, 8).await;
    eventually(PATIENCE, "the leader to publish all 20 events and catch up", || async {
        let scrape = Scrape::of(&first).await;
        let published = scrape.get("tally_relay_published_events_total", &[])?;
        let behind = scrape.get("tally_relay_lag_events", &[])?;
        (published == 20.0 && behind == 0.0).then_some(())
    })
    .await;
    let leader = Scrape::of(&first).await;
    assert_eq!(leader.value("tally_relay_leader", &[]), 1.0);
    assert_eq!(leader.value("tally_relay_lag_seconds", &[]), 0.0);
    assert_eq!(leader.value("tally_relay_batch_events_sum", &[]), 20.0);
    let standby = Scrape::of(&second).await;
    assert_eq!(standby.value("tally_relay_leader", &[]), 0.0);
    assert_eq!(standby.get("tally_relay_published_events_total", &[]), None);

    // The leader dies: the standby takes over and says so.
    first_proc.kill9();
    let role = eventually(PATIENCE, "the standby to lead", || async {
        match readiness(&second).await? {
            (StatusCode::OK, Some(role)) if role == "leader" => Some(role),
            _ => None,
        }
    })
    .await;
    assert_eq!(role, "leader");
    assert_eq!(Scrape::of(&second).await.value("tally_relay_leader", &[]), 1.0);
}

#[tokio::test]
async fn every_log_line_of_a_request_carries_its_request_and_correlation_ids() {
    let db = TestDb::new().await;
    let (api, proc) = command_api(&db, &[("TALLY_LOG_FORMAT", "json".into())]).await;
    let id = api.open("EUR").await;
    let correlation = Uuid::now_v7().to_string();
    let response = tally_tests::client()
        .post(format!("{}/v1/accounts/{id}/deposits", api.base))
        .header("Idempotency-Key", Uuid::now_v7().to_string())
        .header("X-Request-Id", "obs-request-1")
        .header("X-Correlation-Id", &correlation)
        .json(&json!({"amount": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["x-request-id"], "obs-request-1");
    assert_eq!(response.headers()["x-correlation-id"], correlation.as_str());
    // Without ids, the server makes them, and the events carry the correlation id it made.
    let response = tally_tests::client()
        .post(format!("{}/v1/accounts/{id}/freeze", api.base))
        .json(&json!({"reason": "observability"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let made_request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let made_correlation = response.headers()["x-correlation-id"].to_str().unwrap().to_owned();
    assert!(Uuid::try_parse(&made_request_id).is_ok(), "{made_request_id}");
    let events = db.read_whole_stream(id).await;
    let metadata = |version: usize| -> Value { serde_json::from_str(&events[version - 1].metadata).unwrap() };
    assert_eq!(metadata(2)["correlation_id"], correlation.as_str());
    assert_eq!(metadata(3)["correlation_id"], made_correlation.as_str());

    for (request_id, correlation_id) in [
        ("obs-request-1", correlation.as_str()),
        (made_request_id.as_str(), made_correlation.as_str()),
    ] {
        let lines = eventually(PATIENCE, "the request's log lines", || async {
            let log = std::fs::read_to_string(&proc.log).ok()?;
            let lines: Vec<Value> = log
                .lines()
                .filter(|l| l.contains(request_id))
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
                .collect();
            (!lines.is_empty()).then_some(lines)
        })
        .await;
        for line in &lines {
            let request = line["spans"]
                .as_array()
                .and_then(|spans| spans.iter().find(|s| s["name"] == "request"))
                .unwrap_or_else(|| panic!("a line without the request span: {line}"));
            assert_eq!(request["request_id"], request_id, "{line}");
            assert_eq!(request["correlation_id"], correlation_id, "{line}");
            assert_eq!(request["trace_id"].as_str().map(str::len), Some(32), "{line}");
        }
    }
}

/// A span as a service exported it.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    parent_span_id: String,
    /// Trace ids of its links.
    links: Vec<String>,
}

/// A tiny OTLP/HTTP collector: keeps every span posted to `/v1/traces`.
#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Vec<Exported>>>);

impl Collector {
    /// Serves on a free port; returns the endpoint to give as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    async fn start() -> (Self, String) {
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(receive))
            .with_state(collector.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (collector, endpoint)
    }

    fn spans_of_trace(&self, trace_id: &str) -> Vec<Exported> {
        let spans = self.0.lock().unwrap();
        spans.iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }

    /// Waits until `service` exported a span named `name` in `trace_id`.
    async fn wait_for(&self, trace_id: &str, service: &str, name: &str) -> Exported {
        eventually(
            PATIENCE,
            &format!("{service} to export {name} in trace {trace_id}"),
            || async {
                self.spans_of_trace(trace_id)
                    .into_iter()
                    .find(|s| s.service == service && s.name == name)
            },
        )
        .await
    }
}

async fn receive(State(collector): State<Collector>, body: Bytes) -> impl IntoResponse {
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
    let mut spans = collector.0.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                Any::StringValue(name) => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
            spans.push(Exported {
                service: service.clone(),
                name: span.name,
                trace_id: hex::encode(&span.trace_id),
                parent_span_id: hex::encode(&span.parent_span_id),
                links: span.links.iter().map(|l| hex::encode(&l.trace_id)).collect(),
            });
        }
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

/// Trace id and parent span id of a `traceparent` value.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len()),
        ("00", 32, 16),
        "{traceparent}"
    );
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test]
async fn a_trace_runs_from_the_http_request_through_the_relay_to_the_projector() {
    let (collector, endpoint) = Collector::start().await;
    let stack = Stack::start_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ])
    .await;
    let client = tally_tests::client();
    let topology = Topology {
        stream_name: stack.nats.stream.clone(),
        subject_prefix: stack.nats.subject_prefix.clone(),
        partitions: 4,
        ..Topology::default()
    };

    // A command without trace context starts a trace of its own.
    let api = Api::new(&stack.command);
    let id = api.open("EUR").await;
    let opened: Value = serde_json::from_str(&stack.db.read_whole_stream(id).await[0].metadata).unwrap();
    let (started_trace, _) = ids(opened["traceparent"].as_str().expect("a trace context is stored"));
    collector
        .wait_for(&started_trace, "tally-command-api", "POST /v1/accounts")
        .await;
    collector
        .wait_for(&started_trace, "tally-projector", "projector.batch")
        .await;

    // A client's traceparent is continued: the stored context is the server span's, a child
    // of the client's span in the same trace.
    let trace_id = format!("{:032x}", Uuid::new_v4().as_u128());
    let client_span = "00f067aa0ba902b7";
    let response = client
        .post(format!("{}/v1/accounts/{id}/deposits", stack.command))
        .header("Idempotency-Key", Uuid::now_v7().to_string())
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .json(&json!({"amount": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let events = stack.db.read_whole_stream(id).await;
    let metadata: Value = serde_json::from_str(&events[1].metadata).unwrap();
    let stored = metadata["traceparent"]
        .as_str()
        .expect("a trace context is stored")
        .to_owned();
    let (stored_trace, server_span) = ids(&stored);
    assert_eq!(stored_trace, trace_id);
    assert_ne!(
        server_span, client_span,
        "the stored context is the server's span, not the client's"
    );

    // The relay puts that context on the NATS message.
    let stream = async_nats::jetstream::new(stack.nats.connect().await)
        .get_stream(&stack.nats.stream)
        .await
        .unwrap();
    let subject = topology.subject(id, "account");
    let header = eventually(PATIENCE, "the deposit on NATS", || async {
        let message = stream.get_last_raw_message_by_subject(&subject).await.ok()?;
        let headers = message.headers;
        (headers.get("Tally-Stream-Version")?.as_str() == "2")
            .then(|| headers.get("traceparent").map(|v| v.as_str().to_owned()))
    })
    .await;
    assert_eq!(header.as_deref(), Some(stored.as_str()));

    // And every hop exported its span in the client's trace.
    let request = collector
        .wait_for(&trace_id, "tally-command-api", "POST /v1/accounts/{id}/deposits")
        .await;
    assert_eq!(request.parent_span_id, client_span);
    collector.wait_for(&trace_id, "tally-command-api", "writer.batch").await;
    collector.wait_for(&trace_id, "tally-relay", "relay.batch").await;
    let applied = collector
        .wait_for(&trace_id, "tally-projector", "projector.batch")
        .await;
    assert_eq!(
        applied.parent_span_id, server_span,
        "the projector continues the stored context"
    );

    // A read continues the client's trace too.
    let read_trace = format!("{:032x}", Uuid::new_v4().as_u128());
    let response = client
        .get(format!("{}/v1/accounts/{id}", stack.query))
        .header("traceparent", format!("00-{read_trace}-{client_span}-01"))
        .send()
        .await
        .unwrap();
    assert!([StatusCode::OK, StatusCode::NOT_FOUND].contains(&response.status()));
    collector
        .wait_for(&read_trace, "tally-query-api", "GET /v1/accounts/{id}")
        .await;
    // No span of another trace claims the client's trace by a link only.
    assert!(
        collector
            .spans_of_trace(&started_trace)
            .iter()
            .all(|s| !s.links.contains(&trace_id)),
        "the open and the deposit were handled apart"
    );
}
