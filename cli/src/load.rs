//! `tally load`: an HTTP load generator for the command API, usable against any deployment.
//!
//! - **Closed loop** (default): `--connections` clients, each sending its next request as soon
//!   as the previous one is answered. Measures how fast the server goes flat out.
//! - **Open loop** (`--rate R`): requests fall due on a fixed schedule, R per second, whatever
//!   the server does, and latency is measured from when a request was *due*, not when it was
//!   sent. A server that stalls is charged for the queue it builds, so latency is not hidden
//!   by coordinated omission. `--connections` bounds the requests in flight.
//!
//! Scenarios: `deposits` posts `{"amount":1}` to accounts picked uniformly at random from
//! `--accounts` pre-opened ones; `hot-account` posts every deposit to one account; `transfers`
//! funds the `--accounts` accounts once, then moves 1 between two of them picked at random
//! (an immediate transfer: both legs and the transfer record in one transaction);
//! `entries-3-legs` funds them likewise, then books a payment with a fee between three of them
//! picked at random (`POST /v1/entries`: debit 2, credit 1 and 1, in one transaction);
//! `batch-transfers` funds them likewise, then sends `--batch-size` such transfers per request
//! (`POST /v1/batches`), and counts each item that took effect as one operation. Every
//! command carries a unique `Idempotency-Key` and, with `--token`, the bearer token. The read
//! scenarios go to a query API (`--url`) and read accounts listed in `--accounts-file`:
//! `account-reads` gets `/v1/accounts/{id}` of one picked at random, `statement-pages` walks an
//! account's statement page by page (`/v1/accounts/{id}/statement?limit=50`, then the body's
//! `next_cursor` while `has_more` is true) and then picks another.
//! Connections are kept alive. Latencies go into HdrHistograms; non-2xx answers are counted by
//! status; the generator reports its own CPU time so a reader can tell it was not the
//! bottleneck.

mod progress;
mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::time::Instant;
use uuid::Uuid;

use self::progress::{Live, Progress};
use self::stats::{LoadReport, Measured, Outcome, Recorder, RunShape};

/// How long one request may take before it counts as a `timeout`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent requests while opening the accounts, before any measurement.
const OPEN_ACCOUNTS_CONCURRENCY: usize = 32;
/// In open loop, how long after the window the backlog of due requests may still be sent;
/// requests still unsent then are reported as `not-sent`.
const OPEN_LOOP_DRAIN_MAX: Duration = Duration::from_secs(10);
/// The deposit every request makes, in minor units.
const DEPOSIT_BODY: &str = r#"{"amount":1}"#;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Base URL of the command API.
    #[arg(long, env = "TALLY_COMMAND_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, value_enum, default_value_t = Scenario::Deposits)]
    scenario: Scenario,
    /// Accounts the deposits are spread over (deposits scenario).
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,
    /// Ids of pre-opened accounts, one per line: used when the file exists, extended (and the
    /// missing accounts opened) when it holds fewer than --accounts, written when absent.
    #[arg(long, value_name = "PATH")]
    accounts_file: Option<PathBuf>,
    /// Concurrent keep-alive connections (open loop: the most requests in flight).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Measured time, e.g. 30s, 2m, 500ms.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before the measured time that is not recorded (connections, caches).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
    /// Open loop: requests per second on a fixed schedule. Without it: closed loop.
    #[arg(long, value_name = "PER_SECOND")]
    rate: Option<f64>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Transfers per request of `batch-transfers` (1 to 8190).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Bearer token with the `teller` role, sent with every request (`tally token --role teller`).
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Deposits spread uniformly over --accounts accounts.
    Deposits,
    /// Every deposit to one account: the worst case for optimistic concurrency.
    HotAccount,
    /// Immediate transfers of 1 between two of --accounts funded accounts, picked at random.
    Transfers,
    /// Journal entries of three legs (a payment with a fee: debit 2, credit 1 and 1) between
    /// three of --accounts funded accounts, picked at random.
    #[value(name = "entries-3-legs")]
    Entries3Legs,
    /// Batches of --batch-size immediate transfers of 1 between random funded accounts.
    BatchTransfers,
    /// `GET /v1/accounts/{id}` of accounts from --accounts-file (a query API), picked at random.
    AccountReads,
    /// Statement pages of accounts from --accounts-file (a query API), each walked to its end.
    StatementPages,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Deposits => "deposits",
            Self::HotAccount => "hot-account",
            Self::Transfers => "transfers",
            Self::Entries3Legs => "entries-3-legs",
            Self::BatchTransfers => "batch-transfers",
            Self::AccountReads => "account-reads",
            Self::StatementPages => "statement-pages",
        }
    }

    fn reads(self) -> bool {
        matches!(self, Self::AccountReads | Self::StatementPages)
    }
}

/// Statement lines per page of the `statement-pages` scenario.
const STATEMENT_PAGE_LINES: u32 = 50;

/// Minor units deposited once into each account of the `transfers` scenario: enough that no
/// run of 1-unit transfers drains one.
const TRANSFER_FUNDING: i64 = 1_000_000_000;

/// Runs the load described by `args` and prints its report.
pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    check(&args)?;
    let base = args.url.trim_end_matches('/').to_owned();
    let setup = client(args.token.as_deref())?.build()?;
    let accounts = match args.scenario {
        Scenario::Deposits => prepare_accounts(&setup, &base, args.accounts, args.accounts_file.as_deref()).await?,
        Scenario::HotAccount => open_accounts(&setup, &base, 1).await?,
        Scenario::Transfers | Scenario::Entries3Legs | Scenario::BatchTransfers => {
            let accounts = prepare_accounts(&setup, &base, args.accounts.max(3), args.accounts_file.as_deref()).await?;
            fund_accounts(&setup, &base, &accounts).await?;
            accounts
        }
        // A query API opens nothing: the accounts must exist already.
        Scenario::AccountReads | Scenario::StatementPages => {
            let path = args
                .accounts_file
                .as_deref()
                .context("the read scenarios need --accounts-file with the ids of existing accounts")?;
            let mut ids = read_ids(path)?;
            if ids.is_empty() {
                bail!("{} lists no accounts", path.display());
            }
            ids.truncate(args.accounts);
            ids
        }
    };
    let target = Arc::new(Target::new(&base, &accounts, args.scenario, args.batch_size));
    let report = drive(&args, target).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(())
}

fn check(args: &LoadArgs) -> anyhow::Result<()> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.accounts == 0 {
        bail!("--accounts must be at least 1");
    }
    if args.scenario.reads() && args.accounts_file.is_none() {
        bail!(
            "--scenario {} reads the accounts listed in --accounts-file",
            args.scenario.name()
        );
    }
    if !(1..=8_190).contains(&args.batch_size) {
        bail!("--batch-size must be 1 to 8190 (a batch's most items)");
    }
    if args.duration.is_zero() {
        bail!("--duration must be longer than zero");
    }
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("--rate must be a positive number of requests per second");
    }
    Ok(())
}

/// A client that sends `token` (if any) as `Authorization: Bearer` and gives up on a request
/// after [`REQUEST_TIMEOUT`].
fn client(token: Option<&str>) -> anyhow::Result<reqwest::ClientBuilder> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("--token is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .timeout(REQUEST_TIMEOUT))
}

/// The accounts to deposit into: from `file` when it holds enough, the rest opened now.
async fn prepare_accounts(
    client: &reqwest::Client,
    base: &str,
    count: usize,
    file: Option<&Path>,
) -> anyhow::Result<Vec<String>> {
    let mut ids = match file {
        Some(path) if path.exists() => read_ids(path)?,
        _ => Vec::new(),
    };
    if ids.len() < count {
        ids.extend(open_accounts(client, base, count - ids.len()).await?);
        if let Some(path) = file {
            std::fs::write(path, ids.join("\n") + "\n").with_context(|| format!("writing {}", path.display()))?;
        }
    }
    ids.truncate(count);
    Ok(ids)
}

fn read_ids(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Opens `count` EUR accounts owned by `bench` and returns their ids.
async fn open_accounts(client: &reqwest::Client, base: &str, count: usize) -> anyhow::Result<Vec<String>> {
    tracing::info!(count, "opening accounts");
    let url = format!("{base}/v1/accounts");
    stream::iter(0..count)
        .map(|_| open_account(client, &url))
        .buffer_unordered(OPEN_ACCOUNTS_CONCURRENCY)
        .try_collect()
        .await
}

/// Deposits [`TRANSFER_FUNDING`] into each account, once: the key is derived from the account,
/// so a second run with the same accounts file replays instead of depositing again.
async fn fund_accounts(client: &reqwest::Client, base: &str, accounts: &[String]) -> anyhow::Result<()> {
    tracing::info!(count = accounts.len(), "funding accounts");
    let body = format!(r#"{{"amount":{TRANSFER_FUNDING},"reference":"bench funding"}}"#);
    stream::iter(accounts)
        .map(|id| {
            let body = &body;
            async move {
                let url = format!("{base}/v1/accounts/{id}/deposits");
                let response = client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header("idempotency-key", format!("bench-funding-{id}"))
                    .body(body.clone())
                    .send()
                    .await
                    .with_context(|| format!("POST {url}"))?;
                if !response.status().is_success() {
                    bail!("POST {url} answered {}", response.status());
                }
                Ok(())
            }
        })
        .buffer_unordered(OPEN_ACCOUNTS_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

async fn open_account(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let response = client
        .post(url)
        .json(&serde_json::json!({ "owner": "bench", "currency": "EUR" }))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    if !status.is_success() {
        bail!(
            "POST {url} answered {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    let body: serde_json::Value = response.json().await?;
    let id = body["account_id"]
        .as_str()
        .context("the open-account response has no account_id")?;
    Ok(id.to_owned())
}

/// What each request does.
#[derive(Debug)]
enum Target {
    /// A deposit into one of these URLs, chosen uniformly at random.
    Deposits { urls: Vec<String> },
    /// A transfer between two of these accounts, chosen uniformly at random.
    Transfers { url: String, accounts: Vec<String> },
    /// A three-leg entry between three of these accounts, chosen uniformly at random.
    Entries { url: String, accounts: Vec<String> },
    /// A batch of `size` transfers, each between two of these accounts chosen at random.
    Batches {
        url: String,
        accounts: Vec<String>,
        size: usize,
    },
    /// A GET of one of these URLs, chosen uniformly at random.
    Reads { urls: Vec<String> },
    /// The next statement page of the worker's account, or the first of one chosen at random.
    Statements { urls: Vec<String> },
}

/// Where a worker is in its walk through a statement (`statement-pages`).
#[derive(Debug, Default)]
struct Walk {
    /// The statement URL being walked and the cursor of its next page.
    next: Option<(usize, String)>,
}

/// The part of a statement page the walk reads: the query API also returns a cursor after
/// the last page (to see lines written later), so `has_more` says whether to follow it.
#[derive(Debug, serde::Deserialize)]
struct Page {
    #[serde(default)]
    has_more: bool,
    next_cursor: Option<String>,
}

impl Target {
    fn new(base: &str, accounts: &[String], scenario: Scenario, batch_size: usize) -> Self {
        match scenario {
            Scenario::Deposits | Scenario::HotAccount => Self::Deposits {
                urls: accounts
                    .iter()
                    .map(|id| format!("{base}/v1/accounts/{id}/deposits"))
                    .collect(),
            },
            Scenario::Transfers => Self::Transfers {
                url: format!("{base}/v1/transfers"),
                accounts: accounts.to_vec(),
            },
            Scenario::Entries3Legs => Self::Entries {
                url: format!("{base}/v1/entries"),
                accounts: accounts.to_vec(),
            },
            Scenario::BatchTransfers => Self::Batches {
                url: format!("{base}/v1/batches"),
                accounts: accounts.to_vec(),
                size: batch_size,
            },
            Scenario::AccountReads => Self::Reads {
                urls: accounts.iter().map(|id| format!("{base}/v1/accounts/{id}")).collect(),
            },
            Scenario::StatementPages => Self::Statements {
                urls: accounts
                    .iter()
                    .map(|id| format!("{base}/v1/accounts/{id}/statement"))
                    .collect(),
            },
        }
    }

    /// Sends one request; `walk` is the worker's place in a statement.
    async fn send(&self, client: &reqwest::Client, walk: &mut Walk) -> Sent {
        let outcome = match self {
            Self::Deposits { urls } => {
                post(
                    client,
                    &urls[rand::random_range(0..urls.len())],
                    DEPOSIT_BODY.to_owned(),
                )
                .await
            }
            Self::Transfers { url, accounts } => post(client, url, transfer_fields(accounts)).await,
            Self::Batches { url, accounts, size } => return send_batch(client, url, accounts, *size).await,
            Self::Entries { url, accounts } => {
                // Three distinct accounts: a random one, then two others at distinct shifts.
                let n = accounts.len();
                let payer = rand::random_range(0..n);
                let first = rand::random_range(1..n);
                // In 1..n and never `first`: a shift of 1..n-1 within the n-1 non-zero shifts.
                let second = 1 + (first - 1 + rand::random_range(1..n - 1)) % (n - 1);
                let (merchant, fees) = ((payer + first) % n, (payer + second) % n);
                let body = format!(
                    r#"{{"mode":"immediate","legs":[{{"account":"{}","direction":"debit","amount":2}},{{"account":"{}","direction":"credit","amount":1}},{{"account":"{}","direction":"credit","amount":1}}]}}"#,
                    accounts[payer], accounts[merchant], accounts[fees]
                );
                post(client, url, body).await
            }
            Self::Reads { urls } => {
                send_reading(client.get(&urls[rand::random_range(0..urls.len())]))
                    .await
                    .0
            }
            Self::Statements { urls } => next_page(client, urls, walk).await,
        };
        Sent { outcome, items: None }
    }
}

/// What one request did.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub outcome: Outcome,
    /// A batch's items that took effect (201) and those refused; `None` for a single command.
    pub items: Option<(u64, u64)>,
}

/// The body fields of a transfer of 1 between two accounts picked at random.
fn transfer_fields(accounts: &[String]) -> String {
    let from = rand::random_range(0..accounts.len());
    // Any other account: shift by 1..len, wrapping.
    let to = (from + rand::random_range(1..accounts.len())) % accounts.len();
    format!(
        r#"{{"from":"{}","to":"{}","amount":1,"currency":"EUR","mode":"immediate"}}"#,
        accounts[from], accounts[to]
    )
}

/// The part of a batch's answer the load reads: each item's status.
#[derive(Debug, serde::Deserialize)]
struct BatchAnswer {
    results: Vec<ItemStatus>,
}

#[derive(Debug, serde::Deserialize)]
struct ItemStatus {
    status: u16,
}

/// Posts a batch of `size` transfers, each under its own fresh key, and counts its items.
async fn send_batch(client: &reqwest::Client, url: &str, accounts: &[String], size: usize) -> Sent {
    let items: Vec<String> = (0..size)
        .map(|_| {
            let fields = transfer_fields(accounts);
            // The transfer's own fields, after the item's kind and key.
            format!(
                r#"{{"kind":"transfer","idempotency_key":"{}",{}"#,
                Uuid::new_v4(),
                &fields[1..]
            )
        })
        .collect();
    let body = format!(r#"{{"items":[{}]}}"#, items.join(","));
    let request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    let (outcome, body) = send_reading(request).await;
    let items = outcome
        .is_success()
        .then(|| body.and_then(|b| serde_json::from_slice::<BatchAnswer>(&b).ok()))
        .flatten()
        .map(|answer| {
            let ok = answer.results.iter().filter(|r| r.status == 201).count() as u64;
            (ok, answer.results.len() as u64 - ok)
        });
    Sent {
        outcome,
        items: items.or(Some((0, 0))),
    }
}

/// Posts a command with a fresh `Idempotency-Key`.
async fn post(client: &reqwest::Client, url: &str, body: String) -> Outcome {
    let request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", Uuid::new_v4().to_string())
        .body(body);
    send_reading(request).await.0
}

/// Sends a request and reads the answer's body to the end (so the connection is reused).
async fn send_reading(request: reqwest::RequestBuilder) -> (Outcome, Option<Vec<u8>>) {
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            match response.bytes().await {
                Ok(body) => (Outcome::Status(status), Some(body.to_vec())),
                Err(e) => (Outcome::from_error(&e), None),
            }
        }
        Err(e) => (Outcome::from_error(&e), None),
    }
}

/// Gets the next page of the statement `walk` is in (the first page of a random account's
/// when it is in none) and remembers the page's `next_cursor`.
async fn next_page(client: &reqwest::Client, urls: &[String], walk: &mut Walk) -> Outcome {
    let (account, cursor) = match walk.next.take() {
        Some((account, cursor)) => (account, Some(cursor)),
        None => (rand::random_range(0..urls.len()), None),
    };
    let mut query = vec![("limit", STATEMENT_PAGE_LINES.to_string())];
    query.extend(cursor.map(|cursor| ("cursor", cursor)));
    let (outcome, body) = send_reading(client.get(&urls[account]).query(&query)).await;
    if outcome.is_success()
        && let Some(page) = body.and_then(|body| serde_json::from_slice::<Page>(&body).ok())
    {
        walk.next = page
            .next_cursor
            .filter(|_| page.has_more)
            .map(|cursor| (account, cursor));
    }
    outcome
}

/// When requests are due and which of them count.
#[derive(Debug)]
struct Schedule {
    started: Instant,
    measure_from: Instant,
    until: Instant,
    /// Open loop: seconds between two due times, and the next slot to hand out.
    open: Option<(f64, AtomicU64)>,
}

impl Schedule {
    fn new(args: &LoadArgs) -> Self {
        let started = Instant::now();
        let measure_from = started + args.warmup;
        Self {
            started,
            measure_from,
            until: measure_from + args.duration,
            open: args.rate.map(|rate| (1.0 / rate, AtomicU64::new(0))),
        }
    }

    /// When the caller's next request is due; `None` when the run is over for it.
    fn next_due(&self) -> Option<Instant> {
        let now = Instant::now();
        match &self.open {
            None => (now < self.until).then_some(now),
            Some((interval_s, next)) => {
                if now > self.until + OPEN_LOOP_DRAIN_MAX {
                    return None;
                }
                let slot = next.fetch_add(1, Ordering::Relaxed);
                let due = self.started + Duration::from_secs_f64(slot as f64 * interval_s);
                (due < self.until).then_some(due)
            }
        }
    }

    /// Whether a request counts: closed loop by when it completed, open loop by when it was
    /// due (so the backlog built during the window is charged to it, even if sent later).
    fn counts(&self, due: Instant, done: Instant) -> bool {
        match self.open {
            None => done >= self.measure_from && done <= self.until,
            Some(_) => due >= self.measure_from && due < self.until,
        }
    }

    /// Open loop: requests due in the window that were never sent (the drain ran out).
    fn not_sent(&self) -> u64 {
        let Some((interval_s, next)) = &self.open else {
            return 0;
        };
        let due_in_window = |t: Instant| ((t - self.started).as_secs_f64() / interval_s).ceil() as u64;
        let handed_out = next.load(Ordering::Relaxed).max(due_in_window(self.measure_from));
        due_in_window(self.until).saturating_sub(handed_out)
    }
}

/// Runs the workers and the progress display, then merges what the workers recorded.
async fn drive(args: &LoadArgs, target: Arc<Target>) -> anyhow::Result<LoadReport> {
    let cpu_before = stats::cpu_time()?;
    let schedule = Arc::new(Schedule::new(args));
    let live = Arc::new(Live::default());
    let progress = Progress::start(live.clone(), args.warmup, args.duration);
    let mut workers = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let client = client(args.token.as_deref())?
            .pool_max_idle_per_host(1)
            .tcp_nodelay(true)
            .build()?;
        workers.push(tokio::spawn(work(
            client,
            target.clone(),
            schedule.clone(),
            live.clone(),
        )));
    }
    let mut total = Recorder::default();
    for worker in workers {
        total.merge(&worker.await?);
    }
    progress.finish();
    let shape = RunShape {
        scenario: args.scenario.name(),
        url: args.url.clone(),
        connections: args.connections,
        rate: args.rate,
        warmup: args.warmup,
        window: args.duration,
    };
    let measured = Measured {
        total: &total,
        not_sent: schedule.not_sent(),
        cpu: stats::cpu_time()? - cpu_before,
        wall: schedule.started.elapsed(),
    };
    Ok(LoadReport::new(&shape, measured))
}

async fn work(client: reqwest::Client, target: Arc<Target>, schedule: Arc<Schedule>, live: Arc<Live>) -> Recorder {
    let mut recorder = Recorder::default();
    let mut walk = Walk::default();
    while let Some(due) = schedule.next_due() {
        // Only a request due later waits: Tokio's timer ticks in milliseconds and rounds a
        // deadline up, so awaiting a deadline already passed (every closed-loop request) could
        // cost up to a millisecond per request.
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let sent = target.send(&client, &mut walk).await;
        let done = Instant::now();
        live.count(sent.outcome);
        if schedule.counts(due, done) {
            recorder.record(done - due, done - schedule.measure_from, sent);
        }
    }
    recorder
}

/// Parses `500ms`, `2.5s`, `30s`, `2m`; a bare number means seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, seconds_per_unit) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 30s or 2m"))?;
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_milliseconds_seconds_and_minutes() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    fn schedule(rate: Option<f64>) -> Schedule {
        let started = Instant::now();
        Schedule {
            started,
            measure_from: started + Duration::from_secs(1),
            until: started + Duration::from_secs(3),
            open: rate.map(|r| (1.0 / r, AtomicU64::new(0))),
        }
    }

    #[test]
    fn open_loop_requests_fall_due_on_a_fixed_schedule_and_count_by_due_time() {
        let s = schedule(Some(10.0));
        let due: Vec<Instant> = (0..3).map(|_| s.next_due().unwrap()).collect();
        assert_eq!(due[1] - due[0], Duration::from_millis(100));
        assert_eq!(due[2] - due[1], Duration::from_millis(100));
        // Due in the window but answered long after it: still counted, latency and all.
        let late_due = s.started + Duration::from_millis(2_900);
        assert!(s.counts(late_due, late_due + Duration::from_secs(5)));
        // Due during the warm-up: not counted.
        assert!(!s.counts(s.started, s.measure_from + Duration::from_millis(1)));
    }

    #[test]
    fn open_loop_reports_the_window_requests_it_never_sent() {
        let s = schedule(Some(10.0));
        // 20 requests fall due in the 2 s window; slots 0 to 14 were handed out, 10 of them
        // in the warm-up, so 15 of the window's requests never went out.
        s.open.as_ref().unwrap().1.store(15, Ordering::Relaxed);
        assert_eq!(s.not_sent(), 15);
    }

    #[test]
    fn closed_loop_requests_count_when_they_complete_inside_the_window() {
        let s = schedule(None);
        assert!(s.counts(s.started, s.measure_from + Duration::from_millis(1)));
        assert!(!s.counts(s.measure_from, s.until + Duration::from_millis(1)));
    }
}
