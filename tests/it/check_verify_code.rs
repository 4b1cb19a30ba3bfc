//! `check_verify_code`: request/reply over direct reply-to, PASS consumes the code, a lost
//! answer is `unknown` (never `not_verified`), the typed code is never stored.

use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use aliyun_sms_worker::wire::Status;
use serde_json::{Value, json};

use crate::helpers::{TestApp, send_job, unique_id};

fn check_job(phone: &Value, code: &str) -> Value {
    json!({
        "id": unique_id("check"),
        "type": "check_verify_code",
        "phone_number": phone,
        "verify_code": code,
    })
}

/// Sends a code through the worker and returns (phone, code).
async fn send_code(app: &TestApp) -> (Value, String) {
    let mut job = send_job(&unique_id("send"));
    job["return_verify_code"] = json!(true);
    let result = app.request(&job).await;
    assert_eq!(result.status, Status::Sent);
    (
        job["phone_number"].clone(),
        result.verify_code.expect("code returned"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_code_verifies_once_then_not_again() {
    let app = TestApp::spawn().await;
    let (phone, code) = send_code(&app).await;

    let first = check_job(&phone, &code);
    let verified = app.request(&first).await;
    assert_eq!(verified.status, Status::Verified, "{verified:?}");
    assert_eq!(verified.code, "OK");
    assert_eq!(verified.job_type.as_deref(), Some("check_verify_code"));

    let again = app.request(&check_job(&phone, &code)).await;
    assert_eq!(
        again.status,
        Status::NotVerified,
        "a passed code is consumed"
    );

    let row = app.job_row(first["id"].as_str().unwrap()).await;
    assert_eq!(row["status"], "verified");
    assert!(
        !row.to_string().contains(&code),
        "the typed code is never stored: {row}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_code_is_not_verified_and_a_redelivered_check_is_not_repeated() {
    let app = TestApp::spawn().await;
    let (phone, code) = send_code(&app).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let job = check_job(&phone, wrong);
    let id = job["id"].as_str().unwrap().to_owned();
    let first = app.request(&job).await;
    assert_eq!(first.status, Status::NotVerified);
    let replay = app.request(&job).await;
    assert_eq!(replay, first, "the stored result, not a second check");
    assert_eq!(app.fake.calls_for(&id), 1);
    // The right code still works: the wrong guess did not consume it.
    assert_eq!(
        app.request(&check_job(&phone, &code)).await.status,
        Status::Verified
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_whose_answer_was_lost_is_unknown_not_wrong() {
    let app = TestApp::spawn_with(|s| {
        s.insert(
            aliyun_sms_worker::config::HTTP_REQUEST_TIMEOUT_MS.into(),
            "400".into(),
        );
    })
    .await;
    let (phone, code) = send_code(&app).await;
    app.fake.push_fault(
        FaultRule::every(Fault::HangAfterSend)
            .on_action("CheckSmsVerifyCode")
            .on_phone(phone.as_str().unwrap_or_default())
            .times(1),
    );
    let job = check_job(&phone, &code);
    let lost = app.request(&job).await;
    assert_eq!(lost.status, Status::Unknown, "{lost:?}");
    assert_eq!(
        app.fake.calls_for(job["id"].as_str().unwrap()),
        1,
        "not retried"
    );
    // Why it must not be retried: the lost PASS consumed the code.
    assert_eq!(
        app.request(&check_job(&phone, &code)).await.status,
        Status::NotVerified
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_validated_without_echoing_the_code() {
    let app = TestApp::spawn().await;
    for (code, phone) in [
        ("12 34", json!("13800138000")),
        ("", json!("13800138000")),
        ("123456789012345678", json!("13800138000")),
        ("1234", json!("12345")),
    ] {
        let job = check_job(&phone, code);
        let result = app.request(&job).await;
        assert_eq!(result.status, Status::Invalid, "{code:?}");
        if !code.trim().is_empty() {
            assert!(!result.message.contains(code), "{}", result.message);
        }
    }
    assert!(app.fake.requests().is_empty(), "nothing reached Aliyun");
    app.shutdown().await;
}

/// `Code: OK` only says the call worked. Without a `VerifyResult` of PASS or UNKNOWN nobody knows
/// whether the code typed was right, and the call may have consumed it: telling the user it was
/// wrong would be a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_answered_ok_without_a_verify_result_is_unknown_not_wrong() {
    let app = TestApp::spawn().await;
    let job = check_job(&json!("13900001112"), "1234");
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    app.fake.push_fault(
        FaultRule::every(Fault::error("OK", "OK"))
            .on_action("CheckSmsVerifyCode")
            .times(1),
    );
    let result = app.request(&job).await;
    assert_eq!(result.status, Status::Unknown, "{result:?}");
    assert_eq!(result.code, "ALIYUN_BAD_RESPONSE", "{result:?}");
    assert!(result.message.contains("VerifyResult"), "{result:?}");
    assert_eq!(app.job_row(&id).await["status"], "unknown");
    assert_eq!(app.fake.calls_for(&id), 1, "not repeated");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_check_is_rejected() {
    let app = TestApp::spawn().await;
    let job = check_job(&json!("13900001111"), "1234");
    app.fake.push_fault(
        FaultRule::every(Fault::error("isv.INVALID_PARAMETERS", "参数异常"))
            .on_action("CheckSmsVerifyCode")
            .times(1),
    );
    let result = app.request(&job).await;
    assert_eq!(result.status, Status::Rejected);
    assert_eq!(result.code, "isv.INVALID_PARAMETERS");
    app.shutdown().await;
}
