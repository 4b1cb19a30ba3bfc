//! One reqwest client, reused: an action and its parameters in, Aliyun's parsed answer out.
//!
//! Every call is signed afresh (new nonce, new timestamp), so a retry is never mistaken for a
//! replay by Aliyun's nonce check.

use std::time::Duration;

use chrono::Utc;

use super::answer::{Answer, CallError, MAX_RESPONSE_BYTES, Product, codes};
use super::rate::{LocalSchedule, PaceError, Pacer, Schedule};
use super::redact;
use super::sign;
use crate::config::{AliyunConfig, SignatureVersion};
use crate::metrics::{AccountChange, Metrics};

pub const API_VERSION: &str = "2017-05-25";

/// Room for one open call to Aliyun (see [`AliyunClient::open_call`]); given back when dropped.
pub struct OpenCall {
    _room: Option<tokio::sync::OwnedSemaphorePermit>,
}

#[derive(Clone)]
pub struct AliyunClient {
    http: reqwest::Client,
    /// Calls open at once (`ALIYUN_MAX_OPEN_CALLS`): an open call holds an HTTP connection,
    /// tens of KiB, while a job waiting for its turn holds a few. So a worker can keep many
    /// jobs in flight (for the database's commits and Aliyun's latency) without a connection
    /// each.
    open: std::sync::Arc<tokio::sync::Semaphore>,
    config: AliyunConfig,
    pacer: std::sync::Arc<Pacer>,
    metrics: std::sync::Arc<Metrics>,
}

impl AliyunClient {
    pub fn new(config: AliyunConfig) -> Result<Self, reqwest::Error> {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(config.http.connect_timeout)
            .timeout(config.http.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            // One connection per call that may be open, kept between calls: with fewer, every
            // wave of calls would close the surplus and open it again (a TLS handshake each,
            // against Aliyun). Their buffers are what the open calls needed anyway.
            .pool_max_idle_per_host(config.http.max_open_calls)
            .user_agent(concat!("aliyun-sms-worker/", env!("CARGO_PKG_VERSION")))
            // No Aliyun endpoint redirects. Following one would post the call again, with the
            // numbers and template values it carries, to wherever the answer points; the
            // redirect itself is the answer, classified like any other without Aliyun's body.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            open: std::sync::Arc::new(tokio::sync::Semaphore::new(config.http.max_open_calls)),
            // This process's own schedule until `with_schedule` gives the fleet's.
            pacer: std::sync::Arc::new(Pacer::new(
                std::sync::Arc::new(LocalSchedule::default()),
                config.max_qps,
                config.http.request_timeout,
            )),
            metrics: std::sync::Arc::default(),
            config,
        })
    }

    /// Counts this client's calls (latency, codes, rate-limit waits) into `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Takes the call slots from `schedule` (the fleet's, shared through the database) instead
    /// of this process's own. An unreachable schedule is waited for as long as an answer from
    /// Aliyun would be (`HTTP_REQUEST_TIMEOUT_MS`); then the call fails unsent.
    pub fn with_schedule(mut self, schedule: std::sync::Arc<dyn Schedule>) -> Self {
        self.pacer = std::sync::Arc::new(Pacer::new(
            schedule,
            self.config.max_qps,
            self.config.http.request_timeout,
        ));
        self
    }

    /// Holds `action` to `per_second` calls at most, if that is below `ALIYUN_MAX_QPS`.
    pub fn with_action_limit(mut self, action: &str, per_second: u32) -> Self {
        self.pacer = std::sync::Arc::new(self.pacer.with_limit(action, per_second));
        self
    }

    fn endpoint(&self, product: Product) -> &str {
        match product {
            Product::Dypnsapi => &self.config.dypnsapi_endpoint,
            Product::Dysmsapi => &self.config.dysmsapi_endpoint,
        }
    }

    /// Waits for room for one more open call; held until the answer is in. A rate-limit slot
    /// taken before must be checked for staleness after this wait (see [`Self::pace`]).
    pub async fn open_call(&self) -> OpenCall {
        // The semaphore is never closed; were it, the call would go unbounded rather than not
        // at all.
        OpenCall {
            _room: self.open.clone().acquire_owned().await.ok(),
        }
    }

    /// [`Self::open_call`], [`Self::pace`], then [`Self::send`].
    pub async fn call(
        &self,
        product: Product,
        action: &str,
        params: &[(&'static str, String)],
        form: &[(&'static str, String)],
    ) -> Result<Answer, CallError> {
        let _open = self.open_call().await;
        self.pace(action).await?;
        self.send(product, action, params, form).await
    }

    /// Waits for a slot of `action` under the rate limit; says how long that took. Send right
    /// after it: a slot used late is a slot the limit did not plan for. Dropping the future
    /// only loses its slot.
    pub async fn pace(&self, action: &str) -> Result<Duration, PaceError> {
        let waited = self.pacer.pace(action).await?;
        self.metrics.rate_limit_wait(action, waited);
        Ok(waited)
    }

    /// Signs and sends one call, unpaced (see [`Self::pace`]): POST, parameters in the query
    /// and `form` (if any) as an url-encoded body, as Aliyun's SDKs do.
    pub async fn send(
        &self,
        product: Product,
        action: &str,
        params: &[(&'static str, String)],
        form: &[(&'static str, String)],
    ) -> Result<Answer, CallError> {
        let endpoint = self.endpoint(product).trim_end_matches('/');
        let request = match self.config.signature_version {
            SignatureVersion::V1 => self.sign_v1(endpoint, action, params, form),
            SignatureVersion::V3 => {
                let owned = |p: &[(&'static str, String)]| -> Vec<(String, String)> {
                    p.iter()
                        .map(|(k, v)| ((*k).to_owned(), v.clone()))
                        .collect()
                };
                self.sign_v3(endpoint, action, owned(params), owned(form))
            }
        };
        let started = std::time::Instant::now();
        let exchanged = self.exchange(request).await;
        let code = match &exchanged {
            Ok(answer) => answer.code.as_deref().unwrap_or(codes::BAD_RESPONSE),
            Err(e) => e.code(),
        };
        self.metrics.aliyun_answer(action, started.elapsed(), code);
        let mut answer = exchanged?;
        if let Some(code) = answer.code.as_deref() {
            log_account_change(self.metrics.account_answer(product, action, code));
        }
        let sent: Vec<(&str, &str)> = params
            .iter()
            .chain(form)
            .map(|(k, v)| (*k, v.as_str()))
            .chain(
                self.config
                    .credentials
                    .security_token
                    .as_ref()
                    .map(|t| ("SecurityToken", t.expose())),
            )
            .collect();
        answer.redact(&sent);
        tracing::debug!(
            action,
            http_status = answer.http_status,
            code = answer.code.as_deref().unwrap_or(""),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "aliyun answered"
        );
        if answer.code.as_deref() == Some("SignatureDoesNotMatch") {
            let all: Vec<_> = params.iter().chain(form).cloned().collect();
            self.log_signature_mismatch(action, &answer, &all);
        }
        Ok(answer)
    }

    async fn exchange(&self, request: reqwest::RequestBuilder) -> Result<Answer, CallError> {
        let response = request.send().await.map_err(|e| self.classify_error(e))?;
        let status = response.status().as_u16();
        let bytes = read_limited(response, status)
            .await
            .map_err(|e| self.classify_error(e))??;
        Ok(Answer::parse(status, &bytes))
    }

    /// Signs a V1 call without copying its parameters: they are borrowed into one list,
    /// sorted and encoded once for both the signature and the URL (bench profile: signing
    /// and re-parsing were a tenth of the worker's CPU).
    fn sign_v1(
        &self,
        endpoint: &str,
        action: &str,
        api: &[(&'static str, String)],
        form: &[(&'static str, String)],
    ) -> reqwest::RequestBuilder {
        let creds = &self.config.credentials;
        let nonce = uuid::Uuid::new_v4().to_string();
        let timestamp = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let mut query: Vec<(&str, &str)> = vec![
            ("AccessKeyId", creds.access_key_id.as_str()),
            ("Action", action),
            ("Format", "JSON"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", nonce.as_str()),
            ("SignatureVersion", "1.0"),
            ("Timestamp", timestamp.as_str()),
            ("Version", API_VERSION),
        ];
        if let Some(token) = &creds.security_token {
            query.push(("SecurityToken", token.expose()));
        }
        query.extend(api.iter().map(|(k, v)| (*k, v.as_str())));
        let body: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let signed = sign::v1_signed_query("POST", creds.access_key_secret.expose(), &query, &body);
        with_body(self.http.post(format!("{endpoint}/?{signed}")), &body)
    }

    fn sign_v3(
        &self,
        endpoint: &str,
        action: &str,
        query: Vec<(String, String)>,
        form: Vec<(String, String)>,
    ) -> reqwest::RequestBuilder {
        let body = if form.is_empty() {
            String::new()
        } else {
            sign::canonical_query(&form)
        };
        let creds = &self.config.credentials;
        let host = endpoint
            .split("://")
            .nth(1)
            .unwrap_or(endpoint)
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let mut headers = vec![
            ("host".to_owned(), host),
            ("x-acs-action".to_owned(), action.to_owned()),
            (
                "x-acs-content-sha256".to_owned(),
                sign::sha256_hex(body.as_bytes()),
            ),
            (
                "x-acs-date".to_owned(),
                Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            ),
            (
                "x-acs-signature-nonce".to_owned(),
                uuid::Uuid::new_v4().simple().to_string(),
            ),
            ("x-acs-version".to_owned(), API_VERSION.to_owned()),
        ];
        if let Some(token) = &creds.security_token {
            headers.push(("x-acs-security-token".into(), token.expose().to_owned()));
        }
        if !form.is_empty() {
            headers.push((
                "content-type".into(),
                "application/x-www-form-urlencoded".into(),
            ));
        }
        let (authorization, _) = sign::v3_authorization(
            &sign::V3Request {
                method: "POST",
                pathname: "/",
                query: &query,
                headers: &headers,
                body: body.as_bytes(),
            },
            &creds.access_key_id,
            creds.access_key_secret.expose(),
        );
        let url = format!("{endpoint}/?{}", sign::canonical_query(&query));
        let mut request = self
            .http
            .post(url)
            .header("authorization", authorization)
            .header("content-length", body.len().to_string());
        for (name, value) in headers.into_iter().filter(|(n, _)| n != "host") {
            request = request.header(name, value);
        }
        request.body(body)
    }

    fn classify_error(&self, e: reqwest::Error) -> CallError {
        // The URL carries the signed query (phone numbers, a typed code, an STS token); this
        // text ends up in sms_attempts, results and logs, so it goes.
        let e = &e.without_url();
        // A connect error (refused, DNS, TLS handshake, connect timeout) proves the request
        // never left; anything later may have been executed by Aliyun.
        if e.is_connect() {
            CallError::NotSent(crate::telemetry::error_chain(e))
        } else if e.is_timeout() {
            CallError::Timeout(self.config.http.request_timeout)
        } else if e.is_builder() {
            CallError::NotSent(crate::telemetry::error_chain(e))
        } else {
            CallError::Broken(crate::telemetry::error_chain(e))
        }
    }

    /// On a signature mismatch Aliyun returns its own string-to-sign; logging it beside ours
    /// shows which parameter was encoded differently. Both are shown as [`redact`] allows (the
    /// answer was redacted on arrival); the secret is never part of a string-to-sign.
    fn log_signature_mismatch(
        &self,
        action: &str,
        answer: &Answer,
        params: &[(&'static str, String)],
    ) {
        tracing::error!(
            action,
            aliyun_message = answer.message.as_deref().unwrap_or("(not given)"),
            our_api_params = %redact::params(params),
            "Aliyun says SignatureDoesNotMatch: check ALIBABA_CLOUD_ACCESS_KEY_SECRET, then compare the two"
        );
    }
}

/// Account trouble is logged when it starts and when it ends, not on every refused job: the
/// gauge and `/readyz` carry it in between.
fn log_account_change(change: AccountChange) {
    match change {
        AccountChange::Raised(t) => tracing::error!(
            product = t.product,
            action = t.action,
            code = t.code,
            meaning = super::outcome::meaning(t.code),
            "Aliyun refuses the account or its credentials: jobs of this action fail until an operator acts"
        ),
        AccountChange::Cleared(t) => tracing::info!(
            product = t.product,
            action = t.action,
            code = t.code,
            "Aliyun accepts this action again: account trouble cleared"
        ),
        AccountChange::Unchanged => {}
    }
}

/// The form body, encoded exactly as it was signed.
fn with_body(request: reqwest::RequestBuilder, form: &[(&str, &str)]) -> reqwest::RequestBuilder {
    if form.is_empty() {
        return request.header("content-length", "0");
    }
    request
        .header("content-type", "application/x-www-form-urlencoded")
        .body(sign::canonical_query(form))
}

async fn read_limited(
    mut response: reqwest::Response,
    status: u16,
) -> Result<Result<Vec<u8>, CallError>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Ok(Err(CallError::TooLarge(status)));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_from_json_html_and_garbage() {
        let ok = Answer::parse(
            200,
            br#"{"Code":"OK","Message":"OK","RequestId":"R1","Model":{"BizId":"B^1","VerifyCode":"4232"}}"#,
        );
        assert!(ok.is_ok());
        assert_eq!(ok.biz_id().as_deref(), Some("B^1"));
        assert_eq!(ok.verify_code().as_deref(), Some("4232"));
        assert_eq!(ok.request_id.as_deref(), Some("R1"));

        let sms = Answer::parse(200, br#"{"Code":"OK","BizId":"134523^4351232"}"#);
        assert_eq!(sms.biz_id().as_deref(), Some("134523^4351232"));

        let html = Answer::parse(502, b"<html><body>Bad gateway</body></html>");
        assert_eq!(html.code, None);
        assert!(html.message.unwrap().contains("not Aliyun JSON"));

        for garbage in [
            &b"{\"Code\":"[..],
            b"",
            b"\xff\xfe",
            b"[1,2,3]",
            b"{\"Code\":7}",
        ] {
            let a = Answer::parse(200, garbage);
            assert!(!a.is_ok());
        }
    }

    /// A 200 whose `Code` is not a name is not Aliyun's answer: a send answered so is `unknown`,
    /// never `rejected` (which tells the backend the SMS did not go out).
    #[test]
    fn an_empty_or_numeric_code_is_no_code() {
        use crate::aliyun::outcome::{Effect, Verdict, classify};
        for body in [
            &br#"{"Code":"","Message":"m"}"#[..],
            br#"{"Code":"  ","Message":"m"}"#,
            br#"{"Code":500,"Message":"m"}"#,
            br#"{"Code":null}"#,
        ] {
            let a = Answer::parse(200, body);
            assert_eq!(a.code, None, "{}", String::from_utf8_lossy(body));
            assert_eq!(
                classify(Effect::NotIdempotent, &Ok(a)),
                Verdict::Unknown,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn nul_bytes_in_an_answer_are_dropped_so_its_outcome_can_be_stored() {
        let a = Answer::parse(
            400,
            br#"{"Code":"Bad\u0000Code","Message":"m\u0000","RequestId":"R\u00001",
                "BizId":"B\u0000^1","Model":{"VerifyResult":"PASS\u0000"},
                "SmsSendDetailDTOs":{"SmsSendDetailDTO":[{"ErrCode":"D\u0000","k\u0000":1}]}}"#,
        );
        assert_eq!(a.code.as_deref(), Some("BadCode"));
        assert_eq!(a.message.as_deref(), Some("m"));
        assert_eq!(a.request_id.as_deref(), Some("R1"));
        assert_eq!(a.biz_id().as_deref(), Some("B^1"));
        assert_eq!(a.verify_result().as_deref(), Some("PASS"));
        assert!(!a.body.to_string().contains("\\u0000"), "{}", a.body);
    }

    #[tokio::test]
    async fn transport_errors_do_not_carry_the_signed_query() {
        use crate::config::{Credentials, HttpConfig, Secret, SignatureVersion};
        // Nothing listens on port 1: the connection is refused.
        let client = AliyunClient::new(AliyunConfig {
            credentials: Credentials {
                access_key_id: "id".into(),
                access_key_secret: Secret::new("secret"),
                security_token: Some(Secret::new("sts-token-value")),
            },
            dypnsapi_endpoint: "http://127.0.0.1:1".into(),
            dysmsapi_endpoint: "http://127.0.0.1:1".into(),
            signature_version: SignatureVersion::V1,
            http: HttpConfig {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(2),
                max_open_calls: 4,
            },
            max_qps: 100,
        })
        .unwrap();
        let err = client
            .call(
                Product::Dypnsapi,
                "CheckSmsVerifyCode",
                &[
                    ("PhoneNumber", "13800138000".into()),
                    ("VerifyCode", "482913".into()),
                ],
                &[],
            )
            .await
            .unwrap_err();
        assert!(matches!(err, CallError::NotSent(_)), "{err:?}");
        let text = format!("{err} {err:?}");
        for secret in ["13800138000", "482913", "sts-token-value", "Signature="] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
}
