//! The message body the relay publishes to NATS for every event (documented in `ENVELOPE.md`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// Current version of the envelope shape (also sent as the `Tally-Envelope-Version` header).
pub const ENVELOPE_VERSION: u32 = 1;

/// One stored event, as published. `payload` and `metadata` are the exact stored JSON texts.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventEnvelope {
    /// Global position in the log (commit order is `(tx_id, position)`).
    pub position: i64,
    /// The id of the transaction that wrote the event.
    pub tx_id: i64,
    pub stream_type: String,
    pub stream_id: Uuid,
    pub version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    /// RFC 3339 UTC with microseconds, exactly as hashed.
    pub recorded_at: String,
    #[schemars(with = "serde_json::Value")]
    pub payload: Box<RawValue>,
    #[schemars(with = "serde_json::Value")]
    pub metadata: Box<RawValue>,
    /// Hex SHA-256 of the previous event of the stream; absent for version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_hash: Option<String>,
    /// Hex SHA-256 of this event (see `HASH_CHAIN.md`).
    pub hash: String,
}
