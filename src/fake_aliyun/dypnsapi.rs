//! Dypnsapi as the fake plays it: `SendSmsVerifyCode` and `CheckSmsVerifyCode`, with the
//! documented parameters, bounds, response shapes and business codes.

use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};

use super::state::{IssuedCode, State};
use super::{FakeConfig, Reply};
use crate::wire::CODE_PLACEHOLDER;

const DEFAULT_SCHEME: &str = "默认方案";

pub(super) fn get<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Aliyun's answer to an absent required parameter, for the first one missing.
pub(super) fn require(params: &[(String, String)], names: &[&str]) -> Result<(), Reply> {
    match names
        .iter()
        .find(|n| get(params, n).is_none_or(str::is_empty))
    {
        Some(name) => Err(missing(name)),
        None => Ok(()),
    }
}

fn missing(name: &str) -> Reply {
    Reply::gateway_error(
        400,
        &format!("Missing{name}"),
        &format!("{name} is mandatory for this action."),
    )
}

/// Dypnsapi business failures: HTTP 200, `Success: false`.
fn business(code: &str, message: &str) -> Reply {
    Reply::ok_json(json!({
        "Code": code,
        "Message": message,
        "RequestId": super::request_id(),
        "Success": false,
    }))
}

pub(super) fn is_mobile(p: &str) -> bool {
    let b = p.as_bytes();
    b.len() == 11
        && b.iter().all(u8::is_ascii_digit)
        && b[0] == b'1'
        && (b'3'..=b'9').contains(&b[1])
}

fn long_in(
    params: &[(String, String)],
    name: &str,
    min: i64,
    max: i64,
    default: i64,
) -> Option<i64> {
    match get(params, name) {
        None => Some(default),
        Some(v) => v.parse::<i64>().ok().filter(|n| (min..=max).contains(n)),
    }
}

fn generate(len: usize, code_type: i64) -> String {
    const DIGITS: &str = "0123456789";
    const UPPER: &str = "ABCDEFGHJKLMNPQRSTUVWXYZ";
    const LOWER: &str = "abcdefghijkmnpqrstuvwxyz";
    let alphabet: String = match code_type {
        2 => UPPER.into(),
        3 => LOWER.into(),
        4 => [UPPER, LOWER].concat(),
        5 => [DIGITS, UPPER].concat(),
        6 => [DIGITS, LOWER].concat(),
        7 => [DIGITS, UPPER, LOWER].concat(),
        _ => DIGITS.into(),
    };
    let chars: Vec<char> = alphabet.chars().collect();
    let mut rng = rand::rng();
    (0..len)
        .map(|_| chars[rng.random_range(0..chars.len())])
        .collect()
}

pub(super) struct Executed {
    pub reply: Reply,
    pub biz_id: Option<String>,
    pub executed: bool,
}

pub(super) fn send_sms_verify_code(
    config: &FakeConfig,
    state: &State,
    params: &[(String, String)],
) -> Executed {
    let not_executed = |reply| Executed {
        reply,
        biz_id: None,
        executed: false,
    };
    if let Err(reply) = require(
        params,
        &["PhoneNumber", "SignName", "TemplateCode", "TemplateParam"],
    ) {
        return not_executed(reply);
    }
    let phone = get(params, "PhoneNumber").unwrap_or_default();
    if !is_mobile(phone) {
        return not_executed(business(
            "MOBILE_NUMBER_ILLEGAL",
            "The mobile number is illegal.",
        ));
    }
    let template: Option<serde_json::Map<String, Value>> = get(params, "TemplateParam")
        .and_then(|t| serde_json::from_str(t).ok())
        .filter(|m: &serde_json::Map<String, Value>| m.values().all(Value::is_string));
    let Some(template) = template else {
        return not_executed(business(
            "INVALID_PARAMETERS",
            "TemplateParam must be a JSON object of strings.",
        ));
    };
    let scheme = get(params, "SchemeName").unwrap_or(DEFAULT_SCHEME);
    let (Some(code_length), Some(code_type), Some(valid_time), Some(interval), Some(policy)) = (
        long_in(params, "CodeLength", 4, 8, 4),
        long_in(params, "CodeType", 1, 7, 1),
        long_in(params, "ValidTime", 1, 86_400, 300),
        long_in(params, "Interval", 0, 86_400, 60),
        long_in(params, "DuplicatePolicy", 1, 2, 1),
    ) else {
        return not_executed(business(
            "INVALID_PARAMETERS",
            "A numeric parameter is out of range.",
        ));
    };
    if scheme.chars().count() > 20 || get(params, "CountryCode").is_some_and(|c| c != "86") {
        return not_executed(business(
            "INVALID_PARAMETERS",
            "SchemeName or CountryCode is not valid.",
        ));
    }
    if config.enforce_interval && interval > 0 {
        let window = Duration::from_secs(interval as u64);
        let recent = state.with(|s| {
            s.last_verify_send
                .get(phone)
                .is_some_and(|last| last.elapsed() < window)
        });
        if recent {
            return not_executed(business("biz.FREQUENCY", "check frequency failed"));
        }
    }
    if let Some(limit) = config.per_number_per_minute {
        let now = Instant::now();
        let recent = state.with(|s| {
            let sends = s.sends.entry(phone.to_owned()).or_default();
            sends.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
            sends.len()
        });
        if recent >= limit as usize {
            return not_executed(business("biz.FREQUENCY", "check frequency failed"));
        }
    }

    let generates = template.values().any(|v| v == CODE_PLACEHOLDER);
    let code = generates.then(|| generate(code_length as usize, code_type));
    let (biz_id, request_id) = state.with(|s| {
        s.biz_counter += 1;
        s.sends
            .entry(phone.to_owned())
            .or_default()
            .push(Instant::now());
        s.last_verify_send.insert(phone.to_owned(), Instant::now());
        if let Some(code) = &code {
            let live = s
                .codes
                .entry((phone.to_owned(), scheme.to_owned()))
                .or_default();
            if policy == 1 {
                live.clear();
            }
            live.push(IssuedCode {
                code: code.clone(),
                expires: Instant::now() + Duration::from_secs(valid_time as u64),
            });
        }
        (
            format!(
                "{}^{}",
                900_000_000_000u64 + s.biz_counter,
                rand::rng().random_range(0..10)
            ),
            super::request_id(),
        )
    });
    let mut model = json!({
        "BizId": biz_id,
        "RequestId": request_id,
        "OutId": get(params, "OutId").unwrap_or_default(),
    });
    if get(params, "ReturnVerifyCode") == Some("true")
        && let Some(code) = &code
    {
        model["VerifyCode"] = Value::String(code.clone());
    }
    Executed {
        reply: Reply::ok_json(json!({
            "Code": "OK",
            "Message": "成功",
            "RequestId": request_id,
            "Success": true,
            "Model": model,
        })),
        biz_id: Some(biz_id),
        executed: true,
    }
}

pub(super) fn check_sms_verify_code(state: &State, params: &[(String, String)]) -> Executed {
    let not_executed = |reply| Executed {
        reply,
        biz_id: None,
        executed: false,
    };
    if let Err(reply) = require(params, &["PhoneNumber", "VerifyCode"]) {
        return not_executed(reply);
    }
    let phone = get(params, "PhoneNumber").unwrap_or_default();
    if !is_mobile(phone) {
        return not_executed(business(
            "MOBILE_NUMBER_ILLEGAL",
            "The mobile number is illegal.",
        ));
    }
    let scheme = get(params, "SchemeName").unwrap_or(DEFAULT_SCHEME);
    let typed = get(params, "VerifyCode").unwrap_or_default();
    let case_sensitive = get(params, "CaseAuthPolicy") == Some("2");
    let passed = state.with(|s| {
        let Some(live) = s.codes.get_mut(&(phone.to_owned(), scheme.to_owned())) else {
            return false;
        };
        let now = Instant::now();
        live.retain(|c| c.expires > now);
        let matches = |c: &IssuedCode| {
            if case_sensitive {
                c.code == typed
            } else {
                c.code.eq_ignore_ascii_case(typed)
            }
        };
        match live.iter().position(matches) {
            // A code that passes is consumed: a second check of it is UNKNOWN.
            Some(i) => {
                live.remove(i);
                true
            }
            None => false,
        }
    });
    Executed {
        reply: Reply::ok_json(json!({
            "Code": "OK",
            "Message": "成功",
            "Success": true,
            "Model": {
                "OutId": get(params, "OutId").unwrap_or_default(),
                "VerifyResult": if passed { "PASS" } else { "UNKNOWN" },
            },
        })),
        biz_id: None,
        executed: passed,
    }
}
