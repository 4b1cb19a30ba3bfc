//! `bench --workers 1,2,3`: fleets of N worker processes (this binary, `run`) on one queue and
//! one database, for each N at each upstream latency, in one run, printed as one table.
//!
//! Every run gets fresh queues, a fresh database and its own fake Aliyun. The backlog is
//! published before the workers start, as in the single-worker bench; the N processes start
//! together, and the throughput counts only the results that arrived once all N consume, so
//! neither the first worker up nor a slow start skews the figure.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures_util::future::join_all;
use lapin::Connection;

use crate::{out, outln};

use super::{
    Backlog, BenchOptions, collect_results, consume_results, fake_and_env, scratch_run, short,
    spawn_worker, stop_worker, verify,
};

/// More processes than this on one machine measure the scheduler, not the worker.
const MAX_WORKERS: usize = 32;

#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Jobs per run, concurrency per worker, where RabbitMQ and Postgres are. Its `latency` is
    /// not used: `latencies` are.
    pub base: BenchOptions,
    /// Fleet sizes, in the order given.
    pub workers: Vec<usize>,
    pub latencies: Vec<Duration>,
}

/// What one fleet did in one run.
#[derive(Debug, Clone, PartialEq)]
struct Cell {
    workers: usize,
    latency: Duration,
    /// Jobs per second while all of the fleet consumed.
    rate: f64,
    /// Results that arrived while all of the fleet consumed (the rest came before).
    counted: usize,
    /// Jobs each worker claimed (`claimed_by`), fewest first.
    per_worker: Vec<i64>,
}

pub async fn run_fleet(opts: FleetOptions) -> anyhow::Result<()> {
    let base = &opts.base;
    ensure!(base.jobs > 1, "--jobs must be at least 2");
    ensure!(
        !opts.workers.is_empty() && opts.workers.iter().all(|n| (1..=MAX_WORKERS).contains(n)),
        "--workers takes worker counts from 1 to {MAX_WORKERS}, e.g. --workers 1,2,3"
    );
    ensure!(!opts.latencies.is_empty(), "no upstream latency to run at");
    outln!(
        "bench --workers: {} jobs per run, concurrency {} per worker, worker log level {}, {} cores",
        base.jobs,
        base.concurrency,
        base.log_level,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )?;
    let mut cells = Vec::with_capacity(opts.workers.len() * opts.latencies.len());
    for &latency in &opts.latencies {
        for &workers in &opts.workers {
            eprintln!(
                "bench: {workers} worker(s), upstream latency {} ms",
                latency.as_millis()
            );
            let cell = scratch_run(base, async |tag, db_url| {
                measure_fleet(base, workers, latency, tag, db_url).await
            })
            .await?;
            cells.push(cell);
        }
    }
    out!("{}", render(&cells, base.jobs))?;
    outln!(
        "checked in every run: {} rows, all sent, one send per job at the fake, every result sent",
        base.jobs
    )?;
    Ok(())
}

async fn measure_fleet(
    opts: &BenchOptions,
    workers: usize,
    latency: Duration,
    tag: &str,
    db_url: &str,
) -> anyhow::Result<Cell> {
    let (fake, env) = fake_and_env(opts, latency, tag, db_url).await?;
    let backlog = Backlog::publish(opts, &env, tag).await?;

    // Results are read (and timed) as they come, while the fleet is still starting.
    let mut results = consume_results(&backlog.ch, &backlog.queues.results).await?;
    let jobs = opts.jobs;
    let mut collector = tokio::spawn(async move {
        let mut unused_rss = 0;
        collect_results(&mut results, jobs, None, &mut unused_rss).await
    });
    let mut children = Vec::with_capacity(workers);
    for i in 1..=workers {
        children.push(spawn_worker(
            &env,
            &[],
            &format!("worker {i}"),
            &opts.log_level,
        )?);
    }
    let measured = async {
        let since = wait_for_consumers(&backlog.connection, &backlog.queues.jobs, workers).await?;
        let arrived = (&mut collector)
            .await
            .context("the results reader failed")??;
        Ok::<_, anyhow::Error>((since, arrived))
    }
    .await;
    collector.abort();
    join_all(children.iter_mut().map(stop_worker)).await;
    backlog.close().await;
    let (since, arrived) = measured?;

    verify(db_url, &fake, opts.jobs).await?;
    let per_worker = claims_per_worker(db_url).await?;
    ensure!(
        per_worker.len() <= workers,
        "jobs were claimed by {} workers; {workers} were started",
        per_worker.len()
    );
    let (rate, counted) = rate_since(since, arrived.values().copied());
    Ok(Cell {
        workers,
        latency,
        rate,
        counted,
        per_worker,
    })
}

/// When the jobs queue first has `n` consumers: the whole fleet is taking jobs.
async fn wait_for_consumers(
    connection: &Connection,
    queue: &str,
    n: usize,
) -> anyhow::Result<Instant> {
    let ch = connection.create_channel().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let declared = crate::broker::inspect_queue(&ch, queue).await?;
        if declared.consumer_count() as usize >= n {
            let _ = ch.close(200, short("counted")).await;
            return Ok(Instant::now());
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} workers consume after 60 s",
            declared.consumer_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many jobs each worker claimed, fewest first.
async fn claims_per_worker(db_url: &str) -> anyhow::Result<Vec<i64>> {
    let pool = sqlx::PgPool::connect(db_url).await?;
    let counts: Result<Vec<(i64,)>, sqlx::Error> = sqlx::query_as(
        "SELECT count(*) FROM sms_jobs WHERE claimed_by IS NOT NULL GROUP BY claimed_by ORDER BY 1",
    )
    .fetch_all(&pool)
    .await;
    pool.close().await;
    Ok(counts?.into_iter().map(|(n,)| n).collect())
}

/// Jobs per second from `since` to the last arrival, counting the arrivals from `since` on.
fn rate_since(since: Instant, arrivals: impl Iterator<Item = Instant>) -> (f64, usize) {
    let counted: Vec<Instant> = arrivals.filter(|t| *t >= since).collect();
    let span = counted
        .iter()
        .max()
        .map_or(Duration::ZERO, |last| last.duration_since(since));
    let rate = if counted.len() < 2 || span.is_zero() {
        0.0
    } else {
        counted.len() as f64 / span.as_secs_f64()
    };
    (rate, counted.len())
}

fn render(cells: &[Cell], jobs: usize) -> String {
    let one_worker = |latency: Duration| {
        cells
            .iter()
            .find(|c| c.workers == 1 && c.latency == latency)
            .map(|c| c.rate)
    };
    let rows: Vec<Vec<String>> = cells
        .iter()
        .map(|c| {
            let speedup = match one_worker(c.latency) {
                Some(base) if base > 0.0 => format!("{:.2}", c.rate / base),
                _ => "-".into(),
            };
            let spread = match (c.per_worker.first(), c.per_worker.last()) {
                (Some(min), Some(max)) if c.per_worker.len() == c.workers => {
                    if min == max {
                        min.to_string()
                    } else {
                        format!("{min}-{max}")
                    }
                }
                // A worker that claimed nothing does not appear in `claimed_by` at all.
                (_, Some(max)) => format!("0-{max}"),
                _ => "-".into(),
            };
            vec![
                c.workers.to_string(),
                format!("{} ms", c.latency.as_millis()),
                if c.counted < 2 {
                    // The backlog was gone before the whole fleet was up.
                    "-".into()
                } else {
                    format!("{:.0}", c.rate)
                },
                speedup,
                spread,
                format!("{} of {jobs}", c.counted),
            ]
        })
        .collect();
    crate::report::table(
        &[
            "workers",
            "upstream",
            "jobs/s",
            "vs 1 worker",
            "jobs per worker",
            "measured",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(workers: usize, latency_ms: u64, rate: f64, per_worker: Vec<i64>) -> Cell {
        Cell {
            workers,
            latency: Duration::from_millis(latency_ms),
            rate,
            counted: 900,
            per_worker,
        }
    }

    #[test]
    fn the_table_compares_each_fleet_with_one_worker_at_the_same_latency() {
        let out = render(
            &[
                cell(1, 0, 1000.0, vec![1000]),
                cell(2, 0, 1500.0, vec![480, 520]),
                cell(3, 50, 900.0, vec![100, 300]),
            ],
            1000,
        );
        let lines: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[1],
            ["1", "0", "ms", "1000", "1.00", "1000", "900", "of", "1000"]
        );
        assert_eq!(lines[2][3..6], ["1500", "1.50", "480-520"]);
        // No single worker at 50 ms to compare with; one of the three claimed nothing.
        assert_eq!(lines[3][3..6], ["900", "-", "0-300"]);
    }

    #[test]
    fn the_rate_counts_only_what_came_once_the_fleet_was_up() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let since = at(1000);
        let (rate, counted) = rate_since(since, [at(10), at(500), at(1500), at(2000)].into_iter());
        assert_eq!(counted, 2);
        assert!((rate - 2.0).abs() < 1e-9, "{rate}");
        assert_eq!(rate_since(since, [at(10)].into_iter()), (0.0, 0));
    }
}
