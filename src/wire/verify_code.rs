//! Dypnsapi jobs: `send_verify_code` (SendSmsVerifyCode) and `check_verify_code`
//! (CheckSmsVerifyCode).

use serde::Deserialize;
use serde_json::{Map, Value};

use super::Invalid;
use super::fields::{TemplateParam, fields, in_range, opt_text, template_param, text};
use crate::phone::PhoneNumber;

/// Dypnsapi `SendSmsVerifyCode`. Optional fields left out take Aliyun's defaults.
#[derive(Debug, Clone)]
pub struct SendVerifyCode {
    pub phone_number: PhoneNumber,
    pub sign_name: String,
    pub template_code: String,
    pub template_param: TemplateParam,
    pub scheme_name: Option<String>,
    pub country_code: Option<String>,
    pub code_length: Option<u8>,
    pub code_type: Option<u8>,
    pub valid_time: Option<u32>,
    pub interval: Option<u32>,
    pub duplicate_policy: Option<u8>,
    pub return_verify_code: bool,
    pub auto_retry: Option<u8>,
    pub out_id: Option<String>,
    pub sms_up_extend_code: Option<String>,
}

impl SendVerifyCode {
    /// The Aliyun API parameters of this job, by their Aliyun names.
    pub fn api_params(&self) -> Vec<(&'static str, String)> {
        let mut p = vec![
            ("PhoneNumber", self.phone_number.as_str().to_owned()),
            ("SignName", self.sign_name.clone()),
            ("TemplateCode", self.template_code.clone()),
            ("TemplateParam", self.template_param.to_json()),
        ];
        let opt = |p: &mut Vec<_>, k, v: Option<String>| {
            if let Some(v) = v {
                p.push((k, v));
            }
        };
        opt(&mut p, "SchemeName", self.scheme_name.clone());
        opt(&mut p, "CountryCode", self.country_code.clone());
        opt(
            &mut p,
            "CodeLength",
            self.code_length.map(|v| v.to_string()),
        );
        opt(&mut p, "CodeType", self.code_type.map(|v| v.to_string()));
        opt(&mut p, "ValidTime", self.valid_time.map(|v| v.to_string()));
        opt(&mut p, "Interval", self.interval.map(|v| v.to_string()));
        opt(
            &mut p,
            "DuplicatePolicy",
            self.duplicate_policy.map(|v| v.to_string()),
        );
        if self.return_verify_code {
            p.push(("ReturnVerifyCode", "true".into()));
        }
        opt(&mut p, "AutoRetry", self.auto_retry.map(|v| v.to_string()));
        opt(&mut p, "OutId", self.out_id.clone());
        opt(&mut p, "SmsUpExtendCode", self.sms_up_extend_code.clone());
        p
    }

    pub(super) fn stored_params(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in self.api_params() {
            if k == "PhoneNumber" {
                continue;
            }
            let v = if k == "TemplateParam" {
                self.template_param.redacted_json()
            } else {
                v
            };
            m.insert(k.to_owned(), Value::String(v));
        }
        Value::Object(m)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendVerifyCodeRaw {
    phone_number: String,
    sign_name: String,
    template_code: String,
    template_param: Value,
    scheme_name: Option<String>,
    country_code: Option<String>,
    code_length: Option<i64>,
    code_type: Option<i64>,
    valid_time: Option<i64>,
    interval: Option<i64>,
    duplicate_policy: Option<i64>,
    return_verify_code: Option<bool>,
    auto_retry: Option<i64>,
    out_id: Option<String>,
    sms_up_extend_code: Option<String>,
}

/// `out_id` defaults to the job id, so a send can always be traced back to its job at Aliyun.
pub(super) fn decode_send_verify_code(
    map: Map<String, Value>,
    id: &str,
) -> Result<SendVerifyCode, Invalid> {
    let raw: SendVerifyCodeRaw = fields(map)?;
    let phone_number =
        PhoneNumber::parse(&raw.phone_number).map_err(|e| Invalid::field("phone_number", e))?;
    if let Some(cc) = &raw.country_code
        && cc != "86"
    {
        return Err(Invalid::field(
            "country_code",
            "Dypnsapi only supports \"86\"",
        ));
    }
    Ok(SendVerifyCode {
        phone_number,
        sign_name: text("sign_name", raw.sign_name, 1, 64)?,
        template_code: text("template_code", raw.template_code, 1, 64)?,
        template_param: template_param("template_param", raw.template_param)?,
        scheme_name: opt_text("scheme_name", raw.scheme_name, 1, 20)?,
        country_code: raw.country_code,
        code_length: in_range("code_length", raw.code_length, 4, 8)?,
        code_type: in_range("code_type", raw.code_type, 1, 7)?,
        valid_time: in_range("valid_time", raw.valid_time, 1, 86_400)?,
        interval: in_range("interval", raw.interval, 0, 86_400)?,
        duplicate_policy: in_range("duplicate_policy", raw.duplicate_policy, 1, 2)?,
        return_verify_code: raw.return_verify_code.unwrap_or(false),
        auto_retry: in_range("auto_retry", raw.auto_retry, 0, 1)?,
        out_id: Some(opt_text("out_id", raw.out_id, 1, 255)?.unwrap_or_else(|| id.to_owned())),
        sms_up_extend_code: opt_text("sms_up_extend_code", raw.sms_up_extend_code, 1, 20)?,
    })
}

/// Dypnsapi `CheckSmsVerifyCode`. The code the user typed is sent to Aliyun and nowhere else:
/// not stored, not logged.
#[derive(Clone)]
pub struct CheckVerifyCode {
    pub phone_number: PhoneNumber,
    pub verify_code: String,
    pub scheme_name: Option<String>,
    pub country_code: Option<String>,
    pub out_id: Option<String>,
    pub case_auth_policy: Option<u8>,
}

impl std::fmt::Debug for CheckVerifyCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckVerifyCode")
            .field("phone_number", &self.phone_number)
            .field("verify_code", &"***")
            .field("scheme_name", &self.scheme_name)
            .field("out_id", &self.out_id)
            .finish_non_exhaustive()
    }
}

impl CheckVerifyCode {
    pub fn api_params(&self) -> Vec<(&'static str, String)> {
        let mut p = vec![
            ("PhoneNumber", self.phone_number.as_str().to_owned()),
            ("VerifyCode", self.verify_code.clone()),
        ];
        for (k, v) in self.optional_params() {
            p.push((k, v));
        }
        p
    }

    fn optional_params(&self) -> Vec<(&'static str, String)> {
        [
            ("SchemeName", self.scheme_name.clone()),
            ("CountryCode", self.country_code.clone()),
            ("OutId", self.out_id.clone()),
            (
                "CaseAuthPolicy",
                self.case_auth_policy.map(|v| v.to_string()),
            ),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }

    pub(super) fn stored_params(&self) -> Value {
        Value::Object(
            self.optional_params()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Value::String(v)))
                .collect(),
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckVerifyCodeRaw {
    phone_number: String,
    verify_code: String,
    scheme_name: Option<String>,
    country_code: Option<String>,
    out_id: Option<String>,
    case_auth_policy: Option<i64>,
}

pub(super) fn decode_check_verify_code(
    map: Map<String, Value>,
    id: &str,
) -> Result<CheckVerifyCode, Invalid> {
    let raw: CheckVerifyCodeRaw = fields(map)?;
    let phone_number =
        PhoneNumber::parse(&raw.phone_number).map_err(|e| Invalid::field("phone_number", e))?;
    let code = raw.verify_code.trim();
    if code.is_empty() || code.len() > 16 || !code.chars().all(|c| c.is_ascii_alphanumeric()) {
        // Say what is wrong without echoing what the user typed.
        return Err(Invalid::field(
            "verify_code",
            "must be 1-16 letters or digits",
        ));
    }
    if raw.country_code.as_deref().is_some_and(|cc| cc != "86") {
        return Err(Invalid::field(
            "country_code",
            "Dypnsapi only supports \"86\"",
        ));
    }
    Ok(CheckVerifyCode {
        phone_number,
        verify_code: code.to_owned(),
        scheme_name: opt_text("scheme_name", raw.scheme_name, 1, 20)?,
        country_code: raw.country_code,
        out_id: Some(opt_text("out_id", raw.out_id, 1, 255)?.unwrap_or_else(|| id.to_owned())),
        case_auth_policy: in_range("case_auth_policy", raw.case_auth_policy, 1, 2)?,
    })
}
