//! `cargo xtask bench`: the write-path benchmark of BENCHMARKS.md in one command.
//!
//! Builds the release binaries once, starts a durable Postgres (fsync on) and NATS under
//! `target/bench/run/`, and for every selected scenario measures, back to back, its *limit*
//! (the raw Postgres or JetStream work, no application), the *baseline* where the scenario
//! has one (the same HTTP load against `tally-baseline`: Tally's domain on stock cqrs-es +
//! postgres-es) and *Tally* (the real code or services), at the same concurrency and for the
//! same time. The limit is measured just before the others and just after them and the two
//! are averaged, so a machine whose speed drifts during the run favours no side; a large
//! difference between them is reported. Prints the table and writes `target/bench/report.json`
//! and `target/bench/report.png`. Everything started here is stopped when the run ends, fails
//! or is interrupted; service logs stay in `target/bench/logs/`.
//!
//! Measuring happens in release binaries (`tally-bench`, `tally load`); this debug-built task
//! only starts processes, waits for them and collects their JSON.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::de::DeserializeOwned;
use sqlx::{Connection, PgPool};
use tally_bench::preload::Preloaded;
use tally_bench::report::{Report, ScenarioResult, describe_machine, timestamp_now};
use tally_bench::{Bracket, Measurement, Window};
use tally_devstack::{Nats, PgOptions, Postgres};
use tally_event_store::nats_users::{self, Credentials};
use tally_event_store::relay::RelayConfig;

use crate::stack::{Inherit, Service, create_database, free_ops_listen};
use crate::{cargo, target_dir};

/// Every scenario, in the order they run. The names are contracts (report.json, BENCHMARKS.md).
const SCENARIOS: [&str; 22] = [
    "append-1",
    "append-16",
    "append-64",
    "deposits-1-solo",
    "deposits-1",
    "deposits-4-solo",
    "deposits-4",
    "deposits-16-solo",
    "deposits-16",
    "deposits-64-solo",
    "deposits-64",
    "hot-account",
    "transfers-64",
    "entries-3-legs",
    "batch-transfers-100",
    "batch-transfers-1000",
    "relay",
    "rebuild",
    "projection-lag",
    "reads-cached",
    "reads-uncached",
    "statement-pages",
];
/// Concurrent writers of the `append-N` scenarios.
const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// Connections of the `deposits-N` scenarios: also 4, a service with a handful of connections.
const DEPOSIT_CONCURRENCY: [usize; 4] = [1, 4, 16, 64];
/// Connections all depositing into the one account of `hot-account`.
const HOT_ACCOUNT_CONNECTIONS: usize = 64;
/// Connections of the `transfers-64` scenario.
const TRANSFER_CONNECTIONS: usize = 64;
/// Connections of the `batch-transfers-*` scenarios: a service sending batches needs few.
const BATCH_CONNECTIONS: usize = 8;
/// Transfers per batch of the `batch-transfers-*` scenarios.
const BATCH_SIZES: [usize; 2] = [100, 1_000];
/// Database of the append, deposit and hot-account scenarios.
const DATABASE: &str = "tally_bench";
/// Database of the baseline: postgres-es names its log table `events`, like Tally, so the two
/// cannot share one. The baseline creates its tables when it starts.
const BASELINE_DATABASE: &str = "tally_bench_baseline";
/// Database of the relay scenario: its backlog must be the whole log.
const RELAY_DATABASE: &str = "tally_bench_relay";
/// Database of the projection-lag scenario: the relay publishes only its own events.
const LAG_DATABASE: &str = "tally_bench_lag";
/// The projection-lag scenario's NATS subjects (its events, its projector's announcements).
/// `<name>.events`: inside what the bench server's NATS users may use (`nats_users::shared_topology`).
const LAG_SUBJECT_PREFIX: &str = "lag.events";
/// How long the relay and projector may take to catch up with the lag scenario's limit run.
const LAG_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(180);
/// Database of the read scenarios: accounts with 99 deposits each, their read models and
/// the limit's copies of them.
const READS_DATABASE: &str = "tally_bench_reads";
/// Connections of the read scenarios (the query API's pool holds 32 database connections).
const READ_CONNECTIONS: usize = 32;
/// The query API's setting that turns its cache off (`reads-uncached`).
const QUERY_CACHE_ENV: &str = "TALLY_QUERY_CACHE_MAX_ENTRIES";
/// Database of the rebuild scenario: a log of account events only.
const REBUILD_DATABASE: &str = "tally_bench_rebuild";
/// The command API's switch for group commit; `1` turns it off (the `-solo` runs).
const GROUP_COMMIT_ENV: &str = "TALLY_GROUP_COMMIT_MAX";
/// The HS256 secret of the benchmark's command APIs; `tally load` sends a teller token signed
/// with it.
const BENCH_JWT_SECRET: &str = "tally-bench-hs256-secret-0123456789abcdef";
/// A limit whose measurements before and after Tally differ by more than this share is
/// reported as drifting: the machine's speed changed during the scenario.
const LIMIT_DRIFT_WARN: f64 = 0.25;
/// Settings of every benchmarked Tally API: the per-client rate limit off in effect. The bench's
/// one token stands for many clients, and the default limit (10,000 requests/s per client)
/// would answer a fast scenario with 429s (hot-account did, at 11,000 commands/s).
const UNTHROTTLED: [(&str, &str); 2] = [
    ("TALLY_RATE_LIMIT_PER_S", "1000000"),
    ("TALLY_RATE_LIMIT_BURST", "1000000"),
];
/// Under `target/bench/`: held by the running benchmark (see `Dirs::_lock`).
const RUN_LOCK_FILE: &str = "run.lock";
/// How long the relay may take to drain its backlog before the run fails.
const RELAY_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Run every scenario briefly: a smoke test, not a measurement to quote.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios: a name, or a prefix ending at a `-` (`deposits`,
    /// `deposits-16`, `append`).
    #[arg(long, num_args = 1.., value_name = "SCENARIO")]
    only: Vec<String>,
}

/// How long and how much: the same for a scenario's limit and its Tally measurement.
#[derive(Debug, Clone, Copy)]
struct Plan {
    window: Window,
    /// Events in the relay's backlog (and messages of its JetStream limit).
    relay_events: u64,
    /// Events in the log the rebuild scenario reads and rebuilds.
    rebuild_events: u64,
    /// Accounts the deposits and transfers spread over, opened once per run on each server.
    accounts: usize,
    /// Account events behind the read scenarios (100 per account).
    read_events: u64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                // 43 measurements of 1.2 s: the run stays well under 2 minutes.
                window: Window {
                    warmup: Duration::from_millis(200),
                    measure: Duration::from_millis(1_000),
                },
                relay_events: 20_000,
                rebuild_events: 50_000,
                accounts: 1_000,
                read_events: 10_000,
            }
        } else {
            Self {
                window: Window {
                    // 43 measurements of 17 s: the full run stays under 15 minutes.
                    warmup: Duration::from_secs(2),
                    measure: Duration::from_secs(15),
                },
                relay_events: 200_000,
                rebuild_events: 1_000_000,
                accounts: 10_000,
                read_events: 200_000,
            }
        }
    }
}

/// The scenarios named by `only` (all when empty); an argument that names none is an error.
fn select(only: &[String]) -> anyhow::Result<Vec<&'static str>> {
    if only.is_empty() {
        return Ok(SCENARIOS.to_vec());
    }
    let matches = |name: &str, arg: &str| name == arg || name.starts_with(&format!("{arg}-"));
    if let Some(unknown) = only.iter().find(|arg| !SCENARIOS.iter().any(|name| matches(name, arg))) {
        bail!(
            "--only {unknown}: no such scenario; scenarios: {}",
            SCENARIOS.join(", ")
        );
    }
    Ok(SCENARIOS
        .into_iter()
        .filter(|name| only.iter().any(|arg| matches(name, arg)))
        .collect())
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let selected = select(&args.only)?;
    let plan = Plan::new(args.quick);
    cargo(&[
        "build",
        "--release",
        "-p",
        "tally-command-api",
        "-p",
        "tally-cli",
        "-p",
        "tally-bench",
        "-p",
        "tally-baseline",
        "-p",
        "tally-projectors",
        "-p",
        "tally-query-api",
    ])?;

    let dirs = Dirs::prepare()?;
    let started_at = timestamp_now();
    let began = Instant::now();
    println!(
        "starting Postgres (durable: fsync on) and NATS JetStream under {}",
        dirs.run.display()
    );
    let pg = Postgres::start(
        &dirs.run.join("pg"),
        PgOptions {
            replica: false,
            durable: true,
        },
    )?;
    // With the users and permissions of a deployment: their checks are part of what is measured.
    let (nats, nats_credentials) = crate::stack::start_nats(&dirs.run.join("nats"), &nats_users::shared_topology())?;

    let runtime = tokio::runtime::Runtime::new()?;
    let outcome = runtime.block_on(async {
        let mut bench = Bench::new(&pg, (&nats, nats_credentials), plan, &dirs, started_at).await?;
        let result = tokio::select! {
            result = bench.run(&selected) => result,
            () = tally_service::shutdown::signal() => Err(anyhow!("interrupted")),
        };
        result.map(|()| bench.report)
    });
    // Dropping the run above killed the services it had started; now the servers.
    drop(runtime);
    drop(nats);
    pg.stop();
    let _ = std::fs::remove_dir_all(&dirs.run);

    let report = outcome?;
    println!("\n{}", report.markdown_table());
    println!(
        "machine: {}\nreport:  {}\n         {}\n{} scenarios in {:.0} s (build excluded)",
        report.machine,
        dirs.report().display(),
        dirs.chart().display(),
        report.scenarios.len(),
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where a run keeps its things, all under `target/bench/`.
struct Dirs {
    /// Held (an exclusive `flock`) for the whole run: a second run with the same target
    /// directory would otherwise delete this one's `run/` folder, servers' data and all, as a
    /// stale leftover (Postgres then fails in whatever it was doing, e.g. initdb).
    _lock: std::fs::File,
    /// `report.json` and `report.png`.
    out: PathBuf,
    /// The servers' data and the accounts file; deleted when the run ends.
    run: PathBuf,
    /// Service logs, kept for a post-mortem until the next run.
    logs: PathBuf,
}

impl Dirs {
    /// Clears what an earlier run left (servers' data, logs, report) and creates the log folder.
    fn prepare() -> anyhow::Result<Self> {
        let out = target_dir().join("bench");
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let dirs = Self {
            _lock: lock_run(&out.join(RUN_LOCK_FILE))?,
            run: out.join("run"),
            logs: out.join("logs"),
            out,
        };
        for stale in [&dirs.run, &dirs.logs] {
            // A run killed hard leaves these; its servers died with it (parent-death signal).
            if stale.exists() {
                std::fs::remove_dir_all(stale).with_context(|| format!("removing stale {}", stale.display()))?;
            }
        }
        // An old report must not pass for this run's if this one fails early.
        let _ = std::fs::remove_file(dirs.report());
        let _ = std::fs::remove_file(dirs.chart());
        std::fs::create_dir_all(&dirs.logs)?;
        Ok(dirs)
    }

    fn report(&self) -> PathBuf {
        self.out.join("report.json")
    }

    fn chart(&self) -> PathBuf {
        self.out.join("report.png")
    }
}

/// Takes the exclusive lock of `path` (created if missing), waiting for another run that holds
/// it; writes this process's id into it, so the next waiting run can say whom it waits for.
fn lock_run(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Seek, Write};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            println!(
                "another `cargo xtask bench` (pid {}) is running with this target directory ({}); \
                 waiting for it to finish (or set CARGO_TARGET_DIR to another folder)",
                holder.trim(),
                path.display()
            );
            file.lock().with_context(|| format!("locking {}", path.display()))?;
        }
        Err(std::fs::TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// One benchmark run: where things are, and the report so far.
struct Bench {
    plan: Plan,
    bin_dir: PathBuf,
    log_dir: PathBuf,
    report_path: PathBuf,
    chart_path: PathBuf,
    /// Where the pre-opened accounts of each server are listed, shared by all its runs
    /// (`tally load --accounts-file`).
    run_dir: PathBuf,
    database_url: String,
    baseline_database_url: String,
    relay_database_url: String,
    rebuild_database_url: String,
    lag_database_url: String,
    reads_database_url: String,
    nats_url: String,
    nats_credentials: Credentials,
    /// Superuser pool on the bench database: `CHECKPOINT` before each measurement.
    admin: PgPool,
    report: Report,
    /// Numbers the service logs, so a restarted service does not overwrite the last log.
    services_started: usize,
}

impl Bench {
    async fn new(
        pg: &Postgres,
        (nats, nats_credentials): (&Nats, Credentials),
        plan: Plan,
        dirs: &Dirs,
        started_at: String,
    ) -> anyhow::Result<Self> {
        for database in [DATABASE, RELAY_DATABASE, REBUILD_DATABASE, LAG_DATABASE, READS_DATABASE] {
            create_database(&pg.primary_url("postgres"), database).await?;
            let pool = PgPool::connect(&pg.primary_url(database)).await?;
            tally_event_store::migrate(&pool).await?;
            pool.close().await;
        }
        create_database(&pg.primary_url("postgres"), BASELINE_DATABASE).await?;
        let admin = PgPool::connect(&pg.primary_url(DATABASE)).await?;
        let machine = describe_machine(&postgres_version(&admin).await?, &nats_version(nats).await?);
        Ok(Self {
            plan,
            bin_dir: target_dir().join("release"),
            log_dir: dirs.logs.clone(),
            report_path: dirs.report(),
            chart_path: dirs.chart(),
            run_dir: dirs.run.clone(),
            database_url: pg.primary_url(DATABASE),
            baseline_database_url: pg.primary_url(BASELINE_DATABASE),
            relay_database_url: pg.primary_url(RELAY_DATABASE),
            rebuild_database_url: pg.primary_url(REBUILD_DATABASE),
            lag_database_url: pg.primary_url(LAG_DATABASE),
            reads_database_url: pg.primary_url(READS_DATABASE),
            nats_url: nats.url(),
            nats_credentials,
            admin,
            report: Report::new(machine, started_at),
            services_started: 0,
        })
    }

    /// Runs the selected scenarios in [`SCENARIOS`] order; the report is rewritten after each,
    /// so a failure late in the run keeps what was measured.
    async fn run(&mut self, selected: &[&str]) -> anyhow::Result<()> {
        let wanted = |name: &str| selected.contains(&name);
        for n in CONCURRENCY {
            if wanted(&format!("append-{n}")) {
                let row = self.append(n).await?;
                self.add(vec![row])?;
            }
        }
        for n in DEPOSIT_CONCURRENCY {
            let modes: Vec<GroupCommit> = [GroupCommit::Off, GroupCommit::Default]
                .into_iter()
                .filter(|mode| wanted(&mode.scenario(n)))
                .collect();
            if !modes.is_empty() {
                let rows = self.deposits(n, &modes).await?;
                self.add(rows)?;
            }
        }
        if wanted("hot-account") {
            // One stream is serial by nature: the limit is one raw writer.
            let row = self
                .http_scenario(
                    "hot-account",
                    "commands/s",
                    1,
                    Load::HotAccount,
                    HOT_ACCOUNT_CONNECTIONS,
                )
                .await?;
            self.add(vec![row])?;
        }
        if wanted("transfers-64") {
            // Three events on three streams in one transaction: the limit is single-row
            // INSERT transactions at the same concurrency, so the ratio compares commits.
            let n = TRANSFER_CONNECTIONS;
            let row = self
                .http_scenario(&format!("transfers-{n}"), "transfers/s", n, Load::Transfers, n)
                .await?;
            self.add(vec![row])?;
        }
        if wanted("entries-3-legs") {
            // A payment with a fee: three account streams and the entry's own in one
            // transaction, at the connections of `transfers-64` (its target is 0.6 of that
            // row's rate). The baseline has no entries, so the row has none.
            let (name, n) = ("entries-3-legs", TRANSFER_CONNECTIONS);
            let before = self.raw_limit(name, n).await?;
            let tally = self
                .measure(name, Server::Tally(GroupCommit::Default), Load::Entries3Legs, n)
                .await?;
            let limit = bracket(name, before, self.raw_limit(name, n).await?);
            self.add(vec![ScenarioResult::compare(name, "entries/s", &limit, &tally)])?;
        }
        for size in BATCH_SIZES {
            let name = format!("batch-transfers-{size}");
            if wanted(&name) {
                // Batches of immediate transfers (`POST /v1/batches`), against the same rows
                // (three per transfer) inserted by one multi-row INSERT per batch at the same
                // connections. The baseline has no batches. Its target, 3x deposits-64, is a
                // ratio between rows of one run (BENCHMARKS.md).
                let n = BATCH_CONNECTIONS;
                let before = self.raw_batch_limit(&name, n, size).await?;
                let tally = self
                    .measure(
                        &name,
                        Server::Tally(GroupCommit::Default),
                        Load::BatchTransfers(size),
                        n,
                    )
                    .await?;
                let limit = bracket(&name, before, self.raw_batch_limit(&name, n, size).await?);
                self.add(vec![ScenarioResult::compare(&name, "transfers/s", &limit, &tally)])?;
            }
        }
        if wanted("relay") {
            let row = self.relay().await?;
            self.add(vec![row])?;
        }
        if wanted("rebuild") {
            let row = self.rebuild().await?;
            self.add(vec![row])?;
        }
        if wanted("projection-lag") {
            let row = self.projection_lag().await?;
            self.add(vec![row])?;
        }
        let reads: Vec<Read> = Read::ALL.into_iter().filter(|read| wanted(read.scenario())).collect();
        if !reads.is_empty() {
            self.prepare_reads().await?;
            for read in reads {
                let row = self.read(read).await?;
                self.add(vec![row])?;
            }
        }
        Ok(())
    }

    fn add(&mut self, rows: Vec<ScenarioResult>) -> anyhow::Result<()> {
        let number = |v: Option<f64>, decimals: usize| v.map_or("-".into(), |v| format!("{v:.decimals$}"));
        for row in &rows {
            println!(
                "{}: tally {} {} = {} of the limit ({}), {}x the baseline ({})",
                row.name,
                number(row.tally, 0),
                row.unit,
                number(row.ratio_limit, 2),
                number(row.limit, 0),
                number(row.ratio_baseline, 2),
                number(row.baseline, 0),
            );
        }
        self.report.scenarios.extend(rows);
        self.report.write_json(&self.report_path)?;
        tally_bench::chart::render_png(&self.report, &self.chart_path)
    }

    /// `append-N`: raw single-row INSERTs vs `EventStore::append`, N writers each.
    async fn append(&mut self, writers: usize) -> anyhow::Result<ScenarioResult> {
        let name = format!("append-{writers}");
        let before = self.raw_limit(&name, writers).await?;
        self.checkpoint().await?;
        println!("[{name}] tally: EventStore::append, {writers} writers");
        let tally = self.tally_bench(&self.append_args("store-append", writers)).await?;
        let limit = bracket(&name, before, self.raw_limit(&name, writers).await?);
        Ok(ScenarioResult::compare(&name, "appends/s", &limit, &tally))
    }

    /// `deposits-N-solo` and `deposits-N`: HTTP deposits over N connections, the baseline and
    /// each mode on a freshly started server, between two raw limits at the same concurrency.
    /// The baseline has no group commit to switch off: one measurement serves both rows.
    async fn deposits(&mut self, connections: usize, modes: &[GroupCommit]) -> anyhow::Result<Vec<ScenarioResult>> {
        let scenario = format!("deposits-{connections}");
        let before = self.raw_limit(&scenario, connections).await?;
        let baseline = self
            .measure(&scenario, Server::Baseline, Load::Deposits, connections)
            .await?;
        let mut measured = Vec::new();
        for &mode in modes {
            let name = mode.scenario(connections);
            let tally = self
                .measure(&name, Server::Tally(mode), Load::Deposits, connections)
                .await?;
            measured.push((name, tally));
        }
        let limit = bracket(&scenario, before, self.raw_limit(&scenario, connections).await?);
        Ok(measured
            .iter()
            .map(|(name, tally)| ScenarioResult::compare(name, "commands/s", &limit, tally).with_baseline(&baseline))
            .collect())
    }

    /// An HTTP scenario with its default settings: the raw limit at `limit_writers`, the
    /// baseline, Tally, the limit again.
    async fn http_scenario(
        &mut self,
        name: &str,
        unit: &str,
        limit_writers: usize,
        load: Load,
        connections: usize,
    ) -> anyhow::Result<ScenarioResult> {
        let before = self.raw_limit(name, limit_writers).await?;
        let baseline = self.measure(name, Server::Baseline, load, connections).await?;
        let tally = self
            .measure(name, Server::Tally(GroupCommit::Default), load, connections)
            .await?;
        let limit = bracket(name, before, self.raw_limit(name, limit_writers).await?);
        Ok(ScenarioResult::compare(name, unit, &limit, &tally).with_baseline(&baseline))
    }

    /// Starts `server`, sends it `load` over `connections` for the planned window after a
    /// checkpoint, and stops it.
    async fn measure(
        &mut self,
        scenario: &str,
        server: Server,
        load: Load,
        connections: usize,
    ) -> anyhow::Result<Measurement> {
        let api = self.start(server).await?;
        self.checkpoint().await?;
        println!(
            "[{scenario}] {}: {}, {connections} connections",
            server.describe(),
            load.describe()
        );
        self.load(&api, load, connections).await
    }

    /// `relay`: a preloaded backlog drained by `tally-relay` vs raw JetStream publishes of as
    /// many messages of the same size.
    async fn relay(&mut self) -> anyhow::Result<ScenarioResult> {
        let events = self.plan.relay_events.to_string();
        println!("[relay] preloading {events} events");
        let backlog: Preloaded = self
            .tally_bench(&[
                "preload",
                "--database-url",
                &self.relay_database_url,
                "--events",
                &events,
            ])
            .await?;
        let before = self.publish_limit(&backlog).await?;
        self.checkpoint().await?;
        println!("[relay] tally: tally-relay draining the backlog");
        let tally = self.drain_backlog(&backlog).await?;
        let limit = bracket("relay", before, self.publish_limit(&backlog).await?);
        Ok(ScenarioResult {
            // The relay retries internally; it reports no failures to count.
            errors: None,
            ..ScenarioResult::compare("relay", "events/s", &limit, &tally)
        })
    }

    /// `rebuild`: a log of account events rebuilt into the `accounts` read models
    /// (`tally projections rebuild`) vs the same log read raw in commit order.
    async fn rebuild(&mut self) -> anyhow::Result<ScenarioResult> {
        let events = self.plan.rebuild_events.to_string();
        let url = self.rebuild_database_url.clone();
        println!("[rebuild] preloading {events} account events");
        let _: Measurement = self
            .tally_bench(&["rebuild-preload", "--database-url", &url, "--events", &events])
            .await?;
        let before = self.read_log_limit().await?;
        self.checkpoint().await?;
        println!("[rebuild] tally: rebuilding the accounts projection from the log");
        let tally: Measurement = self.tally_bench(&["rebuild", "--database-url", &url]).await?;
        let limit = bracket("rebuild", before, self.read_log_limit().await?);
        Ok(ScenarioResult {
            errors: None,
            ..ScenarioResult::compare("rebuild", "events/s", &limit, &tally)
        })
    }

    /// `projection-lag`: the whole pipeline running (command API, relay, projector); the most
    /// deposits/s it takes (64 connections, closed loop) is the limit, then deposits arrive at
    /// half of that, open loop, and each is timed from its `201` to the read model showing it.
    async fn projection_lag(&mut self) -> anyhow::Result<ScenarioResult> {
        let nats = [
            ("TALLY_DATABASE_URL", self.lag_database_url.clone()),
            ("TALLY_NATS_URL", self.nats_url.clone()),
            ("TALLY_NATS_STREAM", "BENCH_LAG".to_owned()),
            ("TALLY_SUBJECT_PREFIX", LAG_SUBJECT_PREFIX.to_owned()),
        ];
        let pool = PgPool::connect(&self.lag_database_url).await?;
        tally_projectors::migrate(&pool).await?;
        // Each worker's probe listener on a port of its own.
        let credentials = self.nats_credentials.clone();
        let with_listener = |variable: &'static str, user: &str| -> anyhow::Result<Vec<(&'static str, String)>> {
            let mut env = nats.to_vec();
            env.push((variable, format!("127.0.0.1:{}", tally_devstack::free_port()?)));
            env.extend(credentials.env(user));
            Ok(env)
        };
        let _relay = self.spawn_service(
            "tally-relay",
            "relay",
            &with_listener("TALLY_RELAY_LISTEN", nats_users::RELAY)?,
            &[],
        )?;
        let _projector = self.spawn_service(
            "tally-projector",
            "projector",
            &with_listener("TALLY_PROJECTOR_LISTEN", nats_users::PROJECTOR)?,
            &[],
        )?;
        // A command API of its own: this scenario's log holds only its own events.
        let listen = format!("127.0.0.1:{}", tally_devstack::free_port()?);
        let api = self
            .serve(
                "tally-command-api",
                "command-api",
                &listen,
                &[
                    ("TALLY_DATABASE_URL", self.lag_database_url.clone()),
                    ("TALLY_COMMAND_LISTEN", listen.clone()),
                    free_ops_listen("TALLY_COMMAND_OPS_LISTEN")?,
                    ("TALLY_JWT_SECRET", BENCH_JWT_SECRET.to_owned()),
                    (UNTHROTTLED[0].0, UNTHROTTLED[0].1.to_owned()),
                    (UNTHROTTLED[1].0, UNTHROTTLED[1].1.to_owned()),
                ],
                &[],
                self.run_dir.join("lag-accounts.txt"),
            )
            .await?;
        // The accounts are opened by a short load that is not measured, then projected and
        // analyzed: the limit is measured on tables the planner knows, as in a system that
        // has been running (not on plans cached while they were empty).
        println!("[projection-lag] opening the accounts and warming up (not measured)");
        let opening = Window {
            warmup: Duration::ZERO,
            measure: Duration::from_millis(500),
        };
        self.load_in(&api, Load::Deposits, 64, opening).await?;
        wait_caught_up(&pool).await?;
        self.checkpoint().await?;
        println!("[projection-lag] limit: deposits, 64 connections, with relay and projector running");
        let limit = self.load(&api, Load::Deposits, 64).await?;
        let rate = (limit.ops_per_s / 2.0).max(1.0);
        println!("[projection-lag] waiting for the relay and projector to catch up");
        wait_caught_up(&pool).await?;
        // The limit filled tables that were empty when last analyzed (the log, the read
        // models): analyzed now, the services' cached plans are made again for their size.
        self.checkpoint().await?;
        println!("[projection-lag] tally: {rate:.0} deposits/s, 201 to read model");
        let tally: Measurement = self
            .tally_bench(&[
                "projection-lag",
                "--database-url",
                &self.lag_database_url,
                "--command-url",
                &api.url,
                "--nats-url",
                &self.nats_url,
                "--subject-prefix",
                LAG_SUBJECT_PREFIX,
                "--token",
                &bench_token(tally_service::auth::Role::Teller),
                "--rate",
                &format!("{rate:.0}"),
                "--duration-ms",
                &self.plan.window.measure.as_millis().to_string(),
            ])
            .await?;
        pool.close().await;
        Ok(ScenarioResult::compare("projection-lag", "deposits/s", &limit, &tally))
    }

    /// Writes the accounts the read scenarios read and builds their read models (a rebuild),
    /// plus the limit's copies of them.
    async fn prepare_reads(&mut self) -> anyhow::Result<()> {
        let events = self.plan.read_events.to_string();
        println!("[reads] preparing {events} account events, their read models and the limit's copies");
        let accounts_file = self.read_accounts_file();
        let _: Measurement = self
            .tally_bench(&[
                "reads-prepare".as_ref(),
                "--database-url".as_ref(),
                self.reads_database_url.as_ref(),
                "--events".as_ref(),
                events.as_ref(),
                "--accounts-file".as_ref(),
                accounts_file.as_os_str(),
            ])
            .await?;
        Ok(())
    }

    fn read_accounts_file(&self) -> PathBuf {
        self.run_dir.join("read-accounts.txt")
    }

    /// A read scenario: its limit server, the query API, the limit again, each driven by
    /// `tally load` with the same accounts and connections. The query API's side is skipped
    /// (`tally` null) while it does not serve what the scenario reads.
    async fn read(&mut self, read: Read) -> anyhow::Result<ScenarioResult> {
        let name = read.scenario();
        let before = self.read_limit(read).await?;
        let tally = match self.start_query_api(read).await? {
            Ok(api) => {
                self.checkpoint().await?;
                println!("[{name}] tally: {}, {READ_CONNECTIONS} connections", read.describe());
                Some(self.load(&api, read.load(), READ_CONNECTIONS).await?)
            }
            Err(missing) => {
                println!("  [{name}] tally: skipped, {missing}");
                None
            }
        };
        let limit = bracket(name, before, self.read_limit(read).await?);
        Ok(match tally {
            Some(tally) => ScenarioResult::compare(name, "requests/s", &limit, &tally),
            None => ScenarioResult::limit_only(name, "requests/s", &limit),
        })
    }

    /// `read`'s limit: the minimal server of its kind (`tally-bench serve-limit`), loaded like
    /// the query API.
    async fn read_limit(&mut self, read: Read) -> anyhow::Result<Measurement> {
        let listen = format!("127.0.0.1:{}", tally_devstack::free_port()?);
        let mode = read.limit_mode();
        let api = self
            .serve(
                "tally-bench",
                &format!("limit-{mode}"),
                &listen,
                &[
                    ("TALLY_DATABASE_URL", self.reads_database_url.clone()),
                    ("TALLY_BENCH_LIMIT_MODE", mode.to_owned()),
                    ("TALLY_BENCH_LISTEN", listen.clone()),
                ],
                &["serve-limit"],
                self.read_accounts_file(),
            )
            .await?;
        self.checkpoint().await?;
        println!(
            "[{}] limit: {}, {READ_CONNECTIONS} connections",
            read.scenario(),
            read.describe_limit()
        );
        self.load(&api, read.load(), READ_CONNECTIONS).await
    }

    /// Starts the query API on the read database for `read` (cache off for `reads-uncached`),
    /// or says what it lacks for `read` (`Err`): the routes and settings of issue 6.
    async fn start_query_api(&mut self, read: Read) -> anyhow::Result<Result<Api, String>> {
        let bin = self.bin_dir.join("tally-query-api");
        let help = tokio::process::Command::new(&bin).arg("--help").output().await?;
        if !String::from_utf8_lossy(&help.stdout).contains(QUERY_CACHE_ENV) {
            return Ok(Err(format!(
                "this tally-query-api has no {QUERY_CACHE_ENV} (its moka cache, issue 6, has not landed)"
            )));
        }
        let listen = format!("127.0.0.1:{}", tally_devstack::free_port()?);
        let mut env = vec![
            // No replica: the query API then reads the primary, like the limit's server.
            ("TALLY_DATABASE_URL", self.reads_database_url.clone()),
            ("TALLY_QUERY_LISTEN", listen.clone()),
            free_ops_listen("TALLY_QUERY_OPS_LISTEN")?,
            ("TALLY_JWT_SECRET", BENCH_JWT_SECRET.to_owned()),
            ("TALLY_NATS_URL", self.nats_url.clone()),
            (UNTHROTTLED[0].0, UNTHROTTLED[0].1.to_owned()),
            (UNTHROTTLED[1].0, UNTHROTTLED[1].1.to_owned()),
        ];
        env.extend(self.nats_credentials.env(nats_users::QUERY));
        if read == Read::Uncached {
            env.push((QUERY_CACHE_ENV, "0".to_owned()));
        }
        let api = self
            .serve(
                "tally-query-api",
                "query-api",
                &listen,
                &env,
                &[],
                self.read_accounts_file(),
            )
            .await?;
        let openapi: serde_json::Value = reqwest::get(format!("{}/openapi.json", api.url)).await?.json().await?;
        if read == Read::StatementPages && openapi["paths"].get(STATEMENT_PATH).is_none() {
            return Ok(Err(format!(
                "this tally-query-api does not serve GET {STATEMENT_PATH} (issue 6)"
            )));
        }
        Ok(Ok(api))
    }

    /// The rebuild limit: the whole log read in commit order, after a checkpoint.
    async fn read_log_limit(&self) -> anyhow::Result<Measurement> {
        self.checkpoint().await?;
        println!("[rebuild] limit: the whole log read in commit order");
        self.tally_bench(&["read-log", "--database-url", &self.rebuild_database_url])
            .await
    }

    /// The JetStream limit: as many messages as the backlog holds, of its events' size.
    async fn publish_limit(&self, backlog: &Preloaded) -> anyhow::Result<Measurement> {
        self.checkpoint().await?;
        println!(
            "[relay] limit: JetStream publish of {} messages of {} bytes",
            backlog.events, backlog.message_bytes
        );
        self.tally_bench(&[
            "nats-publish",
            "--nats-url",
            &self.nats_url,
            "--messages",
            &backlog.events.to_string(),
            "--message-bytes",
            &backlog.message_bytes.to_string(),
        ])
        .await
    }

    /// Starts `tally-relay` on the relay database and a fresh stream, and measures it until its
    /// checkpoint reaches the end of the backlog.
    async fn drain_backlog(&mut self, backlog: &Preloaded) -> anyhow::Result<Measurement> {
        let pool = PgPool::connect(&self.relay_database_url).await?;
        let mut relay = self.spawn_service(
            "tally-relay",
            "relay",
            &[
                ("TALLY_DATABASE_URL", self.relay_database_url.clone()),
                ("TALLY_NATS_URL", self.nats_url.clone()),
                ("TALLY_NATS_STREAM", "BENCH_RELAY".into()),
                ("TALLY_SUBJECT_PREFIX", "relay.events".into()),
                (
                    "TALLY_RELAY_LISTEN",
                    format!("127.0.0.1:{}", tally_devstack::free_port()?),
                ),
            ]
            .into_iter()
            .chain(self.nats_credentials.env(nats_users::RELAY))
            .collect::<Vec<_>>(),
            &[],
        )?;
        let name = RelayConfig::default().name;
        let measured = tokio::select! {
            measured = tally_bench::relay::watch(&pool, &name, backlog.last, RELAY_DRAIN_TIMEOUT) => measured,
            status = relay.exit() => Err(anyhow!("tally-relay exited ({status}); see {}", relay.log.display())),
        };
        drop(relay);
        pool.close().await;
        measured
    }

    /// The raw INSERT limit at `writers` concurrency, after a checkpoint.
    async fn raw_limit(&self, scenario: &str, writers: usize) -> anyhow::Result<Measurement> {
        self.checkpoint().await?;
        println!("[{scenario}] limit: raw single-row INSERT transactions, {writers} writers");
        self.tally_bench(&self.append_args("raw-append", writers)).await
    }

    /// The limit of `batch-transfers-*`: `transfers` transfers' rows per multi-row INSERT
    /// transaction, `writers` at once.
    async fn raw_batch_limit(&self, scenario: &str, writers: usize, transfers: usize) -> anyhow::Result<Measurement> {
        self.checkpoint().await?;
        println!(
            "[{scenario}] limit: raw multi-row INSERT of {transfers} transfers' rows per transaction, {writers} writers"
        );
        let mut args = self.append_args("raw-batch-append", writers);
        args.extend(["--transfers".to_owned(), transfers.to_string()]);
        self.tally_bench(&args).await
    }

    fn append_args(&self, command: &str, writers: usize) -> Vec<String> {
        let Window { warmup, measure } = self.plan.window;
        [
            command,
            "--database-url",
            &self.database_url,
            "--writers",
            &writers.to_string(),
            "--duration-ms",
            &measure.as_millis().to_string(),
            "--warmup-ms",
            &warmup.as_millis().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Refreshes every database's planner statistics, then flushes dirty pages, before each
    /// measurement. Statistics: a database in service has them (autovacuum analyzes within a
    /// minute or so of a table growing), but this run's tables were empty moments ago, and a
    /// connection's cached plans made on an empty table (a sequential scan is the cheapest
    /// plan there) are kept until the table is analyzed: the projection-lag run of 2026-11-24
    /// spent much of Postgres's time in such scans. Flushing: no measurement pays for a
    /// checkpoint left by the one before it, and each starts with the same full-page-write
    /// cost.
    async fn checkpoint(&self) -> anyhow::Result<()> {
        // The databases at once, not one after the other: `--quick` analyzes them 43 times.
        let mut analyses = tokio::task::JoinSet::new();
        for url in self.database_urls() {
            let url = url.to_owned();
            analyses.spawn(async move {
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                sqlx::query("ANALYZE").execute(&mut conn).await?;
                conn.close().await
            });
        }
        while let Some(analyzed) = analyses.join_next().await {
            analyzed??;
        }
        sqlx::query("CHECKPOINT").execute(&self.admin).await?;
        Ok(())
    }

    /// Every database of the run.
    fn database_urls(&self) -> [&str; 6] {
        [
            &self.database_url,
            &self.baseline_database_url,
            &self.relay_database_url,
            &self.rebuild_database_url,
            &self.lag_database_url,
            &self.reads_database_url,
        ]
    }

    /// Runs the release `tally-bench` with `args` and parses the JSON it prints.
    async fn tally_bench<T: DeserializeOwned>(&self, args: &[impl AsRef<std::ffi::OsStr>]) -> anyhow::Result<T> {
        let mut command = tokio::process::Command::new(self.bin_dir.join("tally-bench"));
        // Its NATS clients (the JetStream limit, the projection-lag listener) may do anything.
        command.args(args).envs(self.nats_credentials.env(nats_users::ADMIN));
        run_json(command, "tally-bench").await
    }

    /// Runs `tally load` against `api` for the planned window; its progress shows on stderr.
    /// A batch of 1,000 takes seconds to answer, so the batch rows measure for at least 5 s
    /// (after 2 s of warm-up): a window shorter than one answer would count none.
    async fn load(&self, api: &Api, load: Load, connections: usize) -> anyhow::Result<Measurement> {
        let mut window = self.plan.window;
        if let Load::BatchTransfers(_) = load {
            window.warmup = window.warmup.max(Duration::from_secs(2));
            window.measure = window.measure.max(Duration::from_secs(5));
        }
        self.load_in(api, load, connections, window).await
    }

    /// [`Self::load`] measured over `window` instead of the plan's.
    async fn load_in(&self, api: &Api, load: Load, connections: usize, window: Window) -> anyhow::Result<Measurement> {
        let Window { warmup, measure } = window;
        let mut command = tokio::process::Command::new(self.bin_dir.join("tally"));
        command
            .arg("load")
            .args(["--url", &api.url, "--scenario", load.scenario()])
            .args(["--connections", &connections.to_string()])
            .args(["--duration", &format!("{}ms", measure.as_millis())])
            .args(["--warmup", &format!("{}ms", warmup.as_millis())])
            .arg("--token")
            .arg(bench_token(load.role()))
            .arg("--json");
        if let Load::BatchTransfers(size) = load {
            command.args(["--batch-size", &size.to_string()]);
        }
        let accounts = match load {
            Load::HotAccount => None,
            Load::Deposits | Load::Transfers | Load::Entries3Legs | Load::BatchTransfers(_) => Some(self.plan.accounts),
            // Every account the file lists.
            Load::AccountReads | Load::StatementPages => Some(usize::MAX),
        };
        if let Some(accounts) = accounts {
            command
                .args(["--accounts", &accounts.to_string()])
                .arg("--accounts-file")
                .arg(&api.accounts_file);
        }
        let output = run_json_value(command, "tally load").await?;
        let generator: GeneratorCpu = serde_json::from_value(output.clone())?;
        println!(
            "  load generator: {:.2} CPU-s, {:.2} cores busy",
            generator.cpu_s, generator.cpu_cores
        );
        Ok(serde_json::from_value(output)?)
    }

    /// Starts `server` on a free port and waits until it is ready.
    async fn start(&mut self, server: Server) -> anyhow::Result<Api> {
        let listen = format!("127.0.0.1:{}", tally_devstack::free_port()?);
        let url = format!("http://{listen}");
        let mut service = match server {
            Server::Tally(mode) => {
                let mut env = vec![
                    ("TALLY_DATABASE_URL", self.database_url.clone()),
                    ("TALLY_COMMAND_LISTEN", listen),
                    free_ops_listen("TALLY_COMMAND_OPS_LISTEN")?,
                    ("TALLY_JWT_SECRET", BENCH_JWT_SECRET.to_owned()),
                    (UNTHROTTLED[0].0, UNTHROTTLED[0].1.to_owned()),
                    (UNTHROTTLED[1].0, UNTHROTTLED[1].1.to_owned()),
                ];
                if mode == GroupCommit::Off {
                    env.push((GROUP_COMMIT_ENV, "1".into()));
                }
                self.spawn_service("tally-command-api", "command-api", &env, &[])?
            }
            Server::Baseline => {
                let env = [
                    ("TALLY_DATABASE_URL", self.baseline_database_url.clone()),
                    ("TALLY_BASELINE_LISTEN", listen),
                ];
                self.spawn_service("tally-baseline", "baseline", &env, &[])?
            }
        };
        service.wait_ready(&url).await?;
        Ok(Api {
            _service: service,
            url,
            accounts_file: self.run_dir.join(server.accounts_file()),
        })
    }

    /// Starts an HTTP service listening on `listen` and waits until it is ready.
    async fn serve(
        &mut self,
        bin: &str,
        name: &str,
        listen: &str,
        env: &[(&str, String)],
        args: &[&str],
        accounts_file: PathBuf,
    ) -> anyhow::Result<Api> {
        let mut service = self.spawn_service(bin, name, env, args)?;
        let url = format!("http://{listen}");
        service.wait_ready(&url).await?;
        Ok(Api {
            _service: service,
            url,
            accounts_file,
        })
    }

    fn spawn_service(
        &mut self,
        bin: &str,
        name: &str,
        env: &[(&str, String)],
        args: &[&str],
    ) -> anyhow::Result<Service> {
        self.services_started += 1;
        let log = self.log_dir.join(format!("{:02}-{name}.log", self.services_started));
        Service::spawn(&self.bin_dir.join(bin), args, name, &log, env, Inherit::AllButTally)
    }
}

/// Waits until `account_balances` reflects every account event in the log.
async fn wait_caught_up(pool: &PgPool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + LAG_CATCH_UP_TIMEOUT;
    loop {
        let behind: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM events WHERE stream_type = 'account') \
                  - (SELECT coalesce(sum(version), 0) FROM account_balances)::bigint",
        )
        .fetch_one(pool)
        .await?;
        if behind <= 0 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the projector is still {behind} events behind after {LAG_CATCH_UP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A token with `role` for `tally load`, valid for a day (longer than any run).
fn bench_token(role: tally_service::auth::Role) -> String {
    let claims = tally_service::auth::Claims::new("bench", &[role], 24 * 60 * 60);
    tally_service::auth::mint(BENCH_JWT_SECRET.as_bytes(), &claims)
}

/// The limit of a scenario from its measurements before and after Tally's; says so when
/// they disagree, since then the machine was not steady enough to trust the ratio.
fn bracket(scenario: &str, before: Measurement, after: Measurement) -> Measurement {
    let bracket = Bracket { before, after };
    if bracket.drift() > LIMIT_DRIFT_WARN {
        println!(
            "  warning: [{scenario}] the limit moved from {:.0}/s before to {:.0}/s after Tally's \
             measurement ({:.0} %): the machine was not steady",
            bracket.before.ops_per_s,
            bracket.after.ops_per_s,
            bracket.drift() * 100.0
        );
    }
    bracket.combined()
}

/// The two command API configurations the deposits scenarios compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupCommit {
    /// `TALLY_GROUP_COMMIT_MAX=1`: every command commits alone.
    Off,
    /// The command API's default.
    Default,
}

impl GroupCommit {
    fn scenario(self, connections: usize) -> String {
        match self {
            Self::Off => format!("deposits-{connections}-solo"),
            Self::Default => format!("deposits-{connections}"),
        }
    }
}

/// The HTTP servers a scenario's load is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// `tally-command-api`.
    Tally(GroupCommit),
    /// `tally-baseline`: the same routes on stock cqrs-es + postgres-es.
    Baseline,
}

impl Server {
    fn describe(self) -> &'static str {
        match self {
            Self::Tally(GroupCommit::Off) => "tally, group commit off",
            Self::Tally(GroupCommit::Default) => "tally",
            Self::Baseline => "baseline (stock cqrs-es + postgres-es)",
        }
    }

    /// Each server keeps its own accounts (in its own database), opened on its first run.
    fn accounts_file(self) -> &'static str {
        match self {
            Self::Tally(_) => "accounts.txt",
            Self::Baseline => "baseline-accounts.txt",
        }
    }
}

/// The `tally load` scenarios the bench runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Deposits,
    HotAccount,
    Transfers,
    Entries3Legs,
    /// Batches of this many transfers.
    BatchTransfers(usize),
    AccountReads,
    StatementPages,
}

impl Load {
    fn scenario(self) -> &'static str {
        match self {
            Self::Deposits => "deposits",
            Self::HotAccount => "hot-account",
            Self::Transfers => "transfers",
            Self::Entries3Legs => "entries-3-legs",
            Self::BatchTransfers(_) => "batch-transfers",
            Self::AccountReads => "account-reads",
            Self::StatementPages => "statement-pages",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Deposits => "POST deposits",
            Self::HotAccount => "POST deposits to one account",
            Self::Transfers => "POST transfers between random accounts",
            Self::Entries3Legs => "POST three-leg entries between random accounts",
            Self::BatchTransfers(_) => "POST batches of transfers between random accounts",
            Self::AccountReads => "GET accounts",
            Self::StatementPages => "GET statement pages",
        }
    }

    /// The role of the token the load sends.
    fn role(self) -> tally_service::auth::Role {
        match self {
            Self::Deposits | Self::HotAccount | Self::Transfers | Self::Entries3Legs | Self::BatchTransfers(_) => {
                tally_service::auth::Role::Teller
            }
            Self::AccountReads | Self::StatementPages => tally_service::auth::Role::Reader,
        }
    }
}

/// The read scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// `GET /v1/accounts/{id}` from the query API's cache, against a fixed-body server.
    Cached,
    /// The same with the cache off, against a server reading one row per request.
    Uncached,
    /// Statement pages, against a server reading one keyset page per request.
    StatementPages,
}

/// The query API route of the `statement-pages` scenario, as its OpenAPI document names it.
const STATEMENT_PATH: &str = "/v1/accounts/{id}/statement";

impl Read {
    const ALL: [Read; 3] = [Read::Cached, Read::Uncached, Read::StatementPages];

    fn scenario(self) -> &'static str {
        match self {
            Self::Cached => "reads-cached",
            Self::Uncached => "reads-uncached",
            Self::StatementPages => "statement-pages",
        }
    }

    fn load(self) -> Load {
        match self {
            Self::Cached | Self::Uncached => Load::AccountReads,
            Self::StatementPages => Load::StatementPages,
        }
    }

    /// `tally-bench serve-limit --mode`.
    fn limit_mode(self) -> &'static str {
        match self {
            Self::Cached => "fixed",
            Self::Uncached | Self::StatementPages => "row",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Cached => "GET /v1/accounts/{id}, cache on",
            Self::Uncached => "GET /v1/accounts/{id}, cache off",
            Self::StatementPages => "GET /v1/accounts/{id}/statement?limit=50, walking next_cursor",
        }
    }

    fn describe_limit(self) -> &'static str {
        match self {
            Self::Cached => "axum answering a fixed JSON body",
            Self::Uncached => "axum answering one sqlx row of a copy of account_balances",
            Self::StatementPages => "axum answering a keyset page of 50 sqlx rows of a copy of account_statement",
        }
    }
}

/// What `tally load --json` says about its own CPU use, beside the [`Measurement`] fields.
#[derive(Debug, serde::Deserialize)]
struct GeneratorCpu {
    cpu_s: f64,
    cpu_cores: f64,
}

/// A running HTTP server (Tally's command API or the baseline); stopped when dropped.
struct Api {
    _service: Service,
    /// Its base URL, on a port chosen for this run.
    url: String,
    /// Its pre-opened accounts.
    accounts_file: PathBuf,
}

/// Runs a measuring process to completion (stderr passes through, so its progress shows) and
/// parses the JSON object on the last line of its stdout.
async fn run_json<T: DeserializeOwned>(command: tokio::process::Command, what: &str) -> anyhow::Result<T> {
    let value = run_json_value(command, what).await?;
    serde_json::from_value(value).with_context(|| format!("unexpected output from {what}"))
}

async fn run_json_value(mut command: tokio::process::Command, what: &str) -> anyhow::Result<serde_json::Value> {
    // Not `output()`: it would capture stderr too, and hide the progress.
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {what} (was it built?)"))?;
    let output = child.wait_with_output().await?;
    if !output.status.success() {
        bail!("{what} failed ({})", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .last()
        .with_context(|| format!("{what} printed nothing"))?;
    serde_json::from_str(line).with_context(|| format!("{what} printed {line:?}, not JSON"))
}

/// `15.19`, from `15.19 (Debian 15.19-0+deb12u1)`.
async fn postgres_version(pool: &PgPool) -> anyhow::Result<String> {
    let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(pool).await?;
    Ok(version.split_whitespace().next().unwrap_or_default().to_owned())
}

/// The server's version from its monitoring endpoint.
async fn nats_version(nats: &Nats) -> anyhow::Result<String> {
    let varz: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{}/varz", nats.monitor_port()))
        .await?
        .json()
        .await?;
    Ok(varz["version"].as_str().unwrap_or("unknown").to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn only_selects_whole_names_and_dash_separated_prefixes() {
        assert_eq!(select(&args(&["append-1"])).unwrap(), ["append-1"]);
        assert_eq!(
            select(&args(&["deposits-16"])).unwrap(),
            ["deposits-16-solo", "deposits-16"]
        );
        assert_eq!(select(&args(&["hot", "relay"])).unwrap(), ["hot-account", "relay"]);
        assert_eq!(select(&args(&["append"])).unwrap().len(), 3);
        assert_eq!(select(&[]).unwrap().len(), SCENARIOS.len());
    }

    #[test]
    fn only_refuses_a_name_that_selects_nothing() {
        let error = select(&args(&["apend"])).unwrap_err().to_string();
        assert!(error.contains("no such scenario"), "{error}");
    }

    #[test]
    fn every_concurrency_has_its_scenarios_listed() {
        for n in CONCURRENCY {
            assert!(SCENARIOS.contains(&format!("append-{n}").as_str()));
        }
        for n in DEPOSIT_CONCURRENCY {
            for mode in [GroupCommit::Off, GroupCommit::Default] {
                assert!(SCENARIOS.contains(&mode.scenario(n).as_str()));
            }
        }
    }
}
