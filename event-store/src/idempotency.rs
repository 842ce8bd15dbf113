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
//!
//! A key belongs to its caller (the token subject): two callers using the same key are two
//! requests, each with its own effect, and no caller can replay or block another's. Keys
//! stored before keys had callers (migration `0005`) keep the caller of the events they wrote;
//! those that wrote none (refusals) are stored with the empty caller and still answer any
//! caller, as they did when they were stored.

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};
use sqlx::{Postgres, Row, Transaction};

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

/// The caller of keys stored before keys were scoped, whose events named no actor: such a
/// key answers every caller (migration `0005_idempotency_per_caller.sql`).
pub(crate) const LEGACY_CALLER: &str = "";

/// A validated idempotency key, scoped to the caller that sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    /// Who sent the key (the token subject): keys of different callers never meet.
    caller: String,
    /// The client's `Idempotency-Key` header.
    key: String,
}

impl IdempotencyKey {
    /// `raw` from `caller`: 1 to [`KEY_LEN_MAX`] visible ASCII characters (what fits an HTTP
    /// header unambiguously). The caller must not be empty (that is the legacy scope).
    pub fn parse(caller: &str, raw: &str) -> Option<Self> {
        let ok =
            !caller.is_empty() && (1..=KEY_LEN_MAX).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Self {
            caller: caller.to_owned(),
            key: raw.to_owned(),
        })
    }

    /// The key as the client sent it.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// Who sent it.
    pub fn caller(&self) -> &str {
        &self.caller
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
    let callers: Vec<&str> = requests.iter().map(|(k, _)| k.caller()).collect();
    let keys: Vec<&str> = requests.iter().map(|(k, _)| k.as_str()).collect();
    let hashes: Vec<&[u8]> = requests.iter().map(|(_, h)| h.as_slice()).collect();
    // A key stored before keys were scoped still holds for every caller: it is not claimed
    // again beside it.
    let claimed: Vec<(String, String)> = sqlx::query_as(
        "INSERT INTO idempotency_keys (caller, key, request_hash, response_status, response_body) \
         SELECT t.caller, t.key, t.hash, 0, 'null' \
         FROM UNNEST($1::text[], $2::text[], $3::bytea[]) AS t(caller, key, hash) \
         WHERE (SELECT 1 FROM idempotency_keys l WHERE l.caller = $4 AND l.key = t.key LIMIT 1) IS NULL \
         ORDER BY t.key, t.caller \
         ON CONFLICT (key, caller) DO NOTHING RETURNING caller, key",
    )
    .bind(&callers)
    .bind(&keys)
    .bind(&hashes)
    .bind(LEGACY_CALLER)
    .fetch_all(&mut **tx)
    .await?;
    let claimed: HashSet<(String, String)> = claimed.into_iter().collect();
    let is_claimed = |k: &IdempotencyKey| claimed.contains(&(k.caller.clone(), k.key.clone()));
    let taken: Vec<&IdempotencyKey> = requests.iter().map(|(k, _)| *k).filter(|k| !is_claimed(k)).collect();
    let mut stored: HashMap<(String, String), (Vec<u8>, i16, serde_json::Value)> = HashMap::new();
    if !taken.is_empty() {
        let callers: Vec<&str> = taken.iter().map(|k| k.caller()).collect();
        let keys: Vec<&str> = taken.iter().map(|k| k.as_str()).collect();
        let rows: Vec<(String, String, Vec<u8>, i16, serde_json::Value)> = sqlx::query_as(
            "SELECT k.caller, k.key, k.request_hash, k.response_status, k.response_body \
             FROM UNNEST($1::text[], $2::text[]) AS t(caller, key) \
             JOIN idempotency_keys k ON k.key = t.key AND (k.caller = t.caller OR k.caller = $3) \
             WHERE k.key = ANY($2)",
        )
        .bind(&callers)
        .bind(&keys)
        .bind(LEGACY_CALLER)
        .fetch_all(&mut **tx)
        .await?;
        stored.extend(
            rows.into_iter()
                .map(|(caller, key, hash, status, body)| ((caller, key), (hash, status, body))),
        );
    }
    Ok(requests
        .iter()
        .map(|(key, hash)| {
            if is_claimed(key) {
                return Claim::Claimed;
            }
            let own = stored.get(&(key.caller.clone(), key.key.clone()));
            let legacy = || stored.get(&(LEGACY_CALLER.to_owned(), key.key.clone()));
            match own.or_else(legacy) {
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
    let callers: Vec<&str> = keys.iter().map(|k| k.caller()).collect();
    let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    sqlx::query(
        "DELETE FROM idempotency_keys AS k USING UNNEST($1::text[], $2::text[]) AS t(caller, key) \
         WHERE k.caller = t.caller AND k.key = t.key AND k.key = ANY($2)",
    )
    .bind(&callers)
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
    let callers: Vec<&str> = responses.iter().map(|(k, _)| k.caller()).collect();
    let keys: Vec<&str> = responses.iter().map(|(k, _)| k.as_str()).collect();
    let statuses: Vec<i16> = responses.iter().map(|(_, r)| r.status as i16).collect();
    let bodies: Vec<String> = responses.iter().map(|(_, r)| r.body.to_string()).collect();
    // `k.key = ANY($2)` repeats the join's condition so that the keys are found through the
    // primary key whatever the planner knows: on a table planned while empty (a new database,
    // before autovacuum's first analysis) the join alone is a sequential scan per batch.
    sqlx::query(
        "UPDATE idempotency_keys AS k SET response_status = t.status, response_body = t.body::json \
         FROM UNNEST($1::text[], $2::text[], $3::smallint[], $4::text[]) AS t(caller, key, status, body) \
         WHERE k.caller = t.caller AND k.key = t.key AND k.key = ANY($2)",
    )
    .bind(&callers)
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
/// distinct. A key stored before keys were scoped counts as taken for every caller.
pub async fn store_many(
    tx: &mut Transaction<'_, Postgres>,
    records: &[(&IdempotencyKey, &[u8; 32], &StoredResponse)],
) -> Result<Vec<IdempotencyKey>, sqlx::Error> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let columns = Records::of(records);
    let sql = format!("{} RETURNING caller, key", Records::insert(1));
    let stored: Vec<(String, String)> = columns
        .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()?;
    if stored.len() == records.len() {
        return Ok(Vec::new());
    }
    let stored: HashSet<(String, String)> = stored.into_iter().collect();
    Ok(records
        .iter()
        .map(|(k, _, _)| *k)
        .filter(|k| !stored.contains(&(k.caller.clone(), k.key.clone())))
        .cloned()
        .collect())
}

/// The column arrays of records stored unclaimed, for [`Records::insert`].
pub(crate) struct Records<'a> {
    callers: Vec<&'a str>,
    keys: Vec<&'a str>,
    hashes: Vec<&'a [u8]>,
    statuses: Vec<i16>,
    bodies: Vec<String>,
}

impl<'a> Records<'a> {
    pub(crate) fn of(records: &[(&'a IdempotencyKey, &'a [u8; 32], &StoredResponse)]) -> Self {
        Self {
            callers: records.iter().map(|(k, _, _)| k.caller()).collect(),
            keys: records.iter().map(|(k, _, _)| k.as_str()).collect(),
            hashes: records.iter().map(|(_, h, _)| h.as_slice()).collect(),
            statuses: records.iter().map(|(_, _, r)| r.status as i16).collect(),
            bodies: records.iter().map(|(_, _, r)| r.body.to_string()).collect(),
        }
    }

    /// The insert of the records, with its six parameters numbered from `first` (bound by
    /// [`Records::bind`]), without a `RETURNING`: a key taken already (or stored before keys
    /// were scoped, which counts as taken for every caller) is skipped. Sorted, like claims:
    /// two transactions storing overlapping keys wait on each other instead of deadlocking.
    pub(crate) fn insert(first: usize) -> String {
        let p = |n: usize| format!("${}", first + n);
        format!(
            "INSERT INTO idempotency_keys (caller, key, request_hash, response_status, response_body) \
             SELECT t.caller, t.key, t.hash, t.status, t.body::json \
             FROM UNNEST({}::text[], {}::text[], {}::bytea[], {}::smallint[], {}::text[]) \
                 AS t(caller, key, hash, status, body) \
             WHERE (SELECT 1 FROM idempotency_keys l WHERE l.caller = {} AND l.key = t.key LIMIT 1) IS NULL \
             ORDER BY t.key, t.caller \
             ON CONFLICT (key, caller) DO NOTHING",
            p(0),
            p(1),
            p(2),
            p(3),
            p(4),
            p(5)
        )
    }

    /// Binds the parameters of [`Records::insert`], in order.
    pub(crate) fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.callers)
            .bind(&self.keys)
            .bind(&self.hashes)
            .bind(&self.statuses)
            .bind(&self.bodies)
            .bind(LEGACY_CALLER)
    }
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
        assert!(IdempotencyKey::parse("alice", "order-42/attempt").is_some());
        assert!(IdempotencyKey::parse("alice", &"k".repeat(255)).is_some());
        for bad in ["", " ", "has space", "tab\t", "ünï", &"k".repeat(256)] {
            assert!(IdempotencyKey::parse("alice", bad).is_none(), "{bad:?}");
        }
        assert!(
            IdempotencyKey::parse("", "order-42").is_none(),
            "the empty caller is the legacy scope"
        );
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
