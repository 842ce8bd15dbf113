//! Signed checkpoints of the event log, as stored outside the database: one JSON object per
//! line of a checkpoint history file an auditor keeps (`tally audit seal` appends to it), and
//! the same object in the `audit_checkpoints` table and the auditor API's proofs.
//!
//! A checkpoint is a Certificate-Transparency-style signed tree head: the size and root of the
//! Merkle tree over the log in commit order, the last event it covers, when it was sealed, and
//! an Ed25519 signature by a key the database never holds. The exact signed bytes and the tree
//! are specified in `CHECKPOINT.md` beside this crate; the JSON Schema is
//! `checkpoints/SignedCheckpoint.v1.json`.

use serde::{Deserialize, Serialize};

/// The format tag, the first signed field. A change to the signed form is a new tag.
pub const CHECKPOINT_FORMAT: &str = "tally.checkpoint.v1";
/// The schema version of [`SignedCheckpoint`] (`SignedCheckpoint.v<N>.json`).
pub const CHECKPOINT_VERSION: u32 = 1;

/// One sealed checkpoint: a tree head and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedCheckpoint {
    /// `tally.checkpoint.v1`.
    pub format: String,
    /// Events covered: the first `tree_size` events of the log in commit order.
    pub tree_size: u64,
    /// Lowercase hex of the Merkle tree's root (RFC 6962) over those events.
    pub root: String,
    /// The transaction id of the last event covered (0 when `tree_size` is 0).
    pub last_tx_id: i64,
    /// The position of the last event covered (0 when `tree_size` is 0).
    pub last_position: i64,
    /// When it was sealed: RFC 3339 in UTC with six fractional digits, signed as this text.
    pub created_at: String,
    /// Which key signed it: lowercase hex of the first 8 bytes of SHA-256 of the Ed25519 public
    /// key.
    pub key_id: String,
    /// Lowercase hex of the 64-byte Ed25519 signature over the signed form (`CHECKPOINT.md`).
    pub signature: String,
    /// Not signed: the tree's frontier (lowercase hex of the root of each perfect subtree, left
    /// to right), so the next seal reads only newer events. The sealer uses it only after
    /// checking that it gives the signed root. Absent outside the history file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frontier: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_through_its_json_and_rejects_unknown_fields() {
        let checkpoint = SignedCheckpoint {
            format: CHECKPOINT_FORMAT.into(),
            tree_size: 3,
            root: "00".repeat(32),
            last_tx_id: 10,
            last_position: 3,
            created_at: "2026-12-05T06:00:00.000000Z".into(),
            key_id: "0011223344556677".into(),
            signature: "00".repeat(64),
            frontier: vec![],
        };
        let text = serde_json::to_string(&checkpoint).unwrap();
        assert!(!text.contains("frontier"), "{text}");
        assert_eq!(serde_json::from_str::<SignedCheckpoint>(&text).unwrap(), checkpoint);
        let extra = text.replacen('{', r#"{"trusted":true,"#, 1);
        assert!(serde_json::from_str::<SignedCheckpoint>(&extra).is_err());
    }
}
