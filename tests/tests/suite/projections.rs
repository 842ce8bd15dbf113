//! Projections against real Postgres and NATS: partitioned workers with leases, exactly-once
//! effect through worker crashes and broker restarts, poison events, rebuilds under load. The
//! read models are compared with a fold of the log computed here (`tally_tests::fold`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally_event_store::nats_users;
use tally_event_store::partition::partition_of;
use tally_tests::{Api, Proc, TestDb, TestNats, bin_dir, command_api, eventually, fold, projector_env};
use uuid::Uuid;

pub(super) const PARTITIONS: u32 = 4;
/// Units: 2 projections × `PARTITIONS`.
pub(super) const UNITS: i64 = 8;
const CONVERGE: Duration = Duration::from_secs(90);

/// A command API, a relay and projector workers on one database and NATS stream.
pub(super) struct Rig {
    pub(super) db: TestDb,
    pub(super) nats: TestNats,
    pub(super) api: Api,
    pub(super) procs: Vec<Proc>,
    pub(super) workers: HashMap<String, Proc>,
    /// Each worker's `/health`, `/ready` and `/metrics` address.
    pub(super) listen: HashMap<String, String>,
}

impl Rig {
    pub(super) async fn start(nats: TestNats, workers: &[&str], extra: &[(&'static str, &str)]) -> Self {
        let db = TestDb::new().await;
        let (api, command) = command_api(&db, &[]).await;
        let mut rig = Self {
            db,
            nats,
            api,
            procs: vec![command],
            workers: HashMap::new(),
            listen: HashMap::new(),
        };
        rig.procs
            .push(Proc::spawn("tally-relay", &rig.env(nats_users::RELAY, &[])));
        for worker in workers {
            rig.start_worker(worker, extra);
        }
        rig
    }

    /// A service's environment on this rig, signed in to NATS as `nats_user`.
    pub(super) fn env(&self, nats_user: &str, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut env = self.nats.env(nats_user);
        env.push(("TALLY_DATABASE_URL", self.db.url.clone()));
        env.push(("TALLY_PARTITIONS", PARTITIONS.to_string()));
        env.extend(extra.iter().cloned());
        env
    }

    pub(super) fn start_worker(&mut self, id: &str, extra: &[(&'static str, &str)]) {
        let mut env = projector_env(id);
        let listen = env
            .iter()
            .find(|(k, _)| *k == "TALLY_PROJECTOR_LISTEN")
            .unwrap()
            .1
            .clone();
        self.listen.insert(id.to_owned(), listen);
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let proc = Proc::spawn("tally-projector", &self.env(nats_users::PROJECTOR, &env));
        self.workers.insert(id.to_owned(), proc);
    }

    pub(super) fn logs(&self) -> String {
        self.procs
            .iter()
            .chain(self.workers.values())
            .map(|p| format!("--- {} ---\n{}", p.name, p.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Units each worker holds a current lease on.
    pub(super) async fn leases(&self) -> HashMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT worker, count(*) FROM projection_partitions WHERE lease_until > now() GROUP BY worker",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
    }

    /// Waits until every read model equals the fold of the whole log, and returns the fold.
    pub(super) async fn converged(&self) -> fold::Expected {
        fold::converged(&self.db.pool, CONVERGE, || self.logs()).await
    }

    /// `tally <args>` against this rig's database; returns stdout, panics on failure.
    pub(super) fn tally(&self, args: &[&str]) -> String {
        let output = std::process::Command::new(bin_dir().join("tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &self.db.url)
            .env("TALLY_PARTITIONS", PARTITIONS.to_string())
            .output()
            .expect("running tally");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "tally {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    pub(super) fn status(&self) -> Vec<Value> {
        self.tally(&["projections", "status", "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("status lines are JSON"))
            .collect()
    }
}

/// Opens `n` accounts, each funded with 10,000.
pub(super) async fn open_accounts(api: &Api, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let opened = futures::future::join_all(chunk.iter().map(|_| api.funded("EUR", 10_000))).await;
        ids.extend(opened);
    }
    ids
}

/// `clients` clients sending random money-moving commands (deposits, withdrawals, immediate
/// transfers, pending transfers then posted or voided) until `commands` were answered or
/// `stop` is set. Every answer must be 201 or a 422 refusal. Returns the commands sent.
pub(super) async fn drive(
    api: &Api,
    accounts: &[Uuid],
    clients: usize,
    commands: usize,
    stop: Option<Arc<AtomicBool>>,
) -> usize {
    let sent = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (api, accounts, sent, stop) = (api.clone(), accounts.to_vec(), sent.clone(), stop.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::from_os_rng();
                while sent.fetch_add(1, Ordering::Relaxed) < commands
                    && !stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
                {
                    let a = *accounts.choose(&mut rng).unwrap();
                    let b = *accounts.choose(&mut rng).unwrap();
                    let amount = rng.random_range(1..500);
                    let roll = rng.random_range(0..100);
                    let (status, body, _) = if roll < 40 {
                        api.post_keyed(&format!("/v1/accounts/{a}/deposits"), &json!({"amount": amount}))
                            .await
                    } else if roll < 55 {
                        api.post_keyed(&format!("/v1/accounts/{a}/withdrawals"), &json!({"amount": amount}))
                            .await
                    } else if roll < 85 || a == b {
                        if a == b {
                            continue;
                        }
                        api.transfer(json!({"from": a, "to": b, "amount": amount, "currency": "EUR",
                                            "mode": "immediate", "reference": "test"}))
                            .await
                    } else {
                        let (status, body, _) = api
                            .transfer(json!({"from": a, "to": b, "amount": amount, "currency": "EUR",
                                             "mode": "pending", "reference": "hold"}))
                            .await;
                        if status == StatusCode::CREATED {
                            let id = body["transfer_id"].as_str().unwrap().to_owned();
                            if rng.random_bool(0.7) {
                                api.post_keyed(&format!("/v1/transfers/{id}/post"), &json!({"amount": amount / 2 + 1}))
                                    .await
                            } else {
                                api.post_keyed(&format!("/v1/transfers/{id}/void"), &json!({})).await
                            }
                        } else {
                            (status, body, false)
                        }
                    };
                    assert!(
                        status == StatusCode::CREATED || status == StatusCode::UNPROCESSABLE_ENTITY,
                        "{status}: {body}"
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a client panicked");
    }
    sent.load(Ordering::Relaxed).min(commands)
}

pub(super) fn assert_whole(expected: &fold::Expected) {
    assert!(fold::duplicate_lines(&expected.lines).is_empty());
    assert!(!expected.transfers.is_empty() && !expected.lines.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_share_the_partitions_and_a_killed_one_loses_nothing() {
    let mut rig = Rig::start(TestNats::new(), &["w1", "w2"], &[]).await;
    eventually(Duration::from_secs(30), "both workers to hold partitions", || async {
        let leases = rig.leases().await;
        (leases.len() == 2 && leases.values().sum::<i64>() == UNITS).then_some(())
    })
    .await;

    let accounts = open_accounts(&rig.api, 500).await;
    drive(&rig.api, &accounts, 32, 5_000, None).await;
    // Mid-way, with events still in flight: no clean-up, no lease given back.
    rig.workers.get_mut("w1").unwrap().kill9();
    drive(&rig.api, &accounts, 32, 5_000, None).await;

    let expected = rig.converged().await;
    assert!(
        expected.events >= 20_000,
        "the workload wrote {} events",
        expected.events
    );
    assert_whole(&expected);
    let leases = rig.leases().await;
    assert_eq!(leases.get("w2"), Some(&UNITS), "w2 took over every unit: {leases:?}");
    let actual = fold::actual(&rig.db.pool).await;
    assert!(
        fold::duplicate_lines(&actual.lines).is_empty(),
        "no statement line twice"
    );
}

/// Consumers made by an earlier version took a whole partition (`<prefix>.<p>.>`) and skipped
/// the other stream types; this version filters each to its projection's stream type. A worker
/// finding the old filter narrows it in place, and nothing published before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_left_on_the_whole_partition_is_narrowed_to_its_stream_type_and_loses_nothing() {
    use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
    use tally_event_store::partition::Topology;

    let mut rig = Rig::start(TestNats::new(), &[], &[]).await;
    let topology = Topology {
        stream_name: rig.nats.stream.clone(),
        subject_prefix: rig.nats.subject_prefix.clone(),
        partitions: PARTITIONS,
        ..Topology::default()
    };
    let js = async_nats::jetstream::new(rig.nats.connect().await);
    let stream = topology.ensure_stream(&js).await.unwrap();
    let projections = ["accounts", "transfers"];
    for projection in projections {
        for partition in 0..PARTITIONS {
            let name = tally_projectors::consumer::consumer_name(projection, partition);
            let _: PullConsumer = stream
                .create_consumer(pull::Config {
                    durable_name: Some(name),
                    filter_subject: topology.partition_filter(partition),
                    ack_policy: AckPolicy::Explicit,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    // Events of both stream types wait in the old consumers before any worker runs.
    let accounts = open_accounts(&rig.api, 40).await;
    drive(&rig.api, &accounts, 8, 400, None).await;

    rig.start_worker("w1", &[]);
    let expected = rig.converged().await;
    assert_whole(&expected);
    for projection in projections {
        let stream_type = if projection == "accounts" {
            "account"
        } else {
            "transfer"
        };
        for partition in 0..PARTITIONS {
            let name = tally_projectors::consumer::consumer_name(projection, partition);
            let info = stream.consumer_info(&name).await.unwrap();
            assert_eq!(
                info.config.filter_subject,
                topology.partition_stream_type_filter(partition, stream_type),
                "{name} narrowed"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_mid_stream_loses_nothing() {
    let (nats, mut server) = TestNats::private_server("projector");
    let rig = Rig::start(nats, &["w1"], &[]).await;
    let accounts = open_accounts(&rig.api, 200).await;
    drive(&rig.api, &accounts, 16, 1_500, None).await;

    tokio::task::block_in_place(|| server.stop());
    // Commands still land in the log while the broker is away.
    drive(&rig.api, &accounts, 16, 500, None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| server.restart()).expect("restarting NATS on its port");
    drive(&rig.api, &accounts, 16, 1_500, None).await;

    let expected = rig.converged().await;
    assert_whole(&expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_under_write_load_switches_atomically_and_equals_the_log() {
    let rig = Rig::start(TestNats::new(), &["w1"], &[]).await;
    let accounts = open_accounts(&rig.api, 300).await;
    drive(&rig.api, &accounts, 32, 3_000, None).await;
    rig.converged().await;

    // Readers: no account may go missing or move back to a lower version, ever.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, ids, stop) = (rig.db.pool.clone(), accounts.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen: HashMap<Uuid, i64> = HashMap::new();
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let rows: Vec<(Uuid, i64)> =
                    sqlx::query_as("SELECT account_id, version FROM account_balances WHERE account_id = ANY($1)")
                        .bind(&ids)
                        .fetch_all(&pool)
                        .await
                        .expect("reading account_balances during the rebuild");
                assert_eq!(rows.len(), ids.len(), "an account was missing from a read");
                for (id, version) in rows {
                    let before = seen.insert(id, version).unwrap_or(0);
                    assert!(version >= before, "account {id} regressed from {before} to {version}");
                }
                reads += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            reads
        })
    };
    let writers = {
        let (api, accounts, stop) = (rig.api.clone(), accounts.clone(), stop.clone());
        tokio::spawn(async move { drive(&api, &accounts, 64, usize::MAX, Some(stop)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let output = tokio::task::block_in_place(|| rig.tally(&["projections", "rebuild", "account_statement"]));
    assert!(output.contains("accounts: generation 2 live (replaced 1)"), "{output}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writers.await.expect("writers");
    let reads = reader
        .await
        .expect("a read during the rebuild saw a missing or regressed account");
    assert!(
        written > 100 && reads > 10,
        "writes ({written}) and reads ({reads}) went on during the rebuild"
    );

    let expected = rig.converged().await;
    assert_whole(&expected);
    let old: Option<String> = sqlx::query_scalar("SELECT to_regclass('account_balances_g1')::text")
        .fetch_one(&rig.db.pool)
        .await
        .unwrap();
    assert_eq!(old, None, "the old generation was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_stops_its_partition_is_dead_lettered_and_resumes_on_retry() {
    let rig = Rig::start(
        TestNats::new(),
        &["w1"],
        &[
            ("TALLY_PROJECTOR_POISON_ATTEMPTS", "2"),
            ("TALLY_PROJECTOR_BACKOFF_MS", "20"),
        ],
    )
    .await;
    let accounts = open_accounts(&rig.api, 24).await;
    rig.converged().await;
    let poisoned = accounts[0];
    let partition = partition_of(poisoned, PARTITIONS);
    let neighbour = *accounts[1..]
        .iter()
        .find(|a| partition_of(**a, PARTITIONS) == partition)
        .expect("another account in the same partition");
    let elsewhere = *accounts
        .iter()
        .find(|a| partition_of(**a, PARTITIONS) != partition)
        .expect("an account in another partition");
    // A read model that cannot take the event: what a bug in projection code looks like.
    sqlx::query("ALTER TABLE account_statement_g1 ADD CONSTRAINT no_poison CHECK (reference <> 'poison')")
        .execute(&rig.db.pool)
        .await
        .unwrap();

    for (account, reference) in [(poisoned, "poison"), (neighbour, "after"), (elsewhere, "elsewhere")] {
        let (status, body, _) = rig
            .api
            .post_keyed(
                &format!("/v1/accounts/{account}/deposits"),
                &json!({"amount": 5, "reference": reference}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let failed = eventually(Duration::from_secs(30), "the partition to fail", || async {
        rig.status()
            .into_iter()
            .find(|s| s["projection"] == "accounts" && s["partition"] == partition && s["state"] == "failed")
    })
    .await;
    assert_eq!(failed["dead_letters"], 1, "{failed}");
    assert!(failed["last_error"].as_str().unwrap().contains("no_poison"), "{failed}");
    let version = |id: Uuid| {
        let pool = rig.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT version FROM account_balances WHERE account_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    eventually(Duration::from_secs(30), "the other partition to go on", || async {
        (version(elsewhere).await == 3).then_some(())
    })
    .await;
    assert_eq!(version(poisoned).await, 2, "the poison event was not applied");
    assert_eq!(
        version(neighbour).await,
        2,
        "the stopped partition applied nothing after it"
    );

    // The dead letter: the event itself, with the error.
    let client = rig.nats.connect().await;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(&rig.nats.stream).await.unwrap();
    let subject = format!("{}.dead-letter.accounts.{partition}", rig.nats.subject_prefix);
    let letter = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .expect("a dead letter");
    let headers = letter.headers;
    assert!(
        headers.get("Tally-Error").unwrap().as_str().contains("no_poison"),
        "{headers:?}"
    );
    let envelope: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(envelope["stream_id"], poisoned.to_string());

    // Metrics: the dead letter and the partitions' lag.
    let metrics = reqwest::get(format!("http://{}/metrics", rig.listen["w1"]))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tally_projection_dead_letters_total",
        "tally_projection_lag_events",
        "tally_projection_batch_size",
        "tally_projection_apply_seconds",
        "tally_projection_duplicates_dropped_total",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
    let ready = reqwest::get(format!("http://{}/ready", rig.listen["w1"]))
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    // The fix, then `retry`: the partition applies the poison event and what came after it.
    sqlx::query("ALTER TABLE account_statement_g1 DROP CONSTRAINT no_poison")
        .execute(&rig.db.pool)
        .await
        .unwrap();
    let output = rig.tally(&["projections", "retry", "accounts"]);
    assert!(output.contains("1 failed partition(s) will retry"), "{output}");
    rig.converged().await;
    assert!(rig.status().iter().all(|s| s["state"] == "running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generation_built_by_an_older_shape_is_left_alone_until_rebuilt_with_the_new_column() {
    let rig = Rig::start(TestNats::new(), &["w1"], &[]).await;
    let accounts = open_accounts(&rig.api, 20).await;
    rig.converged().await;
    // What older projection code left behind: no `opened_at` column, built by shape 0.
    let as_projector = sqlx::PgPool::connect(&rig.db.url_as(tally_event_store::roles::PROJECTOR))
        .await
        .unwrap();
    for sql in [
        "DROP VIEW account_balances",
        "ALTER TABLE account_balances_g1 DROP COLUMN opened_at",
        "CREATE VIEW account_balances AS SELECT account_id, owner, currency, balance, held, available, status, \
         overdraft_limit, holds, version, last_position, updated_at FROM account_balances_g1",
        "UPDATE projections SET shape = 0 WHERE name = 'accounts'",
    ] {
        // As the read models' owner, which older projectors ran as too.
        sqlx::query(sql).execute(&as_projector).await.unwrap();
    }
    let (status, _, _) = rig
        .api
        .post_keyed(&format!("/v1/accounts/{}/deposits", accounts[0]), &json!({"amount": 7}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    eventually(
        Duration::from_secs(30),
        "the accounts projection to ask for a rebuild",
        || async {
            let status = rig.status();
            status
                .iter()
                .any(|s| s["projection"] == "accounts" && s["state"] == "needs-rebuild")
                .then_some(())
        },
    )
    .await;

    let output = tokio::task::block_in_place(|| rig.tally(&["projections", "rebuild", "accounts"]));
    assert!(output.contains("generation 2 live"), "{output}");
    let expected = rig.converged().await;
    let opened: i64 = sqlx::query_scalar("SELECT count(*) FROM account_balances WHERE opened_at IS NOT NULL")
        .fetch_one(&rig.db.pool)
        .await
        .unwrap();
    assert_eq!(
        opened as usize,
        expected.balances.len(),
        "the new column is filled from the log"
    );
    assert!(rig.status().iter().all(|s| s["state"] == "running"));
}

/// `tally migrate` and every projector start make sure of the read models' views. A view that
/// already shows the code's definition is left alone: a reader holding it (and its neighbours)
/// does not hold up a start, and a start takes no lock that deadlocks with a reader joining two
/// views. A view another code left behind is still replaced with the code's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_under_readers_leaves_the_live_views_alone_and_replaces_one_the_code_changed() {
    let db = TestDb::new().await;
    let url = db.url.clone();
    let migrate = move || {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin_dir().join("tally"))
                .arg("migrate")
                .env("TALLY_DATABASE_URL", url)
                .output()
                .unwrap()
        })
    };
    let mark = |view: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>("SELECT obj_description(to_regclass($1), 'pg_class')")
                .bind(view)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let marked = mark("ledger_totals").await.expect("a view made by the code is marked");

    // A reader inside a transaction holds every view of the accounts projection.
    let mut reader = db.pool.begin().await.unwrap();
    for view in ["account_balances", "account_statement", "ledger_totals"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT 1 FROM {view} LIMIT 0")))
            .execute(&mut *reader)
            .await
            .unwrap();
    }
    let output = tokio::time::timeout(Duration::from_secs(60), migrate())
        .await
        .expect("migrate waited for a reader: it locked a view it did not change")
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    reader.commit().await.unwrap();
    assert_eq!(mark("ledger_totals").await.as_deref(), Some(marked.as_str()));

    // A view older code made (no mark, a column fewer) is replaced by the code's and marked.
    let as_projector = sqlx::PgPool::connect(&db.url_as(tally_event_store::roles::PROJECTOR))
        .await
        .unwrap();
    sqlx::raw_sql(
        "DROP VIEW ledger_totals; \
         CREATE VIEW ledger_totals AS SELECT currency, sum(accounts)::bigint AS accounts \
         FROM ledger_totals_g1 GROUP BY currency",
    )
    .execute(&as_projector)
    .await
    .unwrap();
    assert_eq!(mark("ledger_totals").await, None);
    let output = migrate().await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(mark("ledger_totals").await.as_deref(), Some(marked.as_str()));
    let columns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns \
         WHERE table_name = 'ledger_totals' AND column_name IN ('balanced', 'in_transit', 'transfers_in')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(columns, 3, "the view shows the code's columns again");
}
