//! Phone numbers: parsed once at the edge, masked whenever they are printed.

use std::fmt;

/// A mainland-China mobile number, normalised to its 11 digits.
///
/// `Debug` and `Display` both mask it, so a number can only reach a log in full by an explicit
/// call to [`PhoneNumber::as_str`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "expected a mainland China mobile number (11 digits starting 13-19, optionally prefixed +86, 0086 or 86)"
)]
pub struct PhoneError;

impl PhoneNumber {
    pub fn parse(raw: &str) -> Result<Self, PhoneError> {
        let trimmed = raw.trim();
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
            Err(PhoneError)
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

/// Masks any phone-like string for logs: `13800138000` → `138****8000`. Strings too short to
/// mask meaningfully are replaced entirely.
pub fn mask(raw: &str) -> String {
    let chars: Vec<char> = raw.chars().collect();
    if chars.len() < 7 {
        return "*".repeat(chars.len().max(4));
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
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
    fn printing_masks_the_number() {
        let p = PhoneNumber::parse("13512342222").unwrap();
        assert_eq!(p.to_string(), "135****2222");
        assert_eq!(format!("{p:?}"), "PhoneNumber(135****2222)");
        assert_eq!(mask("123"), "****");
    }
}
