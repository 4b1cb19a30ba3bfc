//! What an Aliyun call gives back, below both the client that makes it and the table that
//! judges it ([`super::outcome`]): the product called, Aliyun's answer, or why there is none.

use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use super::rate::PaceError;
use super::redact;

/// Aliyun answers are a few hundred bytes; anything far larger is an error page or an attack.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// Number authentication service: verification codes.
    Dypnsapi,
    /// Short message service: templated and batch SMS, delivery receipts.
    Dysmsapi,
}

impl Product {
    /// Its name in endpoints and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Product::Dypnsapi => "dypnsapi",
            Product::Dysmsapi => "dysmsapi",
        }
    }
}

/// Why no answer came back. The distinction that matters is whether the request may have
/// reached Aliyun: only [`CallError::NotSent`] proves it did not.
#[derive(Debug, Error)]
pub enum CallError {
    #[error("could not reach Aliyun: {0}")]
    NotSent(String),
    #[error("no answer from Aliyun within {0:?}")]
    Timeout(Duration),
    #[error("the connection to Aliyun broke mid-request: {0}")]
    Broken(String),
    #[error("Aliyun answered HTTP {0} with more than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge(u16),
    /// No slot could be had from the rate-limit schedule: the request was never made.
    #[error("not sent: {0}")]
    NotPaced(#[from] PaceError),
}

impl CallError {
    /// The worker's own code for a call without a usable answer (see `outcome::codes`).
    pub fn code(&self) -> &'static str {
        match self {
            CallError::NotSent(_) => codes::NOT_CONNECTED,
            CallError::Timeout(_) => codes::TIMEOUT,
            CallError::Broken(_) => codes::CONNECTION_BROKEN,
            CallError::TooLarge(_) => codes::RESPONSE_TOO_LARGE,
            CallError::NotPaced(_) => codes::NOT_PACED,
        }
    }
}

/// Aliyun's answer: HTTP status plus the common fields of its JSON body. Business failures
/// arrive as HTTP 200 with `Code != "OK"`, so callers branch on `code`, not on the status.
#[derive(Debug, Clone)]
pub struct Answer {
    pub http_status: u16,
    pub code: Option<String>,
    pub message: Option<String>,
    pub request_id: Option<String>,
    pub body: Value,
}

impl Answer {
    pub fn parse(http_status: u16, bytes: &[u8]) -> Self {
        let mut body: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
        drop_nul(&mut body);
        let text = |v: Option<&Value>| match v {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let message = text(body.get("Message")).or_else(|| {
            (!body.is_object()).then(|| {
                format!(
                    "HTTP {http_status} with a body that is not Aliyun JSON ({} bytes)",
                    bytes.len()
                )
            })
        });
        // Aliyun's codes are names. An empty or numeric `Code` is not one of its answers, so it
        // is read as no code at all: a send answered that way may have gone through.
        let code = match body.get("Code") {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
            _ => None,
        };
        Self {
            http_status,
            code,
            message,
            request_id: text(body.get("RequestId"))
                .or_else(|| text(body.get("Model").and_then(|m| m.get("RequestId")))),
            body,
        }
    }

    /// Hides every echo of the request (see [`redact::message`]) in what of the answer is
    /// stored, published or logged, before it leaves the client.
    pub(super) fn redact(&mut self, sent: &[(&str, &str)]) {
        if let Some(m) = self.message.as_mut() {
            *m = redact::message(m, sent);
        }
        if let Some(Value::String(m)) = self.body.get_mut("Message") {
            *m = redact::message(m, sent);
        }
    }

    fn model_field(&self, name: &str) -> Option<String> {
        let v = self
            .body
            .get("Model")
            .and_then(|m| m.get(name))
            .or_else(|| self.body.get(name))?;
        match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    pub fn biz_id(&self) -> Option<String> {
        self.model_field("BizId")
    }

    pub fn verify_code(&self) -> Option<String> {
        self.model_field("VerifyCode")
    }

    /// CheckSmsVerifyCode's verdict: `PASS` or `UNKNOWN`.
    pub fn verify_result(&self) -> Option<String> {
        self.model_field("VerifyResult")
    }

    pub fn is_ok(&self) -> bool {
        self.code.as_deref() == Some("OK")
    }
}

/// Any text of an answer may be stored (code, message, RequestId, BizId, a receipt's ErrCode),
/// and Postgres refuses NUL: one in an answer must not make its outcome unstorable.
pub(super) fn drop_nul(v: &mut Value) {
    match v {
        Value::String(s) => s.retain(|c| c != '\0'),
        Value::Array(items) => items.iter_mut().for_each(drop_nul),
        Value::Object(m) => {
            *m = std::mem::take(m)
                .into_iter()
                .map(|(mut k, mut v)| {
                    k.retain(|c| c != '\0');
                    drop_nul(&mut v);
                    (k, v)
                })
                .collect();
        }
        _ => {}
    }
}

/// The worker's own codes, for outcomes without an Aliyun code.
pub mod codes {
    pub const NOT_CONNECTED: &str = "ALIYUN_UNREACHABLE";
    pub const TIMEOUT: &str = "ALIYUN_TIMEOUT";
    pub const CONNECTION_BROKEN: &str = "ALIYUN_CONNECTION_BROKEN";
    pub const RESPONSE_TOO_LARGE: &str = "ALIYUN_RESPONSE_TOO_LARGE";
    pub const BAD_RESPONSE: &str = "ALIYUN_BAD_RESPONSE";
    pub const NOT_PACED: &str = "RATE_LIMIT_UNAVAILABLE";
    pub const ALL: &[&str] = &[
        NOT_CONNECTED,
        TIMEOUT,
        CONNECTION_BROKEN,
        RESPONSE_TOO_LARGE,
        BAD_RESPONSE,
        NOT_PACED,
    ];
}
