//! Write-ahead-log positions.
//!
//! Every decision in a switchover compares WAL positions ("has the replica replayed the old
//! primary's final checkpoint?"), so positions get a type of their own instead of the text
//! PostgreSQL prints (`16/B374D848`) or a bare `u64` that could be confused with an epoch.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A PostgreSQL log sequence number: a byte position in the WAL stream.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

/// `text` was not a PostgreSQL LSN (`XXXXXXXX/XXXXXXXX`, hexadecimal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {text:?}: expected two hexadecimal halves like 16/B374D848")]
pub struct LsnParseError {
    pub text: String,
}

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    /// Bytes from `earlier` to `self`, 0 when `earlier` is ahead (a lag never goes negative).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError { text: s.to_owned() };
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let valid =
            |h: &str| !h.is_empty() && h.len() <= 8 && h.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid(hi) || !valid(lo) {
            return Err(err());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl std::ops::Add<u64> for Lsn {
    type Output = Lsn;
    fn add(self, rhs: u64) -> Lsn {
        Lsn(self.0 + rhs)
    }
}

impl std::ops::Sub for Lsn {
    /// Signed distance in bytes.
    type Output = i128;
    fn sub(self, rhs: Lsn) -> i128 {
        i128::from(self.0) - i128::from(rhs.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_roundtrip() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in ["", "16", "/1", "1/", "x/1", "1/2/3", "123456789/0", "-1/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
    }

    #[test]
    fn arithmetic() {
        let a: Lsn = "0/100".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        assert_eq!(b.bytes_since(a), 0x1_0000_0000 - 0x100);
        assert_eq!(a.bytes_since(b), 0);
        assert_eq!(b - a, 0x1_0000_0000 - 0x100);
        assert_eq!(a - b, -(0x1_0000_0000 - 0x100));
        assert_eq!(a + 0x10, Lsn(0x110));
        assert!(a < b);
    }
}
