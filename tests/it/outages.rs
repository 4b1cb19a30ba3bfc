//! The broker and the database disappear under load; the worker rides it out by itself.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aliyun_sms_worker::config::{self, Config};
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use aliyun_sms_worker::wire::{JobResult, Status};
use aliyun_sms_worker::worker::{self, RunOptions, WorkerError};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use aliyun_sms_worker::sms_client::SmsClient;
use std::str::FromStr;

use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::helpers::{
    PATIENCE, TestApp, TestEnv, admin_get, amqp_url, close_connection, consume, eventually,
    free_addr, job_row, next_from, publish_to, send_job, test_link, unique_id, unique_phone,
};
use crate::process::WorkerProcess;
use crate::proxy::{Proxy, target_of, through};

/// Starts a worker whose link to `setting` (AMQP_URL or DATABASE_URL) goes through a proxy,
/// gives it 300 jobs at 100 ms each, 16 at a time (about two seconds of work, so it is still
/// busy when the link is cut), and returns once it is busy with them.
async fn busy_worker_behind_proxy(
    mut env: TestEnv,
    setting: &str,
    label: &str,
) -> (TestApp, Proxy, HashSet<String>) {
    let url = env.settings[setting].clone();
    let proxy = Proxy::start(target_of(&url)).await;
    env.settings.insert(setting.into(), through(&url, &proxy));
    env.settings
        .insert(config::WORKER_CONCURRENCY.into(), "16".into());
    env.fake
        .push_fault(FaultRule::every(Fault::Latency { ms: 100 }));
    let app = TestApp::start(env).await;
    let mut ids = HashSet::new();
    for i in 0..300 {
        let job = send_job(&unique_id(&format!("{label}{i}")));
        ids.insert(job["id"].as_str().unwrap_or_default().to_owned());
        app.publish(&job).await;
    }
    tokio::time::timeout(PATIENCE, app.fake.wait_for(|r| r.len() >= 50))
        .await
        .expect("the worker is busy");
    (app, proxy, ids)
}

/// Reads results until every id has one; every one must be `sent`.
async fn all_sent(app: &TestApp, ids: &HashSet<String>) -> usize {
    let mut answered = HashSet::new();
    let mut results = 0;
    while answered.len() < ids.len() {
        let (result, _) = app.next_result().await;
        results += 1;
        let id = result.id.clone().expect("id");
        assert!(
            ids.contains(&id),
            "result for a job nobody sent: {result:?}"
        );
        if result.status != Status::Sent {
            panic!(
                "{result:?}\nrow: {}\nattempts: {:?}",
                app.job_row(&id).await,
                app.attempts(&id).await
            );
        }
        answered.insert(id);
    }
    for id in ids {
        assert_eq!(app.fake.sends_for(id), 1, "{id} sent exactly once");
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_database_outage_costs_no_job_and_no_unrecorded_call() {
    let admin = free_addr();
    let env = TestEnv::new(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin.clone());
    })
    .await;
    let (app, db, ids) = busy_worker_behind_proxy(env, config::DATABASE_URL, "db").await;

    assert_eq!(admin_get(&admin, "/readyz").await.0, 200);
    db.cut();
    // Calls already under way when the database went may still land; none may start after.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls_at_cut = app.fake.requests().len();
    let (status, why) = admin_get(&admin, "/readyz").await;
    assert_eq!((status, why.trim()), (503, "database unreachable"));
    assert_eq!(
        admin_get(&admin, "/healthz").await.0,
        200,
        "alive all the same"
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        app.fake.requests().len(),
        calls_at_cut,
        "no Aliyun call while no `sending` row can be committed"
    );
    db.restore();

    all_sent(&app, &ids).await;
    assert_eq!(
        admin_get(&admin, "/readyz").await.0,
        200,
        "ready again by itself"
    );
    let (_, metrics) = admin_get(&admin, "/metrics").await;
    assert!(
        metrics.contains("sms_jobs_total{type=\"send_verify_code\",status=\"sent\"}"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("sms_aliyun_calls_total{action=\"SendSmsVerifyCode\",outcome=\"success\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("sms_worker_ready 1"), "{metrics}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_ridden_out_with_every_job_answered_and_none_resent() {
    let env = TestEnv::new(|_| {}).await;
    let (app, broker, ids) = busy_worker_behind_proxy(env, config::AMQP_URL, "amqp").await;
    broker.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restore();

    let results = all_sent(&app, &ids).await;
    assert!(results >= ids.len());
    app.shutdown().await;
}

/// A database connection that goes silent in the middle of a write (a failover that moves an
/// address, a partition: no reset, no answer) held the worker's claim or outcome lane, and so
/// every job, until TCP gave up, while its heartbeat, on fresh connections, told the fleet all
/// was well. The worker now stops at once when a write has waited `DATABASE_WRITE_TIMEOUT_MS`,
/// and the fleet finishes its jobs as a killed worker's: each once, none lost. A write that
/// waits as long for a lock Postgres holds it on is not taken for silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_database_connection_goes_silent_stops_and_the_fleet_finishes_its_jobs() {
    let (env, db, through_proxy) = fleet_with_a_database_proxy().await;
    let mut silent = WorkerProcess::start(&["run"], &through_proxy).await;

    // Published while the worker runs, so it is claiming when its connections fall silent.
    let (ids, publishing) = publish_meanwhile(&env, "silent", 2000).await;
    let pool = PgPool::connect(&env.db_url).await.expect("db");
    eventually("the worker is busy with its backlog", || async {
        (finished_jobs(&pool).await >= 100).then_some(())
    })
    .await;
    let claim_waits_for_the_lock =
        || async { claims_waiting_for_a_lock(&pool).await.then_some(()) };

    // A write Postgres is working on is no silent one, however long it waits: a lock held
    // past DATABASE_WRITE_TIMEOUT_MS (a migration, an operator) is waited for.
    let lock = lock_the_jobs(&pool).await;
    assert!(
        silent.wait_for_log("Postgres is still working on").await,
        "a write waiting for a lock was not told apart:\n{}",
        silent.log.join("\n")
    );
    let before = finished_jobs(&pool).await;
    lock.rollback().await.expect("unlock");
    eventually("the worker goes on after the lock", || async {
        (finished_jobs(&pool).await > before + 100).then_some(())
    })
    .await;

    // Catch the worker's writes in flight: held by a lock for a moment, so they are on their
    // way when every connection open now falls silent. New connections still work, and the
    // lock is gone at once, so the database is well; only the silent writes never return, and
    // the heartbeat, on fresh connections, goes on.
    let lock = lock_the_jobs(&pool).await;
    eventually(
        "a claim of the worker waits for the lock",
        claim_waits_for_the_lock,
    )
    .await;
    db.silence();
    lock.rollback().await.expect("unlock");
    stops_for_a_silent_write(silent, "DATABASE_WRITE_TIMEOUT_MS").await;

    let publisher = publishing.await.expect("publishing");
    let other = WorkerProcess::start(&["run"], &env.settings).await;
    the_last_worker_finishes_every_job((env, pool, publisher), &ids, other).await;
}

/// The fleet promise with three workers on one queue while one drains (SIGTERM) and another's
/// database connection goes silent: the silent one stops, the draining one finishes what it
/// holds and exits cleanly, and the third finishes the rest. Every job ends final and is
/// answered, none is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_one_draining_one_gone_silent_send_each_job_once_and_answer_all() {
    let (env, db, through_proxy) = fleet_with_a_database_proxy().await;
    let silent = WorkerProcess::start(&["run"], &through_proxy).await;
    let draining = WorkerProcess::start(&["run"], &env.settings).await;
    let staying = WorkerProcess::start(&["run"], &env.settings).await;

    let (ids, publishing) = publish_meanwhile(&env, "three", 1500).await;
    let pool = PgPool::connect(&env.db_url).await.expect("db");
    eventually("the fleet is busy", || async {
        (finished_jobs(&pool).await >= 100).then_some(())
    })
    .await;

    draining.sigterm();
    // The silent worker's writes held on their way by a lock, then every connection of its
    // falls silent and the lock goes; the other two wait for the lock a moment and go on.
    let lock = lock_the_jobs(&pool).await;
    eventually(
        "a write of the silent worker waits for the lock",
        || async {
            waits_for_a_lock(&pool, "%", "silent-one %")
                .await
                .then_some(())
        },
    )
    .await;
    db.silence();
    lock.rollback().await.expect("unlock");
    stops_for_a_silent_write(silent, "DATABASE_WRITE_TIMEOUT_MS").await;
    let (status, log) = draining.exited().await;
    assert!(status.success(), "the draining worker exits cleanly: {log}");

    let publisher = publishing.await.expect("publishing");
    the_last_worker_finishes_every_job((env, pool, publisher), &ids, staying).await;
}

/// Every job of `ids` final, sent once and answered with `last` running; then `last` must
/// exit cleanly on SIGTERM, and the fleet's test resources go.
async fn the_last_worker_finishes_every_job(
    (env, pool, publisher): (TestEnv, PgPool, SmsClient),
    ids: &[String],
    last: WorkerProcess,
) {
    each_final_sent_once_and_answered(&env, &pool, ids).await;
    let (status, log) = last.terminate().await;
    assert!(status.success(), "{log}");
    publisher.close().await;
    pool.close().await;
    env.remove().await;
}

/// A fleet's settings for the silent-connection tests (fast beats, results presumed out and
/// never confirmed soon published again), a proxy to its database, and the settings of a
/// worker behind that proxy: its sessions named `silent-one …`, a 2 s write timeout.
async fn fleet_with_a_database_proxy() -> (TestEnv, Proxy, HashMap<String, String>) {
    let env = TestEnv::new(|s| {
        s.insert(config::WORKER_HEARTBEAT_MS.into(), "200".into());
        s.insert(config::RESULT_REPUBLISH_AFTER_MS.into(), "2000".into());
    })
    .await;
    let db = Proxy::start(target_of(&env.db_url)).await;
    let mut through_proxy = env.settings.clone();
    let url = through(&env.db_url, &db);
    let sep = if url.contains('?') { '&' } else { '?' };
    // Named apart, so a test can tell the silent worker's sessions from the others'.
    through_proxy.insert(
        config::DATABASE_URL.into(),
        format!("{url}{sep}application_name=silent-one"),
    );
    through_proxy.insert(config::DATABASE_WRITE_TIMEOUT_MS.into(), "2000".into());
    (env, db, through_proxy)
}

/// Publishes `n` send jobs (ids `{label}{i}`) from a task of its own, as backends do while the
/// fleet runs; the task hands the client back when done.
async fn publish_meanwhile(
    env: &TestEnv,
    label: &str,
    n: usize,
) -> (Vec<String>, JoinHandle<SmsClient>) {
    let publisher = SmsClient::connect(&amqp_url(), &env.settings[config::SMS_JOBS_QUEUE])
        .await
        .expect("client");
    let ids: Vec<String> = (0..n).map(|i| unique_id(&format!("{label}{i}"))).collect();
    let publishing = {
        let ids = ids.clone();
        tokio::spawn(async move {
            for id in &ids {
                let body = serde_json::to_vec(&send_job(id)).expect("json");
                publisher.publish(&body, id).await.expect("publish");
            }
            publisher
        })
    };
    (ids, publishing)
}

/// Jobs with a final row.
async fn finished_jobs(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sms_jobs WHERE status <> 'sending'")
        .fetch_one(pool)
        .await
        .expect("count finished jobs")
}

/// Every one of `ids` ends with a final row, none sent twice, and each has its result on the
/// results queue (some twice: results are at least once).
async fn each_final_sent_once_and_answered(env: &TestEnv, pool: &PgPool, ids: &[String]) {
    let all = i64::try_from(ids.len()).unwrap_or(i64::MAX);
    eventually("every job has its final row", || async {
        (finished_jobs(pool).await == all).then_some(())
    })
    .await;
    let sent_twice: Vec<&String> = ids.iter().filter(|id| env.fake.sends_for(id) > 1).collect();
    assert!(sent_twice.is_empty(), "sent twice: {sent_twice:?}");
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let mut results = consume(&connection, &env.settings[config::SMS_RESULTS_QUEUE]).await;
    let mut unanswered: HashSet<&String> = ids.iter().collect();
    while !unanswered.is_empty() {
        let delivery = next_from(&mut results, "a result for every job").await;
        let result: JobResult = serde_json::from_slice(&delivery.data).expect("a result");
        if let Some(id) = result.id {
            unanswered.remove(&id);
        }
    }
    close_connection(&connection).await;
}

/// Waits for `worker` to notice its silent write and exit as failed, its log naming `what`.
async fn stops_for_a_silent_write(mut worker: WorkerProcess, what: &str) {
    assert!(
        worker.wait_for_log("connection went silent").await,
        "the worker did not notice its silent write:\n{}",
        worker.log.join("\n")
    );
    let (status, log) = worker.exited().await;
    assert!(
        !status.success(),
        "a stuck worker must not exit as if stopped: {log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("connection went silent") && l.contains(what)),
        "the stop names {what}: {log}"
    );
    assert!(
        !log.contains("restarting it"),
        "no task of the stop is taken for crashed: {log}"
    );
}

/// Holds back, until the transaction ends, every insert of the job `id` and nothing else (not
/// the leader's sweeps, which the run may start at any moment): a row of it, uncommitted.
async fn hold_the_id(pool: &PgPool, id: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut hold = pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO sms_jobs (id, type, status) VALUES ($1, '', 'invalid')")
        .bind(id)
        .execute(&mut *hold)
        .await
        .expect("hold the id");
    hold
}

/// Holds every write to `sms_jobs` back until the transaction ends; reads go on.
async fn lock_the_jobs(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE sms_jobs IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock the jobs");
    lock
}

/// A worker run in this process, its database behind a proxy the test can silence; with the
/// test's own pool and RabbitMQ link.
struct RunBehindProxy {
    env: TestEnv,
    db: Proxy,
    config: Config,
    stop: watch::Sender<bool>,
    pool: PgPool,
    connection: Connection,
    channel: lapin::Channel,
}

impl RunBehindProxy {
    /// With `DATABASE_WRITE_TIMEOUT_MS` at `write_timeout_ms`, and `tweak`'s settings.
    async fn new(write_timeout_ms: u64, tweak: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        let env = TestEnv::new(|s| {
            s.insert(
                config::DATABASE_WRITE_TIMEOUT_MS.into(),
                write_timeout_ms.to_string(),
            );
            tweak(s);
        })
        .await;
        let db = Proxy::start(target_of(&env.db_url)).await;
        let mut settings = env.settings.clone();
        settings.insert(config::DATABASE_URL.into(), through(&env.db_url, &db));
        let pool = PgPool::connect(&env.db_url).await.expect("db");
        let (connection, channel) = test_link().await;
        Self {
            env,
            db,
            config: Config::from_map(&settings).expect("test configuration is valid"),
            stop: watch::Sender::new(false),
            pool,
            connection,
            channel,
        }
    }

    /// The jobs queue, to publish to.
    fn jobs(&self) -> (&lapin::Channel, &str) {
        (&self.channel, &self.config.queues.jobs)
    }

    /// Stops `run` as an operator would; it must stop cleanly. Then removes what the test made.
    async fn stop_and_remove(self, run: JoinHandle<Result<(), WorkerError>>) {
        self.stop.send_replace(true);
        let ended = ended(run).await;
        assert!(ended.is_ok(), "the run stopped with {ended:?}");
        self.remove().await;
    }

    /// Removes what the test made on the shared services.
    async fn remove(self) {
        close_connection(&self.connection).await;
        self.pool.close().await;
        self.env.remove().await;
    }

    /// Starts `run`: its task once it consumes, or what it ended with before.
    async fn start(&self) -> Result<JoinHandle<Result<(), WorkerError>>, Result<(), WorkerError>> {
        let (ready_tx, mut ready) = watch::channel(false);
        let run = tokio::spawn(worker::run(
            self.config.clone(),
            RunOptions::default(),
            self.stop.subscribe(),
            ready_tx,
        ));
        match tokio::time::timeout(PATIENCE, ready.wait_for(|r| *r)).await {
            Ok(Ok(_)) => Ok(run),
            Ok(Err(_)) => Err(run.await.expect("the run did not panic")),
            Err(_) => panic!("the run neither became ready nor stopped in time"),
        }
    }
}

/// Publishes `job` while `lock` holds its claim back, so that the claim is on its way when
/// every database connection open now falls silent (`db`), after `meanwhile`; then unlocks.
/// Only that claim never returns: new connections work.
async fn silence_a_claim(
    db: &Proxy,
    pool: &PgPool,
    lock: sqlx::Transaction<'static, sqlx::Postgres>,
    (channel, queue): (&lapin::Channel, &str),
    job: &Value,
    meanwhile: impl std::future::Future<Output = ()>,
) {
    publish_job((channel, queue), job).await;
    eventually("the job's claim waits for the lock", || async {
        claims_waiting_for_a_lock(pool).await.then_some(())
    })
    .await;
    meanwhile.await;
    db.silence();
    lock.rollback().await.expect("unlock");
}

/// An invalid message's row, held by a lock until every connection of `worker` falls silent,
/// must end `run` with `WriteStuck`.
async fn stops_on_a_silent_invalid_row(
    worker: &RunBehindProxy,
    run: JoinHandle<Result<(), WorkerError>>,
) {
    let id = unique_id("silentinvalid");
    let mut bad = send_job(&id);
    bad["phone_number"] = "not a number".into();
    let lock = hold_the_id(&worker.pool, &id).await;
    silence_a_claim(&worker.db, &worker.pool, lock, worker.jobs(), &bad, async {
    })
    .await;
    let ended = ended(run).await;
    assert!(
        matches!(
            ended,
            Err(WorkerError::WriteStuck {
                write: "invalid row",
                ..
            })
        ),
        "the run ended with {ended:?}"
    );
}

/// The `application_name` of a worker's sessions, once one is open on the test database.
async fn worker_session_name(pool: &PgPool) -> String {
    eventually("the worker's sessions are named", || async {
        sqlx::query_scalar(
            "SELECT application_name FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'aliyun-sms-worker %'
             LIMIT 1",
        )
        .fetch_optional(pool)
        .await
        .expect("read the activity")
    })
    .await
}

/// What `run` ended with, within [`PATIENCE`].
async fn ended(run: JoinHandle<Result<(), WorkerError>>) -> Result<(), WorkerError> {
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the run stopped in time")
        .expect("the run did not panic")
}

/// Publishes `job` to the jobs queue, confirmed.
async fn publish_job((channel, queue): (&lapin::Channel, &str), job: &Value) {
    let body = serde_json::to_vec(job).expect("json");
    publish_to(channel, queue, &body, BasicProperties::default()).await;
}

/// Whether an insert of a worker (a claim, an invalid row) waits for a lock on `sms_jobs` or
/// one of its rows.
async fn claims_waiting_for_a_lock(pool: &PgPool) -> bool {
    waits_for_a_lock(pool, "%INSERT INTO sms_jobs%", "%").await
}

/// Whether a statement like `query` (a LIKE pattern) of a session named like `session` waits
/// for a lock.
async fn waits_for_a_lock(pool: &PgPool, query: &str, session: &str) -> bool {
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND query LIKE $1 AND application_name LIKE $2",
    )
    .bind(query)
    .bind(session)
    .fetch_one(pool)
    .await
    .expect("read the activity");
    waiting > 0
}

/// An in-process caller (an embedding service, a supervisor loop) that starts `run` again after
/// it stopped for a silent write: the stopped run must leave nothing of its own running — not
/// its admin listener (the new run needs the same ADMIN_ADDR), and not its RabbitMQ
/// connection, whose unacked deliveries would otherwise never go back to the queue, so the job
/// it held would wait for the process to end. The job's claim committed before the silence
/// (only its answer was lost), so the new run finds it, and a claim stamped by a worker gone
/// may have reached Aliyun: the job ends `unknown`, not sent a second time. And nothing the
/// stopped run queued is written later, when TCP gives up on the silent connection: two jobs
/// whose claims waited behind the silent one would be written claimed, and stamped, by a
/// worker that no longer exists, and end `unknown` though never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_by_a_silent_write_leaves_nothing_running_and_can_be_started_again() {
    let admin = free_addr();
    let worker = RunBehindProxy::new(1000, |s| {
        s.insert(config::ADMIN_ADDR.into(), admin.clone());
    })
    .await;
    let first = worker.start().await.expect("the first run is running");
    let pool = worker.pool.clone();
    let mut results = consume(&worker.connection, &worker.config.queues.results).await;
    let jobs = worker.jobs();

    // The job came once with a bad number: its row is `invalid`, which a corrected job of the
    // same id claims again. That claim waits for the row's lock while it runs, so it commits
    // when the lock goes, after every connection of the worker fell silent.
    let id = unique_id("restart");
    let mut bad = send_job(&id);
    bad["phone_number"] = "not a number".into();
    publish_job(jobs, &bad).await;
    let delivery = next_from(&mut results, "the bad job's answer").await;
    let answer: JobResult = serde_json::from_slice(&delivery.data).expect("a result");
    assert_eq!(answer.status, Status::Invalid, "{answer:?}");
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM sms_jobs WHERE id = $1 FOR UPDATE")
        .bind(&id)
        .execute(&mut *lock)
        .await
        .expect("lock the job's row");
    let behind = [unique_id("behind"), unique_id("behind")];
    let queue_behind = async {
        for id in &behind {
            publish_job(jobs, &send_job(id)).await;
        }
        // Three jobs in hand: the two new ones wait for the claim lane, busy with the first.
        eventually(
            "the later jobs' claims queue behind the held one",
            || async {
                let (_, metrics) = admin_get(&admin, "/metrics").await;
                metrics
                    .lines()
                    .any(|l| l == "sms_jobs_in_flight 3")
                    .then_some(())
            },
        )
        .await;
    };
    silence_a_claim(&worker.db, &pool, lock, jobs, &send_job(&id), queue_behind).await;
    let ended = ended(first).await;
    assert!(
        matches!(ended, Err(WorkerError::WriteStuck { .. })),
        "the run ended with {ended:?}"
    );
    let row = job_row(&pool, &id).await;
    assert_eq!(row["status"], "sending", "the lost claim committed: {row}");
    // TCP gives up on the silent connections at last.
    worker.db.end_silent();

    let second = worker.start().await.unwrap_or_else(|ended| {
        panic!("the second run could not start beside what the first left running: {ended:?}")
    });
    let (status, _) = admin_get(&admin, "/readyz").await;
    assert_eq!(status, 200, "the second run answers on the same ADMIN_ADDR");
    // The first run's deliveries went back to the queue with its connection, and the second
    // run ends the job the first one claimed, and sends the two that never were.
    let mut answered: HashMap<String, JobResult> = HashMap::new();
    while answered.len() < 3 {
        let delivery = next_from(&mut results, "the three jobs' results").await;
        let result: JobResult = serde_json::from_slice(&delivery.data).expect("a result");
        if let Some(of) = result.id.clone() {
            answered.insert(of, result);
        }
    }
    let held = &answered[&id];
    assert_eq!(held.status, Status::Unknown, "{held:?}");
    assert_eq!(worker.env.fake.sends_for(&id), 0, "nothing was sent");
    for later in &behind {
        let result = &answered[later];
        assert_eq!(
            result.status,
            Status::Sent,
            "{result:?}\n{}",
            job_row(&pool, later).await
        );
        assert_eq!(worker.env.fake.sends_for(later), 1, "{later} sent once");
    }

    worker.stop_and_remove(second).await;
}

/// The keeper writes this worker's watermark (`results_confirmed_through`), which tells the
/// sweeper which results a killed worker may have left unconfirmed. One of its statements
/// caught on a connection that went silent is given up after 5 s and tried again on another
/// connection: it would otherwise hold every later watermark until TCP gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watermark_write_gone_silent_is_given_up_and_the_watermark_moves_on() {
    // A write timeout far longer than this test: no other write may stop the worker meanwhile.
    let worker = RunBehindProxy::new(600_000, |_| {}).await;
    let run = worker.start().await.expect("the run is running");
    let pool = worker.pool.clone();
    let mut results = consume(&worker.connection, &worker.config.queues.results).await;
    let jobs = worker.jobs();
    // The watermark, and when it was read on the server's clock.
    let watermark = |pool: PgPool| async move {
        sqlx::query_as::<
            _,
            (
                Option<chrono::DateTime<chrono::Utc>>,
                chrono::DateTime<chrono::Utc>,
            ),
        >("SELECT max(results_confirmed_through), clock_timestamp() FROM sms_workers")
        .fetch_one(&pool)
        .await
        .expect("read the watermark")
    };

    // The worker's row locked: the watermark write after the first job's result waits for it,
    // and is on its way when every connection open falls silent.
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM sms_workers FOR UPDATE")
        .execute(&mut *lock)
        .await
        .expect("lock the worker's row");
    publish_job(jobs, &send_job(&unique_id("keeperfirst"))).await;
    next_from(&mut results, "the first job's result").await;
    // When the keeper's write began, on the server's clock: its patience counts from about
    // then, however long this test (on a busy machine) takes to silence it.
    let began: chrono::DateTime<chrono::Utc> =
        eventually("the watermark write waits for the lock", || async {
            sqlx::query_scalar(
                "SELECT min(query_start) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%SET results_confirmed_through%'",
            )
            .fetch_one(&pool)
            .await
            .expect("read the activity")
        })
        .await;
    worker.db.silence();
    lock.rollback().await.expect("unlock");

    let second = unique_id("keepersecond");
    publish_job(jobs, &send_job(&second)).await;
    next_from(&mut results, "the second job's result").await;
    let finished: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT finished_at FROM sms_jobs WHERE id = $1")
            .bind(&second)
            .fetch_one(&pool)
            .await
            .expect("the second job's row");
    let seen = eventually("the watermark moves past the second job", || async {
        let (mark, at) = watermark(pool.clone()).await;
        mark.filter(|w| *w > finished).map(|_| at)
    })
    .await;
    // Not before the keeper gave its silent write up (5 s after it set out to write, a little
    // before the server saw the statement): sooner, the write held back was not the keeper's.
    assert!(
        seen - began >= chrono::TimeDelta::seconds(4),
        "the watermark moved {:?} after the silent write began",
        seen - began
    );

    worker.stop_and_remove(run).await;
}

/// The statements on a job's way outside the batched lanes are watched too, each holding its
/// job: here an invalid message's row (kept so that operators find it), gone silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_row_gone_silent_stops_the_run() {
    let worker = RunBehindProxy::new(1000, |_| {}).await;
    let run = worker.start().await.expect("the run is running");
    stops_on_a_silent_invalid_row(&worker, run).await;
    worker.remove().await;
}

/// A statement of the worker's that has run for long (a leader's slow duty, a claim waiting on
/// another worker's lock) is not the write that went silent: Postgres working on it says
/// nothing of a write begun well after it. Once, any older statement of the worker's kept a
/// silent write waited for, for as long as that statement ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_statement_begun_before_a_silent_write_does_not_hide_it() {
    let worker = RunBehindProxy::new(1000, |_| {}).await;
    let run = worker.start().await.expect("the run is running");
    let name = worker_session_name(&worker.pool).await;
    let options = PgConnectOptions::from_str(&worker.env.db_url)
        .expect("the test database's URL")
        .application_name(&name);
    let long = tokio::spawn(async move {
        let mut conn = PgConnection::connect_with(&options)
            .await
            .expect("connect under the worker's name");
        // Cancelled at the end of the test; over within a minute if the test fails first.
        let _ = sqlx::query("SELECT pg_sleep(60)").execute(&mut conn).await;
    });
    // Older than the write by more than any slack the watch allows for.
    eventually("the long statement has run for three seconds", || async {
        let old: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = $1 AND state = 'active' AND query LIKE '%pg_sleep(60)%'
               AND xact_start < now() - interval '3 seconds'",
        )
        .bind(&name)
        .fetch_one(&worker.pool)
        .await
        .expect("read the activity");
        (old > 0).then_some(())
    })
    .await;
    stops_on_a_silent_invalid_row(&worker, run).await;
    assert!(!long.is_finished(), "the long statement ran throughout");
    sqlx::query(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
         WHERE application_name = $1 AND query LIKE '%pg_sleep(60)%'",
    )
    .bind(&name)
    .execute(&worker.pool)
    .await
    .expect("cancel the long statement");
    let _ = long.await;
    worker.remove().await;
}

/// Every write past the timeout is asked about, not only the oldest: a guarded claim waiting
/// on another session's lock for the number, which Postgres is working on, must not hide a
/// younger write gone silent. Once, only the oldest was asked about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_postgres_works_on_does_not_hide_a_younger_one_gone_silent() {
    let worker = RunBehindProxy::new(1000, |s| {
        s.insert(config::RECEIPTS_ENABLED.into(), "false".into());
    })
    .await;
    let run = worker.start().await.expect("the run is running");
    let phone = unique_phone();
    let number = crate::helpers::hold_the_number(&worker.pool, &phone).await;
    let check = serde_json::json!({
        "id": unique_id("heldcheck"),
        "type": "check_verify_code",
        "phone_number": phone,
        "verify_code": "123456",
    });
    publish_job(worker.jobs(), &check).await;
    // Three seconds: a write begun within a second or so of it would be taken for its own (see
    // `Store::unattended`).
    crate::helpers::a_claim_waited_for_its_number(&worker.pool, 3.0).await;
    stops_on_a_silent_invalid_row(&worker, run).await;
    number.rollback().await.expect("release the number");
    worker.remove().await;
}

/// The leader's duties run on the same pool as the jobs. A sweep gone silent held the
/// fleet's sweeps of dead workers' claims, its outbox, receipts and reconciliation until TCP
/// gave up on the connection (many minutes), while the leadership, on a connection of its
/// own, stayed with the stuck worker. It stops the worker like any silent write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaders_sweep_gone_silent_stops_the_run() {
    let worker = RunBehindProxy::new(1000, |s| {
        s.insert(config::SWEEP_INTERVAL_MS.into(), "100".into());
        // The reconciliation's statements wait on the same lock, and may be told first.
        s.insert(config::RECEIPTS_ENABLED.into(), "false".into());
    })
    .await;
    let run = worker.start().await.expect("the run is running");
    let lock = lock_the_jobs(&worker.pool).await;
    eventually("the sweep waits for the lock", || async {
        waits_for_a_lock(&worker.pool, "%UPDATE sms_jobs%status = 'sending'%", "%")
            .await
            .then_some(())
    })
    .await;
    worker.db.silence();
    lock.rollback().await.expect("unlock");
    let ended = ended(run).await;
    assert!(
        matches!(
            ended,
            Err(WorkerError::WriteStuck {
                write: "stale claims sweep",
                ..
            })
        ),
        "the run ended with {ended:?}"
    );
    worker.remove().await;
}

/// A guarded claim (every `check_verify_code` job's, `CHECK_MAX_ATTEMPTS` being on by default)
/// is a transaction of its own, outside the batched lanes. Waiting for a lock past
/// `DATABASE_WRITE_TIMEOUT_MS`, it is waited for; gone silent, it stops the worker. Also while
/// other statements under the worker's name keep Postgres busy, fresh ones back to back on a
/// connection opened since, as a busy worker's would: they say nothing of the silent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guarded_claim_gone_silent_stops_the_worker_while_other_statements_of_it_go_on() {
    let env = TestEnv::new(|s| {
        s.insert(config::DATABASE_WRITE_TIMEOUT_MS.into(), "3000".into());
    })
    .await;
    let db = Proxy::start(target_of(&env.db_url)).await;
    let mut settings = env.settings.clone();
    settings.insert(config::DATABASE_URL.into(), through(&env.db_url, &db));
    let mut worker = WorkerProcess::start(&["run"], &settings).await;
    let pool = PgPool::connect(&env.db_url).await.expect("db");
    let worker_name = worker_session_name(&pool).await;
    let options = PgConnectOptions::from_str(&env.db_url)
        .expect("the test database's URL")
        .application_name(&worker_name);
    let busy = tokio::spawn(async move {
        let mut conn = PgConnection::connect_with(&options)
            .await
            .expect("connect under the worker's name");
        loop {
            sqlx::query("SELECT pg_sleep(0.05)")
                .execute(&mut conn)
                .await
                .expect("a busy statement");
        }
    });
    eventually(
        "the busy statements run under the worker's name",
        || async {
            let busy: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = $1 AND query LIKE '%pg_sleep%'",
            )
            .bind(&worker_name)
            .fetch_one(&pool)
            .await
            .expect("read the activity");
            (busy > 0).then_some(())
        },
    )
    .await;
    let (connection, channel) = test_link().await;
    let jobs = (&channel, env.settings[config::SMS_JOBS_QUEUE].as_str());
    let check = |label: &str| {
        serde_json::json!({
            "id": unique_id(label),
            "type": "check_verify_code",
            "phone_number": unique_phone(),
            "verify_code": "123456",
        })
    };

    // A guarded claim held by a lock past the timeout is waited for, and then goes on.
    let lock = lock_the_jobs(&pool).await;
    let waited = check("waitedcheck");
    publish_job(jobs, &waited).await;
    assert!(
        worker.wait_for_log("Postgres is still working on").await,
        "a guarded claim waiting for a lock was not told apart:\n{}",
        worker.log.join("\n")
    );
    lock.rollback().await.expect("unlock");
    let waited_id = waited["id"].as_str().unwrap_or_default().to_owned();
    eventually("the waited-for check ends", || async {
        let row = job_row(&pool, &waited_id).await;
        row["status"]
            .as_str()
            .is_some_and(|status| status != "sending")
            .then_some(())
    })
    .await;

    // Only this job's id held back: with the table locked, a sweep of the leader's waiting on
    // the same lock could be the silent write told first.
    let silent = check("silentcheck");
    let lock = hold_the_id(&pool, silent["id"].as_str().unwrap_or_default()).await;
    silence_a_claim(&db, &pool, lock, jobs, &silent, async {}).await;
    stops_for_a_silent_write(worker, "guarded claim").await;
    assert!(!busy.is_finished(), "the busy statements ran throughout");
    busy.abort();
    close_connection(&connection).await;
    pool.close().await;
    env.remove().await;
}

/// A RabbitMQ connection that goes silent (a partition, a load balancer that lost its node and
/// keeps the client's socket open): no error, nothing comes back. Every job is still answered,
/// once: the AMQP heartbeat tells the worker its connection is gone (after two heartbeats: 20 s
/// at the worker's default, 4 s at this test's), it connects again, and RabbitMQ, hearing
/// nothing either, gives the deliveries it held to the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_connection_gone_silent_is_noticed_and_every_job_is_answered_once() {
    let env = TestEnv::new(|s| {
        let url = format!("{}?heartbeat=2", s[config::AMQP_URL]);
        s.insert(config::AMQP_URL.into(), url);
    })
    .await;
    let (app, broker, ids) = busy_worker_behind_proxy(env, config::AMQP_URL, "amqpquiet").await;
    broker.silence();
    let results = all_sent(&app, &ids).await;
    assert!(results >= ids.len());
    app.shutdown().await;
}
