//! NATS lets each service do only its own work (`nats_users`), and the projectors apply only
//! events of the log: a publish from anyone else is refused by the server, and an event that
//! gets through anyway (stolen credentials) is refused by the projector and dead-lettered.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_event_store::hash::{HashInput, event_hash};
use tally_event_store::nats_users;
use tally_event_store::partition::partition_of;
use tally_tests::{TestNats, eventually};
use uuid::Uuid;

use super::projections::{PARTITIONS, Rig, open_accounts};

/// How long a refused publish or subscription takes to be reported back by the server.
const VIOLATION_REPORT: Duration = Duration::from_secs(5);

/// A client signed in as `user`, and every error the server reports to it (a permissions
/// violation arrives as an `-ERR` on the connection, not as the publish's result).
async fn client_reporting(nats: &TestNats, user: &str) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let reported = Arc::new(Mutex::new(Vec::new()));
    let sink = reported.clone();
    let client = nats
        .options_as(user)
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    sink.lock().unwrap().push(error.to_string());
                }
            }
        })
        .connect(&nats.url)
        .await
        .unwrap_or_else(|e| panic!("{user} cannot sign in: {e}"));
    (client, reported)
}

/// Waits until the server has reported a violation naming `subject`.
async fn violation_reported(reported: &Arc<Mutex<Vec<String>>>, subject: &str, what: &str) {
    eventually(VIOLATION_REPORT, what, || async {
        let errors = reported.lock().unwrap().clone();
        errors
            .iter()
            .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(subject))
            .then_some(())
    })
    .await;
}

async fn stored_messages(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages
}

#[tokio::test]
async fn nats_refuses_anonymous_clients_wrong_passwords_and_publishes_outside_a_users_permissions() {
    let nats = TestNats::new();
    // Anonymous, and a known user with a wrong password: not let in at all.
    let anonymous = async_nats::connect(&nats.url).await;
    assert!(anonymous.is_err(), "an anonymous client was let in");
    let wrong = async_nats::ConnectOptions::with_user_and_password(nats_users::RELAY.into(), "guess".into())
        .connect(&nats.url)
        .await;
    assert!(wrong.is_err(), "a wrong password was let in");

    // The stream, created by the admin, and the subject of an account event in it.
    let admin = jetstream::new(nats.connect().await);
    tally_event_store::partition::Topology {
        stream_name: nats.stream.clone(),
        subject_prefix: nats.subject_prefix.clone(),
        ..Default::default()
    }
    .ensure_stream(&admin)
    .await
    .unwrap();
    let event_subject = format!("{}.3.account", nats.subject_prefix);
    let invalidations = format!("{}-invalidations.accounts", nats.subject_prefix);

    // The query API and the projectors may not publish events; the relay may not publish
    // invalidations (nor may the query API publish anything).
    for (user, subject) in [
        (nats_users::QUERY, event_subject.as_str()),
        (nats_users::PROJECTOR, event_subject.as_str()),
        (nats_users::QUERY, invalidations.as_str()),
        (nats_users::RELAY, invalidations.as_str()),
    ] {
        let (client, reported) = client_reporting(&nats, user).await;
        client
            .publish(subject.to_owned(), "{}".into())
            .await
            .expect("the client queues the publish");
        client.flush().await.unwrap();
        violation_reported(
            &reported,
            subject,
            &format!("{user}'s publish to {subject} to be refused"),
        )
        .await;
    }
    assert_eq!(
        stored_messages(&admin, &nats.stream).await,
        0,
        "a refused publish was stored"
    );

    // The query API may not read the events (only the invalidations it needs).
    let (query, reported) = client_reporting(&nats, nats_users::QUERY).await;
    let events = format!("{}.>", nats.subject_prefix);
    let _subscription = query.subscribe(events.clone()).await.unwrap();
    query.flush().await.unwrap();
    violation_reported(
        &reported,
        &events,
        "the query API's subscription to the events to be refused",
    )
    .await;

    // The relay may: its publish is stored and acknowledged.
    let relay = jetstream::new(nats.connect_as(nats_users::RELAY).await);
    relay
        .publish(event_subject.clone(), "{}".into())
        .await
        .unwrap()
        .await
        .expect("JetStream acknowledges the relay's publish");
    assert_eq!(stored_messages(&admin, &nats.stream).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_the_log_does_not_hold_is_refused_dead_lettered_and_never_applied() {
    let rig = Rig::start(TestNats::new(), &["w1"], &[]).await;
    let accounts = open_accounts(&rig.api, 4).await;
    rig.converged().await;
    let victim = accounts[0];
    let partition = partition_of(victim, PARTITIONS);

    // Someone who got past NATS' permissions (here: the admin user) publishes the victim's next
    // version with a large deposit: once with a hash recomputed over the forged fields, once
    // with the fields changed after hashing.
    let deposit = rig
        .db
        .read_whole_stream(victim)
        .await
        .pop()
        .expect("the funding deposit");
    let mut forged = tally_event_store::relay::envelope(&deposit).unwrap();
    forged.version += 1;
    forged.position += 1_000_000;
    forged.event_id = Uuid::now_v7();
    forged.prev_hash = Some(hex::encode(&deposit.hash));
    forged.payload = serde_json::value::RawValue::from_string(
        json!({"amount": 1_000_000, "currency": "EUR", "reference": "forged"}).to_string(),
    )
    .unwrap();
    let prev_hash = deposit.hash.clone();
    forged.hash = hex::encode(event_hash(&HashInput {
        prev_hash: Some(&prev_hash),
        stream_type: &forged.stream_type,
        stream_id: forged.stream_id,
        version: forged.version,
        event_id: forged.event_id,
        event_type: &forged.event_type,
        schema_version: forged.schema_version as i32,
        recorded_at: deposit.recorded_at,
        payload: forged.payload.get(),
        metadata: forged.metadata.get(),
    }));
    let mut altered = forged.clone();
    altered.event_id = Uuid::now_v7();
    altered.payload = serde_json::value::RawValue::from_string(
        json!({"amount": 2_000_000, "currency": "EUR", "reference": "altered"}).to_string(),
    )
    .unwrap();
    let js = jetstream::new(rig.nats.connect().await);
    let subject = format!("{}.{partition}.account", rig.nats.subject_prefix);
    for envelope in [&forged, &altered] {
        js.publish(subject.clone(), serde_json::to_vec(envelope).unwrap().into())
            .await
            .unwrap()
            .await
            .expect("stored in the stream");
    }

    // The real next version, after them: applied, so the partition went on.
    let (status, body, _) = rig
        .api
        .post_keyed(
            &format!("/v1/accounts/{victim}/deposits"),
            &json!({"amount": 7, "reference": "real"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    rig.converged().await;
    let balance: i64 = sqlx::query_scalar("SELECT balance FROM account_balances WHERE account_id = $1")
        .bind(victim)
        .fetch_one(&rig.db.pool)
        .await
        .unwrap();
    assert_eq!(balance, 10_007, "the forged deposits changed the balance");

    // Counted, explained, and the partition still running.
    let unit = eventually(Duration::from_secs(10), "the refusals to be recorded", || async {
        rig.status()
            .into_iter()
            .find(|s| s["projection"] == "accounts" && s["partition"] == partition && s["dead_letters"] == 2)
    })
    .await;
    assert_eq!(unit["state"], "running", "{unit}");
    assert!(
        unit["last_error"].as_str().unwrap().contains("not an event of the log"),
        "{unit}"
    );

    // Both are in the dead-letter subject, each with its reason.
    let stream = js.get_stream(&rig.nats.stream).await.unwrap();
    let letters_subject = format!("{}.dead-letter.accounts.{partition}", rig.nats.subject_prefix);
    let mut reasons = Vec::new();
    let info = stream.get_info().await.unwrap();
    for sequence in info.state.first_sequence..=info.state.last_sequence {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        if message.subject.as_str() == letters_subject {
            let envelope: Value = serde_json::from_slice(&message.payload).unwrap();
            let error = message.headers.get("Tally-Error").unwrap().as_str().to_owned();
            reasons.push((envelope["payload"]["reference"].as_str().unwrap().to_owned(), error));
        }
    }
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, "altered");
    assert!(reasons[0].1.contains("not to the hash it states"), "{reasons:?}");
    assert_eq!(reasons[1].0, "forged");
    assert!(reasons[1].1.contains("no position"), "{reasons:?}");
}
