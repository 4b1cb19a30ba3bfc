//! The operator commands against a database a real worker filled.

use std::time::{Duration, Instant};

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use serde_json::Value;

use crate::helpers::{PATIENCE, TestApp, send_job, unique_id};
use crate::process::run_to_end;

/// The fleet as an operator must see it: the test's live worker holding one job (its call to
/// the fake is slow), and a worker that stopped beating 3 hours ago with a claim still on.
pub(crate) struct Fleet {
    pub live: String,
    pub dead: String,
    pub held_job: String,
}

/// Long enough for every look at the fleet, within the settings of [`hold_slow_calls`].
const SLOW_CALL: Duration = Duration::from_secs(25);

/// Lets a call as slow as [`SLOW_CALL`] run its course instead of timing out.
pub(crate) fn hold_slow_calls(settings: &mut std::collections::HashMap<String, String>) {
    settings.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "60000".into());
    // The planted dead worker's claim must stay for the test to read it: the leader's sweep
    // (every 5 s by default) would end it `unknown` in the middle of the test.
    settings.insert(config::SWEEP_INTERVAL_MS.into(), "3600000".into());
}

pub(crate) async fn hold_a_job_and_plant_a_dead_worker(app: &TestApp) -> Fleet {
    let held_job = unique_id("fleet-held");
    let job = send_job(&held_job);
    app.fake.push_fault(
        FaultRule::every(Fault::Latency {
            ms: SLOW_CALL.as_millis() as u64,
        })
        .on_phone(job["phone_number"].as_str().unwrap_or_default())
        .times(1),
    );
    app.publish(&job).await;
    let deadline = Instant::now() + PATIENCE;
    let live = loop {
        let row = app.job_row(&held_job).await;
        if row["status"] == "sending"
            && let Some(worker) = row["claimed_by"].as_str()
        {
            break worker.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the slow job was never claimed: {row}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let dead = uuid::Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO sms_workers (id, name, started_at, heartbeat_at)
         VALUES ($1::uuid, 'crashed-worker', now() - interval '1 day', now() - interval '3 hours')",
    )
    .bind(&dead)
    .execute(&app.pool)
    .await
    .expect("plant a dead worker");
    sqlx::query(
        "INSERT INTO sms_jobs (id, type, status, claimed_by, lease_until)
         VALUES ($1, 'send_sms', 'sending', $2::uuid, now() + interval '1 hour')",
    )
    .bind(unique_id("fleet-orphan"))
    .bind(&dead)
    .execute(&app.pool)
    .await
    .expect("plant its claim");
    Fleet {
        live,
        dead,
        held_job,
    }
}

fn short(id: &str) -> &str {
    &id[..8]
}

async fn cli(app: &TestApp, args: &[&str]) -> (i32, String) {
    let db = app.config.database_url.expose().to_owned();
    let (code, stdout, _) = run_to_end([(config::DATABASE_URL, db.as_str())], args).await;
    (code, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_show_and_stats_answer_operators_questions() {
    let app = TestApp::spawn_with(hold_slow_calls).await;
    let sent = unique_id("ops-sent");
    let retried = unique_id("ops-retried");
    let refused = unique_id("ops-refused");
    let retried_job = send_job(&retried);
    let refused_job = send_job(&refused);
    let fault = |job: &Value, fault| {
        FaultRule::every(fault)
            .on_phone(job["phone_number"].as_str().unwrap_or_default())
            .times(1)
    };
    app.fake.push_fault(fault(&retried_job, Fault::Http503));
    app.fake.push_fault(fault(
        &refused_job,
        Fault::error("isv.SMS_SIGNATURE_ILLEGAL", "签名不合法"),
    ));
    let sent_job = send_job(&sent);
    for job in [&sent_job, &retried_job, &refused_job] {
        app.publish(job).await;
    }
    app.results(3).await;

    let (code, out) = cli(&app, &["jobs", "list", "--status", "sent", "--json"]).await;
    assert_eq!(code, 0);
    let listed: Vec<Value> = serde_json::from_str(&out).expect("JSON list");
    let ids: Vec<&str> = listed.iter().filter_map(|j| j["id"].as_str()).collect();
    assert!(
        ids.contains(&sent.as_str()) && ids.contains(&retried.as_str()),
        "{out}"
    );
    assert!(
        !ids.contains(&refused.as_str()),
        "filtered by status: {out}"
    );

    let phone = sent_job["phone_number"].as_str().unwrap();
    let (_, by_phone) = cli(&app, &["jobs", "list", "--phone", phone, "--since", "1h"]).await;
    assert!(by_phone.contains(&sent), "{by_phone}");
    assert!(
        !by_phone.contains(phone),
        "the table masks numbers: {by_phone}"
    );
    // Written as a person would say it, the same number.
    let grouped = format!("+86 {} {} {}", &phone[..3], &phone[3..7], &phone[7..]);
    let (_, by_grouped) = cli(&app, &["jobs", "list", "--phone", &grouped]).await;
    assert!(by_grouped.contains(&sent), "{grouped}: {by_grouped}");
    // A status or type no job can have is a mistake, not an empty list.
    // It says which values there are.
    for (option, typo, one_of_them) in [
        ("--status", "delivered", "rate_limited"),
        ("--type", "send_code", "send_batch_sms"),
    ] {
        let db = app.config.database_url.expose().to_owned();
        let (code, out, err) = run_to_end(
            [(config::DATABASE_URL, db.as_str())],
            &["jobs", "list", option, typo],
        )
        .await;
        assert_eq!(code, 2, "{option} {typo}: {out}");
        assert!(err.contains(one_of_them), "{option} {typo}: {err}");
    }

    let (code, shown) = cli(&app, &["jobs", "show", &retried, "--json"]).await;
    assert_eq!(code, 0);
    let detail: Value = serde_json::from_str(&shown).expect("JSON detail");
    assert_eq!(detail["job"]["status"], "sent");
    let attempts = detail["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["http_status"], 503);
    assert!(attempts[0]["duration_ms"].is_number());
    let (_, table) = cli(&app, &["jobs", "show", &retried]).await;
    assert!(table.contains("ServiceUnavailable"), "{table}");

    let (code, _) = cli(&app, &["jobs", "show", "no-such-job"]).await;
    assert_eq!(code, 2);
    // An id half-copied is answered with the ids that start with it, never with a guess.
    let db = app.config.database_url.expose().to_owned();
    let cut = &retried[..retried.len() - 6];
    let (code, shown, said) = run_to_end(
        [(config::DATABASE_URL, db.as_str())],
        &["jobs", "show", cut],
    )
    .await;
    assert_eq!(code, 2, "{shown}");
    assert!(said.contains(&retried), "the candidates: {said}");

    let (_, stats) = cli(&app, &["stats", "--since", "1h", "--json"]).await;
    let stats: Value = serde_json::from_str(&stats).expect("JSON stats");
    assert_eq!(stats["total"], 3);
    let top = &stats["top_codes"][0];
    assert_eq!(top["code"], "isv.SMS_SIGNATURE_ILLEGAL");
    assert_eq!(top["meaning"], "signature (sign name) not approved");
    let (_, text) = cli(&app, &["stats"]).await;
    assert!(text.contains("33.3%"), "{text}");

    let fleet = hold_a_job_and_plant_a_dead_worker(&app).await;
    let (code, stats) = cli(&app, &["stats", "--json"]).await;
    assert_eq!(code, 0, "{stats}");
    let stats: Value = serde_json::from_str(&stats).expect("JSON stats");
    let workers = stats["workers"].as_array().expect("a workers list");
    let worker = |id: &str| {
        workers
            .iter()
            .find(|w| w["id"] == id)
            .unwrap_or_else(|| panic!("worker {id} not listed: {stats}"))
    };
    let live = worker(&fleet.live);
    assert_eq!(live["state"], "live", "{live}");
    assert_eq!(live["held"], 1, "the slow job {}: {live}", fleet.held_job);
    assert!(
        live["heartbeat_age_ms"]
            .as_i64()
            .is_some_and(|ms| ms < 10_000)
    );
    let dead = worker(&fleet.dead);
    assert_eq!(dead["state"], "dead", "{dead}");
    assert_eq!(dead["held"], 1, "{dead}");
    assert_eq!(dead["name"], "crashed-worker");
    assert_eq!(
        workers.len(),
        2,
        "only the live and the claiming dead: {stats}"
    );

    let (_, text) = cli(&app, &["stats"]).await;
    let line = |id: &str| {
        text.lines()
            .find(|l| l.contains(short(id)))
            .unwrap_or_else(|| panic!("no line for worker {id}:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    let live = line(&fleet.live);
    assert_eq!(
        (live[0], live.last().copied()),
        ("live", Some("1")),
        "{text}"
    );
    let dead = line(&fleet.dead);
    assert_eq!(
        (dead[0], dead[1], dead[dead.len() - 4..].join(" ")),
        ("dead", "crashed-worker", "3 h ago 1".to_owned()),
        "{text}"
    );
    assert!(
        text.contains("1 live worker(s) (0 draining), holding 1 job(s)")
            && text.contains("ALARM: 1 worker(s) stopped beating but still hold 1 sending job(s)"),
        "{text}"
    );
    app.shutdown().await;
}
