//! What the fake remembers: nonces, issued codes, every request it executed, and the faults
//! queued for the next requests.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A fault injected into matching requests, by flag or at run time (`POST /__fake/faults`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer normally, after a delay.
    Latency { ms: u64 },
    /// HTTP 500 InternalError, without executing the request.
    Http500,
    /// HTTP 503 ServiceUnavailable, without executing the request.
    Http503,
    /// HTTP 400 Throttling.User, without executing the request.
    Throttling,
    /// Never answer and never execute.
    Hang,
    /// Execute (record the send, issue the code), then never answer: the lost-answer case.
    HangAfterSend,
    /// Execute, then answer a bare HTTP 503 with a proxy's plain-text body: what an Envoy in
    /// front of the API says when the upstream connection resets after it forwarded the call.
    Http503AfterSend,
    /// Execute the send, and let the carrier's receipt report it failed (`SendStatus` 2) with
    /// this `ErrCode`, e.g. `MK:0001` or `UNDELIV`.
    ReceiptFailed { err_code: String },
    /// HTTP 307 to `location`, without executing: what a misconfigured proxy or endpoint
    /// might say. A client that followed it would send the call again, elsewhere.
    Redirect { location: String },
    /// Answer with this code, without executing.
    Error {
        code: String,
        message: String,
        #[serde(default = "http_200")]
        http_status: u16,
    },
}

fn http_200() -> u16 {
    200
}

/// Which requests a fault applies to, and how many times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(default)]
    pub action: Option<String>,
    /// Matches PhoneNumber (Dypnsapi) or any number in PhoneNumbers.
    #[serde(default)]
    pub phone: Option<String>,
    pub fault: Fault,
    /// How many matching requests get the fault; absent means every one.
    #[serde(default)]
    pub times: Option<u32>,
}

impl Fault {
    /// A business refusal as Aliyun sends most of them: HTTP 200 with a code.
    pub fn error(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::error_with_status(code, message, 200)
    }

    /// A refusal with a code, at an HTTP status of its own (a gateway error: 400, 403, 404 …).
    pub fn error_with_status(
        code: impl Into<String>,
        message: impl Into<String>,
        http_status: u16,
    ) -> Self {
        Fault::Error {
            code: code.into(),
            message: message.into(),
            http_status,
        }
    }
}

impl FaultRule {
    /// `fault` for every request, until narrowed by the methods below.
    pub fn every(fault: Fault) -> Self {
        Self {
            action: None,
            phone: None,
            fault,
            times: None,
        }
    }

    pub fn on_action(mut self, action: impl Into<String>) -> Self {
        self.action = Some(action.into());
        self
    }

    pub fn on_phone(mut self, phone: impl Into<String>) -> Self {
        self.phone = Some(phone.into());
        self
    }

    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }
}

/// One request that passed authentication.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub action: String,
    pub phone: Option<String>,
    pub out_id: Option<String>,
    /// The code the fake answered (or would have, for a hang after send).
    pub code: String,
    pub biz_id: Option<String>,
    /// True when the request took effect (a send was made, a code was consumed).
    pub executed: bool,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub(crate) struct IssuedCode {
    pub code: String,
    pub expires: Instant,
}

/// One number of a Dysmsapi send, as QuerySendDetails reports it.
#[derive(Debug, Clone)]
pub(crate) struct SmsRecord {
    pub phone: String,
    pub biz_id: String,
    pub out_id: Option<String>,
    pub template_code: String,
    pub sent_at: DateTime<Utc>,
    /// When the carrier's receipt arrives (SendStatus turns 3, or 2 if `failure` is set).
    pub receipt_at: DateTime<Utc>,
    /// The carrier's ErrCode for a send its receipt will report failed.
    pub failure: Option<String>,
}

#[derive(Default)]
pub(crate) struct Inner {
    /// The client end of every connection a request came over: how many a client opened.
    pub peers: std::collections::HashSet<std::net::SocketAddr>,
    pub sms: Vec<SmsRecord>,
    pub nonces: HashMap<String, Instant>,
    pub faults: Vec<FaultRule>,
    pub requests: Vec<RecordedRequest>,
    /// Live codes per (phone, scheme).
    pub codes: HashMap<(String, String), Vec<IssuedCode>>,
    /// Send times per phone, for the per-number limit.
    pub sends: HashMap<String, Vec<Instant>>,
    /// The last SendSmsVerifyCode per phone, for Dypnsapi's `Interval`.
    pub last_verify_send: HashMap<String, Instant>,
    pub biz_counter: u64,
    /// Recent call times per action, for the API QPS limit.
    pub calls: HashMap<String, std::collections::VecDeque<Instant>>,
}

/// How long a nonce is remembered: the timestamp window, after which replays fail anyway.
pub(crate) const NONCE_TTL: Duration = Duration::from_secs(16 * 60);

pub struct State {
    pub(crate) inner: Mutex<Inner>,
    /// Bumped on every recorded request, so tests can await one.
    pub(crate) recorded: tokio::sync::watch::Sender<usize>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            recorded: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl State {
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A poisoned lock only means a handler panicked; the data is still usable for a fake.
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Takes the first fault that matches, counting it down.
    pub(crate) fn take_fault(&self, action: &str, phones: &[String]) -> Option<Fault> {
        self.with(|s| {
            let index = s.faults.iter().position(|r| {
                r.action.as_deref().is_none_or(|a| a == action)
                    && r.phone.as_ref().is_none_or(|p| phones.contains(p))
                    && r.times != Some(0)
            })?;
            let rule = &mut s.faults[index];
            let fault = rule.fault.clone();
            if let Some(n) = rule.times.as_mut() {
                *n -= 1;
                if *n == 0 {
                    s.faults.remove(index);
                }
            }
            Some(fault)
        })
    }

    /// Counts a call against the per-action limit; false if this second is full.
    pub(crate) fn admit(&self, action: &str, per_second: u32) -> bool {
        self.with(|s| {
            let now = Instant::now();
            let recent = s.calls.entry(action.to_owned()).or_default();
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                recent.pop_front();
            }
            if recent.len() >= per_second as usize {
                return false;
            }
            recent.push_back(now);
            true
        })
    }

    /// Records a nonce; false if it was seen within the window.
    pub(crate) fn use_nonce(&self, nonce: &str) -> bool {
        self.with(|s| {
            let now = Instant::now();
            if s.nonces.len() > 100_000 {
                s.nonces.retain(|_, t| now.duration_since(*t) < NONCE_TTL);
            }
            s.nonces.insert(nonce.to_owned(), now).is_none()
        })
    }

    pub(crate) fn record(&self, r: RecordedRequest) {
        let n = self.with(|s| {
            s.requests.push(r);
            s.requests.len()
        });
        self.recorded.send_replace(n);
    }
}
