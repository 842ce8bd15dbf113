//! What an account is, besides its money: the client's own id for it (`external_id`), its
//! labels (`metadata`) and the flags that bound its balance. All are fixed when the account is
//! opened.
//!
//! - **Flags** (TigerBeetle's account flags, in Tally's sign, where a debit lowers the balance):
//!   - [`AccountFlag::DebitsMustNotExceedCredits`]: `available` (balance minus holds) never goes
//!     below zero, whatever the overdraft limit; so the account cannot carry one above 0.
//!     For customer wallets that must never go negative.
//!   - [`AccountFlag::CreditsMustNotExceedDebits`]: the balance never goes above zero; credits
//!     only pay back what was debited. For accounts that stand for money owed to the ledger or
//!     held outside it (a settlement or funding account).
//!   - The two exclude each other (an account bounded on both sides could never move).
//! - **External id**: 1 to [`EXTERNAL_ID_LEN_MAX`] visible ASCII characters, unique in the
//!   ledger: the id of the account in the client's own system, reserved on its own stream
//!   ([`crate::reservation`]) in the same append that opens the account, and never released.
//! - **Metadata**: at most [`METADATA_ENTRIES_MAX`] labels; a key is 1 to [`METADATA_KEY_LEN_MAX`]
//!   of `A-Z a-z 0-9 _ - .` (it is written in a query string as `metadata.KEY=VALUE`), a value up
//!   to [`METADATA_VALUE_LEN_MAX`] characters with no control characters.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::account::AccountError;

/// Longest accepted external id, in characters.
pub const EXTERNAL_ID_LEN_MAX: usize = 128;
/// Most metadata entries on one account.
pub const METADATA_ENTRIES_MAX: usize = 16;
/// Longest metadata key, in characters.
pub const METADATA_KEY_LEN_MAX: usize = 64;
/// Longest metadata value, in characters.
pub const METADATA_VALUE_LEN_MAX: usize = 256;

/// A bound on an account's balance, chosen when it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountFlag {
    /// `available` never goes below zero: no overdraft, whatever the limit.
    DebitsMustNotExceedCredits,
    /// The balance never goes above zero.
    CreditsMustNotExceedDebits,
}

impl AccountFlag {
    /// Every flag, in wire order.
    pub const ALL: [AccountFlag; 2] = [
        AccountFlag::DebitsMustNotExceedCredits,
        AccountFlag::CreditsMustNotExceedDebits,
    ];

    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountFlag::DebitsMustNotExceedCredits => "debits_must_not_exceed_credits",
            AccountFlag::CreditsMustNotExceedDebits => "credits_must_not_exceed_debits",
        }
    }

    /// The flag named `name` on the wire.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }
}

/// An account's external id, metadata and flags, as a command asks for them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountProfile {
    pub external_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Sorted, without repeats (see [`AccountProfile::validated`]).
    pub flags: Vec<AccountFlag>,
}

impl AccountProfile {
    /// The profile with its flags sorted and deduplicated, or why it is refused.
    pub fn validated(mut self, overdraft_limit: i64) -> Result<Self, AccountError> {
        if let Some(id) = &self.external_id
            && !is_external_id(id)
        {
            return Err(AccountError::InvalidExternalId);
        }
        check_metadata(&self.metadata)?;
        self.flags.sort_unstable();
        self.flags.dedup();
        if self.flags.len() > 1 {
            return Err(AccountError::InvalidFlags {
                reason: "debits_must_not_exceed_credits and credits_must_not_exceed_debits exclude each other",
            });
        }
        if self.flags.contains(&AccountFlag::DebitsMustNotExceedCredits) && overdraft_limit != 0 {
            return Err(AccountError::InvalidFlags {
                reason: "an account whose debits must not exceed its credits has no overdraft limit",
            });
        }
        Ok(self)
    }
}

/// 1 to [`EXTERNAL_ID_LEN_MAX`] visible ASCII characters.
pub fn is_external_id(id: &str) -> bool {
    (1..=EXTERNAL_ID_LEN_MAX).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A metadata key: 1 to [`METADATA_KEY_LEN_MAX`] of `A-Z a-z 0-9 _ - .`.
pub fn is_metadata_key(key: &str) -> bool {
    (1..=METADATA_KEY_LEN_MAX).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A metadata value: up to [`METADATA_VALUE_LEN_MAX`] characters, none of them a control.
pub fn is_metadata_value(value: &str) -> bool {
    value.chars().count() <= METADATA_VALUE_LEN_MAX && !value.chars().any(char::is_control)
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), AccountError> {
    if metadata.len() > METADATA_ENTRIES_MAX {
        return Err(AccountError::InvalidMetadata {
            reason: format!("at most {METADATA_ENTRIES_MAX} entries"),
        });
    }
    if let Some(key) = metadata.keys().find(|k| !is_metadata_key(k)) {
        return Err(AccountError::InvalidMetadata {
            reason: format!(
                "key {:?}: 1 to {METADATA_KEY_LEN_MAX} of A-Z a-z 0-9 _ - .",
                key.chars().take(METADATA_KEY_LEN_MAX).collect::<String>()
            ),
        });
    }
    if let Some((key, _)) = metadata.iter().find(|(_, v)| !is_metadata_value(v)) {
        return Err(AccountError::InvalidMetadata {
            reason: format!("the value of {key:?}: at most {METADATA_VALUE_LEN_MAX} characters, no control characters"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(external_id: Option<&str>, metadata: &[(&str, &str)], flags: &[AccountFlag]) -> AccountProfile {
        AccountProfile {
            external_id: external_id.map(str::to_owned),
            metadata: metadata
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            flags: flags.to_vec(),
        }
    }

    #[test]
    fn a_profile_within_its_bounds_is_accepted_with_its_flags_sorted() {
        let flags = [
            AccountFlag::DebitsMustNotExceedCredits,
            AccountFlag::DebitsMustNotExceedCredits,
        ];
        let ok = profile(
            Some("cust-42/eur"),
            &[("region", "eu-west"), ("tier.level", "")],
            &flags,
        )
        .validated(0)
        .unwrap();
        assert_eq!(ok.flags, vec![AccountFlag::DebitsMustNotExceedCredits]);
        assert!(profile(Some(&"x".repeat(128)), &[], &[]).validated(0).is_ok());
    }

    #[test]
    fn bad_external_ids_are_refused() {
        for bad in ["", "has space", "ünï", &"x".repeat(129)] {
            assert_eq!(
                profile(Some(bad), &[], &[]).validated(0),
                Err(AccountError::InvalidExternalId),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bad_metadata_is_refused() {
        let too_many: Vec<(String, String)> = (0..17).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        let too_many: Vec<(&str, &str)> = too_many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let long_value = "v".repeat(257);
        for metadata in [
            too_many.as_slice(),
            &[("", "v")],
            &[("a b", "v")],
            &[("a=b", "v")],
            &[("k", "line\nbreak")],
            &[("k", long_value.as_str())],
        ] {
            assert!(
                matches!(
                    profile(None, metadata, &[]).validated(0),
                    Err(AccountError::InvalidMetadata { .. })
                ),
                "{metadata:?}"
            );
        }
    }

    #[test]
    fn the_two_flags_exclude_each_other_and_no_overdraft_goes_with_the_first() {
        let both = profile(None, &[], &AccountFlag::ALL);
        assert!(matches!(both.validated(0), Err(AccountError::InvalidFlags { .. })));
        let no_overdraft = profile(None, &[], &[AccountFlag::DebitsMustNotExceedCredits]);
        assert!(matches!(
            no_overdraft.validated(1),
            Err(AccountError::InvalidFlags { .. })
        ));
        let owed = profile(None, &[], &[AccountFlag::CreditsMustNotExceedDebits]);
        assert!(owed.validated(1_000).is_ok());
    }

    #[test]
    fn flags_read_back_from_their_wire_names() {
        for flag in AccountFlag::ALL {
            assert_eq!(AccountFlag::parse(flag.as_str()), Some(flag));
            assert_eq!(serde_json::to_value(flag).unwrap(), flag.as_str());
        }
        assert_eq!(AccountFlag::parse("nope"), None);
    }
}
