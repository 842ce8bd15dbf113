//! Tally's wire and storage contracts.
//!
//! Every stored and published event payload has a JSON Schema here, one file per
//! `(event_type, schema_version)` under `schemas/events/`, generated from the domain types and
//! checked in. A test fails when the code and the checked-in files drift, so a rename in
//! `domain/` cannot silently change what is stored. Old payload versions are upcast here, on
//! read, never rewritten in the database.
//!
//! The exact bytes covered by the per-stream hash chain are specified in `HASH_CHAIN.md`
//! beside this crate; the message published to NATS in `ENVELOPE.md`.

pub mod envelope;
pub mod legacy;

use std::path::PathBuf;

use schemars::{JsonSchema, Schema, schema_for};
use tally_domain::account::{AccountEvent, AccountOpened, DecodeError, FundsDeposited, FundsWithdrawn};

/// The folder holding the checked-in event schemas.
pub fn events_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("events")
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

/// The schema of every event type at every version the code can read (current ones from the
/// domain types, older ones from [`legacy`]), plus the envelope every published event travels in.
pub fn current_event_schemas() -> Vec<(String, serde_json::Value)> {
    let envelope = (
        schema_file_name("EventEnvelope", envelope::ENVELOPE_VERSION),
        schema_of::<envelope::EventEnvelope>("EventEnvelope", envelope::ENVELOPE_VERSION).to_value(),
    );
    AccountEvent::TYPES
        .iter()
        .map(|&(event_type, version)| {
            let schema = match event_type {
                "AccountOpened" => schema_of::<AccountOpened>(event_type, version),
                "FundsDeposited" => schema_of::<FundsDeposited>(event_type, version),
                "FundsWithdrawn" => schema_of::<FundsWithdrawn>(event_type, version),
                other => unreachable!("AccountEvent::TYPES lists {other} but schemas/ has no type for it"),
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
    let current = AccountEvent::TYPES
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
        return Ok(AccountEvent::from_payload(event_type, payload)?);
    }
    let upcast = legacy::upcast(event_type, schema_version, current, payload)?;
    Ok(AccountEvent::from_payload(event_type, &upcast)?)
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
    fn every_checked_in_schema_file_belongs_to_a_known_event_version() {
        let known: Vec<String> = AccountEvent::TYPES
            .iter()
            .chain(&[("EventEnvelope", envelope::ENVELOPE_VERSION)])
            .flat_map(|&(t, current)| (1..=current).map(move |v| schema_file_name(t, v)))
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
}
