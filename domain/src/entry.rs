//! The journal-entry stream: one stream per entry (stream id = entry id) recording a balanced
//! movement with many legs (ADR 0004).
//!
//! The money moves on the account streams (`EntryDebited`/`EntryCredited`, one event per leg,
//! appended in the same transaction as this stream's event); this stream exists so that
//! - a client-chosen entry id is used once: creating an entry appends at expected version 0;
//! - `GET /v1/entries/{id}` and auditors find every leg of an entry in one place.
//!
//! Life cycle: not created → `completed` (immediate, final), or not created → `pending` →
//! `posted` | `voided` | `expired` (each final). Decisions are in [`crate::journal`].

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::account::DecodeError;
use crate::money::{AmountMinor, Currency};

/// The stream type under which entry events are stored and published.
pub const STREAM_TYPE: &str = "entry";
/// Fewest legs of an entry: one debit and one credit.
pub const LEGS_MIN: usize = 2;
/// Most legs of an entry. Each leg appends to its own account stream in the entry's one
/// transaction, so this bounds the transaction (and the streams the writer locks for it).
pub const LEGS_MAX: usize = 64;

/// Which way a leg moves money: a debit takes it out of the account (its balance goes down), a
/// credit puts it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Debit,
    Credit,
}

impl Direction {
    /// The wire name: `debit` or `credit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Debit => "debit",
            Direction::Credit => "credit",
        }
    }
}

/// One leg of an entry, as recorded: the account, the direction, the amount and the account's
/// currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Leg {
    pub account: Uuid,
    pub direction: Direction,
    pub amount: AmountMinor,
    pub currency: Currency,
}

/// A pending entry was accepted: every debit leg's amount is held on its account until the
/// entry is posted (every leg moves), voided or expires (the holds are released).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryPending {
    pub entry_id: Uuid,
    /// In the order the client sent them; a leg's index is its place here.
    pub legs: Vec<Leg>,
    pub reference: String,
    pub created_at: DateTime<Utc>,
    /// After this instant the entry can no longer be posted; the expiry worker releases it.
    pub expires_at: DateTime<Utc>,
}

/// A pending entry was posted: every leg moved. Final.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryPosted {
    pub posted_at: DateTime<Utc>,
}

/// A pending entry was voided by a client: its holds were released, nothing moved. Final.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryVoided {
    pub voided_at: DateTime<Utc>,
}

/// A pending entry passed its deadline: its holds were released, nothing moved. Final.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryExpired {
    pub expired_at: DateTime<Utc>,
}

/// An entry was booked: every leg moved, in one transaction. Final.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryCompleted {
    pub entry_id: Uuid,
    /// In the order the client sent them; a leg's index is its place here.
    pub legs: Vec<Leg>,
    pub reference: String,
    pub completed_at: DateTime<Utc>,
}

/// Everything that can happen to an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryEvent {
    EntryCompleted(EntryCompleted),
    EntryPending(EntryPending),
    EntryPosted(EntryPosted),
    EntryVoided(EntryVoided),
    EntryExpired(EntryExpired),
}

impl EntryEvent {
    /// Every entry event type with its current schema version (see `AccountEvent::TYPES`).
    pub const TYPES: &'static [(&'static str, u32)] = &[
        ("EntryCompleted", 1),
        ("EntryPending", 1),
        ("EntryPosted", 1),
        ("EntryVoided", 1),
        ("EntryExpired", 1),
    ];

    pub fn type_name(&self) -> &'static str {
        match self {
            EntryEvent::EntryCompleted(_) => "EntryCompleted",
            EntryEvent::EntryPending(_) => "EntryPending",
            EntryEvent::EntryPosted(_) => "EntryPosted",
            EntryEvent::EntryVoided(_) => "EntryVoided",
            EntryEvent::EntryExpired(_) => "EntryExpired",
        }
    }

    /// The schema version this code writes for the event's type.
    pub fn schema_version(&self) -> u32 {
        crate::account::version_in(Self::TYPES, self.type_name())
    }

    /// The exact JSON text stored in the `payload` column.
    pub fn to_payload(&self) -> String {
        let result = match self {
            EntryEvent::EntryCompleted(e) => serde_json::to_string(e),
            EntryEvent::EntryPending(e) => serde_json::to_string(e),
            EntryEvent::EntryPosted(e) => serde_json::to_string(e),
            EntryEvent::EntryVoided(e) => serde_json::to_string(e),
            EntryEvent::EntryExpired(e) => serde_json::to_string(e),
        };
        result.expect("entry events always serialize")
    }

    /// Decodes a payload already in the *current* schema version.
    pub fn from_payload(event_type: &str, payload: &str) -> Result<Self, DecodeError> {
        let malformed = DecodeError::malformed(event_type);
        let event = match event_type {
            "EntryCompleted" => serde_json::from_str(payload).map(EntryEvent::EntryCompleted),
            "EntryPending" => serde_json::from_str(payload).map(EntryEvent::EntryPending),
            "EntryPosted" => serde_json::from_str(payload).map(EntryEvent::EntryPosted),
            "EntryVoided" => serde_json::from_str(payload).map(EntryEvent::EntryVoided),
            "EntryExpired" => serde_json::from_str(payload).map(EntryEvent::EntryExpired),
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        };
        event.map_err(malformed)
    }
}

impl DomainEvent for EntryEvent {
    fn event_type(&self) -> String {
        self.type_name().to_owned()
    }

    fn event_version(&self) -> String {
        self.schema_version().to_string()
    }
}

/// Where an entry is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryStatus {
    /// The stream is empty: no entry with this id.
    #[default]
    NotCreated,
    /// Every leg booked at once. Final.
    Completed,
    /// The debit legs' amounts held until posted, voided or expired.
    Pending,
    /// A pending entry whose every leg moved. Final.
    Posted,
    /// A pending entry released by a client. Final.
    Voided,
    /// A pending entry released at its deadline. Final.
    Expired,
}

impl EntryStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryStatus::NotCreated => "not_created",
            EntryStatus::Completed => "completed",
            EntryStatus::Pending => "pending",
            EntryStatus::Posted => "posted",
            EntryStatus::Voided => "voided",
            EntryStatus::Expired => "expired",
        }
    }
}

/// The state of one entry, folded from its stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub status: EntryStatus,
    pub entry_id: Uuid,
    pub legs: Vec<Leg>,
    pub reference: String,
    pub created_at: Option<DateTime<Utc>>,
    /// A pending entry's deadline.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it became final (completed, posted, voided or expired).
    pub finished_at: Option<DateTime<Utc>>,
}

impl Entry {
    /// Folds one event into the state. Total: never panics, whatever the sequence.
    pub fn apply(&mut self, event: EntryEvent) {
        match event {
            EntryEvent::EntryCompleted(e) => {
                self.status = EntryStatus::Completed;
                self.entry_id = e.entry_id;
                self.legs = e.legs;
                self.reference = e.reference;
                self.created_at = Some(e.completed_at);
                self.finished_at = Some(e.completed_at);
            }
            EntryEvent::EntryPending(e) => {
                self.status = EntryStatus::Pending;
                self.entry_id = e.entry_id;
                self.legs = e.legs;
                self.reference = e.reference;
                self.created_at = Some(e.created_at);
                self.expires_at = Some(e.expires_at);
            }
            EntryEvent::EntryPosted(e) => {
                self.status = EntryStatus::Posted;
                self.finished_at = Some(e.posted_at);
            }
            EntryEvent::EntryVoided(e) => {
                self.status = EntryStatus::Voided;
                self.finished_at = Some(e.voided_at);
            }
            EntryEvent::EntryExpired(e) => {
                self.status = EntryStatus::Expired;
                self.finished_at = Some(e.expired_at);
            }
        }
    }
}
