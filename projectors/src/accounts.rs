//! The `accounts` projection: three read models that must agree, so they commit together.
//!
//! - `account_balances`: one row per account (balance, held, available, status, holds).
//! - `account_statement`: one line per posting (a movement of the balance), with the running
//!   balance after it. Keyed by `(account_id, version)`, so a page cursor is stable.
//! - `ledger_totals`: per currency, money that came in from outside (deposits), went out
//!   (withdrawals), the sum of balances and holds. Rows are kept per partition (no hot row
//!   shared by workers); the view sums them. A transfer's two legs may sit in different
//!   partitions and land at different times, so each partition also counts transfers out and
//!   in: `balances + in_transit = inflow - outflow` holds after every commit, and `in_transit`
//!   is 0 once every partition has caught up.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row};
use tally_domain::AccountEvent;
use uuid::Uuid;

use crate::copy::BinaryRows;
use crate::model::{EventMeta, Generation, Projection, TableDef, WriteMode};

pub struct Accounts;

/// A pending hold as the balances row keeps it (the statement needs its counterparty and
/// reference when it is posted). Keyed by transfer id, or by entry id for an entry's debit leg
/// (no counterparty then).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldView {
    pub amount: i64,
    #[serde(default)]
    pub counterparty: Option<Uuid>,
    pub reference: String,
    pub expires_at: DateTime<Utc>,
}

/// One row of `account_balances`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceRow {
    pub account_id: Uuid,
    pub owner: String,
    pub currency: String,
    pub balance: i64,
    pub held: i64,
    pub status: String,
    pub overdraft_limit: i64,
    pub holds: BTreeMap<Uuid, HoldView>,
    /// The client's id for the account (`AccountOpened`), unique in the ledger.
    pub external_id: Option<String>,
    /// The client's labels.
    pub metadata: BTreeMap<String, String>,
    /// Wire names of the account's flags.
    pub flags: Vec<String>,
    pub opened_at: Option<DateTime<Utc>>,
    /// The stream version this row reflects (0: no event applied yet).
    pub version: i64,
    pub last_position: i64,
    pub updated_at: DateTime<Utc>,
}

/// One line of `account_statement`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementLine {
    pub account_id: Uuid,
    pub version: i64,
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
    pub kind: &'static str,
    pub direction: &'static str,
    pub amount: i64,
    pub currency: String,
    pub counterparty: Option<Uuid>,
    pub transfer_id: Option<Uuid>,
    pub reference: String,
    pub balance_after: i64,
    /// The journal entry the line is a leg of, and the leg's index.
    pub entry_id: Option<Uuid>,
    pub leg: Option<i32>,
}

/// Changes to one `(currency, partition)` row of `ledger_totals`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TotalsDelta {
    pub accounts: i64,
    pub inflow: i64,
    pub outflow: i64,
    pub transfers_in: i64,
    pub transfers_out: i64,
    pub balances: i64,
    pub held: i64,
}

/// Statement lines and totals changes of a batch.
#[derive(Debug, Default)]
pub struct AccountEffects {
    pub lines: Vec<StatementLine>,
    pub totals: HashMap<(String, i32), TotalsDelta>,
}

const BALANCES: TableDef = TableDef {
    name: "account_balances",
    ddl: &["CREATE TABLE {table} (
        account_id      uuid        PRIMARY KEY,
        owner           text        NOT NULL,
        currency        text        NOT NULL,
        balance         bigint      NOT NULL,
        held            bigint      NOT NULL,
        available       bigint      NOT NULL,
        status          text        NOT NULL,
        overdraft_limit bigint      NOT NULL,
        holds           jsonb       NOT NULL,
        external_id     text,
        metadata        jsonb       NOT NULL DEFAULT '{}',
        flags           jsonb       NOT NULL DEFAULT '[]',
        opened_at       timestamptz,
        version         bigint      NOT NULL,
        last_position   bigint      NOT NULL,
        updated_at      timestamptz NOT NULL)"],
    view: Some(
        "SELECT account_id, owner, currency, balance, held, available, status, overdraft_limit, holds, \
                external_id, metadata, flags, opened_at, version, last_position, updated_at FROM {table}",
    ),
    // The account listing of the query API (`GET /v1/accounts`): each filter walks its index in
    // account id order, the page order.
    indexes: &[
        ("owner", "(owner, account_id)"),
        ("currency", "(currency, account_id)"),
        ("status", "(status, account_id)"),
        ("external_id", "(external_id, account_id)"),
        // `metadata @> '{"k": "v"}'`: one GIN index serves every key (jsonb_path_ops indexes
        // each key/value pair, and containment is all the listing asks of it).
        ("metadata", "USING gin (metadata jsonb_path_ops)"),
    ],
    // Accounts opened before these existed have none of them: the defaults are their values.
    columns_added: &[
        ("external_id", "text"),
        ("metadata", "jsonb NOT NULL DEFAULT '{}'"),
        ("flags", "jsonb NOT NULL DEFAULT '[]'"),
    ],
};

const STATEMENT: TableDef = TableDef {
    name: "account_statement",
    ddl: &[
        "CREATE TABLE {table} (
        account_id    uuid        NOT NULL,
        version       bigint      NOT NULL,
        position      bigint      NOT NULL,
        recorded_at   timestamptz NOT NULL,
        kind          text        NOT NULL,
        direction     text        NOT NULL CHECK (direction IN ('credit', 'debit')),
        amount        bigint      NOT NULL CHECK (amount > 0),
        currency      text        NOT NULL,
        counterparty  uuid,
        transfer_id   uuid,
        reference     text        NOT NULL,
        balance_after bigint      NOT NULL,
        entry_id      uuid,
        leg           integer,
        PRIMARY KEY (account_id, version))",
        "CREATE INDEX ON {table} (account_id, recorded_at)",
    ],
    view: Some(
        "SELECT account_id, version, position, recorded_at, kind, direction, amount, currency, counterparty, \
                transfer_id, reference, balance_after, entry_id, leg FROM {table}",
    ),
    indexes: &[],
    // Lines written before entries existed are no entry's legs.
    columns_added: &[("entry_id", "uuid"), ("leg", "integer")],
};

const TOTALS: TableDef = TableDef {
    name: "ledger_totals",
    ddl: &["CREATE TABLE {table} (
        currency      text    NOT NULL,
        partition     integer NOT NULL,
        accounts      bigint  NOT NULL,
        inflow        bigint  NOT NULL,
        outflow       bigint  NOT NULL,
        transfers_in  bigint  NOT NULL,
        transfers_out bigint  NOT NULL,
        balances      bigint  NOT NULL,
        held          bigint  NOT NULL,
        PRIMARY KEY (currency, partition))"],
    view: Some(
        "SELECT currency, sum(accounts)::bigint AS accounts, sum(inflow)::bigint AS inflow, \
                sum(outflow)::bigint AS outflow, sum(balances)::bigint AS balances, sum(held)::bigint AS held, \
                sum(transfers_out - transfers_in)::bigint AS in_transit, \
                sum(balances) + sum(transfers_out - transfers_in) = sum(inflow) - sum(outflow) AS balanced, \
                sum(transfers_out)::bigint AS transfers_out, sum(transfers_in)::bigint AS transfers_in \
         FROM {table} GROUP BY currency",
    ),
    indexes: &[],
    columns_added: &[],
};

impl BalanceRow {
    fn empty(account_id: Uuid) -> Self {
        Self {
            account_id,
            owner: String::new(),
            currency: String::new(),
            balance: 0,
            held: 0,
            status: "unopened".into(),
            overdraft_limit: 0,
            holds: BTreeMap::new(),
            external_id: None,
            metadata: BTreeMap::new(),
            flags: Vec::new(),
            opened_at: None,
            version: 0,
            last_position: 0,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }
}

/// A movement of the balance, as it goes on the statement.
struct Posting {
    kind: &'static str,
    /// Signed: positive credits the account.
    delta: i64,
    counterparty: Option<Uuid>,
    transfer_id: Option<Uuid>,
    reference: String,
    /// `(entry_id, leg)` of a journal entry's leg.
    entry: Option<(Uuid, i32)>,
}

impl Posting {
    /// The posting of leg `leg` of entry `entry_id`: `delta` signed, positive credits.
    fn leg(entry_id: Uuid, leg: u32, delta: i64, reference: &str) -> Self {
        Self {
            kind: "entry",
            delta,
            counterparty: None,
            transfer_id: None,
            reference: reference.to_owned(),
            entry: Some((entry_id, leg as i32)),
        }
    }
}

impl BalanceRow {
    /// Adds hold `key` (a transfer's or an entry's id) to `held` and `holds`.
    fn place_hold(&mut self, key: Uuid, hold: HoldView) {
        self.held = self.held.saturating_add(hold.amount);
        self.holds.insert(key, hold);
    }

    /// Removes hold `key` and `amount` from `held`.
    fn drop_hold(&mut self, key: Uuid, amount: i64) {
        self.held = self.held.saturating_sub(amount);
        self.holds.remove(&key);
    }
}

impl Projection for Accounts {
    const NAME: &'static str = "accounts";
    const SHAPE: i32 = 1;
    const STREAM_TYPE: &'static str = tally_domain::account::STREAM_TYPE;
    // A switch replaces the views in this order; a reader joining several of them names them
    // in the same order (the query API's trial balance), or it can deadlock with a switch.
    const TABLES: &'static [TableDef] = &[BALANCES, STATEMENT, TOTALS];

    type Event = AccountEvent;
    type Row = BalanceRow;
    type Effects = AccountEffects;

    fn decode(event_type: &str, schema_version: u32, payload: &str) -> Result<AccountEvent, String> {
        tally_schemas::decode_account_event(event_type, schema_version, payload).map_err(|e| e.to_string())
    }

    fn empty(stream_id: Uuid) -> BalanceRow {
        BalanceRow::empty(stream_id)
    }

    fn version(row: &BalanceRow) -> i64 {
        row.version
    }

    fn stream_id_of(row: &BalanceRow) -> Uuid {
        row.account_id
    }

    fn apply(row: &mut BalanceRow, event: &AccountEvent, meta: &EventMeta, effects: &mut AccountEffects) {
        let mut delta = TotalsDelta::default();
        let mut posting = None;
        match event {
            AccountEvent::AccountOpened(e) => {
                row.owner = e.owner.clone();
                row.currency = e.currency.to_string();
                row.overdraft_limit = e.overdraft_limit;
                row.external_id = e.external_id.clone();
                row.metadata = e.metadata.clone();
                row.flags = e.flags.iter().map(|f| f.as_str().to_owned()).collect();
                row.status = "open".into();
                row.opened_at = Some(meta.recorded_at);
                delta.accounts = 1;
            }
            AccountEvent::FundsDeposited(e) => {
                delta.inflow = e.amount.get();
                posting = Some(Posting {
                    kind: "deposit",
                    delta: e.amount.get(),
                    counterparty: None,
                    transfer_id: None,
                    reference: e.reference.clone(),
                    entry: None,
                });
            }
            AccountEvent::FundsWithdrawn(e) => {
                delta.outflow = e.amount.get();
                posting = Some(Posting {
                    kind: "withdrawal",
                    delta: -e.amount.get(),
                    counterparty: None,
                    transfer_id: None,
                    reference: e.reference.clone(),
                    entry: None,
                });
            }
            AccountEvent::AccountFrozen(_) => row.status = "frozen".into(),
            AccountEvent::AccountUnfrozen(_) => row.status = "open".into(),
            AccountEvent::AccountClosed(_) => row.status = "closed".into(),
            AccountEvent::OverdraftLimitChanged(e) => row.overdraft_limit = e.overdraft_limit,
            AccountEvent::TransferDebited(e) => {
                delta.transfers_out = e.amount.get();
                posting = Some(Posting {
                    kind: "transfer",
                    delta: -e.amount.get(),
                    counterparty: Some(e.counterparty),
                    transfer_id: Some(e.transfer_id),
                    reference: e.reference.clone(),
                    entry: None,
                });
            }
            AccountEvent::TransferCredited(e) => {
                delta.transfers_in = e.amount.get();
                posting = Some(Posting {
                    kind: "transfer",
                    delta: e.amount.get(),
                    counterparty: Some(e.counterparty),
                    transfer_id: Some(e.transfer_id),
                    reference: e.reference.clone(),
                    entry: None,
                });
            }
            AccountEvent::HoldPlaced(e) => {
                delta.held = e.amount.get();
                row.place_hold(
                    e.transfer_id,
                    HoldView {
                        amount: e.amount.get(),
                        counterparty: Some(e.counterparty),
                        reference: e.reference.clone(),
                        expires_at: e.expires_at,
                    },
                );
            }
            // The whole hold goes: `amount` leaves the balance, `released` returns to available.
            AccountEvent::HoldPosted(e) => {
                let removed = e.amount.get().saturating_add(e.released);
                delta.held = -removed;
                delta.transfers_out = e.amount.get();
                row.held = row.held.saturating_sub(removed);
                let hold = row.holds.remove(&e.transfer_id);
                posting = Some(Posting {
                    kind: "transfer",
                    delta: -e.amount.get(),
                    counterparty: hold.as_ref().and_then(|h| h.counterparty),
                    transfer_id: Some(e.transfer_id),
                    reference: hold.map(|h| h.reference).unwrap_or_default(),
                    entry: None,
                });
            }
            AccountEvent::HoldReleased(e) => {
                delta.held = -e.amount.get();
                row.drop_hold(e.transfer_id, e.amount.get());
            }
            // An entry's legs sit in their accounts' partitions: like a transfer's, each is
            // counted as moving through `transit` until every partition has applied its legs.
            AccountEvent::EntryDebited(e) => {
                delta.transfers_out = e.amount.get();
                posting = Some(Posting::leg(e.entry_id, e.leg, -e.amount.get(), &e.reference));
            }
            AccountEvent::EntryHoldPlaced(e) => {
                delta.held = e.amount.get();
                row.place_hold(
                    e.entry_id,
                    HoldView {
                        amount: e.amount.get(),
                        counterparty: None,
                        reference: e.reference.clone(),
                        expires_at: e.expires_at,
                    },
                );
            }
            AccountEvent::EntryHoldPosted(e) => {
                delta.held = -e.amount.get();
                delta.transfers_out = e.amount.get();
                row.drop_hold(e.entry_id, e.amount.get());
                posting = Some(Posting::leg(e.entry_id, e.leg, -e.amount.get(), &e.reference));
            }
            AccountEvent::EntryHoldReleased(e) => {
                delta.held = -e.amount.get();
                row.drop_hold(e.entry_id, e.amount.get());
            }
            AccountEvent::EntryCredited(e) => {
                delta.transfers_in = e.amount.get();
                posting = Some(Posting::leg(e.entry_id, e.leg, e.amount.get(), &e.reference));
            }
        }
        if let Some(p) = posting {
            row.balance = row.balance.saturating_add(p.delta);
            delta.balances = p.delta;
            effects.lines.push(StatementLine {
                account_id: row.account_id,
                version: meta.version,
                position: meta.position,
                recorded_at: meta.recorded_at,
                kind: p.kind,
                direction: if p.delta > 0 { "credit" } else { "debit" },
                amount: p.delta.saturating_abs(),
                currency: row.currency.clone(),
                counterparty: p.counterparty,
                transfer_id: p.transfer_id,
                reference: p.reference,
                balance_after: row.balance,
                entry_id: p.entry.map(|(id, _)| id),
                leg: p.entry.map(|(_, leg)| leg),
            });
        }
        if delta != TotalsDelta::default() {
            let total = effects
                .totals
                .entry((row.currency.clone(), meta.partition))
                .or_default();
            total.accounts += delta.accounts;
            total.inflow += delta.inflow;
            total.outflow += delta.outflow;
            total.transfers_in += delta.transfers_in;
            total.transfers_out += delta.transfers_out;
            total.balances += delta.balances;
            total.held += delta.held;
        }
        row.version = meta.version;
        row.last_position = meta.position;
        row.updated_at = meta.recorded_at;
    }

    async fn load(
        conn: &mut PgConnection,
        generation: &Generation,
        ids: &[Uuid],
    ) -> Result<Vec<BalanceRow>, sqlx::Error> {
        let sql = format!(
            "SELECT account_id, owner, currency, balance, held, status, overdraft_limit, holds::text AS holds, \
                    external_id, metadata::text AS metadata, flags::text AS flags, \
                    opened_at, version, last_position, updated_at \
             FROM {} WHERE account_id = ANY($1) FOR UPDATE",
            generation.table(BALANCES.name)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?;
        rows.iter()
            .map(|row| {
                let holds: String = row.try_get("holds")?;
                let metadata: String = row.try_get("metadata")?;
                let flags: String = row.try_get("flags")?;
                let json = |e: serde_json::Error| sqlx::Error::Decode(Box::new(e));
                Ok(BalanceRow {
                    account_id: row.try_get("account_id")?,
                    owner: row.try_get("owner")?,
                    currency: row.try_get("currency")?,
                    balance: row.try_get("balance")?,
                    held: row.try_get("held")?,
                    status: row.try_get("status")?,
                    overdraft_limit: row.try_get("overdraft_limit")?,
                    holds: serde_json::from_str(&holds).map_err(json)?,
                    external_id: row.try_get("external_id")?,
                    metadata: serde_json::from_str(&metadata).map_err(json)?,
                    flags: serde_json::from_str(&flags).map_err(json)?,
                    opened_at: row.try_get("opened_at")?,
                    version: row.try_get("version")?,
                    last_position: row.try_get("last_position")?,
                    updated_at: row.try_get("updated_at")?,
                })
            })
            .collect()
    }

    async fn store(
        conn: &mut PgConnection,
        generation: &Generation,
        rows: Vec<BalanceRow>,
        effects: AccountEffects,
        mode: WriteMode,
    ) -> Result<(), sqlx::Error> {
        store_balances(conn, &generation.table(BALANCES.name), &rows).await?;
        let statement = generation.table(STATEMENT.name);
        match mode {
            WriteMode::Live => store_lines(conn, &statement, &effects.lines).await?,
            WriteMode::Fresh => copy_lines(conn, &statement, &effects.lines).await?,
        }
        store_totals(conn, &generation.table(TOTALS.name), &effects.totals).await
    }
}

async fn store_balances(conn: &mut PgConnection, table: &str, rows: &[BalanceRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let json = |value: Result<String, serde_json::Error>| value.map_err(|e| sqlx::Error::Encode(Box::new(e)));
    let holds = rows
        .iter()
        .map(|r| json(serde_json::to_string(&r.holds)))
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = rows
        .iter()
        .map(|r| json(serde_json::to_string(&r.metadata)))
        .collect::<Result<Vec<_>, _>>()?;
    let flags = rows
        .iter()
        .map(|r| json(serde_json::to_string(&r.flags)))
        .collect::<Result<Vec<_>, _>>()?;
    // The version guard: a row never moves backwards, whoever writes it.
    let sql = format!(
        "INSERT INTO {table} (account_id, owner, currency, balance, held, available, status, overdraft_limit, holds, \
                              external_id, metadata, flags, opened_at, version, last_position, updated_at) \
         SELECT id, owner, currency, balance, held, balance - held, status, overdraft, holds::jsonb, \
                external_id, metadata::jsonb, flags::jsonb, opened_at, version, last_position, updated_at \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], $7::bigint[], \
                     $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[], $13::bigint[], \
                     $14::bigint[], $15::timestamptz[]) \
              AS u(id, owner, currency, balance, held, status, overdraft, holds, external_id, metadata, flags, \
                   opened_at, version, last_position, updated_at) \
         ON CONFLICT (account_id) DO UPDATE SET owner = EXCLUDED.owner, currency = EXCLUDED.currency, \
             balance = EXCLUDED.balance, held = EXCLUDED.held, available = EXCLUDED.available, \
             status = EXCLUDED.status, overdraft_limit = EXCLUDED.overdraft_limit, holds = EXCLUDED.holds, \
             external_id = EXCLUDED.external_id, metadata = EXCLUDED.metadata, flags = EXCLUDED.flags, \
             opened_at = EXCLUDED.opened_at, version = EXCLUDED.version, last_position = EXCLUDED.last_position, \
             updated_at = EXCLUDED.updated_at \
         WHERE {table}.version < EXCLUDED.version"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(rows.iter().map(|r| r.account_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.owner.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.currency.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.balance).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.held).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.status.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.overdraft_limit).collect::<Vec<_>>())
        .bind(holds)
        .bind(rows.iter().map(|r| r.external_id.clone()).collect::<Vec<_>>())
        .bind(metadata)
        .bind(flags)
        .bind(rows.iter().map(|r| r.opened_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.last_position).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn store_lines(conn: &mut PgConnection, table: &str, lines: &[StatementLine]) -> Result<(), sqlx::Error> {
    if lines.is_empty() {
        return Ok(());
    }
    // A line is written once: `(account_id, version)` is its identity.
    let sql = format!(
        "INSERT INTO {table} ({STATEMENT_COLUMNS}) \
         SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::timestamptz[], $5::text[], $6::text[], \
                              $7::bigint[], $8::text[], $9::uuid[], $10::uuid[], $11::text[], $12::bigint[], \
                              $13::uuid[], $14::int[]) \
         ON CONFLICT (account_id, version) DO NOTHING"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(lines.iter().map(|l| l.account_id).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.version).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.position).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.recorded_at).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.kind).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.direction).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.amount).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.currency.clone()).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.counterparty).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.transfer_id).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.reference.clone()).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.balance_after).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.entry_id).collect::<Vec<_>>())
        .bind(lines.iter().map(|l| l.leg).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The statement's columns, in the order [`copy_lines`] sends them.
const STATEMENT_COLUMNS: &str = "account_id, version, position, recorded_at, kind, direction, amount, currency, \
                                 counterparty, transfer_id, reference, balance_after, entry_id, leg";
/// Fields of a statement line in [`copy_lines`].
const STATEMENT_FIELDS: i16 = 14;
/// A guess of a statement line's size in the binary COPY body, to size the buffer once.
const STATEMENT_LINE_BYTES: usize = 200;

/// [`store_lines`] for a generation only the caller writes ([`WriteMode::Fresh`]): binary COPY,
/// with no conflict to handle.
async fn copy_lines(conn: &mut PgConnection, table: &str, lines: &[StatementLine]) -> Result<(), sqlx::Error> {
    let mut rows = BinaryRows::new(lines.len() * STATEMENT_LINE_BYTES);
    for l in lines {
        rows.row(STATEMENT_FIELDS)
            .uuid(l.account_id)
            .bigint(l.version)
            .bigint(l.position)
            .timestamptz(l.recorded_at)
            .text(l.kind)
            .text(l.direction)
            .bigint(l.amount)
            .text(&l.currency)
            .uuid_or_null(l.counterparty)
            .uuid_or_null(l.transfer_id)
            .text(&l.reference)
            .bigint(l.balance_after)
            .uuid_or_null(l.entry_id)
            .int_or_null(l.leg);
    }
    rows.copy_into(conn, table, STATEMENT_COLUMNS).await?;
    Ok(())
}

async fn store_totals(
    conn: &mut PgConnection,
    table: &str,
    totals: &HashMap<(String, i32), TotalsDelta>,
) -> Result<(), sqlx::Error> {
    if totals.is_empty() {
        return Ok(());
    }
    // In key order, so two transactions adding to the same rows cannot deadlock.
    let sorted: BTreeMap<&(String, i32), &TotalsDelta> = totals.iter().collect();
    let keys: Vec<&(String, i32)> = sorted.keys().copied().collect();
    let deltas: Vec<&TotalsDelta> = sorted.values().copied().collect();
    let sql = format!(
        "INSERT INTO {table} AS t (currency, partition, accounts, inflow, outflow, transfers_in, transfers_out, balances, held) \
         SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], \
                              $7::bigint[], $8::bigint[], $9::bigint[]) \
         ON CONFLICT (currency, partition) DO UPDATE SET accounts = t.accounts + EXCLUDED.accounts, \
             inflow = t.inflow + EXCLUDED.inflow, outflow = t.outflow + EXCLUDED.outflow, \
             transfers_in = t.transfers_in + EXCLUDED.transfers_in, transfers_out = t.transfers_out + EXCLUDED.transfers_out, \
             balances = t.balances + EXCLUDED.balances, held = t.held + EXCLUDED.held"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(keys.iter().map(|k| k.0.clone()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
        .bind(deltas.iter().map(|d| d.accounts).collect::<Vec<_>>())
        .bind(deltas.iter().map(|d| d.inflow).collect::<Vec<_>>())
        .bind(deltas.iter().map(|d| d.outflow).collect::<Vec<_>>())
        .bind(deltas.iter().map(|d| d.transfers_in).collect::<Vec<_>>())
        .bind(deltas.iter().map(|d| d.transfers_out).collect::<Vec<_>>())
        .bind(deltas.iter().map(|d| d.balances).collect::<Vec<_>>())
        .bind(deltas.iter().map(|d| d.held).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_domain::account::{FundsDeposited, FundsWithdrawn};
    use tally_domain::{AmountMinor, Currency};

    fn meta(version: i64) -> EventMeta {
        EventMeta {
            stream_id: Uuid::nil(),
            version,
            position: version * 10,
            recorded_at: DateTime::<Utc>::UNIX_EPOCH,
            partition: 2,
        }
    }

    #[test]
    fn postings_make_statement_lines_with_running_balances_and_totals() {
        let mut row = BalanceRow::empty(Uuid::nil());
        row.currency = "EUR".into();
        row.version = 1;
        let mut effects = AccountEffects::default();
        let eur: Currency = "EUR".parse().unwrap();
        let deposit = AccountEvent::FundsDeposited(FundsDeposited {
            amount: AmountMinor::new(500).unwrap(),
            currency: eur,
            reference: "salary".into(),
            system_account: tally_domain::SystemAccount::World.id(&eur),
        });
        let withdrawal = AccountEvent::FundsWithdrawn(FundsWithdrawn {
            amount: AmountMinor::new(200).unwrap(),
            currency: eur,
            reference: "rent".into(),
            system_account: tally_domain::SystemAccount::World.id(&eur),
        });
        Accounts::apply(&mut row, &deposit, &meta(2), &mut effects);
        Accounts::apply(&mut row, &withdrawal, &meta(3), &mut effects);
        assert_eq!((row.balance, row.version, row.last_position), (300, 3, 30));
        let lines: Vec<_> = effects
            .lines
            .iter()
            .map(|l| (l.version, l.direction, l.amount, l.balance_after))
            .collect();
        assert_eq!(lines, vec![(2, "credit", 500, 500), (3, "debit", 200, 300)]);
        let total = effects.totals[&("EUR".to_string(), 2)];
        assert_eq!((total.inflow, total.outflow, total.balances), (500, 200, 300));
    }
}
