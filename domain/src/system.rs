//! The ledger's own accounts, one of each kind per currency (ADR 0003).
//!
//! Every movement is double-entry: money a client account gains, another account loses. A
//! deposit debits the currency's `world` account (money entering from outside the ledger) and
//! credits the client's; a withdrawal does the reverse. So the balances of a currency, these
//! accounts included, sum to zero at every committed position of the log.
//!
//! System accounts have no stream of their own. Every deposit of a currency writing to one
//! `world` stream would make it the hottest stream of the ledger, serializing every deposit
//! behind one row lock; instead each deposit and withdrawal event names its system account
//! (`FundsDeposited.system_account`), and the account's balance is the fold of those events,
//! kept per partition by the read side and summed when read.
//!
//! `transit` exists only on the read side: the two legs of a transfer commit together in the
//! log, but the read models apply them in their accounts' partitions, one possibly before the
//! other. A leg applied without its other half is booked against `transit`, so the read
//! model's trial balance is zero at every read too, and `transit` is zero once every partition
//! has caught up. In the log (a fold of it) `transit` is always zero.

use uuid::Uuid;

use crate::money::Currency;

/// The kinds of system account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SystemAccount {
    /// Money outside the ledger: debited by deposits, credited by withdrawals. Its balance is
    /// minus the money the ledger holds for clients in that currency.
    World,
    /// Transfer legs the read models have applied on one side only (always zero in the log).
    Transit,
}

/// Names every system account id: `Uuid::new_v5(NAMESPACE, "tally:system:<kind>:<CUR>")`.
/// Fixed forever, since ids derived from it are stored in the log.
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_3c2e_8d4b_5f70_9e21_c0ff_ee1e_d6e5);

impl SystemAccount {
    pub const ALL: [SystemAccount; 2] = [SystemAccount::World, SystemAccount::Transit];

    /// The wire name: `world`, `transit`.
    pub fn as_str(self) -> &'static str {
        match self {
            SystemAccount::World => "world",
            SystemAccount::Transit => "transit",
        }
    }

    /// What the account stands for, for listings.
    pub fn description(self) -> &'static str {
        match self {
            SystemAccount::World => {
                "Money outside the ledger: debited by deposits, credited by withdrawals. Its balance is minus \
                 what the ledger holds for its clients in this currency."
            }
            SystemAccount::Transit => {
                "Transfer legs the read models have applied on one side only. Zero in the log, and zero in the \
                 read models once every partition has caught up."
            }
        }
    }

    /// The account's id in `currency`: the same on every node and in every year.
    pub fn id(self, currency: &Currency) -> Uuid {
        Uuid::new_v5(
            &NAMESPACE,
            format!("tally:system:{}:{}", self.as_str(), currency.as_str()).as_bytes(),
        )
    }

    /// Which system account `id` is in `currency`, if any.
    pub fn of(id: Uuid, currency: &Currency) -> Option<SystemAccount> {
        Self::ALL.into_iter().find(|kind| kind.id(currency) == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn currency(code: &str) -> Currency {
        code.parse().unwrap()
    }

    #[test]
    fn ids_are_fixed_distinct_per_kind_and_currency_and_recognized() {
        let eur = currency("EUR");
        let usd = currency("USD");
        let ids = [
            SystemAccount::World.id(&eur),
            SystemAccount::World.id(&usd),
            SystemAccount::Transit.id(&eur),
        ];
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], ids[2]);
        // Stored in the log: a change to the derivation would orphan every stored id.
        assert_eq!(ids[0].to_string(), "e883fda3-844c-57e3-87d5-c8d28efc0790");
        assert_eq!(SystemAccount::of(ids[0], &eur), Some(SystemAccount::World));
        assert_eq!(SystemAccount::of(ids[0], &usd), None);
        assert_eq!(SystemAccount::of(Uuid::nil(), &eur), None);
    }
}
