//! The commands the writer runs: which streams each touches, and how each is decided. Pure:
//! deciding reads states that were loaded before and returns events; it does no IO.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tally_domain::reservation::{self, ExternalIdReserved};
use tally_domain::{
    Account, AccountCommand, AccountError, AccountEvent, AmountMinor, Entry, EntryCommand, EntryEvent, EntryStatus,
    ReservationEvent, Transfer, TransferCommand, TransferDecision, TransferEvent, TransferStatus, journal, ledger,
};
use tally_event_store::NewEvent;
use uuid::Uuid;

use crate::execute::{Loaded, State, StreamKind};

/// A command for the writer.
#[derive(Debug, Clone)]
pub enum Command {
    /// A command on one account (open, deposit, withdraw, freeze, unfreeze, close). Opening
    /// with an external id also reserves it on its own stream.
    Account { account_id: Uuid, command: AccountCommand },
    /// An immediate or pending transfer: both accounts and the transfer's own stream.
    Transfer(TransferCommand),
    /// Post a pending transfer (all of the hold, or `amount` of it). `from` and `to` are the
    /// transfer's, read from its stream before (they never change once it exists).
    Post {
        transfer_id: Uuid,
        from: Uuid,
        to: Uuid,
        amount: Option<AmountMinor>,
    },
    /// Release a pending transfer's hold at a client's request.
    Void { transfer_id: Uuid, from: Uuid },
    /// Release a pending transfer's hold past its deadline (the expiry worker).
    Expire { transfer_id: Uuid, from: Uuid },
    /// A journal entry: every leg's account and the entry's own stream.
    Entry(EntryCommand),
    /// Post, void or expire pending entry `entry_id`. `accounts` are its legs' accounts in leg
    /// order, read from its stream before (they never change once it exists).
    FinishEntry {
        entry_id: Uuid,
        accounts: Vec<Uuid>,
        action: EntryAction,
    },
}

/// What finishing a pending entry does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryAction {
    /// Every leg moves (a client's post).
    Post,
    /// The holds are released at a client's request.
    Void,
    /// The holds are released past the deadline (the expiry worker).
    Expire,
}

impl Command {
    /// The command's name: the `command` label of its metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Account { command, .. } => match command {
                AccountCommand::Open { .. } => "open",
                AccountCommand::Deposit { .. } => "deposit",
                AccountCommand::Withdraw { .. } => "withdraw",
                AccountCommand::Freeze { .. } => "freeze",
                AccountCommand::Unfreeze => "unfreeze",
                AccountCommand::Close => "close",
                AccountCommand::ChangeLimit { .. } => "change_limit",
            },
            Command::Transfer(_) => "transfer",
            Command::Post { .. } => "post",
            Command::Void { .. } => "void",
            Command::Expire { .. } => "expire",
            Command::Entry(_) => "entry",
            Command::FinishEntry { action, .. } => match action {
                EntryAction::Post => "entry_post",
                EntryAction::Void => "entry_void",
                EntryAction::Expire => "entry_expire",
            },
        }
    }

    /// Every stream the command reads or may append to.
    pub fn streams(&self) -> Vec<(Uuid, StreamKind)> {
        use StreamKind::{Account, Entry, ExternalId, Transfer};
        match self {
            Command::Account { account_id, command } => match external_id(command) {
                Some(external_id) => vec![
                    (*account_id, Account),
                    (reservation::stream_id(external_id), ExternalId),
                ],
                None => vec![(*account_id, Account)],
            },
            Command::Transfer(t) => vec![(t.from, Account), (t.to, Account), (t.transfer_id, Transfer)],
            Command::Post {
                transfer_id, from, to, ..
            } => vec![(*from, Account), (*to, Account), (*transfer_id, Transfer)],
            Command::Void { transfer_id, from } | Command::Expire { transfer_id, from } => {
                vec![(*from, Account), (*transfer_id, Transfer)]
            }
            Command::Entry(e) => e
                .legs
                .iter()
                .map(|leg| (leg.account, Account))
                .chain([(e.entry_id, Entry)])
                .collect(),
            Command::FinishEntry { entry_id, accounts, .. } => accounts
                .iter()
                .map(|account| (*account, Account))
                .chain([(*entry_id, Entry)])
                .collect(),
        }
    }
}

/// The external id an open command reserves, if any.
fn external_id(command: &AccountCommand) -> Option<&str> {
    match command {
        AccountCommand::Open { profile, .. } => profile.external_id.as_deref(),
        _ => None,
    }
}

/// New events for one stream.
#[derive(Debug, Clone)]
pub enum Events {
    Account(Vec<AccountEvent>),
    Transfer(Vec<TransferEvent>),
    ExternalId(Vec<ReservationEvent>),
    Entry(Vec<EntryEvent>),
}

impl Events {
    fn is_empty(&self) -> bool {
        match self {
            Events::Account(e) => e.is_empty(),
            Events::Transfer(e) => e.is_empty(),
            Events::ExternalId(e) => e.is_empty(),
            Events::Entry(e) => e.is_empty(),
        }
    }

    /// Folds the events into `loaded` and returns them as rows to append.
    pub fn record(self, loaded: &mut Loaded, metadata: &str) -> Vec<NewEvent> {
        let row = |event_type: &str, schema_version: u32, payload: String| NewEvent {
            event_id: Uuid::now_v7(),
            event_type: event_type.to_owned(),
            schema_version: schema_version as i32,
            payload,
            metadata: metadata.to_owned(),
        };
        let rows: Vec<NewEvent> = match (self, &mut loaded.state) {
            (Events::Account(events), State::Account(account)) => events
                .into_iter()
                .map(|e| {
                    let new = row(e.type_name(), e.schema_version(), e.to_payload());
                    cqrs_es::Aggregate::apply(account, e);
                    new
                })
                .collect(),
            (Events::Transfer(events), State::Transfer(transfer)) => events
                .into_iter()
                .map(|e| {
                    let new = row(e.type_name(), e.schema_version(), e.to_payload());
                    transfer.apply(e);
                    new
                })
                .collect(),
            (Events::ExternalId(events), State::ExternalId(reservation)) => events
                .into_iter()
                .map(|e| {
                    let new = row(e.type_name(), e.schema_version(), e.to_payload());
                    reservation.apply(e);
                    new
                })
                .collect(),
            (Events::Entry(events), State::Entry(entry)) => events
                .into_iter()
                .map(|e| {
                    let new = row(e.type_name(), e.schema_version(), e.to_payload());
                    entry.apply(e);
                    new
                })
                .collect(),
            _ => unreachable!("events are only decided for streams of their own kind"),
        };
        loaded.version += rows.len() as i64;
        rows
    }
}

/// Decides `command` at `now` on `states`, which hold every stream of [`Command::streams`].
/// Returns the events per stream (streams without events are left out).
pub fn decide(
    command: &Command,
    states: &HashMap<Uuid, Loaded>,
    now: DateTime<Utc>,
) -> Result<Vec<(Uuid, Events)>, AccountError> {
    // The writer loads each stream as the kind the command names; should one still be of
    // another kind, there is no such account (or transfer) for this command.
    let account = |id: &Uuid| -> Result<&Account, AccountError> {
        states[id]
            .account()
            .ok_or(AccountError::AccountNotFound { account_id: *id })
    };
    let transfer =
        |id: &Uuid| -> Result<&Transfer, AccountError> { states[id].transfer().ok_or(AccountError::TransferNotFound) };
    // The parties a post, void or expiry names were read before it was queued (from the log,
    // or from a batch item creating the transfer). Should the transfer turn out to have others
    // (that item was refused, the id being taken), the command was built on a stale reading.
    let parties = |id: &Uuid, from: Uuid, to: Option<Uuid>| -> Result<&Transfer, AccountError> {
        let t = transfer(id)?;
        let known = t.status != TransferStatus::NotCreated;
        if known && (t.from != from || to.is_some_and(|to| t.to != to)) {
            return Err(AccountError::StaleState);
        }
        Ok(t)
    };
    match command {
        Command::Entry(e) => return decide_entry(e, states, now),
        Command::FinishEntry {
            entry_id,
            accounts,
            action,
        } => return finish_entry(*entry_id, accounts, *action, states, now),
        _ => {}
    }
    // (decision, source, destination if it gets events, transfer stream)
    let (decision, from, to, transfer_id): (TransferDecision, Uuid, Option<Uuid>, Uuid) = match command {
        Command::Account { account_id, command } => {
            let events = account(account_id)?.decide(command.clone())?;
            let Some(external_id) = external_id(command) else {
                return Ok(vec![(*account_id, Events::Account(events))]);
            };
            let stream = reservation::stream_id(external_id);
            let reserved = states[&stream].reservation().and_then(|r| r.account_id);
            if let Some(holder) = reserved {
                return Err(AccountError::ExternalIdTaken { account_id: holder });
            }
            let reserve = ReservationEvent::ExternalIdReserved(ExternalIdReserved {
                external_id: external_id.to_owned(),
                account_id: *account_id,
            });
            return Ok(vec![
                (*account_id, Events::Account(events)),
                (stream, Events::ExternalId(vec![reserve])),
            ]);
        }
        Command::Transfer(t) => (
            ledger::decide_transfer(t, account(&t.from)?, account(&t.to)?, transfer(&t.transfer_id)?, now)?,
            t.from,
            Some(t.to),
            t.transfer_id,
        ),
        Command::Post {
            transfer_id,
            from,
            to,
            amount,
        } => (
            ledger::decide_post(
                parties(transfer_id, *from, Some(*to))?,
                account(from)?,
                account(to)?,
                *amount,
                now,
            )?,
            *from,
            Some(*to),
            *transfer_id,
        ),
        Command::Void { transfer_id, from } => (
            ledger::decide_void(parties(transfer_id, *from, None)?, account(from)?, now)?,
            *from,
            None,
            *transfer_id,
        ),
        Command::Expire { transfer_id, from } => (
            ledger::decide_expire(parties(transfer_id, *from, None)?, account(from)?, now)?,
            *from,
            None,
            *transfer_id,
        ),
        Command::Entry(_) | Command::FinishEntry { .. } => unreachable!("entries are decided above"),
    };
    let mut out = vec![(from, Events::Account(decision.from_events))];
    if let Some(to) = to {
        out.push((to, Events::Account(decision.to_events)));
    }
    out.push((transfer_id, Events::Transfer(decision.transfer_events)));
    out.retain(|(_, events)| !events.is_empty());
    Ok(out)
}

/// Decides entry `e`: each leg's account (as the leg names it: a stream that is not an account
/// refuses that leg), then the entry's stream.
fn decide_entry(
    e: &EntryCommand,
    states: &HashMap<Uuid, Loaded>,
    now: DateTime<Utc>,
) -> Result<Vec<(Uuid, Events)>, AccountError> {
    let mut accounts: Vec<&Account> = Vec::with_capacity(e.legs.len());
    for (leg, request) in e.legs.iter().enumerate() {
        let account = states[&request.account].account().ok_or_else(|| AccountError::Leg {
            leg,
            source: Box::new(AccountError::AccountNotFound {
                account_id: request.account,
            }),
        })?;
        accounts.push(account);
    }
    let entry: &Entry = states[&e.entry_id]
        .entry()
        .ok_or(AccountError::EntryExists { entry_id: e.entry_id })?;
    let decision = journal::decide_entry(e, &accounts, entry, now)?;
    Ok(entry_events(e.entry_id, decision))
}

/// Decides posting, voiding or expiring pending entry `entry_id` on its legs' `accounts`.
fn finish_entry(
    entry_id: Uuid,
    accounts: &[Uuid],
    action: EntryAction,
    states: &HashMap<Uuid, Loaded>,
    now: DateTime<Utc>,
) -> Result<Vec<(Uuid, Events)>, AccountError> {
    let entry = states[&entry_id].entry().ok_or(AccountError::EntryNotFound)?;
    // As for a transfer's parties: the legs were read before queueing.
    if entry.status != EntryStatus::NotCreated && !entry.legs.iter().map(|l| l.account).eq(accounts.iter().copied()) {
        return Err(AccountError::StaleState);
    }
    let accounts: Vec<&Account> = accounts
        .iter()
        .map(|id| {
            states[id]
                .account()
                .ok_or(AccountError::AccountNotFound { account_id: *id })
        })
        .collect::<Result<_, _>>()?;
    let decision = match action {
        EntryAction::Post => journal::decide_entry_post(entry, &accounts, now)?,
        EntryAction::Void => journal::decide_entry_void(entry, &accounts, now)?,
        EntryAction::Expire => journal::decide_entry_expire(entry, &accounts, now)?,
    };
    Ok(entry_events(entry_id, decision))
}

/// An entry decision as events per stream: each leg's event on its account, then the entry's.
fn entry_events(entry_id: Uuid, decision: tally_domain::EntryDecision) -> Vec<(Uuid, Events)> {
    decision
        .account_events
        .into_iter()
        .map(|(account, event)| (account, Events::Account(vec![event])))
        .chain([(entry_id, Events::Entry(decision.entry_events))])
        .collect()
}
