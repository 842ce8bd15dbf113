//! Reconciliation: the read models compared with the log, on a live system
//! (`tally ledger reconcile`).
//!
//! The log is the truth; the read models are derived from it by the projectors. This module
//! derives them a second time, independently of the projectors' code: it reads the log in commit
//! order and folds each stream with the domain's own aggregates (`Account`, `Transfer`), then
//! compares the result with the rows of `account_balances`, `account_statement`, `transfers` and
//! `ledger_totals`. A difference means a projector bug, a lost or doubled delivery, or a row
//! edited by hand.
//!
//! How it stays exact while writes go on:
//! - The read models are read in **one snapshot** (`REPEATABLE READ`), so rows that commit
//!   together (an account's balance, its statement lines and its partition's totals) are seen
//!   together.
//! - Every row says which stream version it reflects. A row is compared with its stream folded
//!   **to that version**: the whole-log fold when the versions agree, otherwise that stream read
//!   again from the log up to the row's version (a projector behind the fold, or a row newer
//!   than the fold's gap-safe end).
//! - A stream in the log with no row yet is not a difference at once: the projector may not
//!   have reached it. The read models are read again until `wait` has passed; only then is it
//!   reported missing. Streams begun after the first pass over the log are not reported
//!   missing at all (under steady writes there always are some on their way).
//! - `ledger_totals` is compared with the fold when the snapshot reflects exactly the folded
//!   log (no writes during the check); otherwise with the balance rows of the same snapshot,
//!   and its own `balanced` invariant.
//!
//! Memory: one folded state per stream and the expected statement lines, so a log of ten million
//! postings needs a few GiB; the fold reads the log in pages of [`READ_LIMIT_MAX`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use cqrs_es::Aggregate;
use futures::TryStreamExt;
use sqlx::{FromRow, PgPool, Row};
use tally_domain::{Account, AccountEvent, Transfer};
use tally_event_store::verify::Progress;
use tally_event_store::{Checkpoint, EventStore, READ_LIMIT_MAX, StoreError, StoredEvent};
use uuid::Uuid;

/// The read models reconciled, as named in reports and in the `model` label of
/// `tally_reconcile_differences`.
pub const MODELS: [&str; 4] = ["account_balances", "account_statement", "transfers", "ledger_totals"];

/// How long the read models are re-read, by default, while streams of the log have no row yet.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// Streams read again per query when rows and the fold disagree on their version.
const REFOLD_CHUNK: usize = 256;

/// One line of an account's statement as the log implies it:
/// `(version, position, direction, amount, balance_after)`.
pub type Line = (i64, i64, &'static str, i64, i64);

/// An account folded from its events, with the statement lines they imply.
#[derive(Debug, Clone, Default)]
struct AccountFold {
    account: Account,
    version: i64,
    lines: Vec<Line>,
    /// Where the stream's first event is in the log.
    first: Checkpoint,
}

/// A transfer folded from its events.
#[derive(Debug, Clone, Default)]
struct TransferFold {
    transfer: Transfer,
    version: i64,
    /// Where the stream's first event is in the log.
    first: Checkpoint,
}

/// Money that came in from outside and went out, per currency: `(inflow, outflow)`.
type Flows = BTreeMap<String, (i64, i64)>;

/// Why reconciliation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading the log: {0}")]
    Log(#[from] StoreError),
    #[error("reading the read models: {0}")]
    ReadModels(#[from] sqlx::Error),
    #[error("event {position} ({event_type} v{schema_version}) does not decode: {reason}")]
    Decode {
        position: i64,
        event_type: String,
        schema_version: i32,
        reason: String,
    },
}

/// One difference between a read model and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// One of [`MODELS`].
    pub model: &'static str,
    /// The row: an account or transfer id, `account/version` for a statement line, a currency.
    pub key: String,
    /// What the read model shows (`absent` when it has no such row).
    pub got: String,
    /// What the log implies (`absent` when it has no such stream or line).
    pub want: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: shows {}, the log says {}",
            self.model, self.key, self.got, self.want
        )
    }
}

/// What a reconciliation found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Events folded.
    pub events: u64,
    /// The fold's end: the last event folded.
    pub head: Checkpoint,
    /// Rows compared, per model.
    pub compared: BTreeMap<&'static str, u64>,
    /// Every difference found, in model then key order.
    pub differences: Vec<Difference>,
    /// Whether `ledger_totals` was compared with the fold (the snapshot reflected exactly the
    /// folded log) rather than with the balance rows of its snapshot.
    pub totals_against_log: bool,
}

impl Report {
    /// The differences in `model`.
    pub fn count(&self, model: &str) -> usize {
        self.differences.iter().filter(|d| d.model == model).count()
    }
}

/// The whole log folded, extended page by page as it grows.
#[derive(Debug, Default)]
struct Fold {
    accounts: HashMap<Uuid, AccountFold>,
    transfers: HashMap<Uuid, TransferFold>,
    flows: Flows,
    after: Checkpoint,
    events: u64,
}

impl Fold {
    /// Folds the events committed after the last one folded, up to the log's gap-safe end.
    async fn extend(&mut self, store: &EventStore, progress: &mut impl FnMut(u64)) -> Result<(), ReconcileError> {
        loop {
            let page = store.read_all(self.after, READ_LIMIT_MAX).await?;
            let Some(last) = page.last() else { return Ok(()) };
            self.after = last.checkpoint();
            for event in &page {
                self.apply(event)?;
            }
            self.events += page.len() as u64;
            progress(self.events);
        }
    }

    fn apply(&mut self, event: &StoredEvent) -> Result<(), ReconcileError> {
        match event.stream_type.as_str() {
            tally_domain::account::STREAM_TYPE => {
                let decoded = decode_account(event)?;
                match &decoded {
                    AccountEvent::FundsDeposited(d) => {
                        self.flows.entry(d.currency.to_string()).or_default().0 += d.amount.get()
                    }
                    AccountEvent::FundsWithdrawn(w) => {
                        self.flows.entry(w.currency.to_string()).or_default().1 += w.amount.get()
                    }
                    _ => {}
                }
                self.accounts.entry(event.stream_id).or_default().apply(event, decoded);
            }
            tally_domain::transfer::STREAM_TYPE => {
                let decoded = decode_transfer(event)?;
                self.transfers.entry(event.stream_id).or_default().apply(event, decoded);
            }
            // External-id reservations fill no read model reconciled here (the balances row
            // carries the external id from `AccountOpened`).
            _ => {}
        }
        Ok(())
    }
}

impl AccountFold {
    fn apply(&mut self, event: &StoredEvent, decoded: AccountEvent) {
        if self.version == 0 {
            self.first = event.checkpoint();
        }
        let before = self.account.balance;
        self.account.apply(decoded);
        self.version = event.version;
        let moved = self.account.balance - before;
        if moved != 0 {
            let direction = if moved > 0 { "credit" } else { "debit" };
            self.lines.push((
                event.version,
                event.position,
                direction,
                moved.abs(),
                self.account.balance,
            ));
        }
    }
}

impl TransferFold {
    fn apply(&mut self, event: &StoredEvent, decoded: tally_domain::TransferEvent) {
        if self.version == 0 {
            self.first = event.checkpoint();
        }
        self.transfer.apply(decoded);
        self.version = event.version;
    }
}

fn decode_error(event: &StoredEvent, reason: String) -> ReconcileError {
    ReconcileError::Decode {
        position: event.position,
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        reason,
    }
}

fn decode_account(event: &StoredEvent) -> Result<AccountEvent, ReconcileError> {
    let version = u32::try_from(event.schema_version).unwrap_or(0);
    tally_schemas::decode_account_event(&event.event_type, version, &event.payload)
        .map_err(|e| decode_error(event, e.to_string()))
}

fn decode_transfer(event: &StoredEvent) -> Result<tally_domain::TransferEvent, ReconcileError> {
    let version = u32::try_from(event.schema_version).unwrap_or(0);
    tally_schemas::decode_transfer_event(&event.event_type, version, &event.payload)
        .map_err(|e| decode_error(event, e.to_string()))
}

/// An `account_balances` row, as compared.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct BalanceView {
    owner: String,
    currency: String,
    balance: i64,
    held: i64,
    available: i64,
    status: String,
    overdraft_limit: i64,
    external_id: Option<String>,
    #[sqlx(json)]
    metadata: BTreeMap<String, String>,
    #[sqlx(json)]
    flags: Vec<String>,
    version: i64,
}

impl BalanceView {
    fn of(fold: &AccountFold) -> Self {
        let account = &fold.account;
        Self {
            owner: account.owner.clone(),
            currency: account.currency.map(|c| c.to_string()).unwrap_or_default(),
            balance: account.balance,
            held: account.held,
            available: account.available(),
            status: account.status.as_str().to_owned(),
            overdraft_limit: account.overdraft_limit,
            external_id: account.external_id.clone(),
            metadata: account.metadata.clone(),
            flags: account.flags.iter().map(|f| f.as_str().to_owned()).collect(),
            version: fold.version,
        }
    }
}

impl fmt::Display for BalanceView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "v{} {} {} balance {} held {} available {} limit {} owner {:?} external id {:?} metadata {:?} flags {:?}",
            self.version,
            self.status,
            self.currency,
            self.balance,
            self.held,
            self.available,
            self.overdraft_limit,
            self.owner,
            self.external_id,
            self.metadata,
            self.flags
        )
    }
}

/// A `transfers` row, as compared.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct TransferView {
    status: String,
    #[sqlx(rename = "from_account")]
    from: Option<Uuid>,
    #[sqlx(rename = "to_account")]
    to: Option<Uuid>,
    amount: i64,
    settled_amount: i64,
    currency: String,
    version: i64,
}

impl TransferView {
    fn of(fold: &TransferFold) -> Self {
        let t = &fold.transfer;
        let status = serde_json::to_value(t.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        Self {
            status,
            from: Some(t.from),
            to: Some(t.to),
            amount: t.amount,
            settled_amount: t.posted_amount,
            currency: t.currency.map(|c| c.to_string()).unwrap_or_default(),
            version: fold.version,
        }
    }
}

impl fmt::Display for TransferView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = |a: Option<Uuid>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        write!(
            f,
            "v{} {} {} {} -> {} amount {} settled {}",
            self.version,
            self.status,
            self.currency,
            id(self.from),
            id(self.to),
            self.amount,
            self.settled_amount
        )
    }
}

/// One currency of `ledger_totals`, as compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TotalsView {
    accounts: i64,
    inflow: i64,
    outflow: i64,
    balances: i64,
    held: i64,
}

impl fmt::Display for TotalsView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} accounts, inflow {}, outflow {}, balances {}, held {}",
            self.accounts, self.inflow, self.outflow, self.balances, self.held
        )
    }
}

/// The read models, read in one snapshot.
#[derive(Debug, Default)]
struct Snapshot {
    balances: BTreeMap<Uuid, BalanceView>,
    lines: BTreeMap<Uuid, Vec<Line>>,
    transfers: BTreeMap<Uuid, TransferView>,
    /// Per currency, and whether the row's own `balanced` invariant holds.
    totals: BTreeMap<String, (TotalsView, bool)>,
}

async fn read_snapshot(pool: &PgPool) -> Result<Snapshot, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let mut snapshot = Snapshot::default();
    {
        let mut rows = sqlx::query(
            "SELECT account_id, owner, currency, balance, held, available, status, overdraft_limit, external_id, \
                    metadata, flags, version \
             FROM account_balances",
        )
        .fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            snapshot
                .balances
                .insert(row.try_get("account_id")?, BalanceView::from_row(&row)?);
        }
    }
    {
        let mut rows = sqlx::query(
            "SELECT account_id, version, position, direction, amount, balance_after FROM account_statement \
             ORDER BY account_id, version",
        )
        .fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            let direction: String = row.try_get("direction")?;
            let direction = if direction == "credit" { "credit" } else { "debit" };
            snapshot.lines.entry(row.try_get("account_id")?).or_default().push((
                row.try_get("version")?,
                row.try_get("position")?,
                direction,
                row.try_get("amount")?,
                row.try_get("balance_after")?,
            ));
        }
    }
    {
        let mut rows = sqlx::query(
            "SELECT transfer_id, status, from_account, to_account, amount, settled_amount, currency, version \
             FROM transfers",
        )
        .fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            snapshot
                .transfers
                .insert(row.try_get("transfer_id")?, TransferView::from_row(&row)?);
        }
    }
    for row in sqlx::query("SELECT currency, accounts, inflow, outflow, balances, held, balanced FROM ledger_totals")
        .fetch_all(&mut *tx)
        .await?
    {
        snapshot.totals.insert(
            row.try_get("currency")?,
            (
                TotalsView {
                    accounts: row.try_get("accounts")?,
                    inflow: row.try_get("inflow")?,
                    outflow: row.try_get("outflow")?,
                    balances: row.try_get("balances")?,
                    held: row.try_get("held")?,
                },
                row.try_get("balanced")?,
            ),
        );
    }
    tx.commit().await?;
    Ok(snapshot)
}

/// Reconciles every read model with the log. `progress` gets the events folded so far and the
/// count taken at the start. Streams of the log without a row are waited for up to `wait`.
pub async fn reconcile(
    pool: &PgPool,
    wait: Duration,
    mut progress: impl FnMut(Progress),
) -> Result<Report, ReconcileError> {
    let started = Instant::now();
    let store = EventStore::new(pool.clone());
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    let total = u64::try_from(total).unwrap_or(0);
    progress(Progress { done: 0, total });
    let mut fold = Fold::default();
    let mut report_progress = |done| progress(Progress { done, total });
    fold.extend(&store, &mut report_progress).await?;
    // Only streams begun by now may be reported missing: a row for a younger one may just be
    // on its way, and under steady writes there always are such streams.
    let begun_by = fold.after;
    loop {
        let snapshot = read_snapshot(pool).await?;
        // Rows the projectors wrote after the fold's last page: fold those events too, so most
        // rows compare with the whole-log fold rather than a stream read of their own.
        fold.extend(&store, &mut report_progress).await?;
        let report = compare(&store, &fold, &snapshot, begun_by).await?;
        let missing = report
            .differences
            .iter()
            .any(|d| d.got == ABSENT && d.model != "ledger_totals");
        if !missing || started.elapsed() >= wait {
            return Ok(report);
        }
        tracing::info!("streams of the log have no row yet; reading the read models again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

const ABSENT: &str = "absent";

/// Compares `snapshot` with `fold`; a stream of the fold without a row is a difference only if
/// its first event is at or before `begun_by`.
async fn compare(
    store: &EventStore,
    fold: &Fold,
    snapshot: &Snapshot,
    begun_by: Checkpoint,
) -> Result<Report, ReconcileError> {
    let mut report = Report {
        events: fold.events,
        head: fold.after,
        totals_against_log: false,
        ..Report::default()
    };
    let mut exact = true;
    // Accounts: each row (and its statement) at the version it reflects.
    exact &= compare_streams(
        &mut report,
        store,
        Streams {
            model: "account_balances",
            folds: &fold.accounts,
            rows: &snapshot.balances,
            begun_by,
        },
        |row| row.version,
        |report, id, folded| compare_account(report, id, folded, snapshot),
        |folded| BalanceView::of(folded).to_string(),
    )
    .await?;
    for (id, lines) in &snapshot.lines {
        if !snapshot.balances.contains_key(id) {
            report.differences.push(Difference {
                model: "account_statement",
                key: id.to_string(),
                got: format!("{} lines of an account without a balance row", lines.len()),
                want: "no lines".into(),
            });
        }
    }
    report.compared.insert(
        "account_statement",
        snapshot.lines.values().map(|l| l.len() as u64).sum(),
    );

    exact &= compare_streams(
        &mut report,
        store,
        Streams {
            model: "transfers",
            folds: &fold.transfers,
            rows: &snapshot.transfers,
            begun_by,
        },
        |row| row.version,
        |report, id, folded| compare_transfer(report, id, folded, &snapshot.transfers[&id]),
        |folded| TransferView::of(folded).to_string(),
    )
    .await?;

    compare_totals(&mut report, fold, snapshot, exact);
    report
        .differences
        .sort_by(|a, b| (a.model, &a.key).cmp(&(b.model, &b.key)));
    Ok(report)
}

/// The rows of one stream-keyed read model and the folds of their streams.
struct Streams<'a, F, R> {
    model: &'static str,
    folds: &'a HashMap<Uuid, F>,
    rows: &'a BTreeMap<Uuid, R>,
    begun_by: Checkpoint,
}

/// Compares each row with its stream folded to the row's version (`row_version`), through
/// `compare`; reports streams of the fold begun by `begun_by` that have no row. Returns whether
/// the rows reflect exactly the folded streams (no row behind, ahead or missing).
async fn compare_streams<F: StreamFold, R>(
    report: &mut Report,
    store: &EventStore,
    streams: Streams<'_, F, R>,
    row_version: impl Fn(&R) -> i64,
    mut compare: impl FnMut(&mut Report, Uuid, &F),
    want: impl Fn(&F) -> String,
) -> Result<bool, ReconcileError> {
    let mut other_versions = Vec::new();
    for (id, row) in streams.rows {
        match streams.folds.get(id) {
            Some(f) if f.version() == row_version(row) => compare(report, *id, f),
            _ => other_versions.push((*id, row_version(row))),
        }
    }
    let mut exact = other_versions.is_empty();
    for (id, folded) in refold::<F>(store, &other_versions).await? {
        compare(report, id, &folded);
    }
    for (id, f) in streams.folds {
        if !streams.rows.contains_key(id) {
            exact = false;
            if f.first() <= streams.begun_by {
                report.differences.push(Difference {
                    model: streams.model,
                    key: id.to_string(),
                    got: ABSENT.into(),
                    want: want(f),
                });
            }
        }
    }
    report.compared.insert(streams.model, streams.rows.len() as u64);
    Ok(exact)
}

fn compare_account(report: &mut Report, id: Uuid, folded: &AccountFold, snapshot: &Snapshot) {
    let want = BalanceView::of(folded);
    let got = &snapshot.balances[&id];
    if *got != want {
        report.differences.push(Difference {
            model: "account_balances",
            key: id.to_string(),
            got: got.to_string(),
            want: want.to_string(),
        });
    }
    let got_lines = snapshot.lines.get(&id).map(Vec::as_slice).unwrap_or_default();
    let want_lines = folded.lines.as_slice();
    if got_lines != want_lines {
        let show = |l: Option<&Line>| match l {
            Some((_, position, direction, amount, after)) => {
                format!("{direction} {amount} at position {position}, balance after {after}")
            }
            None => ABSENT.into(),
        };
        // The first line that differs, by version: the one a reader would look at first.
        let index = got_lines
            .iter()
            .zip(want_lines)
            .position(|(g, w)| g != w)
            .unwrap_or(got_lines.len().min(want_lines.len()));
        let got_line = got_lines.get(index);
        let want_line = want_lines.get(index);
        // The lower version of the two: a line missing from the statement is named by its own.
        let version = match (got_line, want_line) {
            (Some(g), Some(w)) => g.0.min(w.0),
            (g, w) => g.or(w).map(|l| l.0).unwrap_or_default(),
        };
        report.differences.push(Difference {
            model: "account_statement",
            key: format!("{id}/v{version}"),
            got: format!("{} ({} lines)", show(got_line), got_lines.len()),
            want: format!("{} ({} lines)", show(want_line), want_lines.len()),
        });
    }
}

fn compare_transfer(report: &mut Report, id: Uuid, folded: &TransferFold, got: &TransferView) {
    let want = TransferView::of(folded);
    if *got != want {
        report.differences.push(Difference {
            model: "transfers",
            key: id.to_string(),
            got: got.to_string(),
            want: want.to_string(),
        });
    }
}

/// `ledger_totals` against the fold when the snapshot is exactly the folded log, otherwise
/// against the balance rows of the same snapshot (they commit together with the totals).
fn compare_totals(report: &mut Report, fold: &Fold, snapshot: &Snapshot, exact: bool) {
    let mut want: BTreeMap<String, TotalsView> = BTreeMap::new();
    if exact {
        for f in fold.accounts.values() {
            let currency = f.account.currency.map(|c| c.to_string()).unwrap_or_default();
            let t = want.entry(currency).or_default();
            t.accounts += 1;
            t.balances += f.account.balance;
            t.held += f.account.held;
        }
        for (currency, (inflow, outflow)) in &fold.flows {
            let t = want.entry(currency.clone()).or_default();
            t.inflow = *inflow;
            t.outflow = *outflow;
        }
    } else {
        for row in snapshot.balances.values() {
            let t = want.entry(row.currency.clone()).or_default();
            t.accounts += 1;
            t.balances += row.balance;
            t.held += row.held;
        }
        // The flows cannot be derived from the rows: take them as shown, and rely on the row's
        // own invariant (`balanced`) below.
        for (currency, (shown, _)) in &snapshot.totals {
            if let Some(t) = want.get_mut(currency) {
                t.inflow = shown.inflow;
                t.outflow = shown.outflow;
            }
        }
    }
    report.totals_against_log = exact;
    report.compared.insert("ledger_totals", snapshot.totals.len() as u64);
    for (currency, (got, balanced)) in &snapshot.totals {
        let want_row = want.remove(currency);
        let differs = want_row.as_ref() != Some(got) || !balanced;
        if differs {
            report.differences.push(Difference {
                model: "ledger_totals",
                key: currency.clone(),
                got: if *balanced {
                    got.to_string()
                } else {
                    format!("{got} (balances + in transit != inflow - outflow)")
                },
                want: want_row.map(|w| w.to_string()).unwrap_or_else(|| ABSENT.into()),
            });
        }
    }
    for (currency, w) in want {
        report.differences.push(Difference {
            model: "ledger_totals",
            key: currency,
            got: ABSENT.into(),
            want: w.to_string(),
        });
    }
}

/// A stream's fold that can take its stored events one by one.
trait StreamFold: Default {
    fn apply_stored(&mut self, event: &StoredEvent) -> Result<(), ReconcileError>;
    /// The version folded to.
    fn version(&self) -> i64;
    /// Where the stream's first event is in the log.
    fn first(&self) -> Checkpoint;
}

impl StreamFold for AccountFold {
    fn apply_stored(&mut self, event: &StoredEvent) -> Result<(), ReconcileError> {
        self.apply(event, decode_account(event)?);
        Ok(())
    }
    fn version(&self) -> i64 {
        self.version
    }
    fn first(&self) -> Checkpoint {
        self.first
    }
}

impl StreamFold for TransferFold {
    fn apply_stored(&mut self, event: &StoredEvent) -> Result<(), ReconcileError> {
        self.apply(event, decode_transfer(event)?);
        Ok(())
    }
    fn version(&self) -> i64 {
        self.version
    }
    fn first(&self) -> Checkpoint {
        self.first
    }
}

/// Each stream in `streams` folded from the log up to the given version; a stream the log does
/// not hold at all (a row nobody wrote through the log) folds to the empty state.
async fn refold<F: StreamFold>(store: &EventStore, streams: &[(Uuid, i64)]) -> Result<Vec<(Uuid, F)>, ReconcileError> {
    let mut folded: HashMap<Uuid, (F, i64)> = HashMap::with_capacity(streams.len());
    for chunk in streams.chunks(REFOLD_CHUNK) {
        let target: HashMap<Uuid, i64> = chunk.iter().copied().collect();
        // Each read continues every stream where the last one stopped, until each reached the
        // version its row reflects (or its end in the log).
        let mut pending: Vec<(Uuid, i64)> = chunk.iter().map(|(id, _)| (*id, 0)).collect();
        while !pending.is_empty() {
            let limit_each = pending.iter().map(|(id, after)| target[id] - after).max().unwrap_or(1);
            let events = store
                .read_streams(&pending, limit_each.clamp(1, READ_LIMIT_MAX))
                .await?;
            for event in events.iter().filter(|e| e.version <= target[&e.stream_id]) {
                let (fold, version) = folded.entry(event.stream_id).or_default();
                fold.apply_stored(event)?;
                *version = event.version;
            }
            pending = pending
                .iter()
                .filter_map(|(id, after)| {
                    let reached = folded.get(id).map_or(0, |(_, v)| *v);
                    // Stop when nothing new came back (the log ends there) or the target is reached.
                    (reached > *after && reached < target[id]).then_some((*id, reached))
                })
                .collect();
        }
    }
    Ok(streams
        .iter()
        .map(|(id, _)| (*id, folded.remove(id).map(|(f, _)| f).unwrap_or_default()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(balance: i64, version: i64) -> BalanceView {
        BalanceView {
            owner: "o".into(),
            currency: "EUR".into(),
            balance,
            held: 0,
            available: balance,
            status: "open".into(),
            overdraft_limit: 0,
            external_id: None,
            metadata: BTreeMap::new(),
            flags: Vec::new(),
            version,
        }
    }

    #[test]
    fn totals_from_rows_flag_a_row_that_is_not_balanced_and_a_currency_without_totals() {
        let mut snapshot = Snapshot::default();
        snapshot.balances.insert(Uuid::from_u128(1), view(70, 2));
        snapshot.balances.insert(Uuid::from_u128(2), view(30, 1));
        let shown = TotalsView {
            accounts: 2,
            inflow: 100,
            outflow: 0,
            balances: 100,
            held: 0,
        };
        snapshot.totals.insert("EUR".into(), (shown, true));
        let mut report = Report::default();
        compare_totals(&mut report, &Fold::default(), &snapshot, false);
        assert!(report.differences.is_empty(), "{:?}", report.differences);

        snapshot.totals.insert("EUR".into(), (shown, false));
        let mut report = Report::default();
        compare_totals(&mut report, &Fold::default(), &snapshot, false);
        assert_eq!(report.count("ledger_totals"), 1);
        assert!(report.differences[0].got.contains("in transit"));

        snapshot.totals.clear();
        let mut report = Report::default();
        compare_totals(&mut report, &Fold::default(), &snapshot, false);
        assert_eq!(report.differences[0].got, ABSENT);
        assert_eq!(report.differences[0].key, "EUR");
    }

    #[test]
    fn a_statement_difference_names_the_first_line_that_differs() {
        let id = Uuid::from_u128(7);
        let folded = AccountFold {
            lines: vec![(1, 10, "credit", 5, 5), (2, 11, "credit", 5, 10)],
            ..AccountFold::default()
        };
        let mut snapshot = Snapshot::default();
        snapshot.balances.insert(id, BalanceView::of(&folded));
        snapshot
            .lines
            .insert(id, vec![(1, 10, "credit", 5, 5), (2, 11, "credit", 6, 11)]);
        let mut report = Report::default();
        compare_account(&mut report, id, &folded, &snapshot);
        assert_eq!(report.differences.len(), 1);
        let d = &report.differences[0];
        assert_eq!(d.key, format!("{id}/v2"));
        assert!(d.got.starts_with("credit 6"), "{d}");
        assert!(d.want.starts_with("credit 5"), "{d}");
    }
}
