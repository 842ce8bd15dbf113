//! Consistency tokens: what a command response hands a client so a later read can wait until
//! it reflects that write. Opaque to clients; to Tally: `v1.<stream id>.<stream version>`.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsistencyToken {
    pub stream_id: Uuid,
    pub version: i64,
}

impl fmt::Display for ConsistencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1.{}.{}", self.stream_id.simple(), self.version)
    }
}

/// A token that is not one Tally issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidToken;

impl FromStr for ConsistencyToken {
    type Err = InvalidToken;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('.');
        let (Some("v1"), Some(id), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(InvalidToken);
        };
        let stream_id = Uuid::try_parse(id).map_err(|_| InvalidToken)?;
        let version = version.parse::<i64>().ok().filter(|v| *v > 0).ok_or(InvalidToken)?;
        Ok(Self { stream_id, version })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_through_its_text() {
        let token = ConsistencyToken {
            stream_id: Uuid::now_v7(),
            version: 42,
        };
        assert_eq!(token.to_string().parse::<ConsistencyToken>(), Ok(token));
    }

    #[test]
    fn foreign_text_is_not_a_token() {
        for bad in [
            "",
            "v1",
            "v2.0.1",
            "v1.nope.1",
            "v1.00000000000000000000000000000000.0",
            "v1.00000000000000000000000000000000.1.2",
        ] {
            assert!(bad.parse::<ConsistencyToken>().is_err(), "{bad:?}");
        }
    }
}
