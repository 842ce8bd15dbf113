//! Property tests of the decoders a reader runs on stored and published bytes
//! (`decode_account_event`, `decode_transfer_event`, the `legacy` upcasters, the published
//! `EventEnvelope`): whatever the bytes, a decoder answers with a typed error or a valid event,
//! and never panics or overflows the stack. A stored payload is outside the code's control
//! (an old version, a manual repair, a bug in another writer), so this is the boundary where
//! garbage must be caught.
//!
//! Inputs: arbitrary bytes, arbitrary JSON, valid payloads of every event type and version
//! with one field removed, replaced by arbitrary JSON, or given a number far outside every
//! range, unknown fields, unknown types and versions, and nesting far deeper than any payload.
//! A cargo-fuzz target over the same decoders lives in `fuzz/` (see its README).

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use tally_domain::AMOUNT_MAX_MINOR;
use tally_domain::account::{AccountEvent, DecodeError};
use tally_domain::entry::EntryEvent;
use tally_domain::reservation::ReservationEvent;
use tally_domain::transfer::TransferEvent;
use tally_schemas::envelope::EventEnvelope;
use tally_schemas::{
    UpcastError, current_event_types, decode_account_event, decode_entry_event, decode_reservation_event,
    decode_transfer_event,
};

const ID_A: &str = "01a20a8f-b2ee-73c7-8650-550d6d9d6157";
const ID_B: &str = "01a20a8f-b2ee-73c7-8650-550d6d9d6158";
const ID_C: &str = "01a20a8f-b2ee-73c7-8650-550d6d9d6159";
const AT: &str = "2026-11-05T10:00:00Z";

/// Which decoder reads an event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Account,
    Transfer,
    ExternalId,
    Entry,
}

/// One valid stored payload of every event type at every version the code reads (the current
/// ones and the legacy `AccountOpened` v1).
fn samples() -> Vec<(&'static str, u32, Stream, Value)> {
    use Stream::{Account, Entry, ExternalId, Transfer};
    vec![
        (
            "AccountOpened",
            1,
            Account,
            json!({"account_id": ID_A, "owner": "Ada", "currency": "EUR"}),
        ),
        (
            "AccountOpened",
            2,
            Account,
            json!({"account_id": ID_A, "owner": "Ada", "currency": "EUR", "overdraft_limit": 0}),
        ),
        (
            "AccountOpened",
            3,
            Account,
            json!({"account_id": ID_A, "owner": "Ada", "currency": "EUR", "overdraft_limit": 0,
                   "external_id": "cust-42", "metadata": {"region": "eu"},
                   "flags": ["debits_must_not_exceed_credits"]}),
        ),
        (
            "FundsDeposited",
            1,
            Account,
            json!({"amount": 100, "currency": "EUR", "reference": "salary"}),
        ),
        (
            "FundsWithdrawn",
            1,
            Account,
            json!({"amount": 100, "currency": "EUR", "reference": "rent"}),
        ),
        (
            "FundsDeposited",
            2,
            Account,
            json!({"amount": 100, "currency": "EUR", "reference": "salary",
                   "system_account": "e883fda3-844c-57e3-87d5-c8d28efc0790"}),
        ),
        (
            "FundsWithdrawn",
            2,
            Account,
            json!({"amount": 100, "currency": "EUR", "reference": "rent",
                   "system_account": "e883fda3-844c-57e3-87d5-c8d28efc0790"}),
        ),
        ("AccountFrozen", 1, Account, json!({"reason": "lost card"})),
        ("AccountUnfrozen", 1, Account, json!({})),
        ("AccountClosed", 1, Account, json!({})),
        (
            "OverdraftLimitChanged",
            1,
            Account,
            json!({"overdraft_limit": 500, "previous": 0}),
        ),
        (
            "TransferDebited",
            1,
            Account,
            json!({"transfer_id": ID_A, "amount": 5, "currency": "EUR", "counterparty": ID_B, "reference": "lunch"}),
        ),
        (
            "TransferCredited",
            1,
            Account,
            json!({"transfer_id": ID_A, "amount": 5, "currency": "EUR", "counterparty": ID_B, "reference": "lunch"}),
        ),
        (
            "HoldPlaced",
            1,
            Account,
            json!({"transfer_id": ID_A, "amount": 5, "currency": "EUR", "counterparty": ID_B,
                   "expires_at": AT, "reference": "hotel"}),
        ),
        (
            "HoldPosted",
            1,
            Account,
            json!({"transfer_id": ID_A, "amount": 5, "currency": "EUR", "released": 0}),
        ),
        (
            "HoldReleased",
            1,
            Account,
            json!({"transfer_id": ID_A, "amount": 5, "currency": "EUR", "reason": "voided"}),
        ),
        (
            "TransferCompleted",
            1,
            Transfer,
            json!({"transfer_id": ID_A, "from": ID_B, "to": ID_C, "amount": 5, "currency": "EUR",
                   "reference": "lunch", "completed_at": AT}),
        ),
        (
            "TransferPending",
            1,
            Transfer,
            json!({"transfer_id": ID_A, "from": ID_B, "to": ID_C, "amount": 5, "currency": "EUR",
                   "reference": "hotel", "created_at": AT, "expires_at": AT}),
        ),
        ("TransferPosted", 1, Transfer, json!({"amount": 5, "posted_at": AT})),
        ("TransferVoided", 1, Transfer, json!({"voided_at": AT})),
        ("TransferExpired", 1, Transfer, json!({"expired_at": AT})),
        (
            "ExternalIdReserved",
            1,
            ExternalId,
            json!({"external_id": "cust-42", "account_id": ID_A}),
        ),
        (
            "EntryDebited",
            1,
            Account,
            json!({"entry_id": ID_A, "leg": 0, "amount": 100, "currency": "EUR", "reference": "card"}),
        ),
        (
            "EntryCredited",
            1,
            Account,
            json!({"entry_id": ID_A, "leg": 2, "amount": 3, "currency": "EUR", "reference": "card"}),
        ),
        (
            "EntryHoldPlaced",
            1,
            Account,
            json!({"entry_id": ID_A, "leg": 0, "amount": 100, "currency": "EUR", "expires_at": AT, "reference": "card"}),
        ),
        (
            "EntryHoldPosted",
            1,
            Account,
            json!({"entry_id": ID_A, "leg": 0, "amount": 100, "currency": "EUR", "reference": "card"}),
        ),
        (
            "EntryHoldReleased",
            1,
            Account,
            json!({"entry_id": ID_A, "leg": 0, "amount": 100, "currency": "EUR", "reason": "expired"}),
        ),
        (
            "EntryPending",
            1,
            Entry,
            json!({"entry_id": ID_A, "reference": "card", "created_at": AT, "expires_at": AT, "legs": [
                {"account": ID_B, "direction": "debit", "amount": 100, "currency": "EUR"},
                {"account": ID_C, "direction": "credit", "amount": 100, "currency": "EUR"}]}),
        ),
        ("EntryPosted", 1, Entry, json!({"posted_at": AT})),
        ("EntryVoided", 1, Entry, json!({"voided_at": AT})),
        ("EntryExpired", 1, Entry, json!({"expired_at": AT})),
        (
            "EntryCompleted",
            1,
            Entry,
            json!({"entry_id": ID_A, "reference": "card", "completed_at": AT, "legs": [
                {"account": ID_B, "direction": "debit", "amount": 100, "currency": "EUR"},
                {"account": ID_C, "direction": "credit", "amount": 100, "currency": "EUR"}]}),
        ),
    ]
}

/// A decoded event, whichever stream type it belongs to.
#[derive(Debug)]
enum Decoded {
    Account(AccountEvent),
    Transfer(TransferEvent),
    Reservation(ReservationEvent),
    Entry(EntryEvent),
}

impl Decoded {
    fn type_name(&self) -> &'static str {
        match self {
            Decoded::Account(e) => e.type_name(),
            Decoded::Transfer(e) => e.type_name(),
            Decoded::Reservation(e) => e.type_name(),
            Decoded::Entry(e) => e.type_name(),
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            Decoded::Account(e) => e.schema_version(),
            Decoded::Transfer(e) => e.schema_version(),
            Decoded::Reservation(e) => e.schema_version(),
            Decoded::Entry(e) => e.schema_version(),
        }
    }

    fn to_payload(&self) -> String {
        match self {
            Decoded::Account(e) => e.to_payload(),
            Decoded::Transfer(e) => e.to_payload(),
            Decoded::Reservation(e) => e.to_payload(),
            Decoded::Entry(e) => e.to_payload(),
        }
    }
}

fn decode(stream: Stream, event_type: &str, version: u32, payload: &str) -> Result<Decoded, UpcastError> {
    match stream {
        Stream::Account => decode_account_event(event_type, version, payload).map(Decoded::Account),
        Stream::Transfer => decode_transfer_event(event_type, version, payload).map(Decoded::Transfer),
        Stream::ExternalId => decode_reservation_event(event_type, version, payload).map(Decoded::Reservation),
        Stream::Entry => decode_entry_event(event_type, version, payload).map(Decoded::Entry),
    }
}

/// What every successful decode must satisfy: the event is of the type asked for, and its
/// current stored form reads back as the same event.
fn assert_sound(stream: Stream, event_type: &str, decoded: &Decoded) -> Result<(), TestCaseError> {
    prop_assert_eq!(decoded.type_name(), event_type);
    let stored = decoded.to_payload();
    let again = decode(stream, event_type, decoded.schema_version(), &stored);
    prop_assert!(
        again.is_ok(),
        "the re-encoded {} does not decode: {}",
        event_type,
        stored
    );
    prop_assert_eq!(again.unwrap().to_payload(), stored);
    Ok(())
}

/// A payload of a known type and version that does not decode must say it is malformed (by
/// the domain's decoder, or by the upcaster for an old version), naming the type.
fn assert_malformed(event_type: &str, error: &UpcastError) -> Result<(), TestCaseError> {
    match error {
        UpcastError::Decode(DecodeError::Malformed { event_type: named, .. })
        | UpcastError::Malformed { event_type: named, .. } => {
            prop_assert_eq!(named.as_str(), event_type);
            Ok(())
        }
        other => Err(TestCaseError::fail(format!(
            "{event_type}: a malformed payload gave {other:?}"
        ))),
    }
}

fn known_types() -> Vec<&'static str> {
    current_event_types().map(|(t, _)| t).collect()
}

fn stream_of(event_type: &str) -> Stream {
    if AccountEvent::TYPES.iter().any(|(t, _)| *t == event_type) {
        Stream::Account
    } else if ReservationEvent::TYPES.iter().any(|(t, _)| *t == event_type) {
        Stream::ExternalId
    } else if EntryEvent::TYPES.iter().any(|(t, _)| *t == event_type) {
        Stream::Entry
    } else {
        Stream::Transfer
    }
}

/// Numbers around and far beyond every range an amount or a limit may have.
fn edge_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(AMOUNT_MAX_MINOR)),
        Just(json!(AMOUNT_MAX_MINOR + 1)),
        Just(json!(i64::MIN)),
        Just(json!(i64::MAX)),
        Just(json!(u64::MAX)),
        Just(json!(0.5)),
        Just(json!(f64::MAX)),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        edge_number(),
        // Near-valid strings: ids, currencies, timestamps, and anything at all.
        Just(json!(ID_A)),
        "[A-Za-z]{0,4}".prop_map(Value::String),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z?".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ]
}

/// Field names the decoders know, and some they do not.
fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "account_id",
            "owner",
            "currency",
            "overdraft_limit",
            "amount",
            "reference",
            "reason",
            "transfer_id",
            "counterparty",
            "expires_at",
            "released",
            "from",
            "to",
            "completed_at",
            "created_at",
            "posted_at",
            "voided_at",
            "expired_at",
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            btree_map(json_key(), inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// How a valid payload is damaged.
#[derive(Debug, Clone)]
enum Mutation {
    Remove(prop::sample::Index),
    Replace(prop::sample::Index, Value),
    Add(String, Value),
    Whole(Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Remove),
        (any::<prop::sample::Index>(), json_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        (json_key(), json_value()).prop_map(|(k, v)| Mutation::Add(k, v)),
        json_value().prop_map(Mutation::Whole),
    ]
}

fn apply(mutation: &Mutation, payload: &Map<String, Value>) -> Value {
    let mut payload = payload.clone();
    let key_at = |index: &prop::sample::Index, payload: &Map<String, Value>| {
        (!payload.is_empty()).then(|| payload.keys().nth(index.index(payload.len())).cloned().unwrap())
    };
    match mutation {
        Mutation::Remove(index) => {
            if let Some(key) = key_at(index, &payload) {
                payload.remove(&key);
            }
        }
        Mutation::Replace(index, value) => {
            if let Some(key) = key_at(index, &payload) {
                payload.insert(key, value.clone());
            }
        }
        Mutation::Add(key, value) => {
            payload.insert(key.clone(), value.clone());
        }
        Mutation::Whole(value) => return value.clone(),
    }
    Value::Object(payload)
}

/// A number as JSON text, including ones no Rust integer or float holds (1e400, 40 digits).
fn number_text() -> impl Strategy<Value = String> {
    "-?[0-9]{1,40}(\\.[0-9]{1,6})?([eE][+-]?[0-9]{1,4})?"
}

/// A valid envelope of one sample, as the relay publishes it.
fn envelope_of(event_type: &str, version: u32, payload: &Value) -> Value {
    json!({
        "position": 7, "tx_id": 1234, "stream_type": "account", "stream_id": ID_A, "version": 1,
        "event_id": ID_B, "event_type": event_type, "schema_version": version,
        "recorded_at": "2026-11-05T10:00:00.000000Z", "payload": payload, "metadata": {},
        "hash": "00",
    })
}

#[test]
fn every_sample_is_a_valid_payload_of_its_type() {
    let samples = samples();
    for (event_type, version, stream, payload) in &samples {
        let decoded = decode(*stream, event_type, *version, &payload.to_string())
            .unwrap_or_else(|e| panic!("sample {event_type} v{version} does not decode: {e}"));
        assert_eq!(decoded.type_name(), *event_type);
    }
    for (event_type, current) in current_event_types() {
        assert!(
            samples.iter().any(|(t, v, ..)| *t == event_type && *v == current),
            "no sample of {event_type} v{current}: add one so its decoder is fuzzed"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(
        bytes in vec(any::<u8>(), 0..256),
        event_type in prop_oneof![prop::sample::select(known_types()).prop_map(str::to_owned), any::<String>()],
        version in prop_oneof![0u32..4, any::<u32>()],
    ) {
        let text = String::from_utf8_lossy(&bytes);
        for stream in [Stream::Account, Stream::Transfer] {
            if let Ok(decoded) = decode(stream, &event_type, version, &text) {
                assert_sound(stream, &event_type, &decoded)?;
            }
        }
        let _ = serde_json::from_slice::<EventEnvelope>(&bytes);
    }

    #[test]
    fn damaged_payloads_are_malformed_errors_or_sound_events(
        sample in prop::sample::select(samples()),
        mutation in mutation(),
    ) {
        let (event_type, version, stream, payload) = sample;
        let damaged = apply(&mutation, payload.as_object().unwrap()).to_string();
        match decode(stream, event_type, version, &damaged) {
            Ok(decoded) => assert_sound(stream, event_type, &decoded)?,
            Err(error) => assert_malformed(event_type, &error)?,
        }
    }

    #[test]
    fn numbers_beyond_any_range_are_malformed_errors_or_sound_events(
        sample in prop::sample::select(samples()),
        field in json_key(),
        number in number_text(),
    ) {
        let (event_type, version, stream, payload) = sample;
        // Spliced as text: serde_json::Value cannot hold 1e400 or a 40-digit integer.
        let mut object = payload.as_object().unwrap().clone();
        object.insert(field.clone(), json!("__NUMBER__"));
        let damaged = Value::Object(object).to_string().replace("\"__NUMBER__\"", &number);
        match decode(stream, event_type, version, &damaged) {
            Ok(decoded) => {
                assert_sound(stream, event_type, &decoded)?;
                if field == "amount" && payload.get("amount").is_some() {
                    let amount: f64 = number.parse().unwrap();
                    prop_assert!(
                        amount >= 1.0 && amount <= AMOUNT_MAX_MINOR as f64,
                        "{} accepted amount {}", event_type, number
                    );
                }
            }
            Err(error) => assert_malformed(event_type, &error)?,
        }
    }

    #[test]
    fn versions_the_code_does_not_know_are_unknown_version_errors(
        event_type in prop::sample::select(known_types()),
        above in 1u32..=u32::MAX,
        zero in any::<bool>(),
        payload in json_value(),
    ) {
        let current = current_event_types().find(|(t, _)| *t == event_type).unwrap().1;
        let version = if zero { 0 } else { current.saturating_add(above) };
        prop_assume!(version == 0 || version > current);
        let result = decode(stream_of(event_type), event_type, version, &payload.to_string());
        let is_unknown_version = matches!(
            result,
            Err(UpcastError::UnknownVersion { schema_version, .. }) if schema_version == version
        );
        prop_assert!(is_unknown_version, "{} v{} gave {:?}", event_type, version, result);
    }

    #[test]
    fn types_the_code_does_not_know_are_unknown_type_errors(
        event_type in any::<String>(),
        version in any::<u32>(),
        payload in json_value(),
    ) {
        prop_assume!(!known_types().contains(&event_type.as_str()));
        for stream in [Stream::Account, Stream::Transfer] {
            let result = decode(stream, &event_type, version, &payload.to_string());
            prop_assert!(
                matches!(result, Err(UpcastError::Decode(DecodeError::UnknownType(ref t))) if *t == event_type),
                "{:?} gave {:?}", event_type, result
            );
        }
    }

    #[test]
    fn events_of_another_stream_type_are_unknown_type_errors(
        sample in prop::sample::select(samples()),
    ) {
        let (event_type, version, stream, payload) = sample;
        let others = [Stream::Account, Stream::Transfer, Stream::ExternalId, Stream::Entry];
        for other in others.into_iter().filter(|s| *s != stream) {
            let result = decode(other, event_type, version, &payload.to_string());
            prop_assert!(
                matches!(result, Err(UpcastError::Decode(DecodeError::UnknownType(_)))),
                "{} read as another stream type gave {:?}", event_type, result
            );
        }
    }

    #[test]
    fn damaged_envelopes_never_panic_and_their_payloads_decode_soundly(
        sample in prop::sample::select(samples()),
        mutation in mutation(),
    ) {
        let (event_type, version, stream, payload) = sample;
        let envelope = envelope_of(event_type, version, &payload);
        let damaged = apply(&mutation, envelope.as_object().unwrap()).to_string();
        if let Ok(envelope) = serde_json::from_str::<EventEnvelope>(&damaged) {
            // What a projector does next: decode the payload with the envelope's own type
            // and version, which the damage may have changed.
            let result = decode(
                stream,
                &envelope.event_type,
                envelope.schema_version,
                envelope.payload.get(),
            );
            if let Ok(decoded) = result {
                assert_sound(stream, &envelope.event_type, &decoded)?;
            }
        }
    }
}

#[test]
fn nesting_far_deeper_than_any_payload_is_an_error_not_a_stack_overflow() {
    const DEPTH: usize = 100_000;
    let arrays = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
    let objects = format!("{}1{}", "{\"reason\":".repeat(DEPTH), "}".repeat(DEPTH));
    for (event_type, version, stream, _) in samples() {
        for nested in [&arrays, &objects] {
            let inside = format!("{{\"reason\":{nested},\"amount\":1}}");
            for payload in [nested, &inside] {
                let error = decode(stream, event_type, version, payload).expect_err(event_type);
                assert!(
                    matches!(
                        error,
                        UpcastError::Decode(DecodeError::Malformed { .. }) | UpcastError::Malformed { .. }
                    ),
                    "{event_type} v{version}: {error:?}"
                );
            }
        }
    }
    let envelope = format!("{{\"payload\":{arrays}}}");
    assert!(serde_json::from_str::<EventEnvelope>(&envelope).is_err());
}
