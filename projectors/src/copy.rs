//! Rows for `COPY … FROM STDIN (FORMAT binary)`: the fastest way into a table Postgres has,
//! used by rebuilds to fill a generation that nothing else writes yet (see
//! [`crate::model::Store::Fresh`]).
//!
//! The format (PostgreSQL manual, "COPY", binary format): a signature, flags and a header
//! extension length, then per row a 16-bit field count and per field a 32-bit length (-1:
//! NULL) and the value in the type's binary send format, all big-endian; a 16-bit -1 ends it.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// `PGCOPY\n\377\r\n\0`, then flags (no OIDs) and a header extension of length 0.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The field count that ends the data.
const TRAILER: i16 = -1;
/// Microseconds from the Unix epoch to Postgres's (2000-01-01 00:00:00 UTC).
const POSTGRES_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

/// A binary COPY body being built, row by row.
#[derive(Debug)]
pub struct BinaryRows {
    bytes: Vec<u8>,
    rows: u64,
}

impl BinaryRows {
    /// `capacity_bytes`: a guess of the body's size, to spare reallocations.
    pub fn new(capacity_bytes: usize) -> Self {
        let mut bytes = Vec::with_capacity(capacity_bytes.max(HEADER.len() + 2));
        bytes.extend_from_slice(HEADER);
        Self { bytes, rows: 0 }
    }

    /// Starts a row of `fields` values; exactly that many field calls must follow.
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.bytes.extend_from_slice(&fields.to_be_bytes());
        self.rows += 1;
        self
    }

    fn field(&mut self, value: &[u8]) -> &mut Self {
        let len = i32::try_from(value.len()).expect("a COPY field is under 2 GiB");
        self.bytes.extend_from_slice(&len.to_be_bytes());
        self.bytes.extend_from_slice(value);
        self
    }

    pub fn null(&mut self) -> &mut Self {
        self.bytes.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    pub fn bigint(&mut self, value: i64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    /// A 4-byte `integer`, or NULL.
    pub fn int_or_null(&mut self, value: Option<i32>) -> &mut Self {
        match value {
            Some(value) => self.field(&value.to_be_bytes()),
            None => self.null(),
        }
    }

    pub fn uuid(&mut self, value: Uuid) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub fn uuid_or_null(&mut self, value: Option<Uuid>) -> &mut Self {
        match value {
            Some(value) => self.uuid(value),
            None => self.null(),
        }
    }

    pub fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    /// A `timestamptz`: microseconds since 2000-01-01 UTC.
    pub fn timestamptz(&mut self, value: DateTime<Utc>) -> &mut Self {
        self.bigint(value.timestamp_micros() - POSTGRES_EPOCH_UNIX_US)
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Sends the rows with `COPY {table} ({columns}) FROM STDIN (FORMAT binary)` on `conn`,
    /// in its transaction.
    pub async fn copy_into(mut self, conn: &mut PgConnection, table: &str, columns: &str) -> Result<u64, sqlx::Error> {
        if self.rows == 0 {
            return Ok(0);
        }
        self.bytes.extend_from_slice(&TRAILER.to_be_bytes());
        let mut copy = conn
            .copy_in_raw(&format!("COPY {table} ({columns}) FROM STDIN (FORMAT binary)"))
            .await?;
        if let Err(error) = copy.send(self.bytes).await {
            let _ = copy.abort("sending the rows failed").await;
            return Err(error);
        }
        copy.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_its_field_count_then_length_prefixed_big_endian_values() {
        let mut rows = BinaryRows::new(0);
        rows.row(3).bigint(1).null().text("ab");
        let body = &rows.bytes[HEADER.len()..];
        let expected: Vec<u8> = [
            &3i16.to_be_bytes()[..],
            &8i32.to_be_bytes(),
            &1i64.to_be_bytes(),
            &(-1i32).to_be_bytes(),
            &2i32.to_be_bytes(),
            b"ab",
        ]
        .concat();
        assert_eq!(body, expected.as_slice());
        assert_eq!(rows.rows(), 1);
    }

    #[test]
    fn timestamps_count_microseconds_from_the_postgres_epoch() {
        let mut rows = BinaryRows::new(0);
        let postgres_epoch = DateTime::parse_from_rfc3339("2000-01-01T00:00:01.000002Z")
            .unwrap()
            .with_timezone(&Utc);
        rows.row(1).timestamptz(postgres_epoch);
        let value = &rows.bytes[HEADER.len() + 2 + 4..];
        assert_eq!(value, 1_000_002i64.to_be_bytes());
    }
}
