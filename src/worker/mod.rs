//! The running worker (`run`): its lifecycle — connect, consume, reconnect, drain on shutdown —
//! and the parts that only a running worker has.

pub mod duties;
pub mod health;
pub mod liveness;
pub mod pipeline;
pub mod receipts;
pub mod supervisor;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin;
use crate::aliyun::AliyunClient;
use crate::broker::{Broker, CLOSE_PATIENCE};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::metrics::Stage;
use crate::store::{Leadership, Store, StoreError, Waiting};
use crate::worker::duties::Duties;
use crate::worker::health::DbHealth;
use crate::worker::pipeline::{Disposition, Pipeline};
use crate::worker::receipts::Receipts;
use crate::worker::supervisor::Supervisor;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("could not start the admin listener: {0}")]
    Admin(#[from] std::io::Error),
    #[error(
        "a database write ({write}) had no answer for {waited_ms} ms: its connection went silent; \
         stopped at once so the fleet takes this worker's jobs over, as after a crash"
    )]
    WriteStuck { write: &'static str, waited_ms: u64 },
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
            // The host too: in containers every replica is process 1.
            name: format!(
                "aliyun-sms-worker@{}:{}",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_default(),
                std::process::id()
            ),
        }
    }
}

/// Runs until `shutdown` turns true: then stops consuming, lets in-flight jobs finish within
/// the grace period and closes (unfinished deliveries return to the queue).
///
/// Returns `WriteStuck` at once, without a drain, when a database write went silent. However it
/// returns, what it started stops with it (a database health probe once the database answers;
/// a connection gone silent perhaps only when TCP gives up on it), so a caller that lives on
/// may call it again.
pub async fn run(
    config: Config,
    options: RunOptions,
    mut shutdown: watch::Receiver<bool>,
    ready: watch::Sender<bool>,
) -> Result<(), WorkerError> {
    let config = Arc::new(config);
    let store = Store::connect_for_worker(
        config.database_url.expose(),
        config.database_max_connections,
        config.database_write_timeout,
    )
    .await?;
    if options.migrate {
        store.migrate().await?;
    }
    let metrics = Arc::new(Metrics::default());
    let supervisor = Supervisor::new(metrics.clone());
    let aliyun = AliyunClient::new(config.aliyun.clone())?
        .with_metrics(metrics.clone())
        .with_schedule(store.rate_schedule());
    let (broker_tx, broker_rx) = watch::channel::<Option<Broker>>(None);
    let (leader_tx, leader_rx) = watch::channel(false);
    let health = DbHealth::new(store.clone());
    let mut db_ok = health.subscribe();
    // Hundreds of jobs in flight share their claim and outcome commits; the admin listener
    // holds this store too, for its counts of those commits.
    let batched = store.batched(config.fleet.republish_after);
    let admin = match config.admin_addr {
        Some(addr) => {
            let probes = admin::Probes {
                consuming: ready.subscribe(),
                db_ok: health.subscribe(),
                tasks_down: supervisor.subscribe(),
            };
            let (bound, task) = admin::serve(
                addr,
                config.admin_token.as_ref(),
                metrics.clone(),
                probes,
                batched.clone(),
                broker_rx.clone(),
            )
            .await?;
            let access = if config.admin_token.is_some() {
                "ADMIN_TOKEN required but for /healthz /readyz"
            } else {
                "open (loopback)"
            };
            tracing::info!(%bound, access, "admin listener: / /jobs/{{id}} /search /healthz /readyz /metrics");
            Some(task)
        }
        None => None,
    };
    let mut background = Background::default();
    let pipeline = Arc::new(Pipeline::new(
        config.clone(),
        batched,
        aliyun.clone(),
        health,
        metrics.clone(),
    ));
    // Beat before the first claim, so no other worker can take this one for dead.
    let sent = liveness::Moment::now();
    pipeline
        .store()
        .heartbeat(pipeline.worker_id(), &options.name, config.heartbeat)
        .await?;
    pipeline.liveness().beat(sent, liveness::Moment::now());
    // The heartbeat outlives the shutdown signal: a draining worker still owns its claims.
    let (beat_stop, beat_until) = watch::channel(false);
    // Set by the write watch when a write has had no answer past DATABASE_WRITE_TIMEOUT_MS.
    let (stuck_tx, mut stuck) = watch::channel::<Option<(&'static str, u64)>>(None);
    let stuck_tx = Arc::new(stuck_tx);
    let heartbeat = {
        let (pipeline, name, shutdown) = (pipeline.clone(), options.name.clone(), shutdown.clone());
        let until = beat_until.clone();
        supervisor.spawn("heartbeat", beat_until.clone(), move || {
            beat(
                pipeline.clone(),
                name.clone(),
                shutdown.clone(),
                until.clone(),
            )
        })
    };
    let write_watch = {
        let (pipeline, until) = (pipeline.clone(), beat_until.clone());
        supervisor.spawn("write-watch", beat_until, move || {
            watch_writes(pipeline.clone(), until.clone(), stuck_tx.clone())
        })
    };
    let leadership = {
        let (pipeline, stop) = (pipeline.clone(), shutdown.clone());
        let (leader_tx, metrics) = (Arc::new(leader_tx), metrics.clone());
        supervisor.spawn("leadership", shutdown.clone(), move || {
            lead(
                pipeline.clone(),
                stop.clone(),
                leader_tx.clone(),
                metrics.clone(),
            )
        })
    };
    let receipts = config.receipts.enabled.then(|| {
        let (config, store, broker, leader, metrics) = (
            config.clone(),
            store.clone(),
            broker_rx.clone(),
            leader_rx.clone(),
            metrics.clone(),
        );
        let stop = shutdown.clone();
        supervisor.spawn("receipts", shutdown.clone(), move || {
            let poller = Receipts::new(
                config.clone(),
                store.clone(),
                aliyun.clone(),
                broker.clone(),
                leader.clone(),
                metrics.clone(),
            );
            poller.run(stop.clone())
        })
    });
    let duties = {
        let (config, store, worker_id) = (
            config.clone(),
            pipeline.store().clone(),
            pipeline.worker_id(),
        );
        let (broker, leader, stop) = (broker_rx.clone(), leader_rx.clone(), shutdown.clone());
        let metrics = metrics.clone();
        supervisor.spawn("fleet-duties", shutdown.clone(), move || {
            Duties {
                config: config.clone(),
                store: store.clone(),
                worker_id,
                broker: broker.clone(),
                leader: leader.clone(),
                metrics: metrics.clone(),
            }
            .run(stop.clone())
        })
    };
    for task in [
        Some(&heartbeat),
        Some(&write_watch),
        Some(&leadership),
        receipts.as_ref(),
        Some(&duties),
    ] {
        background.add(task);
    }
    let tag = format!("{}-{}", options.name, uuid::Uuid::new_v4().simple());
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut reconnect = reconnect_backoff();
    let mut last_broker: Option<Broker> = None;
    // Where the next connect starts: the node after the one last connected to, so a lost node
    // is tried last, not first, when the worker reconnects.
    let mut next_node = 0;

    let stuck_write: Option<WorkerError> = 'run: {
        'connect: while !*shutdown.borrow() {
            let broker = match open(&config, &options, &tag, next_node).await {
                Ok(pair) => pair,
                Err(e) => {
                    let wait = reconnect.next().unwrap_or(Duration::from_secs(10));
                    if matches!(e, crate::broker::BrokerError::QueueSettings { .. }) {
                        // Not an outage: a setting to fix, said as such every time it is tried.
                        tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "not consuming: the jobs queue's settings differ from this worker's");
                    } else {
                        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "RabbitMQ unavailable");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue 'connect,
                        _ = shutdown.changed() => break 'connect,
                        e = write_stuck(&mut stuck) => break 'run Some(e),
                    }
                }
            };
            let (broker, mut consumer) = broker;
            next_node = broker.node() + 1;
            // One reference count per job instead of a copy of the broker's channels and names.
            let shared = Arc::new(broker.clone());
            reconnect = reconnect_backoff();
            let _ = broker_tx.send(Some(broker.clone()));
            let _ = ready.send(true);
            tracing::info!(queue = %config.queues.jobs, concurrency = config.concurrency, node = %config.amqp_nodes.host(broker.node()), "consuming jobs");
            last_broker = Some(broker.clone());
            loop {
                tokio::select! {
                    _ = shutdown.changed() => {
                        // Bounded: a stop must not wait on lapin. Deliveries that come meanwhile are
                        // never taken, and go back to the queue with the connection. A failure is
                        // only a connection that is gone already.
                        match tokio::time::timeout(CLOSE_PATIENCE, broker.cancel(&tag)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::debug!(error = %e, "cancel on shutdown"),
                            Err(_) => tracing::warn!("cancelling the consumer took too long; stopping anyway"),
                        }
                        break 'connect;
                    }
                    e = write_stuck(&mut stuck) => break 'run Some(e),
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
        tokio::select! {
            () = drain(&mut tasks, config.shutdown_grace, &pipeline) => {}
            e = write_stuck(&mut stuck) => break 'run Some(e),
        }
        None
    };
    if let Some(e) = stuck_write {
        // No drain: the jobs in flight wait behind the silent write, and the fleet handles this
        // worker's claims and results as a killed one's. What a killed process loses by
        // dying is stopped here by hand, for a caller that lives on (and may call `run`
        // again): the beat, the job tasks, the batched writes queued or under way (nothing
        // is written later under this worker), the background tasks, the RabbitMQ
        // connection, whose close sends this worker's unacked deliveries back to the queue,
        // and the admin listener.
        let _ = ready.send(false);
        beat_stop.send_replace(true);
        tasks.abort_all();
        pipeline.store().abandon();
        drop(background);
        if let Some(broker) = last_broker {
            broker.close().await;
        }
        if let Some(admin) = admin {
            admin.stop(CLOSE_PATIENCE).await;
        }
        return Err(e);
    }
    if let Some(receipts) = receipts {
        // It watches the same shutdown signal and stops mid-round (every write of a round is whole).
        let _ = receipts.await;
    }
    let _ = duties.await;
    let _ = leadership.await;
    beat_stop.send_replace(true);
    let _ = heartbeat.await;
    let _ = write_watch.await;
    if let Some(admin) = admin {
        admin.stop(CLOSE_PATIENCE).await;
    }
    // With the database gone, the outbox publishing these results again is the lesser evil
    // than a stop that hangs.
    let settled = last_step(
        "recording the last results as published",
        "the outbox publishes them again, and this worker's heartbeat is left for the fleet to take for dead, as a killed worker's",
        pipeline.store().flush_published(),
    )
    .await;
    // The row is what leads the sweeper to results presumed out and never confirmed.
    if settled {
        last_step(
            "retiring this worker's heartbeat",
            "the fleet takes it for dead, as a killed worker's",
            pipeline.store().retire(pipeline.worker_id()),
        )
        .await;
    }
    if let Some(broker) = last_broker {
        broker.close().await;
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// A write that has had no answer for `timeout` while Postgres is not working on it: one on a
/// connection that went silent. Its jobs, and every job behind it, would wait until TCP gives
/// up (minutes), while the heartbeat, on another connection, tells the fleet all is well. Every
/// write past the timeout is asked about, not only the oldest: a slow one Postgres is working
/// on says nothing of a younger one gone silent. Writes Postgres is working on (a lock, a slow
/// disk or standby) are waited for, and said so once (`told`); when Postgres cannot be asked,
/// that is an outage, not a silent connection. Says which write and how long it waited, in
/// milliseconds.
async fn silent_write(
    store: &crate::store::Store,
    timeout: Duration,
    told: &mut bool,
) -> Option<(&'static str, u64)> {
    let waiting = store.writes_waiting_longer_than(timeout);
    let oldest = *waiting.first().or_else(|| {
        *told = false;
        None
    })?;
    let look = |writes: Vec<Waiting>| async move {
        tokio::time::timeout(SILENCE_CHECK_PATIENCE, store.unattended(&writes))
            .await
            .ok()?
            .ok()
    };
    let unattended = look(waiting).await?;
    if unattended.is_empty() {
        if !*told {
            *told = true;
            tracing::warn!(
                write = oldest.what,
                waited_ms = millis_since(oldest.began),
                "a database write has waited longer than DATABASE_WRITE_TIMEOUT_MS, and Postgres is still working on this worker's statements (a lock, a slow server): waiting on"
            );
        }
        return None;
    }
    // A transaction is idle for a moment between its statements (a guarded claim's): silent is
    // what a second look, a moment later, still finds unattended.
    tokio::time::sleep(SECOND_LOOK_AFTER).await;
    let again: Vec<Waiting> = store
        .writes_waiting_longer_than(timeout)
        .into_iter()
        .filter(|w| unattended.iter().any(|u| u.is(w)))
        .collect();
    if again.is_empty() {
        return None;
    }
    let silent = *look(again).await?.first()?;
    Some((silent.what, millis_since(silent.began)))
}

fn millis_since(began: Instant) -> u64 {
    u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// See [`silent_write`]: far longer than the client takes between two statements, far
/// shorter than the write timeout (a second at least).
const SECOND_LOOK_AFTER: Duration = Duration::from_millis(200);

/// How long a look of the write watch waits to learn whether Postgres is working on a write (a
/// connection of its own, and one query).
const SILENCE_CHECK_PATIENCE: Duration = Duration::from_secs(2);

/// The tasks `run` starts beside its consume loop. Dropped, it aborts those still running, so
/// a run that returns early (a stuck write, a failed start) leaves none of them behind in a
/// process that lives on: no heartbeat, no leadership, no duties.
#[derive(Default)]
struct Background(Vec<tokio::task::AbortHandle>);

impl Background {
    fn add(&mut self, task: Option<&tokio::task::JoinHandle<()>>) {
        self.0
            .extend(task.map(tokio::task::JoinHandle::abort_handle));
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The error the write watch reported for a write stuck past its timeout; pending until then.
async fn write_stuck(stuck: &mut watch::Receiver<Option<(&'static str, u64)>>) -> WorkerError {
    loop {
        if let Some((write, waited_ms)) = *stuck.borrow_and_update() {
            return WorkerError::WriteStuck { write, waited_ms };
        }
        if stuck.changed().await.is_err() {
            // The write watch is gone for good: nothing will report a stuck write.
            std::future::pending::<()>().await;
        }
    }
}

/// One of the stop's last writes, which must not hold it: given up after [`CLOSE_PATIENCE`], and
/// a failure or a give-up logged with what it means (`then`) before the stop goes on. Says
/// whether it was done.
async fn last_step<E: std::fmt::Display>(
    what: &str,
    then: &str,
    step: impl std::future::Future<Output = Result<(), E>>,
) -> bool {
    match tokio::time::timeout(CLOSE_PATIENCE, step).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "{what} failed; {then}");
            false
        }
        Err(_) => {
            tracing::warn!("{what} took longer than {CLOSE_PATIENCE:?}; {then}");
            false
        }
    }
}

async fn open(
    config: &Config,
    options: &RunOptions,
    tag: &str,
    start_node: usize,
) -> Result<(Broker, lapin::Consumer), crate::broker::BrokerError> {
    let broker = Broker::connect(
        &config.amqp_nodes,
        start_node,
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

/// Looks for a silent write every heartbeat interval until `until` (the heartbeat's end), and
/// reports the first it finds in `stuck`. A task of its own: a look can take seconds (Postgres
/// asked twice), which must not delay a beat and make the fleet take this worker for dead.
async fn watch_writes(
    pipeline: Arc<Pipeline>,
    mut until: watch::Receiver<bool>,
    stuck: Arc<watch::Sender<Option<(&'static str, u64)>>>,
) {
    let config = pipeline.config();
    let mut tick = tokio::time::interval(config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether the wait of the write that is over DATABASE_WRITE_TIMEOUT_MS was logged.
    let mut told_waiting = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let silent = silent_write(
                    pipeline.store(),
                    config.database_write_timeout,
                    &mut told_waiting,
                )
                .await;
                if let Some((write, waited_ms)) = silent {
                    tracing::error!(
                        write,
                        waited_ms,
                        "a database write has had no answer for DATABASE_WRITE_TIMEOUT_MS, and Postgres is not working on it: its connection went silent; stopping at once, so the fleet takes this worker's jobs over as after a crash"
                    );
                    stuck.send_replace(Some((write, waited_ms)));
                    // Ended only with the heartbeat: its supervisor would take an earlier end
                    // for a crash, and start it again.
                    let _ = until.wait_for(|done| *done).await;
                    return;
                }
            }
            _ = async { let _ = until.wait_for(|done| *done).await; } => return,
        }
    }
}

/// Renews this worker's heartbeat, and the leases of the claims it is working on, until it is
/// told the drain is over (`until`). At the shutdown signal it marks the worker as draining but
/// goes on beating: the jobs it still holds are its own until it exits. A failed beat is only
/// logged: if the database stays away, others wait for it (see `store::fleet`). A beat never
/// takes much longer than its interval, so beats keep their rhythm through an outage.
async fn beat(
    pipeline: Arc<Pipeline>,
    name: String,
    mut shutdown: watch::Receiver<bool>,
    mut until: watch::Receiver<bool>,
) {
    let store = pipeline.store();
    let worker = pipeline.worker_id();
    let config = pipeline.config();
    let every = config.heartbeat;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = *shutdown.borrow();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let beat = async {
                    let sent = liveness::Moment::now();
                    store.heartbeat(worker, &name, every).await?;
                    pipeline.liveness().beat(sent, liveness::Moment::now());
                    store
                        .renew_claims(
                            worker,
                            &pipeline.jobs_in_hand(),
                            (config.claim_lease(), config.job_lease()),
                            every,
                        )
                        .await?;
                    // For /metrics and the status page: what is left of today's budget.
                    if let Some(limits) = config.guards.daily {
                        pipeline.metrics().set_daily_usage(store.daily_usage(limits).await?);
                    }
                    Ok::<_, crate::store::StoreError>(())
                };
                match tokio::time::timeout(every.max(Duration::from_millis(500)), beat).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
                    Err(_) => tracing::warn!("heartbeat timed out"),
                }
            }
            changed = shutdown.changed(), if !stopping => {
                if changed.is_err() || *shutdown.borrow() {
                    stopping = true;
                    if let Err(e) = store.stopping(worker).await {
                        tracing::warn!(error = %e, "could not mark this worker as draining");
                    }
                }
            }
            _ = async { let _ = until.wait_for(|done| *done).await; } => return,
        }
    }
}

/// Checks the fleet leadership every heartbeat interval until shutdown, when it gives the
/// leadership up at once so a worker that stays takes the duties without waiting for this
/// process to exit.
async fn lead(
    pipeline: Arc<Pipeline>,
    mut shutdown: watch::Receiver<bool>,
    leader: Arc<watch::Sender<bool>>,
    metrics: Arc<Metrics>,
) {
    let mut leadership =
        Leadership::new(pipeline.store().pool().clone(), pipeline.config().heartbeat);
    let mut tick = tokio::time::interval(pipeline.config().heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {
                let leading = leadership.check().await;
                leader.send_replace(leading);
                metrics.set_leader(leading);
            }
            _ = shutdown.changed() => {}
        }
    }
    leadership.resign().await;
    leader.send_replace(false);
    metrics.set_leader(false);
}

async fn drain(tasks: &mut JoinSet<()>, grace: Duration, pipeline: &Pipeline) {
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
        let in_hand = pipeline.jobs_in_hand();
        let left = tasks.len();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        // A job stopped in its call cannot be repeated: another worker will end it `unknown`.
        // One never called (waiting for room, a slot, a beat) is handed back, so the worker
        // that gets its delivery takes it over and sends it; its claim would otherwise be
        // stamped, and end `unknown` too.
        let uncalled = pipeline.never_called(&in_hand);
        let released = tokio::time::timeout(
            CLOSE_PATIENCE,
            pipeline
                .store()
                .release_uncalled(pipeline.worker_id(), &uncalled),
        )
        .await;
        let handed_back = match released {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not hand back the jobs never called");
                0
            }
            Err(_) => {
                tracing::warn!("handing back the jobs never called took too long");
                0
            }
        };
        tracing::warn!(
            left,
            handed_back,
            mid_call = in_hand.len().saturating_sub(uncalled.len()),
            "grace period over (SHUTDOWN_GRACE_MS): jobs never called go back to the queue and \
             are sent by the next worker; jobs in a call to Aliyun end unknown \
             (WORKER_INTERRUPTED), not repeated"
        );
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
