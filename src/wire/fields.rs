//! Field rules shared by every job type: lengths, ranges, template parameters, phone lists.

use std::collections::BTreeMap;

use serde_json::Value;

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

pub(super) fn fields_error(e: serde_json::Error) -> Invalid {
    // serde's messages already name the field ("missing field `sign_name`",
    // "unknown field `phone`, expected one of …").
    Invalid::new("INVALID_FIELD", e.to_string())
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
                    format!("{v} is outside {min}..={max}"),
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
                    format!("value of {k:?} must be a string (Aliyun refuses numbers)"),
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
