//! The `account_balances` read model: one row per account.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row, Transaction};
use tally_domain::AccountEvent;
use uuid::Uuid;

/// The projection's name in checkpoints and consumer names.
pub const PROJECTION: &str = "account_balances";

/// One row of `account_balances`, as held in memory while a batch is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceRow {
    pub account_id: Uuid,
    pub owner: String,
    pub currency: String,
    pub balance: i64,
    pub held: i64,
    pub status: String,
    /// The stream version this row reflects (0: no event applied yet).
    pub version: i64,
    pub last_position: i64,
    pub updated_at: DateTime<Utc>,
}

impl BalanceRow {
    pub fn empty(account_id: Uuid) -> Self {
        Self {
            account_id,
            owner: String::new(),
            currency: String::new(),
            balance: 0,
            held: 0,
            status: "unopened".into(),
            version: 0,
            last_position: 0,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    /// Applies the event at `version` of the stream. The caller guarantees
    /// `version == self.version + 1` (duplicates dropped, gaps filled first).
    pub fn apply(&mut self, event: &AccountEvent, version: i64, position: i64, recorded_at: DateTime<Utc>) {
        debug_assert_eq!(version, self.version + 1, "events must be applied in stream order");
        match event {
            AccountEvent::AccountOpened(e) => {
                self.owner = e.owner.clone();
                self.currency = e.currency.to_string();
                self.status = "open".into();
            }
            AccountEvent::FundsDeposited(e) => self.balance = self.balance.saturating_add(e.amount.get()),
            AccountEvent::FundsWithdrawn(e) => self.balance = self.balance.saturating_sub(e.amount.get()),
            AccountEvent::AccountFrozen(_) => self.status = "frozen".into(),
            AccountEvent::AccountUnfrozen(_) => self.status = "open".into(),
            AccountEvent::AccountClosed(_) => self.status = "closed".into(),
            AccountEvent::TransferDebited(e) => self.balance = self.balance.saturating_sub(e.amount.get()),
            AccountEvent::TransferCredited(e) => self.balance = self.balance.saturating_add(e.amount.get()),
            AccountEvent::HoldPlaced(e) => self.held = self.held.saturating_add(e.amount.get()),
            // The whole hold goes: `amount` leaves the balance, `released` returns to available.
            AccountEvent::HoldPosted(e) => {
                self.balance = self.balance.saturating_sub(e.amount.get());
                self.held = self.held.saturating_sub(e.amount.get().saturating_add(e.released));
            }
            AccountEvent::HoldReleased(e) => self.held = self.held.saturating_sub(e.amount.get()),
        }
        self.version = version;
        self.last_position = position;
        self.updated_at = recorded_at;
    }
}

/// Loads (and locks) the rows of `ids`; missing ones come back empty.
pub async fn load_for_update(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, BalanceRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT account_id, owner, currency, balance, held, status, version, last_position, updated_at \
         FROM account_balances WHERE account_id = ANY($1) FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut out: HashMap<Uuid, BalanceRow> = ids.iter().map(|id| (*id, BalanceRow::empty(*id))).collect();
    for row in rows {
        let r = BalanceRow {
            account_id: row.try_get("account_id")?,
            owner: row.try_get("owner")?,
            currency: row.try_get("currency")?,
            balance: row.try_get("balance")?,
            held: row.try_get("held")?,
            status: row.try_get("status")?,
            version: row.try_get("version")?,
            last_position: row.try_get("last_position")?,
            updated_at: row.try_get("updated_at")?,
        };
        out.insert(r.account_id, r);
    }
    Ok(out)
}

/// Writes the changed rows in one statement. The `version` guard means a row never moves
/// backwards, whoever writes it.
pub async fn store(
    tx: &mut Transaction<'_, Postgres>,
    rows: &HashMap<Uuid, BalanceRow>,
    changed: &HashSet<Uuid>,
) -> Result<(), sqlx::Error> {
    if changed.is_empty() {
        return Ok(());
    }
    let rows: Vec<&BalanceRow> = changed.iter().filter_map(|id| rows.get(id)).collect();
    sqlx::query(
        "INSERT INTO account_balances (account_id, owner, currency, balance, held, status, version, last_position, updated_at) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], \
                              $7::bigint[], $8::bigint[], $9::timestamptz[]) \
         ON CONFLICT (account_id) DO UPDATE SET owner = EXCLUDED.owner, currency = EXCLUDED.currency, \
             balance = EXCLUDED.balance, held = EXCLUDED.held, status = EXCLUDED.status, version = EXCLUDED.version, \
             last_position = EXCLUDED.last_position, updated_at = EXCLUDED.updated_at \
         WHERE account_balances.version < EXCLUDED.version",
    )
    .bind(rows.iter().map(|r| r.account_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.owner.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.currency.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.balance).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.held).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.status.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.last_position).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
