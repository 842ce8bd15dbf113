//! Decisions that span streams: transfers between two accounts, and the two-phase (pending)
//! transfers that hold money on the source until posted, voided or expired.
//!
//! These are pure functions of the current states (a domain service): they return the events
//! for each stream touched, in a [`TransferDecision`], and never change their inputs, so a
//! refusal leaves no trace. The command side appends all of a decision's events in one
//! transaction, with the versions it loaded as the expected versions of every stream it
//! appends to, and re-decides on a conflict.
//!
//! | decision | source account | destination account | transfer stream |
//! |---|---|---|---|
//! | immediate transfer | `TransferDebited` | `TransferCredited` | `TransferCompleted` (at version 0) |
//! | pending transfer | `HoldPlaced` | — | `TransferPending` (at version 0) |
//! | post | `HoldPosted` | `TransferCredited` | `TransferPosted` |
//! | void | `HoldReleased` (voided) | — | `TransferVoided` |
//! | expire | `HoldReleased` (expired) | — | `TransferExpired` |
//!
//! Rules beyond those of a single account:
//! - source and destination differ and share a currency (a command's currency, when given,
//!   must be theirs too);
//! - the source must be open and not frozen (money leaves it); the destination must exist and not
//!   be closed (a frozen destination still accepts credits);
//! - posting is a debit: it is refused on a frozen source and after the hold's deadline
//!   (`expires_at <= now`); void and expire only return money, so a frozen source accepts them;
//! - expiry happens only at or after the deadline and only to a pending transfer, so a second
//!   expiry worker gets `transfer-not-pending` (or a conflict), never a second release.
//!
//! Passing an account other than the one the command or transfer names is a programmer error
//! and panics; an unopened (default) account stands for "not found" and is refused.

use chrono::{DateTime, TimeDelta, Utc};
use cqrs_es::Aggregate;
use uuid::Uuid;

use crate::account::{
    Account, AccountError, AccountEvent, AccountStatus, HOLDS_MAX, Hold, HoldPlaced, HoldPosted, HoldReleaseReason,
    HoldReleased, TransferCredited, TransferDebited, check_reference,
};
use crate::money::{AmountMinor, Currency};
use crate::transfer::{
    EXPIRES_IN_S_MAX, EXPIRES_IN_S_MIN, Transfer, TransferCompleted, TransferEvent, TransferExpired, TransferPending,
    TransferPosted, TransferStatus, TransferVoided,
};

/// Whether a transfer moves the money now or holds it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferMode {
    /// Debit and credit in one step.
    Immediate,
    /// Hold the amount on the source for `expires_in_s` seconds
    /// ([`EXPIRES_IN_S_MIN`]`..=`[`EXPIRES_IN_S_MAX`]), to be posted, voided or expired.
    Pending { expires_in_s: i64 },
}

/// A request to move money from one account to another.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferCommand {
    /// Client-chosen (or server-generated) id; usable once.
    pub transfer_id: Uuid,
    pub from: Uuid,
    pub to: Uuid,
    pub amount: AmountMinor,
    /// The currency the client meant, if it said; must be the accounts' currency.
    pub currency: Option<Currency>,
    pub reference: String,
    pub mode: TransferMode,
}

/// The events each stream gets from one accepted decision. An empty list means the stream is
/// not appended to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferDecision {
    /// For the source account's stream.
    pub from_events: Vec<AccountEvent>,
    /// For the destination account's stream.
    pub to_events: Vec<AccountEvent>,
    /// For the transfer's own stream (stream type `transfer`, stream id = transfer id).
    pub transfer_events: Vec<TransferEvent>,
}

impl TransferDecision {
    /// Folds the decision's events into the states it was decided on, giving the states after
    /// the append (e.g. for the command's response, or an in-memory cache).
    pub fn apply_to(&self, from: &mut Account, to: &mut Account, transfer: &mut Transfer) {
        for event in &self.from_events {
            from.apply(event.clone());
        }
        for event in &self.to_events {
            to.apply(event.clone());
        }
        for event in &self.transfer_events {
            transfer.apply(event.clone());
        }
    }
}

/// Panics unless `account` is unopened or is the account `account_id`: the caller loaded the
/// wrong stream.
fn assert_is(account: &Account, account_id: Uuid, role: &str) {
    assert!(
        account.status == AccountStatus::Unopened || account.account_id == account_id,
        "the {role} account passed is {}, not {account_id}",
        account.account_id
    );
}

fn same_currency(expected: Currency, actual: Currency) -> Result<(), AccountError> {
    if expected == actual {
        Ok(())
    } else {
        Err(AccountError::CurrencyMismatch { expected, actual })
    }
}

/// The deadline of a hold that lives `expires_in_s` seconds from `now`.
pub fn hold_deadline(now: DateTime<Utc>, expires_in_s: i64) -> Result<DateTime<Utc>, AccountError> {
    let invalid = AccountError::InvalidExpiry { expires_in_s };
    if !(EXPIRES_IN_S_MIN..=EXPIRES_IN_S_MAX).contains(&expires_in_s) {
        return Err(invalid);
    }
    TimeDelta::try_seconds(expires_in_s)
        .and_then(|delta| now.checked_add_signed(delta))
        .ok_or(invalid)
}

/// Decides an immediate or pending transfer. `transfer` is the state of the transfer stream
/// named by `cmd.transfer_id` (`Transfer::default()` when empty); `from` and `to` are the
/// accounts named by the command (`Account::default()` when their stream is empty).
pub fn decide_transfer(
    cmd: &TransferCommand,
    from: &Account,
    to: &Account,
    transfer: &Transfer,
    now: DateTime<Utc>,
) -> Result<TransferDecision, AccountError> {
    if transfer.status != TransferStatus::NotCreated {
        return Err(AccountError::TransferExists {
            transfer_id: cmd.transfer_id,
        });
    }
    if cmd.from == cmd.to {
        return Err(AccountError::TransferToSelf);
    }
    check_reference(&cmd.reference)?;
    let expires_at = match cmd.mode {
        TransferMode::Immediate => None,
        TransferMode::Pending { expires_in_s } => Some(hold_deadline(now, expires_in_s)?),
    };
    assert_is(from, cmd.from, "source");
    assert_is(to, cmd.to, "destination");
    let currency = from.require_debitable(cmd.from)?;
    let to_currency = to.require_usable(cmd.to)?;
    same_currency(currency, to_currency)?;
    if let Some(requested) = cmd.currency {
        same_currency(currency, requested)?;
    }
    from.check_available(cmd.amount)?;

    let decision = match expires_at {
        None => {
            to.check_credit(cmd.amount)?;
            TransferDecision {
                from_events: vec![AccountEvent::TransferDebited(TransferDebited {
                    transfer_id: cmd.transfer_id,
                    amount: cmd.amount,
                    currency,
                    counterparty: cmd.to,
                    reference: cmd.reference.clone(),
                })],
                to_events: vec![AccountEvent::TransferCredited(TransferCredited {
                    transfer_id: cmd.transfer_id,
                    amount: cmd.amount,
                    currency,
                    counterparty: cmd.from,
                    reference: cmd.reference.clone(),
                })],
                transfer_events: vec![TransferEvent::TransferCompleted(TransferCompleted {
                    transfer_id: cmd.transfer_id,
                    from: cmd.from,
                    to: cmd.to,
                    amount: cmd.amount,
                    currency,
                    reference: cmd.reference.clone(),
                    completed_at: now,
                })],
            }
        }
        Some(expires_at) => {
            if from.holds.len() >= HOLDS_MAX {
                return Err(AccountError::TooManyHolds);
            }
            from.held
                .checked_add(cmd.amount.get())
                .ok_or(AccountError::BalanceOverflow)?;
            TransferDecision {
                from_events: vec![AccountEvent::HoldPlaced(HoldPlaced {
                    transfer_id: cmd.transfer_id,
                    amount: cmd.amount,
                    currency,
                    counterparty: cmd.to,
                    expires_at,
                    reference: cmd.reference.clone(),
                })],
                // The destination is only checked, not written: it is credited when (and if)
                // the hold is posted, and checked again then.
                to_events: Vec::new(),
                transfer_events: vec![TransferEvent::TransferPending(TransferPending {
                    transfer_id: cmd.transfer_id,
                    from: cmd.from,
                    to: cmd.to,
                    amount: cmd.amount,
                    currency,
                    reference: cmd.reference.clone(),
                    created_at: now,
                    expires_at,
                })],
            }
        }
    };
    Ok(decision)
}

/// The deadline of a pending transfer, or why it is not pending.
fn require_pending(transfer: &Transfer) -> Result<DateTime<Utc>, AccountError> {
    match (transfer.status, transfer.expires_at) {
        (TransferStatus::NotCreated, _) => Err(AccountError::TransferNotFound),
        (TransferStatus::Pending, Some(expires_at)) => Ok(expires_at),
        (status, _) => Err(AccountError::TransferNotPending { status }),
    }
}

/// The hold of a pending transfer on its source account.
///
/// The transfer says pending but the account has no hold only when the two streams were read
/// at different moments (a post, void or expiry committed in between): a stale read, which the
/// command side retries like a concurrency conflict.
fn require_hold<'a>(transfer: &Transfer, from: &'a Account) -> Result<&'a Hold, AccountError> {
    from.holds.get(&transfer.transfer_id).ok_or(AccountError::StaleState)
}

/// Decides posting a pending transfer: `amount` (default: the whole hold) moves from `from` to
/// `to`, the rest of the hold is released.
pub fn decide_post(
    transfer: &Transfer,
    from: &Account,
    to: &Account,
    amount: Option<AmountMinor>,
    now: DateTime<Utc>,
) -> Result<TransferDecision, AccountError> {
    let expires_at = require_pending(transfer)?;
    if now >= expires_at {
        return Err(AccountError::HoldExpired { expires_at });
    }
    assert_is(from, transfer.from, "source");
    assert_is(to, transfer.to, "destination");
    // Posting moves money out of the source: a frozen source refuses it (the hold stays until
    // voided or expired, or the account is unfrozen).
    let currency = from.require_debitable(transfer.from)?;
    let to_currency = to.require_usable(transfer.to)?;
    same_currency(currency, to_currency)?;
    let hold = require_hold(transfer, from)?;
    let amount = amount.unwrap_or(hold.amount);
    if amount > hold.amount {
        return Err(AccountError::AmountExceedsHold {
            held: hold.amount.get(),
            requested: amount.get(),
        });
    }
    to.check_credit(amount)?;
    // Cannot fail for a state decide produced (the hold is covered), but stays checked.
    from.balance
        .checked_sub(amount.get())
        .ok_or(AccountError::BalanceOverflow)?;
    Ok(TransferDecision {
        from_events: vec![AccountEvent::HoldPosted(HoldPosted {
            transfer_id: transfer.transfer_id,
            amount,
            currency,
            released: hold.amount.get() - amount.get(),
        })],
        to_events: vec![AccountEvent::TransferCredited(TransferCredited {
            transfer_id: transfer.transfer_id,
            amount,
            currency,
            counterparty: transfer.from,
            reference: transfer.reference.clone(),
        })],
        transfer_events: vec![TransferEvent::TransferPosted(TransferPosted { amount, posted_at: now })],
    })
}

fn release(
    transfer: &Transfer,
    from: &Account,
    reason: HoldReleaseReason,
    now: DateTime<Utc>,
) -> Result<TransferDecision, AccountError> {
    assert_is(from, transfer.from, "source");
    // Releasing returns money: a frozen source accepts it. (A closed or missing source cannot
    // hold anything; refused all the same.)
    let currency = from.require_usable(transfer.from)?;
    let hold = require_hold(transfer, from)?;
    let transfer_event = match reason {
        HoldReleaseReason::Voided => TransferEvent::TransferVoided(TransferVoided { voided_at: now }),
        HoldReleaseReason::Expired => TransferEvent::TransferExpired(TransferExpired { expired_at: now }),
    };
    Ok(TransferDecision {
        from_events: vec![AccountEvent::HoldReleased(HoldReleased {
            transfer_id: transfer.transfer_id,
            amount: hold.amount,
            currency,
            reason,
        })],
        to_events: Vec::new(),
        transfer_events: vec![transfer_event],
    })
}

/// Decides voiding a pending transfer: its hold is released in full, nothing moves. Allowed
/// until the transfer is final, even past the deadline.
pub fn decide_void(transfer: &Transfer, from: &Account, now: DateTime<Utc>) -> Result<TransferDecision, AccountError> {
    require_pending(transfer)?;
    release(transfer, from, HoldReleaseReason::Voided, now)
}

/// Decides expiring a pending transfer whose deadline has passed (`now >= expires_at`). Run by
/// the expiry worker; a transfer already final is refused (`transfer-not-pending`), so two
/// workers never release one hold twice.
pub fn decide_expire(
    transfer: &Transfer,
    from: &Account,
    now: DateTime<Utc>,
) -> Result<TransferDecision, AccountError> {
    let expires_at = require_pending(transfer)?;
    if now < expires_at {
        return Err(AccountError::HoldNotExpired { expires_at });
    }
    release(transfer, from, HoldReleaseReason::Expired, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::{AccountCommand, AccountError as E};
    use crate::profile::AccountProfile;

    fn eur() -> Currency {
        "EUR".parse().unwrap()
    }

    fn usd() -> Currency {
        "USD".parse().unwrap()
    }

    fn amount(v: i64) -> AmountMinor {
        AmountMinor::new(v).unwrap()
    }

    const A: Uuid = Uuid::from_u128(1);
    const B: Uuid = Uuid::from_u128(2);
    const T: Uuid = Uuid::from_u128(100);

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn later(s: i64) -> DateTime<Utc> {
        now() + TimeDelta::seconds(s)
    }

    /// An account folded from `commands`, each of which must be accepted.
    fn account(id: Uuid, currency: Currency, overdraft_limit: i64, commands: Vec<AccountCommand>) -> Account {
        let mut account = Account::default();
        let open = AccountCommand::Open {
            account_id: id,
            owner: "Ada".into(),
            currency,
            overdraft_limit,
            profile: AccountProfile::default(),
        };
        for command in std::iter::once(open).chain(commands) {
            for event in account.decide(command).unwrap() {
                account.apply(event);
            }
        }
        account
    }

    fn funded(id: Uuid, balance: i64) -> Account {
        let deposits = (balance > 0)
            .then(|| AccountCommand::Deposit {
                amount: amount(balance),
                reference: "seed".into(),
            })
            .into_iter()
            .collect();
        account(id, eur(), 0, deposits)
    }

    fn with(mut account: Account, command: AccountCommand) -> Account {
        for event in account.decide(command).unwrap() {
            account.apply(event);
        }
        account
    }

    fn freeze() -> AccountCommand {
        AccountCommand::Freeze { reason: "fraud".into() }
    }

    fn immediate(v: i64) -> TransferCommand {
        TransferCommand {
            transfer_id: T,
            from: A,
            to: B,
            amount: amount(v),
            currency: None,
            reference: "rent".into(),
            mode: TransferMode::Immediate,
        }
    }

    fn pending(v: i64, expires_in_s: i64) -> TransferCommand {
        TransferCommand {
            mode: TransferMode::Pending { expires_in_s },
            ..immediate(v)
        }
    }

    /// Source, destination and transfer after an accepted pending transfer of `v` out of a
    /// source holding 100, expiring in an hour.
    fn held(v: i64) -> (Account, Account, Transfer) {
        let (mut from, mut to, mut transfer) = (funded(A, 100), funded(B, 0), Transfer::default());
        decide_transfer(&pending(v, 3600), &from, &to, &transfer, now())
            .unwrap()
            .apply_to(&mut from, &mut to, &mut transfer);
        (from, to, transfer)
    }

    fn refused(result: Result<TransferDecision, AccountError>) -> AccountError {
        result.expect_err("the decision was accepted")
    }

    #[test]
    fn an_immediate_transfer_debits_the_source_credits_the_destination_and_completes() {
        let (from, to) = (funded(A, 100), funded(B, 0));

        let decision = decide_transfer(&immediate(30), &from, &to, &Transfer::default(), now()).unwrap();

        assert_eq!(
            decision.from_events,
            vec![AccountEvent::TransferDebited(TransferDebited {
                transfer_id: T,
                amount: amount(30),
                currency: eur(),
                counterparty: B,
                reference: "rent".into(),
            })]
        );
        assert_eq!(
            decision.to_events,
            vec![AccountEvent::TransferCredited(TransferCredited {
                transfer_id: T,
                amount: amount(30),
                currency: eur(),
                counterparty: A,
                reference: "rent".into(),
            })]
        );
        assert_eq!(
            decision.transfer_events,
            vec![TransferEvent::TransferCompleted(TransferCompleted {
                transfer_id: T,
                from: A,
                to: B,
                amount: amount(30),
                currency: eur(),
                reference: "rent".into(),
                completed_at: now(),
            })]
        );
        let (mut from, mut to, mut transfer) = (from, to, Transfer::default());
        decision.apply_to(&mut from, &mut to, &mut transfer);
        assert_eq!((from.balance, to.balance), (70, 30));
        assert_eq!(transfer.status, TransferStatus::Completed);
        assert_eq!(transfer.posted_amount, 30);
    }

    #[test]
    fn an_immediate_transfer_may_use_the_overdraft() {
        let from = account(A, eur(), 50, vec![]);
        assert!(decide_transfer(&immediate(50), &from, &funded(B, 1), &Transfer::default(), now()).is_ok());
        assert_eq!(
            refused(decide_transfer(
                &immediate(51),
                &from,
                &funded(B, 1),
                &Transfer::default(),
                now()
            )),
            E::InsufficientFunds {
                available: 0,
                requested: 51
            }
        );
    }

    #[test]
    fn a_pending_transfer_places_a_hold_on_the_source_only() {
        let (from, to) = (funded(A, 100), funded(B, 0));

        let decision = decide_transfer(&pending(40, 60), &from, &to, &Transfer::default(), now()).unwrap();

        assert_eq!(
            decision.from_events,
            vec![AccountEvent::HoldPlaced(HoldPlaced {
                transfer_id: T,
                amount: amount(40),
                currency: eur(),
                counterparty: B,
                expires_at: later(60),
                reference: "rent".into(),
            })]
        );
        assert!(decision.to_events.is_empty());
        assert_eq!(
            decision.transfer_events,
            vec![TransferEvent::TransferPending(TransferPending {
                transfer_id: T,
                from: A,
                to: B,
                amount: amount(40),
                currency: eur(),
                reference: "rent".into(),
                created_at: now(),
                expires_at: later(60),
            })]
        );
        let (from, _, transfer) = held(40);
        assert_eq!((from.balance, from.held, from.available()), (100, 40, 60));
        assert_eq!(transfer.status, TransferStatus::Pending);
        assert_eq!(transfer.expires_at, Some(later(3600)));
    }

    #[test]
    fn posting_a_whole_hold_moves_it_to_the_destination() {
        let (mut from, mut to, mut transfer) = held(40);

        let decision = decide_post(&transfer, &from, &to, None, later(10)).unwrap();

        assert_eq!(
            decision.from_events,
            vec![AccountEvent::HoldPosted(HoldPosted {
                transfer_id: T,
                amount: amount(40),
                currency: eur(),
                released: 0,
            })]
        );
        assert_eq!(
            decision.to_events,
            vec![AccountEvent::TransferCredited(TransferCredited {
                transfer_id: T,
                amount: amount(40),
                currency: eur(),
                counterparty: A,
                reference: "rent".into(),
            })]
        );
        assert_eq!(
            decision.transfer_events,
            vec![TransferEvent::TransferPosted(TransferPosted {
                amount: amount(40),
                posted_at: later(10),
            })]
        );
        decision.apply_to(&mut from, &mut to, &mut transfer);
        assert_eq!((from.balance, from.held, to.balance), (60, 0, 40));
        assert_eq!(transfer.status, TransferStatus::Posted);
    }

    #[test]
    fn posting_part_of_a_hold_moves_that_part_and_releases_the_rest() {
        let (mut from, mut to, mut transfer) = held(40);

        let decision = decide_post(&transfer, &from, &to, Some(amount(25)), later(10)).unwrap();

        assert_eq!(
            decision.from_events,
            vec![AccountEvent::HoldPosted(HoldPosted {
                transfer_id: T,
                amount: amount(25),
                currency: eur(),
                released: 15,
            })]
        );
        decision.apply_to(&mut from, &mut to, &mut transfer);
        assert_eq!((from.balance, from.held, from.available(), to.balance), (75, 0, 75, 25));
        assert_eq!(transfer.posted_amount, 25);
    }

    #[test]
    fn posting_more_than_the_hold_is_refused() {
        let (from, to, transfer) = held(40);
        assert_eq!(
            refused(decide_post(&transfer, &from, &to, Some(amount(41)), later(10))),
            E::AmountExceedsHold {
                held: 40,
                requested: 41
            }
        );
    }

    #[test]
    fn posting_at_or_after_the_deadline_is_refused() {
        let (from, to, transfer) = held(40);
        for at in [later(3600), later(3601)] {
            assert_eq!(
                refused(decide_post(&transfer, &from, &to, None, at)),
                E::HoldExpired {
                    expires_at: later(3600)
                }
            );
        }
    }

    #[test]
    fn posting_from_a_frozen_source_is_refused() {
        let (from, to, transfer) = held(40);
        assert_eq!(
            refused(decide_post(&transfer, &with(from, freeze()), &to, None, later(1))),
            E::Frozen { account_id: A }
        );
    }

    #[test]
    fn posting_to_a_closed_destination_is_refused() {
        let (from, to, transfer) = held(40);
        assert_eq!(
            refused(decide_post(
                &transfer,
                &from,
                &with(to, AccountCommand::Close),
                None,
                later(1)
            )),
            E::Closed { account_id: B }
        );
    }

    #[test]
    fn a_transfer_that_is_not_pending_cannot_be_posted_voided_or_expired() {
        let (mut from, mut to, mut transfer) = held(40);
        decide_void(&transfer, &from, later(1))
            .unwrap()
            .apply_to(&mut from, &mut to, &mut transfer);
        let not_pending = E::TransferNotPending {
            status: TransferStatus::Voided,
        };
        assert_eq!(refused(decide_post(&transfer, &from, &to, None, later(2))), not_pending);
        assert_eq!(refused(decide_void(&transfer, &from, later(2))), not_pending);
        assert_eq!(refused(decide_expire(&transfer, &from, later(4000))), not_pending);

        let (mut from, mut to, mut completed) = (funded(A, 100), funded(B, 0), Transfer::default());
        decide_transfer(&immediate(10), &from, &to, &completed, now())
            .unwrap()
            .apply_to(&mut from, &mut to, &mut completed);
        assert_eq!(
            refused(decide_post(&completed, &from, &to, None, later(1))),
            E::TransferNotPending {
                status: TransferStatus::Completed
            }
        );
    }

    #[test]
    fn an_unknown_transfer_cannot_be_posted_voided_or_expired() {
        let none = Transfer::default();
        let nobody = Account::default();
        assert_eq!(
            refused(decide_post(&none, &nobody, &nobody, None, now())),
            E::TransferNotFound
        );
        assert_eq!(refused(decide_void(&none, &nobody, now())), E::TransferNotFound);
        assert_eq!(refused(decide_expire(&none, &nobody, now())), E::TransferNotFound);
    }

    #[test]
    fn voiding_releases_the_whole_hold() {
        let (mut from, mut to, mut transfer) = held(40);

        let decision = decide_void(&transfer, &from, later(5)).unwrap();

        assert_eq!(
            decision.from_events,
            vec![AccountEvent::HoldReleased(HoldReleased {
                transfer_id: T,
                amount: amount(40),
                currency: eur(),
                reason: HoldReleaseReason::Voided,
            })]
        );
        assert!(decision.to_events.is_empty());
        assert_eq!(
            decision.transfer_events,
            vec![TransferEvent::TransferVoided(TransferVoided { voided_at: later(5) })]
        );
        decision.apply_to(&mut from, &mut to, &mut transfer);
        assert_eq!((from.balance, from.held, to.balance), (100, 0, 0));
        assert_eq!(transfer.status, TransferStatus::Voided);
    }

    #[test]
    fn a_frozen_source_may_still_void_its_holds() {
        let (from, _, transfer) = held(40);
        assert!(decide_void(&transfer, &with(from, freeze()), later(5)).is_ok());
    }

    #[test]
    fn expiring_at_the_deadline_releases_the_hold_once() {
        let (mut from, mut to, mut transfer) = held(40);

        let decision = decide_expire(&transfer, &from, later(3600)).unwrap();

        assert_eq!(
            decision.from_events,
            vec![AccountEvent::HoldReleased(HoldReleased {
                transfer_id: T,
                amount: amount(40),
                currency: eur(),
                reason: HoldReleaseReason::Expired,
            })]
        );
        assert_eq!(
            decision.transfer_events,
            vec![TransferEvent::TransferExpired(TransferExpired {
                expired_at: later(3600)
            })]
        );
        decision.apply_to(&mut from, &mut to, &mut transfer);
        assert_eq!((from.held, transfer.status), (0, TransferStatus::Expired));
        // A second expiry worker, with fresh state, is refused.
        assert_eq!(
            refused(decide_expire(&transfer, &from, later(3601))),
            E::TransferNotPending {
                status: TransferStatus::Expired
            }
        );
    }

    #[test]
    fn expiring_before_the_deadline_is_refused() {
        let (from, _, transfer) = held(40);
        assert_eq!(
            refused(decide_expire(&transfer, &from, later(3599))),
            E::HoldNotExpired {
                expires_at: later(3600)
            }
        );
    }

    #[test]
    fn a_transfer_and_account_read_at_different_moments_is_a_conflict() {
        // The transfer was read while pending, the account after a void had removed the hold.
        let (from, to, transfer) = held(40);
        let (mut after, mut to2, mut t2) = (from, to.clone(), transfer.clone());
        decide_void(&transfer, &after, later(1))
            .unwrap()
            .apply_to(&mut after, &mut to2, &mut t2);
        let stale = refused(decide_post(&transfer, &after, &to, None, later(2)));
        assert_eq!(stale, E::StaleState);
        assert_eq!(stale.code(), "concurrency-conflict");
        assert_eq!(refused(decide_expire(&transfer, &after, later(4000))), E::StaleState);
    }

    #[test]
    fn a_used_transfer_id_is_refused() {
        let (from, to, transfer) = held(40);
        assert_eq!(
            refused(decide_transfer(&immediate(1), &from, &to, &transfer, now())),
            E::TransferExists { transfer_id: T }
        );
    }

    #[test]
    fn a_transfer_to_the_same_account_is_refused() {
        let from = funded(A, 100);
        let cmd = TransferCommand { to: A, ..immediate(1) };
        assert_eq!(
            refused(decide_transfer(&cmd, &from, &from, &Transfer::default(), now())),
            E::TransferToSelf
        );
    }

    #[test]
    fn a_transfer_between_currencies_is_refused() {
        let to = account(B, usd(), 0, vec![]);
        assert_eq!(
            refused(decide_transfer(
                &immediate(1),
                &funded(A, 100),
                &to,
                &Transfer::default(),
                now()
            )),
            E::CurrencyMismatch {
                expected: eur(),
                actual: usd()
            }
        );
    }

    #[test]
    fn a_transfer_in_another_currency_than_the_accounts_is_refused() {
        let cmd = TransferCommand {
            currency: Some(usd()),
            ..immediate(1)
        };
        assert_eq!(
            refused(decide_transfer(
                &cmd,
                &funded(A, 100),
                &funded(B, 0),
                &Transfer::default(),
                now()
            )),
            E::CurrencyMismatch {
                expected: eur(),
                actual: usd()
            }
        );
        let cmd = TransferCommand {
            currency: Some(eur()),
            ..immediate(1)
        };
        assert!(decide_transfer(&cmd, &funded(A, 100), &funded(B, 0), &Transfer::default(), now()).is_ok());
    }

    #[test]
    fn a_transfer_from_or_to_an_unopened_account_is_refused() {
        let none = Account::default();
        assert_eq!(
            refused(decide_transfer(
                &immediate(1),
                &none,
                &funded(B, 0),
                &Transfer::default(),
                now()
            )),
            E::AccountNotFound { account_id: A }
        );
        let err = refused(decide_transfer(
            &immediate(1),
            &funded(A, 9),
            &none,
            &Transfer::default(),
            now(),
        ));
        assert_eq!(err, E::AccountNotFound { account_id: B });
        assert_eq!(err.code(), "account-not-found");
    }

    #[test]
    fn a_transfer_from_or_to_a_closed_account_is_refused() {
        let closed_a = with(account(A, eur(), 0, vec![]), AccountCommand::Close);
        let closed_b = with(account(B, eur(), 0, vec![]), AccountCommand::Close);
        assert_eq!(
            refused(decide_transfer(
                &immediate(1),
                &closed_a,
                &funded(B, 0),
                &Transfer::default(),
                now()
            )),
            E::Closed { account_id: A }
        );
        assert_eq!(
            refused(decide_transfer(
                &pending(1, 60),
                &funded(A, 9),
                &closed_b,
                &Transfer::default(),
                now()
            )),
            E::Closed { account_id: B }
        );
    }

    #[test]
    fn a_transfer_from_a_frozen_account_is_refused() {
        for cmd in [immediate(1), pending(1, 60)] {
            assert_eq!(
                refused(decide_transfer(
                    &cmd,
                    &with(funded(A, 9), freeze()),
                    &funded(B, 0),
                    &Transfer::default(),
                    now()
                )),
                E::Frozen { account_id: A }
            );
        }
    }

    #[test]
    fn a_frozen_destination_still_receives_transfers() {
        let to = with(funded(B, 0), freeze());
        assert!(decide_transfer(&immediate(1), &funded(A, 9), &to, &Transfer::default(), now()).is_ok());
    }

    #[test]
    fn a_transfer_beyond_the_available_funds_is_refused() {
        let (from, to, _) = held(40);
        let other = TransferCommand {
            transfer_id: Uuid::from_u128(101),
            ..pending(61, 60)
        };
        assert_eq!(
            refused(decide_transfer(&other, &from, &to, &Transfer::default(), now())),
            E::InsufficientFunds {
                available: 60,
                requested: 61
            }
        );
    }

    #[test]
    fn a_too_long_reference_is_refused() {
        let cmd = TransferCommand {
            reference: "x".repeat(crate::account::REFERENCE_LEN_MAX + 1),
            ..immediate(1)
        };
        assert_eq!(
            refused(decide_transfer(
                &cmd,
                &funded(A, 9),
                &funded(B, 0),
                &Transfer::default(),
                now()
            )),
            E::InvalidReference
        );
    }

    #[test]
    fn an_expiry_outside_its_range_is_refused() {
        for expires_in_s in [0, -1, EXPIRES_IN_S_MAX + 1, i64::MAX] {
            assert_eq!(
                refused(decide_transfer(
                    &pending(1, expires_in_s),
                    &funded(A, 9),
                    &funded(B, 0),
                    &Transfer::default(),
                    now()
                )),
                E::InvalidExpiry { expires_in_s }
            );
        }
        for expires_in_s in [EXPIRES_IN_S_MIN, EXPIRES_IN_S_MAX] {
            assert!(
                decide_transfer(
                    &pending(1, expires_in_s),
                    &funded(A, 9),
                    &funded(B, 0),
                    &Transfer::default(),
                    now()
                )
                .is_ok()
            );
        }
    }

    #[test]
    fn an_account_with_the_most_holds_refuses_another() {
        let mut from = account(A, eur(), AMOUNT_MAX_MINOR_FOR_TESTS, vec![]);
        let to = funded(B, 0);
        for n in 0..HOLDS_MAX as u128 {
            let cmd = TransferCommand {
                transfer_id: Uuid::from_u128(1_000 + n),
                ..pending(1, 60)
            };
            let decision = decide_transfer(&cmd, &from, &to, &Transfer::default(), now()).unwrap();
            decision.apply_to(&mut from, &mut to.clone(), &mut Transfer::default());
        }
        assert_eq!(
            refused(decide_transfer(
                &pending(1, 60),
                &from,
                &to,
                &Transfer::default(),
                now()
            )),
            E::TooManyHolds
        );
    }

    const AMOUNT_MAX_MINOR_FOR_TESTS: i64 = crate::money::AMOUNT_MAX_MINOR;

    #[test]
    fn a_credit_that_would_overflow_the_destination_is_refused() {
        let mut to = funded(B, 1);
        to.balance = i64::MAX;
        assert_eq!(
            refused(decide_transfer(
                &immediate(1),
                &funded(A, 9),
                &to,
                &Transfer::default(),
                now()
            )),
            E::BalanceOverflow
        );
    }

    #[test]
    #[should_panic(expected = "source account")]
    fn passing_the_wrong_account_is_a_programmer_error() {
        let _ = decide_transfer(&immediate(1), &funded(B, 9), &funded(B, 0), &Transfer::default(), now());
    }

    #[test]
    fn every_refusal_has_a_distinct_stable_kebab_case_code() {
        let all = [
            E::AlreadyExists,
            E::NotFound,
            E::InvalidOwner,
            E::InvalidReference,
            E::InvalidReason,
            E::InvalidOverdraftLimit,
            E::InsufficientFunds {
                available: 0,
                requested: 1,
            },
            E::BalanceOverflow,
            E::Frozen { account_id: A },
            E::NotFrozen,
            E::Closed { account_id: A },
            E::BalanceNotZero { balance: 1 },
            E::HoldsOutstanding { held: 1 },
            E::TooManyHolds,
            E::TransferToSelf,
            E::CurrencyMismatch {
                expected: eur(),
                actual: usd(),
            },
            E::TransferExists { transfer_id: T },
            E::TransferNotFound,
            E::TransferNotPending {
                status: TransferStatus::Posted,
            },
            E::AmountExceedsHold { held: 1, requested: 2 },
            E::HoldExpired { expires_at: now() },
            E::HoldNotExpired { expires_at: now() },
            E::InvalidExpiry { expires_in_s: 0 },
            E::StaleState,
        ];
        let codes: std::collections::BTreeSet<&str> = all.iter().map(AccountError::code).collect();
        assert_eq!(codes.len(), all.len(), "codes are distinct");
        for code in codes {
            assert!(
                code.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
                "{code} is kebab-case"
            );
        }
        assert_eq!(E::AccountNotFound { account_id: A }.code(), E::NotFound.code());
    }
}
