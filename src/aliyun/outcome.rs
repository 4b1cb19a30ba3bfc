//! The one classification table: what the worker does with each answer (or non-answer).
//!
//! Rules, from `shared/aliyun-api.md` §5:
//! - retry only what cannot have executed a send: not connected, or an Aliyun code that says
//!   the request was turned away (`Throttling*`, `ServiceUnavailable`). A 503 or 429 alone
//!   proves nothing: a proxy in front of the API may answer one after it forwarded the call;
//! - never repeat a send (or a check) whose answer was lost (timeout, 5xx, nonce reuse): `unknown`;
//! - per-number flow control is final for the job (`rate_limited`): the code would expire
//!   before the window reopens;
//! - credentials, permissions and account state are `failed` (an operator must act);
//! - every other refusal is permanent: `rejected`.

pub use super::answer::codes;
use super::answer::{Answer, CallError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    RateLimited,
    Rejected,
    Failed,
    /// Safe to try again after a backoff.
    Retry,
    /// The request may have executed; no answer to trust.
    Unknown,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Success => "success",
            Verdict::RateLimited => "rate_limited",
            Verdict::Rejected => "rejected",
            Verdict::Failed => "failed",
            Verdict::Retry => "retry",
            Verdict::Unknown => "unknown",
        }
    }
}

/// Whether repeating the call could cost money or change state twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The sends (a second SMS, billed) and CheckSmsVerifyCode (a PASS consumes the code, so a
    /// repeated check of a right code answers UNKNOWN).
    NotIdempotent,
    /// QuerySendDetails: safe to repeat.
    Idempotent,
}

/// The gateway did not accept the AccessKey, the signature or the STS token (every
/// `InvalidSecurityToken.*` too; see [`is_credentials`]).
const CREDENTIALS: &[&str] = &[
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "InvalidAccessKeyId.NotFound",
    "InvalidAccessKeyId.Inactive",
    "InvalidAccessKeyId",
    "MissingSecurityToken",
];

/// The credentials work, but the account may not make this call or cannot send.
const ACCOUNT: &[&str] = &[
    "Forbidden.RAM",
    "Forbidden.RiskControl",
    "isp.RAM_PERMISSION_DENY",
    "isv.RAM_PERMISSION_DENY",
    "isv.OUT_OF_SERVICE",
    "isv.AMOUNT_NOT_ENOUGH",
    "isv.PRODUCT_UN_SUBSCRIPT",
    "isv.PRODUCT_UNSUBSCRIBE",
    "isv.ACCOUNT_NOT_EXISTS",
    "isv.ACCOUNT_ABNORMAL",
    "FUNCTION_NOT_OPENED",
    "BIZ_NOT_OPEN_STATUS",
    "RESOURCE_NOT_ENOUGH",
];

/// Aliyun's own failures: the request may or may not have executed.
const SERVER_ERROR: &[&str] = &[
    "InternalError",
    "ServiceTimeout",
    "isp.SYSTEM_ERROR",
    "SMS_SYSTEM_ERROR",
];

/// Refused before execution, explicitly temporary.
const TRANSIENT: &[&str] = &[
    "ServiceUnavailable",
    "SENTINEL_BLOCK_EXCEPTION",
    "InvalidTimeStamp.Expired",
];

/// Codes outside the lists above that are common enough to deserve their own metric label.
const WELL_KNOWN: &[&str] = &[
    "OK",
    "Throttling",
    "Throttling.User",
    "Throttling.Api",
    "Throttling.System",
    "SignatureNonceUsed",
    "isv.BUSINESS_LIMIT_CONTROL",
    "isv.DAY_LIMIT_CONTROL",
    "isv.MONTH_LIMIT_CONTROL",
    "BUSINESS_LIMIT_CONTROL",
    "biz.FREQUENCY",
    "FREQUENCY_FAIL",
    "isv.MOBILE_NUMBER_ILLEGAL",
    "MOBILE_NUMBER_ILLEGAL",
    "isv.MOBILE_COUNT_OVER_LIMIT",
    "isv.SMS_SIGNATURE_ILLEGAL",
    "isv.SMS_TEMPLATE_ILLEGAL",
    "isv.TEMPLATE_MISSING_PARAMETERS",
    "isv.INVALID_PARAMETERS",
    "isv.INVALID_JSON_PARAM",
    "isv.PARAM_LENGTH_LIMIT",
    "isv.BLACK_KEY_CONTROL_LIMIT",
    "isv.DENY_IP_RANGE",
    "MissingPhoneNumber",
    "InvalidApi.NotFound",
    codes::NOT_CONNECTED,
    codes::TIMEOUT,
    codes::CONNECTION_BROKEN,
    codes::RESPONSE_TOO_LARGE,
    codes::BAD_RESPONSE,
    codes::NOT_PACED,
];

/// The canonical spelling of a code this module knows, for use as a bounded metric label;
/// `None` for anything else (a new Aliyun code, or garbage from something that is not Aliyun).
pub fn known_code(code: &str) -> Option<&'static str> {
    [CREDENTIALS, ACCOUNT, SERVER_ERROR, TRANSIENT, WELL_KNOWN]
        .into_iter()
        .flatten()
        .find(|known| eq(code, known))
        .copied()
}

/// What a code means, in plain words, for `stats` and the people reading it.
pub fn meaning(code: &str) -> &'static str {
    let upper = code.to_ascii_uppercase();
    match () {
        // Only a `not_verified` check ends with OK and does not succeed.
        _ if upper == "OK" => "the check worked, but the code typed was wrong, expired or used",
        _ if upper.starts_with("THROTTLING") => "Aliyun API flow control (retried with backoff)",
        _ if upper.contains("LIMIT_CONTROL") || upper.contains("FREQUENCY") => {
            "per-number flow control: too many SMS to this number"
        }
        _ if upper.contains("MOBILE_NUMBER_ILLEGAL") => "Aliyun refused the phone number",
        _ if upper.contains("SIGNATURE_ILLEGAL") || upper.contains("SIGN_ILLEGAL") => {
            "signature (sign name) not approved"
        }
        _ if upper.contains("TEMPLATE") => "template not approved or its parameters wrong",
        _ if upper.contains("AMOUNT_NOT_ENOUGH") => "account balance too low",
        _ if upper.contains("RAM_PERMISSION") || upper == "FORBIDDEN.RAM" => {
            "the AccessKey lacks the permission (RAM policy)"
        }
        _ if upper == "SIGNATUREDOESNOTMATCH" => "wrong AccessKey secret (or a signing bug)",
        _ if upper.starts_with("INVALIDACCESSKEYID") => "unknown or disabled AccessKey ID",
        _ if upper == "ALIYUN_TIMEOUT" => "no answer in time; the send may have happened",
        _ if upper == "ALIYUN_UNREACHABLE" => "could not connect to Aliyun",
        _ if upper == "RATE_LIMIT_UNAVAILABLE" => {
            "the fleet's rate-limit schedule (Postgres) did not answer; not sent"
        }
        _ if upper == "WORKER_INTERRUPTED" => "a worker died mid-call; not repeated",
        _ if upper == "NOT_SENT" => "answer lost, and Aliyun confirmed it never sent it",
        _ if upper == "LOCAL_NUMBER_LIMIT" => "refused by the local per-number limit",
        _ if upper == "EXPIRED" => "deadline passed before sending",
        _ if upper == "INVALID_DATA" => "the database refused a value of the job message",
        _ if upper.starts_with("INVALID_")
            || upper == "TOO_LARGE"
            || upper == "MISSING_ID"
            || upper == "ID_TOO_LONG" =>
        {
            "the job message was malformed"
        }
        _ if upper == "INTERNALERROR" || upper.contains("SYSTEM_ERROR") => "Aliyun internal error",
        _ => "see Aliyun's error code reference",
    }
}

fn eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn in_list(code: &str, list: &[&str]) -> bool {
    list.iter().any(|c| eq(code, c))
}

/// Whether Aliyun refused the AccessKey, the signature or the STS token.
pub fn is_credentials(code: &str) -> bool {
    in_list(code, CREDENTIALS)
        || code
            .to_ascii_uppercase()
            .starts_with("INVALIDSECURITYTOKEN")
}

/// Whether the credentials worked but the account may not make the call or cannot send.
pub fn is_account(code: &str) -> bool {
    in_list(code, ACCOUNT)
}

/// The code to raise an account alarm with, if `code` says the account or its credentials are
/// in trouble: its canonical spelling, so the alarm's label comes from a closed set. The only
/// such codes outside the lists are `InvalidSecurityToken.*`, which share one label.
pub fn account_trouble(code: &str) -> Option<&'static str> {
    if is_account(code) || in_list(code, CREDENTIALS) {
        known_code(code)
    } else if is_credentials(code) {
        Some("InvalidSecurityToken")
    } else {
        None
    }
}

/// Maps one call's result to a verdict. The call is `effect`; the answer's HTTP status is
/// informational except where Aliyun gives no code.
pub fn classify(effect: Effect, result: &Result<Answer, CallError>) -> Verdict {
    let maybe_executed = match effect {
        Effect::NotIdempotent => Verdict::Unknown,
        Effect::Idempotent => Verdict::Retry,
    };
    let answer = match result {
        Err(CallError::NotSent(_) | CallError::NotPaced(_)) => return Verdict::Retry,
        Err(CallError::Timeout(_) | CallError::Broken(_) | CallError::TooLarge(_)) => {
            return maybe_executed;
        }
        Ok(answer) => answer,
    };
    let Some(code) = answer.code.as_deref() else {
        return match answer.http_status {
            // A bare 5xx or 429 is what a proxy says, possibly after forwarding the request.
            429 | 500..=599 => maybe_executed,
            400..=499 => Verdict::Failed,
            // 2xx/3xx without an Aliyun body: something answered, but not in a way we can
            // trust for a send.
            _ => maybe_executed,
        };
    };
    let upper = code.to_ascii_uppercase();
    if eq(code, "OK") && (200..300).contains(&answer.http_status) {
        Verdict::Success
    } else if upper.starts_with("THROTTLING") || in_list(code, TRANSIENT) {
        Verdict::Retry
    } else if upper.contains("LIMIT_CONTROL") || upper.contains("FREQUENCY") {
        Verdict::RateLimited
    } else if eq(code, "SignatureNonceUsed") {
        // The same signed bytes already reached Aliyun.
        maybe_executed
    } else if in_list(code, SERVER_ERROR) {
        maybe_executed
    } else if is_credentials(code) || is_account(code) {
        Verdict::Failed
    } else if answer.http_status >= 500 || answer.http_status == 429 {
        maybe_executed
    } else {
        Verdict::Rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn answer(status: u16, code: Option<&str>) -> Result<Answer, CallError> {
        Ok(Answer {
            http_status: status,
            code: code.map(str::to_owned),
            message: None,
            request_id: None,
            body: serde_json::Value::Null,
        })
    }

    use Effect::{Idempotent, NotIdempotent};
    use Verdict::*;

    #[test]
    fn success() {
        assert_eq!(classify(NotIdempotent, &answer(200, Some("OK"))), Success);
    }

    #[test]
    fn retryable_cannot_have_executed() {
        for (status, code) in [
            (400, Some("Throttling.User")),
            (400, Some("Throttling.Api")),
            (400, Some("Throttling")),
            (503, Some("ServiceUnavailable")),
            (503, Some("Throttling")),
            (429, Some("Throttling.User")),
            (200, Some("SENTINEL_BLOCK_EXCEPTION")),
            (400, Some("InvalidTimeStamp.Expired")),
        ] {
            assert_eq!(
                classify(NotIdempotent, &answer(status, code)),
                Retry,
                "{status} {code:?}"
            );
        }
        assert_eq!(
            classify(NotIdempotent, &Err(CallError::NotSent("refused".into()))),
            Retry
        );
    }

    #[test]
    fn per_number_flow_control_is_rate_limited() {
        for code in [
            "isv.BUSINESS_LIMIT_CONTROL",
            "BUSINESS_LIMIT_CONTROL",
            "biz.FREQUENCY",
            "FREQUENCY_FAIL",
            "isv.DAY_LIMIT_CONTROL",
            "isv.month_limit_control",
        ] {
            assert_eq!(
                classify(NotIdempotent, &answer(200, Some(code))),
                RateLimited,
                "{code}"
            );
        }
    }

    #[test]
    fn lost_answers_to_sends_are_unknown_but_retried_for_reads() {
        let lost = [
            Err(CallError::Timeout(Duration::from_secs(1))),
            Err(CallError::Broken("reset".into())),
            Err(CallError::TooLarge(200)),
            answer(500, Some("InternalError")),
            answer(200, Some("isp.SYSTEM_ERROR")),
            answer(400, Some("SignatureNonceUsed")),
            answer(502, None),
            answer(504, Some("GatewayTimeout")),
            answer(200, None),
            // A proxy's 503 or 429 says nothing of whether it forwarded the request first.
            answer(503, None),
            answer(429, None),
            answer(429, Some("SomethingElse")),
            answer(503, Some("UpstreamReset")),
        ];
        for r in &lost {
            assert_eq!(classify(NotIdempotent, r), Unknown, "{r:?}");
            assert_eq!(classify(Idempotent, r), Retry, "{r:?}");
        }
    }

    #[test]
    fn credentials_and_account_state_fail() {
        for (status, code) in [
            (400, "SignatureDoesNotMatch"),
            (404, "InvalidAccessKeyId.NotFound"),
            (400, "InvalidSecurityToken.Expired"),
            (403, "Forbidden.RAM"),
            (200, "isv.AMOUNT_NOT_ENOUGH"),
            (200, "FUNCTION_NOT_OPENED"),
        ] {
            assert_eq!(
                classify(NotIdempotent, &answer(status, Some(code))),
                Failed,
                "{code}"
            );
        }
        assert_eq!(classify(NotIdempotent, &answer(404, None)), Failed);
    }

    #[test]
    fn known_codes_keep_their_spelling_and_others_are_unknown() {
        assert_eq!(known_code("ok"), Some("OK"));
        assert_eq!(known_code("THROTTLING.USER"), Some("Throttling.User"));
        assert_eq!(
            known_code("isv.AMOUNT_NOT_ENOUGH"),
            Some("isv.AMOUNT_NOT_ENOUGH")
        );
        assert_eq!(known_code("ALIYUN_TIMEOUT"), Some("ALIYUN_TIMEOUT"));
        assert_eq!(known_code("isv.SOMETHING_NEW"), None);
        assert_eq!(known_code("<script>"), None);
    }

    #[test]
    fn account_trouble_names_credential_and_account_codes_only() {
        assert_eq!(
            account_trouble("isv.amount_not_enough"),
            Some("isv.AMOUNT_NOT_ENOUGH")
        );
        assert_eq!(
            account_trouble("InvalidAccessKeyId.Inactive"),
            Some("InvalidAccessKeyId.Inactive")
        );
        assert_eq!(
            account_trouble("SignatureDoesNotMatch"),
            Some("SignatureDoesNotMatch")
        );
        assert_eq!(
            account_trouble("InvalidSecurityToken.Expired<b>"),
            Some("InvalidSecurityToken")
        );
        for other in [
            "OK",
            "Throttling.User",
            "isv.MOBILE_NUMBER_ILLEGAL",
            "isv.NEW",
        ] {
            assert_eq!(account_trouble(other), None, "{other}");
        }
    }

    #[test]
    fn other_refusals_are_permanent() {
        for (status, code) in [
            (200, "isv.MOBILE_NUMBER_ILLEGAL"),
            (400, "MOBILE_NUMBER_ILLEGAL"),
            (200, "isv.SMS_SIGNATURE_ILLEGAL"),
            (200, "isv.INVALID_PARAMETERS"),
            (400, "MissingPhoneNumber"),
            (404, "InvalidApi.NotFound"),
        ] {
            assert_eq!(
                classify(NotIdempotent, &answer(status, Some(code))),
                Rejected,
                "{code}"
            );
        }
    }
}
