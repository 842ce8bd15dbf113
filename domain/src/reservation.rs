//! The external-id stream: one stream per external id, which makes an account's `external_id`
//! unique in the ledger.
//!
//! Opening an account with an external id appends `ExternalIdReserved` to the stream
//! [`stream_id`]`(external_id)` at expected version 0, in the same transaction as the account's
//! `AccountOpened`. Two accounts racing for one id conflict on that stream, so at most one
//! opens; the other is refused with `external-id-taken`, naming the account that holds it. The
//! reservation is never released (closing the account keeps it), so an external id always
//! names one account, as an auditor reading the log expects.
//!
//! The set-validation-by-stream pattern keeps the rule in the log itself: no table outside
//! the log has to agree with it, and a rebuild from the log finds the same owner.

use cqrs_es::DomainEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::account::DecodeError;

/// The stream type under which external-id reservations are stored and published.
pub const STREAM_TYPE: &str = "external_id";

/// The namespace of the name-based (v5) stream ids of external ids. Fixed forever: changing it
/// would let an external id be reserved twice.
const NAMESPACE: Uuid = Uuid::from_u128(0x6d1c_2f3e_9a4b_4c5d_8e7f_0a1b_2c3d_4e5f);

/// The id of the stream that reserves `external_id`.
pub fn stream_id(external_id: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, external_id.as_bytes())
}

/// `external_id` now names `account_id`, for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalIdReserved {
    /// The client's id for the account, as it sent it.
    pub external_id: String,
    /// The account it names.
    pub account_id: Uuid,
}

/// Events on an external-id stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReservationEvent {
    ExternalIdReserved(ExternalIdReserved),
}

impl ReservationEvent {
    /// Every reservation event type with its current schema version (see `AccountEvent::TYPES`).
    pub const TYPES: &'static [(&'static str, u32)] = &[("ExternalIdReserved", 1)];

    pub fn type_name(&self) -> &'static str {
        match self {
            ReservationEvent::ExternalIdReserved(_) => "ExternalIdReserved",
        }
    }

    /// The schema version this code writes for the event's type.
    pub fn schema_version(&self) -> u32 {
        match self {
            ReservationEvent::ExternalIdReserved(_) => 1,
        }
    }

    /// The exact JSON text stored in the `payload` column.
    pub fn to_payload(&self) -> String {
        match self {
            ReservationEvent::ExternalIdReserved(e) => {
                serde_json::to_string(e).expect("a reservation always serializes")
            }
        }
    }

    /// Decodes a payload already in the current schema version.
    pub fn from_payload(event_type: &str, payload: &str) -> Result<Self, DecodeError> {
        match event_type {
            "ExternalIdReserved" => serde_json::from_str(payload)
                .map(ReservationEvent::ExternalIdReserved)
                .map_err(DecodeError::malformed(event_type)),
            other => Err(DecodeError::UnknownType(other.to_owned())),
        }
    }
}

impl DomainEvent for ReservationEvent {
    fn event_type(&self) -> String {
        self.type_name().to_owned()
    }

    fn event_version(&self) -> String {
        self.schema_version().to_string()
    }
}

/// The state of one external-id stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The account the id names; `None` while the stream is empty.
    pub account_id: Option<Uuid>,
}

impl Reservation {
    /// Folds one event in.
    pub fn apply(&mut self, event: ReservationEvent) {
        match event {
            ReservationEvent::ExternalIdReserved(e) => self.account_id = Some(e.account_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_external_id_has_one_stream_and_another_id_another() {
        assert_eq!(stream_id("cust-42"), stream_id("cust-42"));
        assert_ne!(stream_id("cust-42"), stream_id("cust-43"));
        assert_ne!(
            stream_id("cust-42"),
            stream_id("CUST-42"),
            "external ids are case-sensitive"
        );
    }

    #[test]
    fn a_reservation_round_trips_through_its_payload() {
        let event = ReservationEvent::ExternalIdReserved(ExternalIdReserved {
            external_id: "cust-42".into(),
            account_id: Uuid::from_u128(7),
        });
        let back = ReservationEvent::from_payload(event.type_name(), &event.to_payload()).unwrap();
        assert_eq!(back, event);
        let mut state = Reservation::default();
        state.apply(back);
        assert_eq!(state.account_id, Some(Uuid::from_u128(7)));
    }
}
