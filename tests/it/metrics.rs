//! `/metrics` of a real worker after real jobs: every family, the values the jobs must have
//! produced, and an exposition a strict reader accepts.

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use aliyun_sms_worker::metrics::FAMILIES;
use aliyun_sms_worker::wire::Status;
use serde_json::{Value, json};

use crate::helpers::{TestApp, admin_get, free_addr, send_job, unique_id, unique_phone};
use crate::prometheus_text::{self, Exposition};

fn on_phone(job: &Value, fault: Fault) -> FaultRule {
    FaultRule::every(fault)
        .on_phone(job["phone_number"].as_str().unwrap_or_default())
        .times(1)
}

fn value(exp: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    exp.value(name, labels)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the scrape"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_codes_latency_retries_receipts_and_rate_limit_waits() {
    let admin = free_addr();
    let admin_setting = admin.clone();
    let app = TestApp::spawn_with(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin_setting);
        // One token at a time, five a second: six quick calls of one action must wait.
        s.insert(config::ALIYUN_MAX_QPS.into(), "5".into());
    })
    .await;

    let sent = send_job(&unique_id("m-sent"));
    let retried = send_job(&unique_id("m-retried"));
    let refused = send_job(&unique_id("m-refused"));
    let odd = send_job(&unique_id("m-odd"));
    app.fake.push_fault(on_phone(&retried, Fault::Http503));
    app.fake.push_fault(on_phone(
        &refused,
        Fault::error("isv.SMS_SIGNATURE_ILLEGAL", "签名不合法"),
    ));
    // A code the worker has never heard of must not become a label value of its own.
    app.fake.push_fault(on_phone(
        &odd,
        Fault::error("isv.SOMETHING_NEW_<b>", "a code from the future"),
    ));
    let sms_id = unique_id("m-sms");
    let sms = json!({
        "id": sms_id, "type": "send_sms", "phone_numbers": [unique_phone()],
        "sign_name": "阿里云短信测试", "template_code": "SMS_154950909",
    });
    for job in [&sent, &retried, &refused, &odd, &sms] {
        app.publish(job).await;
    }
    let results = app.results(5).await;
    let status_of = |id: &Value| {
        results
            .iter()
            .find(|r| r.id.as_deref() == id.as_str())
            .map(|r| r.status)
            .expect("a result for every job")
    };
    assert_eq!(status_of(&sent["id"]), Status::Sent);
    assert_eq!(status_of(&retried["id"]), Status::Sent);
    assert_eq!(status_of(&refused["id"]), Status::Rejected);
    assert_eq!(status_of(&odd["id"]), Status::Rejected);
    assert_eq!(status_of(&sms["id"]), Status::Sent);
    // The receipt counter is bumped before the event is published.
    let receipt = app.next_receipt().await;
    assert_eq!(receipt["delivery_status"], "delivered");

    let (status, text) = admin_get(&admin, "/metrics").await;
    assert_eq!(status, 200);
    let exp = prometheus_text::parse(&text);
    assert_eq!(
        exp.family_names(),
        FAMILIES.to_vec(),
        "the families the worker exports (metrics::FAMILIES is what the dashboard is checked against)"
    );

    let svc = "SendSmsVerifyCode";
    let jobs = |status: &str| {
        value(
            &exp,
            "sms_jobs_total",
            &[("type", "send_verify_code"), ("status", status)],
        )
    };
    assert_eq!(jobs("sent"), 2.0, "{text}");
    assert_eq!(jobs("rejected"), 2.0, "{text}");
    let codes = |action: &str, code: &str| {
        value(
            &exp,
            "sms_aliyun_call_codes_total",
            &[("action", action), ("code", code)],
        )
    };
    assert_eq!(codes(svc, "OK"), 2.0, "{text}");
    assert_eq!(codes(svc, "ServiceUnavailable"), 1.0, "{text}");
    assert_eq!(codes(svc, "isv.SMS_SIGNATURE_ILLEGAL"), 1.0, "{text}");
    assert_eq!(codes(svc, "other"), 1.0, "{text}");
    assert!(!text.contains("SOMETHING_NEW"), "{text}");
    assert_eq!(codes("SendSms", "OK"), 1.0, "{text}");
    assert!(codes("QuerySendDetails", "OK") >= 1.0, "{text}");
    assert_eq!(
        value(
            &exp,
            "sms_aliyun_calls_total",
            &[("action", svc), ("outcome", "retry")]
        ),
        1.0
    );

    assert_eq!(
        value(&exp, "sms_aliyun_retries_total", &[("action", svc)]),
        1.0,
        "{text}"
    );
    let hist = "sms_aliyun_call_duration_seconds";
    assert_eq!(
        value(&exp, &format!("{hist}_count"), &[("action", svc)]),
        5.0,
        "five SendSmsVerifyCode calls, the 503 included: {text}"
    );
    assert_eq!(
        value(
            &exp,
            &format!("{hist}_bucket"),
            &[("action", svc), ("le", "+Inf")]
        ),
        5.0
    );
    let sum = value(&exp, &format!("{hist}_sum"), &[("action", svc)]);
    assert!(sum > 0.0 && sum < 5.0 * 3.0, "sum {sum}");

    // Stages before the result is published are recorded before the test can see the result.
    let stage = "sms_job_stage_duration_seconds";
    for name in ["claim", "aliyun", "record"] {
        assert_eq!(
            value(&exp, &format!("{stage}_count"), &[("stage", name)]),
            5.0,
            "five jobs went through {name}: {text}"
        );
    }

    // Each batch is counted before its jobs hear their answers: all five claims and outcomes
    // are in, in at least one commit each and in no more commits than jobs.
    for write in ["claim", "outcome"] {
        let jobs = value(&exp, "sms_store_batch_jobs_total", &[("write", write)]);
        let batches = value(&exp, "sms_store_batches_total", &[("write", write)]);
        let took = value(&exp, "sms_store_batch_seconds_total", &[("write", write)]);
        assert_eq!(jobs, 5.0, "five jobs' {write} writes: {text}");
        assert!((1.0..=5.0).contains(&batches), "{write}: {text}");
        assert!(took > 0.0 && took < 5.0 * 3.0, "{write}: {text}");
    }

    let waits = value(&exp, "sms_rate_limit_waits_total", &[("action", svc)]);
    let waited = value(
        &exp,
        "sms_rate_limit_wait_seconds_total",
        &[("action", svc)],
    );
    assert!(waits >= 1.0, "{text}");
    assert!(waited > 0.0, "{text}");

    assert_eq!(
        value(&exp, "sms_receipts_total", &[("status", "delivered")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(&exp, "sms_receipts_total", &[("status", "failed")]),
        0.0
    );
    assert_eq!(value(&exp, "sms_worker_ready", &[]), 1.0);
    assert!(value(&exp, "sms_jobs_in_flight", &[]) >= 0.0);
    app.shutdown().await;
}
