//! The account aggregate: one stream per account.
//!
//! Rules (checked on every command, before any event is emitted):
//! - an account is opened once, with an owner and a currency;
//! - deposits and withdrawals move a positive amount of minor units;
//! - `available = balance - held` never falls below `-overdraft_limit`;
//! - a frozen account refuses debits (withdrawals, transfers out, new holds, posting a hold) but
//!   still accepts credits and the release of its holds;
//! - a closed account refuses everything; it can be closed only at a zero balance with no holds.
//!
//! Commands on one account go through [`Account::decide`] (or cqrs-es `handle`). Transfers touch
//! two accounts and a transfer stream, so their decisions live in [`crate::ledger`]; the events
//! they emit on an account stream (`TransferDebited`, `HoldPlaced`, ...) are folded here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::{AMOUNT_MAX_MINOR, AmountMinor, Currency};
use crate::profile::{AccountFlag, AccountProfile};
use crate::system::SystemAccount;
use crate::transfer::TransferStatus;

/// The stream type under which account events are stored and published.
pub const STREAM_TYPE: &str = "account";
/// Longest accepted owner name, in characters.
pub const OWNER_LEN_MAX: usize = 200;
/// Longest accepted free-text reference on a posting, in characters.
pub const REFERENCE_LEN_MAX: usize = 200;
/// Longest accepted reason for freezing an account, in characters.
pub const REASON_LEN_MAX: usize = 200;
/// Most holds one account may carry at once. Holds live in the account's state (and snapshot),
/// so their number is bounded like everything else.
pub const HOLDS_MAX: usize = 1_000;

/// What a client may ask of an account.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountCommand {
    Open {
        account_id: Uuid,
        owner: String,
        currency: Currency,
        overdraft_limit: i64,
        /// External id, metadata and flags ([`crate::profile`]). An external id must also be
        /// reserved on its own stream ([`crate::reservation`]), which the command side does.
        profile: AccountProfile,
    },
    Deposit {
        amount: AmountMinor,
        reference: String,
    },
    Withdraw {
        amount: AmountMinor,
        reference: String,
    },
    /// Stop debits (e.g. suspected fraud). Credits and hold releases still go through.
    Freeze {
        reason: String,
    },
    Unfreeze,
    /// Only at a zero balance with no holds; final.
    Close,
    /// Set how far below zero `available` may go. Lowering it is refused while the account
    /// uses more than the new limit (its pending holds count).
    ChangeLimit {
        overdraft_limit: i64,
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
    /// The client's own id for the account, unique in the ledger (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = "^[\\x21-\\x7e]+$"))]
    pub external_id: Option<String>,
    /// The client's labels (absent: none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Bounds on the balance, sorted, without repeats (absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<AccountFlag>,
}

/// Money arrived from outside the ledger: an entry debiting `system_account` and crediting
/// this account by `amount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FundsDeposited {
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
    /// The system account on the other side: the currency's `world` account
    /// (`crate::system::SystemAccount`).
    pub system_account: Uuid,
}

/// Money left the ledger: an entry debiting this account and crediting `system_account` by
/// `amount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FundsWithdrawn {
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
    /// The system account on the other side: the currency's `world` account.
    pub system_account: Uuid,
}

/// The account was frozen: it refuses debits until unfrozen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountFrozen {
    /// Why, for auditors (1 to 200 characters).
    pub reason: String,
}

/// The account was unfrozen: debits are accepted again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountUnfrozen {}

/// The account was closed at a zero balance with no holds. Nothing happens to it afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountClosed {}

/// The account's overdraft limit was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OverdraftLimitChanged {
    /// The new limit: how far below zero `available` may go, in minor units.
    #[schemars(range(min = 0))]
    pub overdraft_limit: i64,
    /// The limit before.
    #[schemars(range(min = 0))]
    pub previous: i64,
}

/// The debit leg of an immediate transfer, on the source account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferDebited {
    /// The transfer's id: also the id of its `transfer` stream and of the matching credit leg.
    pub transfer_id: Uuid,
    pub amount: AmountMinor,
    pub currency: Currency,
    /// The account credited.
    pub counterparty: Uuid,
    pub reference: String,
}

/// The credit leg of a transfer (immediate, or a posted hold), on the destination account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferCredited {
    /// The transfer's id: also the id of its `transfer` stream and of the matching debit leg.
    pub transfer_id: Uuid,
    pub amount: AmountMinor,
    pub currency: Currency,
    /// The account debited.
    pub counterparty: Uuid,
    pub reference: String,
}

/// A pending transfer reserved `amount` on the source account until `expires_at`:
/// `held` grows by it, `available` shrinks by it, `balance` is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldPlaced {
    pub transfer_id: Uuid,
    pub amount: AmountMinor,
    pub currency: Currency,
    /// The account that will be credited if the hold is posted.
    pub counterparty: Uuid,
    /// After this instant the hold can no longer be posted and the expiry worker releases it.
    pub expires_at: DateTime<Utc>,
    pub reference: String,
}

/// A hold was posted: `amount` left the balance (credited to the counterparty) and the whole
/// hold was removed, so `held` shrinks by `amount + released`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldPosted {
    pub transfer_id: Uuid,
    /// The amount moved to the counterparty (at most the hold).
    pub amount: AmountMinor,
    pub currency: Currency,
    /// The rest of the hold, returned to `available` (0 when the full hold was posted).
    #[schemars(range(min = 0))]
    pub released: i64,
}

/// Why a hold was released without moving money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldReleaseReason {
    Voided,
    Expired,
}

/// A hold was released in full, returning `amount` to `available`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldReleased {
    pub transfer_id: Uuid,
    pub amount: AmountMinor,
    pub currency: Currency,
    /// `voided` by a client, or `expired` by the expiry worker.
    pub reason: HoldReleaseReason,
}

/// A debit leg of a journal entry (`crate::entry`) on this account: `amount` left the balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryDebited {
    /// The entry's id: also the id of its `entry` stream, which lists every leg.
    pub entry_id: Uuid,
    /// The leg's index in the entry.
    #[schemars(range(min = 0))]
    pub leg: u32,
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
}

/// A credit leg of a journal entry on this account: `amount` joined the balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryCredited {
    /// The entry's id: also the id of its `entry` stream, which lists every leg.
    pub entry_id: Uuid,
    /// The leg's index in the entry.
    #[schemars(range(min = 0))]
    pub leg: u32,
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
}

/// A debit leg of a pending entry: `amount` is held on this account until the entry is posted
/// or released (`held` grows, `available` shrinks, `balance` is unchanged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryHoldPlaced {
    pub entry_id: Uuid,
    /// The leg's index in the entry.
    #[schemars(range(min = 0))]
    pub leg: u32,
    pub amount: AmountMinor,
    pub currency: Currency,
    pub expires_at: DateTime<Utc>,
    pub reference: String,
}

/// A pending entry was posted: the leg's held `amount` left the balance and the hold is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryHoldPosted {
    pub entry_id: Uuid,
    #[schemars(range(min = 0))]
    pub leg: u32,
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
}

/// A pending entry was voided or expired: the leg's hold returned to `available`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryHoldReleased {
    pub entry_id: Uuid,
    #[schemars(range(min = 0))]
    pub leg: u32,
    pub amount: AmountMinor,
    pub currency: Currency,
    /// `voided` by a client, or `expired` by the expiry worker.
    pub reason: HoldReleaseReason,
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
    AccountFrozen(AccountFrozen),
    AccountUnfrozen(AccountUnfrozen),
    AccountClosed(AccountClosed),
    OverdraftLimitChanged(OverdraftLimitChanged),
    TransferDebited(TransferDebited),
    TransferCredited(TransferCredited),
    HoldPlaced(HoldPlaced),
    HoldPosted(HoldPosted),
    HoldReleased(HoldReleased),
    EntryDebited(EntryDebited),
    EntryCredited(EntryCredited),
    EntryHoldPlaced(EntryHoldPlaced),
    EntryHoldPosted(EntryHoldPosted),
    EntryHoldReleased(EntryHoldReleased),
}

/// The schema version `types` (an event enum's `TYPES`) lists for event type `name`.
pub(crate) fn version_in(types: &[(&str, u32)], name: &str) -> u32 {
    types
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .expect("every variant is listed in TYPES")
}

/// An event payload that does not decode into the current shape of its type.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("malformed {event_type} payload: {source}")]
    Malformed {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
}

impl DecodeError {
    pub(crate) fn malformed(event_type: &str) -> impl Fn(serde_json::Error) -> DecodeError + '_ {
        move |source| DecodeError::Malformed {
            event_type: event_type.to_owned(),
            source,
        }
    }
}

impl AccountEvent {
    /// Every account event type with its current schema version. `schemas/` keeps one JSON
    /// Schema per entry and fails a test when this list and the checked-in files disagree.
    pub const TYPES: &'static [(&'static str, u32)] = &[
        ("AccountOpened", 3),
        ("FundsDeposited", 2),
        ("FundsWithdrawn", 2),
        ("AccountFrozen", 1),
        ("AccountUnfrozen", 1),
        ("AccountClosed", 1),
        ("OverdraftLimitChanged", 1),
        ("TransferDebited", 1),
        ("TransferCredited", 1),
        ("HoldPlaced", 1),
        ("HoldPosted", 1),
        ("HoldReleased", 1),
        ("EntryDebited", 1),
        ("EntryCredited", 1),
        ("EntryHoldPlaced", 1),
        ("EntryHoldPosted", 1),
        ("EntryHoldReleased", 1),
    ];

    pub fn type_name(&self) -> &'static str {
        match self {
            AccountEvent::AccountOpened(_) => "AccountOpened",
            AccountEvent::FundsDeposited(_) => "FundsDeposited",
            AccountEvent::FundsWithdrawn(_) => "FundsWithdrawn",
            AccountEvent::AccountFrozen(_) => "AccountFrozen",
            AccountEvent::AccountUnfrozen(_) => "AccountUnfrozen",
            AccountEvent::AccountClosed(_) => "AccountClosed",
            AccountEvent::OverdraftLimitChanged(_) => "OverdraftLimitChanged",
            AccountEvent::TransferDebited(_) => "TransferDebited",
            AccountEvent::TransferCredited(_) => "TransferCredited",
            AccountEvent::HoldPlaced(_) => "HoldPlaced",
            AccountEvent::HoldPosted(_) => "HoldPosted",
            AccountEvent::HoldReleased(_) => "HoldReleased",
            AccountEvent::EntryDebited(_) => "EntryDebited",
            AccountEvent::EntryCredited(_) => "EntryCredited",
            AccountEvent::EntryHoldPlaced(_) => "EntryHoldPlaced",
            AccountEvent::EntryHoldPosted(_) => "EntryHoldPosted",
            AccountEvent::EntryHoldReleased(_) => "EntryHoldReleased",
        }
    }

    /// The schema version this code writes for the event's type.
    pub fn schema_version(&self) -> u32 {
        crate::account::version_in(Self::TYPES, self.type_name())
    }

    /// The exact JSON text stored in the `payload` column.
    pub fn to_payload(&self) -> String {
        let result = match self {
            AccountEvent::AccountOpened(e) => serde_json::to_string(e),
            AccountEvent::FundsDeposited(e) => serde_json::to_string(e),
            AccountEvent::FundsWithdrawn(e) => serde_json::to_string(e),
            AccountEvent::AccountFrozen(e) => serde_json::to_string(e),
            AccountEvent::AccountUnfrozen(e) => serde_json::to_string(e),
            AccountEvent::AccountClosed(e) => serde_json::to_string(e),
            AccountEvent::OverdraftLimitChanged(e) => serde_json::to_string(e),
            AccountEvent::TransferDebited(e) => serde_json::to_string(e),
            AccountEvent::TransferCredited(e) => serde_json::to_string(e),
            AccountEvent::HoldPlaced(e) => serde_json::to_string(e),
            AccountEvent::HoldPosted(e) => serde_json::to_string(e),
            AccountEvent::HoldReleased(e) => serde_json::to_string(e),
            AccountEvent::EntryDebited(e) => serde_json::to_string(e),
            AccountEvent::EntryCredited(e) => serde_json::to_string(e),
            AccountEvent::EntryHoldPlaced(e) => serde_json::to_string(e),
            AccountEvent::EntryHoldPosted(e) => serde_json::to_string(e),
            AccountEvent::EntryHoldReleased(e) => serde_json::to_string(e),
        };
        // These structs hold only strings, integers, uuids and timestamps: serialization
        // cannot fail.
        result.expect("account events always serialize")
    }

    /// Decodes a payload already in the *current* schema version (upcasting happens in
    /// `tally-schemas` before this is called).
    pub fn from_payload(event_type: &str, payload: &str) -> Result<Self, DecodeError> {
        let malformed = DecodeError::malformed(event_type);
        let event = match event_type {
            "AccountOpened" => serde_json::from_str(payload).map(AccountEvent::AccountOpened),
            "FundsDeposited" => serde_json::from_str(payload).map(AccountEvent::FundsDeposited),
            "FundsWithdrawn" => serde_json::from_str(payload).map(AccountEvent::FundsWithdrawn),
            "AccountFrozen" => serde_json::from_str(payload).map(AccountEvent::AccountFrozen),
            "AccountUnfrozen" => serde_json::from_str(payload).map(AccountEvent::AccountUnfrozen),
            "AccountClosed" => serde_json::from_str(payload).map(AccountEvent::AccountClosed),
            "OverdraftLimitChanged" => serde_json::from_str(payload).map(AccountEvent::OverdraftLimitChanged),
            "TransferDebited" => serde_json::from_str(payload).map(AccountEvent::TransferDebited),
            "TransferCredited" => serde_json::from_str(payload).map(AccountEvent::TransferCredited),
            "HoldPlaced" => serde_json::from_str(payload).map(AccountEvent::HoldPlaced),
            "HoldPosted" => serde_json::from_str(payload).map(AccountEvent::HoldPosted),
            "HoldReleased" => serde_json::from_str(payload).map(AccountEvent::HoldReleased),
            "EntryDebited" => serde_json::from_str(payload).map(AccountEvent::EntryDebited),
            "EntryCredited" => serde_json::from_str(payload).map(AccountEvent::EntryCredited),
            "EntryHoldPlaced" => serde_json::from_str(payload).map(AccountEvent::EntryHoldPlaced),
            "EntryHoldPosted" => serde_json::from_str(payload).map(AccountEvent::EntryHoldPosted),
            "EntryHoldReleased" => serde_json::from_str(payload).map(AccountEvent::EntryHoldReleased),
            other => return Err(DecodeError::UnknownType(other.to_owned())),
        };
        event.map_err(malformed)
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

/// Why a command on the ledger was refused: account commands and the transfer decisions of
/// [`crate::ledger`] alike (one error enum for the crate).
///
/// Each variant has a stable machine-readable [`code`](AccountError::code) that the command
/// API puts in the problem `type`; the doc comment of each names the HTTP status it should
/// become: 404 for a missing account or transfer, 409 only for an id already taken or a
/// concurrency conflict the server could not retry away, 422 for every rule the command breaks
/// (including the state it finds, e.g. frozen or closed), so a client can tell "retry" from
/// "change the request".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// HTTP 409: an account with this id already exists.
    #[error("account already exists")]
    AlreadyExists,
    /// HTTP 404: no account with this id has been opened (the account addressed by the URL).
    #[error("account not found")]
    NotFound,
    /// HTTP 404: one account of a transfer has not been opened. Same code as
    /// [`AccountError::NotFound`], but names the account.
    #[error("account {account_id} not found")]
    AccountNotFound { account_id: Uuid },
    /// HTTP 422.
    #[error("owner must be 1 to {OWNER_LEN_MAX} characters")]
    InvalidOwner,
    /// HTTP 422.
    #[error("reference must be at most {REFERENCE_LEN_MAX} characters")]
    InvalidReference,
    /// HTTP 422.
    #[error("reason must be 1 to {REASON_LEN_MAX} characters")]
    InvalidReason,
    /// HTTP 422.
    #[error("overdraft limit must be between 0 and {AMOUNT_MAX_MINOR} minor units")]
    InvalidOverdraftLimit,
    /// HTTP 422: the new overdraft limit is below what the account already uses (`available`
    /// is below its negative, pending holds included).
    #[error("available is {available}: an overdraft limit of {overdraft_limit} would not cover it")]
    LimitBelowUsage { available: i64, overdraft_limit: i64 },
    /// HTTP 422: the debit would take `available` below `-overdraft_limit`.
    #[error("insufficient funds: {available} available, {requested} requested")]
    InsufficientFunds { available: i64, requested: i64 },
    /// HTTP 422: the account is flagged `debits_must_not_exceed_credits` and the debit (or
    /// hold) would take `available` below zero.
    #[error("debits must not exceed credits: {available} available, {requested} requested")]
    ExceedsCredits { available: i64, requested: i64 },
    /// HTTP 422: the account is flagged `credits_must_not_exceed_debits` and the credit would
    /// take its balance above zero.
    #[error("credits must not exceed debits: the balance is {balance}, {requested} would be credited")]
    ExceedsDebits { balance: i64, requested: i64 },
    /// HTTP 422.
    #[error(
        "external_id must be 1 to {} visible ASCII characters",
        crate::profile::EXTERNAL_ID_LEN_MAX
    )]
    InvalidExternalId,
    /// HTTP 409: another account holds this external id (external ids are never reused).
    #[error("external_id is held by account {account_id}")]
    ExternalIdTaken { account_id: Uuid },
    /// HTTP 422.
    #[error("invalid metadata: {reason}")]
    InvalidMetadata { reason: String },
    /// HTTP 422: flags that contradict each other or the overdraft limit.
    #[error("invalid flags: {reason}")]
    InvalidFlags { reason: &'static str },
    /// HTTP 422: a balance, a hold total or a sum would leave the range of a 64-bit integer.
    #[error("the balance would overflow")]
    BalanceOverflow,
    /// HTTP 422: the account is frozen, so it refuses debits (and a second freeze).
    #[error("account {account_id} is frozen")]
    Frozen { account_id: Uuid },
    /// HTTP 422: unfreezing an account that is not frozen.
    #[error("account is not frozen")]
    NotFrozen,
    /// HTTP 422: the account is closed and refuses everything.
    #[error("account {account_id} is closed")]
    Closed { account_id: Uuid },
    /// HTTP 422: an account is closed only at a zero balance.
    #[error("account balance is {balance}, not zero")]
    BalanceNotZero { balance: i64 },
    /// HTTP 422: an account with holds cannot be closed; post or void them first.
    #[error("account has {held} minor units on hold")]
    HoldsOutstanding { held: i64 },
    /// HTTP 422: the account already carries [`HOLDS_MAX`] holds.
    #[error("account already has {HOLDS_MAX} holds")]
    TooManyHolds,
    /// HTTP 422: source and destination are the same account.
    #[error("cannot transfer from an account to itself")]
    TransferToSelf,
    /// HTTP 422: two currencies met (accounts of a transfer, or the command's and the
    /// account's). Tally never converts.
    #[error("currency mismatch: expected {expected}, got {actual}")]
    CurrencyMismatch { expected: Currency, actual: Currency },
    /// HTTP 409: a transfer with this id exists (transfer ids are used once).
    #[error("transfer {transfer_id} already exists")]
    TransferExists { transfer_id: Uuid },
    /// HTTP 404: no transfer with this id.
    #[error("transfer not found")]
    TransferNotFound,
    /// HTTP 422: the transfer is not pending (already posted, voided, expired, or immediate),
    /// so it cannot be posted, voided or expired (again).
    #[error("transfer is {status:?}, not pending")]
    TransferNotPending { status: TransferStatus },
    /// HTTP 422: posting more than the hold reserved.
    #[error("cannot post {requested}: the hold is {held}")]
    AmountExceedsHold { held: i64, requested: i64 },
    /// HTTP 422: the hold's deadline has passed; it can only be voided or expired.
    #[error("the hold expired at {expires_at}")]
    HoldExpired { expires_at: DateTime<Utc> },
    /// HTTP 422: expiring a hold before its deadline.
    #[error("the hold expires only at {expires_at}")]
    HoldNotExpired { expires_at: DateTime<Utc> },
    /// HTTP 409 once the command side's retries are exhausted: a transfer and its source
    /// account were read at different moments (a post, void or expiry committed in between).
    /// Not a business rule: reload the streams and decide again.
    #[error("the transfer and its account were read at different moments; reload and retry")]
    StaleState,
    /// HTTP 422: `expires_in_s` outside the accepted range.
    #[error(
        "expires_in_s must be between {} and {} seconds; got {expires_in_s}",
        crate::transfer::EXPIRES_IN_S_MIN,
        crate::transfer::EXPIRES_IN_S_MAX
    )]
    InvalidExpiry { expires_in_s: i64 },
    /// HTTP 409: an entry with this id exists (entry ids are used once).
    #[error("entry {entry_id} already exists")]
    EntryExists { entry_id: Uuid },
    /// HTTP 404: no entry with this id.
    #[error("entry not found")]
    EntryNotFound,
    /// HTTP 422: the entry is not pending (immediate, or already posted, voided or expired).
    #[error("entry is {}, not pending", status.as_str())]
    EntryNotPending { status: crate::entry::EntryStatus },
    /// HTTP 422: an entry has fewer than two legs or more than [`crate::entry::LEGS_MAX`].
    #[error(
        "an entry has {} to {} legs; got {legs}",
        crate::entry::LEGS_MIN,
        crate::entry::LEGS_MAX
    )]
    InvalidLegs { legs: usize },
    /// HTTP 422: the debits and credits of an entry differ in one currency.
    #[error("the {currency} legs do not balance: debits {debits}, credits {credits}")]
    EntryUnbalanced {
        currency: Currency,
        debits: i64,
        credits: i64,
    },
    /// HTTP 422 (inside [`AccountError::Leg`]): an account appears in two legs of one entry.
    #[error("account {account_id} is already in leg {first}")]
    AccountRepeated { account_id: Uuid, first: usize },
    /// The refusal of one leg of an entry: `source` says why, `leg` which (its index). Its
    /// status and code are `source`'s.
    #[error("leg {leg}: {source}")]
    Leg { leg: usize, source: Box<AccountError> },
    /// HTTP 422: a command of a linked chain (a batch's items that succeed or fail as a whole)
    /// that was not refused itself; the chain's item `failed` (its index in the batch) was, so
    /// none of the chain was written.
    #[error("item {failed} of the linked chain was refused, so nothing of the chain was written")]
    LinkedItemFailed { failed: usize },
}

impl AccountError {
    /// The stable kebab-case code of the refusal (the problem+json `type`).
    pub fn code(&self) -> &'static str {
        match self {
            AccountError::AlreadyExists => "account-exists",
            AccountError::NotFound | AccountError::AccountNotFound { .. } => "account-not-found",
            AccountError::InvalidOwner => "invalid-owner",
            AccountError::InvalidReference => "invalid-reference",
            AccountError::InvalidReason => "invalid-reason",
            AccountError::InvalidOverdraftLimit => "invalid-overdraft-limit",
            AccountError::InsufficientFunds { .. } => "insufficient-funds",
            AccountError::ExceedsCredits { .. } => "debits-exceed-credits",
            AccountError::ExceedsDebits { .. } => "credits-exceed-debits",
            AccountError::InvalidExternalId => "invalid-external-id",
            AccountError::ExternalIdTaken { .. } => "external-id-taken",
            AccountError::InvalidMetadata { .. } => "invalid-metadata",
            AccountError::InvalidFlags { .. } => "invalid-flags",
            AccountError::LimitBelowUsage { .. } => "limit-below-usage",
            AccountError::BalanceOverflow => "balance-overflow",
            AccountError::Frozen { .. } => "account-frozen",
            AccountError::NotFrozen => "account-not-frozen",
            AccountError::Closed { .. } => "account-closed",
            AccountError::BalanceNotZero { .. } => "balance-not-zero",
            AccountError::HoldsOutstanding { .. } => "holds-outstanding",
            AccountError::TooManyHolds => "too-many-holds",
            AccountError::TransferToSelf => "transfer-to-self",
            AccountError::CurrencyMismatch { .. } => "currency-mismatch",
            AccountError::TransferExists { .. } => "transfer-exists",
            AccountError::TransferNotFound => "transfer-not-found",
            AccountError::TransferNotPending { .. } => "transfer-not-pending",
            AccountError::AmountExceedsHold { .. } => "amount-exceeds-hold",
            AccountError::HoldExpired { .. } => "hold-expired",
            AccountError::HoldNotExpired { .. } => "hold-not-expired",
            AccountError::InvalidExpiry { .. } => "invalid-expiry",
            AccountError::StaleState => "concurrency-conflict",
            AccountError::EntryExists { .. } => "entry-exists",
            AccountError::InvalidLegs { .. } => "invalid-legs",
            AccountError::EntryNotFound => "entry-not-found",
            AccountError::EntryNotPending { .. } => "entry-not-pending",
            AccountError::EntryUnbalanced { .. } => "entry-unbalanced",
            AccountError::AccountRepeated { .. } => "account-repeated",
            AccountError::Leg { source, .. } => source.code(),
            AccountError::LinkedItemFailed { .. } => "linked-item-failed",
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
    /// Refuses debits; accepts credits and hold releases.
    Frozen,
    /// Refuses everything. Final.
    Closed,
}

impl AccountStatus {
    /// The name used on the wire (`unopened`, `open`, `frozen`, `closed`).
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Unopened => "unopened",
            AccountStatus::Open => "open",
            AccountStatus::Frozen => "frozen",
            AccountStatus::Closed => "closed",
        }
    }
}

/// Money reserved on an account by a pending transfer or a pending entry's debit leg, keyed by
/// the transfer's or the entry's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub amount: AmountMinor,
    pub expires_at: DateTime<Utc>,
    /// The account credited if a transfer's hold is posted; none for an entry's (its credit
    /// legs are in the entry).
    #[serde(default)]
    pub counterparty: Option<Uuid>,
}

/// The state of one account, folded from its events.
///
/// Serialized as a snapshot by the command side: change its shape only together with
/// [`Account::SNAPSHOT_VERSION`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub status: AccountStatus,
    pub account_id: Uuid,
    pub owner: String,
    /// `None` only while unopened.
    pub currency: Option<Currency>,
    pub balance: i64,
    /// Sum of the amounts of `holds`.
    pub held: i64,
    pub overdraft_limit: i64,
    /// Active holds by transfer id (ordered, so snapshots serialize deterministically).
    pub holds: BTreeMap<Uuid, Hold>,
    pub external_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Sorted, without repeats.
    pub flags: Vec<AccountFlag>,
}

impl Account {
    /// Version of the serialized shape of `Account` (its snapshot). Bump it whenever a field is
    /// added, removed, renamed or changes type; a snapshot of another version is ignored and
    /// the stream replayed.
    pub const SNAPSHOT_VERSION: u32 = 3;

    /// `balance - held`: what a debit may use (plus the overdraft limit).
    pub fn available(&self) -> i64 {
        // Saturating only matters for corrupt histories; decisions keep it far from the edges.
        self.balance.saturating_sub(self.held)
    }

    /// The account's currency if it exists and is not closed.
    pub(crate) fn require_usable(&self, account_id: Uuid) -> Result<Currency, AccountError> {
        match (self.status, self.currency) {
            (AccountStatus::Unopened, _) | (_, None) => Err(AccountError::AccountNotFound { account_id }),
            (AccountStatus::Closed, _) => Err(AccountError::Closed { account_id }),
            (AccountStatus::Open | AccountStatus::Frozen, Some(currency)) => Ok(currency),
        }
    }

    /// [`require_usable`](Self::require_usable), and not frozen: money may leave.
    pub(crate) fn require_debitable(&self, account_id: Uuid) -> Result<Currency, AccountError> {
        let currency = self.require_usable(account_id)?;
        if self.status == AccountStatus::Frozen {
            return Err(AccountError::Frozen { account_id });
        }
        Ok(currency)
    }

    /// Whether the account carries `flag`.
    pub fn has(&self, flag: AccountFlag) -> bool {
        self.flags.contains(&flag)
    }

    /// Refuses a debit (or a new hold) of `amount` that would take `available` below
    /// `-overdraft_limit`, or below zero on an account whose debits must not exceed its credits.
    pub(crate) fn check_available(&self, amount: AmountMinor) -> Result<(), AccountError> {
        let available = self.available();
        let after = available
            .checked_sub(amount.get())
            .ok_or(AccountError::BalanceOverflow)?;
        if self.has(AccountFlag::DebitsMustNotExceedCredits) && after < 0 {
            return Err(AccountError::ExceedsCredits {
                available,
                requested: amount.get(),
            });
        }
        if after < -self.overdraft_limit {
            return Err(AccountError::InsufficientFunds {
                available,
                requested: amount.get(),
            });
        }
        Ok(())
    }

    /// Refuses a credit that would overflow the balance, or take it above zero on an account
    /// whose credits must not exceed its debits.
    pub(crate) fn check_credit(&self, amount: AmountMinor) -> Result<(), AccountError> {
        let after = self
            .balance
            .checked_add(amount.get())
            .ok_or(AccountError::BalanceOverflow)?;
        if self.has(AccountFlag::CreditsMustNotExceedDebits) && after > 0 {
            return Err(AccountError::ExceedsDebits {
                balance: self.balance,
                requested: amount.get(),
            });
        }
        Ok(())
    }

    /// Decides which events `command` causes, without changing the account: a refusal leaves
    /// no trace. [`Aggregate::handle`] is this plus applying the events.
    pub fn decide(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        // Account commands address the account by URL: its absence is a plain `NotFound`.
        let not_found = |e: AccountError| match e {
            AccountError::AccountNotFound { .. } => AccountError::NotFound,
            other => other,
        };
        let event = match command {
            AccountCommand::Open {
                account_id,
                owner,
                currency,
                overdraft_limit,
                profile,
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
                let profile = profile.validated(overdraft_limit)?;
                AccountEvent::AccountOpened(AccountOpened {
                    account_id,
                    owner,
                    currency,
                    overdraft_limit,
                    external_id: profile.external_id,
                    metadata: profile.metadata,
                    flags: profile.flags,
                })
            }
            AccountCommand::Deposit { amount, reference } => {
                // Deposits are credits: a frozen account accepts them.
                let currency = self.require_usable(self.account_id).map_err(not_found)?;
                check_reference(&reference)?;
                self.check_credit(amount)?;
                AccountEvent::FundsDeposited(FundsDeposited {
                    amount,
                    system_account: SystemAccount::World.id(&currency),
                    currency,
                    reference,
                })
            }
            AccountCommand::Withdraw { amount, reference } => {
                let currency = self.require_debitable(self.account_id).map_err(not_found)?;
                check_reference(&reference)?;
                self.check_available(amount)?;
                AccountEvent::FundsWithdrawn(FundsWithdrawn {
                    amount,
                    system_account: SystemAccount::World.id(&currency),
                    currency,
                    reference,
                })
            }
            AccountCommand::Freeze { reason } => {
                self.require_debitable(self.account_id).map_err(not_found)?;
                if reason.trim().is_empty() || reason.chars().count() > REASON_LEN_MAX {
                    return Err(AccountError::InvalidReason);
                }
                AccountEvent::AccountFrozen(AccountFrozen { reason })
            }
            AccountCommand::Unfreeze => {
                self.require_usable(self.account_id).map_err(not_found)?;
                if self.status != AccountStatus::Frozen {
                    return Err(AccountError::NotFrozen);
                }
                AccountEvent::AccountUnfrozen(AccountUnfrozen {})
            }
            AccountCommand::Close => {
                // A frozen account may be closed: closing moves no money.
                self.require_usable(self.account_id).map_err(not_found)?;
                if !self.holds.is_empty() || self.held != 0 {
                    return Err(AccountError::HoldsOutstanding { held: self.held });
                }
                if self.balance != 0 {
                    return Err(AccountError::BalanceNotZero { balance: self.balance });
                }
                AccountEvent::AccountClosed(AccountClosed {})
            }
            AccountCommand::ChangeLimit { overdraft_limit } => {
                self.require_usable(self.account_id).map_err(not_found)?;
                if !(0..=AMOUNT_MAX_MINOR).contains(&overdraft_limit) {
                    return Err(AccountError::InvalidOverdraftLimit);
                }
                if overdraft_limit != 0 && self.has(AccountFlag::DebitsMustNotExceedCredits) {
                    return Err(AccountError::InvalidFlags {
                        reason: "an account whose debits must not exceed its credits has no overdraft limit",
                    });
                }
                // Holds count: a pending transfer may still be posted in full.
                let available = self.available();
                if available < -overdraft_limit {
                    return Err(AccountError::LimitBelowUsage {
                        available,
                        overdraft_limit,
                    });
                }
                AccountEvent::OverdraftLimitChanged(OverdraftLimitChanged {
                    overdraft_limit,
                    previous: self.overdraft_limit,
                })
            }
        };
        Ok(vec![event])
    }
}

pub(crate) fn check_reference(reference: &str) -> Result<(), AccountError> {
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
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        // `apply` must never fail or panic: events are facts. Arithmetic here was checked by
        // the decision before the event was accepted, so saturating only guards corrupt
        // histories.
        match event {
            AccountEvent::AccountOpened(e) => {
                self.status = AccountStatus::Open;
                self.account_id = e.account_id;
                self.owner = e.owner;
                self.currency = Some(e.currency);
                self.overdraft_limit = e.overdraft_limit;
                self.external_id = e.external_id;
                self.metadata = e.metadata;
                self.flags = e.flags;
            }
            AccountEvent::FundsDeposited(e) => {
                self.balance = self.balance.saturating_add(e.amount.get());
            }
            AccountEvent::FundsWithdrawn(e) => {
                self.balance = self.balance.saturating_sub(e.amount.get());
            }
            AccountEvent::AccountFrozen(_) => self.status = AccountStatus::Frozen,
            AccountEvent::AccountUnfrozen(_) => self.status = AccountStatus::Open,
            AccountEvent::AccountClosed(_) => self.status = AccountStatus::Closed,
            AccountEvent::OverdraftLimitChanged(e) => self.overdraft_limit = e.overdraft_limit,
            AccountEvent::TransferDebited(e) => {
                self.balance = self.balance.saturating_sub(e.amount.get());
            }
            AccountEvent::TransferCredited(e) => {
                self.balance = self.balance.saturating_add(e.amount.get());
            }
            AccountEvent::HoldPlaced(e) => {
                self.held = self.held.saturating_add(e.amount.get());
                self.holds.insert(
                    e.transfer_id,
                    Hold {
                        amount: e.amount,
                        expires_at: e.expires_at,
                        counterparty: Some(e.counterparty),
                    },
                );
            }
            AccountEvent::HoldPosted(e) => {
                self.balance = self.balance.saturating_sub(e.amount.get());
                self.held = self.held.saturating_sub(e.amount.get().saturating_add(e.released));
                self.holds.remove(&e.transfer_id);
            }
            AccountEvent::HoldReleased(e) => {
                self.held = self.held.saturating_sub(e.amount.get());
                self.holds.remove(&e.transfer_id);
            }
            AccountEvent::EntryDebited(e) => {
                self.balance = self.balance.saturating_sub(e.amount.get());
            }
            AccountEvent::EntryCredited(e) => {
                self.balance = self.balance.saturating_add(e.amount.get());
            }
            AccountEvent::EntryHoldPlaced(e) => {
                self.held = self.held.saturating_add(e.amount.get());
                self.holds.insert(
                    e.entry_id,
                    Hold {
                        amount: e.amount,
                        expires_at: e.expires_at,
                        counterparty: None,
                    },
                );
            }
            AccountEvent::EntryHoldPosted(e) => {
                self.balance = self.balance.saturating_sub(e.amount.get());
                self.held = self.held.saturating_sub(e.amount.get());
                self.holds.remove(&e.entry_id);
            }
            AccountEvent::EntryHoldReleased(e) => {
                self.held = self.held.saturating_sub(e.amount.get());
                self.holds.remove(&e.entry_id);
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
        opened_with(overdraft_limit, AccountProfile::default())
    }

    fn opened_with(overdraft_limit: i64, profile: AccountProfile) -> AccountEvent {
        AccountEvent::AccountOpened(AccountOpened {
            account_id: id(),
            owner: "Ada".into(),
            currency: eur(),
            overdraft_limit,
            external_id: profile.external_id,
            metadata: profile.metadata,
            flags: profile.flags,
        })
    }

    fn labelled() -> AccountProfile {
        AccountProfile {
            external_id: Some("cust-42".into()),
            metadata: [("region".to_owned(), "eu".to_owned())].into(),
            flags: vec![AccountFlag::CreditsMustNotExceedDebits],
        }
    }

    fn flagged(flag: AccountFlag) -> AccountProfile {
        AccountProfile {
            flags: vec![flag],
            ..AccountProfile::default()
        }
    }

    #[test]
    fn opening_records_the_profile_and_refuses_a_bad_one() {
        let open = |overdraft_limit, profile| AccountCommand::Open {
            account_id: id(),
            owner: "Ada".into(),
            currency: eur(),
            overdraft_limit,
            profile,
        };
        AccountTest::with(())
            .given_no_previous_events()
            .when(open(10, labelled()))
            .then_expect_events(vec![opened_with(10, labelled())]);
        AccountTest::with(())
            .given_no_previous_events()
            .when(open(10, flagged(AccountFlag::DebitsMustNotExceedCredits)))
            .then_expect_error_message(
                "invalid flags: an account whose debits must not exceed its credits has no overdraft limit",
            );
    }

    #[test]
    fn debits_must_not_exceed_credits_keeps_available_at_or_above_zero() {
        let wallet = opened_with(0, flagged(AccountFlag::DebitsMustNotExceedCredits));
        AccountTest::with(())
            .given(vec![wallet.clone(), deposited(100), hold_placed(40)])
            .when(AccountCommand::Withdraw {
                amount: amount(61),
                reference: "r".into(),
            })
            .then_expect_error(AccountError::ExceedsCredits {
                available: 60,
                requested: 61,
            });
        AccountTest::with(())
            .given(vec![wallet.clone(), deposited(100), hold_placed(40)])
            .when(AccountCommand::Withdraw {
                amount: amount(60),
                reference: "r".into(),
            })
            .then_expect_events(vec![withdrawn(60)]);
        AccountTest::with(())
            .given(vec![wallet])
            .when(AccountCommand::ChangeLimit { overdraft_limit: 1 })
            .then_expect_error(AccountError::InvalidFlags {
                reason: "an account whose debits must not exceed its credits has no overdraft limit",
            });
    }

    #[test]
    fn credits_must_not_exceed_debits_keeps_the_balance_at_or_below_zero() {
        let funding = opened_with(500, flagged(AccountFlag::CreditsMustNotExceedDebits));
        AccountTest::with(())
            .given(vec![funding.clone()])
            .when(AccountCommand::Deposit {
                amount: amount(1),
                reference: "r".into(),
            })
            .then_expect_error(AccountError::ExceedsDebits {
                balance: 0,
                requested: 1,
            });
        AccountTest::with(())
            .given(vec![funding, withdrawn(300)])
            .when(AccountCommand::Deposit {
                amount: amount(300),
                reference: "r".into(),
            })
            .then_expect_events(vec![deposited(300)]);
    }

    fn deposited(v: i64) -> AccountEvent {
        AccountEvent::FundsDeposited(FundsDeposited {
            amount: amount(v),
            currency: eur(),
            reference: "r".into(),
            system_account: SystemAccount::World.id(&eur()),
        })
    }

    fn withdrawn(v: i64) -> AccountEvent {
        AccountEvent::FundsWithdrawn(FundsWithdrawn {
            amount: amount(v),
            currency: eur(),
            reference: "r".into(),
            system_account: SystemAccount::World.id(&eur()),
        })
    }

    fn transfer_id() -> Uuid {
        Uuid::from_u128(7)
    }

    fn other() -> Uuid {
        Uuid::from_u128(43)
    }

    fn frozen() -> AccountEvent {
        AccountEvent::AccountFrozen(AccountFrozen { reason: "fraud".into() })
    }

    fn hold_placed(v: i64) -> AccountEvent {
        AccountEvent::HoldPlaced(HoldPlaced {
            transfer_id: transfer_id(),
            amount: amount(v),
            currency: eur(),
            counterparty: other(),
            expires_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            reference: "r".into(),
        })
    }

    fn hold_posted(v: i64, released: i64) -> AccountEvent {
        AccountEvent::HoldPosted(HoldPosted {
            transfer_id: transfer_id(),
            amount: amount(v),
            currency: eur(),
            released,
        })
    }

    fn hold_released(v: i64, reason: HoldReleaseReason) -> AccountEvent {
        AccountEvent::HoldReleased(HoldReleased {
            transfer_id: transfer_id(),
            amount: amount(v),
            currency: eur(),
            reason,
        })
    }

    fn open_command(owner: &str, overdraft_limit: i64) -> AccountCommand {
        AccountCommand::Open {
            account_id: id(),
            owner: owner.into(),
            currency: eur(),
            overdraft_limit,
            profile: AccountProfile::default(),
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
    fn a_limit_is_lowered_only_as_far_as_the_balance_and_pending_holds_allow() {
        let changed = |overdraft_limit, previous| {
            AccountEvent::OverdraftLimitChanged(OverdraftLimitChanged {
                overdraft_limit,
                previous,
            })
        };
        // 100 on the account, 300 of it held: available is -200 under a limit of 500.
        let using_200 = || vec![opened(500), deposited(100), hold_placed(300)];
        AccountTest::with(())
            .given(using_200())
            .when(AccountCommand::ChangeLimit { overdraft_limit: 200 })
            .then_expect_events(vec![changed(200, 500)]);
        AccountTest::with(())
            .given(using_200())
            .when(AccountCommand::ChangeLimit { overdraft_limit: 199 })
            .then_expect_error(AccountError::LimitBelowUsage {
                available: -200,
                overdraft_limit: 199,
            });
        AccountTest::with(())
            .given(vec![opened(0)])
            .when(AccountCommand::ChangeLimit { overdraft_limit: -1 })
            .then_expect_error(AccountError::InvalidOverdraftLimit);
        AccountTest::with(())
            .given(vec![opened(0), AccountEvent::AccountClosed(AccountClosed {})])
            .when(AccountCommand::ChangeLimit { overdraft_limit: 10 })
            .then_expect_error(AccountError::Closed { account_id: id() });
        // A raised limit is what the next debit is checked against.
        AccountTest::with(())
            .given(vec![opened(0), changed(250, 0)])
            .when(AccountCommand::Withdraw {
                amount: amount(250),
                reference: "r".into(),
            })
            .then_expect_events(vec![withdrawn(250)]);
    }

    #[test]
    fn payloads_round_trip_through_their_stored_form() {
        let events = [
            opened(7),
            deposited(5),
            withdrawn(3),
            frozen(),
            AccountEvent::AccountUnfrozen(AccountUnfrozen {}),
            AccountEvent::AccountClosed(AccountClosed {}),
            AccountEvent::OverdraftLimitChanged(OverdraftLimitChanged {
                overdraft_limit: 50,
                previous: 7,
            }),
            AccountEvent::TransferDebited(TransferDebited {
                transfer_id: transfer_id(),
                amount: amount(5),
                currency: eur(),
                counterparty: other(),
                reference: "r".into(),
            }),
            AccountEvent::TransferCredited(TransferCredited {
                transfer_id: transfer_id(),
                amount: amount(5),
                currency: eur(),
                counterparty: other(),
                reference: "r".into(),
            }),
            hold_placed(40),
            hold_posted(30, 10),
            hold_released(40, HoldReleaseReason::Expired),
            AccountEvent::EntryDebited(EntryDebited {
                entry_id: transfer_id(),
                leg: 0,
                amount: amount(5),
                currency: eur(),
                reference: "r".into(),
            }),
            AccountEvent::EntryCredited(EntryCredited {
                entry_id: transfer_id(),
                leg: 3,
                amount: amount(5),
                currency: eur(),
                reference: "r".into(),
            }),
            AccountEvent::EntryHoldPlaced(EntryHoldPlaced {
                entry_id: transfer_id(),
                leg: 0,
                amount: amount(5),
                currency: eur(),
                expires_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
                reference: "r".into(),
            }),
            AccountEvent::EntryHoldPosted(EntryHoldPosted {
                entry_id: transfer_id(),
                leg: 0,
                amount: amount(5),
                currency: eur(),
                reference: "r".into(),
            }),
            AccountEvent::EntryHoldReleased(EntryHoldReleased {
                entry_id: transfer_id(),
                leg: 0,
                amount: amount(5),
                currency: eur(),
                reason: HoldReleaseReason::Voided,
            }),
        ];
        assert_eq!(events.len(), AccountEvent::TYPES.len(), "every event type is covered");
        for event in events {
            let decoded = AccountEvent::from_payload(event.type_name(), &event.to_payload()).unwrap();
            assert_eq!(decoded, event);
            assert!(AccountEvent::TYPES.contains(&(event.type_name(), event.schema_version())));
        }
    }

    #[test]
    fn existing_event_payloads_keep_their_stored_shape() {
        // v2: the system account on the other side (ADR 0003), pinned with its id.
        assert_eq!(
            deposited(5).to_payload(),
            r#"{"amount":5,"currency":"EUR","reference":"r","system_account":"e883fda3-844c-57e3-87d5-c8d28efc0790"}"#
        );
        assert_eq!(
            opened(7).to_payload(),
            r#"{"account_id":"00000000-0000-0000-0000-00000000002a","owner":"Ada","currency":"EUR","overdraft_limit":7}"#
        );
        assert_eq!(
            hold_released(40, HoldReleaseReason::Voided).to_payload(),
            format!(
                r#"{{"transfer_id":"{}","amount":40,"currency":"EUR","reason":"voided"}}"#,
                transfer_id()
            )
        );
    }

    #[test]
    fn freezing_an_open_account_emits_account_frozen() {
        AccountTest::with(())
            .given(vec![opened(0)])
            .when(AccountCommand::Freeze { reason: "fraud".into() })
            .then_expect_events(vec![frozen()]);
    }

    #[test]
    fn freezing_needs_a_reason_of_bounded_length() {
        for reason in ["  ".to_owned(), "x".repeat(REASON_LEN_MAX + 1)] {
            AccountTest::with(())
                .given(vec![opened(0)])
                .when(AccountCommand::Freeze { reason })
                .then_expect_error(AccountError::InvalidReason);
        }
    }

    #[test]
    fn freezing_a_frozen_account_is_refused() {
        AccountTest::with(())
            .given(vec![opened(0), frozen()])
            .when(AccountCommand::Freeze { reason: "again".into() })
            .then_expect_error(AccountError::Frozen { account_id: id() });
    }

    #[test]
    fn freezing_an_unopened_account_is_refused() {
        AccountTest::with(())
            .given_no_previous_events()
            .when(AccountCommand::Freeze { reason: "fraud".into() })
            .then_expect_error(AccountError::NotFound);
    }

    #[test]
    fn unfreezing_a_frozen_account_emits_account_unfrozen() {
        AccountTest::with(())
            .given(vec![opened(0), frozen()])
            .when(AccountCommand::Unfreeze)
            .then_expect_events(vec![AccountEvent::AccountUnfrozen(AccountUnfrozen {})]);
    }

    #[test]
    fn unfreezing_an_account_that_is_not_frozen_is_refused() {
        AccountTest::with(())
            .given(vec![opened(0)])
            .when(AccountCommand::Unfreeze)
            .then_expect_error(AccountError::NotFrozen);
    }

    #[test]
    fn a_frozen_account_refuses_withdrawals() {
        AccountTest::with(())
            .given(vec![opened(0), deposited(100), frozen()])
            .when(AccountCommand::Withdraw {
                amount: amount(1),
                reference: "r".into(),
            })
            .then_expect_error(AccountError::Frozen { account_id: id() });
    }

    #[test]
    fn a_frozen_account_still_accepts_deposits() {
        AccountTest::with(())
            .given(vec![opened(0), frozen()])
            .when(AccountCommand::Deposit {
                amount: amount(5),
                reference: "r".into(),
            })
            .then_expect_events(vec![deposited(5)]);
    }

    #[test]
    fn an_unfrozen_account_accepts_withdrawals_again() {
        AccountTest::with(())
            .given(vec![
                opened(0),
                deposited(100),
                frozen(),
                AccountEvent::AccountUnfrozen(AccountUnfrozen {}),
            ])
            .when(AccountCommand::Withdraw {
                amount: amount(100),
                reference: "r".into(),
            })
            .then_expect_events(vec![withdrawn(100)]);
    }

    #[test]
    fn closing_an_account_at_zero_balance_emits_account_closed() {
        AccountTest::with(())
            .given(vec![opened(0), deposited(100), withdrawn(100)])
            .when(AccountCommand::Close)
            .then_expect_events(vec![AccountEvent::AccountClosed(AccountClosed {})]);
    }

    #[test]
    fn a_frozen_account_can_be_closed() {
        AccountTest::with(())
            .given(vec![opened(0), frozen()])
            .when(AccountCommand::Close)
            .then_expect_events(vec![AccountEvent::AccountClosed(AccountClosed {})]);
    }

    #[test]
    fn closing_an_account_with_money_on_it_is_refused() {
        AccountTest::with(())
            .given(vec![opened(0), deposited(100)])
            .when(AccountCommand::Close)
            .then_expect_error(AccountError::BalanceNotZero { balance: 100 });
        AccountTest::with(())
            .given(vec![opened(500), withdrawn(100)])
            .when(AccountCommand::Close)
            .then_expect_error(AccountError::BalanceNotZero { balance: -100 });
    }

    #[test]
    fn closing_an_account_with_holds_is_refused() {
        AccountTest::with(())
            .given(vec![opened(100), hold_placed(40)])
            .when(AccountCommand::Close)
            .then_expect_error(AccountError::HoldsOutstanding { held: 40 });
    }

    #[test]
    fn a_closed_account_refuses_everything() {
        let closed = || vec![opened(0), AccountEvent::AccountClosed(AccountClosed {})];
        let refused = AccountError::Closed { account_id: id() };
        for command in [
            AccountCommand::Deposit {
                amount: amount(1),
                reference: "r".into(),
            },
            AccountCommand::Withdraw {
                amount: amount(1),
                reference: "r".into(),
            },
            AccountCommand::Freeze { reason: "x".into() },
            AccountCommand::Unfreeze,
            AccountCommand::Close,
        ] {
            AccountTest::with(())
                .given(closed())
                .when(command)
                .then_expect_error(refused.clone());
        }
        AccountTest::with(())
            .given(closed())
            .when(open_command("Ada", 0))
            .then_expect_error(AccountError::AlreadyExists);
    }

    #[test]
    fn holds_reduce_available_but_not_the_balance() {
        AccountTest::with(())
            .given(vec![opened(0), deposited(100), hold_placed(40)])
            .when(AccountCommand::Withdraw {
                amount: amount(61),
                reference: "r".into(),
            })
            .then_expect_error(AccountError::InsufficientFunds {
                available: 60,
                requested: 61,
            });
    }

    #[test]
    fn account_state_folds_transfer_legs_and_holds() {
        let mut account = Account::default();
        for event in [
            opened(0),
            deposited(100),
            hold_placed(40),
            AccountEvent::TransferDebited(TransferDebited {
                transfer_id: Uuid::from_u128(9),
                amount: amount(10),
                currency: eur(),
                counterparty: other(),
                reference: "r".into(),
            }),
        ] {
            account.apply(event);
        }
        assert_eq!((account.balance, account.held, account.available()), (90, 40, 50));
        assert_eq!(account.holds[&transfer_id()].amount, amount(40));

        let mut posted = account.clone();
        posted.apply(hold_posted(30, 10));
        assert_eq!((posted.balance, posted.held, posted.available()), (60, 0, 60));
        assert!(posted.holds.is_empty());

        account.apply(hold_released(40, HoldReleaseReason::Voided));
        assert_eq!((account.balance, account.held, account.available()), (90, 0, 90));
        assert!(account.holds.is_empty());

        account.apply(AccountEvent::TransferCredited(TransferCredited {
            transfer_id: Uuid::from_u128(10),
            amount: amount(5),
            currency: eur(),
            counterparty: other(),
            reference: "r".into(),
        }));
        assert_eq!(account.balance, 95);
    }

    #[test]
    fn apply_never_panics_on_a_corrupt_history() {
        let mut account = Account::default();
        for event in [
            hold_posted(AMOUNT_MAX_MINOR, i64::MAX),
            hold_released(40, HoldReleaseReason::Expired),
            withdrawn(AMOUNT_MAX_MINOR),
            AccountEvent::AccountClosed(AccountClosed {}),
            AccountEvent::AccountUnfrozen(AccountUnfrozen {}),
        ] {
            account.apply(event);
        }
        let _ = account.available();
    }

    #[test]
    fn account_state_round_trips_through_its_snapshot_form() {
        let mut account = Account::default();
        for event in [opened_with(10, labelled()), deposited(100), hold_placed(40), frozen()] {
            account.apply(event);
        }
        assert_eq!(account.external_id.as_deref(), Some("cust-42"));
        let snapshot = serde_json::to_string(&account).unwrap();
        assert_eq!(serde_json::from_str::<Account>(&snapshot).unwrap(), account);
        // 3: a hold's counterparty became optional (an entry's hold has none).
        assert_eq!(Account::SNAPSHOT_VERSION, 3);
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
