//! High availability (ADR 0006): Postgres as three nodes under Patroni (synchronous
//! replication, leader lock in etcd) behind HAProxy, and NATS as a three-server cluster keeping
//! the stream at three replicas. Under 64 writers with idempotency keys, the leader's machine
//! dies, or an operator switches over, or a NATS server is killed and comes back; afterwards
//! every command that got a 201 is in the log once, no key has two effects, no answer was
//! other than 201 or a retryable 503, the read models equal a fold of the log, and the hash
//! chain verifies.

use std::time::{Duration, Instant};

use tally_devstack::{HaOptions, HaPostgres};
use tally_tests::load::{Acknowledged, Writers, assert_each_acknowledged_once};
use tally_tests::{Api, Services, Stack, TestDb, TestNats, command_api, fold, services};
use uuid::Uuid;

const WRITERS: usize = 64;
const ACCOUNTS: usize = 64;
/// A writer's patience with 503s: longer than a failover (the leader lock's TTL, 20 s, plus
/// the router's checks).
const PATIENCE: Duration = Duration::from_secs(120);
/// How long the read models may take to catch up with the log after the writes stop.
const CONVERGE: Duration = Duration::from_secs(120);

/// A Patroni cluster of this test's own (started off the async runtime: it takes seconds).
async fn ha_cluster(name: &str) -> HaPostgres {
    let root = std::env::temp_dir().join(format!("tally-{name}-ha-{}", Uuid::now_v7().simple()));
    tokio::task::spawn_blocking(move || HaPostgres::start(&root, HaOptions::default()))
        .await
        .unwrap()
        .expect("starting Patroni, etcd and HAProxy")
}

/// The cluster's router (read-write and read-only ports), and the shared NATS.
fn services_of(ha: &HaPostgres) -> Services {
    Services {
        primary_admin_url: ha.primary_url("postgres"),
        replica_admin_url: Some(ha.replica_url("postgres")),
        nats_url: services().nats_url.clone(),
        nats_credentials: services().nats_credentials.clone(),
    }
}

/// Every service on `db` and `nats`, a second command API, accounts to deposit into, and the
/// writers, running.
async fn under_load(db: TestDb, nats: TestNats) -> (Stack, Vec<Api>, Writers) {
    under_load_paced(db, nats, Duration::ZERO).await
}

/// [`under_load`], each writer pausing `pace` after each acknowledged deposit.
async fn under_load_paced(db: TestDb, nats: TestNats, pace: Duration) -> (Stack, Vec<Api>, Writers) {
    let mut stack = Stack::start_on_nats(db, nats).await;
    let (second, proc) = command_api(&stack.db, &[]).await;
    stack.procs.push(proc);
    let apis = vec![Api::new(&stack.command), second];
    let accounts: Vec<Uuid> = futures::future::join_all((0..ACCOUNTS).map(|_| apis[0].funded("EUR", 0))).await;
    let writers = Writers::spawn_paced(&apis, &accounts, WRITERS, PATIENCE, pace);
    writers
        .wait_for_more(200, Duration::from_secs(60), || stack.logs())
        .await;
    (stack, apis, writers)
}

/// After the writes: each acknowledged deposit once in the log, the read models equal to its
/// fold, and `tally audit verify` passes.
async fn assert_nothing_lost_or_doubled(stack: &Stack, acknowledged: &[Acknowledged]) {
    assert_each_acknowledged_once(&stack.db.url, acknowledged).await;
    let expected = fold::converged(&stack.db.pool, CONVERGE, || stack.logs()).await;
    assert!(
        fold::duplicate_lines(&expected.lines).is_empty(),
        "a statement line twice"
    );
    tally_tests::assert_audit_verifies(&stack.db.url);
}

/// How long new writes stopped: from `fault` to the first 201 for a deposit first tried after
/// it (a retry of an earlier key may be a replay of a commit from before the fault).
fn outage(acknowledged: &[Acknowledged], fault: Instant) -> Duration {
    acknowledged
        .iter()
        .filter(|a| a.first_sent > fault)
        .map(|a| a.acked)
        .min()
        .expect("a deposit acknowledged after the fault")
        - fault
}

/// The longest time without any 201 from `since` on: how long a planned switchover paused
/// writes (answers to keys first sent before it may land on either side of it).
fn longest_pause(acknowledged: &[Acknowledged], since: Instant) -> Duration {
    let mut times: Vec<Instant> = acknowledged.iter().map(|a| a.acked).filter(|t| *t >= since).collect();
    times.sort();
    std::iter::once(since)
        .chain(times)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leaders_machine_dies_under_64_writers_and_no_acknowledged_deposit_is_lost_or_doubled() {
    let mut ha = ha_cluster("failover").await;
    let db = TestDb::on(&services_of(&ha)).await;
    let (stack, _apis, writers) = under_load(db, TestNats::new()).await;

    let old = ha.leader().unwrap().expect("a leader");
    tokio::task::block_in_place(|| ha.kill_node(&old)).unwrap();
    let fault = Instant::now();
    // A standby takes over once the dead leader's lock expires; writes then flow again.
    writers.wait_for_more(500, PATIENCE, || stack.logs()).await;
    let new = ha.leader().unwrap().expect("a new leader");
    assert_ne!(new, old);
    let unavailable = writers.unavailable();
    let acknowledged = writers.stop(|| stack.logs()).await;
    eprintln!(
        "failover {old} -> {new}: writes stopped for {:?}; {} acknowledged, {unavailable} answers of 503",
        outage(&acknowledged, fault),
        acknowledged.len()
    );
    assert_nothing_lost_or_doubled(&stack, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_under_64_writers_loses_and_doubles_nothing() {
    let ha = ha_cluster("switchover").await;
    let db = TestDb::on(&services_of(&ha)).await;
    let (stack, _apis, writers) = under_load(db, TestNats::new()).await;

    let old = ha.leader().unwrap().expect("a leader");
    let fault = Instant::now();
    let new = tokio::task::block_in_place(|| ha.switchover()).expect("the switchover");
    assert_ne!(new, old);
    writers.wait_for_more(500, PATIENCE, || stack.logs()).await;
    let unavailable = writers.unavailable();
    let acknowledged = writers.stop(|| stack.logs()).await;
    eprintln!(
        "switchover {old} -> {new}: writes paused for {:?} at most; {} acknowledged, {unavailable} answers of 503",
        longest_pause(&acknowledged, fault),
        acknowledged.len()
    );
    assert_nothing_lost_or_doubled(&stack, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_server_killed_mid_stream_and_restarted_loses_and_doubles_nothing() {
    let (nats, mut cluster) = TestNats::private_cluster("failover");
    // Paced (at most 64 writers x 20 deposits/s): a restarted server is waited for until its
    // streams are current again (its `/healthz`), and a follower cannot catch up with a leader
    // that a closed loop at full speed keeps ahead of it on a machine it shares with the whole
    // suite (seen once the write path got faster: a consumer "not current" for over 60 s).
    let pace = Duration::from_millis(50);
    let (stack, _apis, writers) = under_load_paced(TestDb::new().await, nats, pace).await;

    // Every server in turn: one of them leads the stream, and one holds each client.
    for i in 0..3 {
        tokio::task::block_in_place(|| cluster.nodes()[i].kill());
        writers.wait_for_more(300, PATIENCE, || stack.logs()).await;
        // With one server of three down, the stream keeps its quorum: the relay publishes and
        // the projector applies, not merely the log grows.
        let before = statement_lines(&stack).await;
        tally_tests::eventually(
            PATIENCE,
            "the read models to follow the log with a NATS server down",
            || async { (statement_lines(&stack).await > before + 300).then_some(()) },
        )
        .await;
        tokio::task::block_in_place(|| cluster.nodes()[i].restart()).expect("the NATS server rejoins");
        writers.wait_for_more(300, PATIENCE, || stack.logs()).await;
    }
    let acknowledged = writers.stop(|| stack.logs()).await;
    assert_nothing_lost_or_doubled(&stack, &acknowledged).await;
    drop(stack);
    drop(cluster);
}

/// Lines in the statements read model: how far the projector has applied the log.
async fn statement_lines(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM account_statement")
        .fetch_one(&stack.db.pool)
        .await
        .expect("counting statement lines")
}

/// Deposits acknowledged per second over `window`.
async fn rate(writers: &Writers, window: Duration) -> f64 {
    let before = writers.acknowledged();
    tokio::time::sleep(window).await;
    (writers.acknowledged() - before) as f64 / window.as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The figures of RELIABILITY.md, on a crash-safe cluster (fsync on): write throughput with
/// synchronous replication against the same cluster without it, the failover time of five
/// leader-machine deaths, and the acknowledged deposits lost (none).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "minutes long; run it with: cargo xtask test -- --run-ignored only -E 'test(ha_figures)' --no-capture"]
async fn ha_figures() {
    const TRIALS: usize = 5;
    const WINDOW: Duration = Duration::from_secs(10);
    let root = std::env::temp_dir().join(format!("tally-figures-ha-{}", Uuid::now_v7().simple()));
    let mut ha = tokio::task::spawn_blocking(move || {
        HaPostgres::start(
            &root,
            HaOptions {
                nodes: 3,
                durable: true,
            },
        )
    })
    .await
    .unwrap()
    .expect("starting Patroni, etcd and HAProxy");
    let db = TestDb::on(&services_of(&ha)).await;
    let (api, proc) = command_api(&db, &[]).await;
    let accounts: Vec<Uuid> = futures::future::join_all((0..ACCOUNTS).map(|_| api.funded("EUR", 0))).await;
    let writers = Writers::spawn(&[api], &accounts, WRITERS, PATIENCE);
    writers
        .wait_for_more(200, Duration::from_secs(60), || proc.log_tail())
        .await;

    let (mut sync, mut unsync) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        tokio::task::block_in_place(|| ha.set_synchronous(false)).unwrap();
        unsync.push(rate(&writers, WINDOW).await);
        tokio::task::block_in_place(|| ha.set_synchronous(true)).unwrap();
        sync.push(rate(&writers, WINDOW).await);
    }
    let (sync, unsync) = (median(&mut sync), median(&mut unsync));

    let mut faults = Vec::new();
    for trial in 1..=TRIALS {
        let leader = ha.leader().unwrap().expect("a leader");
        tokio::task::block_in_place(|| ha.kill_node(&leader)).unwrap();
        // From the moment the leader's processes are gone: a deposit first sent earlier may
        // have committed on the old leader while it was being killed.
        faults.push(Instant::now());
        writers.wait_for_more(200, PATIENCE, || proc.log_tail()).await;
        eprintln!("trial {trial}: killed {leader}; {:?} leads", ha.leader().unwrap());
        tokio::task::block_in_place(|| {
            ha.restart_node(&leader)?;
            ha.wait_healthy(PATIENCE)
        })
        .expect("the dead leader rejoins as a standby");
    }
    let acknowledged = writers.stop(|| proc.log_tail()).await;
    assert_each_acknowledged_once(&db.url, &acknowledged).await;
    let mut outages: Vec<f64> = faults
        .iter()
        .map(|fault| outage(&acknowledged, *fault).as_secs_f64())
        .collect();
    let each: Vec<String> = outages.iter().map(|s| format!("{s:.1}")).collect();
    let worst = outages.iter().copied().fold(0.0, f64::max);
    println!(
        "HA figures ({WRITERS} writers, one command API, fsync on):\n\
         | figure | value |\n|---|--:|\n\
         | deposits/s, synchronous replication (median of 3 x {WINDOW:?}) | {sync:.0} |\n\
         | deposits/s, asynchronous (same cluster, same run) | {unsync:.0} |\n\
         | synchronous / asynchronous | {:.2} |\n\
         | failover: leader machine killed -> first new deposit acknowledged, median of {TRIALS} | {:.1} s |\n\
         | failover, worst of {TRIALS} | {worst:.1} s |\n\
         | failover, each trial | {} s |\n\
         | deposits acknowledged | {} |\n\
         | acknowledged deposits lost or doubled | 0 |",
        sync / unsync,
        median(&mut outages),
        each.join(", "),
        acknowledged.len(),
    );
}
