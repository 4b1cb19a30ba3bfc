//! `aliyun-sms-worker bench`: the worker's throughput and latency against the local RabbitMQ
//! and Postgres and an in-process fake Aliyun, next to the ceiling of the same machine for the
//! same shape of work (a bare consume → confirmed publish → ack loop), measured in the same run.
//!
//! The worker runs as a child process (this same binary, `run`), so its peak RSS and CPU time
//! are its own, not the load generator's. `bench --workers 1,2,3` runs fleets of such
//! processes instead (see [`fleet`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::json;
use sqlx::Connection as _;

use crate::amqp_nodes::AmqpNodes;
use crate::cli::output::OutputError;
use crate::config;
use crate::fake_aliyun::{FakeAliyun, FakeConfig};
use crate::outln;

mod fleet;
pub use fleet::{FleetOptions, run_fleet};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub jobs: usize,
    pub latency: Duration,
    pub concurrency: u16,
    /// The measured workers' `RUST_LOG`: `info` unless asked otherwise, as users run it.
    pub log_level: String,
    pub amqp_url: String,
    pub database_url: String,
}

fn short(s: &str) -> ShortString {
    ShortString::from(s)
}

/// The bench's own connections go to the nodes `AMQP_URL` lists, like the worker's.
fn nodes(amqp_url: &str) -> anyhow::Result<AmqpNodes> {
    AmqpNodes::parse(amqp_url).map_err(|e| anyhow::anyhow!("AMQP_URL is malformed: {e}"))
}

async fn channel(connection: &Connection) -> anyhow::Result<Channel> {
    let ch = connection.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// A durable queue; `quorum` like the worker's jobs queue, so the ceiling pays what it pays.
async fn declare(ch: &Channel, name: &str, quorum: bool) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    if quorum {
        args.insert(
            short("x-queue-type"),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
    }
    ch.queue_declare(
        short(name),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    Ok(())
}

/// Publishes persistent jobs with confirms pipelined (all in flight, awaited together).
/// Publishes the jobs `ids`, the first being job number `first` of the run (its number gives
/// its phone number: each must be its own, or the fake, like Aliyun, refuses a second code to
/// one number within a minute).
async fn publish_all(
    ch: &Channel,
    queue: &str,
    ids: &[String],
    first: usize,
) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        pending.push(publish_job(ch, queue, id, first + i).await?);
    }
    for confirm in join_all(pending).await {
        ensure!(confirm?.is_ack(), "RabbitMQ refused a published message");
    }
    Ok(())
}

async fn publish_job(
    ch: &Channel,
    queue: &str,
    id: &str,
    i: usize,
) -> anyhow::Result<lapin::PublisherConfirm> {
    Ok(ch
        .basic_publish(
            short(""),
            short(queue),
            BasicPublishOptions::default(),
            &job_body(id, i),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(short(id)),
        )
        .await?)
}

/// The machine's ceiling for this shape of work, as a consumer: take a job, publish a small
/// result (persistent, confirmed), ack — no database, no HTTP. Runs until [`Echo::stop`].
struct Echo {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Echo {
    async fn start(
        connection: &Connection,
        input: &str,
        output: &str,
        prefetch: u16,
    ) -> anyhow::Result<Self> {
        let consume = connection.create_channel().await?;
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let publish = channel(connection).await?;
        let mut consumer = consume
            .basic_consume(
                short(input),
                short("ceiling"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let output = output.to_owned();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let run = async {
                loop {
                    tokio::select! {
                        _ = &mut stopped => return Ok(()),
                        Some(delivery) = consumer.next() => {
                            let delivery = delivery?;
                            let publish = publish.clone();
                            let output = output.clone();
                            tasks.spawn(async move {
                                let id = delivery.properties.message_id().as_ref().map(|s| s.to_string());
                                let body = json!({"id": id, "status": "sent"}).to_string();
                                let confirm = publish
                                    .basic_publish(short(""), short(&output), BasicPublishOptions::default(),
                                        body.as_bytes(), BasicProperties::default().with_delivery_mode(2))
                                    .await?
                                    .await?;
                                ensure!(confirm.is_ack(), "result not confirmed");
                                delivery.acker.ack(BasicAckOptions::default()).await?;
                                Ok::<_, anyhow::Error>(())
                            });
                        }
                        Some(joined) = tasks.join_next() => joined??,
                    }
                }
            };
            let mut outcome: anyhow::Result<()> = run.await;
            while let Some(joined) = tasks.join_next().await {
                let joined = joined.map_err(anyhow::Error::from).and_then(|r| r);
                outcome = outcome.and(joined);
            }
            // Closed here, not dropped, and before the consumer goes: lapin closes a dropped
            // channel (and cancels a dropped consumer) from a task of its own, and when that
            // finds the channel already closing it takes the whole connection for broken —
            // the connection the bench goes on using.
            let _ = consume.close(200, short("ceiling done")).await;
            let _ = publish.close(200, short("ceiling done")).await;
            drop(consumer);
            outcome
        });
        Ok(Self { stop, task })
    }

    /// Stops consuming, lets the jobs in hand finish, and closes the loop's channels; gives up
    /// (and aborts the loop) when a job in hand waits on a confirm that does not come.
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        match tokio::time::timeout(ECHO_STOP_PATIENCE, &mut self.task).await {
            Ok(joined) => joined?,
            Err(_) => {
                self.task.abort();
                bail!("the ceiling loop did not stop within {ECHO_STOP_PATIENCE:?}")
            }
        }
    }
}

/// How long the ceiling loop's jobs in hand may take to finish once it is told to stop.
const ECHO_STOP_PATIENCE: Duration = Duration::from_secs(10);

/// The peak RSS of a process so far (VmHWM), in kB; an error when it cannot be read, since
/// a figure of 0 would pass any memory target.
fn peak_rss_kb_of(pid: u32) -> anyhow::Result<u64> {
    proc_status_kb(pid, "VmHWM:").with_context(|| {
        format!("could not read the peak RSS of process {pid} (/proc/{pid}/status VmHWM)")
    })
}

/// Reads a number from /proc/<pid>/status (kB) — VmHWM is the peak RSS.
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of a process, in seconds.
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports clock ticks; 100 per second on every common configuration.
    Some((utime + stime) / 100.0)
}

/// CPU seconds per process, read from /proc, for the processes a run shares the machine with.
#[derive(Default)]
struct CpuSnapshot {
    by_pid: HashMap<u32, (String, f64)>,
}

/// Who used the CPU during a phase: each process is put in one of these groups.
const CPU_GROUPS: [&str; 4] = ["worker", "RabbitMQ", "Postgres", "bench process"];

impl CpuSnapshot {
    fn take() -> Self {
        let mut by_pid = HashMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Self::default();
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let comm = stat
                .split_once('(')
                .and_then(|(_, rest)| rest.rsplit_once(')'))
                .map_or("", |(c, _)| c);
            if let Some(cpu) = proc_cpu_seconds(pid) {
                by_pid.insert(pid, (comm.to_owned(), cpu));
            }
        }
        Self { by_pid }
    }

    /// CPU seconds each group used between `before` and `self`. A process that ended in
    /// between (a closed Postgres connection) is not counted, so figures are lower bounds.
    fn since(&self, before: &Self, worker: Option<u32>) -> [f64; 4] {
        let me = std::process::id();
        let mut used = [0.0; 4];
        for (pid, (comm, cpu)) in &self.by_pid {
            let group = if Some(*pid) == worker {
                0
            } else if comm == "beam.smp" {
                1
            } else if comm == "postgres" {
                2
            } else if *pid == me {
                3
            } else {
                continue;
            };
            let start = before.by_pid.get(pid).map_or(0.0, |(_, c)| *c);
            used[group] += (cpu - start).max(0.0);
        }
        used
    }
}

/// One line per group with CPU milliseconds per job, and what the machine could do if CPU
/// were the only limit; with `over`, the phase's length, also how busy the cores were.
fn print_cpu(
    label: &str,
    used: [f64; 4],
    jobs: usize,
    over: Option<Duration>,
) -> Result<(), OutputError> {
    let per_job_ms = |s: f64| s * 1000.0 / jobs.max(1) as f64;
    let total: f64 = used.iter().sum();
    let parts: Vec<String> = CPU_GROUPS
        .iter()
        .zip(used)
        .filter(|(_, s)| *s > 0.0)
        .map(|(g, s)| format!("{g} {:.3}", per_job_ms(s)))
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = over.map_or(String::new(), |over| {
        format!(
            "; these processes kept {:.2} of the {cores:.0} cores busy",
            total / over.as_secs_f64().max(f64::EPSILON)
        )
    });
    outln!(
        "{label} CPU ms per job: {} = {:.3} in all; {cores:.0} cores allow at most {:.0}/s{busy}",
        parts.join(" + "),
        per_job_ms(total),
        if total > 0.0 {
            cores * 1000.0 / per_job_ms(total)
        } else {
            0.0
        }
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Measures the worker at each upstream latency in turn (`opts.latency` is ignored), each run
/// on fresh queues and a fresh database; with 0 ms and another latency, also how much of the
/// latency the worker hides.
pub async fn run(opts: BenchOptions, latencies: &[Duration]) -> anyhow::Result<()> {
    ensure!(opts.jobs > 0, "--jobs must be at least 1");
    let mut rates = Vec::with_capacity(latencies.len());
    for (i, latency) in latencies.iter().enumerate() {
        let opts = BenchOptions {
            latency: *latency,
            ..opts.clone()
        };
        if i > 0 {
            outln!("")?;
        }
        outln!(
            "bench: {} jobs, upstream latency {} ms, concurrency {}, worker log level {}, {} cores",
            opts.jobs,
            opts.latency.as_millis(),
            opts.concurrency,
            opts.log_level,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        )?;
        let measured =
            scratch_run(&opts, async |tag, db_url| measure(&opts, tag, db_url).await).await?;
        rates.push((*latency, measured));
    }
    let at = |ms: u64| {
        rates
            .iter()
            .find(|(l, _)| *l == Duration::from_millis(ms))
            .map(|(_, m)| *m)
    };
    if let (Some(zero), Some(fifty)) = (at(0), at(50)) {
        let hidden = fifty.rate / zero.rate.max(f64::EPSILON);
        outln!("")?;
        outln!(
            "latency hidden: {:.0} jobs/s at 50 ms = {hidden:.2} x the {:.0} at 0 ms (target >= 0.9: {})",
            fifty.rate,
            zero.rate,
            if hidden >= 0.9 { "met" } else { "NOT met" }
        )?;
        // Two runs a few minutes apart: the comparison holds only if the machine held still.
        let drift = (fifty.ceiling - zero.ceiling).abs()
            / ((fifty.ceiling + zero.ceiling) / 2.0).max(f64::EPSILON);
        if !zero.steady || !fifty.steady || drift > STEADY {
            outln!(
                "machine unsteady: the ceiling was {:.0} msgs/s in the 0 ms run and {:.0} in the 50 ms run{}; relative to each run's ceiling the worker kept {:.2} x; run again to compare",
                zero.ceiling,
                fifty.ceiling,
                if zero.steady && fifty.steady {
                    ""
                } else {
                    ", and moved within a run"
                },
                (fifty.rate / fifty.ceiling.max(f64::EPSILON))
                    / (zero.rate / zero.ceiling.max(f64::EPSILON)).max(f64::EPSILON)
            )?;
        }
    }
    Ok(())
}

/// What one run hands to the comparison of latencies.
#[derive(Clone, Copy)]
struct Measured {
    /// The worker's throughput draining the backlog, jobs/s.
    rate: f64,
    /// The mean of the ceilings before and after the worker, msgs/s.
    ceiling: f64,
    /// Whether those two ceilings were within [`STEADY`] of each other.
    steady: bool,
}

/// Runs `body` with fresh names for its queues and job ids (the tag) and a fresh database
/// (its URL), and removes both afterwards, whether the run worked or not: a failed run must not
/// leave 20,000 messages behind.
async fn scratch_run<T>(
    opts: &BenchOptions,
    body: impl AsyncFnOnce(&str, &str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let tag = format!(
        "smsw-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let db = ScratchDb::create(&opts.database_url).await?;
    let outcome = body(&tag, &db.url).await;
    if let Err(e) = remove_queues(&opts.amqp_url, &tag).await {
        eprintln!("bench: could not remove the {tag}.* queues: {e}");
    }
    db.drop().await;
    outcome
}

/// A database of its own for one run, on the server of `DATABASE_URL`, dropped afterwards.
struct ScratchDb {
    admin: sqlx::PgConnection,
    name: String,
    url: String,
}

impl ScratchDb {
    async fn create(database_url: &str) -> anyhow::Result<Self> {
        let name = format!("smsw_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(database_url)
            .await
            .context("connecting to Postgres")?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        let url = match database_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => bail!("DATABASE_URL has no database part"),
        };
        Ok(Self { admin, name, url })
    }

    async fn drop(mut self) {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        )))
        .execute(&mut self.admin)
        .await;
    }
}

/// Starts this binary as a worker (`run <args>`) with only `env` (and PATH, HOME), logging at
/// `log_level`. Its log goes to a file named after `label`, written by the worker
/// itself: relayed through the bench, every job's line would cost the bench's CPU and count
/// against the figures.
fn spawn_worker(
    env: &HashMap<String, String>,
    args: &[&str],
    label: &str,
    log_level: &str,
) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let log_path = std::env::temp_dir().join(format!(
        "aliyun-sms-worker-bench-{}-{}.log",
        label.replace(' ', "-"),
        std::process::id()
    ));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating the worker log {}", log_path.display()))?;
    eprintln!("bench: {label} logs to {}", log_path.display());
    let child = tokio::process::Command::new(exe)
        .arg("run")
        .args(args)
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| k == "PATH" || k == "HOME"))
        .envs(env)
        .env("RUST_LOG", log_level)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the worker")?;
    Ok(child)
}

/// SIGTERM, then up to 30 s for the worker to drain and exit.
async fn stop_worker(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
}

/// The bench's side of a run on RabbitMQ: the worker's queues (from its environment), and the
/// connection and channel that published the backlog and read the results.
struct Backlog {
    queues: config::QueueConfig,
    connection: Connection,
    ch: Channel,
    broker: crate::broker::Broker,
}

impl Backlog {
    /// Declares the worker's topology and publishes `jobs` jobs (ids `{tag}-{i}`) before any
    /// worker starts.
    async fn publish(
        opts: &BenchOptions,
        env: &HashMap<String, String>,
        tag: &str,
    ) -> anyhow::Result<Self> {
        let backlog = Self::declare(opts, env).await?;
        backlog.publish_jobs(opts, tag).await?;
        Ok(backlog)
    }

    /// The connection and the worker's topology, with nothing published yet.
    async fn declare(opts: &BenchOptions, env: &HashMap<String, String>) -> anyhow::Result<Self> {
        let queues = config::Config::from_map(env)?.queues;
        let nodes = nodes(&opts.amqp_url)?;
        let connection = nodes.connect("bench", 0).await?.connection;
        let ch = channel(&connection).await?;
        let broker = crate::broker::Broker::connect(&nodes, 0, "bench", queues.clone()).await?;
        broker.declare_topology().await?;
        Ok(Self {
            queues,
            connection,
            ch,
            broker,
        })
    }

    async fn publish_jobs(&self, opts: &BenchOptions, tag: &str) -> anyhow::Result<()> {
        let ids: Vec<String> = (0..opts.jobs).map(|i| format!("{tag}-{i}")).collect();
        for (n, chunk) in ids.chunks(1000).enumerate() {
            publish_all(&self.ch, &self.queues.jobs, chunk, n * 1000).await?;
        }
        Ok(())
    }

    async fn close(self) {
        self.broker.close().await;
        crate::broker::close_connection(&self.connection, "bench done").await;
    }
}

/// The bench's own check of a run, job by job: `total` rows, every one `sent`, and exactly
/// one executed send at the fake for each (matched by OutId, which is the job id), and none
/// for a job without a row. Returns the number of rows and of sends.
/// The Postgres server's WAL position. The WAL a job's writes cost does not move with the
/// machine's load, as CPU time does: a change to the writes shows in it from one run.
async fn wal_position(db_url: &str) -> anyhow::Result<String> {
    let mut conn = sqlx::PgConnection::connect(db_url).await?;
    let at = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok(at)
}

/// Bytes of WAL the server wrote since `from` (a [`wal_position`]).
async fn wal_since(db_url: &str, from: &str) -> anyhow::Result<f64> {
    let mut conn = sqlx::PgConnection::connect(db_url).await?;
    let bytes = sqlx::query_scalar(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::double precision",
    )
    .bind(from)
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    Ok(bytes)
}

async fn verify(db_url: &str, fake: &FakeAliyun, total: usize) -> anyhow::Result<(usize, usize)> {
    let pool = sqlx::PgPool::connect(db_url).await?;
    let rows: Result<Vec<(String, String)>, sqlx::Error> =
        sqlx::query_as("SELECT id, status FROM sms_jobs")
            .fetch_all(&pool)
            .await;
    pool.close().await;
    let rows = rows?;
    let mut sends: HashMap<String, usize> = HashMap::new();
    for r in fake.requests().iter().filter(|r| r.executed) {
        *sends
            .entry(r.out_id.clone().unwrap_or_default())
            .or_default() += 1;
    }
    ensure!(
        rows.len() == total,
        "expected {total} rows, found {}",
        rows.len()
    );
    for (id, status) in &rows {
        ensure!(status == "sent", "job {id} ended {status}, not sent");
        let n = sends.get(id).copied().unwrap_or(0);
        ensure!(n == 1, "job {id} was sent {n} times at the fake");
    }
    let fake_sends: usize = sends.values().sum();
    ensure!(
        fake_sends == rows.len(),
        "the fake executed {fake_sends} sends for {} jobs (sends without a job row)",
        rows.len()
    );
    Ok((rows.len(), fake_sends))
}

/// Deletes every queue and exchange a run named after `tag`.
async fn remove_queues(amqp_url: &str, tag: &str) -> anyhow::Result<()> {
    let connection = nodes(amqp_url)?.connect("bench", 0).await?.connection;
    for suffix in [
        "jobs",
        "results",
        "dead",
        "receipts",
        "ceiling.in",
        "ceiling.out",
        "ceiling-before.in",
        "ceiling-before.out",
    ] {
        // A channel per delete: deleting a queue that is not there closes the channel. One
        // that is still open is closed, not dropped (see `Echo`).
        let ch = connection.create_channel().await?;
        let _ = ch
            .queue_delete(
                short(&format!("{tag}.{suffix}")),
                QueueDeleteOptions::default(),
            )
            .await;
        let _ = ch.close(200, short("bench done")).await;
    }
    let ch = connection.create_channel().await?;
    let _ = ch
        .exchange_delete(short(&format!("{tag}.dlx")), Default::default())
        .await;
    let _ = ch.close(200, short("bench done")).await;
    crate::broker::close_connection(&connection, "bench done").await;
    Ok(())
}

/// The worker's environment for this run: fresh queues, the fake Aliyun, no side tasks.
fn worker_env(
    opts: &BenchOptions,
    tag: &str,
    db_url: &str,
    fake: &FakeAliyun,
    key_id: &str,
    secret: &str,
) -> HashMap<String, String> {
    [
        (config::SMS_JOBS_QUEUE, format!("{tag}.jobs")),
        (config::SMS_RESULTS_QUEUE, format!("{tag}.results")),
        (config::SMS_DEAD_LETTER_QUEUE, format!("{tag}.dead")),
        (config::SMS_DEAD_LETTER_EXCHANGE, format!("{tag}.dlx")),
        (config::SMS_RECEIPTS_QUEUE, format!("{tag}.receipts")),
        (config::AMQP_URL, opts.amqp_url.clone()),
        (config::DATABASE_URL, db_url.to_owned()),
        (config::ALIBABA_CLOUD_ACCESS_KEY_ID, key_id.to_owned()),
        (config::ALIBABA_CLOUD_ACCESS_KEY_SECRET, secret.to_owned()),
        (config::ALIYUN_DYPNSAPI_ENDPOINT, fake.endpoint()),
        (config::ALIYUN_DYSMSAPI_ENDPOINT, fake.endpoint()),
        (config::WORKER_CONCURRENCY, opts.concurrency.to_string()),
        (config::ALIYUN_MAX_QPS, "100000".to_owned()),
        (config::RECEIPTS_ENABLED, "false".to_owned()),
        (config::ADMIN_ADDR, String::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// An in-process fake Aliyun answering after `latency`, with fresh credentials, and the
/// environment of a worker that calls it.
async fn fake_and_env(
    opts: &BenchOptions,
    latency: Duration,
    tag: &str,
    db_url: &str,
) -> anyhow::Result<(FakeAliyun, HashMap<String, String>)> {
    let key_id = "bench-key";
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let mut fake_config = FakeConfig::new(key_id, secret.clone());
    fake_config.latency = latency;
    let fake = FakeAliyun::start(fake_config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
    let env = worker_env(opts, tag, db_url, &fake, key_id, &secret);
    Ok((fake, env))
}

/// A job body like a backend's; ids carry the run's tag so results can be matched.
fn job_body(id: &str, i: usize) -> Vec<u8> {
    json!({"id": id, "type": "send_verify_code",
           "phone_number": format!("139{:08}", i % 100_000_000),
           "sign_name": "速通互联验证码", "template_code": "100001",
           "template_param": {"code": "##code##", "min": "5"}})
    .to_string()
    .into_bytes()
}

/// Waits for `n` results of distinct jobs, each `sent`; returns when each arrived, by id.
async fn collect_results(
    results: &mut lapin::Consumer,
    n: usize,
    pid: Option<u32>,
    peak_rss_kb: &mut u64,
) -> anyhow::Result<HashMap<String, Instant>> {
    let mut seen = HashMap::with_capacity(n);
    while seen.len() < n {
        let delivery = tokio::time::timeout(Duration::from_secs(60), results.next())
            .await
            .context("no result for 60 s")?
            .context("results consumer closed")??;
        let now = Instant::now();
        let result: serde_json::Value = serde_json::from_slice(&delivery.data)?;
        ensure!(
            result["status"] == "sent",
            "a job did not end sent: {result}"
        );
        if let Some(id) = result["id"].as_str() {
            seen.entry(id.to_owned()).or_insert(now);
        }
        if let Some(pid) = pid
            && seen.len() % 1000 == 0
        {
            *peak_rss_kb = (*peak_rss_kb).max(peak_rss_kb_of(pid)?);
        }
    }
    Ok(seen)
}

/// Sum and count of each job stage's duration, read from the worker's `/metrics`.
/// Running totals read from the worker's `/metrics`, by stage and by batched write.
#[derive(Clone, Default)]
struct Totals {
    /// Stage: (seconds, jobs) of `sms_job_stage_duration_seconds`.
    stages: HashMap<String, (f64, f64)>,
    /// Write: (batches, jobs, seconds) of the `sms_store_batch*` counters.
    batches: HashMap<String, (f64, f64, f64)>,
}

/// The value of a sample `{family}{{{label}="…"}} value`, with that label's value.
fn labelled<'a>(line: &'a str, family: &str, label: &str) -> Option<(&'a str, f64)> {
    let rest = line
        .strip_prefix(family)?
        .strip_prefix('{')?
        .strip_prefix(label)?
        .strip_prefix("=\"")?;
    let (value_of_label, value) = rest.split_once("\"} ")?;
    Some((value_of_label, value.trim().parse().ok()?))
}

async fn scrape_totals(admin: &str) -> anyhow::Result<Totals> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse_totals(&text))
}

fn parse_totals(text: &str) -> Totals {
    let mut totals = Totals::default();
    for line in text.lines() {
        let stage = |suffix: &str| {
            labelled(
                line,
                &format!("sms_job_stage_duration_seconds{suffix}"),
                "stage",
            )
        };
        let batch = |family: &str| labelled(line, family, "write");
        if let Some((stage, v)) = stage("_sum") {
            totals.stages.entry(stage.to_owned()).or_default().0 = v;
        } else if let Some((stage, v)) = stage("_count") {
            totals.stages.entry(stage.to_owned()).or_default().1 = v;
        } else if let Some((write, v)) = batch("sms_store_batches_total") {
            totals.batches.entry(write.to_owned()).or_default().0 = v;
        } else if let Some((write, v)) = batch("sms_store_batch_jobs_total") {
            totals.batches.entry(write.to_owned()).or_default().1 = v;
        } else if let Some((write, v)) = batch("sms_store_batch_seconds_total") {
            totals.batches.entry(write.to_owned()).or_default().2 = v;
        }
    }
    totals
}

/// One unlabelled gauge from the worker's `/metrics`.
async fn scrape_gauge(admin: &str, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("the worker's /metrics has no {name}"))
}

/// Mean milliseconds per stage between two scrapes, in the order a job meets them.
fn stage_means(before: &Totals, after: &Totals) -> String {
    ["pace", "claim", "aliyun", "record", "publish", "ack"]
        .iter()
        .map(|stage| {
            let (s1, c1) = after.stages.get(*stage).copied().unwrap_or_default();
            let (s0, c0) = before.stages.get(*stage).copied().unwrap_or_default();
            let mean = if c1 > c0 {
                (s1 - s0) / (c1 - c0) * 1000.0
            } else {
                0.0
            };
            format!("{stage} {mean:.1}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Jobs per batch and milliseconds per batch of each batched write between two scrapes; a
/// write that made no batch is left out.
fn batch_means(before: &Totals, after: &Totals) -> String {
    let means = ["claim", "stamp", "outcome", "result_published"]
        .iter()
        .filter_map(|write| {
            let (b1, j1, s1) = after.batches.get(*write).copied().unwrap_or_default();
            let (b0, j0, s0) = before.batches.get(*write).copied().unwrap_or_default();
            let batches = b1 - b0;
            (batches > 0.0).then(|| {
                format!(
                    "{write} {:.1} jobs in {:.1} ms",
                    (j1 - j0) / batches,
                    (s1 - s0) / batches * 1000.0
                )
            })
        })
        .collect::<Vec<_>>();
    if means.is_empty() {
        // Said, not left blank: a blank would read as "no batches" where the worker may
        // export no such counters at all.
        return "none reported by the worker's /metrics in this phase".into();
    }
    means.join(", ")
}

/// The fixed rate of the light-load latency line: a steady trickle, where nothing should
/// wait for a batch.
pub const LIGHT_RATE: f64 = 200.0;

/// What one consumer under test did.
struct Figures {
    /// Jobs per second draining the backlog, first result to last.
    rate: f64,
    cpu: [f64; 4],
    /// The paced phases, in order: at half the backlog rate (or the rate asked), then at
    /// [`LIGHT_RATE`].
    paced: Vec<Paced>,
    peak_rss_kb: u64,
    /// Mean ms per job stage, and jobs and ms per batched write (backlog phase, each paced
    /// phase), when the worker's metrics were read.
    stages: Option<Vec<[String; 2]>>,
}

/// One phase of jobs published at a steady rate.
struct Paced {
    rate: f64,
    /// Enqueue to result, per job, sorted.
    latencies: Vec<Duration>,
    /// Per job, when it was published (from the phase's first publish) and its enqueue to
    /// result, in publish order.
    timeline: Vec<(Duration, Duration)>,
    /// CPU seconds per group of processes during the phase, and how long it took.
    cpu: [f64; 4],
    took: Duration,
}

/// Slow jobs published close together: what one stall of the pipeline leaves behind.
#[derive(Debug, PartialEq)]
struct Burst {
    /// The first one's publish, from the phase's start.
    from: Duration,
    /// The last one's publish, from the phase's start.
    to: Duration,
    jobs: usize,
    slowest: Duration,
}

/// Slow jobs whose publishes are further apart than this belong to different bursts.
const BURST_GAP: Duration = Duration::from_millis(100);

/// The jobs of `timeline` (publish offset and latency, in publish order) that took `slow` or
/// longer, grouped into bursts of publishes less than [`BURST_GAP`] apart; largest first.
fn bursts(timeline: &[(Duration, Duration)], slow: Duration) -> Vec<Burst> {
    let mut bursts: Vec<Burst> = Vec::new();
    for &(at, took) in timeline.iter().filter(|(_, took)| *took >= slow) {
        match bursts.last_mut() {
            Some(b) if at.saturating_sub(b.to) < BURST_GAP => {
                b.to = at;
                b.jobs += 1;
                b.slowest = b.slowest.max(took);
            }
            _ => bursts.push(Burst {
                from: at,
                to: at,
                jobs: 1,
                slowest: took,
            }),
        }
    }
    bursts.sort_by(|a, b| b.jobs.cmp(&a.jobs).then(a.from.cmp(&b.from)));
    bursts
}

impl Paced {
    fn latency_line(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(percentile(&self.latencies, 50.0)),
            ms(percentile(&self.latencies, 99.0)),
            self.latencies.last().map_or(0.0, |d| ms(*d))
        )
    }

    fn p99_ms(&self) -> f64 {
        percentile(&self.latencies, 99.0).as_secs_f64() * 1000.0
    }

    /// Where in the phase the jobs that make its p99 were published: a few bursts are stalls
    /// (of the machine, a disk, a process), many spread thinly is steady queueing.
    fn slow_line(&self) -> String {
        let p99 = percentile(&self.latencies, 99.0);
        let bursts = bursts(&self.timeline, p99);
        let slow: usize = bursts.iter().map(|b| b.jobs).sum();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let secs = |d: Duration| d.as_secs_f64();
        let largest: Vec<String> = bursts
            .iter()
            .take(3)
            .map(|b| {
                format!(
                    "{} published {:.2}-{:.2} s into the phase, up to {:.1} ms",
                    b.jobs,
                    secs(b.from),
                    secs(b.to),
                    ms(b.slowest)
                )
            })
            .collect();
        format!(
            "{slow} jobs at or over p99 {:.1} ms, in {} burst{} (publishes under {} ms apart); largest: {}",
            ms(p99),
            bursts.len(),
            if bursts.len() == 1 { "" } else { "s" },
            BURST_GAP.as_millis(),
            largest.join("; ")
        )
    }
}

impl Figures {
    fn jobs(&self) -> usize {
        self.paced.iter().map(|p| p.latencies.len()).sum()
    }
}

/// Measures whatever consumes the `jobs` queue (already holding `backlog` jobs) and answers
/// on `results`: first the backlog as fast as it goes, then one phase per entry of `rates`
/// (`None`: half the backlog rate), each publishing in 10 ms ticks for about 10 s and timing
/// every job from its publish to its result. `pid` is the consumer's process, if it has its
/// own.
async fn drive(
    under_test: &mut UnderTest<'_>,
    backlog: usize,
    tag: &str,
    rates: &[Option<f64>],
    admin: Option<&str>,
) -> anyhow::Result<Figures> {
    let (results, pid) = (&mut *under_test.results, under_test.pid);
    let mut peak_rss_kb = 0;
    let first = tokio::time::timeout(Duration::from_secs(60), results.next())
        .await
        .context("no result within 60 s of starting")?
        .context("results consumer closed")??;
    let started = Instant::now();
    let cpu_before = CpuSnapshot::take();
    let first: serde_json::Value = serde_json::from_slice(&first.data)?;
    ensure!(first["status"] == "sent", "a job did not end sent: {first}");
    collect_results(results, backlog - 1, pid, &mut peak_rss_kb).await?;
    let elapsed = started.elapsed();
    let cpu = CpuSnapshot::take().since(&cpu_before, pid);
    let rate = if elapsed.is_zero() || backlog < 2 {
        0.0
    } else {
        (backlog - 1) as f64 / elapsed.as_secs_f64()
    };

    let mut totals = Vec::new();
    if let Some(a) = admin {
        totals.push(scrape_totals(a).await?);
    }
    let mut paced = Vec::with_capacity(rates.len());
    // Numbers past those used before: the fake, like Aliyun, refuses a second code to one
    // number within a minute.
    let mut numbers_from = backlog;
    for (phase, asked) in rates.iter().enumerate() {
        let rate = asked.unwrap_or(rate / 2.0).max(1.0);
        let ids: Vec<String> = (0..((rate * 10.0) as usize).clamp(1, backlog))
            .map(|i| format!("{tag}-paced{phase}-{i}"))
            .collect();
        let (cpu_before, started) = (CpuSnapshot::take(), Instant::now());
        let timeline =
            publish_paced(under_test, &ids, rate, numbers_from, &mut peak_rss_kb).await?;
        let (cpu, took) = (
            CpuSnapshot::take().since(&cpu_before, pid),
            started.elapsed(),
        );
        numbers_from += ids.len();
        let mut latencies: Vec<Duration> = timeline.iter().map(|(_, took)| *took).collect();
        latencies.sort_unstable();
        paced.push(Paced {
            rate,
            latencies,
            timeline,
            cpu,
            took,
        });
        if let Some(a) = admin {
            totals.push(scrape_totals(a).await?);
        }
    }
    if let Some(pid) = pid {
        peak_rss_kb = peak_rss_kb.max(peak_rss_kb_of(pid)?);
    }
    let stages = (!totals.is_empty()).then(|| {
        std::iter::once(Totals::default())
            .chain(totals.iter().cloned())
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| [stage_means(&w[0], &w[1]), batch_means(&w[0], &w[1])])
            .collect()
    });
    Ok(Figures {
        rate,
        cpu,
        paced,
        peak_rss_kb,
        stages,
    })
}

/// Whatever consumes the `jobs` queue and answers on `results`, as the bench sees it.
struct UnderTest<'a> {
    connection: &'a Connection,
    jobs: &'a str,
    results: &'a mut lapin::Consumer,
    /// Its process, if it has its own.
    pid: Option<u32>,
}

/// Publishes `ids` at `rate` per second in 10 ms ticks (job `i` to number `numbers_from + i`)
/// and times each from its publish to its result: when it was published, from the first
/// publish, and how long it took, in publish order.
async fn publish_paced(
    under_test: &mut UnderTest<'_>,
    ids: &[String],
    rate: f64,
    numbers_from: usize,
    peak_rss_kb: &mut u64,
) -> anyhow::Result<Vec<(Duration, Duration)>> {
    let per_tick = (rate / 100.0).max(f64::MIN_POSITIVE);
    let publisher = channel(under_test.connection).await?;
    let queue = under_test.jobs.to_owned();
    let pid = under_test.pid;
    let pacing = {
        let ids = ids.to_vec();
        tokio::spawn(async move {
            let mut sent_at = HashMap::with_capacity(ids.len());
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut due = 0.0;
            let mut confirms = Vec::with_capacity(ids.len());
            let mut next = 0;
            while next < ids.len() {
                tick.tick().await;
                due += per_tick;
                while (next as f64) < due && next < ids.len() {
                    sent_at.insert(ids[next].clone(), Instant::now());
                    confirms.push(
                        publish_job(&publisher, &queue, &ids[next], numbers_from + next).await?,
                    );
                    next += 1;
                }
            }
            for confirm in join_all(confirms).await {
                ensure!(confirm?.is_ack(), "RabbitMQ refused a published message");
            }
            Ok::<_, anyhow::Error>(sent_at)
        })
    };
    let arrived = collect_results(under_test.results, ids.len(), pid, peak_rss_kb).await?;
    let sent_at = pacing.await??;
    let start = ids.first().and_then(|id| sent_at.get(id).copied());
    let timeline: Vec<(Duration, Duration)> = ids
        .iter()
        .filter_map(|id| {
            let sent = *sent_at.get(id)?;
            Some((
                sent.saturating_duration_since(start?),
                arrived.get(id)?.saturating_duration_since(sent),
            ))
        })
        .collect();
    ensure!(
        timeline.len() == ids.len(),
        "{} of {} paced results could not be matched",
        timeline.len(),
        ids.len()
    );
    Ok(timeline)
}

/// A results consumer that acks nothing (the bench reads, and the queue is deleted after).
async fn consume_results(ch: &Channel, queue: &str) -> anyhow::Result<lapin::Consumer> {
    Ok(ch
        .basic_consume(
            short(queue),
            short(&format!("bench-{queue}")),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?)
}

/// How far the ceilings before and after the worker may differ (of their mean) before the run
/// says the machine was unsteady. Back-to-back runs on a quiet machine differ by a few percent.
const STEADY: f64 = 0.15;

/// The bare-broker loop (see [`Echo`]) on queues of its own, `{prefix}.in` and
/// `{prefix}.out`: a backlog of `opts.jobs` jobs drained, then the paced phases at `rates`.
async fn ceiling(
    backlog: &Backlog,
    opts: &BenchOptions,
    prefix: &str,
    ids: &str,
    rates: &[Option<f64>],
) -> anyhow::Result<Figures> {
    let (connection, ch) = (&backlog.connection, &backlog.ch);
    let (input, output) = (format!("{prefix}.in"), format!("{prefix}.out"));
    declare(ch, &input, true).await?;
    declare(ch, &output, false).await?;
    let ceiling_ids: Vec<String> = (0..opts.jobs).map(|i| format!("{ids}{i}")).collect();
    for (n, chunk) in ceiling_ids.chunks(1000).enumerate() {
        publish_all(ch, &input, chunk, n * 1000).await?;
    }
    let mut echoed = consume_results(ch, &output).await?;
    let echo = Echo::start(connection, &input, &output, opts.concurrency).await?;
    let figures = drive(
        &mut UnderTest {
            connection,
            jobs: &input,
            results: &mut echoed,
            pid: None,
        },
        opts.jobs,
        ids,
        rates,
        None,
    )
    .await;
    let stopped = echo.stop().await;
    let figures = figures?;
    stopped?;
    Ok(figures)
}

/// One measured run: prints its figures and returns what the latencies are compared by.
async fn measure(opts: &BenchOptions, tag: &str, db_url: &str) -> anyhow::Result<Measured> {
    let (fake, mut env) = fake_and_env(opts, opts.latency, tag, db_url).await?;
    // The worker's own stage timings come from its /metrics, on a port free a moment ago.
    let admin = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .to_string();
    env.insert(config::ADMIN_ADDR.to_owned(), admin.clone());
    // Set empty, so an ADMIN_TOKEN in a .env file cannot lock the bench out of /metrics.
    env.insert(config::ADMIN_TOKEN.to_owned(), String::new());
    // The jobs wait in the queue before the worker starts, as they do for the ceiling: both
    // figures are then about draining a backlog, not about how fast this process publishes.
    // The bare loop drains a backlog before the worker runs and again after: a machine whose
    // speed moved in between (a neighbour, a throttled core) shows as two ceilings that differ,
    // instead of as a ratio that looks like the worker's doing. Before the worker's backlog is
    // published: RabbitMQ writes a fresh backlog to disk for a while after the confirms, and a
    // ceiling measured meanwhile would pay for it.
    let backlog = Backlog::declare(opts, &env).await?;
    let ceiling_before = ceiling(
        &backlog,
        opts,
        &format!("{tag}.ceiling-before"),
        &format!("{tag}-b"),
        &[],
    )
    .await?
    .rate;
    backlog.publish_jobs(opts, tag).await?;
    let (queues, connection, ch) = (&backlog.queues, &backlog.connection, &backlog.ch);
    let mut results = consume_results(ch, &queues.results).await?;
    let wal_from = wal_position(db_url).await?;
    let mut child = spawn_worker(&env, &[], "worker", &opts.log_level)?;
    let pid = child.id().context("worker pid")?;
    let worker = drive(
        &mut UnderTest {
            connection,
            jobs: &queues.jobs,
            results: &mut results,
            pid: Some(pid),
        },
        opts.jobs,
        tag,
        &[None, Some(LIGHT_RATE)],
        Some(&admin),
    )
    .await?;
    let [half, light] = &worker.paced[..] else {
        anyhow::bail!("the bench ran {} paced phases, not 2", worker.paced.len());
    };
    // What the worker really kept in flight, not the setting.
    let peak_in_flight = scrape_gauge(&admin, "sms_jobs_in_flight_peak").await?;
    stop_worker(&mut child).await;
    let wal_bytes = wal_since(db_url, &wal_from).await?;

    // Check every job's row: one, final, sent; and one send each at the fake.
    let (rows, fake_sends) = verify(db_url, &fake, opts.jobs + worker.jobs()).await?;

    // The ceiling, the same way: a backlog of the same jobs, then the worker's paced rates.
    let ceiling = ceiling(
        &backlog,
        opts,
        &format!("{tag}.ceiling"),
        &format!("{tag}-c"),
        &[Some(half.rate), Some(LIGHT_RATE)],
    )
    .await;
    backlog.close().await;
    let ceiling = ceiling?;
    let [ceiling_half, ceiling_light] = &ceiling.paced[..] else {
        anyhow::bail!(
            "the ceiling ran {} paced phases, not 2",
            ceiling.paced.len()
        );
    };
    // The ratio is to the ceiling of the minutes the worker ran in: the mean of the two.
    let ceiling_rate = (ceiling_before + ceiling.rate) / 2.0;
    let drift = (ceiling.rate - ceiling_before).abs() / ceiling_rate.max(f64::EPSILON);

    let latency_ms = opts.latency.as_secs_f64() * 1000.0;
    let ratio = worker.rate / ceiling_rate;
    let rss_mib = worker.peak_rss_kb as f64 / 1024.0;
    let ceiling_p99_ms = ceiling_half.p99_ms();
    let added_p99_ms = half.p99_ms() - latency_ms;
    let light_added_p99_ms = light.p99_ms() - latency_ms;
    let per_job_ms = |cpu: [f64; 4]| cpu.iter().sum::<f64>() * 1000.0 / opts.jobs.max(1) as f64;
    let (worker_cpu_ms, ceiling_cpu_ms) = (per_job_ms(worker.cpu), per_job_ms(ceiling.cpu));
    let cpu_ratio = worker_cpu_ms / ceiling_cpu_ms.max(f64::EPSILON);
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    outln!(
        "ceiling (bare lapin consume -> confirmed publish -> ack): {ceiling_rate:.0} msgs/s (before the worker {ceiling_before:.0}, after {:.0})",
        ceiling.rate
    )?;
    if drift > STEADY {
        outln!(
            "machine unsteady: the ceiling moved {:.0} % while the worker ran (more than {:.0} %); this run's figures are not comparable with another's, run again",
            drift * 100.0,
            STEADY * 100.0
        )?;
    }
    print_cpu("ceiling", ceiling.cpu, opts.jobs, None)?;
    outln!(
        "ceiling latency at the worker's paced rate ({:.0}/s): {}",
        ceiling_half.rate,
        ceiling_half.latency_line()
    )?;
    // A paced phase costs more per job than a backlog (fewer jobs share a commit, a wake-up,
    // a frame): how busy the cores were says how much of the machine "half rate" took.
    print_cpu(
        "ceiling at half rate",
        ceiling_half.cpu,
        ceiling_half.latencies.len(),
        Some(ceiling_half.took),
    )?;
    outln!(
        "ceiling latency at a fixed {:.0}/s: {}",
        ceiling_light.rate,
        ceiling_light.latency_line()
    )?;
    outln!(
        "worker throughput: {:.0} jobs/s (draining a backlog of {} jobs)",
        worker.rate,
        opts.jobs
    )?;
    outln!(
        "ratio to ceiling: {ratio:.2} (target at 0 ms upstream: >= 0.35: {})",
        if opts.latency.is_zero() {
            verdict(ratio >= 0.35)
        } else {
            "not applicable"
        }
    )?;
    outln!(
        "worker latency, enqueue -> result at half that rate ({:.0}/s, {} jobs): {}",
        half.rate,
        half.latencies.len(),
        half.latency_line(),
    )?;
    outln!(
        "latency added: p99 {added_p99_ms:.1} ms above the {latency_ms:.0} ms upstream (target <= the ceiling's p99 {ceiling_p99_ms:.1} ms + 15 ms: {})",
        verdict(added_p99_ms <= ceiling_p99_ms + 15.0)
    )?;
    outln!("worker slowest at half rate: {}", half.slow_line())?;
    print_cpu(
        "worker at half rate",
        half.cpu,
        half.latencies.len(),
        Some(half.took),
    )?;
    outln!(
        "worker latency, enqueue -> result at a fixed {:.0}/s ({} jobs): {}",
        light.rate,
        light.latencies.len(),
        light.latency_line(),
    )?;
    // The target is absolute; the bare loop's own p99 at this rate is printed beside it,
    // because on a slow disk or a busy host that alone can exceed it.
    outln!(
        "latency added at {:.0}/s: p99 {light_added_p99_ms:.1} ms above the {latency_ms:.0} ms upstream (target <= 10 ms: {}; the ceiling's own p99 at this rate {:.1} ms)",
        light.rate,
        verdict(light_added_p99_ms <= 10.0),
        ceiling_light.p99_ms()
    )?;
    outln!(
        "CPU per job, whole machine: {worker_cpu_ms:.3} ms = {cpu_ratio:.1} x the ceiling's {ceiling_cpu_ms:.3} ms per message (target <= 3 x: {})",
        verdict(cpu_ratio <= 3.0)
    )?;
    outln!(
        "worker peak RSS: {rss_mib:.1} MiB with at most {peak_in_flight:.0} jobs in flight (WORKER_CONCURRENCY {}; target 64 MiB: {})",
        opts.concurrency,
        verdict(rss_mib <= 64.0)
    )?;
    print_cpu("worker run", worker.cpu, opts.jobs, None)?;
    outln!(
        "worker WAL per job: {:.0} bytes (the Postgres server's, over every phase and the migration)",
        wal_bytes / (opts.jobs + worker.jobs()).max(1) as f64
    )?;
    if let Some(stages) = &worker.stages {
        for (phase, [means, batches]) in ["backlog", "paced", "fixed rate"].iter().zip(stages) {
            outln!("worker stages, mean ms per job, {phase}: {means}")?;
            outln!("worker commits, mean per batch, {phase}: {batches}")?;
        }
    }
    outln!("checked: {rows} rows, all sent, {fake_sends} sends at the fake")?;
    Ok(Measured {
        rate: worker.rate,
        ceiling: ceiling_rate,
        steady: drift <= STEADY,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_and_stage_means_are_the_differences_between_two_scrapes() {
        let scrape = |batches: u32, jobs: u32, secs: f64, stage_sum: f64, stage_count: u32| {
            parse_totals(&format!(
                "# TYPE sms_store_batches_total counter\n\
                 sms_store_batches_total{{write=\"claim\"}} {batches}\n\
                 sms_store_batch_jobs_total{{write=\"claim\"}} {jobs}\n\
                 sms_store_batch_seconds_total{{write=\"claim\"}} {secs}\n\
                 sms_store_batches_total{{write=\"stamp\"}} 2\n\
                 sms_job_stage_duration_seconds_bucket{{stage=\"claim\",le=\"0.005\"}} 9\n\
                 sms_job_stage_duration_seconds_sum{{stage=\"claim\"}} {stage_sum}\n\
                 sms_job_stage_duration_seconds_count{{stage=\"claim\"}} {stage_count}\n"
            ))
        };
        let (before, after) = (
            scrape(10, 100, 0.5, 1.0, 100),
            scrape(14, 148, 0.54, 1.096, 148),
        );
        assert_eq!(
            batch_means(&before, &after),
            "claim 12.0 jobs in 10.0 ms",
            "only the batches between the scrapes; a write with none between them is left out"
        );
        assert!(
            stage_means(&before, &after).contains("claim 2.0"),
            "{}",
            stage_means(&before, &after)
        );
        assert_eq!(
            batch_means(&after, &after),
            "none reported by the worker's /metrics in this phase"
        );
        // A family whose name starts like another's is not taken for it.
        assert_eq!(
            labelled(
                "sms_store_batch_jobs_total{write=\"claim\"} 3",
                "sms_store_batch",
                "write"
            ),
            None
        );
    }

    #[test]
    fn slow_jobs_published_close_together_are_one_burst() {
        let ms = Duration::from_millis;
        // Publishes every 10 ms; a stall at 1 s, two lone slow jobs later.
        let mut timeline: Vec<(Duration, Duration)> =
            (0..300).map(|i| (ms(i * 10), ms(5))).collect();
        for (i, took) in [(100, 400), (101, 390), (105, 350), (114, 300)] {
            timeline[i].1 = ms(took);
        }
        timeline[200].1 = ms(60);
        timeline[250].1 = ms(300);
        assert_eq!(
            bursts(&timeline, ms(300)),
            vec![
                Burst {
                    from: ms(1000),
                    to: ms(1140),
                    jobs: 4,
                    slowest: ms(400)
                },
                Burst {
                    from: ms(2500),
                    to: ms(2500),
                    jobs: 1,
                    slowest: ms(300)
                },
            ],
            "a gap of 90 ms joins a burst, a gap of a second starts one; 60 ms is not slow"
        );
        assert_eq!(bursts(&timeline, ms(401)), vec![]);
        let paced = Paced {
            rate: 100.0,
            latencies: {
                let mut l: Vec<Duration> = timeline.iter().map(|t| t.1).collect();
                l.sort_unstable();
                l
            },
            timeline,
            cpu: [0.0; 4],
            took: Duration::ZERO,
        };
        assert_eq!(
            paced.slow_line(),
            "5 jobs at or over p99 300.0 ms, in 2 bursts (publishes under 100 ms apart); \
             largest: 4 published 1.00-1.14 s into the phase, up to 400.0 ms; \
             1 published 2.50-2.50 s into the phase, up to 300.0 ms"
        );
    }

    #[test]
    fn percentiles_pick_by_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 50.0), Duration::from_millis(51));
        assert_eq!(percentile(&ms, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
    }

    #[test]
    fn reads_its_own_process_figures() {
        let me = std::process::id();
        assert!(proc_status_kb(me, "VmHWM:").is_some_and(|kb| kb > 0));
        assert!(proc_cpu_seconds(me).is_some());
        assert_eq!(proc_status_kb(me, "NoSuchField:"), None);
    }
}
