//! The account aggregate: one stream per account.
//!
//! Rules (checked on every command, before any event is emitted):
//! - an account is opened once, with an owner and a currency;
//! - deposits and withdrawals move a positive amount of minor units;
//! - `available = balance - held` never falls below `-overdraft_limit`.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::{AMOUNT_MAX_MINOR, AmountMinor, Currency};

/// The stream type under which account events are stored and published.
pub const STREAM_TYPE: &str = "account";
/// Longest accepted owner name, in characters.
pub const OWNER_LEN_MAX: usize = 200;
/// Longest accepted free-text reference on a posting, in characters.
pub const REFERENCE_LEN_MAX: usize = 200;

/// What a client may ask of an account.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountCommand {
    Open {
        account_id: Uuid,
        owner: String,
        currency: Currency,
        overdraft_limit: i64,
    },
    Deposit {
        amount: AmountMinor,
        reference: String,
    },
    Withdraw {
        amount: AmountMinor,
        reference: String,
    },
}

/// The account was opened. Always version 1 of its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountOpened {
    pub account_id: Uuid,
    pub owner: String,
    pub currency: Currency,
    /// How far below zero `available` may go, in minor units (0: no overdraft).
    pub overdraft_limit: i64,
}

/// Money arrived from outside the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FundsDeposited {
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
}

/// Money left the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FundsWithdrawn {
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
}

/// Everything that can happen to an account.
///
/// The stored form is the inner struct as JSON, with the type name in a separate column
/// (`event_type`) and its shape versioned in `schemas/` (`schema_version`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountEvent {
    AccountOpened(AccountOpened),
    FundsDeposited(FundsDeposited),
    FundsWithdrawn(FundsWithdrawn),
}

/// An event payload that does not decode into the current shape of its type.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown account event type {0:?}")]
    UnknownType(String),
    #[error("malformed {event_type} payload: {source}")]
    Malformed {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
}

impl AccountEvent {
    /// Every account event type with its current schema version. `schemas/` keeps one JSON
    /// Schema per entry and fails a test when this list and the checked-in files disagree.
    pub const TYPES: &'static [(&'static str, u32)] =
        &[("AccountOpened", 2), ("FundsDeposited", 1), ("FundsWithdrawn", 1)];

    pub fn type_name(&self) -> &'static str {
        match self {
            AccountEvent::AccountOpened(_) => "AccountOpened",
            AccountEvent::FundsDeposited(_) => "FundsDeposited",
            AccountEvent::FundsWithdrawn(_) => "FundsWithdrawn",
        }
    }

    /// The schema version this code writes for the event's type.
    pub fn schema_version(&self) -> u32 {
        let name = self.type_name();
        Self::TYPES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .expect("every variant is listed in TYPES")
    }

    /// The exact JSON text stored in the `payload` column.
    pub fn to_payload(&self) -> String {
        let result = match self {
            AccountEvent::AccountOpened(e) => serde_json::to_string(e),
            AccountEvent::FundsDeposited(e) => serde_json::to_string(e),
            AccountEvent::FundsWithdrawn(e) => serde_json::to_string(e),
        };
        // These structs hold only strings, integers and uuids: serialization cannot fail.
        result.expect("account events always serialize")
    }

    /// Decodes a payload already in the *current* schema version (upcasting happens in
    /// `tally-schemas` before this is called).
    pub fn from_payload(event_type: &str, payload: &str) -> Result<Self, DecodeError> {
        let malformed = |source| DecodeError::Malformed {
            event_type: event_type.to_owned(),
            source,
        };
        match event_type {
            "AccountOpened" => serde_json::from_str(payload)
                .map(AccountEvent::AccountOpened)
                .map_err(malformed),
            "FundsDeposited" => serde_json::from_str(payload)
                .map(AccountEvent::FundsDeposited)
                .map_err(malformed),
            "FundsWithdrawn" => serde_json::from_str(payload)
                .map(AccountEvent::FundsWithdrawn)
                .map_err(malformed),
            other => Err(DecodeError::UnknownType(other.to_owned())),
        }
    }
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> String {
        self.type_name().to_owned()
    }

    fn event_version(&self) -> String {
        self.schema_version().to_string()
    }
}

/// Why an account command was refused. Each variant has a stable machine-readable
/// [`code`](AccountError::code) that the command API puts in the problem `type`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// HTTP 409: an account with this id already exists.
    #[error("account already exists")]
    AlreadyExists,
    /// HTTP 404: no account with this id has been opened.
    #[error("account not found")]
    NotFound,
    /// HTTP 422.
    #[error("owner must be 1 to {OWNER_LEN_MAX} characters")]
    InvalidOwner,
    /// HTTP 422.
    #[error("reference must be at most {REFERENCE_LEN_MAX} characters")]
    InvalidReference,
    /// HTTP 422.
    #[error("overdraft limit must be between 0 and {AMOUNT_MAX_MINOR} minor units")]
    InvalidOverdraftLimit,
    /// HTTP 422: the debit would take `available` below `-overdraft_limit`.
    #[error("insufficient funds: {available} available, {requested} requested")]
    InsufficientFunds { available: i64, requested: i64 },
    /// HTTP 422: the balance would leave the range of a 64-bit integer.
    #[error("the balance would overflow")]
    BalanceOverflow,
}

impl AccountError {
    pub fn code(&self) -> &'static str {
        match self {
            AccountError::AlreadyExists => "account-exists",
            AccountError::NotFound => "account-not-found",
            AccountError::InvalidOwner => "invalid-owner",
            AccountError::InvalidReference => "invalid-reference",
            AccountError::InvalidOverdraftLimit => "invalid-overdraft-limit",
            AccountError::InsufficientFunds { .. } => "insufficient-funds",
            AccountError::BalanceOverflow => "balance-overflow",
        }
    }
}

/// Lifecycle of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    /// No `AccountOpened` yet: the stream is empty.
    #[default]
    Unopened,
    Open,
}

/// The state of one account, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub status: AccountStatus,
    pub account_id: Uuid,
    pub owner: String,
    /// `None` only while unopened.
    pub currency: Option<Currency>,
    pub balance: i64,
    pub held: i64,
    pub overdraft_limit: i64,
}

impl Account {
    /// `balance - held`: what a debit may use (plus the overdraft limit).
    pub fn available(&self) -> i64 {
        self.balance - self.held
    }

    fn require_open(&self) -> Result<Currency, AccountError> {
        match (self.status, self.currency) {
            (AccountStatus::Open, Some(currency)) => Ok(currency),
            _ => Err(AccountError::NotFound),
        }
    }
}

fn check_reference(reference: &str) -> Result<(), AccountError> {
    if reference.chars().count() > REFERENCE_LEN_MAX {
        return Err(AccountError::InvalidReference);
    }
    Ok(())
}

impl Aggregate for Account {
    const TYPE: &'static str = STREAM_TYPE;
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            AccountCommand::Open {
                account_id,
                owner,
                currency,
                overdraft_limit,
            } => {
                if self.status != AccountStatus::Unopened {
                    return Err(AccountError::AlreadyExists);
                }
                let owner_len = owner.trim().chars().count();
                if owner_len == 0 || owner.chars().count() > OWNER_LEN_MAX {
                    return Err(AccountError::InvalidOwner);
                }
                if !(0..=AMOUNT_MAX_MINOR).contains(&overdraft_limit) {
                    return Err(AccountError::InvalidOverdraftLimit);
                }
                AccountEvent::AccountOpened(AccountOpened {
                    account_id,
                    owner,
                    currency,
                    overdraft_limit,
                })
            }
            AccountCommand::Deposit { amount, reference } => {
                let currency = self.require_open()?;
                check_reference(&reference)?;
                self.balance
                    .checked_add(amount.get())
                    .ok_or(AccountError::BalanceOverflow)?;
                AccountEvent::FundsDeposited(FundsDeposited {
                    amount,
                    currency,
                    reference,
                })
            }
            AccountCommand::Withdraw { amount, reference } => {
                let currency = self.require_open()?;
                check_reference(&reference)?;
                let available = self.available();
                let after = available
                    .checked_sub(amount.get())
                    .ok_or(AccountError::BalanceOverflow)?;
                if after < -self.overdraft_limit {
                    return Err(AccountError::InsufficientFunds {
                        available,
                        requested: amount.get(),
                    });
                }
                AccountEvent::FundsWithdrawn(FundsWithdrawn {
                    amount,
                    currency,
                    reference,
                })
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        // `apply` must never fail: events are facts. Arithmetic here was checked by `handle`
        // before the event was accepted, so saturating only guards corrupt histories.
        match event {
            AccountEvent::AccountOpened(e) => {
                self.status = AccountStatus::Open;
                self.account_id = e.account_id;
                self.owner = e.owner;
                self.currency = Some(e.currency);
                self.overdraft_limit = e.overdraft_limit;
            }
            AccountEvent::FundsDeposited(e) => {
                self.balance = self.balance.saturating_add(e.amount.get());
            }
            AccountEvent::FundsWithdrawn(e) => {
                self.balance = self.balance.saturating_sub(e.amount.get());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type AccountTest = TestFramework<Account>;

    fn eur() -> Currency {
        "EUR".parse().unwrap()
    }

    fn amount(v: i64) -> AmountMinor {
        AmountMinor::new(v).unwrap()
    }

    fn id() -> Uuid {
        Uuid::from_u128(42)
    }

    fn opened(overdraft_limit: i64) -> AccountEvent {
        AccountEvent::AccountOpened(AccountOpened {
            account_id: id(),
            owner: "Ada".into(),
            currency: eur(),
            overdraft_limit,
        })
    }

    fn deposited(v: i64) -> AccountEvent {
        AccountEvent::FundsDeposited(FundsDeposited {
            amount: amount(v),
            currency: eur(),
            reference: "r".into(),
        })
    }

    fn withdrawn(v: i64) -> AccountEvent {
        AccountEvent::FundsWithdrawn(FundsWithdrawn {
            amount: amount(v),
            currency: eur(),
            reference: "r".into(),
        })
    }

    fn open_command(owner: &str, overdraft_limit: i64) -> AccountCommand {
        AccountCommand::Open {
            account_id: id(),
            owner: owner.into(),
            currency: eur(),
            overdraft_limit,
        }
    }

    #[test]
    fn opening_a_new_account_emits_account_opened() {
        AccountTest::with(())
            .given_no_previous_events()
            .when(open_command("Ada", 0))
            .then_expect_events(vec![opened(0)]);
    }

    #[test]
    fn opening_an_account_twice_is_refused() {
        AccountTest::with(())
            .given(vec![opened(0)])
            .when(open_command("Ada", 0))
            .then_expect_error(AccountError::AlreadyExists);
    }

    #[test]
    fn an_owner_must_not_be_blank_or_too_long() {
        AccountTest::with(())
            .given_no_previous_events()
            .when(open_command("   ", 0))
            .then_expect_error(AccountError::InvalidOwner);
        AccountTest::with(())
            .given_no_previous_events()
            .when(open_command(&"x".repeat(OWNER_LEN_MAX + 1), 0))
            .then_expect_error(AccountError::InvalidOwner);
    }

    #[test]
    fn a_negative_overdraft_limit_is_refused() {
        AccountTest::with(())
            .given_no_previous_events()
            .when(open_command("Ada", -1))
            .then_expect_error(AccountError::InvalidOverdraftLimit);
    }

    #[test]
    fn depositing_into_an_open_account_emits_funds_deposited() {
        AccountTest::with(())
            .given(vec![opened(0)])
            .when(AccountCommand::Deposit {
                amount: amount(1000),
                reference: "r".into(),
            })
            .then_expect_events(vec![deposited(1000)]);
    }

    #[test]
    fn depositing_into_an_unopened_account_is_refused() {
        AccountTest::with(())
            .given_no_previous_events()
            .when(AccountCommand::Deposit {
                amount: amount(1000),
                reference: "r".into(),
            })
            .then_expect_error(AccountError::NotFound);
    }

    #[test]
    fn a_too_long_reference_is_refused() {
        AccountTest::with(())
            .given(vec![opened(0)])
            .when(AccountCommand::Deposit {
                amount: amount(1),
                reference: "x".repeat(REFERENCE_LEN_MAX + 1),
            })
            .then_expect_error(AccountError::InvalidReference);
    }

    #[test]
    fn withdrawing_within_the_balance_emits_funds_withdrawn() {
        AccountTest::with(())
            .given(vec![opened(0), deposited(1000)])
            .when(AccountCommand::Withdraw {
                amount: amount(300),
                reference: "r".into(),
            })
            .then_expect_events(vec![withdrawn(300)]);
    }

    #[test]
    fn withdrawing_beyond_the_balance_is_refused() {
        AccountTest::with(())
            .given(vec![opened(0), deposited(1000), withdrawn(300)])
            .when(AccountCommand::Withdraw {
                amount: amount(701),
                reference: "r".into(),
            })
            .then_expect_error(AccountError::InsufficientFunds {
                available: 700,
                requested: 701,
            });
    }

    #[test]
    fn withdrawing_into_the_overdraft_is_allowed_up_to_its_limit() {
        AccountTest::with(())
            .given(vec![opened(500), deposited(100)])
            .when(AccountCommand::Withdraw {
                amount: amount(600),
                reference: "r".into(),
            })
            .then_expect_events(vec![withdrawn(600)]);
        AccountTest::with(())
            .given(vec![opened(500), deposited(100)])
            .when(AccountCommand::Withdraw {
                amount: amount(601),
                reference: "r".into(),
            })
            .then_expect_error(AccountError::InsufficientFunds {
                available: 100,
                requested: 601,
            });
    }

    #[test]
    fn a_deposit_that_would_overflow_the_balance_is_refused() {
        let huge = vec![opened(0)]
            .into_iter()
            .chain((0..9300).map(|_| deposited(AMOUNT_MAX_MINOR)))
            .collect();
        AccountTest::with(())
            .given(huge)
            .when(AccountCommand::Deposit {
                amount: amount(AMOUNT_MAX_MINOR),
                reference: "r".into(),
            })
            .then_expect_error(AccountError::BalanceOverflow);
    }

    #[test]
    fn payloads_round_trip_through_their_stored_form() {
        for event in [opened(7), deposited(5), withdrawn(3)] {
            let decoded = AccountEvent::from_payload(event.type_name(), &event.to_payload()).unwrap();
            assert_eq!(decoded, event);
        }
    }

    #[test]
    fn unknown_fields_in_a_payload_are_an_error_not_silently_dropped() {
        let err = AccountEvent::from_payload(
            "FundsDeposited",
            r#"{"amount":1,"currency":"EUR","reference":"r","extra":1}"#,
        );
        assert!(matches!(err, Err(DecodeError::Malformed { .. })));
    }
}
