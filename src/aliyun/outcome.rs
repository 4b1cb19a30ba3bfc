//! The one classification table: what the worker does with each answer (or non-answer).
//!
//! Rules, from `shared/aliyun-api.md` §5:
//! - retry only what cannot have executed a send: not connected, or an Aliyun code that says
//!   the request was turned away (`Throttling*`, `ServiceUnavailable`). A 503 or 429 alone
//!   proves nothing: a proxy in front of the API may answer one after it forwarded the call;
//! - never repeat a send (or a check) whose answer was lost (timeout, 5xx, nonce reuse): `unknown`;
//! - per-number flow control is final for the job (`rate_limited`): the code would expire
//!   before the window reopens;
//! - credentials, permissions and account state are `failed` (an operator must act), and so
//!   are the codes that say the worker itself is misconfigured or wrong (an endpoint of the
//!   other product, a parameter it should have sent): the request the backend made is fine;
//! - a timestamp refused as expired is re-signed and tried once more; a second is clock skew:
//!   `failed`, and an operator must fix the clock;
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

/// The worker's deployment or the worker itself is wrong, not the job: an endpoint that serves
/// the other product, an API version or method it does not take, a parameter the worker should
/// have sent or formatted otherwise. Every job of the action ends the same way until an
/// operator acts, so these are `failed` and raise the alarm. (`Missing<Param>` is matched by
/// prefix: see [`is_deployment`].)
const DEPLOYMENT: &[&str] = &[
    "InvalidApi.NotFound",
    "InvalidVersion",
    "UnsupportedHTTPMethod",
    "InvalidTimeStamp.Format",
];

/// The account's own daily or monthly sending cap, set in Aliyun's console: `rate_limited` for
/// the job, like per-number flow control, but every send fails until an operator raises it.
const ACCOUNT_CAP: &[&str] = &["isv.DAY_LIMIT_CONTROL", "isv.MONTH_LIMIT_CONTROL"];

/// The request's timestamp was more than 15 minutes off Aliyun's clock. Once is a request that
/// waited too long before it left; twice in a row is this machine's clock.
pub const CLOCK_SKEW: &str = "InvalidTimeStamp.Expired";

/// Aliyun's own failures: the request may or may not have executed.
const SERVER_ERROR: &[&str] = &[
    "InternalError",
    "ServiceTimeout",
    "isp.SYSTEM_ERROR",
    "SMS_SYSTEM_ERROR",
];

/// Refused before execution, explicitly temporary.
const TRANSIENT: &[&str] = &["ServiceUnavailable", "SENTINEL_BLOCK_EXCEPTION", CLOCK_SKEW];

/// Codes outside the lists above that are common enough to deserve their own metric label.
const WELL_KNOWN: &[&str] = &[
    "OK",
    "Throttling",
    "Throttling.User",
    "Throttling.Api",
    "Throttling.System",
    "SignatureNonceUsed",
    "isv.BUSINESS_LIMIT_CONTROL",
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
];

/// The canonical spelling of a code this module knows, for use as a bounded metric label;
/// `None` for anything else (a new Aliyun code, or garbage from something that is not Aliyun).
pub fn known_code(code: &str) -> Option<&'static str> {
    [
        CREDENTIALS,
        ACCOUNT,
        DEPLOYMENT,
        ACCOUNT_CAP,
        SERVER_ERROR,
        TRANSIENT,
        WELL_KNOWN,
        codes::ALL,
    ]
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
        _ if in_list(code, ACCOUNT_CAP) => {
            "the account's daily or monthly sending cap (Aliyun console) is reached"
        }
        _ if eq(code, CLOCK_SKEW) => "this machine's clock is more than 15 minutes off",
        _ if is_deployment(code) => {
            "the worker's endpoint or version is wrong for this action, or a worker bug"
        }
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
        _ if upper == "WORKER_INTERRUPTED" => {
            "a worker stopped mid-call (killed, or its shutdown grace ran out); not repeated"
        }
        _ if upper == "ABANDONED" => "its worker stopped before calling Aliyun; not sent",
        _ if upper == "ALIYUN_CONNECTION_BROKEN" => {
            "the connection broke before Aliyun's answer was read; the send may have happened"
        }
        _ if upper == "ALIYUN_RESPONSE_TOO_LARGE" => {
            "the answer was too large to be Aliyun's; the send may have happened"
        }
        _ if upper == "ALIYUN_BAD_RESPONSE" => {
            "an answer that is not Aliyun's (no code, or not JSON); the send may have happened"
        }
        _ if upper == "COUNTRY_NOT_ALLOWED" => {
            "the number's country is not in SMS_ALLOWED_COUNTRY_CODES; not sent"
        }
        _ if upper == "DAILY_LIMIT" => {
            "the fleet's daily SMS budget (or one number range's) is spent; not sent"
        }
        _ if upper == "CHECK_LIMIT" => "too many checks for this number; not checked",
        _ if upper == "UNKNOWN_TYPE" => "the job message was malformed (no such job type)",
        _ if upper == "NOT_SENT" => "answer lost, and Aliyun confirmed it never sent it",
        _ if upper == "NOT_RECONCILED" => {
            "answer lost, and Aliyun could not say within 30 days whether it sent it"
        }
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

/// Whether Aliyun says the worker's deployment or the worker itself is wrong (see
/// [`DEPLOYMENT`]).
pub fn is_deployment(code: &str) -> bool {
    in_list(code, DEPLOYMENT) || is_missing_parameter(code)
}

fn is_missing_parameter(code: &str) -> bool {
    code.len() > "Missing".len()
        && code.is_char_boundary("Missing".len())
        && eq(&code[.."Missing".len()], "Missing")
}

/// The code to raise an account alarm with, if `code` says the account, its credentials, its
/// sending cap, the worker's deployment or this machine's clock is in trouble: its canonical
/// spelling, so the alarm's label comes from a closed set. The only such codes outside the
/// lists are `InvalidSecurityToken.*` and `Missing<Param>`, which share one label each.
pub fn account_trouble(code: &str) -> Option<&'static str> {
    if is_account(code)
        || in_list(code, CREDENTIALS)
        || in_list(code, DEPLOYMENT)
        || in_list(code, ACCOUNT_CAP)
        || eq(code, CLOCK_SKEW)
    {
        known_code(code)
    } else if is_credentials(code) {
        Some("InvalidSecurityToken")
    } else if is_missing_parameter(code) {
        Some("MissingParameter")
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
    } else if is_credentials(code) || is_account(code) || is_deployment(code) {
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
            (200, "isv.SOMETHING_NEW"),
        ] {
            assert_eq!(
                classify(NotIdempotent, &answer(status, Some(code))),
                Rejected,
                "{code}"
            );
        }
    }

    /// The backend's request is fine when Aliyun says the worker's endpoint, version or own
    /// parameters are wrong: `rejected` would tell it to fix a request it cannot fix.
    #[test]
    fn a_wrong_deployment_or_a_worker_bug_fails_and_raises_the_alarm() {
        for (status, code, label) in [
            (404, "InvalidApi.NotFound", "InvalidApi.NotFound"),
            (400, "InvalidVersion", "InvalidVersion"),
            (400, "UnsupportedHTTPMethod", "UnsupportedHTTPMethod"),
            (400, "InvalidTimeStamp.Format", "InvalidTimeStamp.Format"),
            (400, "MissingPhoneNumber", "MissingParameter"),
            (400, "MissingTemplateCode", "MissingParameter"),
        ] {
            assert_eq!(
                classify(NotIdempotent, &answer(status, Some(code))),
                Failed,
                "{code}"
            );
            assert_eq!(account_trouble(code), Some(label), "{code}");
            assert_ne!(meaning(code), meaning("isv.SOMETHING_NEW"), "{code}");
        }
        // Not a parameter's name, and not the credentials' code.
        assert_eq!(account_trouble("Missing"), None);
        assert_eq!(
            account_trouble("MissingSecurityToken"),
            Some("MissingSecurityToken")
        );
    }

    /// The account's own cap ends the job like per-number flow control, but only an operator can
    /// lift it, so it raises the alarm and says what it is.
    #[test]
    fn the_accounts_daily_or_monthly_cap_is_rate_limited_and_raises_the_alarm() {
        for code in ["isv.DAY_LIMIT_CONTROL", "isv.month_limit_control"] {
            assert_eq!(
                classify(NotIdempotent, &answer(200, Some(code))),
                RateLimited
            );
            assert!(account_trouble(code).is_some(), "{code}");
            assert!(meaning(code).contains("account"), "{}", meaning(code));
        }
        assert_eq!(account_trouble("isv.BUSINESS_LIMIT_CONTROL"), None);
        assert!(meaning("isv.BUSINESS_LIMIT_CONTROL").contains("per-number"));
    }

    #[test]
    fn an_expired_timestamp_is_retried_and_raises_the_clock_alarm() {
        assert_eq!(
            classify(NotIdempotent, &answer(400, Some(CLOCK_SKEW))),
            Retry
        );
        assert_eq!(account_trouble(CLOCK_SKEW), Some(CLOCK_SKEW));
        assert!(meaning(CLOCK_SKEW).contains("clock"));
    }

    /// Aliyun's reference has none of the worker's own codes: each says what it is.
    #[test]
    fn the_workers_own_codes_have_their_own_meaning() {
        let aliyuns = meaning("isv.SOMETHING_NEW");
        for code in codes::ALL.iter().copied().chain([
            "WORKER_INTERRUPTED",
            "ABANDONED",
            "NOT_SENT",
            "NOT_RECONCILED",
            "LOCAL_NUMBER_LIMIT",
            "COUNTRY_NOT_ALLOWED",
            "DAILY_LIMIT",
            "CHECK_LIMIT",
            "EXPIRED",
            "INVALID_DATA",
            "INVALID_JSON",
            "INVALID_FIELD",
            "INVALID_PROPERTY",
            "INVALID_UTF8",
            "TOO_LARGE",
            "MISSING_ID",
            "ID_TOO_LONG",
            "UNKNOWN_TYPE",
        ]) {
            assert_ne!(meaning(code), aliyuns, "{code}");
        }
    }
}
