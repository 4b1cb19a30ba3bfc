//! `aliyun-sms-worker bench`: the worker's throughput and latency against the local RabbitMQ
//! and Postgres and an in-process fake Aliyun, next to the ceiling of the same machine for the
//! same shape of work (a bare consume → confirmed publish → ack loop), measured in the same run.
//!
//! The worker runs as a child process (this same binary, `run`), so its peak RSS and CPU time
//! are its own, not the load generator's.

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
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;
use sqlx::Connection as _;

use crate::config;
use crate::fake_aliyun::{FakeAliyun, FakeConfig};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub jobs: usize,
    pub latency: Duration,
    pub concurrency: u16,
    pub amqp_url: String,
    pub database_url: String,
}

fn short(s: &str) -> ShortString {
    ShortString::from(s)
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

/// Publishes persistent messages with confirms pipelined (all in flight, awaited together).
async fn publish_all(ch: &Channel, queue: &str, bodies: &[Vec<u8>]) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(bodies.len());
    for body in bodies {
        pending.push(
            ch.basic_publish(
                short(""),
                short(queue),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?,
        );
    }
    for confirm in join_all(pending).await {
        ensure!(confirm?.is_ack(), "RabbitMQ refused a published message");
    }
    Ok(())
}

/// The machine's ceiling for this shape of work: consume, publish a result with a confirm,
/// ack — no database, no HTTP. Returns messages per second.
async fn bare_broker_ceiling(opts: &BenchOptions, tag: &str) -> anyhow::Result<f64> {
    let connection = Connection::connect(&opts.amqp_url, ConnectionProperties::default()).await?;
    let setup = channel(&connection).await?;
    let (input, output) = (format!("{tag}.ceiling.in"), format!("{tag}.ceiling.out"));
    declare(&setup, &input, true).await?;
    declare(&setup, &output, false).await?;
    let bodies: Vec<Vec<u8>> = (0..opts.jobs)
        .map(|i| format!(r#"{{"id":"ceiling-{i}","type":"send_verify_code"}}"#).into_bytes())
        .collect();
    publish_all(&setup, &input, &bodies).await?;

    let consume = connection.create_channel().await?;
    consume
        .basic_qos(opts.concurrency, BasicQosOptions::default())
        .await?;
    let publish = channel(&connection).await?;
    let mut consumer = consume
        .basic_consume(
            short(&input),
            short("ceiling"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut done = 0;
    while done < opts.jobs {
        tokio::select! {
            Some(delivery) = consumer.next() => {
                let delivery = delivery?;
                let publish = publish.clone();
                let output = output.clone();
                tasks.spawn(async move {
                    let confirm = publish
                        .basic_publish(short(""), short(&output), BasicPublishOptions::default(),
                            br#"{"status":"sent"}"#, BasicProperties::default().with_delivery_mode(2))
                        .await?
                        .await?;
                    ensure!(confirm.is_ack(), "result not confirmed");
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                    Ok::<_, anyhow::Error>(())
                });
            }
            Some(joined) = tasks.join_next() => {
                joined??;
                done += 1;
            }
        }
    }
    let rate = opts.jobs as f64 / started.elapsed().as_secs_f64();
    for q in [&input, &output] {
        setup
            .queue_delete(short(q), QueueDeleteOptions::default())
            .await?;
    }
    let _ = connection.close(200, short("bench done")).await;
    Ok(rate)
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub async fn run(opts: BenchOptions) -> anyhow::Result<()> {
    ensure!(opts.jobs > 0, "--jobs must be at least 1");
    let tag = format!(
        "smsw-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    println!(
        "bench: {} jobs, upstream latency {} ms, concurrency {}, {} cores",
        opts.jobs,
        opts.latency.as_millis(),
        opts.concurrency,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let ceiling = bare_broker_ceiling(&opts, &tag).await?;
    println!("ceiling (bare lapin consume -> confirmed publish -> ack): {ceiling:.0} msgs/s");

    // A fresh database and fresh queues for the worker.
    let db_name = format!("smsw_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&opts.database_url)
        .await
        .context("connecting to Postgres")?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE \"{db_name}\""
    )))
    .execute(&mut admin)
    .await?;
    let db_url = match opts.database_url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{db_name}"),
        None => bail!("DATABASE_URL has no database part"),
    };
    let outcome = measure_worker(&opts, &tag, &db_url, ceiling).await;
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
    outcome
}

async fn measure_worker(
    opts: &BenchOptions,
    tag: &str,
    db_url: &str,
    ceiling: f64,
) -> anyhow::Result<()> {
    let key_id = "bench-key";
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let mut fake_config = FakeConfig::new(key_id, secret.clone());
    fake_config.latency = opts.latency;
    let fake = FakeAliyun::start(fake_config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
    let queues: HashMap<&str, String> = [
        (config::SMS_JOBS_QUEUE, format!("{tag}.jobs")),
        (config::SMS_RESULTS_QUEUE, format!("{tag}.results")),
        (config::SMS_DEAD_LETTER_QUEUE, format!("{tag}.dead")),
        (config::SMS_DEAD_LETTER_EXCHANGE, format!("{tag}.dlx")),
        (config::SMS_RECEIPTS_QUEUE, format!("{tag}.receipts")),
    ]
    .into_iter()
    .collect();
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut child = tokio::process::Command::new(exe)
        .arg("run")
        .envs(queues.iter().map(|(k, v)| (*k, v.as_str())))
        .env(config::AMQP_URL, &opts.amqp_url)
        .env(config::DATABASE_URL, db_url)
        .env(config::ALIBABA_CLOUD_ACCESS_KEY_ID, key_id)
        .env(config::ALIBABA_CLOUD_ACCESS_KEY_SECRET, &secret)
        .env(config::ALIYUN_DYPNSAPI_ENDPOINT, fake.endpoint())
        .env(config::ALIYUN_DYSMSAPI_ENDPOINT, fake.endpoint())
        .env(config::WORKER_CONCURRENCY, opts.concurrency.to_string())
        .env(config::ALIYUN_MAX_QPS, "100000")
        .env(config::RECEIPTS_ENABLED, "false")
        .env(config::ADMIN_ADDR, "")
        .env("RUST_LOG", "warn,aliyun_sms_worker::worker=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the worker")?;
    let pid = child.id().context("worker pid")?;
    // The worker has declared its topology once it says it is consuming.
    let stderr = child.stderr.take().context("worker stderr")?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut ready_tx = Some(ready_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("consuming jobs")
                && let Some(tx) = ready_tx.take()
            {
                let _ = tx.send(());
            } else if !line.contains("INFO") {
                eprintln!("worker: {line}");
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(60), ready_rx)
        .await
        .context("the worker did not start consuming within 60 s")?
        .context("the worker exited before consuming")?;

    let connection = Connection::connect(&opts.amqp_url, ConnectionProperties::default()).await?;
    let ch = channel(&connection).await?;

    let mut results = ch
        .basic_consume(
            short(&queues[config::SMS_RESULTS_QUEUE]),
            short("bench-results"),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let ids: Vec<String> = (0..opts.jobs).map(|i| format!("{tag}-{i}")).collect();
    let bodies: Vec<Vec<u8>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({"id": id, "type": "send_verify_code",
                   "phone_number": format!("139{:08}", i % 100_000_000),
                   "sign_name": "速通互联验证码", "template_code": "100001",
                   "template_param": {"code": "##code##", "min": "5"}})
            .to_string()
            .into_bytes()
        })
        .collect();
    let cpu_before = proc_cpu_seconds(pid).unwrap_or(0.0);
    let enqueued = Instant::now();
    let publisher = channel(&connection).await?;
    let jobs_queue = queues[config::SMS_JOBS_QUEUE].clone();
    let publishing = tokio::spawn(async move {
        for chunk in bodies.chunks(1000) {
            publish_all(&publisher, &jobs_queue, chunk).await?;
        }
        Ok::<_, anyhow::Error>(())
    });

    let mut latencies = Vec::with_capacity(opts.jobs);
    let mut seen = std::collections::HashSet::with_capacity(opts.jobs);
    let mut first_result = None;
    let mut peak_rss_kb = 0;
    while seen.len() < opts.jobs {
        let delivery = tokio::time::timeout(Duration::from_secs(60), results.next())
            .await
            .context("no result for 60 s")?
            .context("results consumer closed")??;
        let now = Instant::now();
        first_result.get_or_insert(now);
        let result: serde_json::Value = serde_json::from_slice(&delivery.data)?;
        ensure!(
            result["status"] == "sent",
            "a job did not end sent: {result}"
        );
        if let Some(id) = result["id"].as_str()
            && seen.insert(id.to_owned())
        {
            // All jobs are enqueued at once, so this is time since the run began; see README.
            latencies.push(now.duration_since(enqueued));
        }
        if seen.len() % 1000 == 0 {
            peak_rss_kb = peak_rss_kb.max(proc_status_kb(pid, "VmHWM:").unwrap_or(0));
        }
    }
    let last = Instant::now();
    publishing.await??;
    peak_rss_kb = peak_rss_kb.max(proc_status_kb(pid, "VmHWM:").unwrap_or(0));
    let cpu = proc_cpu_seconds(pid).unwrap_or(0.0) - cpu_before;

    // Check every job's row: one, final, sent.
    let pool = sqlx::PgPool::connect(db_url).await?;
    let (rows, sent): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE status = 'sent') FROM sms_jobs")
            .fetch_one(&pool)
            .await?;
    pool.close().await;
    ensure!(
        rows == opts.jobs as i64 && sent == rows,
        "expected {} sent rows, found {rows} rows, {sent} sent",
        opts.jobs
    );
    let fake_sends = fake.requests().iter().filter(|r| r.executed).count();
    ensure!(
        fake_sends == opts.jobs,
        "the fake executed {fake_sends} sends for {} jobs",
        opts.jobs
    );

    let span = first_result.map_or(Duration::ZERO, |f| last.duration_since(f));
    let rate = if span.is_zero() {
        opts.jobs as f64 / last.duration_since(enqueued).as_secs_f64()
    } else {
        (opts.jobs.saturating_sub(1)) as f64 / span.as_secs_f64()
    };
    latencies.sort_unstable();
    println!("worker throughput: {rate:.0} jobs/s (steady state, first to last result)");
    println!("ratio to ceiling: {:.2}", rate / ceiling);
    println!(
        "enqueue->result latency (all enqueued at once): p50 {} ms, p99 {} ms, max {} ms",
        percentile(&latencies, 50.0).as_millis(),
        percentile(&latencies, 99.0).as_millis(),
        latencies.last().map_or(0, |d| d.as_millis())
    );
    println!("worker peak RSS: {:.1} MiB", peak_rss_kb as f64 / 1024.0);
    println!(
        "worker CPU: {:.3} s per 1,000 jobs",
        cpu * 1000.0 / opts.jobs as f64
    );
    println!("checked: {rows} rows, all sent, {fake_sends} sends at the fake");

    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    for q in queues
        .iter()
        .filter(|(k, _)| **k != config::SMS_DEAD_LETTER_EXCHANGE)
    {
        let _ = ch
            .queue_delete(short(q.1), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(
            short(&queues[config::SMS_DEAD_LETTER_EXCHANGE]),
            Default::default(),
        )
        .await;
    let _ = connection.close(200, short("bench done")).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
