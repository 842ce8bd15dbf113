//! Older shapes of event payloads, kept so stored events of every version stay readable, and
//! the upcasters that lift each version to the next.
//!
//! History (newest last; each entry keeps its schema file under `schemas/events/`):
//! - `AccountOpened` v1 → v2: v2 added `overdraft_limit`. A v1 account had no overdraft, so the
//!   upcaster sets it to 0.
//! - `AccountOpened` v2 → v3: v3 added the optional `external_id`, `metadata` and `flags`. A v2
//!   account has none of them, so a valid v2 payload is lifted unchanged.
//! - `FundsDeposited` and `FundsWithdrawn` v1 → v2: v2 names the system account on the other
//!   side (`system_account`, ADR 0003). Before system accounts, money came from and went to
//!   outside the ledger, which is what the currency's `world` account stands for, so the
//!   upcaster names it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tally_domain::{AmountMinor, Currency, SystemAccount};
use uuid::Uuid;

use crate::{UpcastError, schema_file_name, schema_of};

/// `AccountOpened` v1: an account with no overdraft facility.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountOpenedV1 {
    pub account_id: Uuid,
    pub owner: String,
    #[schemars(regex(pattern = "^[A-Z]{3}$"))]
    pub currency: String,
}

/// `AccountOpened` v2: an account with an overdraft limit, and no external id, metadata or
/// flags.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "AccountOpened",
    description = "The account was opened. Always version 1 of its stream."
)]
pub struct AccountOpenedV2 {
    pub account_id: Uuid,
    pub owner: String,
    pub currency: Currency,
    /// How far below zero `available` may go, in minor units (0: no overdraft).
    pub overdraft_limit: i64,
}

/// `FundsDeposited` v1: a deposit that did not name the account on the other side.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "FundsDeposited", description = "Money arrived from outside the ledger.")]
pub struct FundsDepositedV1 {
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
}

/// `FundsWithdrawn` v1: a withdrawal that did not name the account on the other side.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "FundsWithdrawn", description = "Money left the ledger.")]
pub struct FundsWithdrawnV1 {
    pub amount: AmountMinor,
    pub currency: Currency,
    pub reference: String,
}

/// The schemas of the older versions.
pub fn schemas() -> Vec<(String, serde_json::Value)> {
    vec![
        (
            schema_file_name("AccountOpened", 1),
            schema_of::<AccountOpenedV1>("AccountOpened", 1).to_value(),
        ),
        (
            schema_file_name("AccountOpened", 2),
            schema_of::<AccountOpenedV2>("AccountOpened", 2).to_value(),
        ),
        (
            schema_file_name("FundsDeposited", 1),
            schema_of::<FundsDepositedV1>("FundsDeposited", 1).to_value(),
        ),
        (
            schema_file_name("FundsWithdrawn", 1),
            schema_of::<FundsWithdrawnV1>("FundsWithdrawn", 1).to_value(),
        ),
    ]
}

/// Lifts `payload` from `from` to `to`, one version at a time; returns the JSON text of the
/// `to` version.
pub fn upcast(event_type: &str, from: u32, to: u32, payload: &str) -> Result<String, UpcastError> {
    let malformed = |reason: String| UpcastError::Malformed {
        event_type: event_type.to_owned(),
        schema_version: from,
        reason,
    };
    let mut value: serde_json::Value = serde_json::from_str(payload).map_err(|e| malformed(e.to_string()))?;
    for version in from..to {
        value = match (event_type, version) {
            ("AccountOpened", 1) => {
                // Validate against the v1 shape first: an upcaster must not launder garbage.
                let v1: AccountOpenedV1 = serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
                serde_json::json!({
                    "account_id": v1.account_id,
                    "owner": v1.owner,
                    "currency": v1.currency,
                    "overdraft_limit": 0,
                })
            }
            ("AccountOpened", 2) => {
                let v2: AccountOpenedV2 = serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
                serde_json::to_value(v2).map_err(|e| malformed(e.to_string()))?
            }
            ("FundsDeposited", 1) => {
                let v1: FundsDepositedV1 = serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
                with_world_account(v1.amount, v1.currency, v1.reference)
            }
            ("FundsWithdrawn", 1) => {
                let v1: FundsWithdrawnV1 = serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
                with_world_account(v1.amount, v1.currency, v1.reference)
            }
            _ => {
                return Err(UpcastError::UnknownVersion {
                    event_type: event_type.to_owned(),
                    schema_version: version,
                    current: to,
                });
            }
        };
    }
    Ok(value.to_string())
}

/// A v2 deposit or withdrawal: the v1 fields and the currency's `world` account.
fn with_world_account(amount: AmountMinor, currency: Currency, reference: String) -> serde_json::Value {
    serde_json::json!({
        "amount": amount,
        "currency": currency,
        "reference": reference,
        "system_account": SystemAccount::World.id(&currency),
    })
}

#[cfg(test)]
mod tests {
    use tally_domain::AccountEvent;

    use crate::decode_account_event;

    #[test]
    fn a_stored_v1_account_opened_reads_back_as_v2_with_no_overdraft() {
        let v1 = r#"{"account_id":"01a20a8f-b2ee-73c7-8650-550d6d9d6157","owner":"Ada","currency":"EUR"}"#;

        let event = decode_account_event("AccountOpened", 1, v1).unwrap();

        let AccountEvent::AccountOpened(opened) = event else {
            panic!("decoded into the wrong type: {event:?}");
        };
        assert_eq!(opened.owner, "Ada");
        assert_eq!(opened.currency.as_str(), "EUR");
        assert_eq!(opened.overdraft_limit, 0);
    }

    #[test]
    fn a_stored_v2_account_opened_reads_back_as_v3_with_no_profile() {
        let v2 = r#"{"account_id":"01a20a8f-b2ee-73c7-8650-550d6d9d6157","owner":"Ada","currency":"EUR","overdraft_limit":7}"#;

        let AccountEvent::AccountOpened(opened) = decode_account_event("AccountOpened", 2, v2).unwrap() else {
            panic!("decoded into the wrong type");
        };
        assert_eq!(opened.overdraft_limit, 7);
        assert_eq!(opened.external_id, None);
        assert!(opened.metadata.is_empty() && opened.flags.is_empty());
        // A v2 payload claiming v3's fields is not a v2 payload.
        let forged = r#"{"account_id":"01a20a8f-b2ee-73c7-8650-550d6d9d6157","owner":"Ada","currency":"EUR","overdraft_limit":7,"flags":["credits_must_not_exceed_debits"]}"#;
        assert!(decode_account_event("AccountOpened", 2, forged).is_err());
    }

    #[test]
    fn a_v1_payload_that_is_not_valid_v1_is_an_error_not_upcast() {
        for bad in [
            r#"{"account_id":"nope","owner":"Ada","currency":"EUR"}"#,
            r#"{"owner":"Ada","currency":"EUR"}"#,
            r#"{"account_id":"01a20a8f-b2ee-73c7-8650-550d6d9d6157","owner":"Ada","currency":"EUR","x":1}"#,
            "[]",
        ] {
            assert!(decode_account_event("AccountOpened", 1, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stored_v1_deposits_and_withdrawals_read_back_against_the_world_account() {
        let eur: tally_domain::Currency = "EUR".parse().unwrap();
        let world = tally_domain::SystemAccount::World.id(&eur);
        let deposit = r#"{"amount":500,"currency":"EUR","reference":"salary"}"#;
        let AccountEvent::FundsDeposited(d) = decode_account_event("FundsDeposited", 1, deposit).unwrap() else {
            panic!("decoded into the wrong type");
        };
        assert_eq!(
            (d.amount.get(), d.reference.as_str(), d.system_account),
            (500, "salary", world)
        );
        let withdrawal = r#"{"amount":200,"currency":"EUR","reference":"rent"}"#;
        let AccountEvent::FundsWithdrawn(w) = decode_account_event("FundsWithdrawn", 1, withdrawal).unwrap() else {
            panic!("decoded into the wrong type");
        };
        assert_eq!((w.amount.get(), w.system_account), (200, world));
        // A v1 payload already naming a system account is not a v1 payload.
        let forged = format!(r#"{{"amount":1,"currency":"EUR","reference":"","system_account":"{world}"}}"#);
        assert!(decode_account_event("FundsDeposited", 1, &forged).is_err());
        // v2 reads as stored.
        assert!(decode_account_event("FundsDeposited", 2, &forged).is_ok());
        assert!(decode_account_event("FundsDeposited", 2, deposit).is_err());
    }
}
