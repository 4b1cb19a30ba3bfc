//! The worker's lifecycle: connect, consume, reconnect, drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin;
use crate::aliyun::AliyunClient;
use crate::broker::Broker;
use crate::config::Config;
use crate::health::DbHealth;
use crate::metrics::Metrics;
use crate::metrics::Stage;
use crate::pipeline::{Disposition, Pipeline};
use crate::receipts::Receipts;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("could not start the admin listener: {0}")]
    Admin(#[from] std::io::Error),
}

/// Whether the worker is consuming. Tests and readiness checks wait on it.
pub type Readiness = watch::Receiver<bool>;

/// Options that are about how this process runs, not about the job contract.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub migrate: bool,
    /// Shown to RabbitMQ as the connection name.
    pub name: String,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            migrate: true,
            name: format!("aliyun-sms-worker@{}", std::process::id()),
        }
    }
}

/// Runs until `shutdown` turns true: then stops consuming, lets in-flight jobs finish within
/// the grace period and closes (unfinished deliveries return to the queue).
pub async fn run(
    config: Config,
    options: RunOptions,
    mut shutdown: watch::Receiver<bool>,
    ready: watch::Sender<bool>,
) -> Result<(), WorkerError> {
    let config = Arc::new(config);
    let store = Store::connect(
        config.database_url.expose(),
        config.database_max_connections,
    )
    .await?;
    if options.migrate {
        store.migrate().await?;
    }
    let metrics = Arc::new(Metrics::default());
    let aliyun = AliyunClient::new(config.aliyun.clone())?
        .with_metrics(metrics.clone())
        .with_schedule(store.rate_schedule());
    let (broker_tx, broker_rx) = watch::channel::<Option<Broker>>(None);
    let receipts = config.receipts.enabled.then(|| {
        let poller = Receipts::new(
            config.clone(),
            store.clone(),
            aliyun.clone(),
            broker_rx,
            metrics.clone(),
        );
        tokio::spawn(poller.run(shutdown.clone()))
    });
    let health = DbHealth::new(store.clone());
    let mut db_ok = health.subscribe();
    let admin = match config.admin_addr {
        Some(addr) => {
            let probes = admin::Probes {
                consuming: ready.subscribe(),
                db_ok: health.subscribe(),
            };
            let (bound, task) = admin::serve(addr, metrics.clone(), probes, store.clone()).await?;
            tracing::info!(%bound, "admin listener: / /jobs/{{id}} /healthz /readyz /metrics");
            Some(task)
        }
        None => None,
    };
    let pipeline = Arc::new(Pipeline::new(
        config.clone(),
        // Hundreds of jobs in flight share their claim and outcome commits.
        store.batched(),
        aliyun,
        health,
        metrics,
    ));
    // Beat before the first claim, so no other worker can take this one for dead.
    pipeline
        .store()
        .heartbeat(pipeline.worker_id(), &options.name)
        .await?;
    let heartbeat = tokio::spawn(beat(
        pipeline.clone(),
        options.name.clone(),
        config.heartbeat,
        shutdown.clone(),
    ));
    let tag = format!("{}-{}", options.name, uuid::Uuid::new_v4().simple());
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut reconnect = reconnect_backoff();
    let mut last_broker: Option<Broker> = None;

    'connect: while !*shutdown.borrow() {
        let broker = match open(&config, &options, &tag).await {
            Ok(pair) => pair,
            Err(e) => {
                let wait = reconnect.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "RabbitMQ unavailable");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue 'connect,
                    _ = shutdown.changed() => break 'connect,
                }
            }
        };
        let (broker, mut consumer) = broker;
        // One reference count per job instead of a copy of the broker's channels and names.
        let shared = Arc::new(broker.clone());
        reconnect = reconnect_backoff();
        let _ = broker_tx.send(Some(broker.clone()));
        let _ = ready.send(true);
        tracing::info!(queue = %config.queues.jobs, concurrency = config.concurrency, "consuming jobs");
        last_broker = Some(broker.clone());
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    if let Err(e) = broker.cancel(&tag).await {
                        tracing::debug!(error = %e, "cancel on shutdown");
                    }
                    break 'connect;
                }
                // Re-evaluates the consume guard below when the database comes and goes.
                _ = db_ok.changed() => {}
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = joined {
                        tracing::error!(error = %e, "a job task ended abnormally");
                    }
                }
                next = consumer.next(), if *db_ok.borrow() => match next {
                    Some(Ok(delivery)) => {
                        let pipeline = pipeline.clone();
                        let broker = shared.clone();

                        // Boxed: the task would copy the job's future on the way in; the box
                        // is written once, in place.
                        tasks.spawn(Box::pin(async move {
                            process(&pipeline, &broker, delivery).await
                        }));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "RabbitMQ consumer failed; reconnecting");
                        break;
                    }
                    None => {
                        tracing::warn!("RabbitMQ consumer closed; reconnecting");
                        break;
                    }
                }
            }
        }
        let _ = ready.send(false);
        let _ = broker_tx.send(None);
    }

    let _ = ready.send(false);
    drain(&mut tasks, config.shutdown_grace).await;
    if let Some(receipts) = receipts {
        // It watches the same shutdown signal and stops between two calls.
        let _ = receipts.await;
    }
    heartbeat.abort();
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Err(e) = pipeline.store().retire(pipeline.worker_id()).await {
        tracing::warn!(error = %e, "could not retire this worker's heartbeat");
    }
    if let Some(broker) = last_broker {
        broker.close().await;
    }
    tracing::info!("worker stopped");
    Ok(())
}

async fn open(
    config: &Config,
    options: &RunOptions,
    tag: &str,
) -> Result<(Broker, lapin::Consumer), crate::broker::BrokerError> {
    let broker = Broker::connect(
        config.amqp_url.expose(),
        &options.name,
        config.queues.clone(),
    )
    .await?;
    broker.declare_topology().await?;
    let consumer = broker.consume(config.concurrency, tag).await?;
    Ok((broker, consumer))
}

/// One delivery end to end, including its ack. A panic in the pipeline (a bug) requeues the
/// message so the jobs queue's delivery limit, not this process, decides its fate.
async fn process(pipeline: &Pipeline, broker: &Broker, delivery: lapin::message::Delivery) {
    pipeline.metrics().in_flight(1);
    settle(pipeline, broker, delivery).await;
    pipeline.metrics().in_flight(-1);
}

async fn settle(pipeline: &Pipeline, broker: &Broker, delivery: lapin::message::Delivery) {
    let disposition = std::panic::AssertUnwindSafe(pipeline.handle(&delivery, broker))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!("job handling panicked; requeueing the delivery");
            Disposition::Requeue
        });
    let acked = match disposition {
        Disposition::Ack => {
            let started = std::time::Instant::now();
            let acked = delivery.acker.ack(BasicAckOptions::default()).await;
            pipeline.metrics().stage(Stage::Ack, started.elapsed());
            acked
        }
        Disposition::Requeue => {
            // Hold the delivery until the database is back (no point in churning it through
            // the queue), and give any other failing dependency a moment.
            pipeline.health().wait_ok().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
    if let Err(e) = acked {
        // The channel is gone; RabbitMQ redelivers the message and the store makes that safe.
        tracing::warn!(error = %e, "could not settle delivery; it will be redelivered");
        let _ = delivery
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await;
    }
}

/// Renews this worker's heartbeat until shutdown. A failed beat is only logged: if the database
/// stays away, other workers will (rightly) treat this one's in-flight jobs as interrupted.
async fn beat(
    pipeline: Arc<Pipeline>,
    name: String,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = pipeline.store().heartbeat(pipeline.worker_id(), &name).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

async fn drain(tasks: &mut JoinSet<()>, grace: Duration) {
    if tasks.is_empty() {
        return;
    }
    tracing::info!(
        in_flight = tasks.len(),
        grace_ms = grace.as_millis() as u64,
        "draining in-flight jobs"
    );
    let all_done = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_done).await.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "grace period over; unfinished jobs go back to the queue"
        );
        tasks.abort_all();
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}
