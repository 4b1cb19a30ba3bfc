//! The abuse guards (issue #11): code guessing, SMS pumping to foreign numbers, the fleet's
//! daily SMS budget. Each holds across workers, so the fleet tests run the built binary beside
//! an in-process worker on one database.

use std::collections::HashMap;

use aliyun_sms_worker::config;
use aliyun_sms_worker::wire::{JobResult, Status};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::dysmsapi::sms_job;
use crate::helpers::{
    PATIENCE, TestApp, TestEnv, admin_get, free_addr, hold_the_number, send_job, unique_id,
    unique_phone,
};
use crate::process::WorkerProcess;

fn check_job(phone: &str, code: &str) -> Value {
    json!({
        "id": unique_id("check"),
        "type": "check_verify_code",
        "phone_number": phone,
        "verify_code": code,
    })
}

/// The same settings for a second worker, without the in-process one's admin port.
fn for_process(settings: &HashMap<String, String>) -> HashMap<String, String> {
    let mut s = settings.clone();
    s.insert(config::ADMIN_ADDR.into(), String::new());
    s
}

fn aliyun_calls(app: &TestApp, action: &str, phone: &str) -> usize {
    app.fake
        .requests()
        .iter()
        .filter(|r| r.action == action && r.phone.as_deref() == Some(phone))
        .count()
}

fn count(results: &[JobResult], status: Status, code: &str) -> usize {
    results
        .iter()
        .filter(|r| r.status == status && r.code == code)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_guessing_stops_at_the_check_limit_across_two_workers() {
    let env = TestEnv::new(|s| {
        s.insert(config::CHECK_MAX_ATTEMPTS.into(), "3".into());
    })
    .await;
    let settings = for_process(&env.settings);
    let app = TestApp::start(env).await;
    let other = WorkerProcess::start(&["run"], &settings).await;

    let mut send = send_job(&unique_id("send"));
    send["return_verify_code"] = json!(true);
    let sent = app.request(&send).await;
    assert_eq!(sent.status, Status::Sent, "{sent:?}");
    let phone = send["phone_number"].as_str().expect("phone").to_owned();

    // An attacker's burst of guesses, taken by both workers at once.
    for guess in 0..8 {
        app.publish(&check_job(&phone, &format!("00000{guess}")))
            .await;
    }
    let results = app.results(8).await;
    let checks: Vec<_> = results
        .into_iter()
        .filter(|r| r.job_type.as_deref() == Some("check_verify_code"))
        .collect();
    assert_eq!(checks.len(), 8, "{checks:#?}");
    assert_eq!(
        count(&checks, Status::NotVerified, "OK"),
        3,
        "three guesses reach Aliyun: {checks:#?}"
    );
    assert_eq!(
        count(&checks, Status::RateLimited, "CHECK_LIMIT"),
        5,
        "the rest are refused: {checks:#?}"
    );
    assert_eq!(
        aliyun_calls(&app, "CheckSmsVerifyCode", &phone),
        3,
        "refused without a call"
    );

    // Another number is not affected.
    let elsewhere = app.request(&check_job("13700137000", "123456")).await;
    assert_ne!(elsewhere.status, Status::RateLimited, "{elsewhere:?}");

    let (status, log) = other.terminate().await;
    assert!(status.success(), "{log}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_check_starts_a_new_window() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::CHECK_MAX_ATTEMPTS.into(), "2".into());
    })
    .await;
    let mut send = send_job(&unique_id("send"));
    send["return_verify_code"] = json!(true);
    let sent = app.request(&send).await;
    let code = sent.verify_code.clone().expect("code returned");
    let phone = send["phone_number"].as_str().expect("phone").to_owned();

    let typo = app.request(&check_job(&phone, "000000")).await;
    assert_eq!(typo.status, Status::NotVerified, "{typo:?}");
    let right = app.request(&check_job(&phone, &code)).await;
    assert_eq!(right.status, Status::Verified, "{right:?}");

    // Two more checks are allowed after the success; the third is not.
    for _ in 0..2 {
        let r = app.request(&check_job(&phone, "000000")).await;
        assert_eq!(r.status, Status::NotVerified, "{r:?}");
    }
    let refused = app.request(&check_job(&phone, "000000")).await;
    assert_eq!(refused.status, Status::RateLimited, "{refused:?}");
    assert_eq!(refused.code, "CHECK_LIMIT");
    assert!(
        !refused.message.contains(&phone),
        "the message names no number: {refused:?}"
    );
    assert_eq!(aliyun_calls(&app, "CheckSmsVerifyCode", &phone), 4);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templated_sms_to_a_country_not_allowed_is_rejected_without_a_call() {
    let app = TestApp::spawn().await;

    let foreign = "2348012345678";
    let alone = app
        .request(&sms_job(&unique_id("ng"), &[format!("+{foreign}")]))
        .await;
    assert_eq!(alone.status, Status::Rejected, "{alone:?}");
    assert_eq!(alone.code, "COUNTRY_NOT_ALLOWED");

    // One foreign number in a batch stops the whole batch: it is one paid call.
    let mixed = app
        .request(&json!({
            "id": unique_id("mixed"),
            "type": "send_batch_sms",
            "phone_numbers": ["13800138000", "+85291234567"],
            "sign_names": ["阿里云", "阿里云"],
            "template_code": "SMS_4",
        }))
        .await;
    assert_eq!(mixed.status, Status::Rejected, "{mixed:?}");
    assert_eq!(mixed.code, "COUNTRY_NOT_ALLOWED");

    let home = app
        .request(&sms_job(&unique_id("cn"), &["13800138000".into()]))
        .await;
    assert_eq!(home.status, Status::Sent, "mainland numbers go: {home:?}");
    let calls: Vec<_> = app
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.action == "SendSms" || r.action == "SendBatchSms")
        .collect();
    assert_eq!(
        calls.len(),
        1,
        "only the mainland send was made: {calls:#?}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_country_allowed_by_setting_is_sent() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::SMS_ALLOWED_COUNTRY_CODES.into(), "86, 852".into());
    })
    .await;
    let hk = app
        .request(&sms_job(&unique_id("hk"), &["+85291234567".into()]))
        .await;
    assert_eq!(hk.status, Status::Sent, "{hk:?}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_budget_holds_across_two_workers_and_shows_what_is_left() {
    let admin = free_addr();
    let env = TestEnv::new(|s| {
        s.insert(config::SMS_DAILY_LIMIT.into(), "5".into());
        s.insert(config::SMS_DAILY_LIMIT_PER_PREFIX.into(), "3".into());
        s.insert(config::ADMIN_ADDR.into(), admin.clone());
    })
    .await;
    let settings = for_process(&env.settings);
    let app = TestApp::start(env).await;
    let other = WorkerProcess::start(&["run"], &settings).await;

    // A redelivered job is answered from its row and spends nothing more.
    let first = sms_job(&unique_id("first"), &["13600000000".into()]);
    for _ in 0..2 {
        let r = app.request(&first).await;
        assert_eq!(r.status, Status::Sent, "{r:?}");
    }
    let fleet_used = || async {
        let (used,): (i32,) = sqlx::query_as("SELECT used FROM sms_daily_usage WHERE scope = '*'")
            .fetch_one(&app.pool)
            .await
            .expect("today's fleet budget row");
        used
    };
    assert_eq!(fleet_used().await, 1);

    // Four numbers of one range, three of another: whatever the order, the range limit
    // lets through at most three of a range, and the fleet's four left in all.
    let numbers: Vec<String> = (0..4)
        .map(|i| format!("1390000000{i}"))
        .chain((0..3).map(|i| format!("1370000000{i}")))
        .collect();
    for (i, n) in numbers.iter().enumerate() {
        let id = unique_id(&format!("budget{i}"));
        // Half of them as verification codes: they are paid SMS too.
        let job = if i % 2 == 0 {
            sms_job(&id, std::slice::from_ref(n))
        } else {
            let mut j = send_job(&id);
            j["phone_number"] = json!(n);
            j
        };
        app.publish(&job).await;
    }
    let results = app.results(7).await;
    assert_eq!(count(&results, Status::Sent, "OK"), 4, "{results:#?}");
    assert_eq!(
        count(&results, Status::RateLimited, "DAILY_LIMIT"),
        3,
        "{results:#?}"
    );
    let paid: Vec<_> = app
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.executed && (r.action == "SendSms" || r.action == "SendSmsVerifyCode"))
        .collect();
    assert_eq!(paid.len(), 5, "refused without a paid call: {paid:#?}");
    for range in ["1390000", "1370000"] {
        let n = paid
            .iter()
            .filter(|r| r.phone.as_deref().is_some_and(|p| p.starts_with(range)))
            .count();
        assert!(n <= 3, "{n} sends to the range {range}");
    }
    assert_eq!(fleet_used().await, 5);

    // Operators see what is left: read at the heartbeat, so wait for the next one.
    let wanted = "sms_daily_sms_budget{scope=\"fleet\",what=\"left\"} 0";
    let metrics = tokio::time::timeout(PATIENCE, async {
        loop {
            let (_, body) = admin_get(&admin, "/metrics").await;
            if body.contains(wanted) {
                return body;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the budget shows on /metrics");
    assert!(metrics.contains("sms_daily_sms_budget{scope=\"fleet\",what=\"used\"} 5"));
    assert!(metrics.contains("sms_daily_sms_budget{scope=\"prefix\",what=\"limit\"} 3"));

    let (status, log) = other.terminate().await;
    assert!(status.success(), "{log}");
    app.shutdown().await;
}

/// A guarded claim holds a connection for its own transaction. An attacker's burst of checks
/// of one number, all waiting for that number's lock (here held by the test, as a slow
/// transaction of another worker would), must not take the whole pool: a send to another
/// number goes through meanwhile, instead of every write timing out as an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_checks_waiting_for_one_number_leaves_the_pool_to_other_jobs() {
    let env = TestEnv::new(|s| {
        s.insert(config::DATABASE_MAX_CONNECTIONS.into(), "6".into());
    })
    .await;
    let pool = PgPool::connect(&env.db_url).await.expect("db");
    let app = TestApp::start(env).await;
    let phone = unique_phone();
    let holder = hold_the_number(&pool, &phone).await;
    for guess in 0..12 {
        app.publish(&check_job(&phone, &format!("00000{guess}")))
            .await;
    }
    // The checks are in their claims, waiting for the lock.
    tokio::time::timeout(PATIENCE, async {
        while sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .fetch_one(&pool)
        .await
        .expect("read pg_locks")
            < 2
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the checks wait for the number's lock");

    let sent = app.request(&send_job(&unique_id("send"))).await;
    assert_eq!(sent.status, Status::Sent, "{sent:?}");

    holder.rollback().await.expect("release the lock");
    let checks = app.results(12).await;
    assert_eq!(
        count(&checks, Status::RateLimited, "CHECK_LIMIT")
            + checks
                .iter()
                .filter(|r| r.status == Status::NotVerified)
                .count(),
        12,
        "every check is answered: {checks:#?}"
    );
    pool.close().await;
    app.shutdown().await;
}
