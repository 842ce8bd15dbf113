//! The projectors apply only events of the log. NATS lets only the relay publish events
//! (`tally_event_store::nats_users`), and each delivered event is checked as well, so that a
//! message that is not the log's (a forged or altered publish, a misconfigured server) is
//! refused: dead-lettered with the reason, acknowledged, never applied. The partition goes on:
//! the read model stays the fold of the log, which does not hold that message.
//!
//! An event passes when its fields hash to the hash it states (`relay::envelope_hash`) and the
//! log holds that same hash for the same stream and version at its position: one indexed
//! query per batch (`events_position`), in the batch's transaction.

use std::collections::HashMap;

use sqlx::PgConnection;
use tally_event_store::hash::Hash;
use uuid::Uuid;

/// What a delivered event says it is.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    pub position: i64,
    pub stream_id: Uuid,
    pub version: i64,
    /// The hash it states, if its own fields hash to it; otherwise why not.
    pub hash: Result<Hash, String>,
}

/// An event of the batch that is not the log's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// Its index in the batch.
    pub index: usize,
    pub reason: String,
}

/// The claims that the log does not bear out, with why, in batch order.
pub(crate) async fn refusals(conn: &mut PgConnection, claims: &[Claim]) -> Result<Vec<Refusal>, sqlx::Error> {
    let positions: Vec<i64> = claims.iter().map(|c| c.position).collect();
    let stored: Vec<(i64, Uuid, i64, Vec<u8>)> =
        sqlx::query_as("SELECT position, stream_id, version, hash FROM events WHERE position = ANY($1)")
            .bind(&positions)
            .fetch_all(&mut *conn)
            .await?;
    Ok(judge(claims, &stored))
}

/// [`refusals`] given the log's rows at the claimed positions (pure, for unit tests).
fn judge(claims: &[Claim], stored: &[(i64, Uuid, i64, Vec<u8>)]) -> Vec<Refusal> {
    let at: HashMap<i64, &(i64, Uuid, i64, Vec<u8>)> = stored.iter().map(|row| (row.0, row)).collect();
    claims
        .iter()
        .enumerate()
        .filter_map(|(index, claim)| {
            let reason = match (&claim.hash, at.get(&claim.position)) {
                (Err(why), _) => format!("not an event of the log: {why}"),
                (Ok(_), None) => format!("not an event of the log: it has no position {}", claim.position),
                (Ok(hash), Some((_, stream_id, version, stored_hash))) => {
                    if (*stream_id, *version) != (claim.stream_id, claim.version) {
                        format!(
                            "not an event of the log: position {} is version {version} of stream {stream_id}, \
                             not version {} of stream {}",
                            claim.position, claim.version, claim.stream_id
                        )
                    } else if stored_hash.as_slice() != hash.as_slice() {
                        format!(
                            "not an event of the log: version {} of stream {} hashes to {} in the log, not {}",
                            claim.version,
                            claim.stream_id,
                            hex::encode(stored_hash),
                            hex::encode(hash)
                        )
                    } else {
                        return None;
                    }
                }
            };
            Some(Refusal { index, reason })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(position: i64, hash: Result<Hash, String>) -> Claim {
        Claim {
            position,
            stream_id: Uuid::from_u128(1),
            version: position,
            hash,
        }
    }

    #[test]
    fn only_events_the_log_holds_with_the_same_hash_pass() {
        let stored = vec![
            (1, Uuid::from_u128(1), 1, vec![1u8; 32]),
            (2, Uuid::from_u128(1), 2, vec![2u8; 32]),
            (3, Uuid::from_u128(9), 3, vec![3u8; 32]),
        ];
        let claims = [
            claim(1, Ok([1u8; 32])),
            claim(2, Ok([9u8; 32])),
            claim(3, Ok([3u8; 32])),
            claim(4, Ok([4u8; 32])),
            claim(1, Err("its fields hash to something else".into())),
        ];
        let refused = judge(&claims, &stored);
        let indexes: Vec<usize> = refused.iter().map(|r| r.index).collect();
        assert_eq!(indexes, [1, 2, 3, 4]);
        assert!(refused[0].reason.contains("hashes to 0202"), "{}", refused[0].reason);
        assert!(
            refused[1]
                .reason
                .contains("stream 00000000-0000-0000-0000-000000000009")
        );
        assert!(refused[2].reason.contains("no position 4"));
        assert!(refused[3].reason.contains("something else"));
    }
}
