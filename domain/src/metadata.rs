//! Who caused an event and why: stored with every event, never part of the domain decision.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The metadata stored beside every event (DESIGN §4).
///
/// Auditors read it to answer "who did this, on whose behalf, because of what".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The authenticated principal that issued the command (token subject), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Ties together every event caused by one business operation, across services.
    pub correlation_id: Uuid,
    /// The id of the command or event that directly caused this event.
    pub causation_id: Uuid,
    /// The client's `Idempotency-Key`, when the command carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// W3C trace context of the request that wrote the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}
