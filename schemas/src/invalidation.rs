//! Cache invalidations: what a projector publishes, after each committed batch, so every
//! query API instance drops cached rows older than what was just written.
//!
//! Core NATS (not JetStream: a missed message only costs a cache entry, which is why a query
//! API clears its cache whenever its connection drops), on
//! [`invalidation_subject`]`(prefix, projection)`, body JSON:
//! `{"projection": "accounts", "rows": [{"id": "<uuid>", "version": 7}, ...]}`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One committed batch of one projection: every read-model row it changed, at its new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Invalidation {
    /// The projection that wrote the rows (`accounts`, `transfers`).
    pub projection: String,
    pub rows: Vec<InvalidatedRow>,
}

/// A row keyed by the stream it folds, and the stream version it now reflects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InvalidatedRow {
    pub id: Uuid,
    pub version: i64,
}

/// Rows per message: a projector batch larger than this publishes several messages, each
/// well under NATS's default 1 MiB payload limit (a row is about 60 bytes of JSON).
pub const INVALIDATION_ROWS_MAX: usize = 4_096;

/// The subject of `projection`'s invalidations. Next to the events' subject prefix but not
/// under it, so the JetStream stream (`<prefix>.>`) does not store them.
pub fn invalidation_subject(subject_prefix: &str, projection: &str) -> String {
    format!("{subject_prefix}-invalidations.{projection}")
}

/// What a query API subscribes to: every projection's invalidations.
pub fn invalidation_wildcard(subject_prefix: &str) -> String {
    format!("{subject_prefix}-invalidations.>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalidation_round_trips_through_its_json() {
        let invalidation = Invalidation {
            projection: "accounts".into(),
            rows: vec![InvalidatedRow {
                id: Uuid::now_v7(),
                version: 7,
            }],
        };
        let text = serde_json::to_string(&invalidation).unwrap();
        assert_eq!(serde_json::from_str::<Invalidation>(&text).unwrap(), invalidation);
    }

    #[test]
    fn invalidations_are_not_under_the_events_subjects() {
        let subject = invalidation_subject("tally.events", "accounts");
        assert_eq!(subject, "tally.events-invalidations.accounts");
        assert!(!subject.starts_with("tally.events."));
    }
}
