//! `send_verify_code` end to end: RabbitMQ → worker → fake Aliyun → Postgres → result.

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use aliyun_sms_worker::sms_client::SmsClient;
use aliyun_sms_worker::wire::Status;
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde_json::json;

use crate::helpers::{PATIENCE, TestApp, amqp_url, next_from, send_job, unique_id};

fn fault_for(phone: &serde_json::Value, fault: Fault, times: Option<u32>) -> FaultRule {
    let rule = FaultRule::every(fault)
        .on_action("SendSmsVerifyCode")
        .on_phone(phone.as_str().unwrap_or_default());
    match times {
        Some(n) => rule.times(n),
        None => rule,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_sent_recorded_and_answered() {
    let app = TestApp::spawn().await;
    let id = unique_id("happy");
    app.publish(&send_job(&id)).await;

    let (result, props) = app.next_result().await;
    assert_eq!(result.id.as_deref(), Some(id.as_str()));
    assert_eq!(result.status, Status::Sent);
    assert_eq!(result.code, "OK");
    assert_eq!(result.attempts, 1);
    let biz_id = result.biz_id.clone().expect("a BizId");
    assert!(biz_id.contains('^'), "{biz_id}");
    assert!(result.request_id.is_some());
    assert!(result.verify_code.is_none(), "not asked for");
    assert_eq!(
        props.correlation_id().as_ref().map(|c| c.as_str()),
        Some(id.as_str()),
        "correlation id defaults to the job id"
    );
    assert_eq!(props.delivery_mode(), &Some(2), "results are persistent");

    let row = app.job_row(&id).await;
    assert_eq!(row["status"], "sent");
    assert_eq!(row["biz_id"], biz_id.as_str());
    assert_eq!(row["attempts"], 1);
    assert_eq!(row["params"]["TemplateCode"], "100001");
    assert_eq!(row["out_id"], id.as_str(), "OutId defaults to the job id");
    assert!(row["finished_at"].is_string());
    let attempts = app.attempts(&id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["http_status"], 200);
    assert_eq!(attempts[0]["outcome"], "success");
    assert_eq!(app.fake.sends_for(&id), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_job_twice_is_sent_once_and_answered_twice_alike() {
    let app = TestApp::spawn().await;
    let id = unique_id("dup");
    let job = send_job(&id);
    // Ten copies at once: the worker handles several concurrently.
    for _ in 0..10 {
        app.publish(&job).await;
    }
    let results = app.results(10).await;
    let first = &results[0];
    assert_eq!(first.status, Status::Sent);
    assert!(
        results.iter().all(|r| r == first),
        "a replayed result is the stored one: {results:#?}"
    );
    assert_eq!(app.fake.calls_for(&id), 1, "exactly one Aliyun call");
    assert_eq!(app.attempts(&id).await.len(), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_and_both_attempts_are_recorded() {
    let app = TestApp::spawn().await;
    let id = unique_id("retry");
    let job = send_job(&id);
    app.fake
        .push_fault(fault_for(&job["phone_number"], Fault::Http503, Some(1)));
    app.publish(&job).await;

    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Sent);
    assert_eq!(result.attempts, 2);
    let attempts = app.attempts(&id).await;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["http_status"], 503);
    assert_eq!(attempts[0]["code"], "ServiceUnavailable");
    assert_eq!(attempts[0]["outcome"], "retry");
    assert_eq!(attempts[1]["outcome"], "success");
    assert_eq!(app.fake.sends_for(&id), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_refusal_is_rejected_after_one_call() {
    let app = TestApp::spawn().await;
    let id = unique_id("rejected");
    let job = send_job(&id);
    app.fake.push_fault(fault_for(
        &job["phone_number"],
        Fault::error("isv.SMS_SIGNATURE_ILLEGAL", "签名不合法"),
        None,
    ));
    app.publish(&job).await;

    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Rejected);
    assert_eq!(result.code, "isv.SMS_SIGNATURE_ILLEGAL");
    assert_eq!(result.message, "签名不合法");
    assert_eq!(app.fake.calls_for(&id), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_number_flow_control_is_rate_limited_and_not_retried() {
    let app = TestApp::spawn().await;
    let id = unique_id("limited");
    let job = send_job(&id);
    app.fake.push_fault(fault_for(
        &job["phone_number"],
        Fault::error("biz.FREQUENCY", "check frequency failed"),
        None,
    ));
    app.publish(&job).await;

    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::RateLimited);
    assert_eq!(result.code, "biz.FREQUENCY");
    assert_eq!(app.fake.calls_for(&id), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_past_the_retry_budget_fails() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::RETRY_MAX_ATTEMPTS.into(), "3".into());
    })
    .await;
    let id = unique_id("throttled");
    let job = send_job(&id);
    app.fake
        .push_fault(fault_for(&job["phone_number"], Fault::Throttling, None));
    app.publish(&job).await;

    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Failed);
    assert_eq!(result.code, "Throttling.User");
    assert_eq!(result.attempts, 3);
    assert!(
        result.message.contains("gave up after 3 attempts"),
        "{}",
        result.message
    );
    assert_eq!(app.fake.calls_for(&id), 3);
    assert_eq!(app.fake.sends_for(&id), 0);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_to_a_send_is_unknown_and_never_resent() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "400".into());
    })
    .await;
    let id = unique_id("hang");
    let job = send_job(&id);
    app.fake
        .push_fault(fault_for(&job["phone_number"], Fault::HangAfterSend, None));
    app.publish(&job).await;

    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Unknown);
    assert_eq!(result.code, "ALIYUN_TIMEOUT");
    assert_eq!(result.attempts, 1);
    assert_eq!(app.fake.sends_for(&id), 1, "the fake did execute it");
    assert_eq!(app.fake.calls_for(&id), 1, "and it was not resent");
    assert_eq!(app.job_row(&id).await["status"], "unknown");
    app.shutdown().await;
}

/// A proxy in front of the API (Envoy's "upstream reset") may answer a bare 503 after it
/// forwarded the send: only Aliyun's own `ServiceUnavailable` proves nothing was executed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_503_after_the_send_went_through_is_unknown_and_not_resent() {
    let app = TestApp::spawn().await;
    let id = unique_id("proxy-503");
    let job = send_job(&id);
    app.fake.push_fault(fault_for(
        &job["phone_number"],
        Fault::Http503AfterSend,
        Some(1),
    ));
    app.publish(&job).await;

    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Unknown, "{result:?}");
    assert_eq!(result.attempts, 1, "{result:?}");
    assert_eq!(app.fake.sends_for(&id), 1, "the fake did execute it");
    assert_eq!(app.fake.calls_for(&id), 1, "and it was not resent");
    let attempts = app.attempts(&id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["http_status"], 503);
    assert_eq!(attempts[0]["outcome"], "unknown");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_to_a_send_is_unknown() {
    let app = TestApp::spawn().await;
    let id = unique_id("five-hundred");
    let job = send_job(&id);
    app.fake
        .push_fault(fault_for(&job["phone_number"], Fault::Http500, Some(1)));
    app.publish(&job).await;
    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Unknown);
    assert_eq!(result.code, "InternalError");
    assert_eq!(app.fake.calls_for(&id), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_fails_without_retrying() {
    let app = TestApp::spawn_with(|s| {
        s.insert(
            config::ALIBABA_CLOUD_ACCESS_KEY_SECRET.into(),
            "not-the-secret".into(),
        );
    })
    .await;
    let id = unique_id("badsig");
    app.publish(&send_job(&id)).await;
    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Failed);
    assert_eq!(result.code, "SignatureDoesNotMatch");
    assert_eq!(result.attempts, 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_v3_is_accepted_by_the_fake() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::ALIYUN_SIGNATURE_VERSION.into(), "v3".into());
    })
    .await;
    let id = unique_id("v3");
    app.publish(&send_job(&id)).await;
    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Sent, "{result:?}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_and_correlation_id_are_honoured() {
    let app = TestApp::spawn().await;
    let (reply_queue, mut replies) = app.reply_queue().await;
    let id = unique_id("reply");
    let props = BasicProperties::default()
        .with_reply_to(ShortString::from(reply_queue.as_str()))
        .with_correlation_id(ShortString::from("corr-123"));
    app.publish_raw(&serde_json::to_vec(&send_job(&id)).unwrap(), props)
        .await;

    let delivery = next_from(&mut replies, "the reply").await;
    assert_eq!(
        delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("corr-123")
    );
    let result: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(result["id"], id.as_str());
    assert_eq!(result["status"], "sent");
    assert_eq!(app.job_row(&id).await["reply_to"], reply_queue.as_str());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_returns_the_code_when_asked() {
    let app = TestApp::spawn().await;
    let client = SmsClient::connect(&amqp_url(), &app.config.queues.jobs)
        .await
        .unwrap();
    let id = unique_id("direct");
    let mut job = send_job(&id);
    job["return_verify_code"] = json!(true);
    let result = client
        .request(&serde_json::to_vec(&job).unwrap(), &id, PATIENCE)
        .await
        .expect("a result over direct reply-to");
    assert_eq!(result.status, Status::Sent);
    let code = result.verify_code.expect("code returned on request");
    assert_eq!(code.len(), 6);
    assert!(code.chars().all(|c| c.is_ascii_digit()), "{code}");

    let row = app.job_row(&id).await;
    assert!(
        !row.to_string().contains(&code),
        "the code is never stored: {row}"
    );
    // A replay of the stored result does not carry the code either.
    let replay = client
        .request(&serde_json::to_vec(&job).unwrap(), &id, PATIENCE)
        .await
        .unwrap();
    assert_eq!(replay.status, Status::Sent);
    assert_eq!(replay.verify_code, None);
    client.close().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_interleaved_among_500_others_keeps_its_own_result() {
    let app = TestApp::spawn().await;
    let special = unique_id("needle");
    let mut special_job = send_job(&special);
    special_job["code_length"] = json!(8);
    let mut ids = Vec::new();
    for i in 0..500 {
        if i == 250 {
            app.publish(&special_job).await;
        }
        let id = unique_id(&format!("hay{i}"));
        app.publish(&send_job(&id)).await;
        ids.push(id);
    }
    let results = app.results(501).await;
    let mut seen = std::collections::HashSet::new();
    for r in &results {
        assert_eq!(r.status, Status::Sent, "{r:?}");
        assert!(seen.insert(r.id.clone().unwrap()), "one result per job");
    }
    assert!(seen.contains(&special));
    let needle = results
        .iter()
        .find(|r| r.id.as_deref() == Some(special.as_str()))
        .unwrap();
    let row = app.job_row(&special).await;
    assert_eq!(row["biz_id"], needle.biz_id.clone().unwrap().as_str());
    assert_eq!(row["params"]["CodeLength"], "8");
    let distinct_biz: std::collections::HashSet<_> =
        results.iter().map(|r| r.biz_id.clone()).collect();
    assert_eq!(distinct_biz.len(), 501, "every job its own BizId");
    app.shutdown().await;
}

/// The worker keeps one connection to Aliyun per job it can have in flight: a second wave of
/// calls as wide as the first reuses the first wave's connections instead of opening more
/// (each a TLS handshake against the real Aliyun). Wider than the 256 idle connections the
/// client used to keep, so that cap would show as new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_wave_of_calls_reuses_the_first_waves_connections() {
    const WIDE: usize = 300;
    // Long enough that a whole wave is in flight at once.
    let app = slow_sends(WIDE, 2000, |_| {}).await;
    for wave in 0..2 {
        all_sent(&app, &format!("wave{wave}"), WIDE).await;
    }
    let opened = app.fake.connections();
    assert!(
        (1..=WIDE).contains(&opened),
        "{opened} connections for two waves of {WIDE} calls"
    );
    app.shutdown().await;
}

/// A worker keeping `jobs` in flight, with no rate limit to speak of, whose sends the fake
/// answers after `ms`; `tweak` adds settings.
async fn slow_sends(
    jobs: usize,
    ms: u64,
    tweak: impl FnOnce(&mut std::collections::HashMap<String, String>),
) -> TestApp {
    let env = crate::helpers::TestEnv::new(|s| {
        s.insert(config::WORKER_CONCURRENCY.into(), jobs.to_string());
        s.insert(config::ALIYUN_MAX_QPS.into(), "100000".into());
        tweak(s);
    })
    .await;
    env.fake
        .push_fault(FaultRule::every(Fault::Latency { ms }).on_action("SendSmsVerifyCode"));
    TestApp::start(env).await
}

/// Publishes `n` jobs at once (ids `label-i`) and waits for their results, every one `sent`.
async fn all_sent(app: &TestApp, label: &str, n: usize) {
    for i in 0..n {
        app.publish(&send_job(&unique_id(&format!("{label}-{i}"))))
            .await;
    }
    let results = app.results(n).await;
    assert!(
        results.iter().all(|r| r.status == Status::Sent),
        "{label}: {:?}",
        results.iter().find(|r| r.status != Status::Sent)
    );
}

/// Issue 13: `ALIYUN_MAX_OPEN_CALLS` bounds the calls open at once, and so the connections
/// (about 30 KiB each, the worker's memory for calls), however many jobs are in flight: forty
/// jobs in flight, four calls open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_calls_are_bounded_whatever_the_jobs_in_flight() {
    const JOBS: usize = 40;
    const OPEN: usize = 4;
    // Slow enough that, unbounded, every job would be in a call at once.
    let app = slow_sends(JOBS, 300, |s| {
        s.insert(config::ALIYUN_MAX_OPEN_CALLS.into(), OPEN.to_string());
    })
    .await;
    all_sent(&app, "open", JOBS).await;
    // A connection handed back a moment after its answer may not be found by the next call,
    // which opens another: twice the bound, and far below one per job.
    let opened = app.fake.connections();
    assert!(
        (1..=2 * OPEN).contains(&opened),
        "{opened} connections for {JOBS} jobs with {OPEN} calls open at most"
    );
    app.shutdown().await;
}
