//! A Postgres crash under write load, on a private primary: a backend killed with SIGKILL makes
//! the postmaster terminate every connection ("terminating connection because of crash of
//! another server process") and run crash recovery ("the database system is in recovery
//! mode"). Commands in flight must get a retryable 503, never a 500; writes continue once it is
//! back; and nothing acknowledged is lost or doubled. The server is crash-safe (fsync and
//! synchronous commit on), as in production: without it Postgres itself drops the last
//! commits it acknowledged.

use std::time::Duration;

use sqlx::PgPool;
use tally_event_store::{nats_users, roles};
use tally_tests::link::{Link, postgres_address, through};
use tally_tests::load::{Writers, assert_each_acknowledged_once};
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
    let writers = Writers::spawn(&[api], &accounts, WRITERS, Duration::from_secs(60));

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
    let unavailable = writers.unavailable();
    let acknowledged = writers.stop(|| proc.log_tail()).await;
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
        "{} acknowledged, {unavailable} answers of 503 during the crash",
        acknowledged.len(),
    );
    assert_each_acknowledged_once(&db.url, &acknowledged).await;
    drop(cluster);
}

/// A projector worker that starts while its database is away (restarting, failing over) waits
/// for it, logging why, instead of exiting; once the database is back it runs and is ready.
#[tokio::test]
async fn a_projector_started_while_its_database_is_away_waits_for_it_and_then_runs() {
    let db = TestDb::new().await;
    let nats = tally_tests::TestNats::new();
    let mut link = Link::start(postgres_address(&db.url)).await;
    link.cut();
    let env = tally_tests::projector_env("w-away");
    let listen = env
        .iter()
        .find(|(k, _)| *k == "TALLY_PROJECTOR_LISTEN")
        .map(|(_, v)| format!("http://{v}"))
        .unwrap();
    let mut projector = tally_tests::Proc::spawn(
        "tally-projector",
        &env.into_iter()
            .chain(nats.topology_env())
            .chain(nats.credentials.env(nats_users::PROJECTOR))
            .chain([
                ("TALLY_DATABASE_URL", through(&db.url_as(roles::PROJECTOR), &link)),
                ("TALLY_PARTITIONS", "4".to_owned()),
            ])
            .collect::<Vec<_>>(),
    );
    tally_tests::eventually(Duration::from_secs(30), "the projector to say it waits", || async {
        let log = std::fs::read_to_string(&projector.log).unwrap_or_default();
        log.contains("the projector waits for it").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        projector.wait_exit(Duration::ZERO).await.is_none(),
        "the projector outlives a database that is away at start: {}",
        projector.log_tail()
    );

    link.restore().await;
    tally_tests::wait_ready(&listen, &projector).await;
}
