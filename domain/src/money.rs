//! Money is integer minor units with a currency. Never floats.
//!
//! A currency is an ISO 4217 alphabetic code. Parsing one ([`FromStr`], what the APIs do with a
//! client's input) admits only codes of the ISO 4217 table that have a minor unit, since every
//! amount is an integer of minor units. Reading one back from a stored event (serde) admits any
//! three upper-case letters, as Tally did before it checked the table: old events are never
//! rewritten, and an account opened in a made-up currency must still fold.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

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
    /// Three upper-case letters, but not an ISO 4217 code Tally can count in: not in the
    /// table at all (`ZZZ`), or a code with no minor unit (gold `XAU`, `XXX`).
    #[error("{code} is not an ISO 4217 currency with a minor unit: {reason}")]
    NotIso4217 { code: String, reason: &'static str },
    /// Two amounts of different currencies met in one operation. Tally never converts.
    #[error("cannot combine {left} with {right}: currencies are never converted")]
    CurrencyMismatch { left: Currency, right: Currency },
    /// The result would leave the range of a 64-bit integer of minor units.
    #[error("the amount would overflow")]
    Overflow,
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
///
/// Parsed ([`FromStr`]) only from an ISO 4217 code with a minor unit; deserialized (stored
/// events) from any three upper-case letters, so events stored before the check still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

/// Every code [`Currency::from_str`] accepts, sorted: the ISO 4217 codes with a minor unit.
/// iso_currency lists its codes only through an optional iterator (strum, a proc-macro crate),
/// so they are found by asking it about each of the 17,576 three-letter words, once.
static ISO_CODES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let mut codes = Vec::new();
    for a in b'A'..=b'Z' {
        for b in b'A'..=b'Z' {
            for c in b'A'..=b'Z' {
                let word = [a, b, c];
                let word = std::str::from_utf8(&word).expect("ASCII letters");
                if let Some(iso) = iso_currency::Currency::from_code(word).filter(|iso| iso.exponent().is_some()) {
                    codes.push(iso.code());
                }
            }
        }
    }
    codes
});

impl Currency {
    pub fn as_str(&self) -> &str {
        // The constructors admit only ASCII upper-case letters.
        std::str::from_utf8(&self.0).expect("currency codes are ASCII")
    }

    /// A currency read back from storage: any three upper-case letters, ISO 4217 or not (see
    /// the module documentation). New input goes through [`FromStr`] instead.
    pub fn from_stored(code: &str) -> Result<Self, MoneyError> {
        let bytes = code.as_bytes();
        if bytes.len() == 3 && bytes.iter().all(u8::is_ascii_uppercase) {
            Ok(Self([bytes[0], bytes[1], bytes[2]]))
        } else {
            Err(MoneyError::InvalidCurrency(code.chars().take(16).collect()))
        }
    }

    /// The ISO 4217 currency of this code; `None` for a code stored before codes were checked.
    pub fn iso_4217(&self) -> Option<iso_currency::Currency> {
        iso_currency::Currency::from_code(self.as_str())
    }

    /// Digits of minor units in one major unit (2 for EUR: cents; 0 for JPY; 3 for KWD);
    /// `None` for a code stored before codes were checked.
    pub fn minor_unit_exponent(&self) -> Option<u8> {
        self.iso_4217()
            .and_then(|iso| iso.exponent())
            .and_then(|e| u8::try_from(e).ok())
    }

    /// Every code new accounts and transfers accept (what the OpenAPI documents list), sorted.
    pub fn iso_codes() -> &'static [&'static str] {
        &ISO_CODES
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    /// Only an ISO 4217 code with a minor unit: what a client may open an account in.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let currency = Self::from_stored(s)?;
        let not_iso = |reason| MoneyError::NotIso4217 {
            code: s.to_owned(),
            reason,
        };
        let iso = currency.iso_4217().ok_or_else(|| not_iso("no such code in ISO 4217"))?;
        if iso.exponent().is_none() {
            return Err(not_iso(
                "ISO 4217 gives it no minor unit, and Tally counts money in minor units",
            ));
        }
        Ok(currency)
    }
}

impl TryFrom<String> for Currency {
    type Error = MoneyError;
    /// Deserialization: stored events, so the lenient [`Currency::from_stored`].
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::from_stored(&value)
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

/// A signed amount of minor units in one currency: a balance, or the sum of postings.
///
/// Arithmetic is checked: combining two currencies is a [`MoneyError::CurrencyMismatch`] and
/// leaving the `i64` range is a [`MoneyError::Overflow`], never a conversion or a wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Self {
        Self { amount_minor, currency }
    }

    pub fn zero(currency: Currency) -> Self {
        Self::new(0, currency)
    }

    fn same_currency(self, other: Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            })
        }
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let amount_minor = self
            .amount_minor
            .checked_add(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount_minor, self.currency))
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let amount_minor = self
            .amount_minor
            .checked_sub(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount_minor, self.currency))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (minor units)", self.amount_minor, self.currency)
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
            assert!(
                matches!(bad.parse::<Currency>(), Err(MoneyError::InvalidCurrency(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn only_iso_4217_codes_with_a_minor_unit_parse() {
        for good in ["EUR", "USD", "JPY", "GBP", "CHF", "KWD", "CLF"] {
            assert_eq!(good.parse::<Currency>().unwrap().as_str(), good);
        }
        for (bad, reason) in [
            ("ZZZ", "no such code"),
            ("ABC", "no such code"),
            ("XAU", "no minor unit"),
            ("XXX", "no minor unit"),
        ] {
            let err = bad.parse::<Currency>().unwrap_err();
            assert!(
                matches!(&err, MoneyError::NotIso4217 { code, .. } if code == bad),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains(reason), "{bad}: {err}");
        }
    }

    #[test]
    fn a_currency_knows_its_minor_unit_exponent() {
        let exponent = |code: &str| code.parse::<Currency>().unwrap().minor_unit_exponent();
        assert_eq!(exponent("EUR"), Some(2));
        assert_eq!(exponent("JPY"), Some(0));
        assert_eq!(exponent("KWD"), Some(3));
        assert_eq!(
            "USD".parse::<Currency>().unwrap().iso_4217(),
            Some(iso_currency::Currency::USD)
        );
    }

    #[test]
    fn a_stored_currency_that_is_not_iso_4217_still_reads_and_writes_back_the_same() {
        let stored: Currency = serde_json::from_str(r#""ZZZ""#).unwrap();

        assert_eq!(stored.as_str(), "ZZZ");
        assert_eq!(stored.iso_4217(), None);
        assert_eq!(stored.minor_unit_exponent(), None);
        assert_eq!(serde_json::to_string(&stored).unwrap(), r#""ZZZ""#);
        assert!(
            serde_json::from_str::<Currency>(r#""zzz""#).is_err(),
            "still three upper-case letters"
        );
    }

    #[test]
    fn the_accepted_codes_are_sorted_iso_codes_that_all_parse() {
        let codes = Currency::iso_codes();
        assert!(codes.len() > 150, "{}", codes.len());
        assert!(codes.windows(2).all(|w| w[0] < w[1]));
        for code in ["EUR", "USD", "JPY"] {
            assert!(codes.contains(&code), "{code}");
        }
        assert!(!codes.contains(&"ZZZ") && !codes.contains(&"XAU"));
        assert!(codes.iter().all(|c| c.parse::<Currency>().is_ok()));
    }

    #[test]
    fn amounts_deserialize_only_when_valid() {
        assert!(serde_json::from_str::<AmountMinor>("0").is_err());
        assert!(serde_json::from_str::<AmountMinor>("12.5").is_err());
        assert_eq!(serde_json::from_str::<AmountMinor>("1250").unwrap().get(), 1250);
    }

    #[test]
    fn money_of_one_currency_adds_and_subtracts() {
        let eur: Currency = "EUR".parse().unwrap();
        let sum = Money::new(150, eur).checked_add(Money::new(50, eur)).unwrap();
        assert_eq!(sum, Money::new(200, eur));
        assert_eq!(sum.checked_sub(Money::new(250, eur)).unwrap(), Money::new(-50, eur));
    }

    #[test]
    fn mixing_currencies_is_an_error_not_a_conversion() {
        let eur: Currency = "EUR".parse().unwrap();
        let usd: Currency = "USD".parse().unwrap();
        let err = Money::new(1, eur).checked_add(Money::new(1, usd)).unwrap_err();
        assert_eq!(err, MoneyError::CurrencyMismatch { left: eur, right: usd });
        assert!(Money::new(1, eur).checked_sub(Money::new(1, usd)).is_err());
    }

    #[test]
    fn money_arithmetic_overflow_is_an_error_not_a_wrap() {
        let eur: Currency = "EUR".parse().unwrap();
        assert_eq!(
            Money::new(i64::MAX, eur).checked_add(Money::new(1, eur)),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            Money::new(i64::MIN, eur).checked_sub(Money::new(1, eur)),
            Err(MoneyError::Overflow)
        );
    }
}
