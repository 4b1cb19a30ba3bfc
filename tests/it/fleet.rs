//! Several worker processes (the built binary) on one queue and one database: the README's two
//! promises — one job never becomes two paid SMS, no job vanishes — must hold for the fleet,
//! through SIGTERM, kill -9, lost broker connections and nodes, and a database outage.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aliyun_sms_worker::amqp_nodes::AmqpNodes;
use aliyun_sms_worker::broker::Broker;
use aliyun_sms_worker::config::{self, Config};
use aliyun_sms_worker::fake_aliyun::{FakeAliyun, Fault, FaultRule};
use aliyun_sms_worker::wire::{JobResult, Status};
use futures_util::StreamExt;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::Value;
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

use crate::cluster::Cluster;
use crate::helpers::{
    PATIENCE, TestEnv, amqp_url, consume, drop_database, eventually, free_addr, publish_to,
    remove_topology_and_close, send_job, unique_id,
};
use crate::process::{WorkerProcess, run_to_end};
use crate::proxy::{Proxy, target_of, through};

/// A worker process and the id it claims jobs under (`sms_jobs.claimed_by`).
struct Worker {
    process: WorkerProcess,
    id: Uuid,
}

/// What the workers of one test share, and the test's own view of it: its link to RabbitMQ
/// (publishing jobs, reading results) and to Postgres, neither through any proxy.
struct Fleet {
    env: TestEnv,
    /// Held open: the publisher and the results consumer are its channels.
    _connection: Connection,
    publisher: Channel,
    results: Consumer,
    pool: PgPool,
    jobs_queue: String,
    /// The node the test's own link goes to.
    amqp: String,
}

/// One `sms_jobs` row as these tests judge it.
struct Row {
    status: String,
    claimed_by: Option<Uuid>,
}

impl Fleet {
    /// Declares the test's topology through `amqp` (so its queues live on that node of a
    /// cluster) and starts reading results.
    async fn new(env: TestEnv, amqp: &str) -> Self {
        let queues = Config::from_map(&env.settings)
            .expect("test configuration is valid")
            .queues;
        let nodes = AmqpNodes::parse(amqp).expect("a node URL");
        let broker = Broker::connect(&nodes, 0, "fleet test", queues.clone())
            .await
            .expect("connect for the topology");
        broker.declare_topology().await.expect("declare topology");
        broker.close().await;
        let connection = Connection::connect(amqp, ConnectionProperties::default())
            .await
            .expect("connect RabbitMQ");
        let publisher = connection.create_channel().await.expect("channel");
        publisher
            .confirm_select(Default::default())
            .await
            .expect("confirms");
        let results = consume(&connection, &queues.results).await;
        let pool = PgPool::connect(&env.db_url).await.expect("connect test db");
        Self {
            env,
            _connection: connection,
            publisher,
            results,
            pool,
            jobs_queue: queues.jobs,
            amqp: amqp.to_owned(),
        }
    }

    /// Starts a worker process with the shared settings, `overrides` on top.
    async fn worker(&self, overrides: &[(&str, String)]) -> Worker {
        let mut settings = self.env.settings.clone();
        for (k, v) in overrides {
            settings.insert((*k).to_owned(), v.clone());
        }
        let process = WorkerProcess::start(&["run"], &settings).await;
        // A worker beats (names itself in sms_workers) before it consumes.
        // Named `aliyun-sms-worker@<host>:<pid>`.
        let name = format!("aliyun-sms-worker@%:{}", process.pid());
        let (id,): (Uuid,) = sqlx::query_as("SELECT id FROM sms_workers WHERE name LIKE $1")
            .bind(&name)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("no sms_workers row named {name}: {e}"));
        Worker { process, id }
    }

    async fn publish(&self, job: &Value) {
        publish_to(
            &self.publisher,
            &self.jobs_queue,
            &serde_json::to_vec(job).expect("json"),
            BasicProperties::default(),
        )
        .await;
    }

    /// Reads results until every id in `ids` has `per_id` of them, or until `patience` passes
    /// without a new one; returns what came, by id.
    async fn collect(
        &mut self,
        ids: &HashSet<String>,
        per_id: usize,
        patience: Duration,
    ) -> HashMap<String, Vec<JobResult>> {
        let mut by_id: HashMap<String, Vec<JobResult>> = HashMap::new();
        let done = |by_id: &HashMap<String, Vec<JobResult>>| {
            ids.iter()
                .all(|id| by_id.get(id).is_some_and(|r| r.len() >= per_id))
        };
        while !done(&by_id) {
            let next = tokio::time::timeout(patience, self.results.next()).await;
            let Ok(Some(Ok(delivery))) = next else {
                break;
            };
            let result: JobResult = serde_json::from_slice(&delivery.data).unwrap_or_else(|e| {
                panic!(
                    "result is not a JobResult ({e}): {}",
                    String::from_utf8_lossy(&delivery.data)
                )
            });
            let id = result.id.clone().expect("a result names its job");
            assert!(
                ids.contains(&id),
                "a result for a job nobody sent: {result:?}"
            );
            by_id.entry(id).or_default().push(result);
        }
        by_id
    }

    async fn rows(&self) -> HashMap<String, Row> {
        let rows: Vec<(String, String, Option<Uuid>)> =
            sqlx::query_as("SELECT id, status, claimed_by FROM sms_jobs")
                .fetch_all(&self.pool)
                .await
                .expect("read sms_jobs");
        rows.into_iter()
            .map(|(id, status, claimed_by)| (id, Row { status, claimed_by }))
            .collect()
    }
}

impl Drop for Fleet {
    /// Removes the queues and the database, when a test fails too: several of these tests fail
    /// until the fleet defects are fixed, and must not leave their leftovers behind meanwhile.
    /// The test's workers, declared after the fleet, are gone by now.
    fn drop(&mut self) {
        let amqp = self.amqp.clone();
        let settings = self.env.settings.clone();
        let db_name = self.env.db_name.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the clean-up");
            runtime.block_on(async {
                if let Ok(connection) =
                    Connection::connect(&amqp, ConnectionProperties::default()).await
                {
                    remove_topology_and_close(&connection, &settings).await;
                }
                drop_database(&db_name).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Ids without any result, and ids whose results disagree (status, code or biz_id).
fn lost_and_inconsistent(
    ids: &HashSet<String>,
    results: &HashMap<String, Vec<JobResult>>,
) -> (Vec<String>, Vec<String>) {
    let lost = ids
        .iter()
        .filter(|id| results.get(*id).is_none_or(Vec::is_empty))
        .cloned()
        .collect();
    let inconsistent = results
        .iter()
        .filter(|(_, rs)| {
            rs.iter().any(|r| {
                (r.status, &r.code, &r.biz_id) != (rs[0].status, &rs[0].code, &rs[0].biz_id)
            })
        })
        .map(|(id, rs)| {
            let seen: Vec<String> = rs
                .iter()
                .map(|r| format!("{}/{}/{:?}", r.status, r.code, r.biz_id))
                .collect();
            format!("{id}: {}", seen.join(" "))
        })
        .collect();
    (lost, inconsistent)
}

/// Ids the fake executed more than one send for, with the count.
fn sent_twice(env: &TestEnv, ids: &HashSet<String>) -> Vec<(String, usize)> {
    ids.iter()
        .map(|id| (id.clone(), env.fake.sends_for(id)))
        .filter(|(_, n)| *n > 1)
        .collect()
}

/// Fault rules the fake has not used up yet: a `times(1)` rule goes as its request arrives.
async fn pending_faults(fake: &FakeAliyun) -> usize {
    aliyun_sms_worker::tls::install_crypto_provider();
    let body = reqwest::get(format!("{}/__fake/faults", fake.endpoint()))
        .await
        .expect("the fake answers")
        .text()
        .await
        .expect("fault list");
    serde_json::from_str::<Vec<Value>>(&body)
        .expect("fault list is JSON")
        .len()
}

/// Settings every fleet test shares: calls of up to 12 s must not time out, and a heartbeat
/// slow enough that a busy two-core machine does not make a live worker look dead.
fn fleet_settings(s: &mut HashMap<String, String>) {
    s.insert("RUST_LOG".into(), "info".into());
    s.insert(config::HTTP_REQUEST_TIMEOUT_MS.into(), "20000".into());
    s.insert(config::WORKER_HEARTBEAT_MS.into(), "500".into());
    s.insert(config::SHUTDOWN_GRACE_MS.into(), "30000".into());
    // A result whose publish was lost (its worker died between the commit and the confirm)
    // comes from the outbox: soon enough for the tests' patience.
    s.insert(config::SWEEP_INTERVAL_MS.into(), "500".into());
    s.insert(config::RESULT_REPUBLISH_AFTER_MS.into(), "3000".into());
}

/// Round `round` of the test below: `count` jobs, each a different upstream latency between
/// 0.3 and 12 s, each id published three times, interleaved; every worker in `workers` must
/// have claimed some of them.
async fn round(fleet: &mut Fleet, workers: &[&Worker], round: &str, count: usize) {
    let jobs: Vec<Value> = (0..count)
        .map(|i| send_job(&unique_id(&format!("{round}-{i}"))))
        .collect();
    for (i, job) in jobs.iter().enumerate() {
        let phone = job["phone_number"].as_str().expect("phone");
        // Spread over 0.3–12 s, in no particular order.
        let ms = 300 + (i as u64 * 7919) % 11_700;
        fleet
            .env
            .fake
            .push_fault(FaultRule::every(Fault::Latency { ms }).on_phone(phone));
    }
    let ids: HashSet<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_owned())
        .collect();
    for _copy in 0..3 {
        for job in &jobs {
            fleet.publish(job).await;
        }
    }

    let results = fleet.collect(&ids, 3, PATIENCE).await;
    let (lost, inconsistent) = lost_and_inconsistent(&ids, &results);
    assert!(lost.is_empty(), "{round}: ids with no result: {lost:?}");
    let short: Vec<_> = results
        .iter()
        .filter(|(_, r)| r.len() < 3)
        .map(|(id, r)| (id, r.len()))
        .collect();
    assert!(
        short.is_empty(),
        "{round}: ids with fewer than 3 results: {short:?}"
    );
    assert!(
        inconsistent.is_empty(),
        "{round}: results of one id disagree: {inconsistent:#?}"
    );
    let not_sent: Vec<String> = results
        .iter()
        .filter(|(_, r)| r[0].status != Status::Sent)
        .map(|(id, r)| format!("{id}: {} {} {}", r[0].status, r[0].code, r[0].message))
        .collect();
    assert!(not_sent.is_empty(), "{round}: not sent: {not_sent:#?}");
    let twice = sent_twice(&fleet.env, &ids);
    assert!(twice.is_empty(), "{round}: sent more than once: {twice:?}");
    let unsent: Vec<&String> = ids
        .iter()
        .filter(|id| fleet.env.fake.sends_for(id) == 0)
        .collect();
    assert!(
        unsent.is_empty(),
        "{round}: `sent` but never sent: {unsent:?}"
    );

    let rows = fleet.rows().await;
    let mut claims: HashMap<Uuid, usize> = HashMap::new();
    for id in &ids {
        if let Some(owner) = rows.get(id).and_then(|r| r.claimed_by) {
            *claims.entry(owner).or_default() += 1;
        }
    }
    println!("{round}: jobs claimed per worker: {claims:?}");
    for w in workers {
        assert!(
            claims.contains_key(&w.id),
            "{round}: worker {} (pid {}) claimed none of the {count} jobs: {claims:?}",
            w.id,
            w.process.pid()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_workers_send_each_job_once() {
    let env = TestEnv::new(fleet_settings).await;
    let mut fleet = Fleet::new(env, &amqp_url()).await;
    let a = fleet.worker(&[]).await;
    let b = fleet.worker(&[]).await;
    round(&mut fleet, &[&a, &b], "two", 30).await;
    let c = fleet.worker(&[]).await;
    round(&mut fleet, &[&a, &b, &c], "three", 30).await;

    for w in [a, b, c] {
        let (status, log) = w.process.terminate().await;
        assert!(status.success(), "worker stops cleanly:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_keeps_its_claim() {
    let env = TestEnv::new(fleet_settings).await;
    let mut fleet = Fleet::new(env, &amqp_url()).await;
    let job = send_job(&unique_id("drain"));
    let id = job["id"].as_str().expect("id").to_owned();
    // Taken (and so removed from the fake's list) when the request arrives; answered 12 s later.
    let rule = FaultRule::every(Fault::Latency { ms: 12_000 })
        .on_phone(job["phone_number"].as_str().expect("phone"))
        .times(1);
    fleet.env.fake.push_fault(rule);
    let mut a = fleet.worker(&[]).await;
    fleet.publish(&job).await;
    let in_flight = async {
        while pending_faults(&fleet.env.fake).await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, in_flight)
        .await
        .expect("worker A calls Aliyun");
    assert_eq!(
        fleet.env.fake.calls_for(&id),
        0,
        "A's call is still in flight"
    );

    a.process.sigterm();
    assert!(
        a.process.wait_for_log("draining in-flight jobs").await,
        "A drains:\n{}",
        a.process.log.join("\n")
    );
    let b = fleet.worker(&[]).await;
    fleet.publish(&job).await;

    let ids = HashSet::from([id.clone()]);
    let results = fleet.collect(&ids, 2, PATIENCE).await;
    let (a_status, a_log) = a.process.exited().await;
    let got: Vec<String> = results
        .get(&id)
        .map(|rs| {
            rs.iter()
                .map(|r| format!("{} {} {}", r.status, r.code, r.message))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        got.len(),
        2,
        "one result per delivery: {got:?}\nA's log:\n{a_log}"
    );
    assert!(
        results[&id].iter().all(|r| r.status == Status::Sent),
        "both deliveries answered `sent`: {got:#?}\nA's log:\n{a_log}"
    );
    assert_eq!(fleet.env.fake.sends_for(&id), 1, "one send at Aliyun");
    assert!(
        a_status.success(),
        "A exits cleanly after its drain:\n{a_log}"
    );
    assert!(
        !a_log.contains("grace period over"),
        "A finished its job within the grace period:\n{a_log}"
    );
    let (b_status, b_log) = b.process.terminate().await;
    assert!(b_status.success(), "{b_log}");
}

/// `(status, finished_at, result_published_at)` of job `id`.
async fn presumed_row(
    pool: &PgPool,
    id: &str,
) -> (
    String,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
) {
    sqlx::query_as("SELECT status, finished_at, result_published_at FROM sms_jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("the job's row")
}

/// Worker `id`'s watermark (`sms_workers.results_confirmed_through`).
async fn watermark_of(pool: &PgPool, id: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT results_confirmed_through FROM sms_workers WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("the worker's row")
}

/// A worker, A, whose link to RabbitMQ goes through a proxy that is cut while A waits for
/// Aliyun: A commits the outcome, presuming its result out, and the confirm can never come.
/// Returns A, its proxy (kept cut), the job's id and the outcome's `finished_at`.
async fn a_result_never_confirmed(
    fleet: &Fleet,
) -> (Worker, Proxy, String, Option<chrono::DateTime<chrono::Utc>>) {
    let job = send_job(&unique_id("presumed"));
    let id = job["id"].as_str().expect("id").to_owned();
    fleet.env.fake.push_fault(
        FaultRule::every(Fault::Latency { ms: 1_500 })
            .on_phone(job["phone_number"].as_str().expect("phone"))
            .times(1),
    );
    let proxy = Proxy::start(target_of(&amqp_url())).await;
    let a = fleet
        .worker(&[(config::AMQP_URL, through(&amqp_url(), &proxy))])
        .await;
    fleet.publish(&job).await;
    eventually("A calls Aliyun", || async {
        (pending_faults(&fleet.env.fake).await == 0).then_some(())
    })
    .await;
    proxy.cut();
    let finished = eventually("A commits the outcome", || async {
        let (status, finished, _) = presumed_row(&fleet.pool, &id).await;
        (status == "sent").then_some(finished)
    })
    .await;
    (a, proxy, id, finished)
}

/// Issue 13: a result whose confirm does not come is handed to the outbox (its mark cleared, so
/// the watermark moves on) after a quarter of `RESULT_REPUBLISH_AFTER_MS` when that is under
/// 2 s, and the worker says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_result_is_handed_to_the_outbox_within_a_quarter_of_the_republish_delay() {
    let env = TestEnv::new(|s| {
        fleet_settings(s);
        s.insert(config::RESULT_REPUBLISH_AFTER_MS.into(), "2000".into());
    })
    .await;
    let fleet = Fleet::new(env, &amqp_url()).await;
    let (a, _proxy, id, finished) = a_result_never_confirmed(&fleet).await;
    eventually("A hands the result to the outbox", || async {
        let (_, _, published) = presumed_row(&fleet.pool, &id).await;
        published.is_none().then_some(())
    })
    .await;
    let watermark = eventually("A's watermark passes the handed-over result", || async {
        let mark = watermark_of(&fleet.pool, a.id).await;
        (mark > finished).then_some(mark)
    })
    .await;
    let (_, a_log) = a.process.kill9().await;
    assert!(watermark > finished, "{a_log}");
    assert!(
        a_log.contains("results RabbitMQ has not confirmed for 500ms handed to the outbox"),
        "the hand-over waited a quarter of 2 s:\n{a_log}"
    );
}

/// Issue 13: a worker's outcome write presumes the result out. Killed after that commit and
/// before RabbitMQ's confirm, and its message then gone (dead-lettered, purged), the worker
/// leaves a result nobody would publish but for its watermark: the next worker's sweeper
/// publishes it and marks it, and Aliyun is not called again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_its_killed_worker_never_saw_confirmed_is_published_by_the_sweeper() {
    let env = TestEnv::new(|s| {
        fleet_settings(s);
        s.insert(config::SWEEP_INTERVAL_MS.into(), "200".into());
        // A presumed result waits a quarter of this (at most 2 s) for its confirm before it is
        // handed to the outbox: long enough for the test to kill A before it does.
        s.insert(config::RESULT_REPUBLISH_AFTER_MS.into(), "8000".into());
    })
    .await;
    let mut fleet = Fleet::new(env, &amqp_url()).await;
    let (a, _proxy, id, finished) = a_result_never_confirmed(&fleet).await;
    // A's watermark comes to rest at the result it waits for (a tenth of a second later).
    let watermark = eventually("A writes its watermark", || async {
        let mark = watermark_of(&fleet.pool, a.id).await;
        (mark >= finished).then_some(mark)
    })
    .await;
    let (_, a_log) = a.process.kill9().await;
    assert_eq!(
        watermark, finished,
        "A's watermark stays at its unconfirmed result:\n{a_log}"
    );
    let (_, finished, published) = presumed_row(&fleet.pool, &id).await;
    assert_eq!(
        published, finished,
        "A died with the result presumed out, before handing it to the outbox:\n{a_log}"
    );
    // The message went back to the queue with A's connection; it is gone now.
    let channel = &fleet.publisher;
    eventually("A's unacked message is back in the queue", || async {
        let q = channel
            .queue_declare(
                lapin::types::ShortString::from(fleet.jobs_queue.as_str()),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("the jobs queue");
        (q.message_count() == 1).then_some(())
    })
    .await;
    let purged = channel
        .queue_purge(
            lapin::types::ShortString::from(fleet.jobs_queue.as_str()),
            Default::default(),
        )
        .await
        .expect("purge the jobs queue");
    assert_eq!(purged, 1);

    let b = fleet.worker(&[]).await;
    let ids = HashSet::from([id.clone()]);
    let results = fleet.collect(&ids, 1, PATIENCE).await;
    let (b_status, b_log) = b.process.terminate().await;
    let got = results.get(&id).map(Vec::as_slice).unwrap_or_default();
    assert_eq!(got.len(), 1, "the result:\n{b_log}");
    assert_eq!((got[0].status, got[0].code.as_str()), (Status::Sent, "OK"));
    assert_eq!(fleet.env.fake.sends_for(&id), 1, "one send at Aliyun");
    let (_, finished, published) = presumed_row(&fleet.pool, &id).await;
    assert!(
        published.is_some() && published != finished,
        "the sweeper marked what it published"
    );
    assert!(b_status.success(), "{b_log}");
}

/// Jobs of the chaos test, published at a steady rate for the whole of the chaos.
const CHAOS_JOBS: usize = 600;
const CHAOS_EVERY: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_chaos_on_a_three_node_cluster() {
    let booting = Instant::now();
    let cluster = Cluster::start(3).await;
    println!(
        "fleet chaos: three-node cluster up in {:?}",
        booting.elapsed()
    );
    let mut env = TestEnv::new(|s| {
        fleet_settings(s);
        s.insert(config::WORKER_CONCURRENCY.into(), "16".into());
    })
    .await;
    // About seven jobs in each worker's hands at any time.
    env.fake
        .push_fault(FaultRule::every(Fault::Latency { ms: 1000 }));
    // The workers reach Postgres through a proxy the test can cut; the test itself does not.
    let db = Proxy::start(target_of(&env.db_url)).await;
    let proxied_db = through(&env.db_url, &db);
    env.settings.insert(config::DATABASE_URL.into(), proxied_db);
    // The test's link, and so its queues, are on node 0, which stays up throughout.
    let mut fleet = Fleet::new(env, &cluster.nodes[0].url()).await;
    let mut members = cluster.queue_members(&fleet.jobs_queue).await;
    members.sort();
    let mut names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    names.sort();
    assert_eq!(members, names, "the jobs queue is replicated on every node");
    // Each worker lists the nodes from a different one, so they sit on different nodes.
    let on = |node: usize| [(config::AMQP_URL, cluster.urls_from(node))];
    let w0 = fleet.worker(&on(0)).await;
    let w1 = fleet.worker(&on(1)).await;
    let w2 = fleet.worker(&on(2)).await;

    let jobs: Vec<Value> = (0..CHAOS_JOBS)
        .map(|i| send_job(&unique_id(&format!("fleet-chaos{i}"))))
        .collect();
    let ids: HashSet<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_owned())
        .collect();
    let stream = {
        let publisher = fleet.publisher.clone();
        let queue = fleet.jobs_queue.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHAOS_EVERY);
            for job in jobs {
                tick.tick().await;
                let body = serde_json::to_vec(&job).expect("json");
                publish_to(&publisher, &queue, &body, BasicProperties::default()).await;
            }
        })
    };

    // The chaos, at fixed times into the 30 s stream.
    let start = Instant::now();
    let at = |s: u64| tokio::time::sleep_until(start + Duration::from_secs(s));
    at(3).await;
    let killed = w1.id;
    let (status, killed_log) = w1.process.kill9().await;
    assert!(!status.success());
    // The replacement comes from the next deploy, which beats less often: each worker is
    // judged by its own interval, not by the reader's.
    let w1b = {
        let [(amqp, nodes)] = on(1);
        let heartbeat = (config::WORKER_HEARTBEAT_MS, "2000".to_owned());
        fleet.worker(&[(amqp, nodes), heartbeat]).await
    };
    at(6).await;
    w0.process.sigterm();
    let w0b = fleet.worker(&on(0)).await;
    at(9).await;
    cluster.stop_node(2).await;
    at(12).await;
    db.cut();
    // While the database is away, the workers on node 1 lose their deliveries: other workers
    // get them back with claims whose owners could not beat for ten seconds, yet are alive.
    at(16).await;
    cluster.close_connections(1).await;
    at(22).await;
    db.restore();
    stream.await.expect("every job published");

    let results = fleet.collect(&ids, 1, PATIENCE).await;
    let w0_id = w0.id;
    let (w0_status, w0_log) = w0.process.exited().await;
    assert!(
        w0_status.success(),
        "the SIGTERMed worker drained and exited cleanly:\n{w0_log}"
    );
    // Every worker's whole log, to explain a failure below.
    let mut logs = vec![
        (format!("killed {killed}"), killed_log),
        (format!("SIGTERMed {w0_id}"), w0_log),
    ];
    for (label, w) in [
        ("replacement of the SIGTERMed", w0b),
        ("replacement of the killed", w1b),
        ("third", w2),
    ] {
        let (status, log) = w.process.terminate().await;
        assert!(status.success(), "a live worker stops cleanly:\n{log}");
        logs.push((format!("{label} {}", w.id), log));
    }
    let about = |job: &str| -> String {
        logs.iter()
            .flat_map(|(worker, log)| {
                log.lines()
                    .filter(move |l| l.contains(job))
                    .map(move |l| format!("  [{worker}] {l}"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    let rows = fleet.rows().await;
    let (lost, inconsistent) = lost_and_inconsistent(&ids, &results);
    let count = |status: &str| rows.values().filter(|r| r.status == status).count();
    let (sent, unknown) = (count("sent"), count("unknown"));
    let twice = sent_twice(&fleet.env, &ids);
    println!(
        "fleet chaos: jobs={CHAOS_JOBS} rows={} results={} lost={} duplicate_sends={} sent={sent} unknown={unknown} killed={killed}",
        rows.len(),
        results.values().map(Vec::len).sum::<usize>(),
        lost.len(),
        twice.len(),
    );
    if !lost.is_empty() {
        let mut why = String::new();
        for id in &lost {
            let row: Option<(
                String,
                Option<String>,
                Option<chrono::DateTime<chrono::Utc>>,
            )> = sqlx::query_as(
                "SELECT status, code, result_published_at FROM sms_jobs WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&fleet.pool)
            .await
            .expect("read the lost job");
            why.push_str(&format!("{id}: row {row:?}\n{}\n", about(id)));
        }
        panic!("jobs with no result:\n{why}");
    }
    let rowless: Vec<&String> = ids.iter().filter(|id| !rows.contains_key(*id)).collect();
    assert!(rowless.is_empty(), "jobs with no row: {rowless:?}");
    assert!(twice.is_empty(), "jobs sent more than once: {twice:?}");
    let neither: Vec<String> = rows
        .iter()
        .filter(|(_, r)| r.status != "sent" && r.status != "unknown")
        .map(|(id, r)| format!("{id}: {}", r.status))
        .collect();
    assert!(
        neither.is_empty(),
        "jobs neither sent nor unknown: {neither:?}"
    );
    let wrongly_unknown: Vec<(&String, &Row)> = rows
        .iter()
        .filter(|(_, r)| r.status == "unknown" && r.claimed_by != Some(killed))
        .collect();
    let explained: Vec<String> = wrongly_unknown
        .iter()
        .take(3)
        .map(|(id, r)| {
            format!(
                "{id}: claimed by {:?}, {} send(s) at the fake; the workers' log about it:\n{}",
                r.claimed_by,
                fleet.env.fake.sends_for(id),
                about(id)
            )
        })
        .collect();
    assert!(
        wrongly_unknown.is_empty(),
        "{} job(s) unknown, but not in the hands of the killed worker {killed}; the first:\n{}",
        wrongly_unknown.len(),
        explained.join("\n")
    );
    let unsent: Vec<&String> = rows
        .iter()
        .filter(|(id, r)| r.status == "sent" && fleet.env.fake.sends_for(id) == 0)
        .map(|(id, _)| id)
        .collect();
    assert!(
        unsent.is_empty(),
        "`sent` without a send at Aliyun: {unsent:?}"
    );
    assert!(
        inconsistent.is_empty(),
        "results of one id disagree: {inconsistent:#?}"
    );
    let disagree: Vec<String> = results
        .iter()
        .filter(|(id, rs)| {
            rows.get(*id)
                .is_some_and(|r| rs[0].status.as_str() != r.status)
        })
        .map(|(id, rs)| format!("{id}: result {} row {}", rs[0].status, rows[id].status))
        .collect();
    assert!(
        disagree.is_empty(),
        "results that are not the row: {disagree:?}"
    );

    // The fleet cleans up through node 0: before the cluster goes.
    drop(fleet);
    drop(cluster);
}

/// The worker's log line for a new connection names the node; true if it is `proxy`'s.
fn consuming_on(worker: &WorkerProcess, proxy: &Proxy) -> bool {
    worker.log.last().is_some_and(|l| {
        l.contains("consuming jobs") && l.contains(&format!("127.0.0.1:{}", proxy.port()))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_moves_round_the_node_list_when_its_node_is_lost() {
    // Three "nodes": proxies to the one local RabbitMQ, each of which the test can cut.
    let rabbit = target_of(&amqp_url());
    let nodes = [
        Proxy::start(rabbit).await,
        Proxy::start(rabbit).await,
        Proxy::start(rabbit).await,
    ];
    let list: Vec<String> = nodes.iter().map(|p| through(&amqp_url(), p)).collect();
    let env = TestEnv::new(fleet_settings).await;
    let mut fleet = Fleet::new(env, &amqp_url()).await;
    let mut worker = fleet
        .worker(&[(config::AMQP_URL, list.join(" , "))])
        .await
        .process;
    assert!(
        consuming_on(&worker, &nodes[0]),
        "the first node first:\n{}",
        worker.log.join("\n")
    );

    let moves = [
        // Node 0 lost: on to node 1.
        (0, 1),
        // Node 1 lost, node 0 back: on to node 2, not back to the start of the list.
        (1, 2),
        // Node 2 lost, node 1 back: round to node 0.
        (2, 0),
    ];
    for (lost, next) in moves {
        nodes[(lost + 2) % 3].restore();
        nodes[lost].cut();
        assert!(
            worker.wait_for_log("consuming jobs").await,
            "reconnected after node {lost} was lost:\n{}",
            worker.log.join("\n")
        );
        assert!(
            consuming_on(&worker, &nodes[next]),
            "node {lost} lost: expected node {next}:\n{}",
            worker.log.join("\n")
        );
    }
    let job = send_job(&unique_id("nodes"));
    fleet.publish(&job).await;
    let ids = HashSet::from([job["id"].as_str().expect("id").to_owned()]);
    let results = fleet.collect(&ids, 1, PATIENCE).await;
    assert_eq!(
        results
            .values()
            .flatten()
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        [Status::Sent]
    );
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_takes_the_node_list_and_skips_a_dead_node() {
    // Nothing listens on the first node of the list.
    let dead = format!("amqp://guest:guest@{}/%2f", free_addr());
    let list = format!("{dead},{}", amqp_url());
    let env = TestEnv::new(|s| {
        fleet_settings(s);
        s.insert(config::AMQP_URL.into(), list.clone());
    })
    .await;
    let fleet = Fleet::new(env, &amqp_url()).await;
    let worker = fleet.worker(&[]).await.process;
    let settings = fleet.env.settings.clone();
    let envs = || settings.iter().map(|(k, v)| (k.as_str(), v.as_str()));

    let (code, stdout, stderr) = run_to_end(envs(), &["check-config"]).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("(node 2 of 2)"),
        "check-config names the node that answered: {stdout}"
    );
    let job = send_job(&unique_id("list"));
    let (code, stdout, stderr) =
        run_to_end(envs(), &["enqueue", "json", &job.to_string(), "--wait"]).await;
    assert_eq!(
        code, 0,
        "enqueue --wait through the list:\n{stdout}\n{stderr}"
    );
    let (code, stdout, stderr) = run_to_end(envs(), &["dead-letters", "list"]).await;
    assert_eq!(
        code, 0,
        "dead-letters through the list:\n{stdout}\n{stderr}"
    );

    // A malformed entry stops a command at start, named, with no password shown.
    let bad = format!("{},amqp//guest:s3cret@rabbit-2:5672", amqp_url());
    let (code, _, stderr) = run_to_end(
        [(config::AMQP_URL, bad.as_str())],
        &["enqueue", "json", "{}"],
    )
    .await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains(config::AMQP_URL) && stderr.contains("node 2 of 2"),
        "the error names the variable and the entry: {stderr}"
    );
    assert!(
        !stderr.contains("s3cret"),
        "a password was printed: {stderr}"
    );

    let (status, log) = worker.terminate().await;
    assert!(status.success(), "{log}");
}
