//! Tally's wire and storage contracts.
//!
//! Every stored and published event payload has a JSON Schema here, one file per
//! `(event_type, schema_version)` under `schemas/events/`, generated from the domain types and
//! checked in. A test fails when the code and the checked-in files drift, so a rename in
//! `domain/` cannot silently change what is stored. Old payload versions are upcast here, on
//! read, never rewritten in the database.
//!
//! The exact bytes covered by the per-stream hash chain are specified in `HASH_CHAIN.md`
//! beside this crate; the message published to NATS in `ENVELOPE.md`; the signed checkpoints
//! of the log (`checkpoint`) in `CHECKPOINT.md`, their JSON Schema under `checkpoints/`.

pub mod checkpoint;
pub mod envelope;
pub mod invalidation;
pub mod legacy;

use std::path::PathBuf;

use schemars::{JsonSchema, Schema, schema_for};
use tally_domain::account::{
    AccountClosed, AccountEvent, AccountFrozen, AccountOpened, AccountUnfrozen, DecodeError, EntryCredited,
    EntryDebited, EntryHoldPlaced, EntryHoldPosted, EntryHoldReleased, FundsDeposited, FundsWithdrawn, HoldPlaced,
    HoldPosted, HoldReleased, OverdraftLimitChanged, TransferCredited, TransferDebited,
};
use tally_domain::entry::{EntryCompleted, EntryEvent, EntryExpired, EntryPending, EntryPosted, EntryVoided};
use tally_domain::reservation::{ExternalIdReserved, ReservationEvent};
use tally_domain::transfer::{
    TransferCompleted, TransferEvent, TransferExpired, TransferPending, TransferPosted, TransferVoided,
};

/// The folder holding the checked-in event schemas.
pub fn events_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("events")
}

/// The folder holding the checked-in schema of the signed checkpoint.
pub fn checkpoints_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("checkpoints")
}

/// The schema of the signed checkpoint (`checkpoints/SignedCheckpoint.v<N>.json`): a stored
/// format, kept outside the database by auditors, so it is a contract like the events.
pub fn checkpoint_schema() -> (String, serde_json::Value) {
    let version = checkpoint::CHECKPOINT_VERSION;
    let mut schema = schema_for!(checkpoint::SignedCheckpoint);
    let file = schema_file_name("SignedCheckpoint", version);
    schema.insert(
        "$id".into(),
        format!("https://tally.dev/schemas/checkpoints/{file}").into(),
    );
    schema.insert("title".into(), "SignedCheckpoint".into());
    (file, schema.to_value())
}

/// The file name of a schema: `<EventType>.v<version>.json`.
pub fn schema_file_name(event_type: &str, schema_version: u32) -> String {
    format!("{event_type}.v{schema_version}.json")
}

pub(crate) fn schema_of<T: JsonSchema>(event_type: &str, schema_version: u32) -> Schema {
    let mut schema = schema_for!(T);
    schema.insert(
        "$id".into(),
        format!(
            "https://tally.dev/schemas/events/{}",
            schema_file_name(event_type, schema_version)
        )
        .into(),
    );
    schema.insert("title".into(), event_type.into());
    schema
}

/// Every stored event type of every stream type, with its current schema version. Event type
/// names are unique across stream types.
pub fn current_event_types() -> impl Iterator<Item = (&'static str, u32)> {
    AccountEvent::TYPES
        .iter()
        .chain(TransferEvent::TYPES)
        .chain(ReservationEvent::TYPES)
        .chain(EntryEvent::TYPES)
        .copied()
}

/// The schema of every event type at every version the code can read (current ones from the
/// domain types, older ones from [`legacy`]), plus the envelope every published event travels in.
pub fn current_event_schemas() -> Vec<(String, serde_json::Value)> {
    let envelope = (
        schema_file_name("EventEnvelope", envelope::ENVELOPE_VERSION),
        schema_of::<envelope::EventEnvelope>("EventEnvelope", envelope::ENVELOPE_VERSION).to_value(),
    );
    current_event_types()
        .map(|(event_type, version)| {
            let schema = match event_type {
                "AccountOpened" => schema_of::<AccountOpened>(event_type, version),
                "FundsDeposited" => schema_of::<FundsDeposited>(event_type, version),
                "FundsWithdrawn" => schema_of::<FundsWithdrawn>(event_type, version),
                "AccountFrozen" => schema_of::<AccountFrozen>(event_type, version),
                "AccountUnfrozen" => schema_of::<AccountUnfrozen>(event_type, version),
                "AccountClosed" => schema_of::<AccountClosed>(event_type, version),
                "OverdraftLimitChanged" => schema_of::<OverdraftLimitChanged>(event_type, version),
                "TransferDebited" => schema_of::<TransferDebited>(event_type, version),
                "TransferCredited" => schema_of::<TransferCredited>(event_type, version),
                "HoldPlaced" => schema_of::<HoldPlaced>(event_type, version),
                "HoldPosted" => schema_of::<HoldPosted>(event_type, version),
                "HoldReleased" => schema_of::<HoldReleased>(event_type, version),
                "TransferCompleted" => schema_of::<TransferCompleted>(event_type, version),
                "TransferPending" => schema_of::<TransferPending>(event_type, version),
                "TransferPosted" => schema_of::<TransferPosted>(event_type, version),
                "TransferVoided" => schema_of::<TransferVoided>(event_type, version),
                "TransferExpired" => schema_of::<TransferExpired>(event_type, version),
                "ExternalIdReserved" => schema_of::<ExternalIdReserved>(event_type, version),
                "EntryDebited" => schema_of::<EntryDebited>(event_type, version),
                "EntryCredited" => schema_of::<EntryCredited>(event_type, version),
                "EntryCompleted" => schema_of::<EntryCompleted>(event_type, version),
                "EntryPending" => schema_of::<EntryPending>(event_type, version),
                "EntryPosted" => schema_of::<EntryPosted>(event_type, version),
                "EntryVoided" => schema_of::<EntryVoided>(event_type, version),
                "EntryExpired" => schema_of::<EntryExpired>(event_type, version),
                "EntryHoldPlaced" => schema_of::<EntryHoldPlaced>(event_type, version),
                "EntryHoldPosted" => schema_of::<EntryHoldPosted>(event_type, version),
                "EntryHoldReleased" => schema_of::<EntryHoldReleased>(event_type, version),
                other => unreachable!("the domain lists event type {other} but schemas/ has no type for it"),
            };
            (schema_file_name(event_type, version), schema.to_value())
        })
        .chain(std::iter::once(envelope))
        .chain(legacy::schemas())
        .collect()
}

/// Renders a schema exactly as it is checked in (pretty JSON, trailing newline), so the
/// drift test compares bytes and `cargo xtask schemas` writes the same bytes.
pub fn render(schema: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(schema).expect("a JSON value always serializes");
    text.push('\n');
    text
}

/// Why a stored payload could not be turned into a current domain event.
#[derive(Debug, thiserror::Error)]
pub enum UpcastError {
    #[error("{event_type} has no schema version {schema_version} (current is {current})")]
    UnknownVersion {
        event_type: String,
        schema_version: u32,
        current: u32,
    },
    #[error("cannot upcast {event_type} v{schema_version}: {reason}")]
    Malformed {
        event_type: String,
        schema_version: u32,
        reason: String,
    },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Decodes a stored account event payload of any known schema version into the current domain
/// event, upcasting older shapes first.
///
/// Upcasters are pure functions from one version's JSON to the next; they are added here when a
/// payload shape changes, together with the new schema file (the old file stays).
pub fn decode_account_event(event_type: &str, schema_version: u32, payload: &str) -> Result<AccountEvent, UpcastError> {
    let payload = to_current(AccountEvent::TYPES, event_type, schema_version, payload)?;
    Ok(AccountEvent::from_payload(event_type, &payload)?)
}

/// Decodes a stored transfer event payload (stream type `transfer`) of any known schema
/// version into the current domain event, upcasting older shapes first.
pub fn decode_transfer_event(
    event_type: &str,
    schema_version: u32,
    payload: &str,
) -> Result<TransferEvent, UpcastError> {
    let payload = to_current(TransferEvent::TYPES, event_type, schema_version, payload)?;
    Ok(TransferEvent::from_payload(event_type, &payload)?)
}

/// Decodes a stored event of an external-id stream (stream type `external_id`) into the
/// current domain event.
pub fn decode_reservation_event(
    event_type: &str,
    schema_version: u32,
    payload: &str,
) -> Result<ReservationEvent, UpcastError> {
    let payload = to_current(ReservationEvent::TYPES, event_type, schema_version, payload)?;
    Ok(ReservationEvent::from_payload(event_type, &payload)?)
}

/// Decodes a stored event of a journal-entry stream (stream type `entry`) into the current
/// domain event.
pub fn decode_entry_event(event_type: &str, schema_version: u32, payload: &str) -> Result<EntryEvent, UpcastError> {
    let payload = to_current(EntryEvent::TYPES, event_type, schema_version, payload)?;
    Ok(EntryEvent::from_payload(event_type, &payload)?)
}

/// The payload in the current schema version of its type (`types` lists the current versions
/// of one stream type's events), borrowed when it already is.
fn to_current<'a>(
    types: &[(&str, u32)],
    event_type: &str,
    schema_version: u32,
    payload: &'a str,
) -> Result<std::borrow::Cow<'a, str>, UpcastError> {
    let current = types
        .iter()
        .find(|(name, _)| *name == event_type)
        .map(|(_, v)| *v)
        .ok_or_else(|| DecodeError::UnknownType(event_type.to_owned()))?;
    if schema_version == 0 || schema_version > current {
        return Err(UpcastError::UnknownVersion {
            event_type: event_type.to_owned(),
            schema_version,
            current,
        });
    }
    if schema_version == current {
        return Ok(payload.into());
    }
    Ok(legacy::upcast(event_type, schema_version, current, payload)?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_schemas_match_the_code() {
        let mut drifted = Vec::new();
        for (file, schema) in current_event_schemas() {
            let path = events_dir().join(&file);
            let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
            if checked_in != render(&schema) {
                drifted.push(file);
            }
        }
        assert!(
            drifted.is_empty(),
            "event schemas drifted from the code: {drifted:?}. If the change is intended, add a new \
             schema version with an upcaster, then run `cargo xtask schemas` to write the files."
        );
    }

    #[test]
    fn the_checked_in_checkpoint_schema_matches_the_code() {
        let (file, schema) = checkpoint_schema();
        let checked_in = std::fs::read_to_string(checkpoints_dir().join(&file)).unwrap_or_default();
        assert!(
            checked_in == render(&schema),
            "schemas/checkpoints/{file} drifted from the code: a change to a stored format is a new \
             version; run `cargo xtask schemas` to write the file."
        );
    }

    #[test]
    fn every_checked_in_schema_file_belongs_to_a_known_event_version() {
        let known: Vec<String> = current_event_types()
            .chain([("EventEnvelope", envelope::ENVELOPE_VERSION)])
            .flat_map(|(t, current)| (1..=current).map(move |v| schema_file_name(t, v)))
            .collect();
        for entry in std::fs::read_dir(events_dir()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                known.contains(&name),
                "schemas/events/{name} matches no event type and version"
            );
        }
    }

    #[test]
    fn an_unknown_schema_version_is_a_typed_error() {
        let err = decode_account_event("FundsDeposited", 99, "{}").unwrap_err();
        assert!(matches!(err, UpcastError::UnknownVersion { schema_version: 99, .. }));
    }

    #[test]
    fn garbage_payloads_are_typed_errors_not_panics() {
        for payload in ["", "null", "[]", "{\"amount\":-5}", "\u{0}", "{\"amount\":1e400}"] {
            assert!(decode_account_event("FundsDeposited", 1, payload).is_err());
        }
        assert!(decode_account_event("NoSuchEvent", 1, "{}").is_err());
    }

    #[test]
    fn every_event_type_of_every_stream_has_a_checked_in_schema() {
        let files: Vec<String> = current_event_schemas().into_iter().map(|(file, _)| file).collect();
        for (event_type, version) in current_event_types() {
            let file = schema_file_name(event_type, version);
            assert!(files.contains(&file), "no schema generated for {file}");
            assert!(
                events_dir().join(&file).exists(),
                "schemas/events/{file} is not checked in"
            );
        }
    }

    #[test]
    fn event_type_names_are_unique_across_stream_types() {
        let mut names: Vec<&str> = current_event_types().map(|(t, _)| t).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
    }

    #[test]
    fn transfer_events_decode_from_their_stored_form() {
        let payload = r#"{"transfer_id":"01a20a8f-b2ee-73c7-8650-550d6d9d6157","from":"01a20a8f-b2ee-73c7-8650-550d6d9d6158","to":"01a20a8f-b2ee-73c7-8650-550d6d9d6159","amount":250,"currency":"EUR","reference":"card","created_at":"2026-11-05T10:00:00Z","expires_at":"2026-11-05T11:00:00Z"}"#;

        let event = decode_transfer_event("TransferPending", 1, payload).unwrap();

        let TransferEvent::TransferPending(pending) = &event else {
            panic!("decoded into the wrong type: {event:?}");
        };
        assert_eq!(pending.amount.get(), 250);
        assert_eq!(event.to_payload(), payload, "the stored form is stable");
    }

    #[test]
    fn account_and_transfer_events_do_not_decode_as_each_other() {
        assert!(matches!(
            decode_transfer_event("FundsDeposited", 1, "{}"),
            Err(UpcastError::Decode(DecodeError::UnknownType(_)))
        ));
        assert!(matches!(
            decode_account_event("TransferPosted", 1, "{}"),
            Err(UpcastError::Decode(DecodeError::UnknownType(_)))
        ));
        assert!(matches!(
            decode_transfer_event("TransferPosted", 2, "{}"),
            Err(UpcastError::UnknownVersion { .. })
        ));
    }

    #[test]
    fn new_account_event_payloads_are_validated_on_decode() {
        for (event_type, payload) in [
            (
                "HoldPosted",
                r#"{"transfer_id":"01a20a8f-b2ee-73c7-8650-550d6d9d6157","amount":0,"currency":"EUR","released":0}"#,
            ),
            (
                "HoldReleased",
                r#"{"transfer_id":"01a20a8f-b2ee-73c7-8650-550d6d9d6157","amount":5,"currency":"EUR","reason":"stolen"}"#,
            ),
            ("AccountUnfrozen", r#"{"why":"x"}"#),
        ] {
            assert!(
                decode_account_event(event_type, 1, payload).is_err(),
                "{event_type}: {payload}"
            );
        }
        assert!(decode_account_event("AccountUnfrozen", 1, "{}").is_ok());
    }
}
