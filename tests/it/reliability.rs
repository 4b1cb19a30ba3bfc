//! The two promises under stress: every job gets a final result, no job is sent twice — across
//! kill -9, SIGTERM under load, and deadlines.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use aliyun_sms_worker::sms_client::SmsClient;
use aliyun_sms_worker::wire::Status;
use chrono::Utc;
use lapin::BasicProperties;
use serde_json::{Value, json};

use crate::helpers::{PATIENCE, TestApp, TestEnv, amqp_url, send_job, unique_id};
use crate::process::WorkerProcess;

async fn publish_all(settings: &HashMap<String, String>, jobs: &[Value]) {
    let client = SmsClient::connect(&amqp_url(), &settings[config::SMS_JOBS_QUEUE])
        .await
        .expect("client");
    for job in jobs {
        let id = job["id"].as_str().expect("id");
        client
            .publish(&serde_json::to_vec(job).expect("json"), id)
            .await
            .expect("publish");
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_in_flight_when_the_worker_is_killed_ends_unknown_and_is_not_resent() {
    let env = TestEnv::new(|s| {
        // The call hangs; the worker would wait this long for it.
        s.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "60000".into());
    })
    .await;
    let id = unique_id("crash");
    let job = send_job(&id);
    env.fake.push_fault(
        FaultRule::every(Fault::HangAfterSend)
            .on_phone(job["phone_number"].as_str().unwrap_or_default())
            .times(1),
    );
    let worker = WorkerProcess::start(&["run"], &env.settings).await;
    publish_all(&env.settings, std::slice::from_ref(&job)).await;
    let sent = tokio::time::timeout(
        PATIENCE,
        env.fake.wait_for(|r| {
            r.iter()
                .any(|r| r.executed && r.out_id.as_deref() == Some(&id))
        }),
    );
    sent.await.expect("the send reached the fake");

    let (status, _) = worker.kill9().await;
    assert!(!status.success(), "killed, not exited");

    // A new worker gets the redelivered job; its owner is dead, so it is not sent again.
    let app = TestApp::start(env).await;
    let result = app.next_result().await.0;
    assert_eq!(result.id.as_deref(), Some(id.as_str()));
    assert_eq!(result.status, Status::Unknown, "{result:?}");
    assert_eq!(result.code, "WORKER_INTERRUPTED");
    // The call that was open counts, and the job's attempts show it: not a job that never
    // called.
    assert_eq!(result.attempts, 1, "{result:?}");
    let attempts = app.attempts(&id).await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0]["code"], "WORKER_INTERRUPTED", "{attempts:?}");
    assert_eq!(attempts[0]["outcome"], "unknown", "{attempts:?}");
    assert_eq!(attempts[0]["action"], "SendSmsVerifyCode", "{attempts:?}");
    assert_eq!(app.fake.sends_for(&id), 1, "sent exactly once");
    assert_eq!(app.fake.calls_for(&id), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_and_loses_or_doubles_nothing() {
    let grace = Duration::from_secs(5);
    let env = TestEnv::new(|s| {
        s.insert(
            config::SHUTDOWN_GRACE_MS.into(),
            grace.as_millis().to_string(),
        );
        s.insert(config::WORKER_CONCURRENCY.into(), "16".into());
    })
    .await;
    env.fake
        .push_fault(FaultRule::every(Fault::Latency { ms: 150 }));
    let jobs: Vec<Value> = (0..150)
        .map(|i| send_job(&unique_id(&format!("term{i}"))))
        .collect();
    let ids: HashSet<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    let worker = WorkerProcess::start(&["run"], &env.settings).await;
    publish_all(&env.settings, &jobs).await;
    tokio::time::timeout(PATIENCE, env.fake.wait_for(|r| r.len() >= 20))
        .await
        .expect("the worker is busy");

    let asked = Instant::now();
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}\n{log}");
    assert!(
        asked.elapsed() < grace + Duration::from_secs(5),
        "stopped within the grace period (took {:?})",
        asked.elapsed()
    );
    assert!(log.contains("worker stopped"), "{log}");

    env.fake.clear_faults();
    let app = TestApp::start(env).await;
    let mut answered = HashSet::new();
    while answered.len() < ids.len() {
        let (result, _) = app.next_result().await;
        let id = result.id.clone().expect("id");
        assert!(ids.contains(&id), "a result for an unknown job: {result:?}");
        assert_eq!(result.status, Status::Sent, "{result:?}");
        answered.insert(id);
    }
    for id in &ids {
        assert_eq!(app.fake.sends_for(id), 1, "{id} sent exactly once");
        assert_eq!(app.job_row(id).await["status"], "sent");
    }
    app.shutdown().await;
}

/// A log reader that goes away (a shipper restarted, `run 2>&1 | grep -m1 …`) must stop neither
/// the jobs nor the drain. tracing-subscriber reports a failed write with `eprintln!`, which
/// panics on a closed stderr: the worker exited 101 at its next line, or — when the panic was in
/// the task that turns SIGTERM into a drain — ran on deaf to SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_log_pipe_neither_stops_the_worker_nor_deafens_it_to_sigterm() {
    let env = TestEnv::new(|_| {}).await;
    let jobs: Vec<Value> = (0..5)
        .map(|i| send_job(&unique_id(&format!("nolog{i}"))))
        .collect();
    let ids: HashSet<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut worker = WorkerProcess::start(&["run"], &env.settings).await;
    worker.stop_reading_log().await;
    publish_all(&env.settings, &jobs).await;
    tokio::time::timeout(
        PATIENCE,
        env.fake.wait_for(|r| {
            r.iter()
                .filter(|r| r.executed && r.out_id.as_ref().is_some_and(|o| ids.contains(o)))
                .count()
                == ids.len()
        }),
    )
    .await
    .expect("every job reached Aliyun with nobody reading the log");

    let (status, _) = worker.terminate().await;
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    let app = TestApp::start(env).await;
    for id in &ids {
        assert_eq!(app.job_row(id).await["status"], "sent", "{id}");
        assert_eq!(app.fake.sends_for(id), 1, "{id}");
    }
    app.shutdown().await;
}

/// How many of `ids` are still claimed (`sending`).
async fn still_sending(pool: &sqlx::PgPool, ids: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sms_jobs WHERE id = ANY($1) AND status = 'sending'")
        .bind(ids)
        .fetch_one(pool)
        .await
        .expect("count the claims")
}

/// A worker process with room for one call at a time, given `count` jobs: the first one's call
/// hangs (the fake executed it and never answers), and the others are claimed, stamped, and
/// wait for room behind it. Returns the worker and the jobs' ids, the hanging one first.
async fn waiting_behind_a_hanging_call(
    env: &TestEnv,
    label: &str,
    count: usize,
) -> (WorkerProcess, Vec<String>) {
    let jobs: Vec<Value> = (0..count)
        .map(|i| send_job(&unique_id(&format!("{label}{i}"))))
        .collect();
    let ids: Vec<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    env.fake.push_fault(
        FaultRule::every(Fault::HangAfterSend)
            .on_phone(jobs[0]["phone_number"].as_str().unwrap_or_default())
            .times(1),
    );
    let mut narrow = env.settings.clone();
    narrow.insert(config::ALIYUN_MAX_OPEN_CALLS.into(), "1".into());
    let worker = WorkerProcess::start(&["run"], &narrow).await;
    publish_all(&env.settings, &jobs[..1]).await;
    tokio::time::timeout(
        PATIENCE,
        env.fake
            .wait_for(|r| r.iter().any(|r| r.out_id.as_deref() == Some(&ids[0]))),
    )
    .await
    .expect("the first call is open");
    publish_all(&env.settings, &jobs[1..]).await;
    let pool = sqlx::PgPool::connect(&env.db_url).await.expect("connect");
    let behind = i64::try_from(count - 1).unwrap_or(i64::MAX);
    crate::helpers::eventually("the others claimed behind it", || async {
        (still_sending(&pool, &ids[1..]).await == behind).then_some(())
    })
    .await;
    pool.close().await;
    (worker, ids)
}

/// A worker paused (SIGSTOP, a frozen VM) while its claimed jobs wait for room to call is
/// taken for dead: the fleet ends those claims `unknown` and answers for them. Resumed, it
/// must not call Aliyun for them: it did, sending codes the backend had been told were
/// `unknown`, and Dysmsapi sends the fleet could later declare never sent (found by an
/// adversarial black-box test with three worker processes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_resumed_after_the_fleet_ended_its_claims_calls_nothing() {
    let env = TestEnv::new(|s| {
        s.insert("RUST_LOG".into(), "info".into());
        s.insert(config::WORKER_HEARTBEAT_MS.into(), "200".into());
        s.insert(config::SWEEP_INTERVAL_MS.into(), "200".into());
        s.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "3000".into());
        s.insert(config::SHUTDOWN_GRACE_MS.into(), "20000".into());
    })
    .await;
    let (paused, ids) = waiting_behind_a_hanging_call(&env, "paused", 6).await;
    let pool = sqlx::PgPool::connect(&env.db_url).await.expect("connect");
    let ours = |r: &aliyun_sms_worker::fake_aliyun::RecordedRequest| {
        r.out_id.as_ref().is_some_and(|o| ids[1..].contains(o))
    };
    paused.pause();

    // The rest of the fleet takes it for dead and ends what it held.
    let app = TestApp::start(env).await;
    crate::helpers::eventually("the paused worker's claims ended by the fleet", || async {
        (still_sending(&pool, &ids[1..]).await == 0).then_some(())
    })
    .await;
    pool.close().await;

    let resumed_at = chrono::Utc::now();
    paused.resume();
    // It drains what it held (SIGTERM waits for its jobs) and exits.
    let (status, log) = paused.terminate().await;
    assert!(status.success(), "{status:?}\n{log}");
    let late: Vec<_> = app
        .fake
        .requests()
        .into_iter()
        .filter(|r| ours(r) && r.at > resumed_at)
        .map(|r| (r.out_id, r.executed))
        .collect();
    assert!(
        late.is_empty(),
        "called after the fleet had answered: {late:?}"
    );
    for id in &ids {
        assert!(app.fake.sends_for(id) <= 1, "{id}");
        assert_ne!(app.job_row(id).await["status"], "sending", "{id}");
    }
    app.shutdown().await;
}

/// A stop whose grace runs out while jobs wait for room to call: those never reached Aliyun,
/// so the next worker sends them. Their claims were stamped before the wait (the call's
/// commit saved), and were ended `unknown` like the one caught in its call (found by an
/// operator's walkthrough: SHUTDOWN_GRACE_MS shorter than a slow call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_never_called_when_the_grace_runs_out_are_sent_by_the_next_worker() {
    let env = TestEnv::new(|s| {
        s.insert("RUST_LOG".into(), "info".into());
        s.insert(config::SHUTDOWN_GRACE_MS.into(), "500".into());
        s.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "20000".into());
    })
    .await;
    let (worker, ids) = waiting_behind_a_hanging_call(&env, "graceless", 3).await;

    let (status, log) = worker.terminate().await;
    assert!(status.success(), "{status:?}\n{log}");
    // Both wait behind the hanging call, so both are handed back. (Once, under the whole
    // suite's load, one of them was counted in a call instead: then it ends `unknown`, as a job
    // in a call must. What counts is that each one handed back is sent, and only those.)
    let handed_back: usize = log
        .split("handed_back=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no hand-back in the log:\n{log}"));
    assert!(handed_back >= 1, "{log}");
    let app = TestApp::start(env).await;
    let mut finals = HashMap::new();
    while finals.len() < ids.len() {
        let (result, _) = app.next_result().await;
        finals.insert(result.id.clone().unwrap_or_default(), result);
    }
    let requests = app.fake.requests();
    assert_eq!(
        finals[&ids[0]].status,
        Status::Unknown,
        "{:?}\n{requests:?}",
        finals[&ids[0]]
    );
    let sent = ids[1..]
        .iter()
        .filter(|id| finals[*id].status == Status::Sent)
        .count();
    assert_eq!(sent, handed_back, "{finals:#?}\n{requests:?}\n{log}");
    for id in &ids[1..] {
        assert!(app.fake.sends_for(id) <= 1, "{id}: {requests:?}");
        assert!(
            matches!(finals[id].status, Status::Sent | Status::Unknown),
            "{:?}",
            finals[id]
        );
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_jobs_make_no_aliyun_call() {
    let app = TestApp::spawn().await;
    // An explicit deadline in the past.
    let late = unique_id("late");
    let mut job = send_job(&late);
    job["expires_at"] = json!((Utc::now() - chrono::Duration::seconds(1)).to_rfc3339());
    app.publish(&job).await;
    // A code job published (AMQP timestamp) eleven minutes ago, past the default maximum age.
    let stale = unique_id("stale");
    let published =
        u64::try_from((Utc::now() - chrono::Duration::minutes(11)).timestamp()).unwrap();
    app.publish_raw(
        &serde_json::to_vec(&send_job(&stale)).unwrap(),
        BasicProperties::default().with_timestamp(published),
    )
    .await;
    // A notification SMS has no maximum age: only an explicit deadline expires it.
    let old_sms = unique_id("old-sms");
    app.publish_raw(
        &serde_json::to_vec(&json!({
            "id": old_sms, "type": "send_sms", "phone_numbers": ["13900001234"],
            "sign_name": "阿里云", "template_code": "SMS_1"
        }))
        .unwrap(),
        BasicProperties::default().with_timestamp(published),
    )
    .await;

    let results: HashMap<String, Status> = app
        .results(3)
        .await
        .into_iter()
        .map(|r| (r.id.unwrap(), r.status))
        .collect();
    assert_eq!(results[&late], Status::Expired);
    assert_eq!(results[&stale], Status::Expired);
    assert_eq!(results[&old_sms], Status::Sent);
    assert_eq!(app.fake.calls_for(&late), 0);
    assert_eq!(app.fake.calls_for(&stale), 0);
    assert_eq!(app.job_row(&late).await["code"], "EXPIRED");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_never_run_past_the_deadline() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::RETRY_MAX_ATTEMPTS.into(), "50".into());
        s.insert(config::RETRY_INITIAL_DELAY_MS.into(), "50".into());
        s.insert(config::RETRY_MAX_DELAY_MS.into(), "100".into());
    })
    .await;
    let id = unique_id("deadline");
    let mut job = send_job(&id);
    let deadline = Utc::now() + chrono::Duration::milliseconds(800);
    job["expires_at"] = json!(deadline.to_rfc3339());
    app.fake.push_fault(
        FaultRule::every(Fault::Throttling)
            .on_phone(job["phone_number"].as_str().unwrap_or_default()),
    );
    app.publish(&job).await;
    let result = app.next_result().await.0;
    assert_eq!(result.status, Status::Failed, "{result:?}");
    assert!(
        result.attempts < 50,
        "stopped by the deadline, not the budget"
    );
    let calls: Vec<_> = app
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.out_id.as_deref() == Some(id.as_str()))
        .collect();
    assert!(!calls.is_empty());
    for call in calls {
        assert!(
            call.at <= deadline,
            "a call at {} after the deadline {deadline}",
            call.at
        );
    }
    app.shutdown().await;
}

/// Runs 60 jobs against a fake that allows 25 calls per action per second; returns how many
/// calls it throttled.
async fn throttled_calls(worker_qps: &str) -> usize {
    let env = TestEnv::with_fake(
        |fake| fake.max_qps = Some(25),
        |s| {
            s.insert(config::ALIYUN_MAX_QPS.into(), worker_qps.into());
            s.insert(config::RETRY_MAX_ATTEMPTS.into(), "20".into());
        },
    )
    .await;
    let app = TestApp::start(env).await;
    for i in 0..60 {
        app.publish(&send_job(&unique_id(&format!("burst{i}"))))
            .await;
    }
    let results = app.results(60).await;
    let throttled = app
        .fake
        .requests()
        .iter()
        .filter(|r| r.code.starts_with("Throttling"))
        .count();
    if throttled == 0 {
        for r in results {
            assert_eq!((r.status, r.attempts), (Status::Sent, 1), "{r:?}");
        }
    }
    app.shutdown().await;
    throttled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_bucket_causes_no_throttling_at_aliyun() {
    assert_eq!(
        throttled_calls("20").await,
        0,
        "the bucket spreads the burst"
    );
    // Control: the same burst without the bucket does hit the fake's limit.
    assert!(
        throttled_calls("100000").await > 0,
        "the fake's limit bites"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_failing_is_dead_lettered_after_the_delivery_limit() {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions};
    use lapin::types::{FieldTable, ShortString};

    let mut app = TestApp::spawn_with(|s| {
        s.insert(config::SMS_JOBS_DELIVERY_LIMIT.into(), "3".into());
    })
    .await;
    // The worker declared the topology; now a consumer that crashes on every delivery (as a
    // worker with a bug would) takes its place.
    app.stop_worker().await;
    let body = serde_json::to_vec(&send_job(&unique_id("poison"))).unwrap();
    app.publish_raw(&body, BasicProperties::default()).await;
    let channel = app.channel().await;
    let mut failing = channel
        .basic_consume(
            ShortString::from(app.config.queues.jobs.as_str()),
            ShortString::from("crashing-consumer"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut deliveries = 0;
    let dead = async {
        loop {
            tokio::select! {
                d = failing.next() => {
                    let d = d.expect("consumer open").expect("delivery");
                    deliveries += 1;
                    d.acker
                        .nack(BasicNackOptions { requeue: true, ..Default::default() })
                        .await
                        .unwrap();
                }
                dead = app.next_dead_letter() => return dead,
            }
        }
    };
    let dead = tokio::time::timeout(PATIENCE, dead)
        .await
        .expect("dead-lettered");
    assert_eq!(dead.data, body, "the message itself, untouched");
    assert!(
        (3..=4).contains(&deliveries),
        "dead-lettered after the limit of 3 redeliveries, not looped: {deliveries} deliveries"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_per_number_limit_holds_across_two_workers() {
    // The fake's own Interval would refuse the second send: this test is about the worker's limit.
    let env = TestEnv::with_fake(
        |fake| fake.enforce_interval = false,
        |s| {
            s.insert(config::LOCAL_NUMBER_LIMIT_ENABLED.into(), "true".into());
            s.insert(config::LOCAL_NUMBER_LIMITS.into(), "2/min,3/h".into());
            s.insert("RUST_LOG".into(), "info".into());
        },
    )
    .await;
    let settings = env.settings.clone();
    let app = TestApp::start(env).await;
    let other = WorkerProcess::start(&["run"], &settings).await;

    let phone = crate::helpers::unique_phone();
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = unique_id(&format!("limited{i}"));
        let mut job = send_job(&id);
        job["phone_number"] = json!(phone);
        app.publish(&job).await;
        ids.push(id);
    }
    let other_number = unique_id("other-number");
    app.publish(&send_job(&other_number)).await;

    let results = app.results(7).await;
    let for_phone: Vec<_> = results
        .iter()
        .filter(|r| r.id.as_deref() != Some(other_number.as_str()))
        .collect();
    let sent = for_phone
        .iter()
        .filter(|r| r.status == Status::Sent)
        .count();
    let limited: Vec<_> = for_phone
        .iter()
        .filter(|r| r.status == Status::RateLimited)
        .collect();
    assert_eq!(sent, 2, "{for_phone:#?}");
    assert_eq!(limited.len(), 4, "{for_phone:#?}");
    assert!(limited.iter().all(|r| r.code == "LOCAL_NUMBER_LIMIT"));
    let paid = app
        .fake
        .requests()
        .iter()
        .filter(|r| r.executed && r.phone.as_deref() == Some(phone.as_str()))
        .count();
    assert_eq!(paid, 2, "refused locally, without a paid call");
    let other_result = results
        .iter()
        .find(|r| r.id.as_deref() == Some(other_number.as_str()))
        .expect("the other number's result");
    assert_eq!(
        other_result.status,
        Status::Sent,
        "other numbers are not affected"
    );

    let (status, _) = other.terminate().await;
    assert!(status.success());
    app.shutdown().await;
}

/// An id is the idempotency key: a backend that reuses one for a new job (another number) gets
/// the first job's answer and nothing is sent, which is right, but it was silent: the log said
/// "replaying its stored result" under the new number, as if that number had been sent to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_reused_for_another_number_is_answered_from_the_first_and_said_so() {
    let env = TestEnv::new(|s| {
        s.insert("RUST_LOG".into(), "info".into());
    })
    .await;
    let mut worker = WorkerProcess::start(&["run"], &env.settings).await;
    let id = unique_id("reused");
    let first = crate::helpers::unique_phone();
    let second = crate::helpers::unique_phone();
    let sent = crate::cli::enqueue(
        &env.settings,
        &["send-verify-code", "--phone", &first, "--id", &id],
    )
    .await;
    assert_eq!(sent["status"], "sent", "{sent}");
    let replayed = crate::cli::enqueue(
        &env.settings,
        &["send-verify-code", "--phone", &second, "--id", &id],
    )
    .await;
    assert_eq!(replayed["biz_id"], sent["biz_id"], "{replayed}");
    assert!(
        worker.wait_for_log("this id was used before").await,
        "{}",
        worker.log.join("\n")
    );
    assert_eq!(env.fake.sends_for(&id), 1);
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "{log}");
    assert!(!log.contains(&second), "a full number in the log: {log}");
    env.remove().await;
}
