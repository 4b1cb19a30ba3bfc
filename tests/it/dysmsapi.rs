//! `send_sms` and `send_batch_sms`: sends, refusals, receipts, and unknown outcomes reconciled
//! through QuerySendDetails.

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use aliyun_sms_worker::wire::Status;
use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually, unique_id, unique_phone};

pub(crate) fn sms_job(id: &str, phones: &[String]) -> Value {
    json!({
        "id": id,
        "type": "send_sms",
        "phone_numbers": phones,
        "sign_name": "阿里云短信测试",
        "template_code": "SMS_154950909",
        "template_param": {"code": "1234"},
    })
}

fn batch_job(id: &str, phones: &[String]) -> Value {
    json!({
        "id": id,
        "type": "send_batch_sms",
        "phone_numbers": phones,
        "sign_names": phones.iter().map(|_| "阿里云").collect::<Vec<_>>(),
        "template_code": "SMS_4",
        "template_params": phones.iter().enumerate().map(|(i, _)| json!({"name": format!("n{i}")})).collect::<Vec<_>>(),
    })
}

fn phones(n: usize) -> Vec<String> {
    (0..n).map(|_| unique_phone()).collect()
}

fn error_fault(action: &str, code: &str) -> FaultRule {
    FaultRule::every(Fault::error(code, "from the fake"))
        .on_action(action)
        .times(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_sms_to_three_numbers_is_sent_and_each_receipt_arrives() {
    let app = TestApp::spawn().await;
    let id = unique_id("sms");
    let numbers = phones(3);
    app.publish(&sms_job(&id, &numbers)).await;

    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Sent, "{result:?}");
    assert_eq!(result.job_type.as_deref(), Some("send_sms"));
    let biz_id = result.biz_id.clone().expect("BizId");
    assert_eq!(app.fake.sends_for(&id), 1, "one call for three numbers");

    let mut receipted = Vec::new();
    for _ in 0..3 {
        let event = app.next_receipt().await;
        assert_eq!(event["type"], "delivery");
        assert_eq!(event["job_id"], id.as_str());
        assert_eq!(event["delivery_status"], "delivered");
        assert_eq!(event["err_code"], "DELIVERED");
        assert_eq!(event["biz_id"], biz_id.as_str());
        assert!(event["received_at"].is_string());
        receipted.push(event["phone_number"].as_str().unwrap().to_owned());
    }
    receipted.sort();
    let mut expected = numbers.clone();
    expected.sort();
    assert_eq!(receipted, expected);

    let rows = app.deliveries(&id).await;
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row["delivery_status"], "delivered");
        assert!(row["received_at"].is_string());
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_batch_sms_sends_parallel_lists_in_one_call() {
    for version in ["v1", "v3"] {
        let app = TestApp::spawn_with(|s| {
            s.insert(config::ALIYUN_SIGNATURE_VERSION.into(), version.into());
        })
        .await;
        let id = unique_id("batch");
        app.publish(&batch_job(&id, &phones(3))).await;
        let result = app.next_result().await.0;
        assert_eq!(result.status, Status::Sent, "{version}: {result:?}");
        assert_eq!(app.fake.sends_for(&id), 1);
        for _ in 0..3 {
            assert_eq!(app.next_receipt().await["delivery_status"], "delivered");
        }
        app.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_class_for_dysmsapi_sends() {
    let app = TestApp::spawn().await;
    let cases = [
        ("isv.SMS_TEMPLATE_ILLEGAL", Status::Rejected),
        ("isv.BUSINESS_LIMIT_CONTROL", Status::RateLimited),
        ("isv.AMOUNT_NOT_ENOUGH", Status::Failed),
    ];
    for (action, make) in [
        ("SendSms", sms_job as fn(&str, &[String]) -> Value),
        ("SendBatchSms", batch_job),
    ] {
        for (code, status) in cases {
            app.fake.push_fault(error_fault(action, code));
            let id = unique_id("err");
            app.publish(&make(&id, &phones(2))).await;
            let result = app.next_result().await.0;
            assert_eq!(result.status, status, "{action} {code}: {result:?}");
            assert_eq!(result.code, code);
            assert_eq!(app.fake.calls_for(&id), 1, "{action} {code}: not retried");
            assert!(app.deliveries(&id).await.is_empty(), "nothing to track");
        }
    }
    // Throttled, then accepted.
    app.fake.push_fault(
        FaultRule::every(Fault::Throttling)
            .on_action("SendSms")
            .times(1),
    );
    let id = unique_id("throttled");
    app.publish(&sms_job(&id, &phones(1))).await;
    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Sent);
    assert_eq!(result.attempts, 2);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_dysmsapi_jobs_are_refused_before_aliyun() {
    let app = TestApp::spawn().await;
    let too_many: Vec<String> = (0..1001).map(|i| format!("1390000{i:04}")).collect();
    let mut bad_number = sms_job(&unique_id("bad"), &phones(2));
    bad_number["phone_numbers"][1] = json!("12345");
    let mut not_strings = sms_job(&unique_id("nostr"), &phones(1));
    not_strings["template_param"] = json!({"code": 1234});
    let mut uneven = batch_job(&unique_id("uneven"), &phones(3));
    uneven["sign_names"] = json!(["a", "b"]);
    let cases = [
        (sms_job(&unique_id("many"), &too_many), "phone_numbers"),
        (bad_number, "phone_numbers[1]"),
        (not_strings, "template_param"),
        (batch_job(&unique_id("big"), &phones(101)), "phone_numbers"),
        (uneven, "sign_names"),
    ];
    for (job, field) in &cases {
        app.publish(job).await;
        let result = app.next_result().await.0;
        assert_eq!(result.status, Status::Invalid, "{field}");
        assert!(
            result.message.contains(field),
            "{field}: {}",
            result.message
        );
    }
    assert!(app.fake.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_send_sms_is_sent_once() {
    let app = TestApp::spawn().await;
    let id = unique_id("sms-dup");
    let job = sms_job(&id, &phones(2));
    // Ten copies at once: the worker handles several concurrently.
    for _ in 0..10 {
        app.publish(&job).await;
    }
    let results = app.results(10).await;
    assert!(results.iter().all(|r| *r == results[0]), "{results:#?}");
    assert_eq!(results[0].status, Status::Sent);
    assert_eq!(app.fake.calls_for(&id), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_send_that_aliyun_recorded_is_reconciled_to_sent() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "400".into());
        s.insert(config::RECONCILE_GRACE_MS.into(), "60000".into());
    })
    .await;
    let id = unique_id("lost-sent");
    let numbers = phones(1);
    app.fake.push_fault(
        FaultRule::every(Fault::HangAfterSend)
            .on_action("SendSms")
            .on_phone(numbers[0].clone())
            .times(1),
    );
    app.publish(&sms_job(&id, &numbers)).await;

    let first = app.next_result().await.0;
    assert_eq!(first.status, Status::Unknown);
    let second = app.next_result().await.0;
    assert_eq!(second.id.as_deref(), Some(id.as_str()));
    assert_eq!(second.status, Status::Sent, "{second:?}");
    assert!(
        second.message.contains("found by OutId"),
        "{}",
        second.message
    );
    assert_eq!(app.fake.sends_for(&id), 1, "found, not resent");
    // And its receipt is then tracked like any send.
    let event = app.next_receipt().await;
    assert_eq!(event["job_id"], id.as_str());
    assert_eq!(event["delivery_status"], "delivered");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_send_that_aliyun_never_got_ends_failed_after_the_grace_period() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "400".into());
    })
    .await;
    let id = unique_id("lost-unsent");
    let numbers = phones(2);
    app.fake
        .push_fault(FaultRule::every(Fault::Hang).on_action("SendSms").times(1));
    app.publish(&sms_job(&id, &numbers)).await;
    assert_eq!(app.next_result().await.0.status, Status::Unknown);
    let second = app.next_result().await.0;
    assert_eq!(second.status, Status::Failed, "{second:?}");
    assert_eq!(second.code, "NOT_SENT");
    assert_eq!(app.fake.sends_for(&id), 0);
    assert_eq!(app.job_row(&id).await["status"], "failed");
    app.shutdown().await;
}

/// Publishes a `send_sms` to one new number whose call gets `fault` (its answer lost) and
/// whose lookups QuerySendDetails refuses (403 `Forbidden.RAM`, a RAM policy that allows
/// `dysms:SendSms` only), and waits for its `unknown`. Returns the job's id and its number.
async fn lost_with_lookups_refused(app: &TestApp, label: &str, fault: Fault) -> (String, String) {
    let id = unique_id(label);
    let numbers = phones(1);
    let phone = numbers[0].clone();
    app.fake.push_fault(
        FaultRule::every(fault)
            .on_action("SendSms")
            .on_phone(phone.clone())
            .times(1),
    );
    app.fake.push_fault(
        FaultRule::every(Fault::error_with_status(
            "Forbidden.RAM",
            "RAM permission denied",
            403,
        ))
        .on_action("QuerySendDetails")
        .on_phone(phone.clone()),
    );
    app.publish(&sms_job(&id, &numbers)).await;
    assert_eq!(app.next_result().await.0.status, Status::Unknown);
    (id, phone)
}

/// A lost send whose lookups keep failing past the grace period (a RAM policy that allows
/// `dysms:SendSms` but not QuerySendDetails) is asked less and less often. Asked every round,
/// forever, such rows also sort first for every round's batch and keep newer unknown sends
/// from their turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_send_whose_lookups_keep_failing_is_asked_less_and_less_often() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "400".into());
        s.insert(config::RECONCILE_GRACE_MS.into(), "300".into());
        s.insert(config::RECEIPTS_POLL_INTERVAL_MS.into(), "100".into());
    })
    .await;
    let (id, phone) = lost_with_lookups_refused(&app, "lost-unasked", Fault::Hang).await;
    let grace_over: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT reconcile_until FROM sms_jobs WHERE id = $1")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .expect("the unknown send is being reconciled");

    let after_grace = eventually("five lookups after the grace period", || async {
        let at: Vec<_> = app
            .fake
            .requests()
            .into_iter()
            .filter(|r| r.action == "QuerySendDetails" && r.phone.as_deref() == Some(&phone))
            .map(|r| r.at)
            .filter(|at| *at > grace_over)
            .collect();
        (at.len() >= 5).then_some(at)
    })
    .await;
    // Each wait is as long as the lookups have been overdue: 0.1, 0.1, 0.2, then 0.4 s. Asked
    // every round (0.1 s), the last gap is a tenth of a second.
    let last_gap = after_grace[4] - after_grace[3];
    assert!(
        last_gap >= chrono::Duration::milliseconds(300),
        "the fifth lookup after the grace period came {last_gap} after the fourth: {after_grace:?}"
    );
    assert_eq!(app.fake.sends_for(&id), 0);
    app.shutdown().await;
}

/// Aliyun keeps a day's send details for 30 days. A lost send that no lookup could decide in
/// that time must not then be read as "never sent" from the empty answer about a day Aliyun
/// has forgotten: that invites a second paid SMS. It stays `unknown`, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_send_older_than_aliyuns_details_is_never_called_never_sent() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "400".into());
        s.insert(config::RECONCILE_GRACE_MS.into(), "60000".into());
        s.insert(config::RECEIPTS_POLL_INTERVAL_MS.into(), "100".into());
    })
    .await;
    let (id, _) = lost_with_lookups_refused(&app, "lost-forgotten", Fault::HangAfterSend).await;
    // Thirty-two days of refused lookups, then QuerySendDetails answers again. Aged between
    // two rounds: a round that has claimed the row (its next lookup pushed a lease away) would
    // still look it up by the day it was really sent.
    eventually("the unknown send aged between two lookups", || async {
        sqlx::query_scalar::<_, String>(
            "UPDATE sms_jobs SET created_at = now() - interval '32 days',
                    reconcile_until = now() - interval '1 day', next_reconcile_at = now()
             WHERE id = $1 AND next_reconcile_at < now() + interval '30 seconds'
             RETURNING id",
        )
        .bind(&id)
        .fetch_optional(&app.pool)
        .await
        .expect("age the unknown send")
    })
    .await;
    app.fake.clear_faults();

    let second = app.next_result().await.0;
    assert_eq!(second.id.as_deref(), Some(id.as_str()));
    assert_eq!(second.status, Status::Unknown, "{second:?}");
    assert_eq!(second.code, "NOT_RECONCILED", "{second:?}");
    assert!(second.message.contains("30 days"), "{}", second.message);
    let row = app.job_row(&id).await;
    assert_eq!(row["status"], "unknown");
    assert_eq!(row["code"], "NOT_RECONCILED");
    assert_eq!(
        app.fake.sends_for(&id),
        1,
        "the send went out and is not repeated"
    );
    app.shutdown().await;
}

/// No Aliyun endpoint redirects. A client that followed a 307 would post the call again, its
/// body (a batch's numbers and template values) included, to wherever the answer points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_never_followed() {
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a listener");
    elsewhere
        .set_nonblocking(true)
        .expect("a listener that does not block");
    let location = format!("http://{}/", elsewhere.local_addr().expect("its address"));
    let app = TestApp::spawn().await;
    app.fake.push_fault(
        FaultRule::every(Fault::Redirect { location })
            .on_action("SendBatchSms")
            .times(1),
    );
    let id = unique_id("redirect");
    app.publish(&batch_job(&id, &phones(2))).await;

    let result = app.next_result().await.0;
    // An answer that is not Aliyun's may follow a send that went through: not resent.
    assert_eq!(result.status, Status::Unknown, "{result:?}");
    let attempts = app.attempts(&id).await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0]["http_status"], 307, "{attempts:?}");
    assert_eq!(app.fake.calls_for(&id), 1);
    // The call went out before its result did: a connection that followed it is waiting.
    match elsewhere.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the worker followed the redirect: {other:?}"),
    }
    app.shutdown().await;
}
