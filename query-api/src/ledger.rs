//! The ledger as a whole, for auditors: the trial balance per currency
//! (`GET /v1/ledger/trial-balance`) and the system accounts (`GET /v1/ledger/system-accounts`),
//! and the gauge `tally_trial_balance_minor{currency}` kept from the same reading.
//!
//! Every movement is double-entry (ADR 0003): a deposit debits the currency's `world` account,
//! a transfer leg the read models applied without its other half sits in `transit`. System
//! accounts have no row of their own (a row every deposit updates would serialize them); their
//! balances come from `ledger_totals`, whose rows are kept per partition. Client balances are
//! summed from the `account_balances` rows themselves, in the same statement (one snapshot), so
//! `balance` is a cross-check of two read models written together, not an identity: a lost,
//! doubled or edited balance row makes it non-zero.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sqlx::{PgPool, Row};
use tally_domain::{Currency, SystemAccount};
use tally_service::Problem;
use tally_service::auth::{Auditor, Require};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::routes::{PROBLEM_JSON, unavailable};

/// One currency of the trial balance. Every amount is in minor units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CurrencyBalance {
    #[schema(example = "EUR")]
    pub currency: String,
    /// Everything debited in this currency, system accounts included.
    pub debits: i64,
    /// Everything credited in this currency, system accounts included; equal to `debits`.
    pub credits: i64,
    /// The sum of every account's balance in this currency, system accounts included: `0`.
    /// Anything else means the read models disagree with each other (see `tally ledger
    /// reconcile`).
    pub balance: i64,
    /// Client accounts opened in this currency.
    pub accounts: i64,
    /// The sum of the client accounts' balances (what the ledger owes its clients).
    pub client_balances: i64,
    /// The balance of the `world` system account: minus the money that came in from outside
    /// and stayed.
    pub world: i64,
    /// The balance of the `transit` system account: transfer legs applied on one side only.
    /// `0` once the read models have caught up.
    pub in_transit: i64,
}

/// The trial balance of every currency.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TrialBalance {
    /// One entry per currency with an account, by code.
    pub currencies: Vec<CurrencyBalance>,
    /// The newest log position the balances reflect (0 before any event).
    pub position: i64,
}

/// A system account of one currency.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SystemAccountView {
    /// Fixed forever: `uuid_v5(namespace, "tally:system:<name>:<currency>")` (ADR 0003).
    pub account_id: Uuid,
    /// `world` or `transit`.
    #[schema(example = "world")]
    pub name: &'static str,
    #[schema(example = "EUR")]
    pub currency: String,
    /// Credits minus debits, in minor units.
    pub balance: i64,
    pub debits: i64,
    pub credits: i64,
    pub description: &'static str,
}

/// Every system account of every currency with an account.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SystemAccounts {
    pub system_accounts: Vec<SystemAccountView>,
}

/// What one reading of the read models gives, per currency.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Sums {
    currency: String,
    accounts: i64,
    inflow: i64,
    outflow: i64,
    transfers_out: i64,
    transfers_in: i64,
    client_balances: i64,
    position: i64,
}

impl Sums {
    /// Debits and credits of each account kind: a client account is debited by withdrawals and
    /// outgoing legs and credited by deposits and incoming legs; `world` the other way round
    /// for deposits and withdrawals; `transit` credited by outgoing legs, debited by incoming.
    fn world(&self) -> (i64, i64) {
        (self.inflow, self.outflow)
    }

    fn transit(&self) -> (i64, i64) {
        (self.transfers_in, self.transfers_out)
    }

    fn balance(&self) -> CurrencyBalance {
        let (world_debits, world_credits) = self.world();
        let (transit_debits, transit_credits) = self.transit();
        let client_debits = self.outflow.saturating_add(self.transfers_out);
        let client_credits = self.inflow.saturating_add(self.transfers_in);
        let world = world_credits.saturating_sub(world_debits);
        let in_transit = transit_credits.saturating_sub(transit_debits);
        CurrencyBalance {
            currency: self.currency.clone(),
            debits: client_debits
                .saturating_add(world_debits)
                .saturating_add(transit_debits),
            credits: client_credits
                .saturating_add(world_credits)
                .saturating_add(transit_credits),
            balance: self.client_balances.saturating_add(world).saturating_add(in_transit),
            accounts: self.accounts,
            client_balances: self.client_balances,
            world,
            in_transit,
        }
    }

    fn system_accounts(&self) -> Vec<SystemAccountView> {
        // A currency code that no longer parses (opened before codes were checked) still has
        // its accounts; its system accounts are named from the code as stored.
        let Ok(currency) = self.currency.parse::<Currency>() else {
            return Vec::new();
        };
        SystemAccount::ALL
            .into_iter()
            .map(|kind| {
                let (debits, credits) = match kind {
                    SystemAccount::World => self.world(),
                    SystemAccount::Transit => self.transit(),
                };
                SystemAccountView {
                    account_id: kind.id(&currency),
                    name: kind.as_str(),
                    currency: self.currency.clone(),
                    balance: credits.saturating_sub(debits),
                    debits,
                    credits,
                    description: kind.description(),
                }
            })
            .collect()
    }
}

/// Reads the totals and the client balances in one statement, so both come from one snapshot.
///
/// `account_balances` is named before `ledger_totals`: Postgres locks a statement's relations
/// in the order it names them, and a rebuild's switch (`tally projections rebuild`) replaces
/// the accounts projection's views in the order of its tables (balances, statement, totals).
/// Named the other way round, a read holding `ledger_totals` and waiting for `account_balances`
/// deadlocks with a switch holding `account_balances` and waiting for `ledger_totals`, on the
/// primary and on a replica replaying the switch alike.
async fn read_sums(pool: &PgPool) -> Result<Vec<Sums>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT t.currency, t.accounts, t.inflow, t.outflow, t.transfers_out, t.transfers_in, \
                COALESCE(b.balances, 0)::bigint AS client_balances, COALESCE(b.position, 0)::bigint AS position \
         FROM (SELECT currency, sum(balance) AS balances, max(last_position) AS position \
               FROM account_balances GROUP BY currency) b \
         RIGHT JOIN ledger_totals t USING (currency) \
         ORDER BY t.currency",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Sums {
                currency: row.try_get("currency")?,
                accounts: row.try_get("accounts")?,
                inflow: row.try_get("inflow")?,
                outflow: row.try_get("outflow")?,
                transfers_out: row.try_get("transfers_out")?,
                transfers_in: row.try_get("transfers_in")?,
                client_balances: row.try_get("client_balances")?,
                position: row.try_get("position")?,
            })
        })
        .collect()
}

/// The trial balance as the read models show it now.
pub async fn trial_balance(pool: &PgPool) -> Result<TrialBalance, sqlx::Error> {
    let sums = read_sums(pool).await?;
    Ok(TrialBalance {
        position: sums.iter().map(|s| s.position).max().unwrap_or(0),
        currencies: sums.iter().map(Sums::balance).collect(),
    })
}

#[utoipa::path(
    get,
    path = "/v1/ledger/trial-balance",
    tag = "ledger",
    security(("bearerAuth" = ["auditor"])),
    summary = "The trial balance per currency: debits, credits and the sum of every balance, system accounts included",
    description = "Reads every client balance of the read models (one pass over them) and the system accounts' \
        totals in one snapshot. `balance` is 0 for every currency; anything else means the read models disagree \
        (run `tally ledger reconcile`).",
    responses(
        (status = 200, description = "The trial balance.", body = TrialBalance),
        (status = 503, description = "`database-unavailable` (the database is away) or `unavailable` (a read it could not finish, e.g. past its statement timeout); retry after `Retry-After` seconds.", body = Problem,
         content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_trial_balance(_: Require<Auditor>, State(state): State<AppState>) -> Response {
    let (pool, _) = state.sources.pick();
    match trial_balance(pool).await {
        Ok(balance) => Json(balance).into_response(),
        Err(e) => unavailable(&e),
    }
}

#[utoipa::path(
    get,
    path = "/v1/ledger/system-accounts",
    tag = "ledger",
    security(("bearerAuth" = ["auditor"])),
    summary = "The ledger's own accounts (world, transit) of every currency, with their balances",
    responses(
        (status = 200, description = "Every system account, by currency then name.", body = SystemAccounts),
        (status = 503, description = "`database-unavailable` (the database is away) or `unavailable` (a read it could not finish, e.g. past its statement timeout); retry after `Retry-After` seconds.", body = Problem,
         content_type = PROBLEM_JSON),
    )
)]
pub(crate) async fn get_system_accounts(_: Require<Auditor>, State(state): State<AppState>) -> Response {
    let (pool, _) = state.sources.pick();
    match read_sums(pool).await {
        Ok(sums) => Json(SystemAccounts {
            system_accounts: sums.iter().flat_map(Sums::system_accounts).collect(),
        })
        .into_response(),
        Err(e) => unavailable(&e),
    }
}

/// Sets `tally_trial_balance_minor{currency}` (0 when the read models agree) and
/// `tally_trial_balance_in_transit_minor{currency}`. Only [`watch`] calls it: metrics are
/// recorded where the work happens, not in handlers (ARCHITECTURE.md).
fn record(balance: &TrialBalance) {
    for c in &balance.currencies {
        metrics::gauge!("tally_trial_balance_minor", "currency" => c.currency.clone()).set(c.balance as f64);
        metrics::gauge!("tally_trial_balance_in_transit_minor", "currency" => c.currency.clone())
            .set(c.in_transit as f64);
    }
}

/// Reads the trial balance every `interval` for the gauges, until the process ends. A failed
/// reading leaves the gauges as they were (the replica monitor reports the outage).
pub async fn watch(state: AppState, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let (pool, _) = state.sources.pick();
        match trial_balance(pool).await {
            Ok(balance) => record(&balance),
            Err(e) => tracing::debug!(error = %e, "trial balance not read"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_movement_keeps_debits_equal_to_credits_and_the_balance_at_zero() {
        // 1000 deposited, 300 withdrawn, 200 moved of which 50 is applied on the sender only.
        let sums = Sums {
            currency: "EUR".into(),
            accounts: 2,
            inflow: 1000,
            outflow: 300,
            transfers_out: 250,
            transfers_in: 200,
            client_balances: 1000 - 300 - 250 + 200,
            position: 9,
        };
        let b = sums.balance();
        assert_eq!(b.debits, b.credits);
        assert_eq!((b.balance, b.world, b.in_transit), (0, -700, 50));
        // A balance row that lost 5 shows in the trial balance.
        let off = Sums {
            client_balances: sums.client_balances - 5,
            ..sums.clone()
        };
        assert_eq!(off.balance().balance, -5);
        let accounts = sums.system_accounts();
        assert_eq!(accounts.len(), 2);
        assert_eq!(accounts.iter().map(|a| a.balance).sum::<i64>(), -700 + 50);
        assert_eq!(accounts[0].account_id, SystemAccount::World.id(&"EUR".parse().unwrap()));
    }
}
