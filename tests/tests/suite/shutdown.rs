//! Graceful shutdown under load: SIGTERM to a command API behind a balancer, to a projector
//! worker and to the active relay, each in the middle of its work. Nothing accepted may be
//! lost, no accepted request may be cut off, every process must exit 0 within its bound, and
//! whoever takes over must do so at once instead of waiting for a lease or lock to lapse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tally_tests::{TestDb, TestNats, client, command_api, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use super::projections::{PARTITIONS, Rig, UNITS, assert_whole, drive, open_accounts};
use super::relay::{
    CATCH_UP, Writers, assert_exactly_once, became_active, committed, full_log, jetstream_for, logs_of, published,
    relay_env, wait_checkpointed_to_the_end, wait_published,
};

/// Concurrent deposit streams of the command API test, one account each.
const STREAMS: usize = 64;
/// The command API's grace (still accepting, `/ready` 503) and drain bound in the test.
const GRACE_MS: u64 = 1_000;
const DRAIN_MS: u64 = 5_000;
/// How often the test's balancer asks an instance's `/ready` (HAProxy's `inter`).
const READY_POLL: Duration = Duration::from_millis(20);
/// Deposits the test sends straight to the stopping instance during its grace.
const GRACE_DEPOSITS: usize = 8;

/// What the deposit streams saw.
#[derive(Debug, Default)]
struct Seen {
    /// 201 answers per account.
    accepted: HashMap<Uuid, usize>,
    /// Answers other than 201: `(instance, status, body)`.
    refused: Vec<(&'static str, StatusCode, String)>,
    /// Requests that failed in transit after their connection was made: `(instance, error)`.
    cut_off: Vec<(&'static str, String)>,
    /// Connections to the stopping instance refused at connect (then sent to the other one).
    refused_at_connect: usize,
    /// 201 answers from the stopping instance to requests the balancer sent after its SIGTERM
    /// (timing decides how many: printed, not asserted).
    served_after_sigterm: usize,
}

/// One raw HTTP/1.1 deposit whose body is sent in two halves `pause` apart: a request that is
/// in flight (accepted, not yet read whole) for as long as the test wants. Returns the status
/// line and whether the response said `Connection: close`.
async fn slow_deposit(port: u16, account: Uuid, pause: Duration) -> (String, bool) {
    let token = tally_tests::token(tally_tests::TEST_SUBJECT, &[tally_service::auth::Role::Teller]);
    let body = br#"{"amount": 1, "reference": "slow"}"#;
    let (first, second) = body.split_at(10);
    let head = format!(
        "POST /v1/accounts/{account}/deposits HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Idempotency-Key: slow-{account}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting");
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(first).await.unwrap();
    tokio::time::sleep(pause).await;
    socket.write_all(second).await.expect("the rest of the body");
    let mut response = Vec::new();
    // The server closes the connection after its answer (`Connection: close`).
    tokio::time::timeout(Duration::from_secs(15), socket.read_to_end(&mut response))
        .await
        .expect("an answer to the slow request")
        .expect("reading the answer to the slow request");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let close = text.to_ascii_lowercase().contains("\r\nconnection: close\r\n");
    (status, close)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_of_a_command_api_under_load_drains_every_accepted_request_and_loses_no_command() {
    let db = TestDb::new().await;
    let env = [
        ("TALLY_SHUTDOWN_GRACE_MS", GRACE_MS.to_string()),
        ("TALLY_SHUTDOWN_DRAIN_MS", DRAIN_MS.to_string()),
    ];
    let (a, mut a_proc) = command_api(&db, &env).await;
    let (b, b_proc) = command_api(&db, &env).await;
    let port: u16 = a.base.rsplit_once(':').unwrap().1.parse().unwrap();
    let mut accounts: Vec<Uuid> = futures::future::join_all((0..STREAMS + 2).map(|_| b.open("EUR"))).await;
    let (slow_account, grace_account) = (accounts.pop().unwrap(), accounts.pop().unwrap());

    // The balancer: `a` is in rotation while its `/ready` answers 200, as behind HAProxy.
    let a_in_rotation = Arc::new(AtomicBool::new(true));
    let a_ready_answer = Arc::new(Mutex::new(None::<(StatusCode, String, bool)>));
    let poller = {
        let (in_rotation, answer, base) = (a_in_rotation.clone(), a_ready_answer.clone(), a.base.clone());
        tokio::spawn(async move {
            let probe = reqwest::Client::new();
            loop {
                match probe.get(format!("{base}/ready")).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        let close = r.headers().get("connection").is_some_and(|v| v == "close");
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        *answer.lock().unwrap() = Some((status, body, close));
                        in_rotation.store(false, Ordering::SeqCst);
                        return;
                    }
                    Err(_) => {
                        in_rotation.store(false, Ordering::SeqCst);
                        return;
                    }
                }
                tokio::time::sleep(READY_POLL).await;
            }
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let sigterm_sent = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sent = Arc::new(AtomicUsize::new(0));
    let http = client();
    let streams: Vec<_> = accounts
        .iter()
        .enumerate()
        .map(|(i, account)| {
            let (stop, sigterm_sent, seen, sent, http) = (
                stop.clone(),
                sigterm_sent.clone(),
                seen.clone(),
                sent.clone(),
                http.clone(),
            );
            let (a_in_rotation, a_base, b_base, account) =
                (a_in_rotation.clone(), a.base.clone(), b.base.clone(), *account);
            tokio::spawn(async move {
                let mut k = i;
                while !stop.load(Ordering::SeqCst) {
                    k += 1;
                    let key = Uuid::now_v7().to_string();
                    let to_a = k % 2 == 0 && a_in_rotation.load(Ordering::SeqCst);
                    let after_sigterm = sigterm_sent.load(Ordering::SeqCst);
                    let mut target = if to_a { ("a", &a_base) } else { ("b", &b_base) };
                    loop {
                        sent.fetch_add(1, Ordering::Relaxed);
                        let response = http
                            .post(format!("{}/v1/accounts/{account}/deposits", target.1))
                            .header("Idempotency-Key", &key)
                            .json(&json!({"amount": 1}))
                            .send()
                            .await;
                        let mut seen = seen.lock().unwrap();
                        match response {
                            Ok(r) if r.status() == StatusCode::CREATED => {
                                *seen.accepted.entry(account).or_default() += 1;
                                if target.0 == "a" && after_sigterm {
                                    seen.served_after_sigterm += 1;
                                }
                            }
                            Ok(r) => seen.refused.push((target.0, r.status(), format!("{:?}", r.headers()))),
                            // Refused at connect: the listener is closed. Same key, other instance.
                            Err(e) if e.is_connect() && target.0 == "a" => {
                                seen.refused_at_connect += 1;
                                target = ("b", &b_base);
                                continue;
                            }
                            Err(e) => seen.cut_off.push((target.0, format!("{e:?}"))),
                        }
                        break;
                    }
                }
            })
        })
        .collect();

    // Under load, then SIGTERM, with one request of `a` in flight across the whole grace.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let slow = tokio::spawn(slow_deposit(
        port,
        slow_account,
        Duration::from_millis(GRACE_MS + 1_000),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent_before = sent.load(Ordering::Relaxed);
    sigterm_sent.store(true, Ordering::SeqCst);
    a_proc.terminate();
    let terminated = Instant::now();
    // During its grace the instance still serves whoever calls it directly, and tells each
    // client to close its connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..GRACE_DEPOSITS {
        let response = http
            .post(format!("{}/v1/accounts/{grace_account}/deposits", a.base))
            .header("Idempotency-Key", Uuid::now_v7().to_string())
            .json(&json!({"amount": 1}))
            .send()
            .await
            .expect("the instance serves during its grace");
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(
            response.headers().get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..])
        );
    }
    let grace_served = terminated.elapsed();
    let bound = Duration::from_millis(GRACE_MS + DRAIN_MS) + Duration::from_secs(2);
    let status = a_proc.wait_exit(bound + Duration::from_secs(5)).await;
    let took = terminated.elapsed();
    let a_log = std::fs::read_to_string(&a_proc.log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "the command API must exit 0 after SIGTERM, within {bound:?}; status {status:?}:\n{a_log}"
    );
    assert!(took <= bound, "it took {took:?} to exit (bound {bound:?}):\n{a_log}");
    // The other instance carries the load alone for a while, then the clients stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for stream in streams {
        stream.await.expect("a deposit stream panicked");
    }
    poller.await.unwrap();
    let (slow_status, slow_close) = slow.await.unwrap();

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let sent = sent.load(Ordering::Relaxed);
    println!(
        "sent {sent} deposits ({sent_before} before SIGTERM); {} answered by the stopping instance after its \
         SIGTERM; {} refused at connect and resent; exit after {took:?}",
        seen.served_after_sigterm, seen.refused_at_connect
    );
    assert!(
        seen.cut_off.is_empty(),
        "requests cut off in transit: {:?}\n--- a ---\n{a_log}",
        &seen.cut_off[..seen.cut_off.len().min(10)]
    );
    assert!(
        seen.refused.is_empty(),
        "answers other than 201: {:?}",
        &seen.refused[..seen.refused.len().min(10)]
    );
    assert!(
        grace_served < Duration::from_millis(GRACE_MS),
        "the grace requests were sent within the grace ({grace_served:?})"
    );
    let ready = a_ready_answer.lock().unwrap().clone();
    let (ready_status, ready_body, ready_close) = ready.expect("the balancer saw `a` leave through a 503 from /ready");
    assert_eq!(ready_status, StatusCode::SERVICE_UNAVAILABLE, "{ready_body}");
    assert!(ready_body.contains("shutting-down"), "{ready_body}");
    assert!(
        ready_close,
        "a draining instance closes every connection after its answer"
    );
    assert!(
        slow_status.contains(" 201 "),
        "a request in flight when the listener closed is finished: {slow_status}\n{a_log}"
    );
    assert!(slow_close, "and its connection closed after the answer");
    assert!(a_log.contains("no longer accepting connections") && a_log.contains("every connection closed"));

    // No accepted command is lost and none is applied twice: each account holds exactly one
    // deposit per 201 (a resent key is one command).
    for account in &accounts {
        let events = db.read_whole_stream(*account).await;
        let deposits = events.iter().filter(|e| e.event_type == "FundsDeposited").count();
        let accepted = seen.accepted.get(account).copied().unwrap_or(0);
        assert_eq!(
            deposits, accepted,
            "account {account}: deposits in the log vs 201 answers"
        );
    }
    let grace_deposits = db.read_whole_stream(grace_account).await;
    assert_eq!(
        grace_deposits
            .iter()
            .filter(|e| e.event_type == "FundsDeposited")
            .count(),
        GRACE_DEPOSITS
    );
    let slow_deposits = db.read_whole_stream(slow_account).await;
    assert_eq!(
        slow_deposits
            .iter()
            .filter(|e| e.event_type == "FundsDeposited")
            .count(),
        1
    );
    // A new connection to the stopped instance is refused at connect, not reset.
    let error = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    drop(b_proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_of_a_projector_worker_mid_stream_hands_its_units_over_at_once_and_loses_nothing() {
    // Leases long enough that waiting for one to lapse would fail the test.
    let lease_ms = "12000";
    let mut rig = Rig::start(
        TestNats::new(),
        &["w1", "w2"],
        &[
            ("TALLY_PROJECTOR_LEASE_MS", lease_ms),
            ("TALLY_SHUTDOWN_DRAIN_MS", "5000"),
        ],
    )
    .await;
    eventually(Duration::from_secs(60), "both workers to hold partitions", || async {
        let leases = rig.leases().await;
        (leases.len() == 2 && leases.values().sum::<i64>() == UNITS).then_some(())
    })
    .await;
    let accounts = open_accounts(&rig.api, 200).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (api, accounts, stop) = (rig.api.clone(), accounts.clone(), stop.clone());
        tokio::spawn(async move { drive(&api, &accounts, 16, usize::MAX, Some(stop)).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let w1 = rig.workers.get_mut("w1").unwrap();
    w1.terminate();
    let terminated = Instant::now();
    let status = w1.wait_exit(Duration::from_secs(10)).await;
    let exited = terminated.elapsed();
    let w1_log = full_log(w1);
    assert!(
        status.is_some_and(|s| s.success()),
        "the worker must exit 0 within 10 s of SIGTERM; status {status:?}:\n{w1_log}"
    );
    assert!(w1_log.contains("leases given back"), "{w1_log}");
    // w2 holds every unit well before w1's leases would have lapsed (12 s): at its next lease
    // round (every 3 s) after w1 gave them back.
    eventually(
        Duration::from_secs(6),
        "w2 to hold every unit, long before w1's leases would lapse",
        || async { (rig.leases().await.get("w2") == Some(&UNITS)).then_some(()) },
    )
    .await;
    let took_over = terminated.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let sent = load.await.expect("the load panicked");

    let expected = rig.converged().await;
    assert_whole(&expected);
    println!(
        "{sent} commands; w1 exited {exited:?} after SIGTERM, w2 held all {UNITS} units after {took_over:?} \
         ({PARTITIONS} partitions, lease {lease_ms} ms)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_of_the_active_relay_mid_stream_releases_the_lock_and_the_standby_takes_over_at_once() {
    let db = TestDb::new().await;
    let nats = TestNats::new();
    let js = jetstream_for(&nats).await;
    let env = relay_env(&db, &nats, &[("TALLY_SHUTDOWN_DRAIN_MS", "5000")]);
    let mut first = tally_tests::Proc::spawn("tally-relay", &env);
    eventually(CATCH_UP, "the first relay to become active", || async {
        became_active(&first).then_some(())
    })
    .await;
    let second = tally_tests::Proc::spawn("tally-relay", &env);
    eventually(CATCH_UP, "the second relay to stand by", || async {
        full_log(&second).contains("standing by").then_some(())
    })
    .await;
    let writers = Writers::start(&db.store(), 8, 4, Duration::from_millis(2));
    eventually(CATCH_UP, "events to flow", || async {
        (writers.written() > 500).then_some(())
    })
    .await;

    first.terminate();
    let terminated = Instant::now();
    let status = first.wait_exit(Duration::from_secs(10)).await;
    let exited = terminated.elapsed();
    let first_log = full_log(&first);
    assert!(
        status.is_some_and(|s| s.success()),
        "the relay must exit 0 within 10 s of SIGTERM; status {status:?}:\n{first_log}"
    );
    assert!(
        first_log.contains("checkpoint stored, lock released"),
        "it finished its batch and released the lock:\n{first_log}"
    );
    // The standby retries the lock every second: it must not wait for anything else.
    eventually(Duration::from_secs(3), "the standby to take the lock", || async {
        became_active(&second).then_some(())
    })
    .await;
    let took_over = terminated.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = writers.stop().await;
    let committed = committed(&db).await;
    assert_eq!(committed.len(), written);
    wait_checkpointed_to_the_end(&db, "the new active relay to checkpoint the end of the log").await;
    wait_published(&js, &nats, written as u64, CATCH_UP, "every event in JetStream").await;
    let logs = logs_of(&[&first, &second]);
    let published = published(&js, &nats).await;
    assert_exactly_once(&published, &committed, true, &logs);
    println!("{written} events; relay exited {exited:?} after SIGTERM, standby active after {took_over:?}");
}
