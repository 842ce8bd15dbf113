//! Stored bytes in, a typed error or a sound event out: never a panic, an abort or a stack
//! overflow. The first byte picks the event type (every known one, or an unknown one), the
//! next four the schema version; the rest is the payload. The same bytes are also read as a
//! published envelope. The proptest `schemas/tests/decode_fuzz.rs` checks the same in CI.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_schemas::envelope::EventEnvelope;
use tally_schemas::{current_event_types, decode_account_event, decode_reservation_event, decode_transfer_event};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<EventEnvelope>(data);
    let [selector, v0, v1, v2, v3, payload @ ..] = data else {
        return;
    };
    let types: Vec<&str> = current_event_types().map(|(t, _)| t).collect();
    let event_type = types.get(usize::from(*selector)).copied().unwrap_or("NoSuchEvent");
    let version = u32::from_le_bytes([*v0, *v1, *v2, *v3]) % 4;
    let payload = String::from_utf8_lossy(payload);

    if let Ok(event) = decode_account_event(event_type, version, &payload) {
        // What was accepted must read back as itself in its current stored form.
        let stored = event.to_payload();
        let again = decode_account_event(event_type, event.schema_version(), &stored)
            .expect("a re-encoded account event decodes");
        assert_eq!(again.to_payload(), stored);
    }
    if let Ok(event) = decode_transfer_event(event_type, version, &payload) {
        let stored = event.to_payload();
        let again = decode_transfer_event(event_type, event.schema_version(), &stored)
            .expect("a re-encoded transfer event decodes");
        assert_eq!(again.to_payload(), stored);
    }
    if let Ok(event) = decode_reservation_event(event_type, version, &payload) {
        let stored = event.to_payload();
        let again = decode_reservation_event(event_type, event.schema_version(), &stored)
            .expect("a re-encoded reservation event decodes");
        assert_eq!(again.to_payload(), stored);
    }
});
