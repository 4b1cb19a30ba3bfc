//! The fake's own checks, tested from outside: requests are signed here by an implementation of
//! V1 and ACS3-HMAC-SHA256 written from shared/aliyun-api.md §1–§2, not by the project's signer,
//! so a bug shared by the worker and the fake cannot pass. It reproduces the documented V3
//! vector first, so a failure below is the fake's, not this signer's.

use std::net::{Ipv4Addr, SocketAddr};

use aliyun_sms_worker::aliyun::Product;
use aliyun_sms_worker::fake_aliyun::{FakeAliyun, FakeConfig, Fault, FaultRule};
use aliyun_sms_worker::wire::Status;
use base64::Engine as _;
use chrono::{Duration as Span, Utc};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::dysmsapi::sms_job;
use crate::helpers::{TEST_KEY_ID, TEST_SECRET, TestApp, unique_id, unique_phone};

/// RFC 3986 with Aliyun's unreserved set: `A-Za-z0-9-_.~` literal, the rest `%XX` upper case.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn canonical_query(params: &[(&str, &str)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    sorted
        .iter()
        .map(|(k, v)| format!("{}={}", pct(k), pct(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A V3 request as built by hand: the signer signs `signed` of `headers`, whatever they are.
struct V3 {
    method: &'static str,
    query: Vec<(&'static str, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl V3 {
    fn query(&self) -> Vec<(&str, &str)> {
        self.query.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    /// `Authorization` over the headers named in `signed` (any order; sorted here).
    fn authorization(&self, key_id: &str, secret: &str, signed: &[&str]) -> String {
        let mut names: Vec<String> = signed.iter().map(|n| n.to_ascii_lowercase()).collect();
        names.sort();
        let value = |name: &str| {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default()
        };
        let canonical_headers: String = names
            .iter()
            .map(|n| format!("{n}:{}\n", value(n)))
            .collect();
        let signed_headers = names.join(";");
        let canonical_request = format!(
            "{}\n/\n{}\n{}\n{}\n{}",
            self.method,
            canonical_query(&self.query()),
            canonical_headers,
            signed_headers,
            sha256(&self.body)
        );
        let string_to_sign = format!("ACS3-HMAC-SHA256\n{}", sha256(canonical_request.as_bytes()));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(string_to_sign.as_bytes());
        let signature = hex::encode(mac.finalize().into_bytes());
        // The official SDKs put no space after the commas.
        format!(
            "ACS3-HMAC-SHA256 Credential={key_id},SignedHeaders={signed_headers},Signature={signature}"
        )
    }
}

#[test]
fn the_test_signer_reproduces_the_documented_v3_vector() {
    let headers = [
        ("host", "ecs.cn-shanghai.aliyuncs.com"),
        ("x-acs-action", "RunInstances"),
        ("x-acs-version", "2014-05-26"),
        ("x-acs-date", "2023-10-26T09:01:01Z"),
        ("x-acs-signature-nonce", "d410180a5abf7fe235dd9b74aca91fc0"),
        (
            "x-acs-content-sha256",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ),
    ];
    let request = V3 {
        method: "POST",
        query: vec![
            (
                "ImageId",
                "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd".into(),
            ),
            ("RegionId", "cn-shanghai".into()),
        ],
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        body: Vec::new(),
    };
    let auth = request.authorization(
        "YourAccessKeyId",
        "YourAccessKeySecret",
        &all_headers(&request),
    );
    assert!(
        auth.ends_with(
            "Signature=e521358f7776c97df52e6b2891a8bc73026794a071b50c3323388c4e0df64804"
        ),
        "{auth}"
    );
}

fn now() -> String {
    Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The headers the official Python SDK sends for an RPC call, `accept` and `user-agent` included.
fn sdk_request(
    fake_addr: &str,
    action: &str,
    query: Vec<(&'static str, String)>,
    form: Option<String>,
) -> V3 {
    let body = form.clone().unwrap_or_default().into_bytes();
    let mut headers = vec![
        ("accept".to_owned(), "application/json".to_owned()),
        ("host".to_owned(), fake_addr.to_owned()),
        (
            "user-agent".to_owned(),
            "AlibabaCloud (Linux; x86_64) Python/3.11.2 Core/1.0.9 TeaDSL/2".to_owned(),
        ),
        ("x-acs-action".to_owned(), action.to_owned()),
        ("x-acs-content-sha256".to_owned(), sha256(&body)),
        ("x-acs-date".to_owned(), now()),
        ("x-acs-signature-nonce".to_owned(), nonce()),
        ("x-acs-version".to_owned(), "2017-05-25".to_owned()),
    ];
    if form.is_some() {
        headers.push((
            "content-type".to_owned(),
            "application/x-www-form-urlencoded".to_owned(),
        ));
    }
    V3 {
        method: "POST",
        query,
        headers,
        body,
    }
}

/// Sends `request` with `authorization` to `endpoint`; returns (HTTP status, body).
async fn send(endpoint: &str, request: &V3, authorization: &str) -> (u16, Value) {
    let url = format!("{endpoint}/?{}", canonical_query(&request.query()));
    let mut builder = client()
        .post(url)
        .header("authorization", authorization)
        .body(request.body.clone());
    // reqwest writes `host` itself, from the URL the signer took it from.
    for (name, value) in request.headers.iter().filter(|(n, _)| n != "host") {
        builder = builder.header(name, value);
    }
    let response = builder.send().await.expect("the fake answers");
    let status = response.status().as_u16();
    (status, json_body(response).await)
}

fn client() -> reqwest::Client {
    aliyun_sms_worker::tls::install_crypto_provider();
    reqwest::Client::new()
}

async fn json_body(response: reqwest::Response) -> Value {
    let text = response.text().await.expect("an answer body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn all_headers(request: &V3) -> Vec<&str> {
    request.headers.iter().map(|(n, _)| n.as_str()).collect()
}

async fn fake() -> FakeAliyun {
    FakeAliyun::start(
        FakeConfig::new(TEST_KEY_ID, TEST_SECRET),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    )
    .await
    .expect("start the fake")
}

fn host(endpoint: &str) -> &str {
    endpoint.trim_start_matches("http://")
}

fn verify_code_query(phone: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PhoneNumber", phone.to_owned()),
        ("SignName", "速通互联验证码".into()),
        ("TemplateCode", "100001".into()),
        (
            "TemplateParam",
            r###"{"code":"##code##","min":"5"}"###.into(),
        ),
    ]
}

/// An SDK-shaped SendSmsVerifyCode at the Dypnsapi endpoint, signed over every header it sends.
async fn sdk_send_code(fake: &FakeAliyun, phone: &str) -> (u16, Value) {
    sdk_send_code_at(&fake.endpoint_for(Product::Dypnsapi), phone).await
}

async fn sdk_send_code_at(endpoint: &str, phone: &str) -> (u16, Value) {
    let request = sdk_request(
        host(endpoint),
        "SendSmsVerifyCode",
        verify_code_query(phone),
        None,
    );
    let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &all_headers(&request));
    send(endpoint, &request, &auth).await
}

#[tokio::test]
async fn a_v3_request_shaped_like_the_official_sdks_is_accepted() {
    let fake = fake().await;
    let (status, body) = sdk_send_code(&fake, &unique_phone()).await;
    assert_eq!((status, body["Code"].as_str()), (200, Some("OK")), "{body}");

    // A form body, signed with its content-type, as the SDKs send SendBatchSms.
    let endpoint = fake.endpoint_for(Product::Dysmsapi);
    let form = format!(
        "PhoneNumberJson={}&SignNameJson={}",
        pct(&format!(r#"["{}"]"#, unique_phone())),
        pct(r#"["阿里云"]"#)
    );
    let request = sdk_request(
        host(&endpoint),
        "SendBatchSms",
        vec![("TemplateCode", "SMS_1".into())],
        Some(form),
    );
    let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &all_headers(&request));
    let (status, body) = send(&endpoint, &request, &auth).await;
    assert_eq!((status, body["Code"].as_str()), (200, Some("OK")), "{body}");
}

/// Asserts a refusal: HTTP status and Aliyun's code.
fn refused(answer: (u16, Value), status: u16, code: &str) {
    assert_eq!(
        (answer.0, answer.1["Code"].as_str()),
        (status, Some(code)),
        "{}",
        answer.1
    );
}

fn dypnsapi_request(fake: &FakeAliyun) -> (String, V3) {
    let endpoint = fake.endpoint_for(Product::Dypnsapi);
    let request = sdk_request(
        host(&endpoint),
        "SendSmsVerifyCode",
        verify_code_query(&unique_phone()),
        None,
    );
    (endpoint, request)
}

#[tokio::test]
async fn v3_a_tampered_parameter_or_a_wrong_secret_does_not_match() {
    let fake = fake().await;
    let (endpoint, mut request) = dypnsapi_request(&fake);
    let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &all_headers(&request));
    request.query[0].1 = unique_phone();
    refused(
        send(&endpoint, &request, &auth).await,
        400,
        "SignatureDoesNotMatch",
    );

    let (endpoint, request) = dypnsapi_request(&fake);
    let auth = request.authorization(TEST_KEY_ID, "not-the-secret", &all_headers(&request));
    refused(
        send(&endpoint, &request, &auth).await,
        400,
        "SignatureDoesNotMatch",
    );
    assert!(fake.requests().is_empty(), "nothing was executed");
}

#[tokio::test]
async fn v3_a_reused_nonce_is_refused() {
    let fake = fake().await;
    let (endpoint, request) = dypnsapi_request(&fake);
    let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &all_headers(&request));
    let (status, body) = send(&endpoint, &request, &auth).await;
    assert_eq!(status, 200, "{body}");
    refused(
        send(&endpoint, &request, &auth).await,
        400,
        "SignatureNonceUsed",
    );
}

#[tokio::test]
async fn v3_a_timestamp_16_minutes_off_is_expired() {
    let fake = fake().await;
    for offset in [Span::minutes(-16), Span::minutes(16)] {
        let (endpoint, mut request) = dypnsapi_request(&fake);
        let stale = (Utc::now() + offset)
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        for (name, value) in &mut request.headers {
            if name == "x-acs-date" {
                *value = stale.clone();
            }
        }
        let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &all_headers(&request));
        refused(
            send(&endpoint, &request, &auth).await,
            400,
            "InvalidTimeStamp.Expired",
        );
    }
}

#[tokio::test]
async fn v3_an_acs_or_host_header_left_out_of_signed_headers_is_refused() {
    let fake = fake().await;
    for left_out in ["host", "x-acs-version", "x-acs-signature-nonce"] {
        let (endpoint, request) = dypnsapi_request(&fake);
        let signed: Vec<&str> = all_headers(&request)
            .into_iter()
            .filter(|n| *n != left_out)
            .collect();
        let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &signed);
        refused(
            send(&endpoint, &request, &auth).await,
            400,
            "IncompleteSignature",
        );
    }
    // An x-acs-* header the SDK never sends is no exception.
    let (endpoint, mut request) = dypnsapi_request(&fake);
    let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &all_headers(&request));
    request
        .headers
        .push(("x-acs-extra".into(), "smuggled".into()));
    refused(
        send(&endpoint, &request, &auth).await,
        400,
        "IncompleteSignature",
    );
    assert!(fake.requests().is_empty(), "nothing was executed");
}

#[tokio::test]
async fn v3_a_body_that_does_not_match_its_content_sha256_is_refused() {
    let fake = fake().await;
    let endpoint = fake.endpoint_for(Product::Dysmsapi);
    let form = format!(
        "PhoneNumberJson={}&SignNameJson={}",
        pct(&format!(r#"["{}"]"#, unique_phone())),
        pct(r#"["阿里云"]"#)
    );
    let mut request = sdk_request(
        host(&endpoint),
        "SendBatchSms",
        vec![("TemplateCode", "SMS_1".into())],
        Some(form),
    );
    let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &all_headers(&request));
    request.body = format!(
        "PhoneNumberJson={}&SignNameJson={}",
        pct(&format!(r#"["{}"]"#, unique_phone())),
        pct(r#"["阿里云"]"#)
    )
    .into_bytes();
    refused(
        send(&endpoint, &request, &auth).await,
        400,
        "SignatureDoesNotMatch",
    );
    assert!(fake.requests().is_empty(), "nothing was executed");
}

/// A V1 request (HMAC-SHA1, every parameter in the query) as §1 describes it.
fn v1_query(action: &str, secret: &str, timestamp: &str, nonce: &str) -> Vec<(String, String)> {
    let mut params: Vec<(&str, String)> = vec![
        ("AccessKeyId", TEST_KEY_ID.into()),
        ("Action", action.into()),
        ("Format", "JSON".into()),
        ("SignatureMethod", "HMAC-SHA1".into()),
        ("SignatureNonce", nonce.into()),
        ("SignatureVersion", "1.0".into()),
        ("Timestamp", timestamp.into()),
        ("Version", "2017-05-25".into()),
    ];
    params.extend(verify_code_query(&unique_phone()));
    let canonical = canonical_query(
        &params
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    let string_to_sign = format!("POST&%2F&{}", pct(&canonical));
    let mut mac = Hmac::<Sha1>::new_from_slice(format!("{secret}&").as_bytes()).unwrap();
    mac.update(string_to_sign.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    params.push(("Signature", signature));
    params.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

async fn send_v1(endpoint: &str, params: &[(String, String)]) -> (u16, Value) {
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", pct(k), pct(v)))
        .collect();
    let response = client()
        .post(format!("{endpoint}/?{}", query.join("&")))
        .send()
        .await
        .expect("the fake answers");
    let status = response.status().as_u16();
    (status, json_body(response).await)
}

#[tokio::test]
async fn v1_checks_refuse_with_aliyuns_codes() {
    let fake = fake().await;
    let endpoint = fake.endpoint_for(Product::Dypnsapi);
    let params = v1_query("SendSmsVerifyCode", TEST_SECRET, &now(), &nonce());
    let (status, body) = send_v1(&endpoint, &params).await;
    assert_eq!((status, body["Code"].as_str()), (200, Some("OK")), "{body}");
    refused(send_v1(&endpoint, &params).await, 400, "SignatureNonceUsed");

    let mut tampered = v1_query("SendSmsVerifyCode", TEST_SECRET, &now(), &nonce());
    for (name, value) in &mut tampered {
        if name == "PhoneNumber" {
            *value = unique_phone();
        }
    }
    refused(
        send_v1(&endpoint, &tampered).await,
        400,
        "SignatureDoesNotMatch",
    );
    let wrong_secret = v1_query("SendSmsVerifyCode", "not-the-secret", &now(), &nonce());
    refused(
        send_v1(&endpoint, &wrong_secret).await,
        400,
        "SignatureDoesNotMatch",
    );
    let stale = (Utc::now() - Span::minutes(16))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let expired = v1_query("SendSmsVerifyCode", TEST_SECRET, &stale, &nonce());
    refused(
        send_v1(&endpoint, &expired).await,
        400,
        "InvalidTimeStamp.Expired",
    );
}

#[tokio::test]
async fn each_product_answers_only_its_own_actions_at_its_endpoint() {
    let fake = fake().await;
    let dysmsapi = fake.endpoint_for(Product::Dysmsapi);
    let request = sdk_request(
        host(&dysmsapi),
        "SendSmsVerifyCode",
        verify_code_query(&unique_phone()),
        None,
    );
    let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &all_headers(&request));
    refused(
        send(&dysmsapi, &request, &auth).await,
        404,
        "InvalidApi.NotFound",
    );

    let dypnsapi = fake.endpoint_for(Product::Dypnsapi);
    let request = sdk_request(
        host(&dypnsapi),
        "SendSms",
        vec![
            ("PhoneNumbers", unique_phone()),
            ("SignName", "阿里云".into()),
            ("TemplateCode", "SMS_1".into()),
        ],
        None,
    );
    let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &all_headers(&request));
    refused(
        send(&dypnsapi, &request, &auth).await,
        404,
        "InvalidApi.NotFound",
    );
    assert!(fake.requests().is_empty(), "nothing was executed");
}

#[tokio::test]
async fn a_resend_within_the_interval_is_biz_frequency() {
    let fake = fake().await;
    let phone = unique_phone();
    let (status, first) = sdk_send_code(&fake, &phone).await;
    assert_eq!(
        (status, first["Code"].as_str()),
        (200, Some("OK")),
        "{first}"
    );
    // Default Interval is 60 s: a second send to the number a moment later is refused …
    let (status, second) = sdk_send_code(&fake, &phone).await;
    assert_eq!(
        (status, second["Code"].as_str(), second["Success"].as_bool()),
        (200, Some("biz.FREQUENCY"), Some(false)),
        "{second}"
    );
    // … while another number is not held up by it.
    let (_, other) = sdk_send_code(&fake, &unique_phone()).await;
    assert_eq!(other["Code"], "OK", "{other}");

    // Interval=0 turns the check off for that send.
    let endpoint = fake.endpoint_for(Product::Dypnsapi);
    let mut query = verify_code_query(&phone);
    query.push(("Interval", "0".into()));
    let request = sdk_request(host(&endpoint), "SendSmsVerifyCode", query, None);
    let auth = request.authorization(TEST_KEY_ID, TEST_SECRET, &all_headers(&request));
    let (_, third) = send(&endpoint, &request, &auth).await;
    assert_eq!(third["Code"], "OK", "{third}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_receipt_is_recorded_failed_with_its_code_and_published() {
    let app = TestApp::spawn().await;
    app.fake.push_fault(
        FaultRule::every(Fault::ReceiptFailed {
            err_code: "MK:0001".into(),
        })
        .on_action("SendSms")
        .times(1),
    );
    let id = unique_id("sms");
    let phone = unique_phone();
    app.publish(&sms_job(&id, std::slice::from_ref(&phone)))
        .await;
    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Sent, "{result:?}");

    let event = app.next_receipt().await;
    assert_eq!(event["type"], "delivery");
    assert_eq!(event["job_id"], id.as_str());
    assert_eq!(event["phone_number"], phone.as_str());
    assert_eq!(event["delivery_status"], "failed", "{event}");
    assert_eq!(event["err_code"], "MK:0001", "{event}");

    let rows = app.deliveries(&id).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["delivery_status"], "failed", "{}", rows[0]);
    assert_eq!(rows[0]["err_code"], "MK:0001", "{}", rows[0]);
    app.shutdown().await;
}

/// `aliyun-sms-worker fake-aliyun` as a person starts it: it prints each product's own
/// endpoint, and `--enforce-interval false` lets codes go to one number back to back.
#[tokio::test]
async fn the_fake_cli_prints_each_products_endpoint_and_can_stop_enforcing_the_interval() {
    for (args, second_code) in [
        (vec![], "biz.FREQUENCY"),
        (vec!["--enforce-interval", "false"], "OK"),
    ] {
        let mut child = crate::process::command([
            ("ALIBABA_CLOUD_ACCESS_KEY_ID", TEST_KEY_ID),
            ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", TEST_SECRET),
        ])
        .args(["fake-aliyun", "--listen", "127.0.0.1:0"])
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the fake");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let mut printed = Vec::new();
        let banner = async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                let last = line.contains("Interval");
                printed.push(line);
                if last {
                    break;
                }
            }
        };
        tokio::time::timeout(crate::helpers::PATIENCE, banner)
            .await
            .expect("the fake prints its banner");
        let endpoint_of = |label: &str| {
            printed
                .iter()
                .find_map(|l| l.trim().strip_prefix(label))
                .map(|rest| rest.trim().to_owned())
                .unwrap_or_else(|| panic!("no {label:?} line: {printed:?}"))
        };
        let dypnsapi = endpoint_of("Dypnsapi only:");
        let dysmsapi = endpoint_of("Dysmsapi only:");
        assert!(
            dypnsapi.starts_with("http://127.0.0.1:") && dysmsapi.starts_with("http://127.0.0.1:"),
            "{printed:?}"
        );
        assert_ne!(dypnsapi, dysmsapi);

        let phone = unique_phone();
        let (_, first) = sdk_send_code_at(&dypnsapi, &phone).await;
        assert_eq!(first["Code"], "OK", "{first}");
        let (_, second) = sdk_send_code_at(&dypnsapi, &phone).await;
        assert_eq!(second["Code"], second_code, "{args:?}: {second}");
        // The other product's endpoint does not know the action, as at Aliyun.
        let (status, _) = sdk_send_code_at(&dysmsapi, &phone).await;
        assert_eq!(status, 404);
        child.kill().await.expect("stop the fake");
    }
}
