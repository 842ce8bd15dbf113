//! Tally's ledger domain: money, accounts, transfers, the commands they accept and the events
//! they emit.
//!
//! This crate does no IO. It knows nothing of HTTP, SQL or NATS: the aggregates here are pure
//! state machines (cqrs-es `Aggregate`), so every rule can be tested with given/when/then and no
//! database. The event store decides *where* events go; this crate decides *which* events happen.
//!
//! - [`account`]: the account aggregate (one stream per account) and the events on it;
//! - [`transfer`]: the transfer stream (one per transfer id) that records a transfer's life cycle;
//! - [`entry`]: the journal-entry stream (one per entry id): a balanced movement of many legs;
//! - [`journal`]: the decision of an entry, all its legs or none;
//! - [`ledger`]: the decisions that span streams (transfers, holds: post, void, expire), as pure
//!   functions returning the events for each stream;
//! - [`profile`]: an account's external id, metadata and flags (the bounds on its balance);
//! - [`reservation`]: the external-id stream (one per external id) that keeps external ids
//!   unique in the ledger;
//! - [`system`]: the ledger's own accounts per currency (`world`, `transit`), the other side
//!   of deposits and withdrawals, so every movement is double-entry.

pub mod account;
pub mod entry;
pub mod journal;
pub mod ledger;
pub mod metadata;
pub mod money;
pub mod profile;
pub mod reservation;
pub mod system;
pub mod transfer;

pub use account::{
    Account, AccountClosed, AccountCommand, AccountError, AccountEvent, AccountFrozen, AccountOpened, AccountStatus,
    AccountUnfrozen, DecodeError, EntryCredited, EntryDebited, EntryHoldPlaced, EntryHoldPosted, EntryHoldReleased,
    FundsDeposited, FundsWithdrawn, Hold, HoldPlaced, HoldPosted, HoldReleaseReason, HoldReleased, TransferCredited,
    TransferDebited,
};
pub use entry::{
    Direction, Entry, EntryCompleted, EntryEvent, EntryExpired, EntryPending, EntryPosted, EntryStatus, EntryVoided,
    Leg,
};
pub use journal::{
    EntryCommand, EntryDecision, EntryMode, LegRequest, decide_entry, decide_entry_expire, decide_entry_post,
    decide_entry_void,
};
pub use ledger::{
    TransferCommand, TransferDecision, TransferMode, decide_expire, decide_post, decide_transfer, decide_void,
};
pub use metadata::Metadata;
pub use money::{AMOUNT_MAX_MINOR, AmountMinor, Currency, Money, MoneyError};
pub use profile::{AccountFlag, AccountProfile};
pub use reservation::{ExternalIdReserved, Reservation, ReservationEvent};
pub use system::SystemAccount;
pub use transfer::{
    Transfer, TransferCompleted, TransferEvent, TransferExpired, TransferPending, TransferPosted, TransferStatus,
    TransferVoided,
};
