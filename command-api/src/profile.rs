//! The external id, metadata and flags of an account on the wire: what `POST /v1/accounts`
//! takes beside the owner and currency, and what every account response shows. The rules are
//! the domain's (`tally_domain::profile`); this module only reads and writes them.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use tally_domain::{Account, AccountFlag, AccountProfile};
use tally_service::Problem;

/// The schema of `flags`: the names the domain knows, so clients and schemathesis see them.
pub(crate) fn flags_schema() -> utoipa::openapi::schema::Array {
    let names = AccountFlag::ALL.map(AccountFlag::as_str);
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::Type::String)
                .enum_values(Some(names)),
        )
        .description(Some(
            "Bounds on the balance, fixed at opening: `debits_must_not_exceed_credits` (available \
             never below zero; no overdraft limit) or `credits_must_not_exceed_debits` (the balance \
             never above zero). They exclude each other.",
        ))
        .build()
}

/// The profile a request asks for, its flags read from their wire names (an unknown name is
/// `422 invalid-flags`, naming it). The domain checks the rest when it decides.
pub(crate) fn requested(
    external_id: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
    flags: Option<Vec<String>>,
) -> Result<AccountProfile, Problem> {
    let flags = flags
        .unwrap_or_default()
        .iter()
        .map(|name| {
            AccountFlag::parse(name).ok_or_else(|| {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-flags", "Invalid flags").detail(format!(
                    "unknown flag {:?}; flags are {}",
                    name.chars().take(64).collect::<String>(),
                    AccountFlag::ALL.map(AccountFlag::as_str).join(", ")
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AccountProfile {
        external_id,
        metadata: metadata.unwrap_or_default(),
        flags,
    })
}

/// The wire names of an account's flags.
pub(crate) fn flag_names(account: &Account) -> Vec<String> {
    account.flags.iter().map(|f| f.as_str().to_owned()).collect()
}
