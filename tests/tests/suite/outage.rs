//! A Postgres crash under write load, on a private primary: a backend killed with SIGKILL makes
//! the postmaster terminate every connection ("terminating connection because of crash of
//! another server process") and run crash recovery ("the database system is in recovery
//! mode"). Commands in flight must get a retryable 503, never a 500; writes continue once it is
//! back; and nothing acknowledged is lost or doubled. The server is crash-safe (fsync and
//! synchronous commit on), as in production: without it Postgres itself drops the last
//! commits it acknowledged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use tally_tests::{PrivateCluster, TestDb, command_api};
use uuid::Uuid;

const WRITERS: usize = 32;

/// SIGKILLs one client backend of the database `db` on the private primary.
async fn kill_a_backend(admin: &PgPool, db: &str) -> i32 {
    let pid: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' \
         AND pid <> pg_backend_pid() LIMIT 1",
    )
    .bind(db)
    .fetch_one(admin)
    .await
    .expect("a backend of the command API");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(killed.success(), "kill -9 {pid}");
    pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_crash_mid_load_answers_503_then_recovers_and_loses_nothing_acknowledged() {
    let cluster = PrivateCluster::start_durable();
    let services = cluster.services();
    let db = TestDb::on(&services).await;
    let (api, proc) = command_api(&db, &[]).await;
    let accounts: Vec<Uuid> = futures::future::join_all((0..8).map(|_| api.funded("EUR", 0))).await;

    // Each writer deposits with a fresh key, and retries the same key after a 503 until it
    // gets an answer: what a careful client does.
    let stop = Arc::new(AtomicBool::new(false));
    let unavailable = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (api, accounts, stop, unavailable) = (api.clone(), accounts.clone(), stop.clone(), unavailable.clone());
            tokio::spawn(async move {
                let mut acknowledged: Vec<(String, Uuid, i64)> = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("w{w}-{n}");
                    let account = accounts[(w + n) % accounts.len()];
                    let amount = (n % 97 + 1) as i64;
                    let path = format!("/v1/accounts/{account}/deposits");
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let (status, body, _) = api.post(&path, Some(&key), &json!({"amount": amount})).await;
                        match status {
                            StatusCode::CREATED => {
                                acknowledged.push((key, account, amount));
                                break;
                            }
                            StatusCode::SERVICE_UNAVAILABLE => {
                                unavailable.fetch_add(1, Ordering::Relaxed);
                                assert!(Instant::now() < deadline, "503 for a minute: {body}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            other => panic!("a deposit answered {other}: {body}"),
                        }
                    }
                }
                acknowledged
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let admin = PgPool::connect(&services.primary_admin_url).await.unwrap();
    let db_name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let before: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
        .bind(&db_name)
        .fetch_all(&admin)
        .await
        .unwrap();
    kill_a_backend(&admin, &db_name).await;
    drop(admin);
    // Long enough for crash recovery and for writes to flow again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap_or_else(|e| panic!("{e}\n{}", proc.log_tail())));
    }
    // The crash cut every connection there was (crash recovery restarts all backends); how
    // many commands saw it as a 503 depends on what was in flight at that instant.
    let admin = PgPool::connect(&services.primary_admin_url).await.unwrap();
    let survivors: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
        .bind(&before)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(survivors, 0, "every backend of before the crash is gone");
    eprintln!(
        "{} acknowledged, {} answers of 503 during the crash",
        acknowledged.len(),
        unavailable.load(Ordering::Relaxed)
    );

    // Every acknowledged deposit is in the log exactly once, under its key, and nothing else is.
    let pool = PgPool::connect(&db.url).await.unwrap();
    let stored: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT stream_id, payload::text, metadata::text FROM events WHERE event_type = 'FundsDeposited'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut by_key: HashMap<String, (Uuid, i64)> = HashMap::new();
    for (stream, payload, metadata) in &stored {
        let metadata: serde_json::Value = serde_json::from_str(metadata).unwrap();
        let payload: serde_json::Value = serde_json::from_str(payload).unwrap();
        let Some(key) = metadata["idempotency_key"].as_str() else {
            continue;
        };
        let previous = by_key.insert(key.to_owned(), (*stream, payload["amount"].as_i64().unwrap()));
        assert!(previous.is_none(), "key {key} took effect twice");
    }
    for (key, account, amount) in &acknowledged {
        assert_eq!(
            by_key.get(key),
            Some(&(*account, *amount)),
            "acknowledged {key} is in the log"
        );
    }
    assert_eq!(
        by_key.len(),
        acknowledged.len(),
        "nothing in the log that no client was told about"
    );
    drop(cluster);
}
