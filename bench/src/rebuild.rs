//! The `rebuild` scenario: a log of real account events (opened, then deposits), read raw in
//! commit order (the limit), then rebuilt into the `accounts` read models (Tally).

use std::time::Instant;

use tally_domain::account::{AccountOpened, FundsDeposited};
use tally_domain::{AccountEvent, AmountMinor, Currency};
use tally_event_store::{APPEND_EVENTS_MAX, Checkpoint, EventStore, NewEvent, StreamAppend};
use uuid::Uuid;

use crate::Measurement;
use crate::sample;

/// Events per account stream: the opening and deposits.
const EVENTS_PER_ACCOUNT: usize = 100;
/// Events per read, as the rebuild reads them.
const READ_CHUNK: i64 = tally_projectors::rebuild::CHUNK_EVENTS;

/// Writes `events` account events: streams of an `AccountOpened` and deposits.
pub async fn preload(store: &EventStore, events: u64) -> anyhow::Result<Measurement> {
    let started = Instant::now();
    let eur: Currency = "EUR".parse()?;
    let mut left = events as usize;
    while left > 0 {
        let mut appends = Vec::new();
        let mut in_append = 0;
        while left > 0 && in_append + EVENTS_PER_ACCOUNT <= APPEND_EVENTS_MAX {
            let n = left.min(EVENTS_PER_ACCOUNT);
            let account_id = Uuid::now_v7();
            let mut stream = vec![AccountEvent::AccountOpened(AccountOpened {
                account_id,
                owner: "bench".into(),
                currency: eur,
                overdraft_limit: 0,
                external_id: None,
                metadata: Default::default(),
                flags: Vec::new(),
            })];
            stream.extend((1..n).map(|_| {
                AccountEvent::FundsDeposited(FundsDeposited {
                    amount: AmountMinor::new(1).expect("1 is a valid amount"),
                    currency: eur,
                    reference: String::new(),
                    system_account: tally_domain::SystemAccount::World.id(&eur),
                })
            }));
            appends.push(StreamAppend {
                stream_type: tally_domain::account::STREAM_TYPE.to_owned(),
                stream_id: account_id,
                expected_version: 0,
                known_prev_hash: None,
                events: stream.iter().map(new_event).collect(),
            });
            left -= n;
            in_append += n;
        }
        store.append(appends).await?;
    }
    Ok(Measurement::throughput(
        events,
        started.elapsed().as_secs_f64(),
        Default::default(),
    ))
}

fn new_event(event: &AccountEvent) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event.type_name().to_owned(),
        schema_version: event.schema_version() as i32,
        payload: event.to_payload(),
        metadata: sample::metadata(),
    }
}

/// The limit: the whole log read in commit order, gap-safely, in the rebuild's chunks, with
/// nothing done to the events.
pub async fn read_log(store: &EventStore) -> anyhow::Result<Measurement> {
    let started = Instant::now();
    let mut after = Checkpoint::default();
    let mut events = 0u64;
    loop {
        let chunk = store.read_all(after, READ_CHUNK).await?;
        let Some(last) = chunk.last() else { break };
        after = last.checkpoint();
        events += chunk.len() as u64;
    }
    Ok(Measurement::throughput(
        events,
        started.elapsed().as_secs_f64(),
        Default::default(),
    ))
}

/// Tally: `tally projections rebuild accounts`, as a library call.
pub async fn rebuild(store: &EventStore, partitions: u32) -> anyhow::Result<Measurement> {
    tally_projectors::migrate(store.pool()).await?;
    let report = tally_projectors::rebuild::rebuild(store.pool(), "accounts", partitions, |_| {}).await?;
    Ok(Measurement::throughput(
        report.events,
        report.elapsed.as_secs_f64(),
        Default::default(),
    ))
}
