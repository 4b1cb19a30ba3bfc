//! The gateway's checks, in Aliyun's order: parameters present, key known, timestamp fresh,
//! signature right, nonce unused. Each failure is answered the way Aliyun answers it.

use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, NaiveDateTime, Utc};

use super::GatewayError;
use super::state::State;
use super::v3;
use crate::aliyun::sign;

const MAX_SKEW_SECS: i64 = 15 * 60;

/// The credentials the fake accepts.
#[derive(Clone)]
pub struct Keys {
    pub access_key_id: String,
    pub access_key_secret: String,
}

/// What a verified request asks for.
pub struct Authorised {
    pub action: String,
    /// API parameters (common ones removed for V1; the query for V3).
    pub params: Vec<(String, String)>,
}

fn err(status: StatusCode, code: &str, message: impl Into<String>) -> GatewayError {
    GatewayError {
        status,
        code: code.to_owned(),
        message: message.into(),
    }
}

fn get<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn check_timestamp(raw: &str) -> Result<(), GatewayError> {
    let parsed = NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%SZ").map_err(|_| {
        err(
            StatusCode::BAD_REQUEST,
            "InvalidTimeStamp.Format",
            "Specified time stamp or date value is not well formatted.",
        )
    })?;
    let at: DateTime<Utc> = parsed.and_utc();
    if (Utc::now() - at).num_seconds().abs() > MAX_SKEW_SECS {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "InvalidTimeStamp.Expired",
            "Specified time stamp or date value is expired.",
        ));
    }
    Ok(())
}

fn check_key(keys: &Keys, id: &str) -> Result<(), GatewayError> {
    if id != keys.access_key_id {
        return Err(err(
            StatusCode::NOT_FOUND,
            "InvalidAccessKeyId.NotFound",
            "Specified access key is not found.",
        ));
    }
    Ok(())
}

fn check_nonce(state: &State, nonce: &str) -> Result<(), GatewayError> {
    if !state.use_nonce(nonce) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "SignatureNonceUsed",
            "Specified signature nonce was used already.",
        ));
    }
    Ok(())
}

/// RPC signature V1 (HMAC-SHA1), all parameters in query and form body.
pub fn verify_v1(
    keys: &Keys,
    state: &State,
    method: &str,
    params: Vec<(String, String)>,
) -> Result<Authorised, GatewayError> {
    for name in [
        "AccessKeyId",
        "Action",
        "SignatureMethod",
        "SignatureNonce",
        "SignatureVersion",
        "Timestamp",
        "Version",
        "Signature",
    ] {
        if get(&params, name).is_none() {
            return Err(err(
                StatusCode::BAD_REQUEST,
                &format!("Missing{name}"),
                format!("{name} is mandatory for this action."),
            ));
        }
    }
    let p = |n| get(&params, n).unwrap_or_default();
    if p("SignatureMethod") != "HMAC-SHA1" || p("SignatureVersion") != "1.0" {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "IncompleteSignature",
            "The request signature does not conform to Aliyun standards.",
        ));
    }
    if p("Version") != crate::aliyun::client::API_VERSION {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "InvalidVersion",
            "Specified parameter Version is not valid.",
        ));
    }
    check_key(keys, p("AccessKeyId"))?;
    check_timestamp(p("Timestamp"))?;
    let string_to_sign = sign::v1_string_to_sign(method, &params);
    let expected = sign::v1_signature(&keys.access_key_secret, &string_to_sign);
    if p("Signature") != expected {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "SignatureDoesNotMatch",
            format!(
                "Specified signature is not matched with our calculation. server string to sign is:{string_to_sign}"
            ),
        ));
    }
    check_nonce(state, p("SignatureNonce"))?;
    let action = p("Action").to_owned();
    const COMMON: &[&str] = &[
        "AccessKeyId",
        "Action",
        "Format",
        "SignatureMethod",
        "SignatureNonce",
        "SignatureVersion",
        "Timestamp",
        "Version",
        "Signature",
        "SecurityToken",
        "RegionId",
        "SignatureType",
    ];
    let params = params
        .into_iter()
        .filter(|(k, _)| !COMMON.contains(&k.as_str()))
        .collect();
    Ok(Authorised { action, params })
}

/// Signature V3 (ACS3-HMAC-SHA256): `Authorization` header over the headers the client lists.
pub fn verify_v3(
    keys: &Keys,
    state: &State,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    query: Vec<(String, String)>,
    body: &[u8],
) -> Result<Authorised, GatewayError> {
    let incomplete = || {
        err(
            StatusCode::BAD_REQUEST,
            "IncompleteSignature",
            "The request signature does not conform to Aliyun standards.",
        )
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let authorization = header("authorization")
        .and_then(v3::parse_authorization)
        .ok_or_else(incomplete)?;
    // An unsigned `x-acs-*` or `host` could be changed in flight without breaking the signature.
    let unsigned = headers
        .keys()
        .map(|name| name.as_str())
        .find(|name| v3::must_be_signed(name) && !authorization.signed_headers.contains(name));
    if let Some(name) = unsigned {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "IncompleteSignature",
            format!(
                "The request signature does not conform to Aliyun standards. Header {name} must be signed."
            ),
        ));
    }
    check_key(keys, authorization.credential)?;
    let action = header("x-acs-action").ok_or_else(incomplete)?.to_owned();
    let date = header("x-acs-date").ok_or_else(incomplete)?;
    let nonce = header("x-acs-signature-nonce").ok_or_else(incomplete)?;
    let hashed_payload = sign::sha256_hex(body);
    if header("x-acs-content-sha256") != Some(hashed_payload.as_str()) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "SignatureDoesNotMatch",
            "x-acs-content-sha256 does not match the body",
        ));
    }
    check_timestamp(date)?;
    let canonical_request = v3::canonical_request(
        method,
        path,
        &query,
        headers,
        &authorization.signed_headers,
        &hashed_payload,
    )
    .map_err(|name| {
        err(
            StatusCode::BAD_REQUEST,
            "IncompleteSignature",
            format!("The request signature does not conform to Aliyun standards. Signed header {name} is missing."),
        )
    })?;
    let expected = v3::signature(&keys.access_key_secret, &canonical_request).ok_or_else(|| {
        err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "The request processing has failed due to some unknown error, exception or failure.",
        )
    })?;
    if expected != authorization.signature {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "SignatureDoesNotMatch",
            format!(
                "Specified signature is not matched with our calculation. server canonical request is:{canonical_request}"
            ),
        ));
    }
    check_nonce(state, nonce)?;
    Ok(Authorised {
        action,
        params: query,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHONE: &str = "13912345678";
    const CODE: &str = "987654";

    fn keys() -> Keys {
        Keys {
            access_key_id: "id".into(),
            access_key_secret: "the-fakes-secret".into(),
        }
    }

    fn now() -> String {
        Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
    }

    /// The worker's redaction is only tested if the fake echoes the request as Aliyun does.
    fn assert_echoes_the_request(e: &GatewayError, echo_starts: &str) {
        assert_eq!(e.code, "SignatureDoesNotMatch");
        assert!(e.message.contains(echo_starts), "{}", e.message);
        for value in [PHONE, CODE] {
            assert!(
                e.message.contains(value),
                "{value} not echoed: {}",
                e.message
            );
        }
    }

    #[test]
    fn a_v1_signature_mismatch_echoes_the_string_to_sign() {
        let mut params: Vec<(String, String)> = [
            ("AccessKeyId", "id"),
            ("Action", "CheckSmsVerifyCode"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "n1"),
            ("SignatureVersion", "1.0"),
            ("Version", crate::aliyun::client::API_VERSION),
            ("PhoneNumber", PHONE),
            ("VerifyCode", CODE),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        params.push(("Timestamp".into(), now()));
        let sts = sign::v1_string_to_sign("POST", &params);
        params.push(("Signature".into(), sign::v1_signature("wrong", &sts)));
        let Err(e) = verify_v1(&keys(), &State::default(), "POST", params) else {
            panic!("a wrong secret was accepted");
        };
        assert_echoes_the_request(&e, "server string to sign is:POST&%2F&");
    }

    #[test]
    fn a_v3_signature_mismatch_echoes_the_canonical_request() {
        let query = vec![
            ("PhoneNumber".to_owned(), PHONE.to_owned()),
            ("VerifyCode".to_owned(), CODE.to_owned()),
        ];
        let signed = vec![
            ("host".to_owned(), "localhost".to_owned()),
            ("x-acs-action".to_owned(), "CheckSmsVerifyCode".to_owned()),
            ("x-acs-content-sha256".to_owned(), sign::sha256_hex(b"")),
            ("x-acs-date".to_owned(), now()),
            ("x-acs-signature-nonce".to_owned(), "n1".to_owned()),
            ("x-acs-version".to_owned(), "2017-05-25".to_owned()),
        ];
        let (authorization, _) = sign::v3_authorization(
            &sign::V3Request {
                method: "POST",
                pathname: "/",
                query: &query,
                headers: &signed,
                body: b"",
            },
            "id",
            "wrong",
        );
        let mut headers = HeaderMap::new();
        for (name, value) in signed
            .iter()
            .chain([&("authorization".into(), authorization)])
        {
            headers.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let Err(e) = verify_v3(
            &keys(),
            &State::default(),
            "POST",
            "/",
            &headers,
            query,
            b"",
        ) else {
            panic!("a wrong secret was accepted");
        };
        assert_echoes_the_request(&e, "server canonical request is:POST\n/\n");
    }
}
