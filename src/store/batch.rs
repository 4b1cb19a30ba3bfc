//! Group commits for the two writes every job makes: its `sending` claim and its outcome.
//!
//! One job alone costs Postgres a transaction and a WAL flush per write; hundreds of jobs in
//! flight would queue on those flushes. A lane gathers what is waiting when an executor is
//! free and writes it with one statement in one transaction, so a batch pays one commit.
//! Nothing waits for a timer: under light load a batch is one job and goes at once.
//!
//! The ordering promises hold per job: a claim's caller hears `Owned` only after the batch
//! holding it committed, and an outcome only after its batch committed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use uuid::Uuid;

use super::guards::Refusal;
use super::in_flight::{InFlight, Mark};
use super::presumed::{self, Presumed};
use super::{
    AttemptArrays, AttemptRecord, Claim, ErrorClass, Followup, JobRow, Outcome, ReplyRoute,
    StoreError, deliveries,
};
use crate::wire::Job;

/// Batches of one lane in flight at once: one, while the next gathers what arrives meanwhile.
/// With two, each was smaller and both competed for the same cores (bench: slower, and a
/// higher p99); and one at a time keeps a lane's batches in order (see `flush_published`).
const EXECUTORS: usize = 1;

/// How a lane gathers its batches.
#[derive(Clone, Copy)]
struct Shape {
    /// Jobs written by one statement at most. A bound keeps one slow batch from holding too
    /// many jobs' answers.
    max_batch: usize,
    /// How long a batch waits for company after its first request. Zero on the way of a job
    /// (a lone job goes at once); writes nobody waits for can wait to share a statement.
    linger: Duration,
}

/// The writes a job waits for: its claim, stamp and outcome.
const ON_THE_WAY: Shape = Shape {
    max_batch: 256,
    linger: Duration::ZERO,
};

/// The "result is out" marks: nobody waits for them (a lost one only makes the outbox publish
/// the result again, results being at least once), so they gather for a tenth of a second
/// and go in one statement, one at a time. Written one per job as they come, they cost
/// Postgres a quarter of its time per job (bench, 0 ms upstream) for a column nobody reads
/// within the outbox's 30 s.
const DETACHED: Shape = Shape {
    max_batch: 2048,
    linger: Duration::from_millis(100),
};

/// A request that a batch may hold only once: the statements write one row per job id.
trait Keyed {
    fn key(&self) -> &str;
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What one kind of batched write has done since the start, for `/metrics`: whether jobs
/// share their commits (jobs per batch) and how long the database takes for a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchCounts {
    /// `claim`, `stamp`, `outcome` or `result_published`.
    pub write: &'static str,
    pub batches: u64,
    pub jobs: u64,
    /// Time the committed statements ran, summed.
    pub busy: Duration,
}

struct Counters {
    batches: AtomicU64,
    jobs: AtomicU64,
    busy_micros: AtomicU64,
    /// The lane's name, and where each of its statements is marked under way while it runs
    /// (each statement of a batch, one per job after a refused row, on its own), for the
    /// write watch.
    write: &'static str,
    in_flight: Arc<InFlight>,
}

impl Counters {
    fn new(write: &'static str, in_flight: &Arc<InFlight>) -> Self {
        Self {
            batches: AtomicU64::new(0),
            jobs: AtomicU64::new(0),
            busy_micros: AtomicU64::new(0),
            write,
            in_flight: in_flight.clone(),
        }
    }

    /// One statement that committed `jobs` rows' writes in `took`. A statement that failed
    /// counts nowhere: it wrote nothing, and a batch that fails on one row's data is written
    /// again one job per statement, each of which counts.
    fn add(&self, jobs: usize, took: Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.jobs
            .fetch_add(u64::try_from(jobs).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.busy_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// One kind of write, batched.
struct Lane<Req, Resp> {
    tx: mpsc::UnboundedSender<(Req, Reply<Resp>)>,
    write: &'static str,
    counters: Arc<Counters>,
}

impl<Req, Resp> Lane<Req, Resp>
where
    Req: Keyed + Send + 'static,
    Resp: Send + 'static,
{
    fn spawn<F, Fut>(
        write: &'static str,
        pool: PgPool,
        shape: Shape,
        (abandoned, in_flight): (&watch::Sender<bool>, &Arc<InFlight>),
        execute: F,
    ) -> Self
    where
        F: Fn(PgPool, Vec<Req>, Arc<Counters>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<Resp, StoreError>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::new(write, in_flight));
        tokio::spawn(until_abandoned(
            abandoned.subscribe(),
            run_lane(
                pool,
                rx,
                shape,
                Arc::new(execute),
                counters.clone(),
                abandoned.subscribe(),
            ),
        ));
        Self {
            tx,
            write,
            counters,
        }
    }

    fn counts(&self) -> BatchCounts {
        let c = &self.counters;
        BatchCounts {
            write: self.write,
            batches: c.batches.load(Ordering::Relaxed),
            jobs: c.jobs.load(Ordering::Relaxed),
            busy: Duration::from_micros(c.busy_micros.load(Ordering::Relaxed)),
        }
    }

    /// Queues `req` without waiting for its answer; the write still happens.
    fn submit_detached(&self, req: Req) {
        let (reply, _) = oneshot::channel();
        // A closed lane means the store is being dropped; nothing is left to write for.
        let _ = self.tx.send((req, reply));
    }

    async fn submit(&self, req: Req) -> Result<Resp, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((req, reply))
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }
}

async fn run_lane<Req, Resp, F, Fut>(
    pool: PgPool,
    mut rx: mpsc::UnboundedReceiver<(Req, Reply<Resp>)>,
    shape: Shape,
    execute: Arc<F>,
    counters: Arc<Counters>,
    abandoned: watch::Receiver<bool>,
) where
    Req: Keyed + Send + 'static,
    Resp: Send + 'static,
    F: Fn(PgPool, Vec<Req>, Arc<Counters>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Result<Resp, StoreError>>> + Send + 'static,
{
    let executors = Arc::new(Semaphore::new(EXECUTORS));
    // Requests for an id already in the batch being built wait for the next one.
    let mut held: VecDeque<(Req, Reply<Resp>)> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(r) => r,
            None => match rx.recv().await {
                Some(r) => r,
                None => return,
            },
        };
        // Wait for a free executor before gathering, so the batch takes everything that
        // arrived while the others were busy.
        let Ok(permit) = executors.clone().acquire_owned().await else {
            return;
        };
        if !shape.linger.is_zero() {
            tokio::time::sleep(shape.linger).await;
        }
        let mut keys: HashSet<String> = HashSet::new();
        keys.insert(first.0.key().to_owned());
        let mut batch = vec![first];
        let mut still_held = VecDeque::new();
        while let Some(r) = held.pop_front() {
            if batch.len() < shape.max_batch && keys.insert(r.0.key().to_owned()) {
                batch.push(r);
            } else {
                still_held.push_back(r);
            }
        }
        held = still_held;
        while batch.len() < shape.max_batch {
            match rx.try_recv() {
                Ok(r) if keys.insert(r.0.key().to_owned()) => batch.push(r),
                Ok(r) => held.push_back(r),
                Err(_) => break,
            }
        }
        // Rows are locked in id order, so two workers' batches over the same ids queue behind
        // each other instead of deadlocking.
        batch.sort_by(|a, b| a.0.key().cmp(b.0.key()));
        let pool = pool.clone();
        let execute = execute.clone();
        let counters = counters.clone();
        tokio::spawn(until_abandoned(abandoned.clone(), async move {
            let (reqs, replies): (Vec<Req>, Vec<Reply<Resp>>) = batch.into_iter().unzip();
            let results = execute(pool, reqs, counters).await;
            for (reply, result) in replies.into_iter().zip(results) {
                // The asker may have gone (its task was aborted); the write stands either way.
                let _ = reply.send(result);
            }
            drop(permit);
        }));
    }
}

/// Runs `work` until its writer is abandoned (see [`Writer::abandon`]), when it is dropped
/// where it stands; to its end otherwise, the writer dropped included.
pub(super) async fn until_abandoned(
    mut abandoned: watch::Receiver<bool>,
    work: impl Future<Output = ()>,
) {
    tokio::select! {
        // Abandoned first: a lane abandoned with requests queued must not start one more batch.
        biased;
        Ok(_) = abandoned.wait_for(|gone| *gone) => {}
        () = work => {}
    }
}

/// One job's claim.
pub(super) struct ClaimReq {
    id: String,
    job_type: &'static str,
    phone: String,
    params: String,
    out_id: Option<String>,
    route: ReplyRoute,
    worker: Uuid,
    lease_ms: i64,
    /// Why a guard refused it; the row is then written final.
    refusal: Option<Refusal>,
    /// Written stamped (see [`StampReq`]): its caller took its rate-limit slot first and
    /// calls Aliyun as soon as the claim commits, so the claim's commit is also the stamp's.
    stamped: bool,
}

impl ClaimReq {
    pub(super) fn new(job: &Job, route: &ReplyRoute, worker: Uuid, lease: Duration) -> Self {
        let params = job.stored_params();
        Self {
            id: job.id.clone(),
            job_type: job.job_type().as_str(),
            phone: job.phone().as_str().to_owned(),
            out_id: params
                .get("OutId")
                .and_then(Value::as_str)
                .map(str::to_owned),
            params: params.to_string(),
            route: route.clone(),
            worker,
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
            refusal: None,
            stamped: false,
        }
    }

    pub(super) fn refused(mut self, why: Option<Refusal>) -> Self {
        self.refusal = why;
        self
    }

    /// Written stamped, with the lease of a job being called (`lease`).
    pub(super) fn stamped(mut self, lease: Duration) -> Self {
        self.stamped = true;
        self.lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        self
    }
}

impl Keyed for ClaimReq {
    fn key(&self) -> &str {
        &self.id
    }
}

pub(super) struct FinishReq {
    pub(super) job_id: String,
    pub(super) worker: Uuid,
    pub(super) outcome: Outcome,
    pub(super) last_attempt: Option<AttemptRecord>,
    /// Written with its result presumed out (see `store::presumed`); set by the outcome lane,
    /// whose order the presumption rests on.
    pub(super) presume: bool,
    /// The earliest `finished_at` the write may give (the lane's floor).
    pub(super) floor: Option<DateTime<Utc>>,
}

impl Keyed for FinishReq {
    fn key(&self) -> &str {
        &self.job_id
    }
}

/// The second step of a claim: its owner is about to call Aliyun.
pub(super) struct StampReq {
    pub(super) job_id: String,
    pub(super) worker: Uuid,
    pub(super) lease_ms: i64,
}

impl Keyed for StampReq {
    fn key(&self) -> &str {
        &self.job_id
    }
}

/// A result RabbitMQ confirmed: the row's result as of `finished_at` is out.
pub(super) struct PublishedReq {
    pub(super) job_id: String,
    pub(super) finished_at: DateTime<Utc>,
}

impl Keyed for PublishedReq {
    fn key(&self) -> &str {
        &self.job_id
    }
}

/// The batched writers of one store.
pub(super) struct Writer {
    claims: Lane<ClaimReq, Claim>,
    stamps: Lane<StampReq, bool>,
    finishes: Lane<FinishReq, JobRow>,
    published: Lane<PublishedReq, ()>,
    presumed: Arc<Presumed>,
    /// See [`Writer::abandon`].
    abandoned: watch::Sender<bool>,
}

impl Writer {
    /// `republish_after`: the fleet's `RESULT_REPUBLISH_AFTER_MS`, which bounds how long a
    /// presumed result may hold the watermark.
    /// `in_flight`: where the lanes mark their statements under way.
    pub(super) fn spawn(
        pool: PgPool,
        republish_after: Duration,
        in_flight: &Arc<InFlight>,
    ) -> Self {
        let presumed = Arc::new(Presumed::default());
        let abandoned = watch::Sender::new(false);
        presumed::spawn_keeper(
            pool.clone(),
            &presumed,
            presumed::hand_over_after(republish_after),
            abandoned.subscribe(),
        );
        let lane_presumed = presumed.clone();
        let shared = (&abandoned, in_flight);
        Self {
            claims: Lane::spawn(
                "claim",
                pool.clone(),
                ON_THE_WAY,
                shared,
                write_batch::<ClaimReq>,
            ),
            stamps: Lane::spawn(
                "stamp",
                pool.clone(),
                ON_THE_WAY,
                shared,
                write_batch::<StampReq>,
            ),
            finishes: Lane::spawn(
                "outcome",
                pool.clone(),
                ON_THE_WAY,
                shared,
                move |pool, reqs, c| finish_presuming(pool, reqs, c, lane_presumed.clone()),
            ),
            published: Lane::spawn(
                "result_published",
                pool,
                DETACHED,
                shared,
                write_batch::<PublishedReq>,
            ),
            presumed,
            abandoned,
        }
    }

    /// Stops every lane, batch and the keeper where they stand, as a killed process would: for
    /// a worker that stops on a silent write and whose process lives on. Requests still
    /// queued are never written (their askers hear `WriterGone`), so none is written later
    /// under a worker that no longer exists: a claim stamped by it would end its job
    /// `unknown` though it was never sent.
    pub(super) fn abandon(&self) {
        self.abandoned.send_replace(true);
    }

    /// Each lane's counts, in the order a job meets them.
    pub(super) fn counts(&self) -> [BatchCounts; 4] {
        [
            self.claims.counts(),
            self.stamps.counts(),
            self.finishes.counts(),
            self.published.counts(),
        ]
    }

    pub(super) async fn stamp(&self, req: StampReq) -> Result<bool, StoreError> {
        self.stamps.submit(req).await
    }

    /// A result presumed out needs no write; any other is marked, queued without waiting.
    pub(super) fn published(&self, req: PublishedReq) {
        if !self.presumed.confirmed(&req.job_id, req.finished_at) {
            self.published.submit_detached(req);
        }
    }

    /// Waits until every mark queued before it is written (the lane writes its batches one at
    /// a time, in order, and this one's empty id matches no row), then hands the presumed
    /// results still unconfirmed to the outbox. An error means some still rest on this
    /// worker's watermark: its row must stay for the sweeper.
    pub(super) async fn flush_published(&self, pool: &PgPool) -> Result<(), StoreError> {
        self.published
            .submit(PublishedReq {
                job_id: String::new(),
                finished_at: Utc::now(),
            })
            .await?;
        self.presumed.hand_over_all(pool).await?;
        // An outcome batch of a job the drain gave up on may have committed since.
        if self.presumed.is_settled() {
            Ok(())
        } else {
            Err(StoreError::Unsettled)
        }
    }

    pub(super) async fn claim(&self, req: ClaimReq) -> Result<Claim, StoreError> {
        self.claims.submit(req).await
    }

    pub(super) async fn finish(&self, req: FinishReq) -> Result<JobRow, StoreError> {
        self.finishes.submit(req).await
    }
}

/// Writes an outcome batch, the results of this store's worker presumed out, and takes note
/// of them before anyone hears the outcome (and could confirm its result).
async fn finish_presuming(
    pool: PgPool,
    mut reqs: Vec<FinishReq>,
    counters: Arc<Counters>,
    presumed: Arc<Presumed>,
) -> Vec<Result<JobRow, StoreError>> {
    let _turn = presumed.batch_turn().await;
    let floor = presumed.floor();
    let presuming = presumed.presuming();
    for r in &mut reqs {
        r.presume = presuming && presumed.presumes_for(r.worker);
        r.floor = floor;
    }
    let doubt: Vec<(String, bool)> = reqs.iter().map(|r| (r.job_id.clone(), r.presume)).collect();
    let out = write_batch(pool, reqs, counters).await;
    presumed.wrote(out.iter().filter_map(|r| r.as_ref().ok()));
    for ((id, presumed_out), result) in doubt.iter().zip(&out) {
        if *presumed_out && result.is_err() {
            presumed.in_doubt(id, floor.unwrap_or(DateTime::UNIX_EPOCH));
        }
    }
    out
}

/// Whether a failed batch should be retried one job at a time: an error about the data of
/// one row must not fail its neighbours, while a lost connection, a shutdown or a read-only
/// failover fails them all alike (and one at a time would only multiply the wait).
fn is_about_data(e: &StoreError) -> bool {
    e.class() == ErrorClass::Data
}

fn shared_failure<T>(n: usize, e: StoreError) -> Vec<Result<T, StoreError>> {
    let e = Arc::new(e);
    (0..n).map(|_| Err(StoreError::Shared(e.clone()))).collect()
}

/// A kind of request a lane writes: all of a batch at once, one answer per request in order.
/// `watched` is the batch's mark for the write watch, restarted by a write that goes on with
/// another transaction (see `Store::watched`).
trait Batched: Keyed + Sized + Send + Sync + 'static {
    type Out: Send + 'static;

    fn write_all<'a>(
        pool: &'a PgPool,
        reqs: &'a [Self],
        watched: &'a mut Mark,
    ) -> impl Future<Output = Result<Vec<Result<Self::Out, StoreError>>, StoreError>> + Send + 'a;
}

impl Batched for ClaimReq {
    type Out = Claim;

    async fn write_all(
        pool: &PgPool,
        reqs: &[Self],
        watched: &mut Mark,
    ) -> Result<Vec<Result<Claim, StoreError>>, StoreError> {
        let mut conn = pool.acquire().await?;
        Ok(claim_together(&mut conn, reqs, Some(watched))
            .await?
            .into_iter()
            .map(Ok)
            .collect())
    }
}

impl Batched for FinishReq {
    type Out = JobRow;

    async fn write_all(
        pool: &PgPool,
        reqs: &[Self],
        watched: &mut Mark,
    ) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
        finish_together(pool, reqs, watched).await
    }
}

impl Batched for StampReq {
    type Out = bool;

    async fn write_all(
        pool: &PgPool,
        reqs: &[Self],
        _: &mut Mark,
    ) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
        let stamped = stamp_together(pool, reqs).await?;
        Ok(reqs
            .iter()
            .map(|r| Ok(stamped.contains(r.job_id.as_str())))
            .collect())
    }
}

impl Batched for PublishedReq {
    type Out = ();

    async fn write_all(
        pool: &PgPool,
        reqs: &[Self],
        _: &mut Mark,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        mark_published(pool, reqs).await?;
        Ok(reqs.iter().map(|_| Ok(())).collect())
    }
}

/// Marks results as out. Only the result that went out: a row finished again since (a
/// reconciled send) keeps its newer result in the outbox.
pub(super) async fn mark_published(pool: &PgPool, reqs: &[PublishedReq]) -> Result<(), StoreError> {
    let ids: Vec<&str> = reqs.iter().map(|r| r.job_id.as_str()).collect();
    let at: Vec<DateTime<Utc>> = reqs.iter().map(|r| r.finished_at).collect();
    sqlx::query(
        "UPDATE sms_jobs SET result_published_at = now()
         FROM unnest($1::text[], $2::timestamptz[]) AS t(t_id, t_finished)
         WHERE id = t_id AND status <> 'sending' AND finished_at <= t_finished",
    )
    .bind(&ids)
    .bind(&at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Stamps the claims its owners still hold (see [`StampReq`]); returns the ids stamped. A claim
/// another worker ended or took over is not stamped, and its owner must not call.
pub(super) async fn stamp_together(
    pool: &PgPool,
    reqs: &[StampReq],
) -> Result<HashSet<String>, StoreError> {
    let ids: Vec<&str> = reqs.iter().map(|r| r.job_id.as_str()).collect();
    let workers: Vec<Uuid> = reqs.iter().map(|r| r.worker).collect();
    let leases: Vec<i64> = reqs.iter().map(|r| r.lease_ms).collect();
    let stamped: Vec<(String,)> = sqlx::query_as(
        "UPDATE sms_jobs SET called_at = COALESCE(called_at, now()), updated_at = now(),
                lease_until = now() + make_interval(secs => t_lease::double precision / 1000)
         FROM unnest($1::text[], $2::uuid[], $3::bigint[]) AS t(t_id, t_worker, t_lease)
         WHERE id = t_id AND status = 'sending' AND claimed_by = t_worker
         RETURNING id",
    )
    .bind(&ids)
    .bind(&workers)
    .bind(&leases)
    .fetch_all(pool)
    .await?;
    Ok(stamped.into_iter().map(|(id,)| id).collect())
}

/// Writes a batch. If it fails on one row's data, each job is written alone, so one bad row
/// does not fail its neighbours; any other failure (a lost connection) fails them all alike.
async fn write_batch<R: Batched>(
    pool: PgPool,
    reqs: Vec<R>,
    counters: Arc<Counters>,
) -> Vec<Result<R::Out, StoreError>> {
    match counted(&pool, &reqs, &counters).await {
        Ok(out) => out,
        Err(e) if reqs.len() > 1 && is_about_data(&e) => {
            let mut out = Vec::with_capacity(reqs.len());
            for r in &reqs {
                out.push(
                    match counted(&pool, std::slice::from_ref(r), &counters).await {
                        Ok(mut one) => one.pop().unwrap_or(Err(StoreError::WriterGone)),
                        Err(e) => Err(e),
                    },
                );
            }
            out
        }
        Err(e) => shared_failure(reqs.len(), e),
    }
}

/// One statement of `write_batch`, counted when it commits.
async fn counted<R: Batched>(
    pool: &PgPool,
    reqs: &[R],
    counters: &Counters,
) -> Result<Vec<Result<R::Out, StoreError>>, StoreError> {
    let started = Instant::now();
    let mut watched = counters.in_flight.begin(counters.write);
    let written = R::write_all(pool, reqs, &mut watched).await;
    // Not the shutdown's flush mark, whose empty id matches no row.
    let jobs = reqs.iter().filter(|r| !r.key().is_empty()).count();
    if written.is_ok() && jobs > 0 {
        counters.add(jobs, started.elapsed());
    }
    written
}

/// Inserts every job as `sending` (or, refused by a guard, as final with the guard's status
/// and code) in one statement. The lease counts from the statement, not the transaction: a
/// guarded claim's transaction may have waited long for its number's lock. Ids already present and not `invalid` are left alone and
/// read back as they are. A row left `invalid` may be re-claimed: an invalid message never
/// reached Aliyun, so a corrected job with the same id is a first attempt, not a duplicate.
/// `watched`: the batch's mark, when the insert is a transaction of its own; the read of what
/// it left alone is then another.
pub(super) async fn claim_together(
    conn: &mut PgConnection,
    reqs: &[ClaimReq],
    watched: Option<&mut Mark>,
) -> Result<Vec<Claim>, StoreError> {
    let n = reqs.len();
    let mut ids = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut phones = Vec::with_capacity(n);
    let mut params = Vec::with_capacity(n);
    let mut out_ids = Vec::with_capacity(n);
    let mut reply_tos = Vec::with_capacity(n);
    let mut correlations = Vec::with_capacity(n);
    let mut workers = Vec::with_capacity(n);
    let mut leases = Vec::with_capacity(n);
    let mut refusals = Vec::with_capacity(n);
    let mut refused_statuses = Vec::with_capacity(n);
    let mut refused_codes = Vec::with_capacity(n);
    let mut stamped = Vec::with_capacity(n);
    for r in reqs {
        ids.push(r.id.as_str());
        types.push(r.job_type);
        phones.push(r.phone.as_str());
        params.push(r.params.as_str());
        out_ids.push(r.out_id.as_deref());
        reply_tos.push(r.route.reply_to.as_deref());
        correlations.push(r.route.correlation_id.as_deref());
        workers.push(r.worker);
        leases.push(r.lease_ms);
        refusals.push(r.refusal.as_ref().map(|f| f.message.as_str()));
        refused_statuses.push(r.refusal.as_ref().map(|f| f.status.as_str()));
        refused_codes.push(r.refusal.as_ref().map(|f| f.code));
        stamped.push(r.stamped && r.refusal.is_none());
    }
    let written: Vec<JobRow> = sqlx::query_as(concat!(
        "INSERT INTO sms_jobs (id, type, status, phone_number, params, out_id, reply_to,
                               correlation_id, claimed_by, lease_until, code, message,
                               finished_at, called_at)
         SELECT t_id, t_type,
                COALESCE(t_refused_status, 'sending'),
                t_phone, t_params::jsonb, t_out_id, t_reply_to, t_correlation, t_worker,
                statement_timestamp() + make_interval(secs => t_lease::double precision / 1000),
                t_refused_code, t_refusal,
                CASE WHEN t_refusal IS NULL THEN NULL ELSE now() END,
                CASE WHEN t_stamped THEN now() END
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::uuid[], $9::bigint[], $10::text[], $11::text[],
                     $12::text[], $13::bool[])
              AS t(t_id, t_type, t_phone, t_params, t_out_id, t_reply_to, t_correlation,
                   t_worker, t_lease, t_refusal, t_refused_status, t_refused_code, t_stamped)
         ON CONFLICT (id) DO UPDATE SET
             type = EXCLUDED.type, status = EXCLUDED.status,
             phone_number = EXCLUDED.phone_number, params = EXCLUDED.params,
             out_id = EXCLUDED.out_id, reply_to = EXCLUDED.reply_to,
             correlation_id = EXCLUDED.correlation_id, claimed_by = EXCLUDED.claimed_by,
             lease_until = EXCLUDED.lease_until, code = EXCLUDED.code,
             message = EXCLUDED.message, attempts = 0, finished_at = EXCLUDED.finished_at,
             created_at = now(), updated_at = now(), called_at = EXCLUDED.called_at,
             result_published_at = NULL
         WHERE sms_jobs.status = 'invalid'
         RETURNING ",
        job_columns!()
    ))
    .bind(&ids)
    .bind(&types)
    .bind(&phones)
    .bind(&params)
    .bind(&out_ids)
    .bind(&reply_tos)
    .bind(&correlations)
    .bind(&workers)
    .bind(&leases)
    .bind(&refusals)
    .bind(&refused_statuses)
    .bind(&refused_codes)
    .bind(&stamped)
    .fetch_all(&mut *conn)
    .await?;
    let mut rows: HashMap<String, JobRow> =
        written.into_iter().map(|r| (r.id.clone(), r)).collect();
    let untouched: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !rows.contains_key(*id))
        .collect();
    if let (false, Some(watched)) = (untouched.is_empty(), watched) {
        watched.restart();
    }
    let mut seen = super::fetch_many(&mut *conn, &untouched).await?;
    reqs.iter()
        .map(|r| match rows.remove(&r.id) {
            Some(row) if row.status == "sending" => Ok(Claim::Owned(Box::new(row))),
            // Refused by the local limit: final already, answered like a replay.
            Some(row) => Ok(Claim::Seen(Box::new(row))),
            None => seen
                .remove(&r.id)
                .map(|row| Claim::Seen(Box::new(row)))
                .ok_or(StoreError::Database(sqlx::Error::RowNotFound)),
        })
        .collect()
}

/// Writes the outcomes of jobs this worker owns, and their deciding attempts, in one
/// transaction. A job whose claim was lost meanwhile keeps the final answer already in its
/// row, which is what its caller gets back.
pub(super) async fn finish_together(
    pool: &PgPool,
    reqs: &[FinishReq],
    watched: &mut Mark,
) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    let n = reqs.len();
    let mut ids = Vec::with_capacity(n);
    let mut workers = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut codes = Vec::with_capacity(n);
    let mut messages = Vec::with_capacity(n);
    let mut biz_ids = Vec::with_capacity(n);
    let mut request_ids = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut reconcile_ms = Vec::with_capacity(n);
    let mut presume = Vec::with_capacity(n);
    for r in reqs {
        presume.push(r.presume);
        let o = &r.outcome;
        ids.push(r.job_id.as_str());
        workers.push(r.worker);
        statuses.push(o.status.as_str());
        codes.push(o.code.as_str());
        messages.push(o.message.as_str());
        biz_ids.push(o.biz_id.as_deref());
        request_ids.push(o.request_id.as_deref());
        attempts.push(i32::try_from(o.attempts).unwrap_or(i32::MAX));
        reconcile_ms.push(match &o.followup {
            Followup::Reconcile { grace, .. } => {
                Some(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX))
            }
            _ => None,
        });
    }
    let mut recorded = AttemptArrays::default();
    for r in reqs {
        if let Some(a) = &r.last_attempt {
            recorded.push(&r.job_id, a);
        }
    }
    // Sends with receipts to track add rows elsewhere, so they need a transaction; the common
    // batch is one statement, which is atomic by itself and spares three round trips.
    let followups = reqs
        .iter()
        .any(|r| !matches!(r.outcome.followup, Followup::None));
    let query = bind_attempts!(
        sqlx::query_as::<_, JobRow>(concat!(
            "WITH recorded AS (",
            insert_attempts_sql!(),
            "), finished AS (
                UPDATE sms_jobs SET status = t_status, code = t_code, message = t_message,
                    biz_id = t_biz_id, request_id = t_request_id, attempts = t_attempts,
                    finished_at = GREATEST(now(), $21::timestamptz), updated_at = now(),
                    lease_until = NULL,
                    result_published_at = CASE WHEN t_presume
                                               THEN GREATEST(now(), $21::timestamptz) END,
                    reconcile_until = now() + make_interval(secs => t_reconcile::double precision / 1000),
                    next_reconcile_at = CASE WHEN t_reconcile IS NULL THEN NULL ELSE now() END
                FROM unnest($11::text[], $12::uuid[], $13::text[], $14::text[], $15::text[],
                            $16::text[], $17::text[], $18::int[], $19::bigint[], $20::bool[])
                     AS t(t_id, t_worker, t_status, t_code, t_message, t_biz_id, t_request_id,
                          t_attempts, t_reconcile, t_presume)
                WHERE id = t_id AND status = 'sending' AND claimed_by = t_worker
                RETURNING ",
            job_columns!(),
            ") SELECT ",
            job_columns!(),
            " FROM finished"
        )),
        recorded
    )
    .bind(&ids)
    .bind(&workers)
    .bind(&statuses)
    .bind(&codes)
    .bind(&messages)
    .bind(&biz_ids)
    .bind(&request_ids)
    .bind(&attempts)
    .bind(&reconcile_ms)
    .bind(&presume)
    .bind(reqs.iter().filter_map(|r| r.floor).max());
    let mut rows: HashMap<String, JobRow> = HashMap::with_capacity(n);
    if followups {
        let mut tx = pool.begin().await?;
        rows.extend(
            query
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|r| (r.id.clone(), r)),
        );
        for r in reqs.iter().filter(|r| rows.contains_key(&r.job_id)) {
            let phones = match &r.outcome.followup {
                Followup::None => continue,
                Followup::TrackReceipts { phones } | Followup::Reconcile { phones, .. } => phones,
            };
            deliveries::insert(&mut tx, &r.job_id, phones, r.outcome.biz_id.as_deref()).await?;
        }
        tx.commit().await?;
    } else {
        rows.extend(
            query
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|r| (r.id.clone(), r)),
        );
    }
    let lost: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !rows.contains_key(*id))
        .collect();
    if !lost.is_empty() {
        watched.restart();
        let mut conn = pool.acquire().await?;
        rows.extend(super::fetch_many(&mut conn, &lost).await?);
    }
    Ok(reqs
        .iter()
        .map(|r| {
            rows.remove(&r.job_id)
                .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::db_error;

    #[test]
    fn only_a_refused_value_makes_a_batch_retry_one_job_at_a_time() {
        for data in ["22021", "22P05", "23505", "23514"] {
            assert!(is_about_data(&db_error(data)), "{data}");
        }
        // An administrator's shutdown or a read-only failover fails every job alike.
        for outage in ["57P01", "57P02", "57P03", "25006", "08006", "53300"] {
            assert!(!is_about_data(&db_error(outage)), "{outage}");
        }
        assert!(!is_about_data(&StoreError::Database(
            sqlx::Error::PoolTimedOut
        )));
    }
}
