//! Bad messages: each is answered `invalid`, dead-lettered with its reason, never sent, and
//! never disturbs the valid jobs around it.

use aliyun_sms_worker::broker::{HEADER_INVALID_CODE, HEADER_INVALID_REASON};
use aliyun_sms_worker::wire::{MAX_JOB_BYTES, Status};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ShortString};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{TestApp, job_row, send_job, unique_id, unique_phone};
use crate::poison::{Live, correlated};

pub(crate) fn header(props: &BasicProperties, name: &str) -> String {
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
    // A body that cannot be read keeps the id its message_id gives (the wire contract).
    for (code, id) in [("INVALID_JSON", "m-json"), ("INVALID_UTF8", "m-utf8")] {
        assert!(
            invalid
                .iter()
                .any(|r| r.code == code && r.id.as_deref() == Some(id)),
            "{code} answered as {id}: {invalid:#?}"
        );
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

/// A message that is certainly not a valid job, of one of several hostile kinds.
fn hostile(i: usize, rng: &mut impl rand::Rng) -> Vec<u8> {
    let id = unique_id(&format!("hostile{i}"));
    match i % 8 {
        // Random bytes (mostly invalid UTF-8).
        0 => (0..rng.random_range(0..200))
            .map(|_| rng.random())
            .collect(),
        // Valid JSON of the wrong shape.
        1 => json!([id, 1, 2, {"type": "send_verify_code"}])
            .to_string()
            .into_bytes(),
        // Invalid UTF-8 inside otherwise plausible JSON.
        2 => {
            let mut b =
                format!(r#"{{"id":"{id}","type":"send_verify_code","sign_name":""#).into_bytes();
            b.extend_from_slice(&[0xc3, 0x28, 0xff]);
            b.extend_from_slice(br#""}"#);
            b
        }
        // A huge string: over the size limit.
        3 => {
            let mut job = send_job(&id);
            job["sign_name"] = json!("长".repeat(MAX_JOB_BYTES / 2));
            serde_json::to_vec(&job).unwrap()
        }
        // Deep nesting.
        4 => format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
        // Wrong types for required fields.
        5 => {
            let mut job = send_job(&id);
            job["phone_number"] = json!(13800138000u64);
            job["code_length"] = json!("six");
            serde_json::to_vec(&job).unwrap()
        }
        // A valid job with a field mangled by a random value.
        6 => {
            let mut job = send_job(&id);
            let fields = ["phone_number", "template_param", "code_type", "type", "id"];
            job[fields[rng.random_range(0..fields.len())]] = json!([rng.random::<u32>(), null]);
            serde_json::to_vec(&job).unwrap()
        }
        // A typo'd field name.
        _ => {
            let mut job = send_job(&id);
            job["phone_numbr"] = json!("13800138000");
            serde_json::to_vec(&job).unwrap()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_messages_are_each_refused_and_valid_jobs_still_succeed() {
    const HOSTILE: usize = 10_000;
    const VALID: usize = 50;
    let app = TestApp::spawn().await;
    let mut rng = rand::rng();
    let mut valid_ids = std::collections::HashSet::new();
    for i in 0..HOSTILE {
        app.publish_raw(&hostile(i, &mut rng), BasicProperties::default())
            .await;
        if i % (HOSTILE / VALID) == 0 {
            let id = unique_id("among-hostile");
            app.publish(&send_job(&id)).await;
            valid_ids.insert(id);
        }
    }

    let results = app.results(HOSTILE + VALID).await;
    let invalid = results
        .iter()
        .filter(|r| r.status == Status::Invalid)
        .count();
    assert_eq!(invalid, HOSTILE, "every hostile message answered invalid");
    for r in results.iter().filter(|r| r.status != Status::Invalid) {
        assert_eq!(r.status, Status::Sent, "{r:?}");
        assert!(valid_ids.remove(r.id.as_deref().unwrap_or_default()));
    }
    assert!(
        valid_ids.is_empty(),
        "valid jobs without a result: {valid_ids:?}"
    );
    for _ in 0..HOSTILE {
        let dead = app.next_dead_letter().await;
        assert!(dead.properties.headers().is_some());
    }
    assert_eq!(
        app.fake.requests().iter().filter(|r| r.executed).count(),
        VALID,
        "only the valid jobs reached Aliyun"
    );
    println!("hostile input: {HOSTILE} refused, {VALID} valid jobs sent among them");
    app.shutdown().await;
}

/// A value of the wrong type is named by its field and never quoted, all the way out: serde's
/// own message quotes it ("invalid type: integer `482913`"), so a backend that sends a typed
/// code or a number as a JSON number found it in the result, the dead letter's reason, the row
/// (and so the status page) and the log. Against the worker binary, whose log is read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_of_the_wrong_type_is_named_by_its_field_and_never_quoted_anywhere() {
    let mut live = Live::start().await;
    let phone = unique_phone();
    let as_number: u64 = phone.parse().expect("digits");
    let code = "482913";
    let check_id = unique_id("typed-code");
    let check = json!({
        "id": check_id, "type": "check_verify_code",
        "phone_number": phone, "verify_code": code.parse::<u64>().expect("digits"),
    });
    let mut number = send_job(&unique_id("typed-number"));
    number["phone_number"] = json!(as_number);
    let mut misplaced = send_job(&unique_id("misplaced-number"));
    misplaced["valid_time"] = json!(as_number);
    let mut keyed = send_job(&unique_id("number-as-key"));
    keyed[phone.as_str()] = json!("x");
    let mut typed = send_job(&unique_id("number-as-type"));
    typed["type"] = json!(phone);
    let cases = [
        (&check, "verify_code"),
        (&number, "phone_number"),
        (&misplaced, "valid_time"),
        (&keyed, "unknown field"),
        (&typed, "not a job type"),
    ];
    for (job, _) in &cases {
        let id = job["id"].as_str().expect("an id");
        live.publish_json(job, correlated(id)).await;
    }

    let results = live.results(cases.len()).await;
    let reasons = live.dead_letters(cases.len()).await;
    let pool = PgPool::connect(&live.env.db_url).await.expect("connect");
    for (job, named) in &cases {
        let id = job["id"].as_str().expect("an id");
        let r = &results[id];
        assert_eq!(r.status, Status::Invalid, "{r:?}");
        assert!(r.message.contains(named), "{named} not named: {r:?}");
        let row = job_row(&pool, id).await;
        assert_eq!(row["status"], "invalid", "{row}");
        if job["phone_number"] == json!(phone) {
            // Kept where it belongs, so an operator looking the person up finds the job.
            assert_eq!(row["phone_number"], json!(phone), "{row}");
        }
        let mut stored = row.clone();
        stored["phone_number"] = Value::Null;
        let stored = stored.to_string();
        for (what, text) in [("result", r.message.as_str()), ("row", stored.as_str())] {
            assert!(!text.contains(code), "the code in the {what}: {text}");
            assert!(!text.contains(&phone), "the number in the {what}: {text}");
        }
    }
    for (_, reason) in &reasons {
        assert!(
            !reason.contains(code) && !reason.contains(&phone),
            "a dead letter's reason quotes the value: {reason}"
        );
    }
    pool.close().await;
    let log = live.finish().await;
    assert!(!log.contains(code), "the code in the log:\n{log}");
    assert!(!log.contains(&phone), "the number in the log:\n{log}");
}

/// A job whose `reply_to` names the jobs queue would have its result read back as a job and
/// answered `invalid` — the only answer its producer would see, for a job that was sent. It is
/// refused before Aliyun, and answered on the results queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_naming_the_jobs_queue_is_refused_before_aliyun() {
    let app = TestApp::spawn().await;
    let id = unique_id("reply-to-jobs");
    let props = BasicProperties::default()
        .with_reply_to(ShortString::from(app.config.queues.jobs.as_str()))
        .with_correlation_id(ShortString::from("corr-self"));
    app.publish_raw(&serde_json::to_vec(&send_job(&id)).expect("json"), props)
        .await;
    let (result, props) = app.next_result().await;
    assert_eq!(result.id.as_deref(), Some(id.as_str()), "{result:?}");
    assert_eq!(result.status, Status::Invalid, "{result:?}");
    assert_eq!(result.code, "INVALID_PROPERTY", "{result:?}");
    assert!(result.message.contains("reply_to"), "{result:?}");
    assert_eq!(
        props.correlation_id().as_ref().map(|c| c.as_str()),
        Some("corr-self")
    );
    app.next_dead_letter().await;
    assert_eq!(app.fake.calls_for(&id), 0, "never reached Aliyun");
    // Nothing came back through the jobs queue: the next job's result is the next result.
    let next = unique_id("after-reply-to-jobs");
    app.publish(&send_job(&next)).await;
    let (after, _) = app.next_result().await;
    assert_eq!(after.id.as_deref(), Some(next.as_str()), "{after:?}");
    app.shutdown().await;
}
