//! A worker per test: its own Postgres database, its own queues, its own fake Aliyun on a
//! free port, all on the real local services. Tests wait on events (readiness, messages), with
//! timeouts only as a safety net.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use aliyun_sms_worker::aliyun::Product;
use aliyun_sms_worker::config::{self, Config};
use aliyun_sms_worker::fake_aliyun::{FakeAliyun, FakeConfig};
use aliyun_sms_worker::wire::JobResult;
use aliyun_sms_worker::worker::{self, RunOptions};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{Value, json};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::{Mutex, watch};

/// How long a test waits for something that should happen in milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Asks `probe` every 20 ms until it answers `Some`, for state only the database shows (a
/// column another process writes): that answer, or a failure naming `what` after
/// [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let wait = async {
        loop {
            if let Some(found) = probe().await {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("{what}, within {PATIENCE:?}"))
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The same server, another database.
fn database_url(name: &str) -> String {
    let base = admin_database_url();
    let (server, query) = match base.split_once('?') {
        Some((s, q)) => (s.to_owned(), format!("?{q}")),
        None => (base.clone(), String::new()),
    };
    let server = match server.rfind('/') {
        Some(i) if i > "postgres://".len() => server[..i].to_owned(),
        _ => server,
    };
    format!("{server}/{name}{query}")
}

/// Creates an empty database for one test. Test databases are prefixed `smsw_test_` so CI can
/// sweep the ones left by killed runs.
pub async fn create_database() -> (String, String) {
    let name = format!("smsw_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_database_url())
        .await
        .expect("connect to Postgres (is it running? see README)");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    let _ = admin.close().await;
    let url = database_url(&name);
    (name, url)
}

pub async fn drop_database(name: &str) {
    if let Ok(mut admin) = PgConnection::connect(&admin_database_url()).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
        let _ = admin.close().await;
    }
}

/// Settings for one test: unique queues, its database, the fake's endpoint and keys, and
/// fast retries.
/// The queue and exchange names of one test, all under `prefix`, so tests run side by side.
pub fn queue_settings(prefix: &str) -> [(&'static str, String); 5] {
    [
        (config::SMS_JOBS_QUEUE, format!("{prefix}.jobs")),
        (config::SMS_RESULTS_QUEUE, format!("{prefix}.results")),
        (config::SMS_DEAD_LETTER_QUEUE, format!("{prefix}.dead")),
        (config::SMS_DEAD_LETTER_EXCHANGE, format!("{prefix}.dlx")),
        (config::SMS_RECEIPTS_QUEUE, format!("{prefix}.receipts")),
    ]
}

pub fn test_settings(db_url: &str, fake: &FakeAliyun, prefix: &str) -> HashMap<String, String> {
    [
        (config::AMQP_URL, amqp_url()),
        (config::DATABASE_URL, db_url.to_owned()),
        (config::DATABASE_MAX_CONNECTIONS, "8".into()),
        (config::ALIBABA_CLOUD_ACCESS_KEY_ID, TEST_KEY_ID.into()),
        (config::ALIBABA_CLOUD_ACCESS_KEY_SECRET, TEST_SECRET.into()),
        // One endpoint per product, as at Aliyun: a call sent to the wrong one fails.
        (
            config::ALIYUN_DYPNSAPI_ENDPOINT,
            fake.endpoint_for(Product::Dypnsapi),
        ),
        (
            config::ALIYUN_DYSMSAPI_ENDPOINT,
            fake.endpoint_for(Product::Dysmsapi),
        ),
        (config::WORKER_CONCURRENCY, "32".into()),
        (config::RETRY_MAX_ATTEMPTS, "4".into()),
        (config::RETRY_INITIAL_DELAY_MS, "10".into()),
        (config::RETRY_MAX_DELAY_MS, "40".into()),
        (config::RETRY_MAX_ELAPSED_MS, "5000".into()),
        (config::HTTP_CONNECT_TIMEOUT_MS, "1000".into()),
        (config::HTTP_REQUEST_TIMEOUT_MS, "3000".into()),
        (config::SHUTDOWN_GRACE_MS, "5000".into()),
        (config::RECEIPTS_POLL_INTERVAL_MS, "100".into()),
        (config::RECONCILE_GRACE_MS, "600".into()),
        // A killed worker is recognised after 5 beats.
        (config::WORKER_HEARTBEAT_MS, "200".into()),
        // Off unless a test asks for it: parallel tests would fight over one port.
        (config::ADMIN_ADDR, String::new()),
    ]
    .into_iter()
    .chain(queue_settings(prefix))
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

pub const TEST_KEY_ID: &str = "LTAI5tTestKeyId";
/// Characters that need percent-encoding, so signing bugs show.
pub const TEST_SECRET: &str = "kH8/s3cr3t+With=Chars~*";

/// What a test's workers share: the fake Aliyun, a database, queue names and settings.
pub struct TestEnv {
    pub fake: FakeAliyun,
    pub db_name: String,
    pub db_url: String,
    pub settings: HashMap<String, String>,
}

impl TestEnv {
    pub async fn new(tweak: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        Self::with_fake(|_| {}, tweak).await
    }

    /// Also lets the test configure the fake Aliyun before it starts.
    pub async fn with_fake(
        fake_tweak: impl FnOnce(&mut FakeConfig),
        tweak: impl FnOnce(&mut HashMap<String, String>),
    ) -> Self {
        let mut fake_config = FakeConfig::new(TEST_KEY_ID, TEST_SECRET);
        fake_config.receipt_delay = Duration::from_millis(150);
        fake_tweak(&mut fake_config);
        let fake = FakeAliyun::start(fake_config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("start fake Aliyun");
        let (db_name, db_url) = create_database().await;
        let prefix = format!(
            "smsw-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut settings = test_settings(&db_url, &fake, &prefix);
        tweak(&mut settings);
        Self {
            fake,
            db_name,
            db_url,
            settings,
        }
    }
}

impl TestEnv {
    /// Removes what the environment made on the shared services: its queues, its dead-letter
    /// exchange and its database. For tests whose workers were all processes.
    pub async fn remove(&self) {
        bounded("deleting the test's queues", async {
            if let Ok(connection) =
                Connection::connect(&amqp_url(), ConnectionProperties::default()).await
            {
                remove_topology_and_close(&connection, &self.settings).await;
            }
        })
        .await;
        bounded("dropping the test's database", drop_database(&self.db_name)).await;
    }
}

pub struct TestApp {
    pub fake: FakeAliyun,
    pub config: Config,
    settings: HashMap<String, String>,
    pub pool: PgPool,
    db_name: String,
    channel: Channel,
    connection: Connection,
    results: Mutex<Consumer>,
    dead: Mutex<Consumer>,
    receipts: Mutex<Consumer>,
    stop: watch::Sender<bool>,
    worker: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Starts a worker after `tweak` has adjusted the test settings (by variable name, as an
    /// operator would).
    pub async fn spawn_with(tweak: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        Self::start(TestEnv::new(tweak).await).await
    }

    /// Starts an in-process worker on an existing environment (its fake, database, queues).
    pub async fn start(env: TestEnv) -> Self {
        let TestEnv {
            fake,
            db_name,
            db_url,
            settings,
        } = env;
        let config = Config::from_map(&settings).expect("test configuration is valid");

        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, mut ready) = watch::channel(false);
        let worker_config = config.clone();
        let worker = tokio::spawn(async move {
            worker::run(worker_config, RunOptions::default(), stop_rx, ready_tx)
                .await
                .expect("worker ran");
        });
        tokio::time::timeout(PATIENCE, ready.wait_for(|r| *r))
            .await
            .expect("worker became ready in time")
            .expect("worker is running");

        let pool = PgPool::connect(&db_url).await.expect("connect test db");
        let (connection, channel) = test_link().await;
        let results = consume(&connection, &config.queues.results).await;
        let dead = consume(&connection, &config.queues.dead_letter).await;
        let receipts = consume(
            &connection,
            config.queues.receipts.as_deref().unwrap_or_default(),
        )
        .await;
        Self {
            fake,
            config,
            settings,
            pool,
            db_name,
            channel,
            connection,
            results: Mutex::new(results),
            dead: Mutex::new(dead),
            receipts: Mutex::new(receipts),
            stop,
            worker: Some(worker),
        }
    }

    /// Publishes raw bytes to the jobs queue with the given properties, confirmed.
    pub async fn publish_raw(&self, body: &[u8], props: BasicProperties) {
        publish_to(&self.channel, &self.config.queues.jobs, body, props).await;
    }

    pub async fn publish(&self, job: &Value) {
        self.publish_raw(
            &serde_json::to_vec(job).expect("json"),
            BasicProperties::default(),
        )
        .await;
    }

    /// The next result on the results queue.
    pub async fn next_result(&self) -> (JobResult, BasicProperties) {
        let delivery = next(&self.results, "a result").await;
        let result = serde_json::from_slice(&delivery.data).unwrap_or_else(|e| {
            panic!(
                "result is not a JobResult ({e}): {}",
                String::from_utf8_lossy(&delivery.data)
            )
        });
        (result, delivery.properties)
    }

    pub async fn results(&self, n: usize) -> Vec<JobResult> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_result().await.0);
        }
        out
    }

    pub async fn next_dead_letter(&self) -> Delivery {
        next(&self.dead, "a dead letter").await
    }

    /// The next delivery event on the receipts queue, as JSON.
    pub async fn next_receipt(&self) -> Value {
        let d = next(&self.receipts, "a delivery receipt").await;
        serde_json::from_slice(&d.data).expect("receipt event is JSON")
    }

    pub async fn deliveries(&self, id: &str) -> Vec<Value> {
        let rows: Vec<(Value,)> = sqlx::query_as(
            "SELECT to_jsonb(d) FROM sms_deliveries d WHERE job_id = $1 ORDER BY phone_number",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .expect("query sms_deliveries");
        rows.into_iter().map(|r| r.0).collect()
    }

    /// Publishes a job with direct reply-to and waits for its result (a backend's request).
    pub async fn request(&self, job: &Value) -> JobResult {
        let client = aliyun_sms_worker::sms_client::SmsClient::connect(
            &amqp_url(),
            &self.config.queues.jobs,
        )
        .await
        .expect("client connects");
        let id = job["id"].as_str().expect("job id");
        let result = client
            .request(&serde_json::to_vec(job).expect("json"), id, PATIENCE)
            .await
            .expect("a result over direct reply-to");
        client.close().await;
        result
    }

    /// A consumer on a fresh, exclusive, server-named queue (for reply_to tests).
    pub async fn reply_queue(&self) -> (String, Consumer) {
        let ch = self.connection.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                ShortString::from(""),
                lapin::options::QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare reply queue");
        let name = q.name().as_str().to_owned();
        let consumer = consume(&self.connection, &name).await;
        (name, consumer)
    }

    pub async fn job_row(&self, id: &str) -> Value {
        job_row(&self.pool, id).await
    }

    /// The settings the worker was started with, by variable name: for the binary, to run
    /// against the same queues and database.
    pub fn settings(&self) -> &HashMap<String, String> {
        &self.settings
    }

    pub async fn attempts(&self, id: &str) -> Vec<Value> {
        attempts(&self.pool, id).await
    }

    /// Stops the worker the way SIGTERM does, keeping its queues and database.
    pub async fn stop_worker(&mut self) {
        let _ = self.stop.send(true);
        if let Some(worker) = self.worker.take() {
            tokio::time::timeout(PATIENCE, worker)
                .await
                .expect("worker stopped within the grace period")
                .expect("worker task did not panic");
        }
    }

    /// A channel of the test's own RabbitMQ connection.
    pub async fn channel(&self) -> Channel {
        self.connection.create_channel().await.expect("channel")
    }

    /// Stops the worker, then removes the test's queues and database.
    ///
    /// Each clean-up step of the test's own connections is bounded: lapin's connection close
    /// once hung a whole CI run (17 minutes, after the test had passed; see [`delete_topology`]).
    /// A step that times out is named on stderr and the rest still run; the database is dropped
    /// `WITH (FORCE)` whatever is left.
    pub async fn shutdown(mut self) {
        self.stop_worker().await;
        remove_topology_and_close(&self.connection, &self.settings).await;
        bounded("closing the test's Postgres pool", self.pool.close()).await;
        bounded("dropping the test's database", drop_database(&self.db_name)).await;
    }
}

/// Runs one clean-up step for at most [`CLEAN_UP_PATIENCE`], saying so on stderr when it does not
/// finish (a clean-up that hangs must not hold the suite, and must not pass unnoticed either).
pub async fn bounded<F: std::future::Future>(step: &str, f: F) {
    if tokio::time::timeout(CLEAN_UP_PATIENCE, f).await.is_err() {
        eprintln!("test clean-up: {step} did not finish within {CLEAN_UP_PATIENCE:?}; going on");
    }
}

const CLEAN_UP_PATIENCE: Duration = Duration::from_secs(10);

/// Removes a test's queues and closes the connection that did it: the last RabbitMQ step of
/// most tests.
pub async fn remove_topology_and_close(
    connection: &Connection,
    settings: &HashMap<String, String>,
) {
    delete_topology(connection, settings).await;
    close_connection(connection).await;
}

/// Closes a test's own RabbitMQ connection, [`bounded`]: lapin's close can wait for ever.
pub async fn close_connection(connection: &Connection) {
    bounded(
        "closing the test's RabbitMQ connection",
        connection.close(200, ShortString::from("test done")),
    )
    .await;
}

/// A job's `sms_jobs` row as JSON (null when there is none).
pub async fn job_row(pool: &PgPool, id: &str) -> Value {
    let row: Option<(Value,)> = sqlx::query_as("SELECT to_jsonb(j) FROM sms_jobs j WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .expect("query sms_jobs");
    row.map(|r| r.0).unwrap_or(Value::Null)
}

/// A job's `sms_attempts` rows as JSON, in order.
pub async fn attempts(pool: &PgPool, id: &str) -> Vec<Value> {
    let rows: Vec<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(a) FROM sms_attempts a WHERE job_id = $1 ORDER BY attempt")
            .bind(id)
            .fetch_all(pool)
            .await
            .expect("query sms_attempts");
    rows.into_iter().map(|r| r.0).collect()
}

/// Removes a test's queues and dead-letter exchange, [`bounded`] like every clean-up step.
async fn delete_topology(connection: &Connection, settings: &HashMap<String, String>) {
    bounded(
        "deleting the test's queues",
        remove_topology(connection, settings),
    )
    .await;
}

async fn remove_topology(connection: &Connection, settings: &HashMap<String, String>) {
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    for name in [
        config::SMS_JOBS_QUEUE,
        config::SMS_RESULTS_QUEUE,
        config::SMS_DEAD_LETTER_QUEUE,
        config::SMS_RECEIPTS_QUEUE,
    ] {
        if let Some(queue) = settings.get(name) {
            let _ = channel
                .queue_delete(
                    ShortString::from(queue.as_str()),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
    }
    if let Some(dlx) = settings.get(config::SMS_DEAD_LETTER_EXCHANGE) {
        let _ = channel
            .exchange_delete(ShortString::from(dlx.as_str()), Default::default())
            .await;
    }
    // Closed, not dropped: lapin closes a dropped channel from a task of its own, and when the
    // connection is closing by then (callers close it next) that close fails and lapin takes the
    // connection for broken. Its close then errs, or waits for ever: drop a channel and close
    // the connection, 500 times in a loop here, and 463 closes erred and 2 hung (0 and 0 with the
    // channel closed first). That is the hang a CI run once spent 17 minutes in.
    let _ = channel.close(200, ShortString::from("test done")).await;
}

/// The test's own connection to RabbitMQ, and a channel on it in confirm mode.
pub async fn test_link() -> (Connection, Channel) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (connection, channel)
}

/// Publishes raw bytes, persistent, to `queue` on a channel in confirm mode; returns once
/// RabbitMQ confirmed them.
pub async fn publish_to(channel: &Channel, queue: &str, body: &[u8], props: BasicProperties) {
    let confirm = channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions::default(),
            body,
            props.with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "job publish was not confirmed");
}

pub async fn consume(connection: &Connection, queue: &str) -> Consumer {
    let ch = connection.create_channel().await.expect("channel");
    ch.basic_consume(
        ShortString::from(queue),
        ShortString::from(""),
        BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("consume")
}

pub async fn next_from(consumer: &mut Consumer, what: &str) -> Delivery {
    tokio::time::timeout(PATIENCE, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("consumer closed while waiting for {what}"))
        .unwrap_or_else(|e| panic!("consumer failed while waiting for {what}: {e}"))
}

async fn next(consumer: &Mutex<Consumer>, what: &str) -> Delivery {
    let mut c = consumer.lock().await;
    next_from(&mut c, what).await
}

/// A valid send_verify_code job with a unique id and phone number.
pub fn send_job(id: &str) -> Value {
    json!({
        "id": id,
        "type": "send_verify_code",
        "phone_number": unique_phone(),
        "sign_name": "速通互联验证码",
        "template_code": "100001",
        "template_param": {"code": "##code##", "min": "5"},
        "code_length": 6,
    })
}

pub fn unique_id(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
}

/// A number no other call in this test process has had. Drawn at random each time, 2,000 jobs
/// would share one about once in fifty runs, and the second send to it is refused by the fake's
/// 60-second interval (`biz.FREQUENCY`), as by Aliyun's.
pub fn unique_phone() -> String {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    let n = NEXT
        .get_or_init(|| rand::random_range(0..100_000_000).into())
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("139{:08}", n % 100_000_000)
}

/// A loopback address with a port that is free now, for a listener the test starts later. Below
/// the kernel's ephemeral range: a port from that range could be handed out meanwhile on its
/// own, to a `bind` on port 0 or to an outgoing connection (seen in CI, with a hundred tests at
/// once). And each call of this process gets another port.
pub fn free_addr() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST);
    // Apart from other test processes' ports, most likely.
    let offset = std::process::id().wrapping_mul(7_919);
    for _ in 0..span.min(1_000) {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(port) = u16::try_from(LOWEST + offset.wrapping_add(n) % span) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return format!("127.0.0.1:{port}");
        }
    }
    // No room below the range (a kernel set up so): any free port, as before.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

/// GET on the admin listener: (status, body).
pub async fn admin_get(addr: &str, path: &str) -> (u16, String) {
    aliyun_sms_worker::tls::install_crypto_provider();
    let response = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("admin listener answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Publishes `jobs` to `queue` (persistent) and waits until RabbitMQ confirmed every one.
pub async fn publish_jobs(connection: &Connection, queue: &str, jobs: &[Value]) {
    let publisher = connection.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut confirms = Vec::with_capacity(jobs.len());
    for job in jobs {
        let confirm = publisher
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                &serde_json::to_vec(job).expect("json"),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in futures_util::future::join_all(confirms).await {
        assert!(
            confirm.expect("confirmed").is_ack(),
            "a job was not confirmed"
        );
    }
}

/// Holds the lock a guarded claim of `phone` takes first (see `store::guards`), until the
/// transaction ends.
pub async fn hold_the_number(
    pool: &PgPool,
    phone: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut number = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("smsw-check:{phone}"))
        .execute(&mut *number)
        .await
        .expect("take the number's lock");
    number
}

/// Waits until a guarded claim has waited `secs` seconds for its number's lock.
pub async fn a_claim_waited_for_its_number(pool: &PgPool, secs: f64) {
    eventually("a guarded claim waits for its number", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE '%pg_advisory_xact_lock%'
               AND xact_start < now() - make_interval(secs => $1)",
        )
        .bind(secs)
        .fetch_one(pool)
        .await
        .expect("read the activity");
        (waiting > 0).then_some(())
    })
    .await;
}
