//! What of a request may be shown again: Aliyun's error messages echo the request (a
//! `SignatureDoesNotMatch` carries its whole string to sign), and those messages are stored,
//! published and logged. One rule serves the messages and our own log lines alike.
//!
//! Parameters are shown by allowlist: a parameter Aliyun adds tomorrow is hidden until someone
//! decides it is harmless.

use serde_json::Value;

use super::sign;
use crate::phone;

/// What stands in for a hidden value.
pub const REDACTED: &str = "[redacted]";
/// What stands in for an echo that could not be taken apart.
pub const STRING_TO_SIGN_REDACTED: &str = "[string to sign redacted]";

/// Where Aliyun's echo of the request starts; it runs to the end of the message.
const ECHO_MARKERS: &[&str] = &["server string to sign is:", "server canonical request is:"];

/// Parameters an operator needs to debug a signing problem and that carry nothing a user typed
/// or a secret. `OutId` is the job's own id, already in every row and result.
const SHOWN_PARAMS: &[&str] = &[
    "AccessKeyId",
    "Action",
    "Format",
    "RegionId",
    "SignatureMethod",
    "SignatureNonce",
    "SignatureType",
    "SignatureVersion",
    "Timestamp",
    "Version",
    "SignName",
    "SignNameJson",
    "TemplateCode",
    "SchemeName",
    "CountryCode",
    "CodeLength",
    "CodeType",
    "ValidTime",
    "Interval",
    "DuplicatePolicy",
    "ReturnVerifyCode",
    "AutoRetry",
    "OutId",
    "SmsUpExtendCode",
    "SmsUpExtendCodeJson",
    "BizId",
    "SendDate",
    "PageSize",
    "CurrentPage",
];

/// V3's signed headers, likewise; `x-acs-security-token` is the one that is not.
const SHOWN_HEADERS: &[&str] = &[
    "host",
    "accept",
    "user-agent",
    "content-type",
    "x-acs-action",
    "x-acs-content-sha256",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-version",
];

/// JSON leaves shorter than this are left alone by [`message`]: hiding every `5` would make the
/// rest of a message unreadable, and so short a value identifies nobody.
const MIN_LEAF_CHARS: usize = 4;

fn is_phone(name: &str) -> bool {
    matches!(name, "PhoneNumber" | "PhoneNumbers")
}

/// A parameter's value as it may be shown: as is, masked (numbers) or hidden.
pub fn value(name: &str, value: &str) -> String {
    if SHOWN_PARAMS.contains(&name) {
        value.to_owned()
    } else if is_phone(name) {
        value
            .split(',')
            .map(phone::mask)
            .collect::<Vec<_>>()
            .join(",")
    } else {
        REDACTED.to_owned()
    }
}

/// `name=value&…`, each value as [`value`] shows it.
pub fn params<K: AsRef<str>, V: AsRef<str>>(params: &[(K, V)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", k.as_ref(), value(k.as_ref(), v.as_ref())))
        .collect::<Vec<_>>()
        .join("&")
}

/// An echoed V1 string to sign or V3 canonical request, taken apart and shown parameter by
/// parameter; anything of another shape is hidden whole.
pub fn string_to_sign(echo: &str) -> String {
    if let Some((method, p)) = sign::v1_params_from_string_to_sign(echo) {
        return format!("{method} {}", params(&p));
    }
    canonical_request(echo).unwrap_or_else(|| STRING_TO_SIGN_REDACTED.to_owned())
}

/// V3: method, path, canonical query, `name:value` headers, a blank line, the signed header
/// names, the body's hash.
fn canonical_request(echo: &str) -> Option<String> {
    let mut lines = echo.split('\n');
    let method = lines.next()?;
    let path = lines.next()?;
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    if !path.starts_with('/') {
        return None;
    }
    let query = lines.next()?;
    let mut shown_query = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        let name = sign::percent_decode(k, false)?;
        let raw = sign::percent_decode(v, false)?;
        shown_query.push((name, raw));
    }
    let mut out = vec![method.to_owned(), path.to_owned(), params(&shown_query)];
    for line in lines.by_ref() {
        if line.is_empty() {
            out.push(String::new());
            break;
        }
        let (name, v) = line.split_once(':')?;
        let v = if SHOWN_HEADERS.contains(&name) {
            v
        } else {
            REDACTED
        };
        out.push(format!("{name}:{v}"));
    }
    // The signed header names and the body's hash carry no values.
    out.extend(lines.map(str::to_owned));
    Some(out.join("\n"))
}

/// An Aliyun message with every echo of the request hidden: the string to sign shown as
/// [`string_to_sign`] does, and any value of `sent` that is not to be shown, wherever else it
/// appears (raw, or percent-encoded once or twice), replaced.
pub fn message<K: AsRef<str>, V: AsRef<str>>(text: &str, sent: &[(K, V)]) -> String {
    let out = match ECHO_MARKERS
        .iter()
        .filter_map(|m| text.find(m).map(|at| (at + m.len(), m)))
        .min()
    {
        Some((start, _)) => format!("{}{}", &text[..start], string_to_sign(&text[start..])),
        None => text.to_owned(),
    };
    let room = out.len();
    hide_values(out, sent, room)
}

/// `out` with every hidden value of `sent` replaced, raw or encoded, looking only for needles
/// of at most `room` bytes.
///
/// [`message`] passes the message's own length: Aliyun's success messages ("OK", "成功") are
/// shorter than most values it could echo, and making a dozen encodings of every value for each
/// of them was the worker's largest single cost (bench profile). The bound changes nothing:
/// needles go longest first, and one longer than the message cannot match it while every
/// longer one before it has left the message as it was.
fn hide_values<K: AsRef<str>, V: AsRef<str>>(
    mut out: String,
    sent: &[(K, V)],
    room: usize,
) -> String {
    let mut needles: Vec<String> = sent
        .iter()
        .filter(|(k, _)| !SHOWN_PARAMS.contains(&k.as_ref()))
        .flat_map(|(k, v)| hidden_parts(k.as_ref(), v.as_ref(), room))
        .flat_map(|part| encodings(&part))
        .filter(|n| !n.is_empty() && n.len() <= room)
        .collect();
    // Longest first: a whole value goes before a part of it could leave the rest standing.
    needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    needles.dedup();
    for needle in needles {
        out = out.replace(&needle, REDACTED);
    }
    out
}

/// A value, and the pieces of it that may be echoed alone: each number of a list, each leaf of
/// a JSON template. Only those of at most `room` bytes: no encoding of a part is shorter than
/// the part (`+` for a space is as long as the space).
fn hidden_parts(name: &str, value: &str, room: usize) -> Vec<String> {
    let numbers = is_phone(name).then(|| value.split(','));
    let mut parts: Vec<String> = std::iter::once(value)
        .chain(numbers.into_iter().flatten())
        .filter(|p| p.len() <= room)
        .map(str::to_owned)
        .collect();
    // A leaf has at least MIN_LEAF_CHARS characters, so at least as many bytes.
    if room >= MIN_LEAF_CHARS
        && let Ok(json) = serde_json::from_str::<Value>(value)
    {
        json_leaves(&json, &mut parts);
        parts.retain(|p| p.len() <= room);
    }
    parts
}

fn json_leaves(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.chars().count() >= MIN_LEAF_CHARS => out.push(s.clone()),
        Value::Number(n) if n.to_string().len() >= MIN_LEAF_CHARS => out.push(n.to_string()),
        Value::Array(items) => items.iter().for_each(|i| json_leaves(i, out)),
        Value::Object(m) => m.values().for_each(|i| json_leaves(i, out)),
        _ => {}
    }
}

/// How a value may appear in a message: raw, in a query (once), in a V1 string to sign
/// (twice), with either case of hex, or with `+` for a space as form bodies have it.
fn encodings(raw: &str) -> Vec<String> {
    let once = sign::percent_encode(raw);
    let twice = sign::percent_encode(&once);
    let form = once.replace("%20", "+");
    let mut all = vec![raw.to_owned(), once, twice, form];
    let lower: Vec<String> = all.iter().map(|s| lower_hex(s)).collect();
    all.extend(lower);
    all
}

/// `%2F` → `%2f`, the rest untouched.
fn lower_hex(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut escape = 0;
    for c in s.chars() {
        if c == '%' {
            escape = 2;
            out.push(c);
        } else if escape > 0 {
            escape -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent() -> Vec<(&'static str, String)> {
        vec![
            ("AccessKeyId", "LTAIkey".into()),
            ("Action", "CheckSmsVerifyCode".into()),
            ("PhoneNumber", "13912345678".into()),
            ("VerifyCode", "987654".into()),
            ("SecurityToken", "STS.tok/en+1".into()),
            (
                "TemplateParam",
                r#"{"code":"73920461","name":"张 三丰"}"#.into(),
            ),
            ("SignName", "阿里云".into()),
        ]
    }

    const SECRETS: &[&str] = &[
        "13912345678",
        "987654",
        "STS.tok",
        "73920461",
        "张",
        "%E5%BC%A0",
    ];

    fn assert_hidden(shown: &str) {
        for s in SECRETS {
            assert!(!shown.contains(s), "{s} in {shown}");
        }
    }

    #[test]
    fn a_v1_string_to_sign_keeps_what_debugs_a_signature_and_hides_the_rest() {
        let sts = sign::v1_string_to_sign(
            "POST",
            &sent()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect::<Vec<_>>(),
        );
        let text = format!(
            "Specified signature is not matched with our calculation. server string to sign is:{sts}"
        );
        let shown = message(&text, &sent());
        assert_hidden(&shown);
        assert!(
            shown.starts_with("Specified signature is not matched with our calculation."),
            "{shown}"
        );
        for kept in [
            "AccessKeyId=LTAIkey",
            "Action=CheckSmsVerifyCode",
            "SignName=阿里云",
            "PhoneNumber=139****5678",
            "VerifyCode=[redacted]",
            "SecurityToken=[redacted]",
            "TemplateParam=[redacted]",
        ] {
            assert!(shown.contains(kept), "{kept} missing from {shown}");
        }
    }

    #[test]
    fn a_v3_canonical_request_keeps_its_shape_and_hides_query_values_and_the_token() {
        let echo = "POST\n/\nPhoneNumber=13912345678&SignName=%E9%98%BF&VerifyCode=987654\n\
                    host:dypnsapi.aliyuncs.com\nx-acs-action:CheckSmsVerifyCode\n\
                    x-acs-security-token:STS.tok%2Fen%2B1\n\n\
                    host;x-acs-action;x-acs-security-token\nabc123";
        let shown = message(
            &format!("Specified signature is not matched. server canonical request is:{echo}"),
            &sent(),
        );
        assert_hidden(&shown);
        for kept in [
            "POST\n/\nPhoneNumber=139****5678&SignName=阿&VerifyCode=[redacted]\n",
            "host:dypnsapi.aliyuncs.com\nx-acs-action:CheckSmsVerifyCode\n",
            "x-acs-security-token:[redacted]\n\nhost;x-acs-action;x-acs-security-token\nabc123",
        ] {
            assert!(shown.contains(kept), "{kept:?} missing from {shown:?}");
        }
    }

    #[test]
    fn an_echo_of_another_shape_is_hidden_whole() {
        let shown = message(
            "Specified signature is not matched. server string to sign is:ACS3-HMAC-SHA256\nff00",
            &sent(),
        );
        assert_eq!(
            shown,
            format!(
                "Specified signature is not matched. server string to sign is:{STRING_TO_SIGN_REDACTED}"
            )
        );
    }

    #[test]
    fn values_echoed_anywhere_are_hidden_raw_or_encoded_once_or_twice() {
        let name = "张 三丰";
        let once = sign::percent_encode(name);
        let twice = sign::percent_encode(&once);
        let form = once.replace("%20", "+");
        for echo in [
            "13912345678",
            "987654",
            "STS.tok/en+1",
            "STS.tok%2Fen%2B1",
            "STS.tok%252Fen%252B1",
            "STS.tok%2fen%2b1",
            "73920461",
            name,
            &once,
            &twice,
            &form,
        ] {
            let shown = message(&format!("isv.X: bad value [{echo}] given"), &sent());
            assert_eq!(shown, "isv.X: bad value [[redacted]] given", "{echo}");
        }
    }

    #[test]
    fn a_message_without_an_echo_is_left_as_it_was() {
        let text = "check frequency limited, retry after 5 minutes (code 1234)";
        assert_eq!(message(text, &sent()), text);
    }

    proptest::proptest! {
        /// Looking only for needles that fit in the message answers what the whole search
        /// would, for short messages ("OK") and for those that hold a value.
        #[test]
        fn a_bounded_search_answers_what_the_whole_search_would(
            text in "[0-9a-zA-Z%+ ]{0,12}",
            code in "[0-9a-z ]{0,8}",
            numbers in "[0-9,]{0,14}",
        ) {
            let template = format!(r#"{{"code":"{code}","n":{numbers:?}}}"#);
            let sent = [("VerifyCode", code.as_str()), ("PhoneNumbers", numbers.as_str()),
                        ("SignName", "阿里云"), ("TemplateParam", template.as_str())];
            for text in [text.clone(), format!("{text}{code}"), format!("[{numbers}]")] {
                let shown = message(&text, &sent);
                proptest::prop_assert_eq!(&shown, &hide_values(text.clone(), &sent, usize::MAX));
            }
        }
    }

    #[test]
    fn numbers_of_a_list_are_masked_and_hidden_one_by_one() {
        let sent = [("PhoneNumbers", "13912345678,13812345678")];
        assert_eq!(value("PhoneNumbers", sent[0].1), "139****5678,138****5678");
        assert_eq!(
            message("invalid number 13812345678", &sent),
            "invalid number [redacted]"
        );
        assert_eq!(value("SomethingNew", "x"), REDACTED, "unknown means hidden");
    }
}
