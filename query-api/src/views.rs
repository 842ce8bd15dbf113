//! What the query API serves, and how each is read from a read model.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::cache::Versioned;

/// An account as its read model shows it (`GET /v1/accounts/{id}`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AccountView {
    pub account_id: Uuid,
    #[schema(example = "Ada")]
    pub owner: String,
    /// ISO 4217 code.
    #[schema(example = "EUR")]
    pub currency: String,
    /// Minor units on the account.
    pub balance: i64,
    /// Minor units reserved by pending transfers (holds).
    pub held: i64,
    /// `balance - held`: what a debit may use (plus the overdraft limit).
    pub available: i64,
    /// `open`, `frozen` or `closed`.
    #[schema(example = "open")]
    pub status: String,
    /// How far below zero `available` may go, in minor units.
    pub overdraft_limit: i64,
    /// The client's id for the account, unique in the ledger (`null`: none given).
    pub external_id: Option<String>,
    /// The client's labels.
    pub metadata: BTreeMap<String, String>,
    /// Bounds on the balance: `debits_must_not_exceed_credits`, `credits_must_not_exceed_debits`.
    pub flags: Vec<String>,
    /// The account stream version this view reflects.
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

impl Versioned for AccountView {
    fn version(&self) -> i64 {
        self.version
    }
}

/// The columns of `account_balances` an [`AccountView`] is read from.
pub(crate) const ACCOUNT_COLUMNS: &str = "account_id, owner, currency, balance, held, status, overdraft_limit, external_id, \
     metadata::text AS metadata, flags::text AS flags, version, updated_at";

impl AccountView {
    pub(crate) fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let balance: i64 = row.try_get("balance")?;
        let held: i64 = row.try_get("held")?;
        let json = |column: &str| -> Result<String, sqlx::Error> { row.try_get(column) };
        let decode = |e: serde_json::Error| sqlx::Error::Decode(Box::new(e));
        Ok(Self {
            account_id: row.try_get("account_id")?,
            owner: row.try_get("owner")?,
            currency: row.try_get("currency")?,
            balance,
            held,
            available: balance - held,
            status: row.try_get("status")?,
            overdraft_limit: row.try_get("overdraft_limit")?,
            external_id: row.try_get("external_id")?,
            metadata: serde_json::from_str(&json("metadata")?).map_err(decode)?,
            flags: serde_json::from_str(&json("flags")?).map_err(decode)?,
            version: row.try_get("version")?,
            updated_at: row.try_get("updated_at")?,
        })
    }

    /// The account's row in `account_balances`, if the projection has it.
    pub async fn load(pool: &PgPool, account_id: Uuid) -> Result<Option<Self>, sqlx::Error> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM account_balances WHERE account_id = $1");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(account_id)
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(Self::from_row)
            .transpose()
    }
}

/// A transfer as its read model shows it (`GET /v1/transfers/{id}`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TransferView {
    pub transfer_id: Uuid,
    /// `completed`, `pending`, `posted`, `voided` or `expired`.
    #[schema(example = "completed")]
    pub status: String,
    pub from_account: Option<Uuid>,
    pub to_account: Option<Uuid>,
    /// Minor units transferred, or held while pending.
    pub amount: i64,
    /// Minor units that reached `to_account` (the posted amount for a posted hold).
    pub settled_amount: i64,
    #[schema(example = "EUR")]
    pub currency: String,
    pub reference: String,
    pub created_at: Option<DateTime<Utc>>,
    /// When a pending transfer's hold expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it reached a final status.
    pub finished_at: Option<DateTime<Utc>>,
    /// The transfer stream version this view reflects.
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

impl Versioned for TransferView {
    fn version(&self) -> i64 {
        self.version
    }
}

/// The columns of `transfers` a [`TransferView`] reads.
pub(crate) const TRANSFER_COLUMNS: &str = "transfer_id, status, from_account, to_account, amount, settled_amount, \
     currency, reference, created_at, expires_at, finished_at, version, updated_at";

impl TransferView {
    pub(crate) fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            transfer_id: row.try_get("transfer_id")?,
            status: row.try_get("status")?,
            from_account: row.try_get("from_account")?,
            to_account: row.try_get("to_account")?,
            amount: row.try_get("amount")?,
            settled_amount: row.try_get("settled_amount")?,
            currency: row.try_get("currency")?,
            reference: row.try_get("reference")?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            finished_at: row.try_get("finished_at")?,
            version: row.try_get("version")?,
            updated_at: row.try_get("updated_at")?,
        })
    }

    /// The transfer's row in `transfers`, if the projection has it.
    pub async fn load(pool: &PgPool, transfer_id: Uuid) -> Result<Option<Self>, sqlx::Error> {
        let sql = format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = $1");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(transfer_id)
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(Self::from_row)
            .transpose()
    }
}

/// One line of an account statement: one posting, at the account version it produced.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StatementLine {
    /// The account version this posting produced (lines are in this order).
    pub version: i64,
    /// The event's position in the global log.
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
    /// `deposit`, `withdrawal`, `transfer` or `entry` (a leg of a journal entry).
    #[schema(example = "deposit")]
    pub kind: String,
    /// `credit` (money in) or `debit` (money out).
    #[schema(example = "credit")]
    pub direction: String,
    /// Minor units, always positive; `direction` gives the sign.
    pub amount: i64,
    #[schema(example = "EUR")]
    pub currency: String,
    /// The other account of a transfer.
    pub counterparty: Option<Uuid>,
    pub transfer_id: Option<Uuid>,
    pub reference: String,
    /// The balance right after this posting.
    pub balance_after: i64,
    /// The journal entry this line is a leg of (`GET /v1/entries/{id}`), and the leg's index.
    pub entry_id: Option<Uuid>,
    pub leg: Option<i32>,
}

impl StatementLine {
    pub(crate) fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            version: row.try_get("version")?,
            position: row.try_get("position")?,
            recorded_at: row.try_get("recorded_at")?,
            kind: row.try_get("kind")?,
            direction: row.try_get("direction")?,
            amount: row.try_get("amount")?,
            currency: row.try_get("currency")?,
            counterparty: row.try_get("counterparty")?,
            transfer_id: row.try_get("transfer_id")?,
            reference: row.try_get("reference")?,
            balance_after: row.try_get("balance_after")?,
            entry_id: row.try_get("entry_id")?,
            leg: row.try_get("leg")?,
        })
    }
}
