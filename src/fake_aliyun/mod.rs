//! The fake Aliyun: the project's only test double, and a real HTTP server.
//!
//! It checks what the real gateway checks (AccessKeyId, timestamp window, V1 or V3 signature,
//! nonce reuse), plays the Dypnsapi actions with their documented shapes and codes, remembers
//! every request it executed, and injects faults on demand.
//!
//! It listens on three ports: one serving both products (what the CLI prints, so that one URL
//! configures both endpoints), and one per product ([`FakeAliyun::endpoint_for`]) where an
//! action of the other product is `InvalidApi.NotFound`, as at Aliyun's own endpoints.
//!
//! Control endpoints (unsigned, for tests and people, on every port):
//! - `GET /__fake/requests` — every authenticated request, as JSON;
//! - `POST /__fake/faults` — queue a [`FaultRule`]; `DELETE /__fake/faults` — clear them;
//! - `GET /__fake/health`.

mod auth;
mod dypnsapi;
mod dysmsapi;
mod state;
mod v3;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State as AxumState};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use chrono::Utc;
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub use auth::Keys;
pub use state::{Fault, FaultRule, RecordedRequest};

use crate::aliyun::{Product, sign};
use state::State;

/// How long a hanging request stays open: longer than any client timeout worth having.
const HANG: Duration = Duration::from_secs(300);

#[derive(Clone)]
pub struct FakeConfig {
    pub keys: Keys,
    /// Added to every answer.
    pub latency: Duration,
    /// Sends per phone number per minute before `biz.FREQUENCY`; None = no limit.
    pub per_number_per_minute: Option<u32>,
    /// Refuse a SendSmsVerifyCode within its `Interval` (default 60 s) of the last send to the
    /// same number with `biz.FREQUENCY`, as Aliyun does; off only for tests that resend on purpose.
    pub enforce_interval: bool,
    /// Faults active from the start (the `--fault` flag).
    pub faults: Vec<FaultRule>,
    /// How long after a Dysmsapi send its delivery receipt turns `DELIVERED`.
    pub receipt_delay: Duration,
    /// Calls per action in any one second before `Throttling.Api`; None = no limit.
    pub max_qps: Option<u32>,
}

impl FakeConfig {
    pub fn new(access_key_id: impl Into<String>, access_key_secret: impl Into<String>) -> Self {
        Self {
            keys: Keys {
                access_key_id: access_key_id.into(),
                access_key_secret: access_key_secret.into(),
            },
            latency: Duration::ZERO,
            per_number_per_minute: None,
            enforce_interval: true,
            faults: Vec::new(),
            receipt_delay: Duration::from_secs(1),
            max_qps: None,
        }
    }
}

/// A gateway-level refusal: `{RequestId, HostId, Code, Message, Recommend}` with a 4xx/5xx.
#[derive(Debug)]
pub struct GatewayError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

/// What the fake answers.
pub(crate) struct Reply {
    status: StatusCode,
    body: Value,
    /// A `Location` header, for a redirect.
    location: Option<header::HeaderValue>,
}

impl Reply {
    pub(crate) fn ok_json(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            location: None,
        }
    }

    pub(crate) fn gateway_error(status: u16, code: &str, message: &str) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            body: json!({
                "RequestId": request_id(),
                "HostId": "fake-aliyun",
                "Code": code,
                "Message": message,
                "Recommend": "https://api.aliyun.com/troubleshoot",
            }),
            location: None,
        }
    }

    /// A proxy's own answer: a status with a text body and no Aliyun code.
    fn proxy_error(status: StatusCode, text: &str) -> Self {
        Self {
            status,
            body: Value::String(text.to_owned()),
            location: None,
        }
    }

    /// A 307 to `location`; a location no header can carry is said so, not dropped (a 307
    /// without one would test nothing).
    fn redirect(location: &str) -> Self {
        match header::HeaderValue::from_str(location) {
            Ok(location) => Self {
                location: Some(location),
                ..Self::proxy_error(StatusCode::TEMPORARY_REDIRECT, "moved")
            },
            Err(_) => Self::gateway_error(
                500,
                "FakeMisconfigured",
                "the redirect fault's location is not a header value",
            ),
        }
    }

    fn code(&self) -> String {
        self.body
            .get("Code")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }
}

impl From<GatewayError> for Reply {
    fn from(e: GatewayError) -> Self {
        Reply::gateway_error(e.status.as_u16(), &e.code, &e.message)
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = match self.body {
            Value::String(text) => {
                (self.status, [(header::CONTENT_TYPE, "text/plain")], text).into_response()
            }
            body => (
                self.status,
                [(header::CONTENT_TYPE, "application/json;charset=utf-8")],
                body.to_string(),
            )
                .into_response(),
        };
        if let Some(location) = self.location {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response
    }
}

pub(crate) fn request_id() -> String {
    uuid::Uuid::new_v4().to_string().to_uppercase()
}

struct Shared {
    config: FakeConfig,
    state: State,
}

/// A running fake. Dropping it stops the servers.
pub struct FakeAliyun {
    addr: SocketAddr,
    dypnsapi_addr: SocketAddr,
    dysmsapi_addr: SocketAddr,
    shared: Arc<Shared>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeAliyun {
    fn drop(&mut self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

/// Which product's actions one listener serves; None serves both.
#[derive(Clone)]
struct Endpoint {
    shared: Arc<Shared>,
    only: Option<Product>,
}

async fn serve(listener: TcpListener, endpoint: Endpoint) -> tokio::task::JoinHandle<()> {
    let app = router(endpoint);
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "fake Aliyun server stopped");
        }
    })
}

impl FakeAliyun {
    /// Binds `listen` (port 0 picks a free port) for both products, plus a free port on the
    /// same address for each product alone, and serves in the background.
    pub async fn start(config: FakeConfig, listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let dypnsapi = TcpListener::bind((listen.ip(), 0)).await?;
        let dysmsapi = TcpListener::bind((listen.ip(), 0)).await?;
        let (addr, dypnsapi_addr, dysmsapi_addr) = (
            listener.local_addr()?,
            dypnsapi.local_addr()?,
            dysmsapi.local_addr()?,
        );
        let state = State::default();
        state.with(|s| s.faults = config.faults.clone());
        let shared = Arc::new(Shared { config, state });
        let endpoint = |only| Endpoint {
            shared: shared.clone(),
            only,
        };
        let servers = vec![
            serve(listener, endpoint(None)).await,
            serve(dypnsapi, endpoint(Some(Product::Dypnsapi))).await,
            serve(dysmsapi, endpoint(Some(Product::Dysmsapi))).await,
        ];
        Ok(Self {
            addr,
            dypnsapi_addr,
            dysmsapi_addr,
            shared,
            servers,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to use as both Aliyun endpoints.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The base URL serving `product`'s actions only.
    pub fn endpoint_for(&self, product: Product) -> String {
        let addr = match product {
            Product::Dypnsapi => self.dypnsapi_addr,
            Product::Dysmsapi => self.dysmsapi_addr,
        };
        format!("http://{addr}")
    }

    pub fn push_fault(&self, rule: FaultRule) {
        self.shared.state.with(|s| s.faults.push(rule));
    }

    pub fn clear_faults(&self) {
        self.shared.state.with(|s| s.faults.clear());
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state.with(|s| s.requests.clone())
    }

    /// Connections that carried an Aliyun request, over the fake's lifetime: a client that
    /// keeps its connections between calls opens no more than it ever had calls at once.
    pub fn connections(&self) -> usize {
        self.shared.state.with(|s| s.peers.len())
    }

    /// Executed sends (the ones that would be billed) whose OutId is `out_id`.
    pub fn sends_for(&self, out_id: &str) -> usize {
        self.shared.state.with(|s| {
            s.requests
                .iter()
                .filter(|r| r.executed && r.action.starts_with("Send"))
                .filter(|r| r.out_id.as_deref() == Some(out_id))
                .count()
        })
    }

    /// Requests of any outcome whose OutId is `out_id`.
    pub fn calls_for(&self, out_id: &str) -> usize {
        self.shared.state.with(|s| {
            s.requests
                .iter()
                .filter(|r| r.out_id.as_deref() == Some(out_id))
                .count()
        })
    }

    /// Waits until the recorded requests satisfy `done` (checked on every new request).
    pub async fn wait_for(&self, done: impl Fn(&[RecordedRequest]) -> bool) {
        let mut recorded = self.shared.state.recorded.subscribe();
        loop {
            if self.shared.state.with(|s| done(&s.requests)) {
                return;
            }
            if recorded.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits until a server task ends (they only end on error); for the CLI.
    pub async fn serve_forever(mut self) {
        let servers = std::mem::take(&mut self.servers);
        let _ = futures_util::future::select_all(servers).await;
    }
}

fn router(endpoint: Endpoint) -> Router {
    Router::new()
        .route("/__fake/health", get(|| async { "ok" }))
        .route("/__fake/requests", get(list_requests))
        .route(
            "/__fake/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/", any(handle))
        .with_state(endpoint)
}

async fn list_requests(AxumState(Endpoint { shared, .. }): AxumState<Endpoint>) -> Response {
    let requests = shared.state.with(|s| s.requests.clone());
    json_response(StatusCode::OK, &json!(requests))
}

async fn list_faults(AxumState(Endpoint { shared, .. }): AxumState<Endpoint>) -> Response {
    let faults = shared.state.with(|s| s.faults.clone());
    json_response(StatusCode::OK, &json!(faults))
}

async fn add_fault(
    AxumState(Endpoint { shared, .. }): AxumState<Endpoint>,
    body: Bytes,
) -> Response {
    match serde_json::from_slice::<FaultRule>(&body) {
        Ok(rule) => {
            shared.state.with(|s| s.faults.push(rule));
            json_response(StatusCode::CREATED, &json!({"ok": true}))
        }
        Err(e) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("not a fault rule: {e}")}),
        ),
    }
}

async fn clear_faults(AxumState(Endpoint { shared, .. }): AxumState<Endpoint>) -> Response {
    shared.state.with(|s| s.faults.clear());
    json_response(StatusCode::OK, &json!({"ok": true}))
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

type Params = Vec<(String, String)>;

/// Query and form parameters, decoded. Duplicate names are refused, as they make the
/// string-to-sign ambiguous.
fn parameters(
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Params, Params), GatewayError> {
    let bad = |what: &str| GatewayError {
        status: StatusCode::BAD_REQUEST,
        code: "InvalidParameter".into(),
        message: format!("Specified parameter {what} is not valid."),
    };
    let decode = |raw: &str| -> Result<Params, GatewayError> {
        raw.split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                Ok((
                    sign::percent_decode(k, true).ok_or_else(|| bad("encoding"))?,
                    sign::percent_decode(v, true).ok_or_else(|| bad("encoding"))?,
                ))
            })
            .collect()
    };
    let query = decode(uri.query().unwrap_or_default())?;
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let form = if is_form {
        decode(std::str::from_utf8(body).map_err(|_| bad("body"))?)?
    } else {
        Vec::new()
    };
    let mut names: Vec<&str> = query.iter().chain(&form).map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(bad(w[0]));
    }
    Ok((query, form))
}

async fn handle(
    AxumState(Endpoint { shared, only }): AxumState<Endpoint>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    shared.state.with(|s| s.peers.insert(peer));
    if !shared.config.latency.is_zero() {
        tokio::time::sleep(shared.config.latency).await;
    }
    let (query, form) = match parameters(&uri, &headers, &body) {
        Ok(p) => p,
        Err(e) => return e.into(),
    };
    let is_v3 = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(sign::V3_ALGORITHM));
    let authorised = if is_v3 {
        auth::verify_v3(
            &shared.config.keys,
            &shared.state,
            method.as_str(),
            uri.path(),
            &headers,
            query,
            &body,
        )
        .map(|mut a| {
            a.params.extend(form);
            a
        })
    } else {
        let mut all = query;
        all.extend(form);
        auth::verify_v1(&shared.config.keys, &shared.state, method.as_str(), all)
    };
    let request = match authorised {
        Ok(r) => r,
        Err(e) => return e.into(),
    };
    if only.is_some_and(|p| product_of(&request.action) != Some(p)) {
        return api_not_found();
    }
    execute(&shared, request).await
}

fn product_of(action: &str) -> Option<Product> {
    match action {
        "SendSmsVerifyCode" | "CheckSmsVerifyCode" => Some(Product::Dypnsapi),
        "SendSms" | "SendBatchSms" | "QuerySendDetails" => Some(Product::Dysmsapi),
        _ => None,
    }
}

fn api_not_found() -> Reply {
    Reply::gateway_error(
        404,
        "InvalidApi.NotFound",
        "Specified api is not found, please check your url and method.",
    )
}

async fn execute(shared: &Shared, request: auth::Authorised) -> Reply {
    let auth::Authorised { action, params } = request;
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut phones: Vec<String> = ["PhoneNumber", "PhoneNumbers"]
        .iter()
        .filter_map(|n| param(n))
        .flat_map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    if let Some(json) = param("PhoneNumberJson") {
        phones.extend(serde_json::from_str::<Vec<String>>(&json).unwrap_or_default());
    }
    let record = |code: String, biz_id: Option<String>, executed: bool| RecordedRequest {
        action: action.clone(),
        phone: phones.first().cloned(),
        out_id: param("OutId"),
        code,
        biz_id,
        executed,
        at: Utc::now(),
    };

    if let Some(limit) = shared.config.max_qps
        && !shared.state.admit(&action, limit)
    {
        let reply = Reply::gateway_error(
            400,
            "Throttling.Api",
            "Request was denied due to api flow control.",
        );
        shared.state.record(record(reply.code(), None, false));
        return reply;
    }
    let mut hang_after = false;
    let mut reset_after = false;
    let mut receipt_failure = None;
    let refusal = match shared.state.take_fault(&action, &phones) {
        None => None,
        Some(Fault::Latency { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            None
        }
        Some(Fault::ReceiptFailed { err_code }) => {
            receipt_failure = Some(err_code);
            None
        }
        Some(Fault::HangAfterSend) => {
            hang_after = true;
            None
        }
        Some(Fault::Http503AfterSend) => {
            reset_after = true;
            None
        }
        Some(Fault::Redirect { location }) => Some(Reply::redirect(&location)),
        Some(Fault::Hang) => {
            shared.state.record(record("(hang)".into(), None, false));
            tokio::time::sleep(HANG).await;
            return Reply::gateway_error(504, "ServiceTimeout", "hung on purpose");
        }
        Some(Fault::Http500) => Some(Reply::gateway_error(
            500,
            "InternalError",
            "The request processing has failed due to some unknown error, exception or failure.",
        )),
        Some(Fault::Http503) => Some(Reply::gateway_error(
            503,
            "ServiceUnavailable",
            "The request has failed due to a temporary failure of the server.",
        )),
        Some(Fault::Throttling) => Some(Reply::gateway_error(
            400,
            "Throttling.User",
            "Request was denied due to user flow control.",
        )),
        Some(Fault::Error {
            code,
            message,
            http_status: 200,
        }) => Some(Reply::ok_json(json!({
            "Code": code, "Message": message, "RequestId": request_id(), "Success": false,
        }))),
        Some(Fault::Error {
            code,
            message,
            http_status,
        }) => Some(Reply::gateway_error(http_status, &code, &message)),
    };
    if let Some(reply) = refusal {
        shared.state.record(record(reply.code(), None, false));
        return reply;
    }

    let done = match action.as_str() {
        "SendSmsVerifyCode" => {
            dypnsapi::send_sms_verify_code(&shared.config, &shared.state, &params)
        }
        "CheckSmsVerifyCode" => dypnsapi::check_sms_verify_code(&shared.state, &params),
        "SendSms" => dysmsapi::send_sms(&shared.config, &shared.state, &params),
        "SendBatchSms" => dysmsapi::send_batch_sms(&shared.config, &shared.state, &params),
        "QuerySendDetails" => dysmsapi::query_send_details(&shared.state, &params),
        _ => return api_not_found(),
    };
    if let (Some(code), Some(biz_id)) = (receipt_failure, &done.biz_id) {
        shared.state.with(|s| {
            for sms in s.sms.iter_mut().filter(|r| &r.biz_id == biz_id) {
                sms.failure = Some(code.clone());
            }
        });
    }
    shared.state.record(record(
        done.reply.code(),
        done.biz_id.clone(),
        done.executed,
    ));
    if hang_after {
        tokio::time::sleep(HANG).await;
    }
    if reset_after {
        return Reply::proxy_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
        );
    }
    done.reply
}
