//! The admin listener's door when `ADMIN_TOKEN` is set: every page but the probes needs
//! `Authorization: Bearer <token>`, or the session cookie a browser gets by opening a page once
//! with `?token=<token>`. Orchestrators probe `/healthz` and `/readyz` without credentials, so
//! those stay open (they say nothing about jobs).
//!
//! Tokens are compared as HMACs under a key drawn at start: the comparison is constant-time and
//! takes as long whatever the length of what was sent.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use percent_encoding::percent_decode_str;
use sha2::Sha256;

use crate::config::Secret;

type HmacSha256 = Hmac<Sha256>;

const COOKIE: &str = "smsw_admin";
/// What a browser session holds instead of the token itself, so the token is not kept in the
/// browser's cookie store (the value still opens the pages until the token changes).
const COOKIE_CONTEXT: &[u8] = b"aliyun-sms-worker admin session v1";

#[derive(Clone)]
pub struct Gate(Arc<Inner>);

struct Inner {
    key: [u8; 32],
    token_tag: Vec<u8>,
    session: String,
    session_tag: Vec<u8>,
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length; this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

impl Gate {
    pub fn new(token: &Secret) -> Self {
        let key: [u8; 32] = rand::random();
        let mut session = mac(token.expose().as_bytes());
        session.update(COOKIE_CONTEXT);
        let session = hex::encode(session.finalize().into_bytes());
        let tag = |value: &str| {
            let mut m = mac(&key);
            m.update(value.as_bytes());
            m.finalize().into_bytes().to_vec()
        };
        Self(Arc::new(Inner {
            key,
            token_tag: tag(token.expose()),
            session_tag: tag(&session),
            session,
        }))
    }

    fn matches(&self, expected_tag: &[u8], presented: &str) -> bool {
        let mut m = mac(&self.0.key);
        m.update(presented.as_bytes());
        m.verify_slice(expected_tag).is_ok()
    }

    fn bearer_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .any(|token| self.matches(&self.0.token_tag, token))
    }

    fn cookie_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == COOKIE)
            .any(|(_, value)| self.matches(&self.0.session_tag, value))
    }

    /// Where to send the browser once logged in: the same page and query, without the token
    /// (a search keeps its terms).
    fn without_token(request: &Request) -> String {
        let uri = request.uri();
        let rest: Vec<&str> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty() && !pair.starts_with("token="))
            .collect();
        if rest.is_empty() {
            uri.path().to_owned()
        } else {
            format!("{}?{}", uri.path(), rest.join("&"))
        }
    }

    /// `?token=` in the query, decoded; None when the query has none.
    fn query_token(request: &Request) -> Option<String> {
        request
            .uri()
            .query()?
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            // No `+` to space: a token may hold a `+`, and a space never.
            .map(|raw| percent_decode_str(raw).decode_utf8_lossy().into_owned())
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, "Bearer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        "401 Unauthorized\n",
    )
        .into_response()
}

/// Sets the session cookie and sends the browser to the same page without the token, so it
/// leaves the address bar and is not sent again.
fn log_in(gate: &Gate, path: &str) -> Response {
    // `//host` would be read as another site.
    let location = if path.starts_with("//") { "/" } else { path };
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        gate.0.session
    );
    match (
        HeaderValue::from_str(location),
        HeaderValue::from_str(&cookie),
    ) {
        (Ok(location), Ok(cookie)) => (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, location),
                (header::SET_COOKIE, cookie),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                (
                    header::REFERRER_POLICY,
                    HeaderValue::from_static("no-referrer"),
                ),
            ],
        )
            .into_response(),
        _ => unauthorized(),
    }
}

/// Middleware for the protected routes.
pub async fn require(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    if gate.bearer_ok(request.headers()) || gate.cookie_ok(request.headers()) {
        return next.run(request).await;
    }
    match Gate::query_token(&request) {
        Some(token) if gate.matches(&gate.0.token_tag, &token) => {
            log_in(&gate, &Gate::without_token(&request))
        }
        _ => unauthorized(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn only_the_exact_token_opens() {
        let gate = Gate::new(&Secret::new("0123456789abcdef-token"));
        let ok = |v: &str| gate.bearer_ok(&headers(header::AUTHORIZATION, v));
        assert!(ok("Bearer 0123456789abcdef-token"));
        assert!(ok("bearer 0123456789abcdef-token"));
        assert!(!ok("Bearer 0123456789abcdef-toke"));
        assert!(!ok("Bearer 0123456789abcdef-token2"));
        assert!(!ok("Basic 0123456789abcdef-token"));
        assert!(!ok("0123456789abcdef-token"));
    }

    #[test]
    fn the_session_cookie_is_derived_from_the_token_and_not_the_token() {
        let gate = Gate::new(&Secret::new("0123456789abcdef-token"));
        let session = gate.0.session.clone();
        assert!(!session.contains("0123456789abcdef"));
        let ok = |v: &str| gate.cookie_ok(&headers(header::COOKIE, v));
        assert!(ok(&format!("a=b; {COOKIE}={session}")));
        assert!(!ok(&format!("{COOKIE}=0123456789abcdef-token")));
        assert!(!ok(&format!("other={session}")));
        // Another worker with the same token accepts the same session (any replica's page).
        let replica = Gate::new(&Secret::new("0123456789abcdef-token"));
        assert!(replica.cookie_ok(&headers(header::COOKIE, &format!("{COOKIE}={session}"))));
    }

    #[test]
    fn logging_in_keeps_the_query_but_the_token() {
        let at = |uri: &str| {
            let request = Request::builder()
                .uri(uri)
                .body(axum::body::Body::empty())
                .unwrap();
            Gate::without_token(&request)
        };
        assert_eq!(at("/search?q=%2B86+138&token=t"), "/search?q=%2B86+138");
        assert_eq!(at("/search?token=t&q=x&a=b"), "/search?q=x&a=b");
        assert_eq!(at("/?token=t"), "/");
        assert_eq!(at("/jobs/a%2Fb?token=t"), "/jobs/a%2Fb");
    }

    #[test]
    fn logging_in_never_redirects_off_site() {
        let gate = Gate::new(&Secret::new("0123456789abcdef-token"));
        let r = log_in(&gate, "//evil.example/x");
        assert_eq!(r.headers()[header::LOCATION], "/");
        let r = log_in(&gate, "/jobs/a%2Fb");
        assert_eq!(r.headers()[header::LOCATION], "/jobs/a%2Fb");
        let cookie = r.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
    }
}
