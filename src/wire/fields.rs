//! Field rules shared by every job type: lengths, ranges, template parameters, phone lists.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::Invalid;
use crate::phone::PhoneNumber;

/// Template variables: a flat object of strings (Aliyun answers `isv.INVALID_JSON_PARAM` to
/// anything else).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TemplateParam(pub BTreeMap<String, String>);

/// The placeholder that asks Aliyun to generate the code (only then can it be checked).
pub const CODE_PLACEHOLDER: &str = "##code##";

impl TemplateParam {
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_default()
    }

    /// What is stored of the parameters: their names, and the code placeholder. The values are
    /// the backend's text for one person (a code it generated under any name, a name, an
    /// order number), and the records must not become a copy of them.
    pub(super) fn redacted_json(&self) -> String {
        let redacted: BTreeMap<&str, &str> = self
            .0
            .iter()
            .map(|(k, v)| {
                let keep = v == CODE_PLACEHOLDER;
                (k.as_str(), if keep { v.as_str() } else { "***" })
            })
            .collect();
        serde_json::to_string(&redacted).unwrap_or_default()
    }
}

/// Deserializes a job's fields. serde's own messages quote the offending value ("invalid type:
/// integer `482913`, expected a string"): a typed code or a phone number sent as a JSON number
/// would reach the result, the dead letter, the row and the log. What is kept names the field
/// and the kinds of value, never the value.
pub(super) fn fields<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        // An unknown field's path is its name, which `unquoted` shows only if it reads as one.
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let why = unquoted(&message);
        if message.starts_with("unknown field") {
            Invalid::new("INVALID_FIELD", why)
        } else {
            about_field(&path, why)
        }
    })
}

/// [`Invalid::field`] for a field named by the message itself: the name is shown only if it
/// reads as one (see [`shown_name`]).
pub(super) fn about_field(name: &str, why: impl std::fmt::Display) -> Invalid {
    match shown_name(name) {
        Some(name) => Invalid::field(name, why),
        None => Invalid::new(
            "INVALID_FIELD",
            format!("a field whose name is not shown {why}"),
        ),
    }
}

/// What serde said, without the value it quoted. Only what is known to be the schema's own
/// text (field names, expected kinds) is kept; anything unrecognised becomes a plain phrase.
fn unquoted(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // The value may hold ", expected " itself; the schema's text is after the last.
            let (got, expected) = rest.rsplit_once(", expected ").unwrap_or((rest, ""));
            let kind = got.split(['`', '"']).next().unwrap_or_default().trim();
            let kind = if VALUE_KINDS.contains(&kind) {
                kind
            } else {
                "a value of another kind"
            };
            let expected = match expected {
                "i64" | "u64" | "i32" | "u32" | "u16" | "u8" => "an integer",
                "" => "another value",
                e => e,
            };
            return format!("expected {expected}, got {kind}");
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // The name may hold anything; the schema's own text follows the last of these.
        let (name, tail) = rest
            .rsplit_once("`, expected ")
            .map(|(n, t)| (n, format!("expected {t}")))
            .or_else(|| rest.rsplit_once("`, ").map(|(n, t)| (n, t.to_owned())))
            .unwrap_or((rest, String::new()));
        let name = shown_name(name).map_or("(a name that is not an identifier)".to_owned(), |n| {
            format!("`{n}`")
        });
        return if tail.is_empty() {
            format!("unknown field {name}")
        } else {
            format!("unknown field {name}, {tail}")
        };
    }
    if message.starts_with("missing field `")
        || message.starts_with("duplicate field `")
        || message.starts_with("invalid length ")
    {
        return message.to_owned();
    }
    "holds a value of the wrong kind or form".to_owned()
}

/// The kinds serde names an unexpected value by (before the quoted value, when it quotes one).
const VALUE_KINDS: &[&str] = &[
    "boolean",
    "integer",
    "floating point",
    "character",
    "string",
    "byte array",
    "null",
    "unit value",
    "Option value",
    "newtype struct",
    "sequence",
    "map",
    "enum",
    "unit variant",
    "newtype variant",
    "tuple variant",
    "struct variant",
];

/// A name from a message (a field's, a field's path, a job type's) that may be shown back: an
/// identifier, as every field and type of the contract is, so a typo reads back
/// ("phone_numbr", "sign_names[1]"). Anything else — four digits in a row, spaces, a long
/// text — could be what someone typed, and is not repeated.
pub(super) fn shown_name(name: &str) -> Option<&str> {
    let mut chars = name.chars();
    let first = chars.next()?;
    // Four digits in a row may be a code or part of a number; no name of the contract has
    // them (a list's index is at most three).
    let longest_digits = name
        .split(|c: char| !c.is_ascii_digit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    let ok = (first.is_ascii_alphabetic() || first == '_')
        && name.len() <= 64
        && longest_digits < 4
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']'));
    ok.then_some(name)
}

pub(super) fn text(field: &str, value: String, min: usize, max: usize) -> Result<String, Invalid> {
    let n = value.chars().count();
    if n < min || n > max || value.chars().any(char::is_control) {
        return Err(Invalid::field(
            field,
            format!("must be {min}-{max} characters without control characters (got {n})"),
        ));
    }
    Ok(value)
}

pub(super) fn opt_text(
    field: &str,
    value: Option<String>,
    min: usize,
    max: usize,
) -> Result<Option<String>, Invalid> {
    value.map(|v| text(field, v, min, max)).transpose()
}

pub(super) fn in_range<T: TryFrom<i64>>(
    field: &str,
    value: Option<i64>,
    min: i64,
    max: i64,
) -> Result<Option<T>, Invalid> {
    value
        .map(|v| {
            if (min..=max).contains(&v) {
                T::try_from(v).map_err(|_| Invalid::field(field, "out of range"))
            } else {
                Err(Invalid::field(
                    field,
                    // Not the value: a number in the wrong field may be someone's phone.
                    format!("must be within {min}..={max}"),
                ))
            }
        })
        .transpose()
}

/// An object of strings, or a string holding one (what Aliyun's own API takes).
pub(super) fn template_param(field: &str, value: Value) -> Result<TemplateParam, Invalid> {
    let object = match value {
        Value::Object(m) => m,
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            Ok(Value::Object(m)) => m,
            _ => {
                return Err(Invalid::field(
                    field,
                    "a string here must hold a JSON object",
                ));
            }
        },
        _ => {
            return Err(Invalid::field(
                field,
                "must be an object of strings, e.g. {\"code\":\"##code##\"}",
            ));
        }
    };
    let mut out = BTreeMap::new();
    for (k, v) in object {
        match v {
            // NUL can't be stored (Postgres text and jsonb refuse it); newlines are fine.
            Value::String(s)
                if !k.is_empty()
                    && k.len() <= 64
                    && s.chars().count() <= 512
                    && !k.contains('\0')
                    && !s.contains('\0') =>
            {
                out.insert(k, s);
            }
            Value::String(_) => {
                return Err(Invalid::field(
                    field,
                    "names are 1-64 bytes and values at most 512 characters, without NUL",
                ));
            }
            _ => {
                return Err(Invalid::field(
                    field,
                    match shown_name(&k) {
                        Some(k) => {
                            format!("value of {k:?} must be a string (Aliyun refuses numbers)")
                        }
                        None => "every value must be a string (Aliyun refuses numbers)".to_owned(),
                    },
                ));
            }
        }
    }
    Ok(TemplateParam(out))
}

/// One number or a list of them (a comma-separated string is accepted too, as Aliyun takes).
pub(super) fn phone_list(
    field: &str,
    value: Value,
    max: usize,
) -> Result<Vec<PhoneNumber>, Invalid> {
    let raw: Vec<String> = match value {
        Value::String(s) => s.split(',').map(str::to_owned).collect(),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(Invalid::field(field, "every number must be a string")),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(Invalid::field(
                field,
                "must be a number as a string, or a list of them",
            ));
        }
    };
    if raw.is_empty() || raw.len() > max {
        return Err(Invalid::field(
            field,
            format!("must hold 1-{max} numbers (got {})", raw.len()),
        ));
    }
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            PhoneNumber::parse_international(r)
                .map_err(|e| Invalid::field(&format!("{field}[{i}]"), e))
        })
        .collect()
}
