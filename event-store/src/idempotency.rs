//! Durable idempotency: a command's key, request hash and response are stored in the
//! transaction that appends its events.
//!
//! Claiming a key inserts its row first. A concurrent request with the same key blocks on
//! that row until the first transaction ends: if it committed, the second finds the stored
//! response; if it rolled back (the command was refused, or lost a version race), the second
//! claims the key and runs. One key, one effect, whatever the timing.
//!
//! A writer may also skip the claim and [`store_many`] keys with their final responses at the
//! end of its transaction (one statement instead of a claim and an update per batch). A key
//! already there (a retry of a stored request, or a concurrent one that committed first) is
//! then reported, and the writer must roll the whole transaction back and run its commands
//! again with claims: the insert waits for a concurrent holder of the key just as a claim
//! does, so a key still gets one effect.

use sha2::{Digest, Sha256};
use sqlx::{Postgres, Transaction};

/// Longest accepted key, in bytes.
pub const KEY_LEN_MAX: usize = 255;

/// A response stored under a key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: serde_json::Value,
}

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The key is new: run the command, then [`complete`] in the same transaction.
    Claimed,
    /// The same request ran before: answer with its response, change nothing.
    Replay(StoredResponse),
    /// The key was used for a different request.
    Mismatch,
}

/// A validated idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// 1 to [`KEY_LEN_MAX`] visible ASCII characters (what fits an HTTP header unambiguously).
    pub fn parse(raw: &str) -> Option<Self> {
        let ok = (1..=KEY_LEN_MAX).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// SHA-256 of a request: method, path and the body as canonical JSON (object keys sorted,
/// which `serde_json::Value` guarantees), each length-prefixed.
pub fn request_hash(method: &str, path: &str, body: &serde_json::Value) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in [method.as_bytes(), path.as_bytes(), body.to_string().as_bytes()] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Claims `key` for a request with `hash` inside `tx`. Blocks while another transaction holds
/// the same key.
pub async fn claim(
    tx: &mut Transaction<'_, Postgres>,
    key: &IdempotencyKey,
    hash: &[u8; 32],
) -> Result<Claim, sqlx::Error> {
    let mut claims = claim_many(tx, &[(key, hash)]).await?;
    Ok(claims.pop().expect("one claim per request"))
}

/// Stores the response of a claimed key. Call in the claiming transaction, before commit.
pub async fn complete(
    tx: &mut Transaction<'_, Postgres>,
    key: &IdempotencyKey,
    response: &StoredResponse,
) -> Result<(), sqlx::Error> {
    complete_many(tx, &[(key, response)]).await
}

/// Claims many keys in one round trip: the batched form of [`claim`] for group commit.
/// Returns one [`Claim`] per request, in order. The keys must be distinct.
///
/// Keys are inserted in sorted order, so two transactions claiming overlapping key sets
/// block on each other instead of deadlocking.
pub async fn claim_many(
    tx: &mut Transaction<'_, Postgres>,
    requests: &[(&IdempotencyKey, &[u8; 32])],
) -> Result<Vec<Claim>, sqlx::Error> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<&str> = requests.iter().map(|(k, _)| k.as_str()).collect();
    let hashes: Vec<&[u8]> = requests.iter().map(|(_, h)| h.as_slice()).collect();
    let claimed: Vec<String> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (key, request_hash, response_status, response_body) \
         SELECT t.key, t.hash, 0, 'null' FROM UNNEST($1::text[], $2::bytea[]) AS t(key, hash) ORDER BY t.key \
         ON CONFLICT (key) DO NOTHING RETURNING key",
    )
    .bind(&keys)
    .bind(&hashes)
    .fetch_all(&mut **tx)
    .await?;
    let claimed: std::collections::HashSet<String> = claimed.into_iter().collect();
    let taken: Vec<&str> = keys.iter().copied().filter(|k| !claimed.contains(*k)).collect();
    let mut stored = std::collections::HashMap::new();
    if !taken.is_empty() {
        let rows: Vec<(String, Vec<u8>, i16, serde_json::Value)> = sqlx::query_as(
            "SELECT key, request_hash, response_status, response_body FROM idempotency_keys WHERE key = ANY($1)",
        )
        .bind(&taken)
        .fetch_all(&mut **tx)
        .await?;
        stored.extend(
            rows.into_iter()
                .map(|(key, hash, status, body)| (key, (hash, status, body))),
        );
    }
    Ok(requests
        .iter()
        .map(|(key, hash)| {
            if claimed.contains(key.as_str()) {
                return Claim::Claimed;
            }
            match stored.get(key.as_str()) {
                Some((stored_hash, status, body)) if stored_hash.as_slice() == hash.as_slice() => {
                    Claim::Replay(StoredResponse {
                        status: u16::try_from(*status).unwrap_or(500),
                        body: body.clone(),
                    })
                }
                // A different request, or (pruned between the two statements) gone: never
                // run a request twice on a guess.
                _ => Claim::Mismatch,
            }
        })
        .collect())
}

/// Gives back keys claimed in `tx` whose commands were refused, so a later retry of the same
/// request runs again (a refusal is not a stored outcome).
pub async fn release_many(tx: &mut Transaction<'_, Postgres>, keys: &[&IdempotencyKey]) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    sqlx::query("DELETE FROM idempotency_keys WHERE key = ANY($1)")
        .bind(&keys)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Stores the responses of many claimed keys in one round trip: the batched [`complete`].
pub async fn complete_many(
    tx: &mut Transaction<'_, Postgres>,
    responses: &[(&IdempotencyKey, &StoredResponse)],
) -> Result<(), sqlx::Error> {
    if responses.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = responses.iter().map(|(k, _)| k.as_str()).collect();
    let statuses: Vec<i16> = responses.iter().map(|(_, r)| r.status as i16).collect();
    let bodies: Vec<String> = responses.iter().map(|(_, r)| r.body.to_string()).collect();
    // `k.key = ANY($1)` repeats the join's condition so that the keys are found through the
    // primary key whatever the planner knows: on a table planned while empty (a new database,
    // before autovacuum's first analysis) the join alone is a sequential scan per batch.
    sqlx::query(
        "UPDATE idempotency_keys AS k SET response_status = t.status, response_body = t.body::json \
         FROM UNNEST($1::text[], $2::smallint[], $3::text[]) AS t(key, status, body) \
         WHERE k.key = t.key AND k.key = ANY($1)",
    )
    .bind(&keys)
    .bind(&statuses)
    .bind(&bodies)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Stores keys with their final responses in one round trip, for a transaction that did not
/// claim them. Returns the keys that were taken already (by a committed transaction, or by one
/// that committed while this one waited on it), in no order: when any is, nothing of `tx` may
/// commit; roll it back and run those commands again with [`claim_many`]. The keys must be
/// distinct.
pub async fn store_many(
    tx: &mut Transaction<'_, Postgres>,
    records: &[(&IdempotencyKey, &[u8; 32], &StoredResponse)],
) -> Result<Vec<String>, sqlx::Error> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<&str> = records.iter().map(|(k, _, _)| k.as_str()).collect();
    let hashes: Vec<&[u8]> = records.iter().map(|(_, h, _)| h.as_slice()).collect();
    let statuses: Vec<i16> = records.iter().map(|(_, _, r)| r.status as i16).collect();
    let bodies: Vec<String> = records.iter().map(|(_, _, r)| r.body.to_string()).collect();
    // Sorted, like claims: two transactions storing overlapping keys wait on each other
    // instead of deadlocking.
    let stored: Vec<String> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (key, request_hash, response_status, response_body) \
         SELECT t.key, t.hash, t.status, t.body::json \
         FROM UNNEST($1::text[], $2::bytea[], $3::smallint[], $4::text[]) AS t(key, hash, status, body) \
         ORDER BY t.key \
         ON CONFLICT (key) DO NOTHING RETURNING key",
    )
    .bind(&keys)
    .bind(&hashes)
    .bind(&statuses)
    .bind(&bodies)
    .fetch_all(&mut **tx)
    .await?;
    if stored.len() == keys.len() {
        return Ok(Vec::new());
    }
    let stored: std::collections::HashSet<String> = stored.into_iter().collect();
    Ok(keys
        .into_iter()
        .filter(|k| !stored.contains(*k))
        .map(str::to_owned)
        .collect())
}

/// Deletes keys older than `retention`; returns how many. Only run when a retention is
/// configured: by default keys are kept forever.
pub async fn prune(pool: &sqlx::PgPool, retention: std::time::Duration) -> Result<u64, sqlx::Error> {
    let seconds = retention.as_secs_f64();
    let deleted = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)")
        .bind(seconds)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_to_255_visible_ascii_characters() {
        assert!(IdempotencyKey::parse("order-42/attempt").is_some());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_some());
        for bad in ["", " ", "has space", "tab\t", "ünï", &"k".repeat(256)] {
            assert!(IdempotencyKey::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn the_request_hash_ignores_key_order_but_not_values_or_paths() {
        let a: serde_json::Value = serde_json::from_str(r#"{"amount":1,"reference":"x"}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"reference":"x","amount":1}"#).unwrap();
        let c: serde_json::Value = serde_json::from_str(r#"{"reference":"x","amount":2}"#).unwrap();
        assert_eq!(request_hash("POST", "/p", &a), request_hash("POST", "/p", &b));
        assert_ne!(request_hash("POST", "/p", &a), request_hash("POST", "/p", &c));
        assert_ne!(request_hash("POST", "/p", &a), request_hash("POST", "/q", &a));
    }
}
