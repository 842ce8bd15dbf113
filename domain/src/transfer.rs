//! The transfer stream: one stream per transfer (stream id = transfer id) recording its
//! lifecycle.
//!
//! The money itself moves on the account streams (`TransferDebited`/`TransferCredited`,
//! `HoldPlaced`/`HoldPosted`/`HoldReleased`); this stream exists so that
//! - a client-chosen transfer id is used once: creating a transfer appends at expected version 0;
//! - post, void and expire find the source and destination accounts by transfer id;
//! - two racing posts/voids/expiries of one hold conflict on this stream, so at most one wins.
//!
//! Life cycle: not created → `completed` (immediate transfer, final), or not created →
//! `pending` → `posted` | `voided` | `expired` (each final). Decisions are in [`crate::ledger`].

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::account::DecodeError;
use crate::money::{AmountMinor, Currency};

/// The stream type under which transfer events are stored and published.
pub const STREAM_TYPE: &str = "transfer";
/// Shortest accepted lifetime of a pending transfer's hold, in seconds.
pub const EXPIRES_IN_S_MIN: i64 = 1;
/// Longest accepted lifetime of a pending transfer's hold, in seconds (30 days, like the
/// longest card authorizations).
pub const EXPIRES_IN_S_MAX: i64 = 30 * 24 * 60 * 60;

/// Where a transfer is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    /// The stream is empty: no transfer with this id.
    #[default]
    NotCreated,
    /// Immediate transfer done: both legs booked. Final.
    Completed,
    /// Amount held on the source until posted, voided or expired.
    Pending,
    /// Hold posted (fully or partly) to the destination. Final.
    Posted,
    /// Hold released by a client. Final.
    Voided,
    /// Hold released by the expiry worker after its deadline. Final.
    Expired,
}

/// An immediate transfer: both legs were booked in the same transaction as this event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferCompleted {
    pub transfer_id: Uuid,
    /// The account debited.
    pub from: Uuid,
    /// The account credited.
    pub to: Uuid,
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
    pub completed_at: DateTime<Utc>,
}

/// A pending (two-phase) transfer: `amount` is held on `from` until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferPending {
    pub transfer_id: Uuid,
    /// The account whose funds are held.
    pub from: Uuid,
    /// The account credited if the hold is posted.
    pub to: Uuid,
    /// The amount held: the most that can be posted.
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
    pub created_at: DateTime<Utc>,
    /// From this instant the hold can no longer be posted; the expiry worker releases it.
    pub expires_at: DateTime<Utc>,
}

/// The pending transfer was posted: `amount` moved to the destination, the rest of the hold was
/// released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferPosted {
    /// The amount moved (at most the amount held).
    pub amount: AmountMinor,
    pub posted_at: DateTime<Utc>,
}

/// The pending transfer was voided by a client: its hold was released, no money moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferVoided {
    pub voided_at: DateTime<Utc>,
}

/// The pending transfer passed its deadline and the expiry worker released its hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferExpired {
    pub expired_at: DateTime<Utc>,
}

/// Everything that can happen to a transfer. Stored like account events: the inner struct as
/// JSON, the type name in `event_type`, its shape versioned in `schemas/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferEvent {
    TransferCompleted(TransferCompleted),
    TransferPending(TransferPending),
    TransferPosted(TransferPosted),
    TransferVoided(TransferVoided),
    TransferExpired(TransferExpired),
}

impl TransferEvent {
    /// Every transfer event type with its current schema version (see `AccountEvent::TYPES`).
    pub const TYPES: &'static [(&'static str, u32)] = &[
        ("TransferCompleted", 1),
        ("TransferPending", 1),
        ("TransferPosted", 1),
        ("TransferVoided", 1),
        ("TransferExpired", 1),
    ];

    pub fn type_name(&self) -> &'static str {
        match self {
            TransferEvent::TransferCompleted(_) => "TransferCompleted",
            TransferEvent::TransferPending(_) => "TransferPending",
            TransferEvent::TransferPosted(_) => "TransferPosted",
            TransferEvent::TransferVoided(_) => "TransferVoided",
            TransferEvent::TransferExpired(_) => "TransferExpired",
        }
    }

    /// The schema version this code writes for the event's type.
    pub fn schema_version(&self) -> u32 {
        crate::account::version_in(Self::TYPES, self.type_name())
    }

    /// The exact JSON text stored in the `payload` column.
    pub fn to_payload(&self) -> String {
        let result = match self {
            TransferEvent::TransferCompleted(e) => serde_json::to_string(e),
            TransferEvent::TransferPending(e) => serde_json::to_string(e),
            TransferEvent::TransferPosted(e) => serde_json::to_string(e),
            TransferEvent::TransferVoided(e) => serde_json::to_string(e),
            TransferEvent::TransferExpired(e) => serde_json::to_string(e),
        };
        // Strings, integers, uuids and timestamps only: serialization cannot fail.
        result.expect("transfer events always serialize")
    }

    /// Decodes a payload already in the *current* schema version (upcasting happens in
    /// `tally-schemas` before this is called).
    pub fn from_payload(event_type: &str, payload: &str) -> Result<Self, DecodeError> {
        let malformed = DecodeError::malformed(event_type);
        let event = match event_type {
            "TransferCompleted" => serde_json::from_str(payload).map(TransferEvent::TransferCompleted),
            "TransferPending" => serde_json::from_str(payload).map(TransferEvent::TransferPending),
            "TransferPosted" => serde_json::from_str(payload).map(TransferEvent::TransferPosted),
            "TransferVoided" => serde_json::from_str(payload).map(TransferEvent::TransferVoided),
            "TransferExpired" => serde_json::from_str(payload).map(TransferEvent::TransferExpired),
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        };
        event.map_err(malformed)
    }
}

impl DomainEvent for TransferEvent {
    fn event_type(&self) -> String {
        self.type_name().to_owned()
    }

    fn event_version(&self) -> String {
        self.schema_version().to_string()
    }
}

/// The state of one transfer, folded from its stream. `Transfer::default()` is a transfer that
/// was never created (an empty stream).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub status: TransferStatus,
    pub transfer_id: Uuid,
    pub from: Uuid,
    pub to: Uuid,
    /// The amount transferred (completed) or held (pending), in minor units; 0 while not
    /// created.
    pub amount: i64,
    /// `None` only while not created.
    pub currency: Option<Currency>,
    pub reference: String,
    /// The amount that reached `to`: `amount` once completed, the posted amount once posted,
    /// otherwise 0.
    pub posted_amount: i64,
    /// Deadline of a pending transfer's hold.
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: Option<DateTime<Utc>>,
    /// When it reached a final status.
    pub finished_at: Option<DateTime<Utc>>,
}

impl Transfer {
    /// Version of the serialized shape of `Transfer`, should it be cached or snapshotted; bump
    /// it whenever the shape changes.
    pub const SNAPSHOT_VERSION: u32 = 1;

    /// Folds one event into the state. Total: never panics, whatever the sequence.
    pub fn apply(&mut self, event: TransferEvent) {
        match event {
            TransferEvent::TransferCompleted(e) => {
                self.status = TransferStatus::Completed;
                self.transfer_id = e.transfer_id;
                self.from = e.from;
                self.to = e.to;
                self.amount = e.amount.get();
                self.currency = Some(e.currency);
                self.reference = e.reference;
                self.posted_amount = e.amount.get();
                self.created_at = Some(e.completed_at);
                self.finished_at = Some(e.completed_at);
            }
            TransferEvent::TransferPending(e) => {
                self.status = TransferStatus::Pending;
                self.transfer_id = e.transfer_id;
                self.from = e.from;
                self.to = e.to;
                self.amount = e.amount.get();
                self.currency = Some(e.currency);
                self.reference = e.reference;
                self.expires_at = Some(e.expires_at);
                self.created_at = Some(e.created_at);
            }
            TransferEvent::TransferPosted(e) => {
                self.status = TransferStatus::Posted;
                self.posted_amount = e.amount.get();
                self.finished_at = Some(e.posted_at);
            }
            TransferEvent::TransferVoided(e) => {
                self.status = TransferStatus::Voided;
                self.finished_at = Some(e.voided_at);
            }
            TransferEvent::TransferExpired(e) => {
                self.status = TransferStatus::Expired;
                self.finished_at = Some(e.expired_at);
            }
        }
    }

    /// The folded state of a whole stream.
    pub fn from_events(events: impl IntoIterator<Item = TransferEvent>) -> Self {
        let mut transfer = Transfer::default();
        for event in events {
            transfer.apply(event);
        }
        transfer
    }
}
