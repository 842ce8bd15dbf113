//! What the read models must show, computed independently of the projectors: the whole log
//! read in commit order and folded with the domain's own aggregates (`Account::apply`,
//! `Transfer::apply`), then compared with the read-model tables.

use std::collections::{BTreeMap, HashSet};

use cqrs_es::Aggregate;
use sqlx::{PgPool, Row};
use tally_domain::{Account, AccountEvent, Transfer};
use tally_event_store::{Checkpoint, EventStore, READ_LIMIT_MAX};
use uuid::Uuid;

/// An account as `account_balances` must show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub balance: i64,
    pub held: i64,
    pub status: String,
    pub version: i64,
}

/// One statement line as `account_statement` must show it:
/// `(account, version, direction, amount, balance_after)`.
pub type Line = (Uuid, i64, String, i64, i64);

/// One currency of `ledger_totals`: `(accounts, inflow, outflow, balances, held)`.
pub type Totals = (i64, i64, i64, i64, i64);

/// A transfer as `transfers` must show it: `(status, amount, settled_amount, version)`.
pub type TransferView = (String, i64, i64, i64);

/// Everything the read models must show once they have caught up with the log.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    pub balances: BTreeMap<Uuid, Balance>,
    pub lines: Vec<Line>,
    pub totals: BTreeMap<String, Totals>,
    pub transfers: BTreeMap<Uuid, TransferView>,
    /// The balance of every system account the log's deposits and withdrawals name (the
    /// other side of each: debited by a deposit, credited by a withdrawal).
    pub system: BTreeMap<Uuid, i64>,
    pub events: usize,
}

impl Expected {
    /// Whether the read models shown in `actual` are these (the event count aside).
    pub fn shown_by(&self, actual: &Expected) -> bool {
        self.balances == actual.balances
            && self.lines == actual.lines
            && self.totals == actual.totals
            && self.transfers == actual.transfers
    }
}

/// Folds the whole log. Call it once writes have stopped: the log is read gap-safely, so a
/// transaction still open anywhere in the database (a projector's batch, say) hides the events
/// committed after it began; the read is repeated until it has every event.
pub async fn expected(pool: &PgPool) -> Expected {
    for _ in 0..200 {
        let folded = fold_once(pool).await;
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(pool)
            .await
            .expect("counting events");
        if folded.events as i64 == stored {
            return folded;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the gap-safe read of the log never reached its end");
}

async fn fold_once(pool: &PgPool) -> Expected {
    let store = EventStore::new(pool.clone());
    let mut accounts: BTreeMap<Uuid, (Account, i64)> = BTreeMap::new();
    let mut transfers: BTreeMap<Uuid, (Transfer, i64)> = BTreeMap::new();
    let mut out = Expected::default();
    let mut inflow: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut after = Checkpoint::default();
    loop {
        let page = store.read_all(after, READ_LIMIT_MAX).await.expect("reading the log");
        let Some(last) = page.last() else { break };
        after = last.checkpoint();
        for e in &page {
            out.events += 1;
            match e.stream_type.as_str() {
                "account" => {
                    let event = tally_schemas::decode_account_event(&e.event_type, e.schema_version as u32, &e.payload)
                        .expect("an account event decodes");
                    let (account, version) = accounts.entry(e.stream_id).or_default();
                    let before = account.balance;
                    match &event {
                        AccountEvent::FundsDeposited(d) => {
                            inflow.entry(d.currency.to_string()).or_default().0 += d.amount.get();
                            *out.system.entry(d.system_account).or_default() -= d.amount.get();
                        }
                        AccountEvent::FundsWithdrawn(w) => {
                            inflow.entry(w.currency.to_string()).or_default().1 += w.amount.get();
                            *out.system.entry(w.system_account).or_default() += w.amount.get();
                        }
                        _ => {}
                    }
                    account.apply(event);
                    *version = e.version;
                    let moved = account.balance - before;
                    if moved != 0 {
                        let direction = if moved > 0 { "credit" } else { "debit" };
                        out.lines
                            .push((e.stream_id, e.version, direction.into(), moved.abs(), account.balance));
                    }
                }
                "transfer" => {
                    let event =
                        tally_schemas::decode_transfer_event(&e.event_type, e.schema_version as u32, &e.payload)
                            .expect("a transfer event decodes");
                    let (transfer, version) = transfers.entry(e.stream_id).or_default();
                    transfer.apply(event);
                    *version = e.version;
                }
                // Reservations move no money and fill no read model compared here; they must
                // still decode.
                "external_id" => {
                    tally_schemas::decode_reservation_event(&e.event_type, e.schema_version as u32, &e.payload)
                        .expect("a reservation event decodes");
                }
                // An entry's money moves on its legs' account streams (folded above); its own
                // stream must still decode.
                "entry" => {
                    tally_schemas::decode_entry_event(&e.event_type, e.schema_version as u32, &e.payload)
                        .expect("an entry event decodes");
                }
                other => panic!("unknown stream type {other}"),
            }
        }
    }
    for (id, (account, version)) in &accounts {
        out.balances.insert(
            *id,
            Balance {
                balance: account.balance,
                held: account.held,
                status: account.status.as_str().to_owned(),
                version: *version,
            },
        );
        let currency = account.currency.map(|c| c.to_string()).unwrap_or_default();
        let (flows_in, flows_out) = inflow.get(&currency).copied().unwrap_or_default();
        let totals = out.totals.entry(currency).or_insert((0, flows_in, flows_out, 0, 0));
        totals.0 += 1;
        totals.3 += account.balance;
        totals.4 += account.held;
    }
    for (id, (transfer, version)) in &transfers {
        let status = serde_json::to_value(transfer.status).unwrap();
        out.transfers.insert(
            *id,
            (
                status.as_str().unwrap().to_owned(),
                transfer.amount,
                transfer.posted_amount,
                *version,
            ),
        );
    }
    out.lines.sort();
    out
}

/// What the read models show now, in the same shape as [`Expected`] (`events` is 0).
pub async fn actual(pool: &PgPool) -> Expected {
    let mut out = Expected::default();
    for row in sqlx::query("SELECT account_id, balance, held, status, version, available FROM account_balances")
        .fetch_all(pool)
        .await
        .expect("reading account_balances")
    {
        let balance: i64 = row.get("balance");
        let held: i64 = row.get("held");
        assert_eq!(
            row.get::<i64, _>("available"),
            balance - held,
            "available = balance - held"
        );
        out.balances.insert(
            row.get("account_id"),
            Balance {
                balance,
                held,
                status: row.get("status"),
                version: row.get("version"),
            },
        );
    }
    let lines = sqlx::query(
        "SELECT account_id, version, direction, amount, balance_after FROM account_statement ORDER BY account_id, version",
    )
    .fetch_all(pool)
    .await
    .expect("reading account_statement");
    out.lines = lines
        .iter()
        .map(|r| {
            (
                r.get("account_id"),
                r.get("version"),
                r.get("direction"),
                r.get("amount"),
                r.get("balance_after"),
            )
        })
        .collect();
    for row in sqlx::query(
        "SELECT currency, accounts, inflow, outflow, balances, held, in_transit, balanced FROM ledger_totals",
    )
    .fetch_all(pool)
    .await
    .expect("reading ledger_totals")
    {
        assert!(
            row.get::<bool, _>("balanced"),
            "ledger_totals: balances + in_transit = inflow - outflow"
        );
        if row.get::<i64, _>("in_transit") != 0 {
            // Not caught up yet: one leg of a transfer is still on its way.
            out.totals.insert("in-transit".into(), (0, 0, 0, 0, 0));
        }
        out.totals.insert(
            row.get("currency"),
            (
                row.get("accounts"),
                row.get("inflow"),
                row.get("outflow"),
                row.get("balances"),
                row.get("held"),
            ),
        );
    }
    for row in sqlx::query("SELECT transfer_id, status, amount, settled_amount, version FROM transfers")
        .fetch_all(pool)
        .await
        .expect("reading transfers")
    {
        out.transfers.insert(
            row.get("transfer_id"),
            (
                row.get("status"),
                row.get("amount"),
                row.get("settled_amount"),
                row.get("version"),
            ),
        );
    }
    out
}

/// Lines that appear more than once (by account and version): must be none.
pub fn duplicate_lines(lines: &[Line]) -> Vec<(Uuid, i64)> {
    let mut seen = HashSet::new();
    lines
        .iter()
        .filter(|l| !seen.insert((l.0, l.1)))
        .map(|l| (l.0, l.1))
        .collect()
}

/// A readable difference between what the models show and what they must show.
pub fn diff(actual: &Expected, expected: &Expected) -> String {
    let mut out = Vec::new();
    for (id, want) in &expected.balances {
        match actual.balances.get(id) {
            Some(got) if got == want => {}
            got => out.push(format!("account {id}: got {got:?}, want {want:?}")),
        }
    }
    if actual.balances.len() != expected.balances.len() {
        out.push(format!(
            "{} balance rows, want {}",
            actual.balances.len(),
            expected.balances.len()
        ));
    }
    if actual.lines != expected.lines {
        out.push(format!(
            "{} statement lines, want {}",
            actual.lines.len(),
            expected.lines.len()
        ));
    }
    if actual.totals != expected.totals {
        out.push(format!("totals {:?}, want {:?}", actual.totals, expected.totals));
    }
    let wrong_transfers = expected
        .transfers
        .iter()
        .filter(|(id, want)| actual.transfers.get(id) != Some(want))
        .count();
    if wrong_transfers > 0 || actual.transfers.len() != expected.transfers.len() {
        out.push(format!(
            "{wrong_transfers} transfers differ; {} rows, want {}",
            actual.transfers.len(),
            expected.transfers.len()
        ));
    }
    out.truncate(12);
    out.join("\n")
}

/// Waits up to `timeout` until every read model equals the fold of the whole log, and returns
/// the fold; panics with the last difference and `logs()` if they never do.
pub async fn converged(pool: &PgPool, timeout: std::time::Duration, logs: impl Fn() -> String) -> Expected {
    let expected = expected(pool).await;
    let mut last_diff = String::new();
    let result = tokio::time::timeout(timeout, async {
        loop {
            let actual = actual(pool).await;
            if expected.shown_by(&actual) {
                return;
            }
            last_diff = diff(&actual, &expected);
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "the read models never matched the fold of the log:\n{last_diff}\n{}",
        logs()
    );
    expected
}
