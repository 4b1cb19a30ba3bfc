//! The account's API limits hold for the fleet: three worker processes on one queue and one
//! database together stay within `ALIYUN_MAX_QPS` (and `RECEIPTS_MAX_QPS`) in every sliding
//! one-second window at the fake Aliyun, and still use most of it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aliyun_sms_worker::aliyun::rate::Pacer;
use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::FakeConfig;
use aliyun_sms_worker::store::Store;
use chrono::{DateTime, Utc};
use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};

use crate::helpers::{
    PATIENCE, TestEnv, amqp_url, consume, create_database, drop_database, next_from, publish_jobs,
    remove_topology_and_close, send_job, unique_id, unique_phone,
};
use crate::process::WorkerProcess;
use crate::proxy::{Proxy, target_of, through};

const WORKERS: usize = 3;

/// Three worker processes sharing one fake Aliyun, one database and one queue.
struct Fleet {
    env: TestEnv,
    workers: Vec<WorkerProcess>,
    connection: Connection,
}

impl Fleet {
    async fn start(
        fake_tweak: impl FnOnce(&mut FakeConfig),
        tweak: impl FnOnce(&mut HashMap<String, String>),
    ) -> Self {
        let env = TestEnv::with_fake(fake_tweak, |s| {
            s.insert("RUST_LOG".into(), "info".into());
            tweak(s);
        })
        .await;
        let mut workers = Vec::new();
        // One after the other: the first applies the migrations.
        for _ in 0..WORKERS {
            workers.push(WorkerProcess::start(&["run"], &env.settings).await);
        }
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect RabbitMQ");
        Self {
            env,
            workers,
            connection,
        }
    }

    /// Publishes `jobs` and waits for one result of each.
    async fn run(&self, jobs: &[Value]) {
        let mut results = consume(
            &self.connection,
            &self.env.settings[config::SMS_RESULTS_QUEUE],
        )
        .await;
        publish_jobs(
            &self.connection,
            &self.env.settings[config::SMS_JOBS_QUEUE],
            jobs,
        )
        .await;
        let mut answered = HashSet::new();
        while answered.len() < jobs.len() {
            let delivery = next_from(&mut results, "a result").await;
            let result: Value = serde_json::from_slice(&delivery.data).expect("JSON result");
            assert_eq!(result["status"], "sent", "{result}");
            answered.insert(result["id"].as_str().expect("id").to_owned());
        }
    }

    /// How many jobs each worker process claimed.
    async fn claims_per_worker(&self) -> Vec<i64> {
        let pool = sqlx::PgPool::connect(&self.env.db_url).await.expect("db");
        let rows: Vec<(i64,)> = sqlx::query_as(
            "SELECT count(*) FROM sms_jobs GROUP BY claimed_by ORDER BY count(*) DESC",
        )
        .fetch_all(&pool)
        .await
        .expect("claims");
        pool.close().await;
        rows.into_iter().map(|r| r.0).collect()
    }

    async fn stop(self) {
        for worker in self.workers {
            let (status, log) = worker.terminate().await;
            assert!(status.success(), "a worker stops cleanly:\n{log}");
        }
        remove_topology_and_close(&self.connection, &self.env.settings).await;
        drop_database(&self.env.db_name).await;
    }
}

/// The arrival times at the fake of the calls of `action`, in order.
fn arrivals(env: &TestEnv, action: &str) -> Vec<DateTime<Utc>> {
    let mut at: Vec<_> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.action == action)
        .map(|r| r.at)
        .collect();
    at.sort();
    at
}

/// The most calls in any one-second window [t, t + 1 s), over every start t (the busiest window
/// always starts at a call).
fn busiest_second(at: &[DateTime<Utc>]) -> usize {
    let second = chrono::Duration::seconds(1);
    (0..at.len())
        .map(|i| at[i..].iter().take_while(|t| **t - at[i] < second).count())
        .max()
        .unwrap_or(0)
}

/// Calls per second from the first call to the last.
fn rate(at: &[DateTime<Utc>]) -> f64 {
    match (at.first(), at.last()) {
        (Some(first), Some(last)) if at.len() > 1 => {
            let span = (*last - *first).to_std().unwrap_or(Duration::ZERO);
            (at.len() - 1) as f64 / span.as_secs_f64()
        }
        _ => 0.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_aliyun_qps_limit() {
    const LIMIT: usize = 20;
    const JOBS: usize = 200;
    let fleet = Fleet::start(
        |_| {},
        |s| {
            s.insert(config::ALIYUN_MAX_QPS.into(), LIMIT.to_string());
            s.insert(config::WORKER_CONCURRENCY.into(), "32".into());
            s.insert(config::RECEIPTS_ENABLED.into(), "false".into());
        },
    )
    .await;
    let jobs: Vec<Value> = (0..JOBS)
        .map(|i| send_job(&unique_id(&format!("fleet-qps{i}"))))
        .collect();
    fleet.run(&jobs).await;

    let at = arrivals(&fleet.env, "SendSmsVerifyCode");
    let busiest = busiest_second(&at);
    let rate = rate(&at);
    let claims = fleet.claims_per_worker().await;
    println!(
        "fleet qps: calls={} busiest_second={busiest} rate={rate:.1}/s claims={claims:?}",
        at.len()
    );
    assert_eq!(at.len(), JOBS, "one call per job");
    assert!(
        busiest <= LIMIT,
        "{busiest} calls in one second across the fleet, limit {LIMIT}"
    );
    // The schedule's own margin allows 80 %; on two cores shared with the rest of the
    // suite a little more is lost to scheduling. The floor is there to catch a limiter that
    // leaves most of the budget unused, not to time the machine.
    assert!(
        rate >= 0.6 * LIMIT as f64,
        "the fleet used only {rate:.1} of {LIMIT} calls/s under a backlog"
    );
    assert_eq!(claims.len(), WORKERS, "every worker did part: {claims:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_receipts_qps_limit() {
    const LIMIT: usize = 5;
    const JOBS: usize = 60;
    let fleet = Fleet::start(
        // No receipt turns final during the test: every number keeps being polled.
        |fake| fake.receipt_delay = Duration::from_secs(3600),
        |s| {
            s.insert(config::RECEIPTS_MAX_QPS.into(), LIMIT.to_string());
            s.insert(config::RECEIPTS_POLL_INTERVAL_MS.into(), "100".into());
        },
    )
    .await;
    let jobs: Vec<Value> = (0..JOBS)
        .map(|i| {
            json!({
                "id": unique_id(&format!("fleet-receipts{i}")),
                "type": "send_sms",
                "phone_numbers": [unique_phone()],
                "sign_name": "阿里云短信测试",
                "template_code": "SMS_154950909",
            })
        })
        .collect();
    fleet.run(&jobs).await;
    // Sixty numbers due every 100 ms at first, backing off: far more than 5 queries a second
    // are wanted for the next seconds.
    let wanted = 40;
    let polled = fleet
        .env
        .fake
        .wait_for(|r| r.iter().filter(|r| r.action == "QuerySendDetails").count() >= wanted);
    tokio::time::timeout(PATIENCE, polled)
        .await
        .expect("the receipts are polled");

    let at = arrivals(&fleet.env, "QuerySendDetails");
    let busiest = busiest_second(&at);
    let rate = rate(&at);
    println!(
        "fleet receipts: queries={} busiest_second={busiest} rate={rate:.1}/s",
        at.len()
    );
    assert!(
        busiest <= LIMIT,
        "{busiest} QuerySendDetails in one second across the fleet, limit {LIMIT}"
    );
    assert!(
        rate >= 0.6 * LIMIT as f64,
        "the fleet polled only {rate:.1} of {LIMIT} queries/s with a backlog of due receipts"
    );
    fleet.stop().await;
}

/// The schedule in Postgres, without workers: three stores (three pools, as three processes
/// have) pace one action together, then the database link is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_schedule_spaces_every_store_and_fails_closed_without_the_database() {
    const LIMIT: usize = 50;
    let (db_name, db_url) = create_database().await;
    let proxy = Proxy::start(target_of(&db_url)).await;
    let url = through(&db_url, &proxy);
    let patience = Duration::from_secs(2);
    let mut pacers = Vec::new();
    for _ in 0..WORKERS {
        let store = Store::connect(&url, 4).await.expect("connect");
        store.migrate().await.expect("migrate");
        let limit = u32::try_from(LIMIT).expect("small");
        pacers.push(std::sync::Arc::new(Pacer::new(
            store.rate_schedule(),
            limit,
            patience,
        )));
    }
    let run_for = Duration::from_secs(3);
    let started = tokio::time::Instant::now();
    let mut callers = Vec::new();
    for pacer in &pacers {
        for _ in 0..8 {
            let pacer = pacer.clone();
            callers.push(tokio::spawn(async move {
                let mut at = Vec::new();
                while started.elapsed() < run_for {
                    pacer.pace("SendSms").await.expect("a slot");
                    at.push(Utc::now());
                }
                at
            }));
        }
    }
    let mut at = Vec::new();
    for caller in callers {
        at.extend(caller.await.expect("caller"));
    }
    at.sort();
    let (busiest, rate) = (busiest_second(&at), rate(&at));
    println!(
        "shared schedule: calls={} busiest_second={busiest} rate={rate:.1}/s",
        at.len()
    );
    assert!(
        busiest <= LIMIT,
        "{busiest} slots in one second, limit {LIMIT}"
    );
    // The margin leaves 80 % of the limit; the floor catches waste, not a slow machine.
    assert!(
        rate >= 0.6 * LIMIT as f64,
        "only {rate:.1} slots/s of {LIMIT}"
    );

    // No database: the call is refused after the patience, neither made unpaced nor held.
    proxy.cut();
    let cut_at = tokio::time::Instant::now();
    let refused = tokio::time::timeout(PATIENCE, pacers[0].pace("SendSms"))
        .await
        .expect("pace gives up");
    assert!(refused.is_err(), "a slot without the database: {refused:?}");
    assert!(
        cut_at.elapsed() <= patience + Duration::from_secs(1),
        "gave up after {:?}",
        cut_at.elapsed()
    );
    // And it paces again once the database is back.
    proxy.restore();
    tokio::time::timeout(PATIENCE, pacers[0].pace("SendSms"))
        .await
        .expect("pace answers")
        .expect("a slot again");
    drop(pacers);
    drop_database(&db_name).await;
}
