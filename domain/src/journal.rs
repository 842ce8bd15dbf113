//! Journal entries: balanced movements with many legs, decided as pure functions (ADR 0004).
//!
//! An entry is all its legs or nothing: the decision returns the events of every account and
//! of the entry's own stream, and the command side appends them in one transaction. A refusal
//! of one leg is [`AccountError::Leg`], naming the leg's index.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::account::{
    Account, AccountError, AccountEvent, EntryCredited, EntryDebited, EntryHoldPlaced, EntryHoldPosted,
    EntryHoldReleased, HOLDS_MAX, HoldReleaseReason, check_reference,
};
use crate::entry::{
    Direction, Entry, EntryCompleted, EntryEvent, EntryExpired, EntryPending, EntryPosted, EntryStatus, EntryVoided,
    LEGS_MAX, LEGS_MIN, Leg,
};
use crate::ledger::hold_deadline;
use crate::money::{AmountMinor, Currency};

/// One leg as a client asks for it (the currency is the account's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegRequest {
    pub account: Uuid,
    pub direction: Direction,
    pub amount: AmountMinor,
}

/// `Immediate` books every leg now; `Pending` holds each debit leg's amount on its account
/// until the entry is posted, voided, or expires after `expires_in_s` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    Immediate,
    Pending { expires_in_s: i64 },
}

/// Book `legs` as entry `entry_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryCommand {
    pub entry_id: Uuid,
    pub legs: Vec<LegRequest>,
    pub reference: String,
    pub mode: EntryMode,
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
    let expires_at = match cmd.mode {
        EntryMode::Immediate => None,
        EntryMode::Pending { expires_in_s } => Some(hold_deadline(now, expires_in_s)?),
    };
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
        let event = match (leg.direction, expires_at) {
            (Direction::Debit, None) => {
                account.check_available(leg.amount).map_err(leg_error(i))?;
                Some(AccountEvent::EntryDebited(EntryDebited {
                    entry_id: cmd.entry_id,
                    leg: index,
                    amount: leg.amount,
                    currency,
                    reference: cmd.reference.clone(),
                }))
            }
            (Direction::Debit, Some(expires_at)) => {
                account.check_available(leg.amount).map_err(leg_error(i))?;
                if account.holds.len() >= HOLDS_MAX {
                    return Err(leg_error(i)(AccountError::TooManyHolds));
                }
                Some(AccountEvent::EntryHoldPlaced(EntryHoldPlaced {
                    entry_id: cmd.entry_id,
                    leg: index,
                    amount: leg.amount,
                    currency,
                    expires_at,
                    reference: cmd.reference.clone(),
                }))
            }
            (Direction::Credit, None) => {
                account.check_credit(leg.amount).map_err(leg_error(i))?;
                Some(credited(cmd.entry_id, index, leg.amount, currency, &cmd.reference))
            }
            // A pending credit waits for the post, which checks it again then.
            (Direction::Credit, Some(_)) => {
                account.check_credit(leg.amount).map_err(leg_error(i))?;
                None
            }
        };
        if let Some(event) = event {
            account_events.push((leg.account, event));
        }
        legs.push(Leg {
            account: leg.account,
            direction: leg.direction,
            amount: leg.amount,
            currency,
        });
    }
    let entry_event = match expires_at {
        None => EntryEvent::EntryCompleted(EntryCompleted {
            entry_id: cmd.entry_id,
            legs,
            reference: cmd.reference.clone(),
            completed_at: now,
        }),
        Some(expires_at) => EntryEvent::EntryPending(EntryPending {
            entry_id: cmd.entry_id,
            legs,
            reference: cmd.reference.clone(),
            created_at: now,
            expires_at,
        }),
    };
    Ok(EntryDecision {
        account_events,
        entry_events: vec![entry_event],
    })
}

fn credited(entry_id: Uuid, leg: u32, amount: AmountMinor, currency: Currency, reference: &str) -> AccountEvent {
    AccountEvent::EntryCredited(EntryCredited {
        entry_id,
        leg,
        amount,
        currency,
        reference: reference.to_owned(),
    })
}

/// The deadline of a pending entry, or why it is not pending.
fn require_pending(entry: &Entry) -> Result<DateTime<Utc>, AccountError> {
    match (entry.status, entry.expires_at) {
        (EntryStatus::NotCreated, _) => Err(AccountError::EntryNotFound),
        (EntryStatus::Pending, Some(expires_at)) => Ok(expires_at),
        (status, _) => Err(AccountError::EntryNotPending { status }),
    }
}

/// Decides posting pending entry `entry`: every debit leg's hold leaves its balance, every
/// credit leg is credited. `accounts` are the legs' accounts, in leg order.
pub fn decide_entry_post(
    entry: &Entry,
    accounts: &[&Account],
    now: DateTime<Utc>,
) -> Result<EntryDecision, AccountError> {
    let expires_at = require_pending(entry)?;
    if now >= expires_at {
        return Err(AccountError::HoldExpired { expires_at });
    }
    assert_eq!(accounts.len(), entry.legs.len(), "one account state per leg");
    let mut account_events = Vec::with_capacity(entry.legs.len());
    for (i, (leg, account)) in entry.legs.iter().zip(accounts).enumerate() {
        let index = u32::try_from(i).expect("at most LEGS_MAX legs");
        let event = match leg.direction {
            Direction::Debit => {
                // Pending but no hold: the entry and the account were read at different
                // moments (a post, void or expiry committed in between).
                account.holds.get(&entry.entry_id).ok_or(AccountError::StaleState)?;
                AccountEvent::EntryHoldPosted(EntryHoldPosted {
                    entry_id: entry.entry_id,
                    leg: index,
                    amount: leg.amount,
                    currency: leg.currency,
                    reference: entry.reference.clone(),
                })
            }
            Direction::Credit => {
                account.require_usable(leg.account).map_err(leg_error(i))?;
                account.check_credit(leg.amount).map_err(leg_error(i))?;
                credited(entry.entry_id, index, leg.amount, leg.currency, &entry.reference)
            }
        };
        account_events.push((leg.account, event));
    }
    Ok(EntryDecision {
        account_events,
        entry_events: vec![EntryEvent::EntryPosted(EntryPosted { posted_at: now })],
    })
}

/// Decides voiding pending entry `entry` at a client's request: every debit leg's hold is
/// released. `accounts` are the legs' accounts, in leg order.
pub fn decide_entry_void(
    entry: &Entry,
    accounts: &[&Account],
    now: DateTime<Utc>,
) -> Result<EntryDecision, AccountError> {
    require_pending(entry)?;
    release(
        entry,
        accounts,
        HoldReleaseReason::Voided,
        EntryEvent::EntryVoided(EntryVoided { voided_at: now }),
    )
}

/// Decides expiring pending entry `entry` past its deadline (the expiry worker).
pub fn decide_entry_expire(
    entry: &Entry,
    accounts: &[&Account],
    now: DateTime<Utc>,
) -> Result<EntryDecision, AccountError> {
    let expires_at = require_pending(entry)?;
    if now < expires_at {
        return Err(AccountError::HoldNotExpired { expires_at });
    }
    release(
        entry,
        accounts,
        HoldReleaseReason::Expired,
        EntryEvent::EntryExpired(EntryExpired { expired_at: now }),
    )
}

fn release(
    entry: &Entry,
    accounts: &[&Account],
    reason: HoldReleaseReason,
    entry_event: EntryEvent,
) -> Result<EntryDecision, AccountError> {
    assert_eq!(accounts.len(), entry.legs.len(), "one account state per leg");
    let mut account_events = Vec::new();
    for (i, (leg, account)) in entry.legs.iter().zip(accounts).enumerate() {
        if leg.direction == Direction::Credit {
            continue;
        }
        account.holds.get(&entry.entry_id).ok_or(AccountError::StaleState)?;
        account_events.push((
            leg.account,
            AccountEvent::EntryHoldReleased(EntryHoldReleased {
                entry_id: entry.entry_id,
                leg: u32::try_from(i).expect("at most LEGS_MAX legs"),
                amount: leg.amount,
                currency: leg.currency,
                reason,
            }),
        ));
    }
    Ok(EntryDecision {
        account_events,
        entry_events: vec![entry_event],
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
            mode: EntryMode::Immediate,
        }
    }

    fn apply_all(states: &mut [Account], entry: &mut Entry, decision: EntryDecision) {
        for (id, event) in decision.account_events {
            states.iter_mut().find(|a| a.account_id == id).unwrap().apply(event);
        }
        for event in decision.entry_events {
            entry.apply(event);
        }
    }

    #[test]
    fn a_pending_entry_holds_its_debits_until_posted_and_a_void_or_expiry_releases_them() {
        let now = Utc::now();
        let (customer, c) = account(1, "EUR", 100);
        let (merchant, m) = account(2, "EUR", 0);
        let (fees, f) = account(3, "EUR", 0);
        let mut cmd = entry(vec![
            leg(customer, Direction::Debit, 100),
            leg(merchant, Direction::Credit, 97),
            leg(fees, Direction::Credit, 3),
        ]);
        cmd.mode = EntryMode::Pending { expires_in_s: 60 };
        let decision = decide_entry(&cmd, &[&c, &m, &f], &Entry::default(), now).unwrap();
        assert_eq!(decision.account_events.len(), 1, "only the debit leg holds");
        let mut states = [c, m, f];
        let mut pending = Entry::default();
        apply_all(&mut states, &mut pending, decision);
        assert_eq!(pending.status, EntryStatus::Pending);
        assert_eq!(
            (states[0].balance, states[0].held, states[0].available()),
            (100, 100, 0)
        );

        // Posted: every leg moves, the hold is gone.
        let [c, m, f] = &states;
        let decision = decide_entry_post(&pending, &[c, m, f], now).unwrap();
        let (mut posted_states, mut posted) = (states.clone(), pending.clone());
        apply_all(&mut posted_states, &mut posted, decision);
        assert_eq!(posted.status, EntryStatus::Posted);
        assert_eq!(
            posted_states.each_ref().map(|a| (a.balance, a.held)),
            [(0, 0), (97, 0), (3, 0)]
        );
        assert_eq!(
            decide_entry_void(&posted, &[c, m, f], now).unwrap_err().code(),
            "entry-not-pending"
        );

        // Voided instead: nothing moves, the hold is released.
        let decision = decide_entry_void(&pending, &[c, m, f], now).unwrap();
        let (mut voided_states, mut voided) = (states.clone(), pending.clone());
        apply_all(&mut voided_states, &mut voided, decision);
        assert_eq!(voided.status, EntryStatus::Voided);
        assert_eq!(
            voided_states.each_ref().map(|a| (a.balance, a.held)),
            [(100, 0), (0, 0), (0, 0)]
        );

        // Expiry: only at the deadline; posting after it is refused.
        assert_eq!(
            decide_entry_expire(&pending, &[c, m, f], now).unwrap_err().code(),
            "hold-not-expired"
        );
        let late = now + chrono::TimeDelta::seconds(61);
        assert_eq!(
            decide_entry_post(&pending, &[c, m, f], late).unwrap_err().code(),
            "hold-expired"
        );
        let decision = decide_entry_expire(&pending, &[c, m, f], late).unwrap();
        let (mut expired_states, mut expired) = (states.clone(), pending.clone());
        apply_all(&mut expired_states, &mut expired, decision);
        assert_eq!(expired.status, EntryStatus::Expired);
        assert_eq!(expired_states[0].held, 0);
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
        let EntryEvent::EntryCompleted(done) = &decision.entry_events[0] else {
            panic!("an immediate entry completes: {:?}", decision.entry_events);
        };
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
