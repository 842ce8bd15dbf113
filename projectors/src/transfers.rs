//! The `transfers` projection: one row per transfer, with its status and the times of its
//! life cycle (read model `transfers`).

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use tally_domain::TransferEvent;
use uuid::Uuid;

use crate::model::{EventMeta, Generation, Projection, TableDef, WriteMode};

pub struct Transfers;

/// One row of `transfers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRow {
    pub transfer_id: Uuid,
    /// `pending`, `posted`, `voided`, `expired` or `completed` (`unknown` before any event).
    pub status: String,
    pub from_account: Option<Uuid>,
    pub to_account: Option<Uuid>,
    /// The amount requested (held, for a pending transfer).
    pub amount: i64,
    /// The amount that moved: all of it for an immediate transfer, the posted part of a
    /// pending one, 0 while pending or when voided or expired.
    pub settled_amount: i64,
    pub currency: String,
    pub reference: String,
    pub created_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub last_position: i64,
    pub updated_at: DateTime<Utc>,
}

const TRANSFERS: TableDef = TableDef {
    name: "transfers",
    ddl: &[
        "CREATE TABLE {table} (
        transfer_id    uuid        PRIMARY KEY,
        status         text        NOT NULL,
        from_account   uuid,
        to_account     uuid,
        amount         bigint      NOT NULL,
        settled_amount bigint      NOT NULL,
        currency       text        NOT NULL,
        reference      text        NOT NULL,
        created_at     timestamptz,
        expires_at     timestamptz,
        finished_at    timestamptz,
        version        bigint      NOT NULL,
        last_position  bigint      NOT NULL,
        updated_at     timestamptz NOT NULL)",
        "CREATE INDEX ON {table} (from_account, created_at)",
        "CREATE INDEX ON {table} (to_account, created_at)",
    ],
    view: Some(
        "SELECT transfer_id, status, from_account, to_account, amount, settled_amount, currency, reference, \
                created_at, expires_at, finished_at, version, last_position, updated_at FROM {table}",
    ),
    indexes: &[],
    columns_added: &[],
};

impl Projection for Transfers {
    const NAME: &'static str = "transfers";
    const SHAPE: i32 = 1;
    const STREAM_TYPE: &'static str = tally_domain::transfer::STREAM_TYPE;
    const TABLES: &'static [TableDef] = &[TRANSFERS];

    type Event = TransferEvent;
    type Row = TransferRow;
    type Effects = ();

    fn decode(event_type: &str, schema_version: u32, payload: &str) -> Result<TransferEvent, String> {
        tally_schemas::decode_transfer_event(event_type, schema_version, payload).map_err(|e| e.to_string())
    }

    fn empty(transfer_id: Uuid) -> TransferRow {
        TransferRow {
            transfer_id,
            status: "unknown".into(),
            from_account: None,
            to_account: None,
            amount: 0,
            settled_amount: 0,
            currency: String::new(),
            reference: String::new(),
            created_at: None,
            expires_at: None,
            finished_at: None,
            version: 0,
            last_position: 0,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    fn version(row: &TransferRow) -> i64 {
        row.version
    }

    fn stream_id_of(row: &TransferRow) -> Uuid {
        row.transfer_id
    }

    fn apply(row: &mut TransferRow, event: &TransferEvent, meta: &EventMeta, _: &mut ()) {
        match event {
            TransferEvent::TransferCompleted(e) => {
                row.status = "completed".into();
                row.from_account = Some(e.from);
                row.to_account = Some(e.to);
                row.amount = e.amount.get();
                row.settled_amount = e.amount.get();
                row.currency = e.currency.to_string();
                row.reference = e.reference.clone();
                row.created_at = Some(e.completed_at);
                row.finished_at = Some(e.completed_at);
            }
            TransferEvent::TransferPending(e) => {
                row.status = "pending".into();
                row.from_account = Some(e.from);
                row.to_account = Some(e.to);
                row.amount = e.amount.get();
                row.currency = e.currency.to_string();
                row.reference = e.reference.clone();
                row.created_at = Some(e.created_at);
                row.expires_at = Some(e.expires_at);
            }
            TransferEvent::TransferPosted(e) => {
                row.status = "posted".into();
                row.settled_amount = e.amount.get();
                row.finished_at = Some(e.posted_at);
            }
            TransferEvent::TransferVoided(e) => {
                row.status = "voided".into();
                row.finished_at = Some(e.voided_at);
            }
            TransferEvent::TransferExpired(e) => {
                row.status = "expired".into();
                row.finished_at = Some(e.expired_at);
            }
        }
        row.version = meta.version;
        row.last_position = meta.position;
        row.updated_at = meta.recorded_at;
    }

    async fn load(
        conn: &mut PgConnection,
        generation: &Generation,
        ids: &[Uuid],
    ) -> Result<Vec<TransferRow>, sqlx::Error> {
        let sql = format!(
            "SELECT transfer_id, status, from_account, to_account, amount, settled_amount, currency, reference, \
                    created_at, expires_at, finished_at, version, last_position, updated_at \
             FROM {} WHERE transfer_id = ANY($1) FOR UPDATE",
            generation.table(TRANSFERS.name)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(TransferRow {
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
                    last_position: row.try_get("last_position")?,
                    updated_at: row.try_get("updated_at")?,
                })
            })
            .collect()
    }

    async fn store(
        conn: &mut PgConnection,
        generation: &Generation,
        rows: Vec<TransferRow>,
        _: (),
        // A handful of rows per transfer: upserts serve both modes.
        _: WriteMode,
    ) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let table = generation.table(TRANSFERS.name);
        let sql = format!(
            "INSERT INTO {table} (transfer_id, status, from_account, to_account, amount, settled_amount, currency, \
                                  reference, created_at, expires_at, finished_at, version, last_position, updated_at) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::bigint[], $6::bigint[], \
                                  $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[], $11::timestamptz[], \
                                  $12::bigint[], $13::bigint[], $14::timestamptz[]) \
             ON CONFLICT (transfer_id) DO UPDATE SET status = EXCLUDED.status, from_account = EXCLUDED.from_account, \
                 to_account = EXCLUDED.to_account, amount = EXCLUDED.amount, settled_amount = EXCLUDED.settled_amount, \
                 currency = EXCLUDED.currency, reference = EXCLUDED.reference, created_at = EXCLUDED.created_at, \
                 expires_at = EXCLUDED.expires_at, finished_at = EXCLUDED.finished_at, version = EXCLUDED.version, \
                 last_position = EXCLUDED.last_position, updated_at = EXCLUDED.updated_at \
             WHERE {table}.version < EXCLUDED.version"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(rows.iter().map(|r| r.transfer_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.status.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.from_account).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.to_account).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.amount).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.settled_amount).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.currency.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.reference.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.expires_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.finished_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.last_position).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}
