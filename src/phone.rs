//! Phone numbers: parsed once at the edge, masked whenever they are printed.

use std::fmt;

/// A mainland-China mobile number, normalised to its 11 digits.
///
/// `Debug` and `Display` both mask it, so a number can only reach a log in full by an explicit
/// call to [`PhoneNumber::as_str`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PhoneError {
    #[error(
        "expected a mainland China mobile number (11 digits starting 13-19, optionally prefixed +86, 0086 or 86)"
    )]
    Mainland,
    #[error(
        "expected a mainland China mobile number or an international one as country code + number (8-15 digits, optionally prefixed + or 00)"
    )]
    International,
}

/// The number without the separators people write it with (`138 0013-8000`, `(+86) 138…`).
pub fn compact(raw: &str) -> String {
    raw.chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.'))
        .collect()
}

impl PhoneNumber {
    /// A mainland number, written with or without separators (see [`compact`]).
    pub fn parse(raw: &str) -> Result<Self, PhoneError> {
        let compacted = compact(raw.trim());
        let trimmed = compacted.as_str();
        let digits = ["+86", "0086", "86"]
            .iter()
            .find_map(|p| {
                trimmed
                    .strip_prefix(p)
                    .filter(|rest| rest.len() == 11 && trimmed.len() > 11)
            })
            .unwrap_or(trimmed);
        let bytes = digits.as_bytes();
        let ok = bytes.len() == 11
            && bytes.iter().all(u8::is_ascii_digit)
            && bytes[0] == b'1'
            && (b'3'..=b'9').contains(&bytes[1]);
        if ok {
            Ok(Self(digits.to_owned()))
        } else {
            Err(PhoneError::Mainland)
        }
    }

    /// Dysmsapi also sends abroad: a mainland number as above, or country code + number
    /// (what Aliyun wants for international SMS), digits only.
    pub fn parse_international(raw: &str) -> Result<Self, PhoneError> {
        if let Ok(mainland) = Self::parse(raw) {
            return Ok(mainland);
        }
        let compacted = compact(raw.trim());
        let trimmed = compacted.as_str();
        let digits = trimmed
            .strip_prefix('+')
            .or_else(|| trimmed.strip_prefix("00"))
            .unwrap_or(trimmed);
        let ok = (8..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0')
            // A number that claims China must be a valid mainland one.
            && !digits.starts_with("86");
        if ok {
            Ok(Self(digits.to_owned()))
        } else {
            Err(PhoneError::International)
        }
    }

    /// The full number, for Aliyun and the database only.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// Masks any phone-like string for logs: `13800138000` → `138****8000`. At least four of its
/// characters stay hidden: a shorter number (an international one of 8-10 digits) keeps two
/// at each end, and one too short for that is replaced entirely.
pub fn mask(raw: &str) -> String {
    let chars: Vec<char> = raw.chars().collect();
    let (head, tail) = match chars.len() {
        n if n >= 11 => (3, 4),
        n if n >= 8 => (2, 2),
        n => return "*".repeat(n.max(4)),
    };
    let head: String = chars[..head].iter().collect();
    let tail: String = chars[chars.len() - tail..].iter().collect();
    format!("{head}****{tail}")
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({})", self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_mainland_mobiles_with_and_without_prefix() {
        for raw in [
            "13800138000",
            "+8613800138000",
            "008613800138000",
            "8613800138000",
        ] {
            assert_eq!(
                PhoneNumber::parse(raw).unwrap().as_str(),
                "13800138000",
                "{raw}"
            );
        }
        assert!(PhoneNumber::parse("19912345678").is_ok());
    }

    #[test]
    fn refuses_everything_else() {
        for raw in [
            "",
            "1380013800",
            "138001380001",
            "12800138000",
            "1380013800a",
            "+1 415 555 0100",
            "１３８００１３８０００",
            "86",
        ] {
            assert!(
                PhoneNumber::parse(raw).is_err(),
                "{raw:?} should be refused"
            );
        }
    }

    #[test]
    fn international_numbers_for_dysmsapi() {
        assert_eq!(
            PhoneNumber::parse_international("+8613800138000")
                .unwrap()
                .as_str(),
            "13800138000"
        );
        assert_eq!(
            PhoneNumber::parse_international("+85291234567")
                .unwrap()
                .as_str(),
            "85291234567"
        );
        assert_eq!(
            PhoneNumber::parse_international("0014155550100")
                .unwrap()
                .as_str(),
            "14155550100"
        );
        for raw in ["+8612345", "861234567890", "12", "+1 415", "abc"] {
            assert!(PhoneNumber::parse_international(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn numbers_written_in_groups_are_the_same_number() {
        for raw in [
            "138 0013 8000",
            "138-0013-8000",
            "+86 138 0013 8000",
            "(+86) 138.0013.8000",
            "0086-13800138000",
        ] {
            assert_eq!(
                PhoneNumber::parse(raw).unwrap().as_str(),
                "13800138000",
                "{raw}"
            );
        }
        assert_eq!(
            PhoneNumber::parse_international("+852 9123 4567")
                .unwrap()
                .as_str(),
            "85291234567"
        );
        for raw in ["138 0013 800", "138_0013_8000", "138/0013/8000"] {
            assert!(PhoneNumber::parse(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn printing_masks_the_number() {
        let p = PhoneNumber::parse("13512342222").unwrap();
        assert_eq!(p.to_string(), "135****2222");
        assert_eq!(format!("{p:?}"), "PhoneNumber(135****2222)");
        assert_eq!(mask("123"), "****");
        // Never fewer than four hidden, whatever the length.
        assert_eq!(mask("1234567"), "*******");
        assert_eq!(mask("12345678"), "12****78");
        assert_eq!(mask("1234567890"), "12****90");
        assert_eq!(mask("85291234567"), "852****4567");
    }
}
