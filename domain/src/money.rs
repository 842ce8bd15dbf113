//! Money is integer minor units with a currency. Never floats.

use std::fmt;
use std::str::FromStr;

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The largest amount a single command may move, in minor units (10^15: ten trillion euros).
///
/// Bounding every amount keeps sums of many amounts far away from `i64::MAX`, so balance
/// arithmetic overflows only under absurd histories, and even then it is caught (checked
/// arithmetic), never wrapped.
pub const AMOUNT_MAX_MINOR: i64 = 1_000_000_000_000_000;

/// Why an amount or currency was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount must be a positive integer of minor units, at most {AMOUNT_MAX_MINOR}; got {0}")]
    InvalidAmount(i64),
    #[error("currency must be a three-letter upper-case ISO 4217 code; got {0:?}")]
    InvalidCurrency(String),
}

/// A positive amount in minor units (cents for EUR), parsed once at the edge.
///
/// Holding an `AmountMinor` proves `1 <= value <= AMOUNT_MAX_MINOR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct AmountMinor(i64);

impl JsonSchema for AmountMinor {
    fn schema_name() -> Cow<'static, str> {
        "AmountMinor".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A positive amount of minor units (cents for EUR).",
            "type": "integer",
            "minimum": 1,
            "maximum": AMOUNT_MAX_MINOR,
        })
    }
}

impl AmountMinor {
    pub fn new(value: i64) -> Result<Self, MoneyError> {
        if (1..=AMOUNT_MAX_MINOR).contains(&value) {
            Ok(Self(value))
        } else {
            Err(MoneyError::InvalidAmount(value))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for AmountMinor {
    type Error = MoneyError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<AmountMinor> for i64 {
    fn from(value: AmountMinor) -> Self {
        value.0
    }
}

/// An ISO 4217 alphabetic currency code, e.g. `EUR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl JsonSchema for Currency {
    fn schema_name() -> Cow<'static, str> {
        "Currency".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "ISO 4217 alphabetic currency code.",
            "type": "string",
            "pattern": "^[A-Z]{3}$",
        })
    }
}

impl Currency {
    pub fn as_str(&self) -> &str {
        // The constructor admits only ASCII upper-case letters.
        std::str::from_utf8(&self.0).expect("currency codes are ASCII")
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() == 3 && bytes.iter().all(u8::is_ascii_uppercase) {
            Ok(Self([bytes[0], bytes[1], bytes[2]]))
        } else {
            Err(MoneyError::InvalidCurrency(s.chars().take(16).collect()))
        }
    }
}

impl TryFrom<String> for Currency {
    type Error = MoneyError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Currency> for String {
    fn from(value: Currency) -> Self {
        value.as_str().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_must_be_positive_and_bounded() {
        assert!(AmountMinor::new(0).is_err());
        assert!(AmountMinor::new(-1).is_err());
        assert!(AmountMinor::new(AMOUNT_MAX_MINOR + 1).is_err());
        assert_eq!(AmountMinor::new(1).unwrap().get(), 1);
        assert_eq!(AmountMinor::new(AMOUNT_MAX_MINOR).unwrap().get(), AMOUNT_MAX_MINOR);
    }

    #[test]
    fn currencies_are_three_upper_case_letters() {
        assert_eq!("EUR".parse::<Currency>().unwrap().as_str(), "EUR");
        for bad in ["eur", "EU", "EURO", "E1R", "", "ÄBC"] {
            assert!(bad.parse::<Currency>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn amounts_deserialize_only_when_valid() {
        assert!(serde_json::from_str::<AmountMinor>("0").is_err());
        assert!(serde_json::from_str::<AmountMinor>("12.5").is_err());
        assert_eq!(serde_json::from_str::<AmountMinor>("1250").unwrap().get(), 1250);
    }
}
