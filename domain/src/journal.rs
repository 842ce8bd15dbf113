//! Journal entries: balanced movements with many legs, decided as pure functions (ADR 0004).
//!
//! An entry is all its legs or nothing: the decision returns the events of every account and
//! of the entry's own stream, and the command side appends them in one transaction. A refusal
//! of one leg is [`AccountError::Leg`], naming the leg's index.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::account::{Account, AccountError, AccountEvent, EntryCredited, EntryDebited, check_reference};
use crate::entry::{Direction, Entry, EntryCompleted, EntryEvent, EntryStatus, LEGS_MAX, LEGS_MIN, Leg};
use crate::money::{AmountMinor, Currency};

/// One leg as a client asks for it (the currency is the account's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegRequest {
    pub account: Uuid,
    pub direction: Direction,
    pub amount: AmountMinor,
}

/// Book `legs` at once as entry `entry_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryCommand {
    pub entry_id: Uuid,
    pub legs: Vec<LegRequest>,
    pub reference: String,
}

/// The events an accepted entry appends: one per leg on its account (in leg order), and the
/// entry's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryDecision {
    pub account_events: Vec<(Uuid, AccountEvent)>,
    pub entry_events: Vec<EntryEvent>,
}

/// The refusal of leg `leg`.
fn leg_error(leg: usize) -> impl Fn(AccountError) -> AccountError {
    move |source| AccountError::Leg {
        leg,
        source: Box::new(source),
    }
}

/// Checks an entry's shape before any account is read: the number of legs, and each account in
/// one leg only. The command side runs it before queueing, the decision again.
pub fn check_legs(legs: &[LegRequest]) -> Result<(), AccountError> {
    if !(LEGS_MIN..=LEGS_MAX).contains(&legs.len()) {
        return Err(AccountError::InvalidLegs { legs: legs.len() });
    }
    let mut seen: BTreeMap<Uuid, usize> = BTreeMap::new();
    for (i, leg) in legs.iter().enumerate() {
        if let Some(&first) = seen.get(&leg.account) {
            return Err(leg_error(i)(AccountError::AccountRepeated {
                account_id: leg.account,
                first,
            }));
        }
        seen.insert(leg.account, i);
    }
    Ok(())
}

/// Decides entry `cmd` on `accounts` (one per leg, in leg order) and the entry's stream.
///
/// Order of the checks: the entry is new, its shape ([`check_legs`]) and reference; every
/// account exists and may move money that way (a frozen account takes no debit, a closed one
/// nothing); each currency balances; then each leg's amount against its account's rules
/// (available funds and overdraft, flags, overflow).
pub fn decide_entry(
    cmd: &EntryCommand,
    accounts: &[&Account],
    entry: &Entry,
    now: DateTime<Utc>,
) -> Result<EntryDecision, AccountError> {
    if entry.status != EntryStatus::NotCreated {
        return Err(AccountError::EntryExists { entry_id: cmd.entry_id });
    }
    check_legs(&cmd.legs)?;
    check_reference(&cmd.reference)?;
    assert_eq!(accounts.len(), cmd.legs.len(), "one account state per leg");
    let mut currencies: Vec<Currency> = Vec::with_capacity(cmd.legs.len());
    for (i, (leg, account)) in cmd.legs.iter().zip(accounts).enumerate() {
        let currency = match leg.direction {
            Direction::Debit => account.require_debitable(leg.account),
            Direction::Credit => account.require_usable(leg.account),
        }
        .map_err(leg_error(i))?;
        currencies.push(currency);
    }
    // (debits, credits) per currency; at most 64 amounts of at most 10^15 each: no overflow.
    let mut sums: BTreeMap<Currency, (i64, i64)> = BTreeMap::new();
    for (leg, currency) in cmd.legs.iter().zip(&currencies) {
        let sum = sums.entry(*currency).or_default();
        match leg.direction {
            Direction::Debit => sum.0 += leg.amount.get(),
            Direction::Credit => sum.1 += leg.amount.get(),
        }
    }
    if let Some((currency, (debits, credits))) = sums.into_iter().find(|(_, (d, c))| d != c) {
        return Err(AccountError::EntryUnbalanced {
            currency,
            debits,
            credits,
        });
    }
    let mut account_events = Vec::with_capacity(cmd.legs.len());
    let mut legs = Vec::with_capacity(cmd.legs.len());
    for (i, ((leg, account), currency)) in cmd.legs.iter().zip(accounts).zip(currencies).enumerate() {
        let index = u32::try_from(i).expect("at most LEGS_MAX legs");
        let event = match leg.direction {
            Direction::Debit => {
                account.check_available(leg.amount).map_err(leg_error(i))?;
                AccountEvent::EntryDebited(EntryDebited {
                    entry_id: cmd.entry_id,
                    leg: index,
                    amount: leg.amount,
                    currency,
                    reference: cmd.reference.clone(),
                })
            }
            Direction::Credit => {
                account.check_credit(leg.amount).map_err(leg_error(i))?;
                AccountEvent::EntryCredited(EntryCredited {
                    entry_id: cmd.entry_id,
                    leg: index,
                    amount: leg.amount,
                    currency,
                    reference: cmd.reference.clone(),
                })
            }
        };
        account_events.push((leg.account, event));
        legs.push(Leg {
            account: leg.account,
            direction: leg.direction,
            amount: leg.amount,
            currency,
        });
    }
    Ok(EntryDecision {
        account_events,
        entry_events: vec![EntryEvent::EntryCompleted(EntryCompleted {
            entry_id: cmd.entry_id,
            legs,
            reference: cmd.reference.clone(),
            completed_at: now,
        })],
    })
}

#[cfg(test)]
mod tests {
    use cqrs_es::Aggregate;

    use super::*;
    use crate::account::{AccountCommand, AccountFrozen};
    use crate::profile::AccountProfile;

    fn amount(v: i64) -> AmountMinor {
        AmountMinor::new(v).unwrap()
    }

    /// An open account in `currency` holding `balance`.
    fn account(n: u128, currency: &str, balance: i64) -> (Uuid, Account) {
        let id = Uuid::from_u128(n);
        let mut account = Account::default();
        for event in account
            .decide(AccountCommand::Open {
                account_id: id,
                owner: "Ada".into(),
                currency: currency.parse().unwrap(),
                overdraft_limit: 0,
                profile: AccountProfile::default(),
            })
            .unwrap()
        {
            account.apply(event);
        }
        if balance > 0 {
            for event in account
                .decide(AccountCommand::Deposit {
                    amount: amount(balance),
                    reference: String::new(),
                })
                .unwrap()
            {
                account.apply(event);
            }
        }
        (id, account)
    }

    fn leg(account: Uuid, direction: Direction, v: i64) -> LegRequest {
        LegRequest {
            account,
            direction,
            amount: amount(v),
        }
    }

    fn entry(legs: Vec<LegRequest>) -> EntryCommand {
        EntryCommand {
            entry_id: Uuid::from_u128(99),
            legs,
            reference: "card payment".into(),
        }
    }

    #[test]
    fn a_payment_with_a_fee_books_every_leg_and_the_entry() {
        let (customer, c) = account(1, "EUR", 100);
        let (merchant, m) = account(2, "EUR", 0);
        let (fees, f) = account(3, "EUR", 0);
        let cmd = entry(vec![
            leg(customer, Direction::Debit, 100),
            leg(merchant, Direction::Credit, 97),
            leg(fees, Direction::Credit, 3),
        ]);

        let decision = decide_entry(&cmd, &[&c, &m, &f], &Entry::default(), Utc::now()).unwrap();

        let mut states = [c, m, f];
        for (state, (id, event)) in states.iter_mut().zip(decision.account_events) {
            assert_eq!(state.account_id, id);
            state.apply(event);
        }
        assert_eq!(states.map(|a| a.balance), [0, 97, 3]);
        let EntryEvent::EntryCompleted(done) = &decision.entry_events[0];
        assert_eq!(done.legs.len(), 3);
        assert_eq!(done.legs[2].amount.get(), 3);
    }

    #[test]
    fn an_unbalanced_entry_is_refused_per_currency() {
        let (a, sa) = account(1, "EUR", 100);
        let (b, sb) = account(2, "EUR", 0);
        let err = decide_entry(
            &entry(vec![leg(a, Direction::Debit, 100), leg(b, Direction::Credit, 99)]),
            &[&sa, &sb],
            &Entry::default(),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(err.code(), "entry-unbalanced");
        // Balanced in total but not per currency: still refused.
        let (c, sc) = account(3, "USD", 100);
        let (d, sd) = account(4, "USD", 0);
        let err = decide_entry(
            &entry(vec![
                leg(a, Direction::Debit, 100),
                leg(b, Direction::Credit, 50),
                leg(c, Direction::Debit, 50),
                leg(d, Direction::Credit, 100),
            ]),
            &[&sa, &sb, &sc, &sd],
            &Entry::default(),
            Utc::now(),
        )
        .unwrap_err();
        assert!(matches!(err, AccountError::EntryUnbalanced { .. }), "{err}");
    }

    #[test]
    fn a_refused_leg_is_named_by_its_index_and_nothing_is_booked() {
        let (a, sa) = account(1, "EUR", 100);
        let (b, sb) = account(2, "EUR", 0);
        let (c, mut sc) = account(3, "EUR", 10);
        sc.apply(AccountEvent::AccountFrozen(AccountFrozen { reason: "x".into() }));
        // Leg 2 debits a frozen account.
        let err = decide_entry(
            &entry(vec![
                leg(a, Direction::Debit, 50),
                leg(b, Direction::Credit, 60),
                leg(c, Direction::Debit, 10),
            ]),
            &[&sa, &sb, &sc],
            &Entry::default(),
            Utc::now(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, AccountError::Leg { leg: 2, source } if source.code() == "account-frozen"),
            "{err}"
        );
        // Leg 0 lacks funds.
        let err = decide_entry(
            &entry(vec![leg(a, Direction::Debit, 101), leg(b, Direction::Credit, 101)]),
            &[&sa, &sb],
            &Entry::default(),
            Utc::now(),
        )
        .unwrap_err();
        assert!(matches!(&err, AccountError::Leg { leg: 0, .. }), "{err}");
        assert_eq!(err.code(), "insufficient-funds");
        // An account twice.
        let err = check_legs(&[leg(a, Direction::Debit, 1), leg(a, Direction::Credit, 1)]).unwrap_err();
        assert!(matches!(&err, AccountError::Leg { leg: 1, .. }), "{err}");
        assert_eq!(err.code(), "account-repeated");
    }

    #[test]
    fn the_number_of_legs_is_bounded_and_an_entry_id_is_used_once() {
        let (a, _) = account(1, "EUR", 0);
        assert_eq!(
            check_legs(&[leg(a, Direction::Debit, 1)]).unwrap_err().code(),
            "invalid-legs"
        );
        let many: Vec<LegRequest> = (0..=LEGS_MAX as u128)
            .map(|n| leg(Uuid::from_u128(n + 10), Direction::Debit, 1))
            .collect();
        assert_eq!(check_legs(&many).unwrap_err().code(), "invalid-legs");
        assert!(check_legs(&many[..LEGS_MAX]).is_ok());

        let (x, sx) = account(1, "EUR", 5);
        let (y, sy) = account(2, "EUR", 0);
        let cmd = entry(vec![leg(x, Direction::Debit, 5), leg(y, Direction::Credit, 5)]);
        let mut booked = Entry::default();
        for event in decide_entry(&cmd, &[&sx, &sy], &booked, Utc::now())
            .unwrap()
            .entry_events
        {
            booked.apply(event);
        }
        assert_eq!(
            decide_entry(&cmd, &[&sx, &sy], &booked, Utc::now()).unwrap_err().code(),
            "entry-exists"
        );
    }
}
