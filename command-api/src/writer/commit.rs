//! Committing one batch of the writer: deciding its commands on their streams' states and
//! writing their events and idempotency records, as one autocommitted statement or, when it
//! must claim keys first or outgrows one statement, as one transaction.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use chrono::{DateTime, Utc};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tally_domain::AccountError;
use tally_event_store::autocommit::{self, AutocommitError};
use tally_event_store::idempotency::{self, Claim, IdempotencyKey, StoredResponse};
use tally_event_store::{APPEND_EVENTS_MAX, AppendedEvent, EventStore, StoreError, StreamAppend, append_events_in};
use tally_service::token::ConsistencyToken;
use uuid::Uuid;

use super::{Item, Job, Verdict, refuse_chain};
use crate::command::{Events, decide};
use crate::error::stored_refusal;
use crate::execute::{CommandError, Executed, Idempotency, Loaded, Outcome, Touched, catch_up};

/// Why a batch did not commit.
#[derive(Debug)]
pub(super) enum BatchError {
    /// Failed before `COMMIT`: the transaction rolled back, nothing happened.
    Store(StoreError),
    /// `COMMIT` itself failed: it may or may not have taken effect, so nothing may be re-run.
    CommitUnknown(StoreError),
    /// Catching a stream up with the log failed (rolled back, nothing happened).
    CatchUp(CommandError),
    /// Run without claims, the batch cannot be decided safely: keys stored unclaimed were
    /// taken already (`taken` of them), or a keyed command was refused on stale state (a
    /// refusal that is not stored, so it would hide a stored response). Rolled back, nothing
    /// happened; run the batch again with claims.
    NeedsClaims { taken: usize },
}

impl From<StoreError> for BatchError {
    fn from(e: StoreError) -> Self {
        BatchError::Store(e)
    }
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        BatchError::Store(e.into())
    }
}

/// A committed batch: one result per command of each job, in order, and the new state of its
/// streams.
pub(super) struct Committed {
    pub(super) results: Results,
    pub(super) states: Vec<(Uuid, Loaded)>,
}

/// Commits one batch: claims keys, decides each command in order, appends all events with one
/// statement, stores responses.
///
/// Without `claim`, keys are not claimed first but stored with their responses, and the whole
/// batch is **one autocommitted statement** ([`autocommit::append_with_keys`]): its events and
/// its records with one round trip, no `BEGIN` or `COMMIT`. If a key is taken already, the
/// statement rolls back and the batch must run again with `claim` ([`BatchError::NeedsClaims`]),
/// which finds the stored responses (replays) before deciding. So does a keyed command refused
/// on stale state. Retries of stored requests are rare next to new requests, so this way saves
/// three round trips per batch almost always. A batch with more events than one statement
/// takes ([`APPEND_EVENTS_MAX`]) runs as a transaction instead ([`commit_in_transaction`]).
///
/// `unverified` are the streams whose state came from the cache and may be behind the log: an
/// acceptance on them is checked by the store (expected version), a refusal is not. So when a
/// refusal touches one, those streams are caught up with the log and the batch decided again
/// (after the claims, so replays are skipped the same way both times).
pub(super) async fn commit(
    store: &EventStore,
    connection: &mut PgConnection,
    jobs: &[Job],
    states: &mut HashMap<Uuid, Loaded>,
    unverified: &mut HashSet<Uuid>,
    claim: bool,
) -> Result<Committed, BatchError> {
    if claim {
        return commit_in_transaction(store, connection, jobs, states, unverified, true).await;
    }
    let unanswered = jobs.iter().map(|j| vec![None; j.items.len()]).collect();
    // Nothing is written yet, so a stream caught up here has no xid of this batch to race.
    let Decided {
        mut working,
        appends,
        verdicts,
        released,
    } = decide_checked(store, jobs, states, unverified, unanswered).await?;
    if !released.is_empty() {
        // A keyed command refused on stale state: its key may hold a stored response (a retry
        // decided on a stale cache) that only a claim finds.
        return Err(BatchError::NeedsClaims { taken: 0 });
    }
    if appends.values().map(|a| a.events.len()).sum::<usize>() > APPEND_EVENTS_MAX {
        return commit_in_transaction(store, connection, jobs, states, unverified, false).await;
    }
    // The responses stored with the events are built before Postgres numbers them: they hold 0
    // for those positions, which a replay finds again in the log (`fill_positions`).
    let (mut results, stored) = answers(jobs, verdicts, states, &HashMap::new());
    let records: Vec<(&IdempotencyKey, &[u8; 32], &StoredResponse)> =
        stored.iter().map(|(i, r)| (&i.key, &i.request_hash, r)).collect();
    let appends: Vec<StreamAppend> = appends.into_values().collect();
    let appended = match autocommit::append_with_keys(connection, appends, &records).await {
        Ok(events) => by_version(events),
        Err(AutocommitError::RolledBack(error)) => return Err(BatchError::Store(error)),
        Err(AutocommitError::KeysTaken(taken)) => return Err(BatchError::NeedsClaims { taken }),
        Err(AutocommitError::Unknown(error)) => return Err(BatchError::CommitUnknown(error)),
    };
    // The answers get their positions the way a replay does, so the two are the same.
    for response in results.iter_mut().flatten().filter_map(|r| match r {
        Ok(Outcome::Fresh(response)) => Some(response),
        _ => None,
    }) {
        set_positions(&mut response.body, |at| {
            appended.get(&at).map(|(position, _)| *position)
        });
    }
    Ok(committed(store, jobs, &appended, states, &mut working, results))
}

/// [`commit`] in one transaction: claims keys first with `claim`, else stores them at the end
/// (`idempotency::store_many`) like the autocommitted statement does. An unclaimed batch takes
/// event rows before keys, a claiming one keys before event rows: the same new key and stream in
/// both at once can deadlock, which Postgres breaks (a transient error, re-run).
async fn commit_in_transaction(
    store: &EventStore,
    connection: &mut PgConnection,
    jobs: &[Job],
    states: &mut HashMap<Uuid, Loaded>,
    unverified: &mut HashSet<Uuid>,
    claim: bool,
) -> Result<Committed, BatchError> {
    let mut tx = connection.begin().await?;
    let mut verdicts: Vec<Vec<Option<Verdict>>> = jobs.iter().map(|j| vec![None; j.items.len()]).collect();

    if claim {
        let keyed: Vec<(usize, usize, &Idempotency)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| {
                job.items
                    .iter()
                    .enumerate()
                    .filter_map(move |(k, item)| item.idempotency.as_ref().map(|idem| (j, k, idem)))
            })
            .collect();
        let requests: Vec<(&IdempotencyKey, &[u8; 32])> =
            keyed.iter().map(|(_, _, i)| (&i.key, &i.request_hash)).collect();
        let mut claims = idempotency::claim_many(&mut tx, &requests).await?;
        fill_positions(
            &mut tx,
            claims.iter_mut().filter_map(|c| match c {
                Claim::Replay(stored) => Some(stored),
                _ => None,
            }),
        )
        .await?;
        for ((j, k, _), claim) in keyed.iter().zip(claims) {
            verdicts[*j][*k] = match claim {
                Claim::Claimed => None,
                Claim::Replay(stored) => Some(Verdict::Replayed(stored)),
                Claim::Mismatch => Some(Verdict::KeyReused),
            };
        }
    }

    let Decided {
        mut working,
        appends,
        verdicts,
        released,
    } = decide_checked(store, jobs, states, unverified, verdicts).await?;
    if claim {
        idempotency::release_many(&mut tx, &released).await?;
    } else if !released.is_empty() {
        tx.rollback().await?;
        return Err(BatchError::NeedsClaims { taken: 0 });
    }

    let appends: Vec<StreamAppend> = appends.into_values().collect();
    let appended = by_version(append_chunked(&mut tx, appends).await?);
    let (results, responses) = answers(jobs, verdicts, states, &appended);
    if claim {
        let responses: Vec<(&IdempotencyKey, &StoredResponse)> = responses.iter().map(|(i, r)| (&i.key, r)).collect();
        idempotency::complete_many(&mut tx, &responses).await?;
    } else {
        let records: Vec<(&IdempotencyKey, &[u8; 32], &StoredResponse)> =
            responses.iter().map(|(i, r)| (&i.key, &i.request_hash, r)).collect();
        let taken = idempotency::store_many(&mut tx, &records).await?;
        if !taken.is_empty() {
            // None of the batch's events are kept; rolled back now, so the claimed re-run does
            // not wait on this attempt's rows.
            tx.rollback().await?;
            return Err(BatchError::NeedsClaims { taken: taken.len() });
        }
    }
    tx.commit().await.map_err(|e| BatchError::CommitUnknown(e.into()))?;
    Ok(committed(store, jobs, &appended, states, &mut working, results))
}

/// One result per command of each job, in order.
type Results = Vec<Vec<Result<Outcome, CommandError>>>;

/// Where each event of a batch landed: its position and hash, by stream and version.
type Landed = HashMap<(Uuid, i64), (i64, tally_event_store::Hash)>;

fn by_version(events: Vec<AppendedEvent>) -> Landed {
    events
        .into_iter()
        .map(|e| ((e.stream_id, e.version), (e.position, e.hash)))
        .collect()
}

/// Decides the batch ([`decide_batch`]); while a refusal rests on a cached state that may be
/// behind the log (`unverified`), catches those streams up and decides again.
async fn decide_checked<'a>(
    store: &EventStore,
    jobs: &'a [Job],
    states: &mut HashMap<Uuid, Loaded>,
    unverified: &mut HashSet<Uuid>,
    claimed: Vec<Vec<Option<Verdict>>>,
) -> Result<Decided<'a>, BatchError> {
    loop {
        let decided = decide_batch(jobs, states, claimed.clone(), Utc::now());
        let doubtful: HashSet<Uuid> = jobs
            .iter()
            .zip(&decided.verdicts)
            .flat_map(|(job, verdicts)| job.items.iter().zip(verdicts))
            // Stale state included: two streams cached at different moments (a transfer and
            // its account) disagree, and a retry would meet the same cache again.
            .filter(|(_, v)| matches!(v, Some(Verdict::Rejected(_))))
            .flat_map(|(item, _)| item.streams.iter().map(|(s, _)| *s))
            .filter(|s| unverified.contains(s))
            .collect();
        if doubtful.is_empty() {
            return Ok(decided);
        }
        for stream in doubtful {
            let loaded = states.get_mut(&stream).expect("every stream is loaded before deciding");
            catch_up(store, stream, loaded).await.map_err(BatchError::CatchUp)?;
            // Read while a transaction may hold an id already: the store must read the
            // predecessor itself to check the order of the two transactions.
            loaded.last_hash = None;
            unverified.remove(&stream);
        }
    }
}

/// Each command's result, and the responses to store under the keys of those that carry one.
/// Positions come from `appended` (this batch's events), else from where a stream stood before
/// it; 0 where neither knows.
fn answers<'a>(
    jobs: &'a [Job],
    verdicts: Vec<Vec<Option<Verdict>>>,
    states: &HashMap<Uuid, Loaded>,
    appended: &Landed,
) -> (Results, Vec<(&'a Idempotency, StoredResponse)>) {
    let position_at = |stream: Uuid, version: i64| position_at(appended, states, stream, version);
    let mut results = Vec::with_capacity(jobs.len());
    let mut responses: Vec<(&Idempotency, StoredResponse)> = Vec::new();
    for (job, verdicts) in jobs.iter().zip(verdicts) {
        let mut job_results = Vec::with_capacity(job.items.len());
        for (item, verdict) in job.items.iter().zip(verdicts) {
            let result = match verdict.expect("every command has a verdict") {
                Verdict::Replayed(stored) => Ok(Outcome::Replayed(stored)),
                Verdict::KeyReused => Err(CommandError::IdempotencyKeyReused),
                Verdict::Rejected(refusal) => {
                    if let Some(idem) = &item.idempotency
                        && refusal != AccountError::StaleState
                    {
                        responses.push((idem, stored_refusal(&refusal)));
                    }
                    Err(CommandError::Rejected(refusal))
                }
                Verdict::Accepted(mut streams) => {
                    for touched in &mut streams {
                        touched.position = position_at(touched.stream_id, touched.version);
                    }
                    let response = (item.respond)(&Executed { streams });
                    if let Some(idem) = &item.idempotency {
                        responses.push((idem, response.clone()));
                    }
                    Ok(Outcome::Fresh(response))
                }
            };
            job_results.push(result);
        }
        results.push(job_results);
    }
    (results, responses)
}

/// The position of `stream` at `version`: appended by this batch, or where it stood before it.
fn position_at(appended: &Landed, states: &HashMap<Uuid, Loaded>, stream: Uuid, version: i64) -> i64 {
    appended
        .get(&(stream, version))
        .map(|(position, _)| *position)
        .or_else(|| states.get(&stream).filter(|l| l.version == version).map(|l| l.position))
        .unwrap_or(0)
}

/// After the commit: the streams' new states (positions and hashes from `appended`), metrics,
/// and the relay's wake-up.
fn committed(
    store: &EventStore,
    jobs: &[Job],
    appended: &Landed,
    states: &HashMap<Uuid, Loaded>,
    working: &mut HashMap<Uuid, Loaded>,
    results: Results,
) -> Committed {
    for (stream, loaded) in working.iter_mut() {
        loaded.position = position_at(appended, states, *stream, loaded.version);
        if let Some((_, hash)) = appended.get(&(*stream, loaded.version)) {
            loaded.last_hash = Some(*hash);
        }
    }
    let commands: usize = jobs.iter().map(|j| j.items.len()).sum();
    metrics::histogram!("tally_append_batch_commands").record(commands as f64);
    metrics::histogram!("tally_append_batch_events").record(appended.len() as f64);
    tracing::debug!(commands, events = appended.len(), "batch committed");
    // Wakes the relay now rather than at its next poll (also after a batch that appended
    // nothing: a spurious wake-up costs the relay one empty read).
    store.committed();
    Committed {
        results,
        states: std::mem::take(working).into_iter().collect(),
    }
}

/// Fills in the positions a response stored with its events left at 0 (see [`commit`]): each
/// object of its body holding a `position` of 0 and a `consistency_token` naming a stream and
/// version gets the position of that event, read from the log. A response stored with its
/// positions, or one without any, is left as it is.
async fn fill_positions<'r>(
    connection: &mut PgConnection,
    responses: impl Iterator<Item = &'r mut StoredResponse>,
) -> Result<(), sqlx::Error> {
    let mut responses: Vec<&mut StoredResponse> = responses.collect();
    let mut wanted = Vec::new();
    for response in &mut responses {
        visit_positions(&mut response.body, &mut |at, _| wanted.push(at));
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let found = autocommit::positions_at(connection, &wanted).await?;
    for response in &mut responses {
        set_positions(&mut response.body, |at| found.get(&at).copied());
    }
    Ok(())
}

/// Sets every position of 0 in `body` ([`visit_positions`]) that `landed` knows.
fn set_positions(body: &mut serde_json::Value, landed: impl Fn((Uuid, i64)) -> Option<i64>) {
    visit_positions(body, &mut |at, position| {
        if let Some(landed) = landed(at) {
            *position = serde_json::Value::from(landed);
        }
    });
}

/// Calls `visit` with the stream and version of every object in `body` that holds a `position`
/// of 0 beside a `consistency_token`, and that position.
fn visit_positions(body: &mut serde_json::Value, visit: &mut impl FnMut((Uuid, i64), &mut serde_json::Value)) {
    match body {
        serde_json::Value::Object(object) => {
            let token = object
                .get("consistency_token")
                .and_then(|t| t.as_str())
                .and_then(|t| t.parse::<ConsistencyToken>().ok());
            if let Some(token) = token
                && let Some(position) = object.get_mut("position").filter(|p| p.as_i64() == Some(0))
            {
                visit((token.stream_id, token.version), position);
            }
            for value in object.values_mut() {
                visit_positions(value, visit);
            }
        }
        serde_json::Value::Array(values) => {
            for value in values {
                visit_positions(value, visit);
            }
        }
        _ => {}
    }
}

/// A batch decided on copies of its streams' states.
struct Decided<'a> {
    working: HashMap<Uuid, Loaded>,
    appends: BTreeMap<Uuid, StreamAppend>,
    /// One per command of each job; `None` in, `Some` out.
    verdicts: Vec<Vec<Option<Verdict>>>,
    /// Keys of commands refused on stale state, to give back.
    released: Vec<&'a IdempotencyKey>,
}

/// Decides the commands without a verdict yet in arrival order, each on the state the
/// previous one left. A chain with a refused command (or a key used for another request) is
/// taken back out whole: its streams return to where they stood before it. Pure: no IO.
fn decide_batch<'a>(
    jobs: &'a [Job],
    states: &HashMap<Uuid, Loaded>,
    mut verdicts: Vec<Vec<Option<Verdict>>>,
    now: DateTime<Utc>,
) -> Decided<'a> {
    let mut working: HashMap<Uuid, Loaded> = states.clone();
    let mut appends: BTreeMap<Uuid, StreamAppend> = BTreeMap::new();
    let mut released: Vec<&IdempotencyKey> = Vec::new();
    for (job, verdicts) in jobs.iter().zip(&mut verdicts) {
        let chain = job.items.len() > 1;
        // Where the chain's streams stood before it, to take it back out.
        let before: Vec<(Uuid, Loaded, Option<usize>)> = if chain {
            job.streams
                .iter()
                .map(|(s, _)| (*s, working[s].clone(), appends.get(s).map(|a| a.events.len())))
                .collect()
        } else {
            Vec::new()
        };
        let mut failed = chain
            .then(|| verdicts.iter().position(|v| matches!(v, Some(Verdict::KeyReused))))
            .flatten()
            .map(|k| (k, None));
        for (k, item) in job.items.iter().enumerate() {
            if failed.is_some() {
                break;
            }
            if verdicts[k].is_some() {
                continue;
            }
            match decide(&item.command, &working, now) {
                Ok(decided) => {
                    record(decided, item, &mut working, &mut appends);
                    verdicts[k] = Some(Verdict::Accepted(touched(item, &working)));
                }
                Err(refusal) => failed = Some((k, Some(refusal))),
            }
        }
        let Some((failed, refusal)) = failed else {
            continue;
        };
        for (stream, loaded, events) in before {
            working.insert(stream, loaded);
            match events {
                Some(len) => appends.get_mut(&stream).expect("kept").events.truncate(len),
                None => {
                    appends.remove(&stream);
                }
            }
        }
        let answered = std::mem::take(verdicts);
        let answered_at = |k: usize| answered[k].clone();
        *verdicts = refuse_chain(&job.items, failed, refusal, answered_at);
        // A refusal is an outcome, stored under the key like an acceptance, except for stale
        // state, which a retry is meant to get past.
        for (item, verdict) in job.items.iter().zip(verdicts.iter()) {
            if matches!(verdict, Some(Verdict::Rejected(AccountError::StaleState))) {
                released.extend(item.idempotency.as_ref().map(|i| &i.key));
            }
        }
    }
    Decided {
        working,
        appends,
        verdicts,
        released,
    }
}

/// Folds an accepted command's events into the working states and the batch's appends.
fn record(
    decided: Vec<(Uuid, Events)>,
    item: &Item,
    working: &mut HashMap<Uuid, Loaded>,
    appends: &mut BTreeMap<Uuid, StreamAppend>,
) {
    for (stream, events) in decided {
        let loaded = working
            .get_mut(&stream)
            .expect("every stream is loaded before deciding");
        let append = appends.entry(stream).or_insert_with(|| StreamAppend {
            stream_type: loaded.state.kind().stream_type().to_owned(),
            stream_id: stream,
            expected_version: loaded.version,
            known_prev_hash: loaded.last_hash,
            events: Vec::new(),
        });
        append.events.extend(events.record(loaded, &item.metadata));
    }
}

/// Where the streams of `item` stand (positions are known after the insert).
fn touched(item: &Item, working: &HashMap<Uuid, Loaded>) -> Vec<Touched> {
    item.streams
        .iter()
        .map(|(stream, _)| {
            let loaded = &working[stream];
            Touched {
                stream_id: *stream,
                state: loaded.state.clone(),
                version: loaded.version,
                position: 0,
            }
        })
        .collect()
}

/// Appends `appends` in statements of at most [`APPEND_EVENTS_MAX`] events, in the caller's
/// transaction: a batch of many-leg entries or a long chain outgrows one statement. A stream
/// cut between two statements continues on the hash the first returned.
async fn append_chunked(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    appends: Vec<StreamAppend>,
) -> Result<Vec<AppendedEvent>, StoreError> {
    let mut appended = Vec::new();
    let mut queue: VecDeque<StreamAppend> = appends.into();
    while !queue.is_empty() {
        let mut chunk = Vec::new();
        let mut room = APPEND_EVENTS_MAX;
        while room > 0
            && let Some(mut append) = queue.pop_front()
        {
            if append.events.len() > room {
                let rest = append.events.split_off(room);
                queue.push_front(StreamAppend {
                    stream_type: append.stream_type.clone(),
                    stream_id: append.stream_id,
                    expected_version: append.expected_version + room as i64,
                    // Known once this chunk is in (below).
                    known_prev_hash: None,
                    events: rest,
                });
            }
            room -= append.events.len();
            chunk.push(append);
        }
        let done = append_events_in(tx, chunk).await?;
        if let Some(next) = queue.front_mut()
            && let Some(last) = done
                .iter()
                .find(|e| e.stream_id == next.stream_id && e.version == next.expected_version)
        {
            // Written by this transaction: the store could not read it as an older one's.
            next.known_prev_hash = Some(last.hash);
        }
        appended.extend(done);
    }
    Ok(appended)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_zero_position_beside_a_consistency_token_is_visited_and_others_are_not() {
        let (transfer, from, to) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let token = |id: Uuid, version| ConsistencyToken { stream_id: id, version }.to_string();
        let mut body = json!({
            "position": 0, "consistency_token": token(transfer, 1),
            "from": {"position": 0, "consistency_token": token(from, 7), "balance": 0},
            // Known when it was stored: kept.
            "to": {"position": 42, "consistency_token": token(to, 3)},
            // No token beside it, or not one: nothing to look up.
            "legs": [{"position": 0}, {"position": 0, "consistency_token": "v9.nope"}],
        });
        let mut seen = Vec::new();
        visit_positions(&mut body, &mut |at, position| {
            seen.push(at);
            *position = json!(at.1 * 100);
        });
        seen.sort();
        let mut expected = vec![(transfer, 1), (from, 7)];
        expected.sort();
        assert_eq!(seen, expected);
        assert_eq!(
            (body["position"].clone(), body["from"]["position"].clone()),
            (json!(100), json!(700))
        );
        assert_eq!(body["to"]["position"], 42);
        assert_eq!(
            body["legs"],
            json!([{"position": 0}, {"position": 0, "consistency_token": "v9.nope"}])
        );
    }
}
