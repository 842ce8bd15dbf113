//! Tamper evidence: re-checks the per-stream hash chains of the stored log
//! (`schemas/HASH_CHAIN.md`), for `tally audit verify`.
//!
//! Owns two things:
//! - [`ChainChecker`], the pure rules: fed events in `(stream_id, version)` order, it finds the
//!   first one that breaks its stream's chain (a version gap, a wrong chain start, a `prev_hash`
//!   that does not name its predecessor, or stored bytes that no longer hash to the stored hash).
//! - [`verify`], which pages through `events` in that order and feeds the checker.
//!
//! The append-only trigger stops applications from rewriting history; a superuser can still
//! disable it. This is what notices when one did.

use std::fmt;
use std::time::Duration;

use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::{EVENT_COLUMNS, StoredEvent, stored_event};

/// Events read per page. Large enough that a round trip is amortised over many hashes, small
/// enough that a page of large payloads stays a few megabytes.
pub const VERIFY_PAGE_EVENTS: i64 = 5_000;

/// Which part of the log to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every stream.
    All,
    /// One stream.
    Stream(Uuid),
}

/// How far a verification has got. `total` is the event count taken when it started: events
/// appended since then are verified too when they sort after the cursor, so `done` can pass it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// What is wrong with a broken event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// The stored bytes no longer hash to the stored `hash`: the row was edited.
    HashMismatch,
    /// `prev_hash` is not the stored `hash` of the previous version: a row was replaced or
    /// re-hashed.
    BrokenLink,
    /// The version is not the one after its predecessor (or the stream does not start at 1):
    /// an event was removed.
    VersionGap,
    /// Version 1 names a predecessor.
    ChainStart,
}

impl fmt::Display for BreakKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HashMismatch => "hash mismatch",
            Self::BrokenLink => "broken link",
            Self::VersionGap => "version gap",
            Self::ChainStart => "chain start",
        })
    }
}

/// The first event found that breaks its stream's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub stream_id: Uuid,
    pub version: i64,
    pub position: i64,
    pub event_id: Uuid,
    pub kind: BreakKind,
    /// What was expected and what was found, for the operator.
    pub detail: String,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stream {} version {} (position {}, event {}): {} ({})",
            self.stream_id, self.version, self.position, self.event_id, self.kind, self.detail
        )
    }
}

/// The last event checked in the current stream: all a chain needs to check the next one.
#[derive(Debug, Clone)]
struct Link {
    stream_id: Uuid,
    version: i64,
    hash: Vec<u8>,
}

/// The chain rules, without IO. Feed it every event of the scope in `(stream_id, version)`
/// order; it keeps only the last event of the current stream, so memory does not grow with
/// the log.
#[derive(Debug, Default)]
pub struct ChainChecker {
    last: Option<Link>,
    events: u64,
    streams: u64,
}

impl ChainChecker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Events fed so far (a broken one included).
    pub fn events_checked(&self) -> u64 {
        self.events
    }

    /// Distinct streams fed so far (a broken one included).
    pub fn streams_checked(&self) -> u64 {
        self.streams
    }

    /// Checks the next event. After a break the checker's state is unspecified: stop there.
    pub fn check(&mut self, event: &StoredEvent) -> Result<(), ChainBreak> {
        self.events += 1;
        let previous = match self.last.take() {
            Some(last) if last.stream_id == event.stream_id => Some(last),
            _ => {
                self.streams += 1;
                None
            }
        };
        let fail = |kind, detail: String| ChainBreak {
            stream_id: event.stream_id,
            version: event.version,
            position: event.position,
            event_id: event.event_id,
            kind,
            detail,
        };

        // Order of the checks: a missing predecessor explains any link failure after it, and a
        // wrong link says more than the hash mismatch it also causes when prev_hash was edited.
        let expected_version = previous.as_ref().map_or(1, |p| p.version.saturating_add(1));
        if event.version != expected_version {
            return Err(fail(
                BreakKind::VersionGap,
                format!("expected version {expected_version}, found {}", event.version),
            ));
        }
        match (&previous, event.prev_hash.as_deref()) {
            (None, None) => {}
            (None, Some(prev_hash)) => {
                return Err(fail(
                    BreakKind::ChainStart,
                    format!("version 1 names a predecessor {}", hex::encode(prev_hash)),
                ));
            }
            (Some(p), prev_hash) if prev_hash == Some(p.hash.as_slice()) => {}
            (Some(p), prev_hash) => {
                return Err(fail(
                    BreakKind::BrokenLink,
                    format!(
                        "prev_hash {} is not the hash {} of version {}",
                        prev_hash.map_or_else(|| "NULL".to_owned(), hex::encode),
                        hex::encode(&p.hash),
                        p.version
                    ),
                ));
            }
        }
        let computed = event.computed_hash();
        if computed.as_slice() != event.hash.as_slice() {
            return Err(fail(
                BreakKind::HashMismatch,
                format!(
                    "stored hash {}, the stored bytes hash to {}",
                    hex::encode(&event.hash),
                    hex::encode(computed)
                ),
            ));
        }

        self.last = Some(Link {
            stream_id: event.stream_id,
            version: event.version,
            hash: event.hash.clone(),
        });
        Ok(())
    }
}

/// The outcome of a verification that could read the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub events_checked: u64,
    pub streams_checked: u64,
    /// The first broken event in `(stream_id, version)` order; verification stops there.
    pub first_break: Option<ChainBreak>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.first_break.is_none()
    }
}

/// Why a verification could not finish (a broken chain is not an error: see [`VerifyReport`]).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// No connection within the pool's acquire timeout: the server refused or did not answer.
    #[error("the database did not accept a connection within {0:?}: is it running, and is the URL right?")]
    Unreachable(Duration),
    #[error("database error while {doing}: {source}")]
    Database {
        doing: String,
        #[source]
        source: sqlx::Error,
    },
}

impl VerifyError {
    fn from_sqlx(pool: &PgPool, doing: impl Into<String>, source: sqlx::Error) -> Self {
        match source {
            // sqlx keeps retrying a refused connection until the acquire timeout and then
            // reports only that it timed out; say what that means.
            sqlx::Error::PoolTimedOut => Self::Unreachable(pool.options().get_acquire_timeout()),
            source => Self::Database {
                doing: doing.into(),
                source,
            },
        }
    }
}

/// Verifies every chain in `scope`, reading `events` in pages of [`VERIFY_PAGE_EVENTS`] in
/// `(stream_id, version)` order, and stops at the first broken event. `progress` is called once
/// with the total before the first page and then after every page.
///
/// Not one snapshot, on purpose: a transaction open for the whole run would hold back vacuum
/// on a large log for as long as it takes. Without one, concurrent appends cannot cause a
/// false break: they only add versions after a stream's last committed one, with a
/// `prev_hash` that is that one's hash, and a stream's versions commit in order.
pub async fn verify(
    pool: &PgPool,
    scope: Scope,
    mut progress: impl FnMut(Progress),
) -> Result<VerifyReport, VerifyError> {
    let total: i64 = match scope {
        Scope::All => sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await,
        Scope::Stream(id) => {
            sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
        }
    }
    .map_err(|e| VerifyError::from_sqlx(pool, "counting the events", e))?;
    let total = u64::try_from(total).unwrap_or(0);
    progress(Progress { done: 0, total });

    // Keyset pagination on the primary key `(stream_id, version)`: each page is an index range
    // scan, however deep into the log. Versions start at 1 (a CHECK), so the cursor
    // `(nil uuid, 0)` sorts before every row, and `(stream, 0)` before every row of `stream`.
    let sql = match scope {
        Scope::All => format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE (stream_id, version) > ($1, $2) \
             ORDER BY stream_id, version LIMIT $3"
        ),
        Scope::Stream(_) => format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version > $2 \
             ORDER BY version LIMIT $3"
        ),
    };
    let mut cursor = match scope {
        Scope::All => (Uuid::nil(), 0_i64),
        Scope::Stream(id) => (id, 0_i64),
    };
    let mut checker = ChainChecker::new();
    loop {
        let after = cursor;
        let doing = || format!("reading events after stream {} version {}", after.0, after.1);
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(after.0)
            .bind(after.1)
            .bind(VERIFY_PAGE_EVENTS)
            .fetch_all(pool)
            .await
            .map_err(|e| VerifyError::from_sqlx(pool, doing(), e))?;
        for row in &rows {
            let event = stored_event(row).map_err(|e| VerifyError::from_sqlx(pool, doing(), e))?;
            if let Err(broken) = checker.check(&event) {
                progress(Progress {
                    done: checker.events_checked(),
                    total,
                });
                return Ok(VerifyReport {
                    events_checked: checker.events_checked(),
                    streams_checked: checker.streams_checked(),
                    first_break: Some(broken),
                });
            }
            cursor = (event.stream_id, event.version);
        }
        progress(Progress {
            done: checker.events_checked(),
            total,
        });
        if rows.len() < VERIFY_PAGE_EVENTS as usize {
            break;
        }
    }
    Ok(VerifyReport {
        events_checked: checker.events_checked(),
        streams_checked: checker.streams_checked(),
        first_break: None,
    })
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;

    /// A correctly chained stream of `versions` events.
    fn chain(stream_id: Uuid, versions: i64) -> Vec<StoredEvent> {
        let mut events: Vec<StoredEvent> = Vec::new();
        for version in 1..=versions {
            let mut event = StoredEvent {
                position: version * 10,
                tx_id: 1,
                stream_type: "account".into(),
                stream_id,
                version,
                event_id: Uuid::now_v7(),
                event_type: "FundsDeposited".into(),
                schema_version: 1,
                payload: format!(r#"{{"amount":{},"currency":"EUR"}}"#, version * 1000),
                metadata: "{}".into(),
                recorded_at: DateTime::from_timestamp(1_700_000_000 + version, 0).unwrap(),
                prev_hash: events.last().map(|p| p.hash.clone()),
                hash: Vec::new(),
            };
            event.hash = event.computed_hash().to_vec();
            events.push(event);
        }
        events
    }

    /// Feeds every event; the first break, with the counts at that point.
    fn run(events: &[StoredEvent]) -> (Option<ChainBreak>, u64, u64) {
        let mut checker = ChainChecker::new();
        let broken = events.iter().find_map(|e| checker.check(e).err());
        (broken, checker.events_checked(), checker.streams_checked())
    }

    fn two_streams() -> (Vec<StoredEvent>, Uuid, Uuid) {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut events = chain(a, 3);
        events.extend(chain(b, 4));
        (events, a, b)
    }

    #[test]
    fn intact_chains_of_several_streams_pass_and_are_counted() {
        let (events, _, _) = two_streams();

        let (broken, events_checked, streams_checked) = run(&events);

        assert_eq!(broken, None);
        assert_eq!((events_checked, streams_checked), (7, 2));
    }

    #[test]
    fn an_edited_payload_is_a_hash_mismatch_at_that_version() {
        let (mut events, _, b) = two_streams();
        events[4].payload = r#"{"amount":9000,"currency":"EUR"}"#.into();

        let (broken, events_checked, _) = run(&events);

        let broken = broken.expect("a break");
        assert_eq!((broken.stream_id, broken.version), (b, 2));
        assert_eq!(broken.kind, BreakKind::HashMismatch);
        assert_eq!(broken.position, events[4].position);
        assert_eq!(broken.event_id, events[4].event_id);
        assert_eq!(events_checked, 5);
    }

    #[test]
    fn an_edited_and_rehashed_event_breaks_the_link_of_the_next_version() {
        let (mut events, a, _) = two_streams();
        events[1].payload = r#"{"amount":9000,"currency":"EUR"}"#.into();
        events[1].hash = events[1].computed_hash().to_vec();

        let (broken, _, _) = run(&events);

        let broken = broken.expect("a break");
        assert_eq!(
            (broken.stream_id, broken.version, broken.kind),
            (a, 3, BreakKind::BrokenLink)
        );
    }

    #[test]
    fn a_missing_prev_hash_after_version_one_is_a_broken_link() {
        let (mut events, a, _) = two_streams();
        events[1].prev_hash = None;

        let (broken, _, _) = run(&events);

        let broken = broken.expect("a break");
        assert_eq!(
            (broken.stream_id, broken.version, broken.kind),
            (a, 2, BreakKind::BrokenLink)
        );
    }

    #[test]
    fn a_deleted_middle_event_is_a_version_gap_at_the_next_version() {
        let (mut events, _, b) = two_streams();
        events.remove(4);

        let (broken, _, _) = run(&events);

        let broken = broken.expect("a break");
        assert_eq!(
            (broken.stream_id, broken.version, broken.kind),
            (b, 3, BreakKind::VersionGap)
        );
        assert!(broken.detail.contains("expected version 2"), "{}", broken.detail);
    }

    #[test]
    fn a_stream_that_does_not_start_at_version_one_is_a_version_gap() {
        let (mut events, _, b) = two_streams();
        events.remove(3);

        let (broken, _, _) = run(&events);

        let broken = broken.expect("a break");
        assert_eq!(
            (broken.stream_id, broken.version, broken.kind),
            (b, 2, BreakKind::VersionGap)
        );
    }

    #[test]
    fn a_first_version_that_names_a_predecessor_is_a_bad_chain_start() {
        let (mut events, _, b) = two_streams();
        events[3].prev_hash = Some(vec![7; 32]);

        let (broken, _, _) = run(&events);

        let broken = broken.expect("a break");
        assert_eq!(
            (broken.stream_id, broken.version, broken.kind),
            (b, 1, BreakKind::ChainStart)
        );
    }

    #[test]
    fn a_malformed_stored_hash_is_a_mismatch_not_a_panic() {
        let (mut events, a, _) = two_streams();
        events[0].hash = vec![1, 2, 3];

        let (broken, _, _) = run(&events);

        let broken = broken.expect("a break");
        assert_eq!(
            (broken.stream_id, broken.version, broken.kind),
            (a, 1, BreakKind::HashMismatch)
        );
    }

    #[test]
    fn a_break_reads_as_stream_version_position_event_and_kind() {
        let (mut events, a, _) = two_streams();
        events[0].payload = "{}".into();

        let (broken, _, _) = run(&events);

        let text = broken.expect("a break").to_string();
        assert!(
            text.starts_with(&format!(
                "stream {a} version 1 (position 10, event {}): hash mismatch (",
                events[0].event_id
            )),
            "{text}"
        );
    }
}
