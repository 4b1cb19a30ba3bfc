//! The claim in a fleet: its two steps (claimed, then stamped just before the call), the
//! ownership fence on every call, heartbeats through a database outage, stale claims whose
//! message is gone, the result outbox, and a code job's age counted from when it was first seen.
//!
//! Rows a crashed or partitioned worker would leave behind are written directly: that is the
//! state the worker must handle, whatever produced it.

use std::collections::HashMap;
use std::time::Duration;

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use aliyun_sms_worker::wire::{JobResult, Status};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{
    PATIENCE, TestApp, TestEnv, amqp_url, consume, drop_database, eventually, next_from,
    remove_topology_and_close, send_job, unique_id,
};
use crate::process::WorkerProcess;
use crate::proxy::{Proxy, target_of, through};

/// Writes the `sending` row a worker leaves when it dies (or loses its reply) after claiming
/// `job`: claimed by `owner`, stamped or not, last touched `age_s` seconds ago, first seen
/// `created_s` seconds ago, its lease already over.
async fn leave_claim(
    pool: &PgPool,
    job: &Value,
    owner: Uuid,
    stamped: bool,
    age_s: f64,
    created_s: f64,
) {
    sqlx::query(
        "INSERT INTO sms_jobs (id, type, status, phone_number, out_id, claimed_by, lease_until,
                               called_at, created_at, updated_at)
         VALUES ($1, $2, 'sending', $3, $1, $4, now() - interval '1 second',
                 CASE WHEN $5 THEN now() - make_interval(secs => $6) END,
                 now() - make_interval(secs => $7), now() - make_interval(secs => $6))",
    )
    .bind(job["id"].as_str().expect("id"))
    .bind(job["type"].as_str().expect("type"))
    .bind(job["phone_number"].as_str().expect("phone"))
    .bind(owner)
    .bind(stamped)
    .bind(age_s)
    .bind(created_s)
    .execute(pool)
    .await
    .expect("insert the claim");
}

async fn worker_ids(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM sms_workers ORDER BY started_at")
        .fetch_all(pool)
        .await
        .expect("read sms_workers")
}

async fn claimed_by(pool: &PgPool, id: &str) -> Option<Uuid> {
    sqlx::query_scalar("SELECT claimed_by FROM sms_jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("read claimed_by")
}

fn decode(data: &[u8]) -> JobResult {
    serde_json::from_slice(data).expect("a JobResult")
}

/// Settings for a second worker on the same database and fake, on queues of its own, so it
/// receives none of the test's jobs.
fn elsewhere(settings: &HashMap<String, String>) -> HashMap<String, String> {
    let mut s = settings.clone();
    for key in [
        config::SMS_JOBS_QUEUE,
        config::SMS_RESULTS_QUEUE,
        config::SMS_DEAD_LETTER_QUEUE,
        config::SMS_DEAD_LETTER_EXCHANGE,
        config::SMS_RECEIPTS_QUEUE,
    ] {
        let v = format!("{}-elsewhere", s[key]);
        s.insert(key.into(), v);
    }
    s
}

/// Issue 10, defect 4: a claim committed while its reply was lost. Its owner is alive (it is
/// beating) but is not working on the job, which never reached Aliyun; the worker that gets
/// the redelivery takes it over once the claim's lease is over and sends it — not `unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_claim_of_a_live_worker_that_never_called_is_taken_over_and_sent() {
    let env = TestEnv::new(|_| {}).await;
    let owner_settings = elsewhere(&env.settings);
    let owner = WorkerProcess::start(&["run"], &owner_settings).await;
    let pool = PgPool::connect(&env.db_url).await.expect("db");
    let owner_id = worker_ids(&pool).await[0];

    let id = unique_id("lostreply");
    let job = send_job(&id);
    leave_claim(&pool, &job, owner_id, false, 0.5, 0.5).await;
    let app = TestApp::start(env).await;
    app.publish(&job).await;

    let (result, _) = app.next_result().await;
    assert_eq!(result.id.as_deref(), Some(id.as_str()));
    assert_eq!(result.status, Status::Sent, "{result:?}");
    assert_eq!(app.fake.sends_for(&id), 1);
    let taker = claimed_by(&pool, &id).await;
    assert!(
        taker.is_some() && taker != Some(owner_id),
        "the claim changed hands"
    );
    let (status, log) = owner.terminate().await;
    assert!(status.success(), "{log}");
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    remove_topology_and_close(&connection, &owner_settings).await;
    pool.close().await;
    app.shutdown().await;
}

/// The other half of the two steps: a stamped claim of a dead worker may have reached Aliyun,
/// so it ends `unknown` and is never called again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_stamped_claim_ends_unknown_without_a_call() {
    let app = TestApp::spawn().await;
    let id = unique_id("stamped");
    let job = send_job(&id);
    leave_claim(&app.pool, &job, Uuid::new_v4(), true, 1.0, 1.0).await;
    app.publish(&job).await;
    let (result, _) = app.next_result().await;
    assert_eq!(result.status, Status::Unknown, "{result:?}");
    assert_eq!(result.code, "WORKER_INTERRUPTED");
    assert_eq!(app.fake.calls_for(&id), 0, "never called again");
    app.shutdown().await;
}

/// The worker that ends a stale stamped claim records the open call as the job's last attempt;
/// when the owner was alive after all and its answer comes, that answer takes the stand-in's
/// place (the job keeps the final `unknown` already published): an operator sees the call went
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_call_is_recorded_and_its_late_answer_replaces_the_stand_in() {
    use aliyun_sms_worker::store::{AttemptRecord, Followup, Outcome, Store};
    let app = TestApp::spawn().await;
    let id = unique_id("late-owner");
    let job = send_job(&id);
    let owner = Uuid::new_v4();
    leave_claim(&app.pool, &job, owner, true, 1.0, 1.0).await;
    app.publish(&job).await;
    let (result, _) = app.next_result().await;
    assert_eq!(result.code, "WORKER_INTERRUPTED");
    assert_eq!(result.attempts, 1, "{result:?}");
    let stand_in = app.attempts(&id).await;
    assert_eq!(stand_in.len(), 1, "{stand_in:?}");
    assert_eq!(stand_in[0]["code"], "WORKER_INTERRUPTED");
    assert_eq!(stand_in[0]["http_status"], Value::Null);

    let store = Store::from_pool(app.pool.clone());
    let now = chrono::Utc::now();
    let answer = AttemptRecord {
        attempt: 1,
        action: "SendSmsVerifyCode",
        started_at: now,
        finished_at: now,
        http_status: Some(200),
        code: Some("OK".into()),
        message: Some("OK".into()),
        request_id: Some("late-request".into()),
        outcome: "success",
    };
    let outcome = Outcome {
        status: Status::Sent,
        code: "OK".into(),
        message: "OK".into(),
        biz_id: Some("1^1".into()),
        request_id: Some("late-request".into()),
        attempts: 1,
        followup: Followup::None,
    };
    let row = store
        .finish(&id, owner, &outcome, Some(&answer))
        .await
        .expect("the late owner's write");
    assert_eq!(row.status, "unknown", "the published answer stands");
    let recorded = app.attempts(&id).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["code"], "OK", "{recorded:?}");
    assert_eq!(recorded[0]["http_status"], 200, "{recorded:?}");
    assert_eq!(recorded[0]["request_id"], "late-request", "{recorded:?}");
    app.shutdown().await;
}

/// Issue 10, defect 8: a code job without an AMQP timestamp is as old as its first sighting,
/// not its latest redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_jobs_maximum_age_counts_from_when_it_was_first_seen() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::CODE_JOB_MAX_AGE_MS.into(), "60000".into());
    })
    .await;
    let id = unique_id("old");
    let job = send_job(&id);
    // First seen two minutes ago by a worker that died before calling.
    leave_claim(&app.pool, &job, Uuid::new_v4(), false, 120.0, 120.0).await;
    app.publish(&job).await;
    let (result, _) = app.next_result().await;
    assert_eq!(result.status, Status::Expired, "{result:?}");
    assert_eq!(app.fake.calls_for(&id), 0);
    app.shutdown().await;
}

/// Issue 10, defect 5: every call and every retry is fenced on ownership. A job that another
/// worker ended `unknown` while its owner was backing off is not called again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_ended_elsewhere_between_two_attempts_is_not_called_again() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::RETRY_MAX_ATTEMPTS.into(), "20".into());
        s.insert(config::RETRY_INITIAL_DELAY_MS.into(), "400".into());
        s.insert(config::RETRY_MAX_DELAY_MS.into(), "400".into());
        s.insert(config::RETRY_MAX_ELAPSED_MS.into(), "30000".into());
    })
    .await;
    let id = unique_id("fenced");
    let job = send_job(&id);
    app.fake.push_fault(
        FaultRule::every(Fault::Throttling).on_phone(job["phone_number"].as_str().unwrap_or("")),
    );
    app.publish(&job).await;
    let calls = |r: &[aliyun_sms_worker::fake_aliyun::RecordedRequest]| {
        r.iter()
            .filter(|r| r.out_id.as_deref() == Some(&id))
            .count()
    };
    tokio::time::timeout(PATIENCE, app.fake.wait_for(|r| calls(r) >= 2))
        .await
        .expect("the worker is retrying");
    // Another worker's verdict, as it would write it.
    sqlx::query(
        "UPDATE sms_jobs SET status = 'unknown', code = 'WORKER_INTERRUPTED', message = 'x',
                finished_at = now(), lease_until = NULL
         WHERE id = $1 AND status = 'sending'",
    )
    .bind(&id)
    .execute(&app.pool)
    .await
    .expect("end the job");
    let calls_at_verdict = app.fake.calls_for(&id);
    let (result, _) = app.next_result().await;
    assert_eq!(result.status, Status::Unknown, "{result:?}");
    // One call may have been on the wire as the verdict landed; none after it.
    assert!(
        app.fake.calls_for(&id) <= calls_at_verdict + 1,
        "called {} times, {} when it was ended",
        app.fake.calls_for(&id),
        calls_at_verdict
    );
    app.shutdown().await;
}

/// Issue 10, defect 6: a result whose reply queue is gone goes to the results queue, rather
/// than being dropped while its delivery is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_reply_queue_is_gone_goes_to_the_results_queue() {
    let app = TestApp::spawn().await;
    let id = unique_id("noreply");
    let job = send_job(&id);
    app.publish_raw(
        &serde_json::to_vec(&job).expect("json"),
        BasicProperties::default()
            .with_reply_to(format!("smsw-test-gone-{}", Uuid::new_v4().simple()).into())
            .with_correlation_id("corr-1".into()),
    )
    .await;
    let (result, props) = app.next_result().await;
    assert_eq!(result.id.as_deref(), Some(id.as_str()));
    assert_eq!(result.status, Status::Sent);
    assert_eq!(
        props.correlation_id().as_ref().map(|c| c.as_str()),
        Some("corr-1")
    );
    app.shutdown().await;
}

/// Issue 10, defects 6 and 7: the fleet's sweeper ends claims whose message is gone and
/// publishes every result no queue confirmed (the outbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_ends_orphaned_claims_and_publishes_unconfirmed_results() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::SWEEP_INTERVAL_MS.into(), "100".into());
        s.insert(config::RESULT_REPUBLISH_AFTER_MS.into(), "500".into());
        // Long enough that `fresh` (below) is still waiting for its message when the test
        // looks, however slow the machine.
        s.insert(config::ABANDONED_CLAIM_AFTER_MS.into(), "60000".into());
    })
    .await;
    let dead = Uuid::new_v4();
    let called = send_job(&unique_id("orphan-called"));
    let never = send_job(&unique_id("orphan-never"));
    let fresh = send_job(&unique_id("orphan-fresh"));
    leave_claim(&app.pool, &called, dead, true, 1.0, 1.0).await;
    leave_claim(&app.pool, &never, dead, false, 120.0, 120.0).await;
    // Not abandoned yet: its message may still come back.
    leave_claim(&app.pool, &fresh, dead, false, 0.0, 0.0).await;
    // A job finished by a worker that died before it could publish the result.
    let finished = unique_id("unpublished");
    sqlx::query(
        "INSERT INTO sms_jobs (id, type, status, code, message, finished_at, result_published_at)
         VALUES ($1, 'send_verify_code', 'sent', 'OK', 'OK', now() - interval '1 minute', NULL)",
    )
    .bind(&finished)
    .execute(&app.pool)
    .await
    .expect("insert a finished job");

    let mut results: HashMap<String, JobResult> = HashMap::new();
    while results.len() < 3 {
        let (r, _) = app.next_result().await;
        let id = r.id.clone().expect("id");
        assert!(
            results.insert(id.clone(), r).is_none(),
            "{id} published twice"
        );
    }
    let of = |job: &Value| &results[job["id"].as_str().expect("id")];
    assert_eq!(of(&called).status, Status::Unknown);
    assert_eq!(of(&called).code, "WORKER_INTERRUPTED");
    assert_eq!(of(&never).status, Status::Failed);
    assert_eq!(of(&never).code, "ABANDONED");
    assert_eq!(results[&finished].status, Status::Sent);
    assert_eq!(
        app.job_row(fresh["id"].as_str().expect("id")).await["status"],
        "sending"
    );
    for id in results.keys() {
        tokio::time::timeout(PATIENCE, async {
            while app.job_row(id).await["result_published_at"].is_null() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the outbox records the publish");
    }
    assert_eq!(app.fake.requests().len(), 0, "no Aliyun call");
    app.shutdown().await;
}

/// Issue 13: a worker's outcome write presumes its result out, and a confirm costs no write:
/// the rows of finished jobs say so, and the worker's watermark moves past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_result_needs_no_mark_and_moves_the_workers_watermark() {
    let app = TestApp::spawn().await;
    let jobs: Vec<Value> = (0..20)
        .map(|i| send_job(&unique_id(&format!("presumed-{i}"))))
        .collect();
    for job in &jobs {
        app.publish(job).await;
    }
    let results = app.results(jobs.len()).await;
    assert!(results.iter().all(|r| r.status == Status::Sent));
    let (presumed, last): (i64, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE result_published_at = finished_at), max(finished_at)
         FROM sms_jobs",
    )
    .fetch_one(&app.pool)
    .await
    .expect("read the rows");
    assert_eq!(presumed, 20, "every outcome presumed its result out");
    let last = last.expect("finished rows");
    eventually("the watermark passes the last confirmed result", || async {
        let mark: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT results_confirmed_through FROM sms_workers")
                .fetch_one(&app.pool)
                .await
                .expect("the worker's row");
        mark.filter(|m| *m > last)
    })
    .await;
    app.shutdown().await;
}

/// Issue 13: what a worker presumed out is published again by the sweeper only from that
/// worker's watermark on — the results it may have died before seeing confirmed. Earlier ones
/// were confirmed; a worker of an earlier version, with no watermark, presumes nothing (its
/// rows' `result_published_at = finished_at` is what migration 0004 wrote for old rows); and a
/// live worker hands its own unconfirmed results to the outbox, so a watermark it has not
/// written for a while (a slow database) does not make its confirmed results go out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_publishes_what_a_dead_worker_presumed_after_its_watermark() {
    let app = TestApp::spawn_with(|s| {
        s.insert(config::SWEEP_INTERVAL_MS.into(), "100".into());
        s.insert(config::RESULT_REPUBLISH_AFTER_MS.into(), "500".into());
    })
    .await;
    // The test's worker judges another dead only after beating for five of the other's beats:
    // half a second for the dead ones below.
    eventually("the test's worker has beaten for half a second", || async {
        let judged: bool = sqlx::query_scalar(
            "SELECT alive_since <= now() - interval '500 milliseconds' FROM sms_workers",
        )
        .fetch_one(&app.pool)
        .await
        .expect("the worker's row");
        judged.then_some(())
    })
    .await;
    let (dead, older, live) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // The dead ones beat every 100 ms, so the test's worker may judge them after half a second
    // of its own beats; the live one beat just now, and beats every minute, so it stays alive
    // however slow the test.
    sqlx::query(
        "INSERT INTO sms_workers (id, name, started_at, heartbeat_at, alive_since,
                                  results_confirmed_through, heartbeat_ms)
         VALUES ($1, 'killed', now() - interval '1 hour', now() - interval '40 seconds',
                 now() - interval '1 hour', now() - interval '1 minute', 100),
                ($2, 'an earlier version', now() - interval '1 hour', now() - interval '40 seconds',
                 now() - interval '1 hour', NULL, 100),
                ($3, 'alive', now() - interval '1 hour', now(),
                 now() - interval '1 hour', now() - interval '1 minute', 60000)",
    )
    .bind(dead)
    .bind(older)
    .bind(live)
    .execute(&app.pool)
    .await
    .expect("insert the workers");
    let finished = |label: &str, by: Uuid, ago_s: f64, presumed: bool| {
        let (pool, id) = (app.pool.clone(), unique_id(label));
        async move {
            sqlx::query(
                "INSERT INTO sms_jobs (id, type, status, code, message, claimed_by, finished_at,
                                       result_published_at)
                 VALUES ($1, 'send_verify_code', 'sent', 'OK', 'OK', $2,
                         now() - make_interval(secs => $3),
                         CASE WHEN $4 THEN now() - make_interval(secs => $3) END)",
            )
            .bind(&id)
            .bind(by)
            .bind(ago_s)
            .bind(presumed)
            .execute(&pool)
            .await
            .expect("insert a finished job");
            id
        }
    };
    let confirmed = finished("before-the-watermark", dead, 120.0, true).await;
    let unconfirmed = finished("after-the-watermark", dead, 30.0, true).await;
    let old_version = finished("no-watermark", older, 30.0, true).await;
    let live_workers = finished("live-after-its-watermark", live, 30.0, true).await;
    // The dead worker's newest: published last by the sweep that publishes its other one, and
    // judged by the same clause, so a sweep cannot publish it alone.
    let newest = finished("newest-after-the-watermark", dead, 10.0, true).await;

    let mut published = Vec::new();
    while !published.contains(&newest) {
        let (r, _) = app.next_result().await;
        published.push(r.id.expect("id"));
    }
    assert_eq!(published, vec![unconfirmed.clone(), newest.clone()]);
    for id in [&unconfirmed, &newest] {
        eventually("the outbox marks what it published", || async {
            let row = app.job_row(id).await;
            (!row["result_published_at"].is_null()
                && row["result_published_at"] != row["finished_at"])
                .then_some(())
        })
        .await;
    }
    for id in [&confirmed, &old_version, &live_workers] {
        let row = app.job_row(id).await;
        assert_eq!(
            row["result_published_at"], row["finished_at"],
            "{id} left alone"
        );
    }
    app.shutdown().await;
}

/// Issue 10, defect 5: after a database outage longer than five beats, every heartbeat is old.
/// A worker that just came back must not take a live worker's job in flight for dead: it waits,
/// and both results say `sent`, with one send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_database_outage_no_live_worker_is_taken_for_dead() {
    let env = TestEnv::new(|_| {}).await;
    let db = Proxy::start(target_of(&env.db_url)).await;
    let mut settings = env.settings.clone();
    settings.insert(config::DATABASE_URL.into(), through(&env.db_url, &db));
    // One job at a time, so the second copy of the job goes to the other worker.
    settings.insert(config::WORKER_CONCURRENCY.into(), "1".into());
    settings.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "25000".into());
    let id = unique_id("outage");
    let job = send_job(&id);
    env.fake.push_fault(
        FaultRule::every(Fault::Latency { ms: 16_000 })
            .on_phone(job["phone_number"].as_str().unwrap_or("")),
    );
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    // The worker with the job in flight beats every 2 s (dead after 10 s of silence); the
    // other one every 200 ms, so it is back and judging long before the first one beats again.
    let mut slow_beat = settings.clone();
    slow_beat.insert(config::WORKER_HEARTBEAT_MS.into(), "2000".into());
    let first = WorkerProcess::start(&["run"], &slow_beat).await;
    let mut results = consume(&connection, &settings[config::SMS_RESULTS_QUEUE]).await;
    let publisher = aliyun_sms_worker::sms_client::SmsClient::connect(
        &amqp_url(),
        &settings[config::SMS_JOBS_QUEUE],
    )
    .await
    .expect("client");
    let body = serde_json::to_vec(&job).expect("json");
    publisher.publish(&body, &id).await.expect("publish");
    // The fake records a request when it answers; the stamp says the call is on its way.
    let pool = PgPool::connect(&env.db_url).await.expect("db");
    tokio::time::timeout(PATIENCE, async {
        while sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT called_at FROM sms_jobs WHERE id = $1",
        )
        .bind(&id)
        .fetch_optional(&pool)
        .await
        .expect("read the claim")
        .flatten()
        .is_none()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the first worker is calling");
    pool.close().await;
    let second = WorkerProcess::start(&["run"], &settings).await;
    assert_eq!(env.fake.requests().len(), 0, "the call is still in flight");

    // Longer than five of the first worker's beats without the database; then the second copy
    // arrives at the second worker.
    db.cut();
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    db.restore();
    publisher.publish(&body, &id).await.expect("publish again");

    let a = decode(&next_from(&mut results, "a result").await.data);
    let b = decode(&next_from(&mut results, "a second result").await.data);
    for r in [&a, &b] {
        assert_eq!(r.id.as_deref(), Some(id.as_str()));
        assert_eq!(r.status, Status::Sent, "{r:?}");
    }
    assert_eq!(env.fake.sends_for(&id), 1);
    for w in [first, second] {
        let (status, log) = w.terminate().await;
        assert!(status.success(), "{log}");
    }
    publisher.close().await;
    remove_topology_and_close(&connection, &settings).await;
    drop_database(&env.db_name).await;
}

/// Receipts, delivery events and reconciliation happen once per fleet: three workers, one
/// delivery event per number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_publish_one_delivery_event_per_number() {
    let env = TestEnv::new(|s| {
        s.insert(config::WORKER_HEARTBEAT_MS.into(), "100".into());
    })
    .await;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(WorkerProcess::start(&["run"], &env.settings).await);
    }
    let mut receipts = consume(&connection, &env.settings[config::SMS_RECEIPTS_QUEUE]).await;
    let mut results = consume(&connection, &env.settings[config::SMS_RESULTS_QUEUE]).await;
    let publisher = aliyun_sms_worker::sms_client::SmsClient::connect(
        &amqp_url(),
        &env.settings[config::SMS_JOBS_QUEUE],
    )
    .await
    .expect("client");
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = unique_id(&format!("receipt{i}"));
        let job = serde_json::json!({
            "id": id, "type": "send_sms", "phone_numbers": [crate::helpers::unique_phone()],
            "sign_name": "阿里云短信测试", "template_code": "SMS_154950909",
            "template_param": {"code": "1234"},
        });
        publisher
            .publish(&serde_json::to_vec(&job).expect("json"), &id)
            .await
            .expect("publish");
        ids.push(id);
    }
    for _ in &ids {
        let r = decode(&next_from(&mut results, "a result").await.data);
        assert_eq!(r.status, Status::Sent, "{r:?}");
    }
    let mut events: HashMap<String, usize> = HashMap::new();
    while events.len() < ids.len() {
        let d = next_from(&mut receipts, "a delivery event").await;
        let event: Value = serde_json::from_slice(&d.data).expect("JSON");
        *events
            .entry(event["job_id"].as_str().expect("job_id").to_owned())
            .or_default() += 1;
    }
    // Every poller has had several rounds by now; none may have published an event again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(
        Duration::from_millis(200),
        futures_util::StreamExt::next(&mut receipts),
    )
    .await
    {
        let event: Value = serde_json::from_slice(&d.data).expect("JSON");
        *events
            .entry(event["job_id"].as_str().expect("job_id").to_owned())
            .or_default() += 1;
    }
    for id in &ids {
        assert_eq!(events.get(id), Some(&1), "{id}: {events:?}");
    }
    for w in workers {
        let (status, log) = w.terminate().await;
        assert!(status.success(), "{log}");
    }
    publisher.close().await;
    remove_topology_and_close(&connection, &env.settings).await;
    drop_database(&env.db_name).await;
}

/// During a rolling upgrade, binaries from before the two-step claim still write `sending`
/// rows without a stamp, even mid-call. Such a row counts as called: never taken over and sent
/// again, but ended `unknown` once its owner is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_written_by_an_older_binary_is_never_sent_again() {
    let app = TestApp::spawn().await;
    let id = unique_id("oldbinary");
    let job = send_job(&id);
    // The INSERT of the previous release: no called_at column.
    sqlx::query(
        "INSERT INTO sms_jobs (id, type, status, phone_number, claimed_by, lease_until)
         VALUES ($1, 'send_verify_code', 'sending', $2, gen_random_uuid(), now() - interval '1 second')",
    )
    .bind(&id)
    .bind(job["phone_number"].as_str())
    .execute(&app.pool)
    .await
    .expect("insert the old claim");
    app.publish(&job).await;
    let (result, _) = app.next_result().await;
    assert_eq!(result.status, Status::Unknown, "{result:?}");
    assert_eq!(result.code, "WORKER_INTERRUPTED");
    assert_eq!(app.fake.calls_for(&id), 0, "never resent");
    app.shutdown().await;
}

/// Issue 13: under load the heartbeat's lease renewal deadlocked with the batched outcome
/// writes (the bench's 50 ms run: "deadlock detected" every beat, and the worker paused
/// consumption, taking the deadlock for an outage). A renewal must never wait for a row whose
/// outcome is being written: that row is about to be final, and its lease does not matter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_leases_never_waits_for_a_claim_whose_outcome_is_being_written() {
    let (db_name, store, pool) = migrated_store().await;
    let owner = Uuid::new_v4();
    // "a" comes first in the index, so a renewal that waited would hold it while waiting.
    let (a, b) = (send_job("renew-a"), send_job("renew-b"));
    for job in [&a, &b] {
        leave_claim(&pool, job, owner, true, 0.0, 0.0).await;
    }
    let ids = [a["id"].as_str().expect("id"), b["id"].as_str().expect("id")];
    // An outcome write in flight: it holds "b" and, like a batch, goes on to "a".
    let mut finishing = pool.begin().await.expect("begin");
    sqlx::query("UPDATE sms_jobs SET status = 'sent', finished_at = now() WHERE id = $1")
        .bind(ids[1])
        .execute(&mut *finishing)
        .await
        .expect("finish b");
    let renewed = tokio::time::timeout(
        PATIENCE,
        store.renew_claims(
            owner,
            &[ids[1].to_owned(), ids[0].to_owned()],
            (Duration::from_secs(60), Duration::from_secs(60)),
            Duration::from_secs(2),
        ),
    )
    .await
    .expect("the renewal waited for a row being finished");
    renewed.expect("renewal");
    sqlx::query("UPDATE sms_jobs SET status = 'sent', finished_at = now() WHERE id = $1")
        .bind(ids[0])
        .execute(&mut *finishing)
        .await
        .expect("finish a: no deadlock");
    finishing.commit().await.expect("commit the outcomes");
    let leases: Vec<(String, bool)> = sqlx::query_as(
        "SELECT id, lease_until > now() + interval '30 seconds' FROM sms_jobs ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("leases");
    // "a" was free and renewed; "b" was skipped, and is final now anyway.
    assert_eq!(
        leases,
        vec![(ids[0].to_owned(), true), (ids[1].to_owned(), false)]
    );
    pool.close().await;
    drop_database(&db_name).await;
}

/// A claim's lease is renewed once it has run for half a beat, not at every beat: most jobs
/// end sooner, and renewing every claim in flight at every beat cost Postgres a new version of
/// each row (with its index entries), hundreds a second under load (issue 13). A stamped claim
/// is renewed for the job's lease, one never stamped for the claim's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_renewed_once_it_has_run_for_half_a_beat_and_not_before() {
    let (db_name, store, pool) = migrated_store().await;
    let owner = Uuid::new_v4();
    let (claim_lease, job_lease): (u32, u32) = (30, 60);
    let mut ids = Vec::new();
    for (label, stamped, fresh) in [
        ("lease-fresh-stamped", true, true),
        ("lease-fresh-claim", false, true),
        ("lease-old-stamped", true, false),
        ("lease-old-claim", false, false),
    ] {
        let job = send_job(label);
        leave_claim(&pool, &job, owner, stamped, 0.0, 0.0).await;
        let id = job["id"].as_str().expect("id").to_owned();
        if fresh {
            // Claimed a moment ago, for its whole lease.
            sqlx::query(
                "UPDATE sms_jobs SET lease_until = now() + make_interval(secs => $2) WHERE id = $1",
            )
            .bind(&id)
            .bind(f64::from(if stamped { job_lease } else { claim_lease }))
            .execute(&pool)
            .await
            .expect("a fresh lease");
        }
        ids.push(id);
    }
    let before = [
        row_version(&pool, &ids[0]).await,
        row_version(&pool, &ids[1]).await,
    ];
    store
        .renew_claims(
            owner,
            &ids,
            (
                Duration::from_secs(claim_lease.into()),
                Duration::from_secs(job_lease.into()),
            ),
            Duration::from_secs(10),
        )
        .await
        .expect("renewal");
    assert_eq!(
        [
            row_version(&pool, &ids[0]).await,
            row_version(&pool, &ids[1]).await
        ],
        before,
        "leases set within half a beat are left alone"
    );
    let leases: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM lease_until - now())::double precision
         FROM sms_jobs WHERE id = ANY($1) ORDER BY array_position($1, id)",
    )
    .bind(&ids[2..])
    .fetch_all(&pool)
    .await
    .expect("the renewed leases");
    assert!(
        leases.len() == 2
            && (f64::from(job_lease) - 5.0..=f64::from(job_lease)).contains(&leases[0])
            && (f64::from(claim_lease) - 5.0..=f64::from(claim_lease)).contains(&leases[1]),
        "a stamped claim runs for the job's lease, an unstamped one for the claim's: {leases:?}"
    );
    pool.close().await;
    drop_database(&db_name).await;
}

/// The transaction that wrote the row's current version: any update changes it.
async fn row_version(pool: &PgPool, id: &str) -> String {
    sqlx::query_scalar("SELECT xmin::text FROM sms_jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("the row's version")
}

/// A claim counted under a guard waits for its number's lock in a transaction of its own; its
/// lease counts from when the claim is written, not from when that transaction began. Once, a
/// claim that had waited longer than its lease committed one already over, which a copy of the
/// job delivered elsewhere could take over before the owner stamped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_claim_that_waited_for_its_number_gets_its_whole_lease() {
    use aliyun_sms_worker::config::CheckLimit;
    use aliyun_sms_worker::store::{Claim, Guards, ReplyRoute};

    let (db_name, store, pool) = migrated_store().await;
    let body = serde_json::json!({
        "id": unique_id("waitedlease"),
        "type": "check_verify_code",
        "phone_number": crate::helpers::unique_phone(),
        "verify_code": "123456",
    });
    let job = aliyun_sms_worker::wire::decode_job(body.to_string().as_bytes(), None)
        .expect("a valid job");
    let number = crate::helpers::hold_the_number(&pool, job.phone().as_str()).await;
    let claiming = {
        let (store, job) = (store.clone(), job.clone());
        tokio::spawn(async move {
            let guards = Guards {
                refusal: None,
                number_limits: None,
                check_limit: Some(CheckLimit {
                    max_attempts: 5,
                    window: Duration::from_secs(600),
                }),
                daily: None,
            };
            store
                .claim(
                    &job,
                    &ReplyRoute::default(),
                    Uuid::new_v4(),
                    Duration::from_secs(1),
                    &guards,
                    None,
                )
                .await
        })
    };
    // Longer than its lease.
    crate::helpers::a_claim_waited_for_its_number(&pool, 1.5).await;
    number.rollback().await.expect("release the number");
    let claim = claiming.await.expect("the claim did not panic");
    assert!(matches!(claim, Ok(Claim::Owned(_))), "{claim:?}");
    let left: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM lease_until - now())::double precision FROM sms_jobs
         WHERE id = $1",
    )
    .bind(&job.id)
    .fetch_one(&pool)
    .await
    .expect("the claim's lease");
    assert!(left > 0.5, "the lease had {left} s left once claimed");
    pool.close().await;
    drop_database(&db_name).await;
}

/// A store on a database of its own, migrated: its name (to drop), the store and its pool.
async fn migrated_store() -> (String, aliyun_sms_worker::store::Store, PgPool) {
    let (db_name, db_url) = crate::helpers::create_database().await;
    let store = aliyun_sms_worker::store::Store::connect(&db_url, 4)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let pool = store.pool().clone();
    (db_name, store, pool)
}
