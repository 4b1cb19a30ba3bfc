//! Aliyun request signing: RPC signature V1 (HMAC-SHA1) and V3 (`ACS3-HMAC-SHA256`).
//!
//! Everything here is a pure function of its inputs (no clock, no nonce, no I/O) so that the
//! worker, the fake Aliyun server and the tests all share one implementation, and so that the
//! official vectors in `tests/fixtures/aliyun-vectors.json` (computed by Aliyun's own SDK code)
//! pin it down byte for byte. Spec: `shared/aliyun-api.md` §1 (V1) and §2 (V3).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

type HmacSha1 = Hmac<Sha1>;
type HmacSha256 = Hmac<Sha256>;

/// RFC 3986 percent-encoding as Aliyun wants it: only A-Za-z0-9-_.~ literal, everything else %XX upper-case over UTF-8 bytes.
///
/// Aliyun re-canonicalises what it receives with exactly this rule, so any deviation (a `+`
/// for space, `*` or `!'()` left literal, `~` as `%7E`, lower-case hex) breaks the signature.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    percent_encode_into(&mut out, s);
    out
}

/// [`percent_encode`], appended to `out`: a query is encoded into one buffer, pair by pair.
fn percent_encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0F)]));
        }
    }
}

/// Inverse, used by the fake server to read a canonical query; returns None on bad escapes or invalid UTF-8. '+' is decoded as space only if `plus_as_space` is true.
///
/// Strict on purpose: a malformed escape means the client under test encoded something wrongly,
/// and the fake server must notice rather than guess. `plus_as_space` exists because form bodies
/// (and the official SDK's query strings) use `+` for space, while a canonical query never does.
pub fn percent_decode(s: &str, plus_as_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = hex_value(*bytes.get(i + 1)?)?;
                let lo = hex_value(*bytes.get(i + 2)?)?;
                out.push((hi << 4) | lo);
                i += 3;
            }
            b'+' if plus_as_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// name=value pairs sorted by name (byte order), each side percent_encode'd, joined by '&'. Signature param must already be excluded by the caller.
///
/// Sorting is by the raw (unencoded) name, as the official SDKs do; the sort is stable, so
/// repeated names keep the caller's order and the result stays deterministic. Empty values are
/// kept (`OutId=`) because Aliyun signs them too.
pub fn canonical_query<K: AsRef<str>, V: AsRef<str>>(params: &[(K, V)]) -> String {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(name, value)| (name.as_ref(), value.as_ref()))
        .collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = String::with_capacity(sorted.iter().map(|(n, v)| n.len() + v.len() + 2).sum());
    for (i, (name, value)) in sorted.into_iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        percent_encode_into(&mut out, name);
        out.push('=');
        percent_encode_into(&mut out, value);
    }
    out
}

/// METHOD&%2F&pct(canonical_query(params)), skipping any param named "Signature".
///
/// `Signature` is skipped here (not left to callers) so that the fake server can verify a
/// request by handing over every parameter it received. The method is used verbatim because it
/// is part of what Aliyun signs: a POST signed as GET is rejected.
pub fn v1_string_to_sign<K: AsRef<str>, V: AsRef<str>>(method: &str, params: &[(K, V)]) -> String {
    v1_string_to_sign_of(method, &canonical_query(&unsigned(params)))
}

/// `params` without `Signature`, borrowed.
fn unsigned<K: AsRef<str>, V: AsRef<str>>(params: &[(K, V)]) -> Vec<(&str, &str)> {
    params
        .iter()
        .map(|(name, value)| (name.as_ref(), value.as_ref()))
        .filter(|(name, _)| *name != "Signature")
        .collect()
}

/// The string to sign of a canonical query already made.
fn v1_string_to_sign_of(method: &str, canonical: &str) -> String {
    let mut out = String::with_capacity(method.len() + 5 + canonical.len() * 3 / 2);
    out.push_str(method);
    out.push('&');
    percent_encode_into(&mut out, "/");
    out.push('&');
    percent_encode_into(&mut out, canonical);
    out
}

/// The query a V1 request goes out with: the canonical query of `query` and, last, the
/// `Signature` of `query` and `form` together (body parameters are signed with the query's).
///
/// Aliyun sorts what it receives before checking it (its own SDK sends `Signature` last), so
/// without a body the canonical query made for signing is the one that goes on the wire,
/// encoded once: byte for byte what was signed.
pub fn v1_signed_query<K: AsRef<str>, V: AsRef<str>>(
    method: &str,
    secret: &str,
    query: &[(K, V)],
    form: &[(K, V)],
) -> String {
    let query = unsigned(query);
    let mut out = canonical_query(&query);
    let string_to_sign = if form.is_empty() {
        v1_string_to_sign_of(method, &out)
    } else {
        let mut all = query;
        all.extend(unsigned(form));
        v1_string_to_sign_of(method, &canonical_query(&all))
    };
    out.push_str("&Signature=");
    percent_encode_into(&mut out, &v1_signature(secret, &string_to_sign));
    out
}

/// Base64(HMAC-SHA1(secret + "&", string_to_sign))
///
/// The trailing `&` on the key is not a typo: V1 reserves room for a token secret after it and
/// Aliyun keeps the separator even when there is none.
pub fn v1_signature(secret: &str, string_to_sign: &str) -> String {
    let key = format!("{secret}&");
    let mut mac = hmac_sha1(key.as_bytes());
    mac.update(string_to_sign.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Parse a V1 string-to-sign back into (name, value) pairs, for the log line that compares Aliyun's string-to-sign with ours on SignatureDoesNotMatch. None if it is not of that shape.
///
/// Diffing parameters one by one shows *which* value Aliyun saw differently, which a diff of two
/// doubly-encoded strings hides. The shape is `METHOD&%2F&<pct(canonical query)>`; anything
/// else (e.g. a truncated error message) yields None rather than a misleading partial list.
pub fn v1_params_from_string_to_sign(sts: &str) -> Option<(String, Vec<(String, String)>)> {
    let mut parts = sts.splitn(3, '&');
    let method = parts.next()?;
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    if parts.next()? != percent_encode("/") {
        return None;
    }
    let query = percent_decode(parts.next()?, false)?;
    let mut params = Vec::new();
    if !query.is_empty() {
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=')?;
            params.push((percent_decode(name, false)?, percent_decode(value, false)?));
        }
    }
    Some((method.to_owned(), params))
}

pub const V3_ALGORITHM: &str = "ACS3-HMAC-SHA256";

/// hex SHA-256, lower case
///
/// V3 needs it twice: for `x-acs-content-sha256` (the body) and for the canonical request.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The parts of an HTTP request that V3 signs. Borrowed so that the caller can sign exactly the
/// values it is about to put on the wire, without copying them.
pub struct V3Request<'a> {
    pub method: &'a str,
    pub pathname: &'a str,
    pub query: &'a [(String, String)],
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// Returns (authorization header value, canonical request) — canonical request returned for diagnostics. Headers signed: all given headers whose lower-cased name is `host`, `content-type`, or starts with `x-acs-` (lower-cased names, trimmed values, sorted). CanonicalQuery: sorted, percent_encode'd, empty value written as `name=`.
///
/// Only those headers are signed because they are the ones Aliyun requires to be signed;
/// signing e.g. `user-agent` too would let any proxy that rewrites it break the request. The
/// hashed payload is computed from `body` rather than read from `x-acs-content-sha256`, so a
/// stale header shows up as a signature mismatch instead of being silently trusted. Headers
/// given twice under one name are joined with `,` (how HTTP combines repeated fields), keeping
/// `SignedHeaders` free of duplicates. An empty pathname is signed as `/`.
pub fn v3_authorization(
    req: &V3Request<'_>,
    access_key_id: &str,
    secret: &str,
) -> (String, String) {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .filter(|(name, _)| name == "host" || name == "content-type" || name.starts_with("x-acs-"))
        .collect();
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let mut merged: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        match merged.last_mut() {
            Some((last_name, last_value)) if *last_name == name => {
                last_value.push(',');
                last_value.push_str(&value);
            }
            _ => merged.push((name, value)),
        }
    }

    let canonical_headers: String = merged
        .iter()
        .map(|(name, value)| format!("{name}:{value}\n"))
        .collect();
    let signed_headers = merged
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let pathname = if req.pathname.is_empty() {
        "/"
    } else {
        req.pathname
    };
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        pathname,
        canonical_query(req.query),
        canonical_headers,
        signed_headers,
        sha256_hex(req.body)
    );

    let string_to_sign = format!(
        "{V3_ALGORITHM}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let mut mac = hmac_sha256(secret.as_bytes());
    mac.update(string_to_sign.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());

    let authorization = format!(
        "{V3_ALGORITHM} Credential={access_key_id},SignedHeaders={signed_headers},Signature={signature}"
    );
    (authorization, canonical_request)
}

// HMAC accepts keys of any length, but the `hmac` crate only offers that through a fallible
// constructor. Building the key block ourselves (hash if longer than a block, zero-pad, exactly
// as RFC 2104 does) keeps these paths free of panics; a test checks equivalence with the
// crate's own constructor for short and long keys.
fn hmac_sha1(key: &[u8]) -> HmacSha1 {
    let mut block = Key::<HmacSha1>::default();
    if key.len() > block.len() {
        copy_prefix(&mut block, &Sha1::digest(key));
    } else {
        copy_prefix(&mut block, key);
    }
    <HmacSha1 as KeyInit>::new(&block)
}

fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    let mut block = Key::<HmacSha256>::default();
    if key.len() > block.len() {
        copy_prefix(&mut block, &Sha256::digest(key));
    } else {
        copy_prefix(&mut block, key);
    }
    <HmacSha256 as KeyInit>::new(&block)
}

fn copy_prefix(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    type Pairs = Vec<(String, String)>;

    const VECTORS: &str = include_str!("../../tests/fixtures/aliyun-vectors.json");

    fn vectors() -> Value {
        serde_json::from_str(VECTORS).expect("aliyun-vectors.json is valid JSON")
    }

    fn array<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("vectors: `{key}` is not an array"))
    }

    fn s<'a>(v: &'a Value, key: &str) -> &'a str {
        v[key]
            .as_str()
            .unwrap_or_else(|| panic!("vector {}: `{key}` is not a string", v["name"]))
    }

    fn pairs(v: &Value, key: &str) -> Pairs {
        v[key]
            .as_object()
            .unwrap_or_else(|| panic!("vector {}: `{key}` is not an object", v["name"]))
            .iter()
            .map(|(k, val)| {
                let val = val
                    .as_str()
                    .unwrap_or_else(|| panic!("vector {}: {key}.{k} not a string", v["name"]));
                (k.clone(), val.to_owned())
            })
            .collect()
    }

    fn v1_vectors() -> Vec<Value> {
        let all = vectors();
        let mut out = array(&all, "v1_published").clone();
        out.extend(array(&all, "v1_edge").iter().cloned());
        out
    }

    #[test]
    fn v1_vectors_reproduce_string_to_sign_and_signature() {
        let vs = v1_vectors();
        assert!(
            vs.len() >= 11,
            "expected at least 11 V1 vectors, got {}",
            vs.len()
        );
        for v in &vs {
            let name = s(v, "name");
            let params = pairs(v, "params");
            let sts = v1_string_to_sign(s(v, "method"), &params);
            assert_eq!(
                sts,
                s(v, "string_to_sign"),
                "string_to_sign of vector {name:?}"
            );
            assert_eq!(
                v1_signature(s(v, "secret"), &sts),
                s(v, "signature"),
                "signature of vector {name:?}"
            );
        }
    }

    #[test]
    fn v1_signed_query_is_the_canonical_query_with_the_vectors_signature_last() {
        for v in &v1_vectors() {
            let name = s(v, "name");
            let params = pairs(v, "params");
            let signed = v1_signed_query(s(v, "method"), s(v, "secret"), &params, &[]);
            let expected = format!(
                "{}&Signature={}",
                canonical_query(&params),
                percent_encode(s(v, "signature"))
            );
            assert_eq!(signed, expected, "vector {name:?}");
            // Body parameters are signed but stay out of the URL.
            let (query, form) = params.split_at(params.len() / 2);
            let split = v1_signed_query(s(v, "method"), s(v, "secret"), query, form);
            let expected = format!(
                "{}&Signature={}",
                canonical_query(query),
                percent_encode(s(v, "signature"))
            );
            assert_eq!(split, expected, "vector {name:?}, half of it in a body");
        }
    }

    #[test]
    fn v1_string_to_sign_ignores_param_order_and_signature_param() {
        for v in &v1_vectors() {
            let name = s(v, "name");
            let mut params = pairs(v, "params");
            params.reverse();
            params.insert(1, ("Signature".to_owned(), s(v, "signature").to_owned()));
            assert_eq!(
                v1_string_to_sign(s(v, "method"), &params),
                s(v, "string_to_sign"),
                "vector {name:?} with Signature param and reversed order"
            );
        }
    }

    #[test]
    fn v3_vector_reproduces_authorization() {
        let all = vectors();
        let vs = array(&all, "v3_published");
        assert!(!vs.is_empty(), "no V3 vectors");
        for v in vs {
            let name = s(v, "name");
            let query = pairs(v, "query");
            let headers = pairs(v, "headers");
            let req = V3Request {
                method: s(v, "method"),
                pathname: s(v, "pathname"),
                query: &query,
                headers: &headers,
                body: s(v, "body").as_bytes(),
            };
            let (auth, canonical) = v3_authorization(&req, s(v, "access_key_id"), s(v, "secret"));
            assert_eq!(
                auth,
                s(v, "authorization"),
                "authorization of vector {name:?}"
            );
            assert!(
                canonical.starts_with(&format!("{}\n/\n", s(v, "method"))),
                "canonical request of vector {name:?}: {canonical}"
            );
        }
    }

    fn v3_doc_request() -> (Pairs, Pairs) {
        let all = vectors();
        let v = &array(&all, "v3_published")[0];
        (pairs(v, "query"), pairs(v, "headers"))
    }

    #[test]
    fn v3_ignores_unsigned_headers_and_normalises_names_and_values() {
        let (query, headers) = v3_doc_request();
        let plain = V3Request {
            method: "POST",
            pathname: "/",
            query: &query,
            headers: &headers,
            body: b"",
        };
        let (expected, _) = v3_authorization(&plain, "YourAccessKeyId", "YourAccessKeySecret");

        let mut noisy: Vec<(String, String)> = headers
            .iter()
            .rev()
            .map(|(n, v)| (n.to_ascii_uppercase(), format!("  {v}\t")))
            .collect();
        noisy.push(("User-Agent".to_owned(), "worker/1".to_owned()));
        noisy.push(("accept".to_owned(), "application/json".to_owned()));
        let req = V3Request {
            headers: &noisy,
            ..plain
        };
        let (auth, canonical) = v3_authorization(&req, "YourAccessKeyId", "YourAccessKeySecret");
        assert_eq!(auth, expected);
        assert!(!canonical.contains("user-agent") && !canonical.contains("accept"));
    }

    #[test]
    fn v3_signs_content_type_and_empty_query_values() {
        let query = vec![
            ("b".to_owned(), String::new()),
            ("a".to_owned(), "x y".to_owned()),
        ];
        let headers = vec![
            (
                "Content-Type".to_owned(),
                "application/x-www-form-urlencoded".to_owned(),
            ),
            ("host".to_owned(), "dysmsapi.aliyuncs.com".to_owned()),
        ];
        let body = b"PhoneNumberJson=%5B%5D";
        let req = V3Request {
            method: "POST",
            pathname: "",
            query: &query,
            headers: &headers,
            body,
        };
        let (auth, canonical) = v3_authorization(&req, "ak", "sk");
        assert_eq!(
            canonical,
            format!(
                "POST\n/\na=x%20y&b=\ncontent-type:application/x-www-form-urlencoded\nhost:dysmsapi.aliyuncs.com\n\ncontent-type;host\n{}",
                sha256_hex(body)
            )
        );
        assert!(auth.starts_with(
            "ACS3-HMAC-SHA256 Credential=ak,SignedHeaders=content-type;host,Signature="
        ));
    }

    #[test]
    fn sha256_hex_of_empty_body() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn percent_encode_reserved_ascii() {
        assert_eq!(
            percent_encode(" *~+/=&%'()!"),
            "%20%2A~%2B%2F%3D%26%25%27%28%29%21"
        );
        assert_eq!(percent_encode("AZaz09-_.~"), "AZaz09-_.~");
        assert_eq!(percent_encode("a\nb:c"), "a%0Ab%3Ac");
    }

    #[test]
    fn percent_encode_cjk_and_emoji() {
        assert_eq!(percent_encode("阿里云"), "%E9%98%BF%E9%87%8C%E4%BA%91");
        assert_eq!(percent_encode("😀"), "%F0%9F%98%80");
        assert_eq!(percent_encode("job-🙂-01"), "job-%F0%9F%99%82-01");
    }

    #[test]
    fn percent_decode_round_trips() {
        for original in [
            "",
            "plain",
            " *~+/=&%'()!",
            "阿里云短信测试专用",
            "第一行\n😀",
            "{\"code\":\"##code##\",\"min\":\"5\"}",
            "CAIS+/=token~with*chars",
        ] {
            for plus in [false, true] {
                assert_eq!(
                    percent_decode(&percent_encode(original), plus).as_deref(),
                    Some(original),
                    "round trip of {original:?} (plus_as_space={plus})"
                );
            }
        }
    }

    #[test]
    fn percent_decode_plus_and_case() {
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(percent_decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(percent_decode("%2b%2B", true).as_deref(), Some("++"));
        assert_eq!(percent_decode("%e9%98%bf", false).as_deref(), Some("阿"));
    }

    #[test]
    fn percent_decode_rejects_bad_input() {
        assert_eq!(percent_decode("%zz", false), None);
        assert_eq!(percent_decode("%FF", false), None);
        assert_eq!(percent_decode("%E9%98", false), None); // truncated UTF-8 sequence
        assert_eq!(percent_decode("abc%", false), None);
        assert_eq!(percent_decode("abc%4", false), None);
    }

    #[test]
    fn canonical_query_sorts_by_byte_order_and_keeps_empty_values() {
        let params = vec![
            ("Timestamp".to_owned(), "t".to_owned()),
            ("TimeStamp".to_owned(), "T".to_owned()),
            ("OutId".to_owned(), String::new()),
            ("SignatureVersion".to_owned(), "1.0".to_owned()),
        ];
        assert_eq!(
            canonical_query(&params),
            "OutId=&SignatureVersion=1.0&TimeStamp=T&Timestamp=t"
        );
        assert_eq!(canonical_query::<&str, &str>(&[]), "");
    }

    #[test]
    fn v1_params_from_string_to_sign_round_trips_vectors() {
        for v in &v1_vectors() {
            let name = s(v, "name");
            let (method, mut parsed) = v1_params_from_string_to_sign(s(v, "string_to_sign"))
                .unwrap_or_else(|| panic!("vector {name:?} did not parse"));
            let mut expected = pairs(v, "params");
            parsed.sort();
            expected.sort();
            assert_eq!(method, s(v, "method"), "method of vector {name:?}");
            assert_eq!(parsed, expected, "params of vector {name:?}");
        }
    }

    #[test]
    fn v1_params_from_string_to_sign_rejects_other_shapes() {
        assert_eq!(v1_params_from_string_to_sign(""), None);
        assert_eq!(v1_params_from_string_to_sign("GET"), None);
        assert_eq!(v1_params_from_string_to_sign("GET&/&a%3Db"), None);
        assert_eq!(v1_params_from_string_to_sign("GET&%2F&a%3D%zz"), None);
        assert_eq!(v1_params_from_string_to_sign("GET&%2F&novalue"), None);
        assert_eq!(
            v1_params_from_string_to_sign("POST&%2F&"),
            Some(("POST".to_owned(), Vec::new()))
        );
    }

    #[test]
    fn different_secret_gives_different_signatures() {
        let v = &v1_vectors()[0];
        let sts = s(v, "string_to_sign");
        assert_ne!(v1_signature("testsecreT", sts), s(v, "signature"));
        assert_ne!(v1_signature("", sts), v1_signature("testsecret", sts));

        let (query, headers) = v3_doc_request();
        let req = V3Request {
            method: "POST",
            pathname: "/",
            query: &query,
            headers: &headers,
            body: b"",
        };
        let (a, _) = v3_authorization(&req, "YourAccessKeyId", "YourAccessKeySecret");
        let (b, _) = v3_authorization(&req, "YourAccessKeyId", "YourAccessKeySecreT");
        assert_ne!(a, b);
    }

    #[test]
    fn hmac_key_block_matches_crate_constructor() {
        for len in [0usize, 1, 20, 63, 64, 65, 100, 200] {
            let key: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let data = b"some string to sign";

            let mut ours = hmac_sha1(&key);
            ours.update(data);
            let mut theirs = <HmacSha1 as Mac>::new_from_slice(&key).expect("any key length");
            theirs.update(data);
            assert_eq!(
                ours.finalize().into_bytes(),
                theirs.finalize().into_bytes(),
                "sha1 key len {len}"
            );

            let mut ours = hmac_sha256(&key);
            ours.update(data);
            let mut theirs = <HmacSha256 as Mac>::new_from_slice(&key).expect("any key length");
            theirs.update(data);
            assert_eq!(
                ours.finalize().into_bytes(),
                theirs.finalize().into_bytes(),
                "sha256 key len {len}"
            );
        }
    }
}
