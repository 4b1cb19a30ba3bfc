//! Dysmsapi jobs: `send_sms` (SendSms) and `send_batch_sms` (SendBatchSms).

use serde::Deserialize;
use serde_json::{Map, Value};

use super::Invalid;
use super::fields::{TemplateParam, fields, opt_text, phone_list, template_param, text};
use crate::phone::PhoneNumber;

/// SendSms takes up to 1000 numbers in one call.
pub const MAX_SEND_SMS_NUMBERS: usize = 1000;
/// SendBatchSms takes up to 100 (number, signature, parameters) triples.
pub const MAX_BATCH_NUMBERS: usize = 100;

/// Dysmsapi `SendSms`: one template to one or more numbers.
#[derive(Debug, Clone)]
pub struct SendSms {
    pub phone_numbers: Vec<PhoneNumber>,
    pub sign_name: String,
    pub template_code: String,
    pub template_param: Option<TemplateParam>,
    pub sms_up_extend_code: Option<String>,
    pub out_id: String,
}

impl SendSms {
    pub fn api_params(&self) -> Vec<(&'static str, String)> {
        let mut p = vec![
            ("PhoneNumbers", joined(&self.phone_numbers)),
            ("SignName", self.sign_name.clone()),
            ("TemplateCode", self.template_code.clone()),
            ("OutId", self.out_id.clone()),
        ];
        if let Some(t) = &self.template_param {
            p.push(("TemplateParam", t.to_json()));
        }
        if let Some(e) = &self.sms_up_extend_code {
            p.push(("SmsUpExtendCode", e.clone()));
        }
        p
    }

    pub(super) fn stored_params(&self) -> Value {
        let mut m = Map::new();
        m.insert("SignName".into(), self.sign_name.clone().into());
        m.insert("TemplateCode".into(), self.template_code.clone().into());
        m.insert("OutId".into(), self.out_id.clone().into());
        if let Some(t) = &self.template_param {
            m.insert("TemplateParam".into(), t.redacted_json().into());
        }
        if let Some(e) = &self.sms_up_extend_code {
            m.insert("SmsUpExtendCode".into(), e.clone().into());
        }
        Value::Object(m)
    }
}

/// Dysmsapi `SendBatchSms`: per-number signatures and parameters, one template.
#[derive(Debug, Clone)]
pub struct SendBatchSms {
    pub phone_numbers: Vec<PhoneNumber>,
    pub sign_names: Vec<String>,
    pub template_code: String,
    pub template_params: Option<Vec<TemplateParam>>,
    pub sms_up_extend_codes: Option<Vec<String>>,
    pub out_id: String,
}

impl SendBatchSms {
    /// Query parameters; the JSON arrays go in the form body (see [`Self::form_params`]), as
    /// Aliyun's SDKs send them.
    pub fn api_params(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TemplateCode", self.template_code.clone()),
            ("OutId", self.out_id.clone()),
        ]
    }

    pub fn form_params(&self) -> Vec<(&'static str, String)> {
        let numbers: Vec<&str> = self.phone_numbers.iter().map(PhoneNumber::as_str).collect();
        let mut p = vec![
            ("PhoneNumberJson", json_string(&numbers)),
            ("SignNameJson", json_string(&self.sign_names)),
        ];
        if let Some(t) = &self.template_params {
            let objects: Vec<_> = t.iter().map(|t| &t.0).collect();
            p.push(("TemplateParamJson", json_string(&objects)));
        }
        if let Some(e) = &self.sms_up_extend_codes {
            p.push(("SmsUpExtendCodeJson", json_string(e)));
        }
        p
    }

    pub(super) fn stored_params(&self) -> Value {
        let mut m = Map::new();
        m.insert("TemplateCode".into(), self.template_code.clone().into());
        m.insert("OutId".into(), self.out_id.clone().into());
        m.insert("SignNameJson".into(), json_string(&self.sign_names).into());
        if let Some(t) = &self.template_params {
            let redacted: Vec<Value> = t
                .iter()
                .map(|t| serde_json::from_str(&t.redacted_json()).unwrap_or(Value::Null))
                .collect();
            m.insert("TemplateParamJson".into(), json_string(&redacted).into());
        }
        Value::Object(m)
    }
}

fn joined(numbers: &[PhoneNumber]) -> String {
    numbers
        .iter()
        .map(PhoneNumber::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

fn json_string<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendSmsRaw {
    phone_numbers: Value,
    sign_name: String,
    template_code: String,
    template_param: Option<Value>,
    sms_up_extend_code: Option<String>,
    out_id: Option<String>,
}

pub(super) fn decode_send_sms(map: Map<String, Value>, id: &str) -> Result<SendSms, Invalid> {
    let raw: SendSmsRaw = fields(map)?;
    Ok(SendSms {
        phone_numbers: phone_list("phone_numbers", raw.phone_numbers, MAX_SEND_SMS_NUMBERS)?,
        sign_name: text("sign_name", raw.sign_name, 1, 64)?,
        template_code: text("template_code", raw.template_code, 1, 64)?,
        template_param: raw
            .template_param
            .map(|t| template_param("template_param", t))
            .transpose()?,
        sms_up_extend_code: opt_text("sms_up_extend_code", raw.sms_up_extend_code, 1, 20)?,
        out_id: opt_text("out_id", raw.out_id, 1, 255)?.unwrap_or_else(|| id.to_owned()),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBatchSmsRaw {
    phone_numbers: Value,
    sign_names: Vec<String>,
    template_code: String,
    template_params: Option<Vec<Value>>,
    sms_up_extend_codes: Option<Vec<String>>,
    out_id: Option<String>,
}

pub(super) fn decode_send_batch_sms(
    map: Map<String, Value>,
    id: &str,
) -> Result<SendBatchSms, Invalid> {
    let raw: SendBatchSmsRaw = fields(map)?;
    let phone_numbers = phone_list("phone_numbers", raw.phone_numbers, MAX_BATCH_NUMBERS)?;
    let n = phone_numbers.len();
    let same_length = |field: &str, len: usize| {
        if len == n {
            Ok(())
        } else {
            Err(Invalid::field(
                field,
                format!("must have one entry per phone number ({n}), got {len}"),
            ))
        }
    };
    same_length("sign_names", raw.sign_names.len())?;
    let sign_names = raw
        .sign_names
        .into_iter()
        .enumerate()
        .map(|(i, s)| text(&format!("sign_names[{i}]"), s, 1, 64))
        .collect::<Result<_, _>>()?;
    let template_params = match raw.template_params {
        None => None,
        Some(list) => {
            same_length("template_params", list.len())?;
            Some(
                list.into_iter()
                    .enumerate()
                    .map(|(i, t)| template_param(&format!("template_params[{i}]"), t))
                    .collect::<Result<_, _>>()?,
            )
        }
    };
    let sms_up_extend_codes = match raw.sms_up_extend_codes {
        None => None,
        Some(list) => {
            same_length("sms_up_extend_codes", list.len())?;
            Some(
                list.into_iter()
                    .enumerate()
                    .map(|(i, c)| text(&format!("sms_up_extend_codes[{i}]"), c, 1, 20))
                    .collect::<Result<_, _>>()?,
            )
        }
    };
    Ok(SendBatchSms {
        phone_numbers,
        sign_names,
        template_code: text("template_code", raw.template_code, 1, 64)?,
        template_params,
        sms_up_extend_codes,
        // SendBatchSms wants OutId shorter than 256.
        out_id: opt_text("out_id", raw.out_id, 1, 255)?.unwrap_or_else(|| id.to_owned()),
    })
}
