//! The database side of signed checkpoints ([`crate::checkpoint`]): sealing the log, checking
//! the log against checkpoints, and inclusion proofs.
//!
//! - [`seal`] extends the last checkpoint's tree (its frontier) with the events committed
//!   since, read **gap-safely** like the relay (below `pg_snapshot_xmin`), and signs the new
//!   head. It takes no lock and writes nothing to `events`: appends never wait for it. A seal
//!   reads only the new events (three columns each); the first one reads the whole log.
//! - [`seal_into_history`] is one whole round, shared by `tally audit seal` and the periodic
//!   sealer ([`crate::sealer`]): the history file's last checkpoint, [`seal`], the new line
//!   appended (synced), and the copy published.
//! - [`check_log`] recomputes the tree over the log in commit order and compares it with every
//!   checkpoint given: the last event each covers, and the root at its size. One pass over the
//!   log, however many checkpoints.
//! - [`prove`] builds an event's RFC 6962 inclusion proof against a checkpoint: one pass over
//!   the first `tree_size` leaves (O(tree size) reading, O(log) memory).
//! - [`publish`] / [`published`]: the `audit_checkpoints` table, a convenience copy for the
//!   auditor API. Nothing checks a log against that copy: an auditor verifies against the
//!   history file it keeps.

use std::fmt;

use chrono::Utc;
use ed25519_dalek::SigningKey;
use sqlx::PgPool;
use sqlx::Row;
use uuid::Uuid;

use crate::checkpoint::{self, SignedCheckpoint, TreeHead};
use crate::merkle::{Frontier, Hash, InclusionProof, ProofBuilder, event_leaf_hash};
use crate::verify::VerifyError;
use crate::{Checkpoint, READ_LIMIT_MAX};

/// Leaves read per round trip (48 bytes of data each).
pub const SEAL_PAGE_EVENTS: i64 = READ_LIMIT_MAX;

/// One event as a leaf: its place in commit order and its chain hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Leaf {
    at: Checkpoint,
    hash: Hash,
}

impl Leaf {
    fn leaf_hash(&self) -> Hash {
        event_leaf_hash(self.at.tx_id, self.at.position, &self.hash)
    }
}

/// The next page of leaves after `after`, in commit order. `gap_safe`: only transactions older
/// than every one still running (what a seal may commit to); otherwise every committed row (a
/// check or a proof, whose leaves were all gap-safe when sealed, and must see rows a tamperer
/// wrote with any transaction id).
async fn leaves_after(pool: &PgPool, after: Checkpoint, gap_safe: bool) -> Result<Vec<Leaf>, sqlx::Error> {
    let horizon = if gap_safe {
        "AND tx_id < pg_snapshot_xmin(pg_current_snapshot())"
    } else {
        ""
    };
    let sql = format!(
        "SELECT tx_id::text::bigint, position, hash FROM events \
         WHERE (tx_id, position) > ($1::text::xid8, $2) {horizon} \
         ORDER BY events.tx_id, events.position LIMIT $3"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .persistent(false)
        .bind(after.tx_id.to_string())
        .bind(after.position)
        .bind(SEAL_PAGE_EVENTS)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| {
            let hash: Vec<u8> = row.try_get(2)?;
            Ok(Leaf {
                at: Checkpoint {
                    tx_id: row.try_get(0)?,
                    position: row.try_get(1)?,
                },
                // A stored hash of another length (the CHECK forbids it) still makes a leaf: it
                // then differs from the sealed one, which is the point.
                hash: Hash::try_from(hash.as_slice()).unwrap_or_else(|_| crate::merkle::leaf_hash(&hash)),
            })
        })
        .collect()
}

/// Why a seal failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// The previous checkpoint's frontier is missing or does not give its signed root.
    #[error("the last checkpoint (tree size {0}) carries no frontier that gives its root: cannot extend it")]
    NoFrontier(u64),
    #[error("database error while sealing: {0}")]
    Database(#[from] sqlx::Error),
}

/// What a seal did.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub checkpoint: SignedCheckpoint,
    /// Events added since the previous checkpoint (0: nothing new, and no new checkpoint).
    pub new_events: u64,
}

/// Seals the log: the tree of `previous` (checked with `key`) extended by every event
/// committed since, gap-safely, signed with `key`. With nothing new, returns `previous`
/// unchanged (`new_events` 0): the caller appends only a new checkpoint.
pub async fn seal(pool: &PgPool, key: &SigningKey, previous: Option<&SignedCheckpoint>) -> Result<Sealed, SealError> {
    let (mut frontier, mut last) = match previous {
        None => (Frontier::new(), Checkpoint::default()),
        Some(previous) => {
            let head = checkpoint::verify_signature(previous, &key.verifying_key())?;
            let frontier = checkpoint::stored_frontier(previous, &head).ok_or(SealError::NoFrontier(head.tree_size))?;
            (frontier, head.last)
        }
    };
    let before = frontier.size();
    loop {
        let page = leaves_after(pool, last, true).await?;
        for leaf in &page {
            frontier.push(leaf.leaf_hash());
        }
        if let Some(leaf) = page.last() {
            last = leaf.at;
        }
        if page.len() < SEAL_PAGE_EVENTS as usize {
            break;
        }
    }
    let new_events = frontier.size() - before;
    if let (0, Some(previous)) = (new_events, previous) {
        return Ok(Sealed {
            checkpoint: previous.clone(),
            new_events,
        });
    }
    let head = TreeHead {
        tree_size: frontier.size(),
        root: frontier.root(),
        last,
        created_at: checkpoint::format_created_at(Utc::now()),
    };
    Ok(Sealed {
        checkpoint: checkpoint::sign(&head, &frontier, key),
        new_events,
    })
}

/// What one round of [`seal_into_history`] did.
#[derive(Debug, Clone)]
pub struct Round {
    /// The history's last checkpoint after the round: the new one, or the one it had.
    pub checkpoint: SignedCheckpoint,
    /// Events the round added (0 when nothing was new: no line was appended).
    pub new_events: u64,
    /// Whether a line was appended to the history (also on the first seal of an empty log).
    pub appended: bool,
}

/// One round of sealing into the history file at `history`: extends its last checkpoint (its
/// signature checked with `key`) with the events committed since, appends the new checkpoint
/// (synced to disk before anything else), then, with `publish`, copies it to
/// `audit_checkpoints`. With nothing new it appends nothing.
///
/// Publishing comes last and is idempotent, and a round with nothing new publishes the
/// history's last checkpoint again: a copy a failed round could not publish is published by the
/// next one. A round cut off at any point leaves the history whole (a line is written with
/// one `write`, then synced).
pub async fn seal_into_history(
    pool: &PgPool,
    key: &SigningKey,
    history: &std::path::Path,
    publish: bool,
) -> Result<Round, SealError> {
    let previous = checkpoint::read_last(history)?;
    let sealed = seal(pool, key, previous.as_ref()).await?;
    let appended = previous.is_none() || sealed.new_events > 0;
    if appended {
        checkpoint::append(history, &sealed.checkpoint)?;
    }
    if publish {
        self::publish(pool, &sealed.checkpoint).await?;
    }
    Ok(Round {
        checkpoint: sealed.checkpoint,
        new_events: sealed.new_events,
        appended,
    })
}

/// How the log fails a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MismatchKind {
    /// The log has fewer events than the checkpoint covers.
    Missing,
    /// The event at the checkpoint's last leaf is not the one it sealed.
    LastMoved,
    /// The same number of events, the same last one, another root.
    Root,
}

/// The first checkpoint (by tree size) the log no longer matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub tree_size: u64,
    pub kind: MismatchKind,
    /// The largest checkpoint the log still matches: the change is after its last event.
    pub matches_up_to: Option<u64>,
    pub detail: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "checkpoint at tree size {}: {}", self.tree_size, self.detail)?;
        match self.matches_up_to {
            Some(size) => write!(
                f,
                " (the log still matches the checkpoint at tree size {size}: the change is after its first {size} events)"
            ),
            None => Ok(()),
        }
    }
}

/// The outcome of checking the log against checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogCheck {
    /// Events read (at most the largest tree size).
    pub leaves_checked: u64,
    pub checkpoints_matched: usize,
    pub first_mismatch: Option<Mismatch>,
}

fn at_text(at: Checkpoint) -> String {
    format!("{}.{}", at.tx_id, at.position)
}

/// Checks the log against `heads` (signatures already checked): recomputes the Merkle tree
/// over the log in commit order and, at each head's tree size, compares the last event and the
/// root. Stops at the first head the log fails.
pub async fn check_log(pool: &PgPool, heads: &[TreeHead]) -> Result<LogCheck, VerifyError> {
    let mut heads: Vec<&TreeHead> = heads.iter().collect();
    heads.sort_by_key(|h| h.tree_size);
    let mut state = CheckState {
        frontier: Frontier::new(),
        last_leaf: None,
        next: 0,
        matched: 0,
        matches_up_to: None,
    };
    let mut after = Checkpoint::default();
    let first_mismatch = 'read: loop {
        if let Some(mismatch) = state.check_due(&heads) {
            break Some(mismatch);
        }
        let Some(head) = heads.get(state.next) else {
            break None;
        };
        let page = leaves_after(pool, after, false)
            .await
            .map_err(|e| VerifyError::Database {
                doing: format!("reading the log after {}", at_text(after)),
                source: e,
            })?;
        if page.is_empty() {
            break Some(Mismatch {
                tree_size: head.tree_size,
                kind: MismatchKind::Missing,
                matches_up_to: state.matches_up_to,
                detail: format!(
                    "the log holds only {} events in commit order, the checkpoint sealed {}: events were deleted",
                    state.frontier.size(),
                    head.tree_size
                ),
            });
        }
        for leaf in &page {
            state.frontier.push(leaf.leaf_hash());
            state.last_leaf = Some(leaf.at);
            after = leaf.at;
            if let Some(mismatch) = state.check_due(&heads) {
                break 'read Some(mismatch);
            }
            if state.next == heads.len() {
                break 'read None;
            }
        }
    };
    Ok(LogCheck {
        leaves_checked: state.frontier.size(),
        checkpoints_matched: state.matched,
        first_mismatch,
    })
}

/// Where [`check_log`] is: the tree so far, and the next head to check.
struct CheckState {
    frontier: Frontier,
    last_leaf: Option<Checkpoint>,
    next: usize,
    matched: usize,
    matches_up_to: Option<u64>,
}

impl CheckState {
    /// Checks every head whose size the tree has reached (several checkpoints may share one).
    fn check_due(&mut self, heads: &[&TreeHead]) -> Option<Mismatch> {
        while let Some(head) = heads.get(self.next).filter(|h| h.tree_size == self.frontier.size()) {
            if let Some((kind, detail)) = check_head(head, &self.frontier, self.last_leaf) {
                return Some(Mismatch {
                    tree_size: head.tree_size,
                    kind,
                    matches_up_to: self.matches_up_to,
                    detail,
                });
            }
            self.matches_up_to = Some(head.tree_size);
            self.matched += 1;
            self.next += 1;
        }
        None
    }
}

/// What is wrong with the log at a head's size, if anything.
fn check_head(head: &TreeHead, frontier: &Frontier, last_leaf: Option<Checkpoint>) -> Option<(MismatchKind, String)> {
    let sealed_last = (head.tree_size > 0).then_some(head.last);
    if last_leaf != sealed_last {
        return Some((
            MismatchKind::LastMoved,
            format!(
                "leaf {} should be the event at {}, the log has {} there: events were inserted into or deleted \
                 from the sealed log",
                head.tree_size.saturating_sub(1),
                sealed_last.map_or_else(|| "nothing".into(), at_text),
                last_leaf.map_or_else(|| "nothing".into(), at_text),
            ),
        ));
    }
    let root = frontier.root();
    (root != head.root).then(|| {
        (
            MismatchKind::Root,
            format!(
                "the log's root is {}, the signed root {}: a sealed event was changed, re-hashed, moved or \
                 reordered",
                hex::encode(root),
                hex::encode(head.root)
            ),
        )
    })
}

/// An event's inclusion proof, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proved {
    Proof {
        /// The event's place in commit order and its chain hash (the leaf's data).
        at: Checkpoint,
        event_hash: Vec<u8>,
        proof: InclusionProof,
    },
    /// No event has this id.
    NoSuchEvent,
    /// The event is at `leaf_index`, beyond the tree (committed after the checkpoint).
    NotInTree { leaf_index: u64 },
    /// The log has fewer events than the tree: it no longer matches the checkpoint.
    LogTooShort { leaves: u64 },
}

/// The inclusion proof of event `event_id` in the first `tree_size` events of the log. The
/// proof's `root` is the log's: the caller compares it with the checkpoint's.
pub async fn prove(pool: &PgPool, event_id: Uuid, tree_size: u64) -> Result<Proved, sqlx::Error> {
    let row = sqlx::query("SELECT tx_id::text::bigint, position, hash FROM events WHERE event_id = $1")
        .bind(event_id)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else {
        return Ok(Proved::NoSuchEvent);
    };
    let at = Checkpoint {
        tx_id: row.try_get(0)?,
        position: row.try_get(1)?,
    };
    let event_hash: Vec<u8> = row.try_get(2)?;
    let index: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE (tx_id, position) < ($1::text::xid8, $2)")
        .bind(at.tx_id.to_string())
        .bind(at.position)
        .fetch_one(pool)
        .await?;
    let leaf_index = index as u64;
    let Some(mut builder) = ProofBuilder::new(leaf_index, tree_size) else {
        return Ok(Proved::NotInTree { leaf_index });
    };
    let mut after = Checkpoint::default();
    while builder.pushed() < tree_size {
        let page = leaves_after(pool, after, false).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.at;
        for leaf in &page {
            builder.push(leaf.leaf_hash());
        }
    }
    let pushed = builder.pushed();
    Ok(match builder.finish() {
        Some(proof) => Proved::Proof { at, event_hash, proof },
        None => Proved::LogTooShort { leaves: pushed },
    })
}

/// Stores `checkpoint` (without its frontier) in `audit_checkpoints`; a second seal of the same
/// size keeps the first.
pub async fn publish(pool: &PgPool, checkpoint: &SignedCheckpoint) -> Result<(), sqlx::Error> {
    let stored = SignedCheckpoint {
        frontier: Vec::new(),
        ..checkpoint.clone()
    };
    sqlx::query(
        "INSERT INTO audit_checkpoints (tree_size, checkpoint) VALUES ($1, $2::json) \
         ON CONFLICT (tree_size) DO NOTHING",
    )
    .bind(i64::try_from(stored.tree_size).unwrap_or(i64::MAX))
    .bind(serde_json::to_string(&stored).expect("a checkpoint always serializes"))
    .execute(pool)
    .await?;
    Ok(())
}

/// The published checkpoint of `tree_size`, or the latest when `None`. A row that is not a
/// checkpoint reads as none: the copy is a convenience, never evidence.
pub async fn published(pool: &PgPool, tree_size: Option<u64>) -> Result<Option<SignedCheckpoint>, sqlx::Error> {
    let text: Option<String> = match tree_size {
        Some(size) => {
            sqlx::query_scalar("SELECT checkpoint::text FROM audit_checkpoints WHERE tree_size = $1")
                .bind(i64::try_from(size).unwrap_or(i64::MAX))
                .fetch_optional(pool)
                .await?
        }
        None => {
            sqlx::query_scalar("SELECT checkpoint::text FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1")
                .fetch_optional(pool)
                .await?
        }
    };
    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
}
