//! Bad messages: each is answered `invalid`, dead-lettered with its reason, never sent, and
//! never disturbs the valid jobs around it.

use aliyun_sms_worker::broker::{HEADER_INVALID_CODE, HEADER_INVALID_REASON};
use aliyun_sms_worker::wire::{MAX_JOB_BYTES, Status};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ShortString};
use serde_json::json;

use crate::helpers::{TestApp, send_job, unique_id};

fn header(props: &BasicProperties, name: &str) -> String {
    let headers = props.headers().as_ref().expect("headers");
    match headers.inner().get(&ShortString::from(name)) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name} missing or not a string: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_answered_dead_lettered_and_harmless() {
    let app = TestApp::spawn().await;

    let mut missing = send_job(&unique_id("missing"));
    missing.as_object_mut().unwrap().remove("sign_name");
    let mut bad_phone = send_job(&unique_id("badphone"));
    bad_phone["phone_number"] = json!("12345");
    let mut unknown_field = send_job(&unique_id("typo"));
    unknown_field["phone_numbr"] = json!("13800138000");
    let mut oversized = send_job(&unique_id("big"));
    oversized["sign_name"] = json!("x".repeat(MAX_JOB_BYTES));

    // (body, message_id, expected code, a word the message must contain)
    let cases: Vec<(Vec<u8>, Option<&str>, &str, &str)> = vec![
        (
            b"{not json".to_vec(),
            Some("m-json"),
            "INVALID_JSON",
            "JSON",
        ),
        (
            serde_json::to_vec(&missing).unwrap(),
            None,
            "INVALID_FIELD",
            "sign_name",
        ),
        (
            serde_json::to_vec(&bad_phone).unwrap(),
            None,
            "INVALID_FIELD",
            "phone_number",
        ),
        (
            serde_json::to_vec(&unknown_field).unwrap(),
            None,
            "INVALID_FIELD",
            "phone_numbr",
        ),
        (
            serde_json::to_vec(&oversized).unwrap(),
            None,
            "TOO_LARGE",
            "limit",
        ),
        (
            vec![0xff, 0xfe, 0x00],
            Some("m-utf8"),
            "INVALID_UTF8",
            "UTF-8",
        ),
    ];

    let before = unique_id("valid-before");
    let after = unique_id("valid-after");
    app.publish(&send_job(&before)).await;
    for (body, message_id, _, _) in &cases {
        let mut props = BasicProperties::default();
        if let Some(m) = message_id {
            props = props.with_message_id(ShortString::from(*m));
        }
        app.publish_raw(body, props).await;
    }
    app.publish(&send_job(&after)).await;

    let results = app.results(cases.len() + 2).await;
    let invalid: Vec<_> = results
        .iter()
        .filter(|r| r.status == Status::Invalid)
        .collect();
    assert_eq!(invalid.len(), cases.len(), "{results:#?}");
    for (_, _, code, word) in &cases {
        let r = invalid
            .iter()
            .find(|r| r.code == *code && r.message.contains(word))
            .unwrap_or_else(|| {
                panic!("no invalid result with {code} mentioning {word}: {invalid:#?}")
            });
        assert_eq!(r.attempts, 0);
    }
    for id in [&before, &after] {
        let r = results
            .iter()
            .find(|r| r.id.as_deref() == Some(id.as_str()))
            .expect("valid job answered");
        assert_eq!(r.status, Status::Sent);
    }

    let mut dead_codes = Vec::new();
    for _ in 0..cases.len() {
        let d = app.next_dead_letter().await;
        let reason = header(&d.properties, HEADER_INVALID_REASON);
        assert!(!reason.is_empty());
        dead_codes.push(header(&d.properties, HEADER_INVALID_CODE));
    }
    dead_codes.sort();
    let mut expected: Vec<String> = cases.iter().map(|c| c.2.to_owned()).collect();
    expected.sort();
    assert_eq!(dead_codes, expected);

    // Only the two valid jobs reached Aliyun.
    let sends = app.fake.requests().iter().filter(|r| r.executed).count();
    assert_eq!(sends, 2);
    // Invalid jobs with a readable id are on record for operators.
    let id = missing["id"].as_str().unwrap();
    let row = app.job_row(id).await;
    assert_eq!(row["status"], "invalid");
    assert!(row["message"].as_str().unwrap().contains("sign_name"));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrected_job_may_reuse_the_id_of_an_invalid_one() {
    let app = TestApp::spawn().await;
    let id = unique_id("fixed");
    let mut broken = send_job(&id);
    broken["code_length"] = json!(99);
    app.publish(&broken).await;
    assert_eq!(app.next_result().await.0.status, Status::Invalid);
    app.publish(&send_job(&id)).await;
    assert_eq!(app.next_result().await.0.status, Status::Sent);
    assert_eq!(app.fake.sends_for(&id), 1);
    app.shutdown().await;
}
