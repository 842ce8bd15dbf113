//! A rebuild seen through the query API's caches: while clients deposit and read, `tally
//! projections rebuild` switches a read model to a new generation, and afterwards every query
//! API instance must answer the current row (not one cached from the old generation), and no
//! client may ever see an account go back in version.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::seq::IndexedRandom;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_tests::{Api, Stack, bin_dir, client, eventually};
use uuid::Uuid;

const ACCOUNTS: usize = 40;
const DEPOSITS_BEFORE: usize = 2_000;
const WRITERS: usize = 8;
/// Reading clients per query API instance.
const READERS_PER_INSTANCE: usize = 4;
/// Rebuilds in one test, each under its own writes and reads.
const RUNS: usize = 3;
/// How long after the replica holds the switched generation's rows every instance must answer
/// them: the bound (a stale row otherwise stays until the cache TTL, 60 s).
const CURRENT_WITHIN: Duration = Duration::from_secs(1);

/// `clients` clients each depositing 1 to a random account until `stop`, or until `total`
/// deposits were sent in all. Every answer must be a 201.
async fn deposit(api: &Api, accounts: &[Uuid], clients: usize, total: usize, stop: Arc<AtomicBool>) -> usize {
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (api, accounts, sent, stop) = (api.clone(), accounts.to_vec(), sent.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) && sent.fetch_add(1, Ordering::Relaxed) < total {
                    let account = *accounts.choose(&mut rand::rng()).unwrap();
                    let (status, body, _) = api
                        .post_keyed(&format!("/v1/accounts/{account}/deposits"), &json!({"amount": 1}))
                        .await;
                    assert_eq!(status, StatusCode::CREATED, "{body}");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a depositing client failed");
    }
    sent.load(Ordering::Relaxed).min(total)
}

/// One reading client of one instance: reads random accounts until `stop`, and fails the
/// moment an account comes back at a lower version than this client saw before. Returns how
/// many reads it made.
async fn read(base: String, accounts: Vec<Uuid>, stop: Arc<AtomicBool>) -> u64 {
    let client = client();
    let mut seen: HashMap<Uuid, i64> = HashMap::new();
    let mut reads = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let account = *accounts.choose(&mut rand::rng()).unwrap();
        let (version, body) = account_version(&client, &base, account).await;
        let before = seen.insert(account, version).unwrap_or(0);
        assert!(
            version >= before,
            "{base}: account {account} went back from version {before} to {version}: {body}"
        );
        reads += 1;
    }
    reads
}

async fn account_version(client: &reqwest::Client, base: &str, account: Uuid) -> (i64, Value) {
    let response = client
        .get(format!("{base}/v1/accounts/{account}"))
        .send()
        .await
        .expect("the query API answers");
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, StatusCode::OK, "{base}: {body}");
    (body["version"].as_i64().expect("a version"), body)
}

/// Each account's version in the log, and in the primary's `account_balances`.
async fn versions(pool: &sqlx::PgPool, accounts: &[Uuid]) -> (HashMap<Uuid, i64>, HashMap<Uuid, i64>) {
    let log = sqlx::query_as::<_, (Uuid, i64)>(
        "SELECT stream_id, max(version) FROM events WHERE stream_id = ANY($1) GROUP BY stream_id",
    )
    .bind(accounts)
    .fetch_all(pool)
    .await
    .unwrap();
    let model =
        sqlx::query_as::<_, (Uuid, i64)>("SELECT account_id, version FROM account_balances WHERE account_id = ANY($1)")
            .bind(accounts)
            .fetch_all(pool)
            .await
            .unwrap();
    (log.into_iter().collect(), model.into_iter().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_under_writes_and_reads_leaves_every_query_api_current_within_a_second_and_no_read_goes_back() {
    let mut stack = Stack::start().await;
    let second = stack.spawn_query_api(&[]).await;
    let instances = [stack.query.clone(), second];
    let api = Api::new(&stack.command);
    let accounts: Vec<Uuid> = futures::future::join_all((0..ACCOUNTS).map(|_| api.funded("EUR", 0))).await;
    deposit(&api, &accounts, 16, DEPOSITS_BEFORE, Arc::new(AtomicBool::new(false))).await;
    // Readers expect every account to exist: wait until the replica shows them all.
    eventually(
        Duration::from_secs(30),
        "account_balances to hold every account",
        || async {
            let (log, model) = versions(&stack.db.pool, &accounts).await;
            (log == model).then_some(())
        },
    )
    .await;
    stack.db.sync_replica().await;

    for run in 1..=RUNS {
        let (writing, reading) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let writers = {
            let (api, accounts, writing) = (api.clone(), accounts.clone(), writing.clone());
            tokio::spawn(async move { deposit(&api, &accounts, WRITERS, usize::MAX, writing).await })
        };
        let readers: Vec<_> = instances
            .iter()
            .flat_map(|base| std::iter::repeat_n(base, READERS_PER_INSTANCE))
            .map(|base| tokio::spawn(read(base.clone(), accounts.clone(), reading.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;

        let rebuilt = tokio::task::spawn_blocking({
            let env = stack.env.clone();
            move || {
                std::process::Command::new(bin_dir().join("tally"))
                    .args(["projections", "rebuild", "account_balances"])
                    .envs(env)
                    .output()
                    .expect("running tally")
            }
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&rebuilt.stdout);
        assert!(
            rebuilt.status.success() && stdout.contains(&format!("generation {} live", run + 1)),
            "run {run}: {stdout}\n{}",
            String::from_utf8_lossy(&rebuilt.stderr)
        );
        // The writes stop at the switch: the events the switch itself folded in are then the
        // last of their accounts, and no later write can mend a row cached before it. Reads
        // go on.
        writing.store(true, Ordering::Relaxed);
        let written = writers.await.expect("the writers");

        // The primary's read model catches up with the log, the replica with the primary.
        eventually(Duration::from_secs(30), "account_balances to equal the log", || async {
            let (log, model) = versions(&stack.db.pool, &accounts).await;
            (log == model).then_some(())
        })
        .await;
        stack.db.sync_replica().await;
        let (expected, _) = versions(&stack.db.pool, &accounts).await;

        // From here, every instance answers what the replica holds, within the bound.
        let since = Instant::now();
        let mut stale: Vec<String> = Vec::new();
        loop {
            stale.clear();
            let reader = client();
            for base in &instances {
                for account in &accounts {
                    let (version, _) = account_version(&reader, base, *account).await;
                    if version != expected[account] {
                        stale.push(format!(
                            "{base} {account}: version {version}, the log has {}",
                            expected[account]
                        ));
                    }
                }
            }
            if stale.is_empty() || since.elapsed() > CURRENT_WITHIN {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            stale.is_empty(),
            "run {run}: {} reads still stale {:?} after the replica caught up:\n{}\n{}",
            stale.len(),
            since.elapsed(),
            stale.join("\n"),
            stack.logs()
        );

        reading.store(true, Ordering::Relaxed);
        let mut reads = 0;
        for reader in readers {
            reads += reader.await.expect("a reader saw an account go back in version");
        }
        assert!(
            written > 100 && reads > 100,
            "run {run}: writes ({written}) and reads ({reads}) went on during the rebuild"
        );
    }
}
