//! The gateway's side of ACS3-HMAC-SHA256: it signs over the headers the *client* listed in
//! `SignedHeaders`, whatever they are, not over the set our own signer chooses. Official SDKs
//! sign `accept`, `user-agent` and more; a verifier that rebuilt the list itself would refuse
//! them while Aliyun accepts them.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::aliyun::sign;

/// The three fields of an `Authorization: ACS3-HMAC-SHA256 …` header.
pub struct Authorization<'a> {
    pub credential: &'a str,
    /// Lower-case header names, in the order the client listed them.
    pub signed_headers: Vec<&'a str>,
    pub signature: &'a str,
}

/// Parses `ACS3-HMAC-SHA256 Credential=…,SignedHeaders=a;b,Signature=…`; the SDKs put no space
/// after the commas, our client does, and Aliyun takes both.
pub fn parse_authorization(value: &str) -> Option<Authorization<'_>> {
    let rest = value.strip_prefix(sign::V3_ALGORITHM)?;
    if !rest.starts_with(' ') {
        return None;
    }
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        match part.trim().split_once('=')? {
            ("Credential", v) => credential = Some(v),
            ("SignedHeaders", v) => signed_headers = Some(v),
            ("Signature", v) => signature = Some(v),
            _ => return None,
        }
    }
    let signed_headers: Vec<&str> = signed_headers?.split(';').collect();
    // Names must be lower-case and listed once: otherwise two clients could sign the same
    // request differently and both be "right".
    let well_formed = signed_headers
        .iter()
        .all(|n| !n.is_empty() && !n.bytes().any(|b| b.is_ascii_uppercase()))
        && signed_headers.windows(2).all(|w| w[0] < w[1]);
    well_formed.then_some(Authorization {
        credential: credential?,
        signed_headers,
        signature: signature?,
    })
}

/// A header that Aliyun requires to be signed whenever it is sent.
pub fn must_be_signed(name: &str) -> bool {
    name == "host" || name == "content-type" || name.starts_with("x-acs-")
}

/// The canonical request over exactly `signed` headers (values trimmed, repeated fields joined
/// with `,`), or the name of a listed header the request does not carry.
pub fn canonical_request<'a>(
    method: &str,
    path: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
    signed: &[&'a str],
    hashed_payload: &str,
) -> Result<String, &'a str> {
    let mut canonical_headers = String::new();
    for &name in signed {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().map(str::trim))
            .collect::<Result<_, _>>()
            .map_err(|_| name)?;
        if values.is_empty() {
            return Err(name);
        }
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(&values.join(","));
        canonical_headers.push('\n');
    }
    let path = if path.is_empty() { "/" } else { path };
    Ok(format!(
        "{method}\n{path}\n{}\n{canonical_headers}\n{}\n{hashed_payload}",
        sign::canonical_query(query),
        signed.join(";"),
    ))
}

/// hex(HMAC-SHA256(secret, "ACS3-HMAC-SHA256\n" + hex(SHA256(canonical request)))).
pub fn signature(secret: &str, canonical_request: &str) -> Option<String> {
    let string_to_sign = format!(
        "{}\n{}",
        sign::V3_ALGORITHM,
        sign::sha256_hex(canonical_request.as_bytes())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(string_to_sign.as_bytes());
    Some(hex::encode(mac.finalize().into_bytes()))
}
