//! The events the append workloads write: the shape of a real deposit, so the raw limit and
//! the event store move the same bytes.

use uuid::Uuid;

/// Stream type of benchmark streams: not `account`, so nothing mistakes them for real
/// accounts (a projector would reject a deposit on an account never opened).
pub const STREAM_TYPE: &str = "bench";
/// Event type and schema version of a deposit, as the command API writes it.
pub const EVENT_TYPE: &str = "FundsDeposited";
pub const SCHEMA_VERSION: i32 = 1;
/// How many streams each append worker owns and visits in turn. Streams grow as they would
/// under deposits, and no two workers ever touch the same stream.
pub const STREAMS_PER_WORKER: usize = 100;

/// A deposit's payload, as stored.
pub fn payload() -> String {
    r#"{"amount":1,"currency":"EUR","reference":""}"#.to_owned()
}

/// Metadata as the command API stores it for a request with an `Idempotency-Key`.
pub fn metadata() -> String {
    format!(
        r#"{{"correlation_id":"{}","causation_id":"{}","idempotency_key":"{}"}}"#,
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::new_v4()
    )
}

/// The streams one worker owns, visited round-robin, with the version each stands at.
#[derive(Debug, Clone)]
pub struct OwnStreams {
    streams: Vec<(Uuid, i64)>,
    next: usize,
}

impl OwnStreams {
    pub fn new(count: usize) -> Self {
        assert!(count > 0, "a worker needs at least one stream");
        Self {
            streams: (0..count).map(|_| (Uuid::now_v7(), 0)).collect(),
            next: 0,
        }
    }

    /// The stream to write next and the version it stands at (0: empty).
    pub fn current(&self) -> (Uuid, i64) {
        self.streams[self.next]
    }

    /// Moves on to the next stream; the current one is one version further if `appended`.
    pub fn advance(&mut self, appended: bool) {
        if appended {
            self.streams[self.next].1 += 1;
        }
        self.next = (self.next + 1) % self.streams.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_streams_are_visited_in_turn_and_only_grow_when_appended() {
        let mut streams = OwnStreams::new(2);
        let (first, v0) = streams.current();
        streams.advance(true);
        let (second, _) = streams.current();
        streams.advance(false);

        assert_ne!(first, second);
        assert_eq!(v0, 0);
        assert_eq!(streams.current(), (first, 1));
        streams.advance(true);
        assert_eq!(streams.current(), (second, 0));
    }

    #[test]
    fn sample_payload_and_metadata_are_json() {
        serde_json::from_str::<serde_json::Value>(&payload()).unwrap();
        let metadata: serde_json::Value = serde_json::from_str(&metadata()).unwrap();
        assert!(metadata["idempotency_key"].is_string());
    }
}
