//! The public contract: the JSON jobs backends publish and the JSON results they read back.
//!
//! Decoding is strict on purpose: unknown fields, wrong types and out-of-range values are
//! answered with an `invalid` result naming the field, before anything reaches Aliyun.

mod fields;
mod sms;
mod verify_code;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::phone::PhoneNumber;

pub use fields::{CODE_PLACEHOLDER, TemplateParam};
pub use sms::{MAX_BATCH_NUMBERS, MAX_SEND_SMS_NUMBERS, SendBatchSms, SendSms};
pub use verify_code::{CheckVerifyCode, SendVerifyCode};

/// Larger bodies are refused unread: a job is a few hundred bytes.
pub const MAX_JOB_BYTES: usize = 64 * 1024;
const MAX_ID_CHARS: usize = 128;
/// Ids become AMQP short strings of at most 255 bytes: a result's message_id and correlation_id,
/// and a delivery event's `{id}:{phone}` (a number has at most 15 digits). Counted in bytes:
/// 90 Chinese characters are 270.
pub const MAX_ID_BYTES: usize = 200;
const _: () = assert!(MAX_ID_BYTES + ":".len() + 15 <= 255);

/// The `type` field of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobType {
    SendVerifyCode,
    CheckVerifyCode,
    SendSms,
    SendBatchSms,
}

impl JobType {
    pub const ALL: &'static [JobType] = &[
        JobType::SendVerifyCode,
        JobType::CheckVerifyCode,
        JobType::SendSms,
        JobType::SendBatchSms,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobType::SendVerifyCode => "send_verify_code",
            JobType::CheckVerifyCode => "check_verify_code",
            JobType::SendSms => "send_sms",
            JobType::SendBatchSms => "send_batch_sms",
        }
    }
}

impl FromStr for JobType {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        JobType::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
            .ok_or(())
    }
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a job stands. `Sending` is internal (the row is claimed and Aliyun may be called);
/// every other status is final and is what the result message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Sending,
    Sent,
    Verified,
    NotVerified,
    RateLimited,
    Rejected,
    Failed,
    Unknown,
    Invalid,
    Expired,
}

impl Status {
    pub const FINAL: &'static [Status] = &[
        Status::Sent,
        Status::Verified,
        Status::NotVerified,
        Status::RateLimited,
        Status::Rejected,
        Status::Failed,
        Status::Unknown,
        Status::Invalid,
        Status::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::Verified => "verified",
            Status::NotVerified => "not_verified",
            Status::RateLimited => "rate_limited",
            Status::Rejected => "rejected",
            Status::Failed => "failed",
            Status::Unknown => "unknown",
            Status::Invalid => "invalid",
            Status::Expired => "expired",
        }
    }

    pub fn is_final(self) -> bool {
        self != Status::Sending
    }
}

impl Status {
    /// Every status a row can have: `sending`, then the final ones.
    pub fn all() -> impl Iterator<Item = Status> {
        std::iter::once(Status::Sending).chain(Status::FINAL.iter().copied())
    }
}

impl FromStr for Status {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Status::all().find(|st| st.as_str() == s).ok_or(())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result message: one per job, published to `reply_to` or the results queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub job_type: Option<String>,
    pub status: Status,
    pub code: String,
    pub message: String,
    pub biz_id: Option<String>,
    pub request_id: Option<String>,
    pub attempts: u32,
    #[serde(serialize_with = "rfc3339_seconds")]
    pub finished_at: DateTime<Utc>,
    /// Only when the job asked for it and Aliyun returned one; never stored, so a replayed
    /// result does not carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_code: Option<String>,
}

fn rfc3339_seconds<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

impl JobResult {
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers cannot fail to serialise.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A job as the worker understands it, after validation.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    /// After this, the job ends `expired` without calling Aliyun.
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub enum JobKind {
    SendVerifyCode(SendVerifyCode),
    CheckVerifyCode(CheckVerifyCode),
    SendSms(SendSms),
    SendBatchSms(SendBatchSms),
}

impl Job {
    /// Codes go stale: a code job without `expires_at` still has a maximum age.
    pub fn is_code_job(&self) -> bool {
        matches!(
            self.kind,
            JobKind::SendVerifyCode(_) | JobKind::CheckVerifyCode(_)
        )
    }

    pub fn job_type(&self) -> JobType {
        match self.kind {
            JobKind::SendVerifyCode(_) => JobType::SendVerifyCode,
            JobKind::CheckVerifyCode(_) => JobType::CheckVerifyCode,
            JobKind::SendSms(_) => JobType::SendSms,
            JobKind::SendBatchSms(_) => JobType::SendBatchSms,
        }
    }

    /// Every number the job is about (one for Dypnsapi jobs).
    pub fn phones(&self) -> &[PhoneNumber] {
        match &self.kind {
            JobKind::SendVerifyCode(j) => std::slice::from_ref(&j.phone_number),
            JobKind::CheckVerifyCode(j) => std::slice::from_ref(&j.phone_number),
            JobKind::SendSms(j) => &j.phone_numbers,
            JobKind::SendBatchSms(j) => &j.phone_numbers,
        }
    }

    /// The first number: what logs (masked) and the `phone_number` column show.
    pub fn phone(&self) -> &PhoneNumber {
        // Every job type's decoder refuses an empty number list.
        &self.phones()[0]
    }

    pub fn out_id(&self) -> Option<&str> {
        match &self.kind {
            JobKind::SendVerifyCode(j) => j.out_id.as_deref(),
            JobKind::CheckVerifyCode(j) => j.out_id.as_deref(),
            JobKind::SendSms(j) => Some(&j.out_id),
            JobKind::SendBatchSms(j) => Some(&j.out_id),
        }
    }

    /// What operators may see of the request: everything but codes and credentials.
    pub fn stored_params(&self) -> Value {
        match &self.kind {
            JobKind::SendVerifyCode(j) => j.stored_params(),
            JobKind::CheckVerifyCode(j) => j.stored_params(),
            JobKind::SendSms(j) => j.stored_params(),
            JobKind::SendBatchSms(j) => j.stored_params(),
        }
    }
}

/// Why a message was refused. `code` is the worker's own upper-case code for the result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub code: &'static str,
    pub message: String,
    /// The job id, when it could be read, so the result can still name the job.
    pub id: Option<String>,
    pub job_type: Option<String>,
    /// The number the job was for, when one of its fields holds a valid one: an operator who
    /// looks a person up by number finds the refused job too.
    pub phone: Option<PhoneNumber>,
}

impl Invalid {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: printable(&message.into()),
            id: None,
            job_type: None,
            phone: None,
        }
    }

    pub(crate) fn field(field: &str, why: impl fmt::Display) -> Self {
        Self::new("INVALID_FIELD", format!("field `{field}`: {why}"))
    }
}

/// Messages quote the input (serde names the unknown field); whatever it holds, the message
/// must be storable and short: control characters become `?`, and it is cut at 500 characters.
fn printable(message: &str) -> String {
    const MAX: usize = 500;
    let mut out: String = message
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if message.chars().count() > MAX {
        out.push('…');
    }
    out
}

/// Decodes and validates one message body. `message_id` is the AMQP property, used as the
/// idempotency key when the body has no `id`.
pub fn decode_job(body: &[u8], message_id: Option<&str>) -> Result<Job, Invalid> {
    // A body that cannot be read as an object still has the id its message_id gives it, so
    // its answer and its row name the job.
    decode_body(body, message_id).map_err(|mut e| {
        if matches!(e.code, "TOO_LARGE" | "INVALID_UTF8" | "INVALID_JSON") {
            e.id = message_id.and_then(|m| checked_id(m.to_owned()).ok());
        }
        e
    })
}

fn decode_body(body: &[u8], message_id: Option<&str>) -> Result<Job, Invalid> {
    if body.len() > MAX_JOB_BYTES {
        return Err(Invalid::new(
            "TOO_LARGE",
            format!(
                "message body is {} bytes; the limit is {MAX_JOB_BYTES}",
                body.len()
            ),
        ));
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| Invalid::new("INVALID_UTF8", format!("message body is not UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Invalid::new("INVALID_JSON", format!("message body is not JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(Invalid::new(
            "INVALID_JSON",
            "message body must be a JSON object",
        ));
    };

    let id = take_id(&mut map, message_id);
    let job_type = map.remove("type");
    // The type goes back in the result and into the row of an invalid job, so only one that
    // reads as a name is kept (see `shown_name`).
    let type_text = job_type
        .as_ref()
        .and_then(Value::as_str)
        .and_then(fields::shown_name)
        .map(str::to_owned);
    let known_id = id.as_ref().ok().cloned();
    let phone = phone_in(&map);
    let with_context = |mut e: Invalid| {
        e.id = known_id.clone();
        e.job_type = type_text.clone();
        e.phone = phone.clone();
        e
    };

    let id = id.map_err(with_context)?;
    let with_nul = job_type
        .as_ref()
        .filter(|t| holds_nul(t))
        .map(|_| "type")
        .or_else(|| {
            map.iter()
                .find(|(k, v)| k.contains('\0') || holds_nul(v))
                .map(|(k, _)| k.as_str())
        });
    if let Some(field) = with_nul {
        return Err(with_context(fields::about_field(
            field,
            "contains a NUL character, which cannot be stored",
        )));
    }
    let expires_at = match map.remove("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(
            DateTime::parse_from_rfc3339(&t)
                .map_err(|e| {
                    with_context(Invalid::field("expires_at", format!("not RFC 3339: {e}")))
                })?
                .with_timezone(&Utc),
        ),
        Some(_) => {
            return Err(with_context(Invalid::field(
                "expires_at",
                "must be an RFC 3339 time string",
            )));
        }
    };
    let job_type = match job_type {
        None => return Err(with_context(Invalid::field("type", "is required"))),
        Some(Value::String(s)) => s.parse::<JobType>().map_err(|_| {
            with_context(Invalid::new(
                "UNKNOWN_TYPE",
                format!(
                    "field `type`: {} is not a job type (expected one of: {})",
                    fields::shown_name(&s).map_or("the value".to_owned(), |t| format!("{t:?}")),
                    JobType::ALL
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        })?,
        Some(_) => return Err(with_context(Invalid::field("type", "must be a string"))),
    };
    let kind = match job_type {
        JobType::SendVerifyCode => {
            verify_code::decode_send_verify_code(map, &id).map(JobKind::SendVerifyCode)
        }
        JobType::CheckVerifyCode => {
            verify_code::decode_check_verify_code(map, &id).map(JobKind::CheckVerifyCode)
        }
        JobType::SendSms => sms::decode_send_sms(map, &id).map(JobKind::SendSms),
        JobType::SendBatchSms => sms::decode_send_batch_sms(map, &id).map(JobKind::SendBatchSms),
    }
    .map_err(with_context)?;
    Ok(Job {
        id,
        kind,
        expires_at,
    })
}

/// The job's number (a batch's first), if a field holds a valid one, whatever else is wrong.
fn phone_in(map: &Map<String, Value>) -> Option<PhoneNumber> {
    let raw = match (map.get("phone_number"), map.get("phone_numbers")) {
        (Some(Value::String(one)), _) => one.as_str(),
        (_, Some(Value::Array(list))) => list.first()?.as_str()?,
        (_, Some(Value::String(list))) => list.split(',').next()?,
        _ => return None,
    };
    PhoneNumber::parse_international(raw).ok()
}

fn take_id(map: &mut Map<String, Value>, message_id: Option<&str>) -> Result<String, Invalid> {
    let id = match map.remove("id") {
        Some(Value::String(s)) => s,
        Some(Value::Null) | None => match message_id {
            Some(m) => m.to_owned(),
            None => {
                return Err(Invalid::new(
                    "MISSING_ID",
                    "field `id`: is required (or set the AMQP message_id property)",
                ));
            }
        },
        Some(_) => return Err(Invalid::field("id", "must be a string")),
    };
    checked_id(id)
}

fn checked_id(id: String) -> Result<String, Invalid> {
    let chars = id.chars().count();
    if chars == 0 || id.chars().any(char::is_control) {
        return Err(Invalid::field(
            "id",
            format!("must be 1-{MAX_ID_CHARS} characters without control characters"),
        ));
    }
    if chars > MAX_ID_CHARS || id.len() > MAX_ID_BYTES {
        return Err(Invalid::new(
            "ID_TOO_LONG",
            format!(
                "field `id`: is {chars} characters, {} bytes of UTF-8; the limit is \
                 {MAX_ID_CHARS} characters and {MAX_ID_BYTES} bytes",
                id.len()
            ),
        ));
    }
    Ok(id)
}

/// Postgres refuses NUL in text and `\u0000` in jsonb, and any string of a job may be stored.
fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// A delivery property that is stored with the job (`reply_to`, `correlation_id`): `None`
/// stays `None`, and one Postgres could not store is refused.
pub fn stored_property(name: &str, value: Option<String>) -> Result<Option<String>, Invalid> {
    match value {
        Some(v) if v.contains('\0') => Err(Invalid::new(
            "INVALID_PROPERTY",
            format!("AMQP property `{name}`: contains a NUL character, which cannot be stored"),
        )),
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(json: &str) -> Result<Job, Invalid> {
        decode_job(json.as_bytes(), None)
    }

    #[test]
    fn template_values_are_never_stored_only_their_names_and_the_code_placeholder() {
        let sms = job(
            r###"{"id": "s1", "type": "send_sms", "phone_numbers": ["13800138000"],
            "sign_name": "阿里云", "template_code": "SMS_1",
            "template_param": {"code": "4821", "otp": "993311", "name": "张三"}}"###,
        )
        .unwrap();
        let batch = job(r###"{"id": "b1", "type": "send_batch_sms",
            "phone_numbers": ["13800138000"], "sign_names": ["阿里云"], "template_code": "SMS_1",
            "template_params": [{"pin": "993311", "name": "张三"}]}"###)
        .unwrap();
        let code = job(r###"{"id": "c1", "type": "send_verify_code",
            "phone_number": "13800138000", "sign_name": "s", "template_code": "100001",
            "template_param": {"code": "##code##", "order": "A-77"}}"###)
        .unwrap();
        for (j, names) in [
            (&sms, vec!["code", "otp", "name"]),
            (&batch, vec!["pin", "name"]),
            (&code, vec!["code", "order"]),
        ] {
            let stored = j.stored_params().to_string();
            for value in ["4821", "993311", "张三", "A-77"] {
                assert!(!stored.contains(value), "{value} stored: {stored}");
            }
            for name in names {
                assert!(stored.contains(name), "{name} not kept: {stored}");
            }
        }
        assert!(code.stored_params().to_string().contains("##code##"));
    }

    const FULL: &str = r###"{"id": "signup-42-7f3a", "type": "send_verify_code",
        "phone_number": "13800138000", "sign_name": "速通互联验证码", "template_code": "100001",
        "template_param": {"code": "##code##", "min": "5"},
        "scheme_name": "默认方案", "country_code": "86", "code_length": 6, "code_type": 1,
        "valid_time": 300, "interval": 60, "duplicate_policy": 1, "return_verify_code": false,
        "auto_retry": 1, "out_id": "optional", "sms_up_extend_code": "12"}"###;

    #[test]
    fn the_documented_example_decodes() {
        let j = job(FULL).unwrap();
        assert_eq!(j.id, "signup-42-7f3a");
        let JobKind::SendVerifyCode(s) = &j.kind else {
            panic!("wrong kind: {j:?}")
        };
        assert_eq!(s.code_length, Some(6));
        let params = s.api_params();
        assert!(params.contains(&(
            "TemplateParam",
            r###"{"code":"##code##","min":"5"}"###.into()
        )));
        assert!(params.contains(&("CodeLength", "6".into())));
        assert!(!params.iter().any(|(k, _)| *k == "ReturnVerifyCode"));
    }

    #[test]
    fn message_id_stands_in_for_a_missing_id() {
        let body = r###"{"type":"send_verify_code","phone_number":"13800138000","sign_name":"s","template_code":"100001","template_param":"{\"code\":\"##code##\"}"}"###;
        assert_eq!(decode_job(body.as_bytes(), Some("m-1")).unwrap().id, "m-1");
        let err = decode_job(body.as_bytes(), None).unwrap_err();
        assert_eq!(err.code, "MISSING_ID");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (r#""phone_number": "12345""#, "phone_number"),
            (r#""code_length": 9"#, "code_length"),
            (r#""code_type": 0"#, "code_type"),
            (r#""duplicate_policy": 3"#, "duplicate_policy"),
            (
                r#""scheme_name": "一二三四五六七八九十一二三四五六七八九十一""#,
                "scheme_name",
            ),
            (r#""country_code": "1""#, "country_code"),
            (r#""template_param": {"code": 1234}"#, "template_param"),
            (r#""template_param": {"min": "5\u0000"}"#, "template_param"),
            (r#""phone_numbr": "13800138000""#, "phone_numbr"),
            (r#""code_length": "6""#, "code_length"),
        ];
        for (patch, needle) in cases {
            let mut v: Value = serde_json::from_str(FULL).unwrap();
            let p: Value = serde_json::from_str(&format!("{{{patch}}}")).unwrap();
            for (k, val) in p.as_object().unwrap() {
                v[k] = val.clone();
            }
            let err = job(&v.to_string()).unwrap_err();
            assert!(err.message.contains(needle), "{patch}: {}", err.message);
            assert_eq!(err.id.as_deref(), Some("signup-42-7f3a"), "{patch}");
        }
    }

    /// serde quotes a value of the wrong type; a typed code or a number sent as a JSON number
    /// must not come back in the message (it reaches the result, the row and the log).
    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_field_and_never_quoted() {
        let check = |patch: Value| {
            let mut v: Value = serde_json::from_str(FULL).unwrap();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            job(&v.to_string()).unwrap_err()
        };
        let cases = [
            (
                json!({"phone_number": 13812345678_u64}),
                "phone_number",
                "13812345678",
            ),
            (
                json!({"code_length": "13812345678"}),
                "code_length",
                "13812345678",
            ),
            (
                json!({"valid_time": 13812345678_u64}),
                "valid_time",
                "13812345678",
            ),
            (json!({"valid_time": 1.5}), "valid_time", "1.5"),
            (json!({"sign_name": ["482913"]}), "sign_name", "482913"),
            (
                json!({"template_param": 482913}),
                "template_param",
                "482913",
            ),
        ];
        for (patch, field, value) in cases {
            let err = check(patch.clone());
            assert_eq!(err.code, "INVALID_FIELD", "{patch}");
            assert!(err.message.contains(field), "{patch}: {}", err.message);
            assert!(
                !err.message.contains(value),
                "{patch} quoted: {}",
                err.message
            );
        }
        let code = job(r#"{"id":"c","type":"check_verify_code","phone_number":"13800138000","verify_code":482913}"#)
            .unwrap_err();
        assert!(code.message.contains("verify_code"), "{}", code.message);
        assert!(
            code.message.contains("expected a string, got integer"),
            "{}",
            code.message
        );
        assert!(!code.message.contains("482913"), "{}", code.message);
    }

    /// Field names and job types are shown back when they read as names (a typo is then easy
    /// to see), and not when they could be someone's data.
    #[test]
    fn only_names_that_read_as_names_are_repeated() {
        let mut v: Value = serde_json::from_str(FULL).unwrap();
        v["13812345678"] = json!("x");
        let err = job(&v.to_string()).unwrap_err();
        assert!(err.message.contains("unknown field"), "{}", err.message);
        assert!(!err.message.contains("13812345678"), "{}", err.message);
        assert!(
            err.message.contains("phone_number"),
            "the fields it expects: {}",
            err.message
        );

        let typo = job(r#"{"id":"t","type":"sendVerifyCode"}"#).unwrap_err();
        assert!(
            typo.message.contains("\"sendVerifyCode\""),
            "{}",
            typo.message
        );
        assert_eq!(typo.job_type.as_deref(), Some("sendVerifyCode"));
        for kind in ["13812345678", "tel13812345678", "x4829"] {
            let number = job(&format!(r#"{{"id":"t","type":"{kind}"}}"#)).unwrap_err();
            assert_eq!(number.code, "UNKNOWN_TYPE");
            assert!(!number.message.contains(kind), "{}", number.message);
            assert_eq!(number.job_type, None);
        }
        // Wherever a name is quoted: a NUL's field, a template variable's.
        let nul = job(r#"{"id":"n","type":"send_sms","482913":"a\u0000"}"#).unwrap_err();
        assert!(nul.message.contains("NUL"), "{}", nul.message);
        assert!(!nul.message.contains("482913"), "{}", nul.message);
        let mut v: Value = serde_json::from_str(FULL).unwrap();
        v["template_param"] = json!({"13812345678": 1});
        let var = job(&v.to_string()).unwrap_err();
        assert!(var.message.contains("template_param"), "{}", var.message);
        assert!(!var.message.contains("13812345678"), "{}", var.message);
    }

    #[test]
    fn a_refused_job_keeps_its_number_when_a_field_holds_a_valid_one() {
        let refused = |json: &str| job(json).unwrap_err().phone.map(|p| p.as_str().to_owned());
        assert_eq!(
            refused(
                r#"{"id":"a","type":"check_verify_code","phone_number":"+86 138 0013 8000","verify_code":1}"#
            ),
            Some("13800138000".into())
        );
        assert_eq!(
            refused(r#"{"id":"b","type":"send_sms","phone_numbers":["13800138000","x"]}"#),
            Some("13800138000".into())
        );
        assert_eq!(
            refused(r#"{"id":"c","type":"send_sms","phone_numbers":"13800138000,1"}"#),
            Some("13800138000".into())
        );
        assert_eq!(
            refused(r#"{"id":"d","type":"send_sms","phone_number":"12345"}"#),
            None
        );
        assert_eq!(refused(r#"{"id":"e","type":"nope"}"#), None);
    }

    /// The wire contract: with no `id` in the body, `message_id` is the id — also of a body
    /// that cannot be read.
    #[test]
    fn a_body_that_cannot_be_read_keeps_the_id_its_message_id_gives() {
        for body in [&b"[1,2]"[..], b"{not json", &[0xff, 0xfe]] {
            let e = decode_job(body, Some("m-7")).unwrap_err();
            assert_eq!(e.id.as_deref(), Some("m-7"), "{e:?}");
            assert_eq!(decode_job(body, None).unwrap_err().id, None);
        }
        let big = vec![b' '; MAX_JOB_BYTES + 1];
        assert_eq!(
            decode_job(&big, Some("m-8")).unwrap_err().id.as_deref(),
            Some("m-8")
        );
        // An id the body gives wins; a message_id that is no valid id is not used.
        let e = decode_job(br#"{"id":"b-1","type":"x"}"#, Some("m-9")).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("b-1"));
        let e = decode_job(b"[1]", Some(&"x".repeat(MAX_ID_CHARS + 1))).unwrap_err();
        assert_eq!(e.id, None);
    }

    #[test]
    fn missing_required_field_is_named() {
        let mut v: Value = serde_json::from_str(FULL).unwrap();
        v.as_object_mut().unwrap().remove("sign_name");
        let err = job(&v.to_string()).unwrap_err();
        assert!(err.message.contains("sign_name"), "{}", err.message);
    }

    #[test]
    fn malformed_bodies_are_refused_with_their_own_codes() {
        assert_eq!(job("{not json").unwrap_err().code, "INVALID_JSON");
        assert_eq!(job("[1,2]").unwrap_err().code, "INVALID_JSON");
        assert_eq!(
            decode_job(&[0xff, 0xfe], None).unwrap_err().code,
            "INVALID_UTF8"
        );
        let huge = vec![b' '; MAX_JOB_BYTES + 1];
        assert_eq!(decode_job(&huge, None).unwrap_err().code, "TOO_LARGE");
        assert_eq!(
            job(r#"{"id":"x","type":"send_fax"}"#).unwrap_err().code,
            "UNKNOWN_TYPE"
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(job(&deep).unwrap_err().code, "INVALID_JSON");
    }

    #[test]
    fn ids_are_limited_in_bytes_for_the_amqp_short_strings_made_from_them() {
        let body = |id: &str| FULL.replace("signup-42-7f3a", id);
        // 90 characters, 270 bytes: within the character limit, over the byte limit.
        let err = job(&body(&"验".repeat(90))).unwrap_err();
        assert_eq!(err.code, "ID_TOO_LONG");
        assert!(
            err.message.contains(&format!("{MAX_ID_BYTES} bytes")) && err.message.contains("270"),
            "{}",
            err.message
        );
        assert_eq!(err.id, None, "an id that is refused is not echoed");
        assert_eq!(job(&body(&"验".repeat(66))).unwrap().id.len(), 198);
        let long_message_id = "m".repeat(201);
        let no_id = FULL.replace(r#""id": "signup-42-7f3a","#, "");
        let err = decode_job(no_id.as_bytes(), Some(&long_message_id)).unwrap_err();
        assert_eq!(err.code, "ID_TOO_LONG");
    }

    #[test]
    fn a_nul_anywhere_in_a_job_is_refused_and_never_kept() {
        let err = job(r#"{"id":"n1","type":"\u0000"}"#).unwrap_err();
        assert!(err.message.contains("NUL"), "{}", err.message);
        assert!(err.message.contains("type"), "{}", err.message);
        assert_eq!(err.id.as_deref(), Some("n1"));
        assert!(
            err.job_type.as_deref().is_none_or(|t| !t.contains('\0')),
            "{:?}",
            err.job_type
        );
        let cases = [
            r#""template_param": {"a\u0000b": "x"}"#,
            r###""template_param": {"code": "##code##", "min": [1, "\u0000"]}"###,
            r#""out_id": "a\u0000""#,
            r#""scheme_name": "\u0000""#,
            r#""country_code": "8\u00006""#,
            r#""sms\u0000": 1"#,
            r#""expires_at": "2026-11-23T10:00:00Z\u0000""#,
        ];
        for patch in cases {
            let mut v: Value = serde_json::from_str(FULL).unwrap();
            let p: Value = serde_json::from_str(&format!("{{{patch}}}")).unwrap();
            for (k, val) in p.as_object().unwrap() {
                v[k] = val.clone();
            }
            let err = job(&v.to_string()).unwrap_err();
            assert!(!err.message.contains('\0'), "{patch}: {}", err.message);
            assert_eq!(err.id.as_deref(), Some("signup-42-7f3a"), "{patch}");
        }
    }

    #[test]
    fn stored_properties_refuse_a_nul() {
        assert_eq!(stored_property("reply_to", None), Ok(None));
        assert_eq!(
            stored_property("reply_to", Some("q".into())),
            Ok(Some("q".into()))
        );
        let err = stored_property("correlation_id", Some("a\0b".into())).unwrap_err();
        assert_eq!(err.code, "INVALID_PROPERTY");
        assert!(err.message.contains("correlation_id"), "{}", err.message);
        assert!(!err.message.contains('\0'), "{}", err.message);
    }

    #[test]
    fn refusal_messages_are_storable_whatever_the_input() {
        let field = format!("a\\u0000b{}", "x".repeat(5000));
        let body = format!(r#"{{"id":"x","type":"send_verify_code","{field}":1}}"#);
        let err = job(&body).unwrap_err();
        assert!(!err.message.contains('\0'), "{}", err.message);
        assert!(err.message.chars().count() <= 501, "{}", err.message.len());
    }

    #[test]
    fn stored_params_hide_literal_codes_and_the_phone() {
        let literal = FULL.replace("##code##", "482913");
        let stored = job(&literal).unwrap().stored_params().to_string();
        assert!(!stored.contains("482913"), "{stored}");
        assert!(!stored.contains("13800138000"), "{stored}");
        let placeholder = job(FULL).unwrap().stored_params().to_string();
        assert!(placeholder.contains("##code##"), "{placeholder}");
    }

    #[test]
    fn results_serialise_as_documented() {
        let r = JobResult {
            id: Some("a".into()),
            job_type: Some("send_verify_code".into()),
            status: Status::RateLimited,
            code: "biz.FREQUENCY".into(),
            message: "m".into(),
            biz_id: None,
            request_id: None,
            attempts: 1,
            finished_at: DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            verify_code: None,
        };
        let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(v["status"], "rate_limited");
        assert_eq!(v["type"], "send_verify_code");
        assert_eq!(v["finished_at"], "2026-11-23T10:00:00.000Z");
        assert!(v.get("verify_code").is_none());
        for s in Status::FINAL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(*s));
        }
    }
}
