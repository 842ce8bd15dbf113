//! Tally's ledger domain: money, accounts, the commands they accept and the events they emit.
//!
//! This crate does no IO. It knows nothing of HTTP, SQL or NATS: the aggregates here are pure
//! state machines (cqrs-es `Aggregate`), so every rule can be tested with given/when/then and no
//! database. The event store decides *where* events go; this crate decides *which* events happen.

pub mod account;
pub mod metadata;
pub mod money;

pub use account::{
    Account, AccountCommand, AccountError, AccountEvent, AccountOpened, AccountStatus, DecodeError, FundsDeposited,
    FundsWithdrawn,
};
pub use metadata::Metadata;
pub use money::{AMOUNT_MAX_MINOR, AmountMinor, Currency, MoneyError};
