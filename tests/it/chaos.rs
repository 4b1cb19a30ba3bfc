//! Chaos: 2,000 jobs while the broker link is cut twice and the worker is killed (-9) and
//! restarted twice. Afterwards every job has exactly one final row and at least one result
//! that agrees with it, every job is `sent` (sent once) or `unknown` (only what the killed
//! workers had in hand), and no job was sent twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aliyun_sms_worker::config;
use futures_util::StreamExt;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;

use crate::helpers::{
    PATIENCE, TestEnv, amqp_url, consume, drop_database, publish_jobs, remove_topology_and_close,
    send_job, unique_id,
};
use crate::process::WorkerProcess;
use crate::proxy::{Proxy, target_of, through};

const JOBS: usize = 2000;
/// Jobs one worker holds at most; only those of the two killed workers may end `unknown`.
const CONCURRENCY: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_jobs_through_broker_cuts_and_kill_9s() {
    let env = TestEnv::new(|s| {
        s.insert("RUST_LOG".into(), "info".into());
        s.insert(config::WORKER_CONCURRENCY.into(), CONCURRENCY.to_string());
    })
    .await;
    let amqp = env.settings[config::AMQP_URL].clone();
    let broker = Proxy::start(target_of(&amqp)).await;
    let settings = {
        let mut s = env.settings.clone();
        s.insert(config::AMQP_URL.into(), through(&amqp, &broker));
        s
    };
    let mut worker = WorkerProcess::start(&["run"], &settings).await;

    // The test's own link to RabbitMQ does not go through the proxy.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let mut results = consume(&connection, &settings[config::SMS_RESULTS_QUEUE]).await;
    let jobs: Vec<Value> = (0..JOBS)
        .map(|i| send_job(&unique_id(&format!("chaos{i}"))))
        .collect();
    let ids: HashSet<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    publish_jobs(&connection, &settings[config::SMS_JOBS_QUEUE], &jobs).await;

    // Every status each job was answered with. Results are read until every job has one, or
    // until none came for a while: then the jobs without one are lost.
    let mut answered: HashMap<String, Vec<String>> = HashMap::new();
    let mut received = 0;
    while answered.len() < JOBS {
        let Ok(Some(Ok(delivery))) = tokio::time::timeout(PATIENCE, results.next()).await else {
            break;
        };
        let result: Value = serde_json::from_slice(&delivery.data).expect("JSON result");
        let id = result["id"].as_str().expect("id").to_owned();
        assert!(
            ids.contains(&id),
            "a result for a job nobody sent: {result}"
        );
        let status = result["status"].as_str().unwrap_or_default().to_owned();
        answered.entry(id).or_default().push(status);
        received += 1;
        match received {
            300 | 1100 => {
                broker.cut();
                tokio::time::sleep(Duration::from_secs(1)).await;
                broker.restore();
            }
            700 | 1500 => {
                let (status, _) = worker.kill9().await;
                assert!(!status.success());
                worker = WorkerProcess::start(&["run"], &settings).await;
            }
            _ => {}
        }
    }
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "the last worker stops cleanly:\n{log}");

    // Exactly one final row per job.
    let pool = sqlx::PgPool::connect(&env.db_url).await.expect("db");
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, status FROM sms_jobs")
        .fetch_all(&pool)
        .await
        .expect("rows");
    let statuses: HashMap<String, String> = rows.into_iter().collect();
    assert_eq!(statuses.len(), JOBS, "one row per job");
    assert!(
        statuses.values().all(|s| s != "sending"),
        "every row final: {:?}",
        statuses.values().filter(|s| *s == "sending").count()
    );
    // At most one send per job; a job Aliyun executed is sent or unknown, never failed.
    let requests = env.fake.requests();
    let mut sends: HashMap<String, usize> = HashMap::new();
    for r in requests.iter().filter(|r| r.executed) {
        *sends
            .entry(r.out_id.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let duplicated_sends = sends.values().filter(|n| **n > 1).count();
    assert_eq!(duplicated_sends, 0, "no job sent twice");
    for id in sends.keys() {
        let status = statuses.get(id).map(String::as_str);
        assert!(
            matches!(status, Some("sent" | "unknown")),
            "{id} was executed by Aliyun but is {status:?}"
        );
    }
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !answered.contains_key(*id))
        .collect();
    let unknown = statuses.values().filter(|s| *s == "unknown").count();
    let sent = statuses.values().filter(|s| *s == "sent").count();
    println!(
        "chaos: jobs={JOBS} results={received} duplicate_results={} duplicate_sends={duplicated_sends} lost={} sent={sent} unknown={unknown}",
        received - answered.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} job(s) got no result, e.g. {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    let others: Vec<String> = sqlx::query_scalar(
        "SELECT concat_ws(' ', id, status, code, message, 'attempts=' || attempts) \
         FROM sms_jobs WHERE status NOT IN ('sent', 'unknown') ORDER BY id LIMIT 5",
    )
    .fetch_all(&pool)
    .await
    .expect("other rows");
    assert_eq!(
        sent + unknown,
        JOBS,
        "every job is sent, or unknown because its worker was killed mid-call; others (id status code message attempts): {others:?}"
    );
    assert!(
        unknown <= 2 * CONCURRENCY,
        "{unknown} unknown: more than the two killed workers can have held"
    );
    let not_sent_once: Vec<(&String, usize)> = statuses
        .iter()
        .filter(|(_, s)| *s == "sent")
        .map(|(id, _)| (id, sends.get(id).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        not_sent_once.is_empty(),
        "`sent` jobs with other than one send at Aliyun: {not_sent_once:?}"
    );
    let disagree: Vec<String> = answered
        .iter()
        .filter(|(id, got)| got.iter().any(|s| Some(s) != statuses.get(*id)))
        .map(|(id, got)| format!("{id}: results {got:?}, row {:?}", statuses.get(id)))
        .collect();
    assert!(
        disagree.is_empty(),
        "results that are not what the row says: {disagree:?}"
    );

    pool.close().await;
    remove_topology_and_close(&connection, &settings).await;
    drop_database(&env.db_name).await;
}
