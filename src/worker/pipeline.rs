//! One delivery, from decode to ack: the only place that knows RabbitMQ, Postgres and Aliyun
//! at once.
//!
//! Order matters and is the whole exactly-once argument:
//! 1. the `sending` row is committed before Aliyun is called;
//! 2. the outcome is committed before the result is published;
//! 3. the delivery is acked only after the result publish is confirmed.
//!
//! A crash between any two steps leaves a state the next delivery of the same job resolves
//! without a second call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use rand::Rng;
use tracing::Instrument;
use uuid::Uuid;

use crate::admin::Metrics;
use crate::aliyun::outcome::{self, codes};
use crate::aliyun::{AliyunClient, Answer, CallError, Effect, Product, Verdict, classify};
use crate::broker::{self, Broker, BrokerError, Routed};
use crate::config::{Config, RetryPolicy};
use crate::metrics::Stage;
use crate::phone::PhoneNumber;
use crate::store::{
    AttemptRecord, Claim, ErrorClass, Followup, Guards, JobRow, Outcome, Refusal, ReplyRoute,
    Stale, Store, StoreError,
};
use crate::wire::{self, Invalid, Job, JobKind, JobResult, JobType, Status};
use crate::worker::health::DbHealth;
use crate::worker::liveness::{Liveness, Moment};

/// A retry must be able to start this long before the job's deadline: its rate-limit slot, the
/// stamp and the request itself take time after the decision, and must not carry the call past
/// the deadline.
const DEADLINE_GUARD: chrono::Duration = chrono::Duration::milliseconds(100);

/// Between two tries of a write the database refused for a reason other than an outage or
/// the data (a deadlock, a serialization failure), doubling.
const PERSIST_RETRY_MIN: Duration = Duration::from_millis(20);
const PERSIST_RETRY_MAX: Duration = Duration::from_secs(1);

/// How late after its rate-limit slot a call may still leave (the schedule leaves a margin
/// of 250 ms, of which the pacer itself may use 25).
const SLOT_ALLOWANCE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// What to do with the delivery once the pipeline is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    /// Put it back: the job's state is safe in Postgres (or was never written) and a later
    /// delivery will finish it without a second Aliyun call.
    Requeue,
}

pub struct Pipeline {
    config: Arc<Config>,
    store: Store,
    aliyun: AliyunClient,
    health: DbHealth,
    metrics: Arc<Metrics>,
    /// This process's identity on the `sending` claims it holds.
    worker_id: Uuid,
    /// One lock per job id being handled here: two deliveries of one job in this process take
    /// turns, so while a task holds it, no other task of ours is claiming or calling that job.
    local: LocalLocks,
    /// Jobs this process called Aliyun for but could not record the outcome of. Their claims
    /// are never continued; only the lease can end them (as `unknown`).
    unrecorded: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Of those, the ones whose task gave up recording: their leases are no longer renewed.
    gave_up: std::sync::Mutex<std::collections::HashSet<String>>,
    liveness: Liveness,
}

/// The Aliyun call a job makes. Every job action is not idempotent: the three sends cost a
/// second SMS, and a repeated check of a right code answers UNKNOWN.
struct CallPlan {
    product: Product,
    action: &'static str,
    params: Vec<(&'static str, String)>,
    form: Vec<(&'static str, String)>,
}

fn plan(job: &Job) -> CallPlan {
    let (product, params, form) = match &job.kind {
        JobKind::SendVerifyCode(j) => (Product::Dypnsapi, j.api_params(), Vec::new()),
        JobKind::CheckVerifyCode(j) => (Product::Dypnsapi, j.api_params(), Vec::new()),
        JobKind::SendSms(j) => (Product::Dysmsapi, j.api_params(), Vec::new()),
        JobKind::SendBatchSms(j) => (Product::Dysmsapi, j.api_params(), j.form_params()),
    };
    CallPlan {
        product,
        action: action(job),
        params,
        form,
    }
}

/// The Aliyun action a job calls.
fn action(job: &Job) -> &'static str {
    match &job.kind {
        JobKind::SendVerifyCode(_) => "SendSmsVerifyCode",
        JobKind::CheckVerifyCode(_) => "CheckSmsVerifyCode",
        JobKind::SendSms(_) => "SendSms",
        JobKind::SendBatchSms(_) => "SendBatchSms",
    }
}

fn wants_verify_code(job: &Job) -> bool {
    match &job.kind {
        JobKind::SendVerifyCode(j) => j.return_verify_code,
        _ => false,
    }
}

/// Dysmsapi sends have receipts to poll, and can be looked up when their answer is lost.
fn is_dysmsapi_send(job: &Job) -> bool {
    matches!(job.kind, JobKind::SendSms(_) | JobKind::SendBatchSms(_))
}

impl Pipeline {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        aliyun: AliyunClient,
        health: DbHealth,
        metrics: Arc<Metrics>,
    ) -> Self {
        let config_heartbeat = config.heartbeat;
        Self {
            config,
            store,
            aliyun,
            health,
            metrics,
            worker_id: Uuid::new_v4(),
            local: std::sync::Mutex::default(),
            unrecorded: std::sync::Mutex::default(),
            gave_up: std::sync::Mutex::default(),
            liveness: Liveness::new(config_heartbeat),
        }
    }

    /// Until when this process's own heartbeat vouches for it (see [`Liveness`]).
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Handles one delivery and says whether to ack it. Never panics on message content.
    pub async fn handle(&self, delivery: &Delivery, broker: &Broker) -> Disposition {
        let error = match self.try_handle(delivery, broker).await {
            Ok(()) => return Disposition::Ack,
            Err(e) => e,
        };
        if let PipelineError::Store(e) = &error {
            match e.class() {
                ErrorClass::Outage => self.health.failed(),
                // Refused for what it holds, it would be refused on every delivery.
                ErrorClass::Data => return self.refuse_unstorable(delivery, broker, e).await,
                ErrorClass::Other => {}
            }
        }
        tracing::warn!(error = %error, "job not finished; returning it to the queue");
        Disposition::Requeue
    }

    async fn try_handle(&self, delivery: &Delivery, broker: &Broker) -> Result<(), PipelineError> {
        let (route, bad_route) = checked_route(delivery, &self.config.queues.jobs);
        match (
            wire::decode_job(&delivery.data, message_id(delivery)),
            bad_route,
        ) {
            (Err(invalid), _) => self.refuse(delivery, broker, &route, invalid).await,
            (Ok(job), Some(mut invalid)) => {
                invalid.id = Some(job.id.clone());
                invalid.job_type = Some(job.job_type().as_str().to_owned());
                invalid.phone = Some(job.phone().clone());
                self.refuse(delivery, broker, &route, invalid).await
            }
            (Ok(job), None) => {
                let span = tracing::info_span!(
                    "job",
                    job_id = %job.id,
                    job_type = %job.job_type(),
                    phone = %job.phone(),
                );
                async {
                    let published = delivery
                        .properties
                        .timestamp()
                        .and_then(|t| i64::try_from(t).ok())
                        .and_then(|t| DateTime::from_timestamp(t, 0));
                    let result = self.run_job(&job, &route, published).await?;
                    self.metrics
                        .job_finished(job.job_type().as_str(), result.status.as_str());
                    let started = Instant::now();
                    self.publish(broker, &result, &route).await?;
                    self.metrics.stage(Stage::Publish, started.elapsed());
                    Ok(())
                }
                .instrument(span)
                .await
            }
        }
    }

    async fn refuse(
        &self,
        delivery: &Delivery,
        broker: &Broker,
        route: &ReplyRoute,
        invalid: Invalid,
    ) -> Result<(), PipelineError> {
        let recorded = match &invalid.id {
            Some(id) => {
                self.store
                    .record_invalid(
                        id,
                        invalid.job_type.as_deref(),
                        invalid.phone.as_ref().map(PhoneNumber::as_str),
                        route,
                        invalid.code,
                        &invalid.message,
                    )
                    .await?
            }
            None => None,
        };
        self.answer_invalid(delivery, broker, route, invalid, recorded)
            .await
    }

    /// The database refused a value of this delivery (see [`ErrorClass::Data`]). Unless Aliyun
    /// may have been called for it, it is answered `invalid` and dead-lettered, unstored:
    /// storing it is what failed. The answer names no value of the message.
    async fn refuse_unstorable(
        &self,
        delivery: &Delivery,
        broker: &Broker,
        error: &StoreError,
    ) -> Disposition {
        let mut invalid = Invalid::new(
            "INVALID_DATA",
            format!(
                "the database refused a value of this message (SQLSTATE {}); it was not sent",
                error.sqlstate().as_deref().unwrap_or("unknown")
            ),
        );
        match wire::decode_job(&delivery.data, message_id(delivery)) {
            Ok(job) if self.may_have_called(&job.id).await => {
                tracing::warn!(error = %error, "the database refused a job's outcome; returning it to the queue");
                return Disposition::Requeue;
            }
            Ok(job) => {
                invalid.id = Some(job.id.clone());
                invalid.job_type = Some(job.job_type().as_str().to_owned());
            }
            Err(refused) => {
                invalid.id = refused.id;
                invalid.job_type = refused.job_type;
            }
        }
        tracing::warn!(error = %error, "the database refused a value of this message");
        let (route, _) = checked_route(delivery, &self.config.queues.jobs);
        match self
            .answer_invalid(delivery, broker, &route, invalid, None)
            .await
        {
            Ok(()) => Disposition::Ack,
            Err(e) => {
                tracing::warn!(error = %e, "job not answered; returning it to the queue");
                Disposition::Requeue
            }
        }
    }

    /// Whether this worker holds the job's `sending` claim, so that Aliyun may have been called.
    async fn may_have_called(&self, id: &str) -> bool {
        match self.store.fetch(id).await {
            Ok(row) => row.is_some_and(|r| {
                r.status == Status::Sending.as_str() && r.claimed_by == Some(self.worker_id)
            }),
            // An id the database refuses to look up cannot have been claimed.
            Err(e) => e.class() != ErrorClass::Data,
        }
    }

    /// Dead-letters a refused delivery and publishes its `invalid` result. `recorded` is when
    /// its `invalid` row was written, if this delivery wrote one: only then is the outbox told
    /// the result is out (a row of another job with this id keeps its own result).
    async fn answer_invalid(
        &self,
        delivery: &Delivery,
        broker: &Broker,
        route: &ReplyRoute,
        invalid: Invalid,
        recorded: Option<DateTime<Utc>>,
    ) -> Result<(), PipelineError> {
        tracing::warn!(
            job_id = invalid.id.as_deref().unwrap_or(""),
            code = invalid.code,
            reason = %invalid.message,
            "invalid job: answered and dead-lettered"
        );
        broker
            .dead_letter(delivery, invalid.code, &invalid.message)
            .await?;
        // The type label stays bounded: an unknown `type` is counted as "unknown".
        let job_type = invalid
            .job_type
            .as_deref()
            .and_then(|t| t.parse::<JobType>().ok())
            .map_or("unknown", JobType::as_str);
        self.metrics
            .job_finished(job_type, Status::Invalid.as_str());
        let result = JobResult {
            id: invalid.id,
            job_type: invalid.job_type,
            status: Status::Invalid,
            code: invalid.code.to_owned(),
            message: invalid.message,
            biz_id: None,
            request_id: None,
            attempts: 0,
            finished_at: recorded.unwrap_or_else(Utc::now),
            verify_code: None,
        };
        if recorded.is_some() {
            self.publish(broker, &result, route).await
        } else {
            deliver_result(broker, &result, route).await.map(|_| ())
        }
    }

    async fn publish(
        &self,
        broker: &Broker,
        result: &JobResult,
        route: &ReplyRoute,
    ) -> Result<(), PipelineError> {
        publish_result(&self.store, broker, result, route).await
    }

    /// Claims the job and produces its one final result: by calling Aliyun if this worker
    /// owns the claim, by replaying the stored result otherwise.
    ///
    /// `published` is the AMQP timestamp, when the publisher set one.
    pub async fn run_job(
        &self,
        job: &Job,
        route: &ReplyRoute,
        published: Option<DateTime<Utc>>,
    ) -> Result<JobResult, StoreError> {
        // Declared first, so it is dropped last, after our reference to the lock, whether the
        // job ends or its task is aborted (the drain's deadline) or panics.
        let _in_hand = InHand {
            local: &self.local,
            id: &job.id,
        };
        let lock = {
            let mut local = lock_std(&self.local);
            local.entry(job.id.clone()).or_default().clone()
        };
        let _held = lock.lock().await;
        self.run_job_alone(job, route, published).await
    }

    /// `run_job` with this job's local lock held.
    async fn run_job_alone(
        &self,
        job: &Job,
        route: &ReplyRoute,
        published: Option<DateTime<Utc>>,
    ) -> Result<JobResult, StoreError> {
        let guards = self.guards(job);
        let started = Instant::now();
        let paced = self.pace_before_claim(job, &guards, published).await;
        if paced.is_some() {
            self.metrics.stage(Stage::Pace, started.elapsed());
        }
        let started = Instant::now();
        let claim = Box::pin(self.store.claim(
            job,
            route,
            self.worker_id,
            self.config.claim_lease(),
            &guards,
            paced.map(|_| self.config.job_lease()),
        ))
        .await?;
        self.metrics.stage(Stage::Claim, started.elapsed());
        let mut next = match claim {
            Claim::Owned(row) => {
                Next::Own(row.created_at, paced.filter(|_| row.called_at.is_some()))
            }
            // Our own claim, and no task of ours is working on it (we hold the lock): an
            // earlier task claimed it and failed before calling Aliyun (say, the database went
            // away as the claim committed). Carry on as its owner.
            Claim::Seen(row)
                if row.status == Status::Sending.as_str()
                    && row.claimed_by == Some(self.worker_id)
                    && !lock_std(&self.unrecorded).contains(&job.id) =>
            {
                Next::Own(row.created_at, None)
            }
            Claim::Seen(row) => {
                // Ids are the idempotency key: a backend that reuses one for a new job gets
                // the first job's answer, and nothing is sent. Said, so the reuse is found.
                if row.job_type != job.job_type().as_str()
                    || row.phone_number.as_deref() != Some(job.phone().as_str())
                {
                    tracing::warn!(
                        first_type = %row.job_type,
                        "this id was used before for another job (another number or type): \
                         that job's answer is replayed and this one is not sent; a new job \
                         needs a new id"
                    );
                }
                Next::Wait(row)
            }
        };
        loop {
            next = match next {
                Next::Own(first_seen, paced) => {
                    match Box::pin(self.owned(job, first_seen, published, paced)).await? {
                        Some(result) => return Ok(result),
                        // Another worker ended or took the claim before we called.
                        None => Next::Wait(Box::new(self.fetch(&job.id).await?)),
                    }
                }
                Next::Wait(row) => match self.wait_for_owner(*row).await? {
                    Waited::Final(result) => return Ok(result),
                    Waited::TakenOver(row) => {
                        tracing::info!("took over a claim that never reached Aliyun");
                        Next::Own(row.created_at, None)
                    }
                },
            };
        }
    }

    /// Takes the job's first rate-limit slot before its claim, when the claim can then be
    /// written stamped (see [`Store::claim`]): one commit before the call instead of two, on
    /// every job's path. Says when the slot was due; `None` leaves the slot to `call_aliyun`.
    ///
    /// Not for jobs a guard counts or refuses: their claim decides whether there is a call at
    /// all, and a storm of refused jobs must not spend the slots of the jobs that are sent.
    /// Nor for a job whose deadline is (nearly) past, which the claim will expire.
    async fn pace_before_claim(
        &self,
        job: &Job,
        guards: &Guards<'_>,
        published: Option<DateTime<Utc>>,
    ) -> Option<Instant> {
        if guards.counted() || guards.refusal.is_some() {
            return None;
        }
        let deadline = self.deadline(job, published.unwrap_or_else(Utc::now));
        if deadline.is_some_and(|d| d <= Utc::now() + DEADLINE_GUARD) {
            return None;
        }
        // An unavailable schedule is left to the claimed path, which retries it like a call
        // that never left.
        self.aliyun.pace(action(job)).await.ok()?;
        Some(Instant::now())
    }

    /// The abuse guards that apply to this job (see `store::guards`).
    fn guards(&self, job: &Job) -> Guards<'_> {
        let g = &self.config.guards;
        let job_type = job.job_type();
        let templated = matches!(job_type, JobType::SendSms | JobType::SendBatchSms);
        let sends = job_type != JobType::CheckVerifyCode;
        let refusal = job
            .phones()
            .iter()
            .any(|p| templated && !g.countries.allows(p.as_str()))
            .then(Refusal::country_not_allowed);
        Guards {
            refusal,
            // Aliyun's per-number limits are about verification codes.
            number_limits: self
                .config
                .number_limits
                .as_ref()
                .filter(|_| job_type == JobType::SendVerifyCode),
            check_limit: g
                .check_limit
                .filter(|_| job_type == JobType::CheckVerifyCode),
            daily: g.daily.filter(|_| sends),
        }
    }

    async fn fetch(&self, id: &str) -> Result<JobRow, StoreError> {
        self.store
            .fetch(id)
            .await?
            .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
    }

    /// Runs a job this worker owns the claim of. `None` when the claim was lost before Aliyun
    /// was called.
    /// `paced`: the claim was written stamped right after a slot due at that instant.
    async fn owned(
        &self,
        job: &Job,
        first_seen: DateTime<Utc>,
        published: Option<DateTime<Utc>>,
        paced: Option<Instant>,
    ) -> Result<Option<JobResult>, StoreError> {
        let deadline = self.deadline(job, published.unwrap_or(first_seen));
        if deadline.is_some_and(|d| d <= Utc::now()) {
            // Stamped or not, nothing was sent.
            return self.expire(job).await.map(Some);
        }
        let result = self.call_aliyun(job, deadline, paced).await;
        if result.is_err() && lock_std(&self.unrecorded).contains(&job.id) {
            lock_std(&self.gave_up).insert(job.id.clone());
        }
        result
    }

    /// `expires_at` if the job has one; for code jobs, else, the maximum age from `since`: when
    /// the job was published, or first seen by the fleet (so a redelivery does not restart it).
    fn deadline(&self, job: &Job, since: DateTime<Utc>) -> Option<DateTime<Utc>> {
        job.expires_at.or_else(|| {
            let max_age = chrono::Duration::from_std(self.config.code_job_max_age).ok()?;
            job.is_code_job()
                .then(|| since.checked_add_signed(max_age))
                .flatten()
        })
    }

    async fn expire(&self, job: &Job) -> Result<JobResult, StoreError> {
        let outcome = Outcome {
            status: Status::Expired,
            code: "EXPIRED".into(),
            message: "the job's deadline passed before it could be sent; Aliyun was not called"
                .into(),
            biz_id: None,
            request_id: None,
            attempts: 0,
            followup: Followup::None,
        };
        tracing::info!("job expired before it could be sent");
        self.store
            .finish(&job.id, self.worker_id, &outcome, None)
            .await?
            .to_result()
    }

    /// Waits on a job someone else holds (or that is final already): replays a final result,
    /// takes over a stale claim that never reached Aliyun, ends one that may have as `unknown`.
    /// A live owner (one that is still beating, draining included) is waited for.
    async fn wait_for_owner(&self, mut row: JobRow) -> Result<Waited, StoreError> {
        let mut poll = Duration::from_millis(100);
        loop {
            if row.status()?.is_final() {
                tracing::info!(status = %row.status, "job seen before: replaying its stored result");
                return Ok(Waited::Final(row.to_result()?));
            }
            let settled = self
                .store
                .settle_stale(
                    &row.id,
                    self.worker_id,
                    self.config.claim_lease(),
                    self.config.receipts.reconcile_grace,
                )
                .await?;
            match settled {
                Some(Stale::TakenOver(row)) => return Ok(Waited::TakenOver(row)),
                Some(Stale::Interrupted(ended)) => {
                    tracing::warn!(
                        "its worker stopped mid-call (killed, or its shutdown grace ran out): unknown, not repeated"
                    );
                    return Ok(Waited::Final(ended.to_result()?));
                }
                None => {}
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_secs(2));
            row = self.fetch(&row.id).await?;
        }
    }

    /// Writes what happened after Aliyun was called. That knowledge exists nowhere else, so a
    /// database outage is waited out (for as long as the job's claim lasts) rather than turning
    /// a known outcome into `unknown`.
    async fn persist<T, F, Fut>(&self, write: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let give_up = Instant::now() + self.config.job_lease();
        let mut pause = PERSIST_RETRY_MIN;
        loop {
            match write().await {
                Ok(v) => return Ok(v),
                // Waiting does not change what the database refuses.
                Err(e) if e.class() == ErrorClass::Data => return Err(e),
                Err(e) if Instant::now() < give_up && e.class() == ErrorClass::Outage => {
                    tracing::warn!(error = %e, "could not record an Aliyun outcome; waiting for the database");
                    self.health.failed();
                    let left = give_up.saturating_duration_since(Instant::now());
                    let _ = tokio::time::timeout(left, self.health.wait_ok()).await;
                }
                // A deadlock or a serialization failure: the database is fine, and pausing
                // every job's consumption for it would turn one lost race into an outage.
                Err(e) if Instant::now() < give_up => {
                    tracing::warn!(error = %e, "could not record an Aliyun outcome; trying again");
                    tokio::time::sleep(full_jitter(pause)).await;
                    pause = (pause * 2).min(PERSIST_RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The ids of the jobs this process is handling right now; their claims are renewed with
    /// every heartbeat.
    ///
    /// A job whose outcome could not be recorded is not in hand any more, even while a later
    /// delivery of it waits here: its lease must run out so that it ends `unknown`.
    /// Of `in_hand`, the jobs never called in any attempt: not in a call, nor past one and not
    /// yet recorded. (A job enters that set right before its request is sent.)
    pub fn never_called(&self, in_hand: &[String]) -> Vec<String> {
        let called = lock_std(&self.unrecorded);
        in_hand
            .iter()
            .filter(|id| !called.contains(*id))
            .cloned()
            .collect()
    }

    pub fn jobs_in_hand(&self) -> Vec<String> {
        let gave_up = lock_std(&self.gave_up).clone();
        lock_std(&self.local)
            .keys()
            .filter(|id| !gave_up.contains(*id))
            .cloned()
            .collect()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn health(&self) -> &DbHealth {
        &self.health
    }

    pub fn worker_id(&self) -> Uuid {
        self.worker_id
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The fence before each call: the claim is stamped (and its lease renewed) only while this
    /// worker still owns it, and nothing is sent otherwise. The stamp is committed before the
    /// request leaves, so a worker that dies after it is never taken to have not called. It
    /// comes after the rate-limit slot, so a job waiting for its turn is not taken to have
    /// called; a stamp slow enough to make the slot late takes a fresh slot (in `call_aliyun`).
    async fn stamp(&self, job: &Job, attempt: u32) -> Result<bool, StoreError> {
        let stamp = || {
            self.store
                .stamp(&job.id, self.worker_id, self.config.job_lease())
        };
        if attempt == 1 {
            stamp().await
        } else {
            // Earlier attempts were answered "not executed", but waiting out an outage here
            // keeps the job rather than leaving it to be retried from scratch.
            self.persist(stamp).await
        }
    }

    /// The claim is not this worker's any more, so nothing more is sent. Lost before any call:
    /// `None`, the new owner (or the final row) answers. Lost between two attempts: the answer
    /// another worker wrote stands.
    async fn claim_lost(
        &self,
        job: &Job,
        attempt: u32,
        called: bool,
    ) -> Result<Option<JobResult>, StoreError> {
        if !called {
            return Ok(None);
        }
        tracing::warn!(
            attempt,
            "claim lost between two attempts; not calling again"
        );
        lock_std(&self.unrecorded).remove(&job.id);
        self.fetch(&job.id).await?.to_result().map(Some)
    }

    /// One step of making sure, right before a call leaves, that the claim is still this
    /// worker's and stays so while the call goes out. A worker paused (SIGSTOP, a frozen VM, a
    /// stall) between its claim and its call is taken for dead: the fleet ends the claim
    /// `unknown`, and may later reconcile a Dysmsapi send as never sent. Calling after that
    /// sends an SMS the fleet has already answered for. A claim seen to be ours at `confirmed`
    /// stays ours until its lease ends, as long as this worker's heartbeat has kept it from
    /// being judged stale without a break since then (see [`Liveness`]). `Clear` when that
    /// holds for a beat more; otherwise this waits for a fresh beat or confirms the claim again
    /// (renewing its lease) and says `Again`, for the caller to look at its deadline and its
    /// rate-limit slot before the next step; `Lost` when the claim is not ours any more.
    async fn fence(
        &self,
        job: &Job,
        attempt: u32,
        confirmed: &mut Option<Moment>,
        said: &mut bool,
    ) -> Result<Fence, StoreError> {
        let lease = self.config.job_lease();
        // Cover for the request to get out, a new connection included; but never more than
        // three of the five beats, or a healthy worker would wait at every call.
        let beat = self.config.heartbeat;
        let margin = beat
            .max(self.config.aliyun.http.connect_timeout)
            .min(beat * 3);
        if !self.liveness.covers(margin) {
            // This worker's heartbeat is too old to vouch for it: a claim confirmed now could
            // be taken the next moment. A fresh beat first.
            if !std::mem::replace(said, true) {
                tracing::warn!(
                    attempt,
                    "heartbeat late before a call; waiting for the next"
                );
            }
            self.liveness.beat_after(Moment::now()).await;
            return Ok(Fence::Again);
        }
        if confirmed.is_some_and(|at| self.liveness.holds(&at, lease, margin)) {
            return Ok(Fence::Clear);
        }
        let sent = Moment::now();
        if !self.stamp(job, attempt).await? {
            return Ok(Fence::Lost);
        }
        *confirmed = Some(sent);
        Ok(Fence::Again)
    }

    /// Calls Aliyun (with retries) for a job this worker owns, and records the outcome. `None`
    /// when the claim was lost before the first call: nothing was sent.
    /// `paced`: the claim was written stamped right after a slot due at that instant, which
    /// the first attempt uses.
    async fn call_aliyun(
        &self,
        job: &Job,
        deadline: Option<DateTime<Utc>>,
        mut paced: Option<Instant>,
    ) -> Result<Option<JobResult>, StoreError> {
        let plan = plan(job);
        let policy = &self.config.retry;
        let first = Instant::now();
        let mut delays = backoff(policy);
        let mut attempt = 0u32;
        let mut stamped = false;
        let mut skewed = false;
        let (verdict, answer, last_attempt) = loop {
            attempt += 1;
            let started_at = Utc::now();
            let slot = match paced.take() {
                // The claim was written stamped right after this slot.
                Some(slot) => Ok((slot, true)),
                None => self
                    .aliyun
                    .pace(plan.action)
                    .await
                    .map(|_| (Instant::now(), false)),
            };
            let result = match slot {
                // No slot under the fleet's rate limit: nothing was sent, and the claim is not
                // stamped; retried like a call that never left.
                Err(e) => Err(CallError::from(e)),
                Ok((slot, claim_stamped)) => {
                    // When the claim was last seen to be ours: the paced claim was written
                    // stamped after its slot was due (its wall time read back from the
                    // monotonic one; a pause since is caught by the heartbeat's run, see
                    // `fence`).
                    let mut confirmed = claim_stamped.then(|| Moment::before(slot));
                    if !claim_stamped {
                        let sent = Moment::now();
                        if !self.stamp(job, attempt).await? {
                            return self.claim_lost(job, attempt, stamped).await;
                        }
                        confirmed = Some(sent);
                    }
                    // Room for the call is taken here, after the claim and the stamp, so that it
                    // is held for the exchange alone; a slot that went stale meanwhile is
                    // replaced below.
                    let _open = self.aliyun.open_call().await;
                    let mut slot = slot;
                    let mut said = false;
                    let ready = loop {
                        // The waits (for room, a slot, a beat) may have carried the job past its
                        // deadline: nothing has left for this attempt, and a late code is worse
                        // than none.
                        if deadline.is_some_and(|d| d <= Utc::now()) {
                            lock_std(&self.unrecorded).remove(&job.id);
                            return self.expire(job).await.map(Some);
                        }
                        if slot.elapsed() > SLOT_ALLOWANCE {
                            if let Err(e) = self.aliyun.pace(plan.action).await {
                                break Err(CallError::from(e));
                            }
                            slot = Instant::now();
                        }
                        match self.fence(job, attempt, &mut confirmed, &mut said).await? {
                            Fence::Clear => break Ok(()),
                            Fence::Lost => return self.claim_lost(job, attempt, stamped).await,
                            Fence::Again => {}
                        }
                    };
                    match ready {
                        Err(e) => Err(e),
                        Ok(()) => {
                            stamped = true;
                            lock_std(&self.unrecorded).insert(job.id.clone());
                            // Boxed, like the writes below: the HTTP exchange is the largest
                            // state a job goes through, and every job in flight would otherwise
                            // reserve room for it all along.
                            Box::pin(self.aliyun.send(
                                plan.product,
                                plan.action,
                                &plan.params,
                                &plan.form,
                            ))
                            .await
                        }
                    }
                }
            };
            let verdict = match classify(Effect::NotIdempotent, &result) {
                // One re-signed retry: a second expired timestamp is this machine's clock, and
                // every retry would meet it again.
                Verdict::Retry
                    if is_clock_skew(&result) && std::mem::replace(&mut skewed, true) =>
                {
                    Verdict::Failed
                }
                verdict => verdict,
            };
            self.metrics.aliyun_call(plan.action, verdict.as_str());
            let (code, message) = describe(&result);
            let answer = result.as_ref().ok();
            let record = AttemptRecord {
                attempt,
                action: plan.action,
                started_at,
                finished_at: Utc::now(),
                http_status: answer.map(|a| a.http_status),
                code: Some(code),
                message: Some(message),
                request_id: answer.and_then(|a| a.request_id.clone()),
                outcome: verdict.as_str(),
            };
            if verdict != Verdict::Retry {
                break (verdict, result, record);
            }
            let next = delays.next().map(full_jitter);
            let elapsed_after = next.map(|d| first.elapsed() + d);
            // A retry never starts past the job's deadline: a late code is worse than none.
            let before_deadline = next.is_some_and(|d| {
                deadline.is_none_or(|dl| {
                    chrono::Duration::from_std(d)
                        .ok()
                        .and_then(|d| Utc::now().checked_add_signed(d))
                        .and_then(|resume| resume.checked_add_signed(DEADLINE_GUARD))
                        .is_some_and(|resume| resume < dl)
                })
            });
            match elapsed_after {
                Some(at)
                    if attempt < policy.max_attempts
                        && at <= policy.max_elapsed
                        && before_deadline =>
                {
                    self.persist(|| self.store.record_attempt(&job.id, &record))
                        .await?;
                    tracing::info!(attempt, "retryable answer from Aliyun; backing off");
                    self.metrics.aliyun_retry(plan.action);
                    if let Some(d) = next {
                        tokio::time::sleep(d).await;
                    }
                }
                _ => break (verdict, result, record),
            }
        };
        self.metrics.stage(Stage::Aliyun, first.elapsed());
        let mut outcome = final_outcome(job, verdict, &answer, attempt);
        if is_dysmsapi_send(job) {
            let phones = job.phones().iter().map(|p| p.as_str().to_owned()).collect();
            outcome.followup = match outcome.status {
                Status::Sent => Followup::TrackReceipts { phones },
                Status::Unknown => Followup::Reconcile {
                    phones,
                    grace: self.config.receipts.reconcile_grace,
                },
                _ => Followup::None,
            };
        }
        let verify_code = answer
            .as_ref()
            .ok()
            .filter(|_| outcome.status == Status::Sent && wants_verify_code(job))
            .and_then(Answer::verify_code);
        let started = Instant::now();
        let row = self
            .persist(|| {
                self.store
                    .finish(&job.id, self.worker_id, &outcome, Some(&last_attempt))
            })
            .await?;
        self.metrics.stage(Stage::Record, started.elapsed());
        lock_std(&self.unrecorded).remove(&job.id);
        let mut result = row.to_result()?;
        if result.status == outcome.status {
            result.verify_code = verify_code;
        }
        tracing::info!(
            status = %result.status,
            code = %result.code,
            attempts = result.attempts,
            biz_id = result.biz_id.as_deref().unwrap_or(""),
            "job finished"
        );
        Ok(Some(result))
    }
}

/// What [`Pipeline::fence`] found.
enum Fence {
    /// The claim is ours for a beat more: call now.
    Clear,
    /// Ended or taken by another worker: do not call.
    Lost,
    /// It waited or confirmed the claim: look at the deadline and the slot, then again.
    Again,
}

/// Where a job goes next in [`Pipeline::run_job`].
enum Next {
    /// This worker owns the claim; the job was first seen at this time.
    /// `Some` when its claim was written stamped after a slot due then (see
    /// [`Pipeline::pace_before_claim`]).
    Own(DateTime<Utc>, Option<Instant>),
    /// Someone else holds it, or it is final.
    Wait(Box<JobRow>),
}

enum Waited {
    Final(JobResult),
    TakenOver(Box<JobRow>),
}

fn message_id(delivery: &Delivery) -> Option<&str> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str())
}

/// The delivery's reply route without the properties that could not be stored, and why the
/// first of them was refused.
/// The reply route a delivery asks for, and why it cannot be taken, if so. A `reply_to` that
/// names the jobs queue would have the result read back as a job (and answered `invalid`,
/// the only answer its producer would see): such a job is refused before it is sent, and
/// answered on `SMS_RESULTS_QUEUE`.
fn checked_route(delivery: &Delivery, jobs_queue: &str) -> (ReplyRoute, Option<Invalid>) {
    let mut asked = broker::reply_route(delivery);
    let mut refusal = None;
    if asked.reply_to.as_deref() == Some(jobs_queue) {
        asked.reply_to = None;
        refusal = Some(Invalid::new(
            "INVALID_PROPERTY",
            "AMQP property `reply_to` names the jobs queue, where the result would be read as a \
             job; leave it unset (results go to SMS_RESULTS_QUEUE) or name your own queue",
        ));
    }
    let mut keep = |name, value| {
        wire::stored_property(name, value).unwrap_or_else(|e| {
            refusal.get_or_insert(e);
            None
        })
    };
    let route = ReplyRoute {
        reply_to: keep("reply_to", asked.reply_to),
        correlation_id: keep("correlation_id", asked.correlation_id),
    };
    (route, refusal)
}

type LocalLocks = std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// A job id this process is handling; its local lock is forgotten when the last task that
/// wanted it is done.
struct InHand<'a> {
    local: &'a LocalLocks,
    id: &'a str,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        let mut local = lock_std(self.local);
        // Only the map's reference is left: nobody else is waiting for this id.
        if local
            .get(self.id)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            local.remove(self.id);
        }
    }
}

fn lock_std<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another task panicked; the set itself is still sound.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Publishes a job's result, to its `reply_to` or, when that queue is gone, to the results
/// queue, and records (in the background) that it is out. A result that reached no queue
/// stays in the outbox for the fleet's sweeper.
pub async fn publish_result(
    store: &Store,
    broker: &Broker,
    result: &JobResult,
    route: &ReplyRoute,
) -> Result<(), PipelineError> {
    if deliver_result(broker, result, route).await? == Routed::Yes
        && let Some(id) = &result.id
    {
        store.result_published(id, result.finished_at);
    }
    Ok(())
}

/// Publishes a result to its `reply_to`; when that queue is gone, to the results queue, so the
/// result reaches someone. Says whether it reached a queue.
pub async fn deliver_result(
    broker: &Broker,
    result: &JobResult,
    route: &ReplyRoute,
) -> Result<Routed, PipelineError> {
    let routed = broker.publish_result(result, route).await?;
    if routed == Routed::Yes || route.reply_to.is_none() {
        if routed == Routed::NoQueue {
            tracing::error!("result was unroutable: the results queue is gone; kept in the outbox");
        }
        return Ok(routed);
    }
    tracing::warn!(
        reply_to = route.reply_to.as_deref().unwrap_or(""),
        "reply queue is gone: result sent to the results queue instead"
    );
    let fallback = ReplyRoute {
        reply_to: None,
        correlation_id: route.correlation_id.clone(),
    };
    Ok(broker.publish_result(result, &fallback).await?)
}

fn backoff(policy: &RetryPolicy) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(policy.initial_delay)
        .with_max_delay(policy.max_delay)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// "Full jitter": a uniform pick in [0, d], so a burst of throttled jobs spreads out instead
/// of retrying in lockstep.
fn full_jitter(d: Duration) -> Duration {
    rand::rng().random_range(Duration::ZERO..=d)
}

fn is_clock_skew(result: &Result<Answer, CallError>) -> bool {
    result.as_ref().is_ok_and(|a| {
        a.code
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case(outcome::CLOCK_SKEW))
    })
}

/// The code and message recorded for an attempt.
fn describe(result: &Result<Answer, CallError>) -> (String, String) {
    match result {
        Ok(a) => (
            a.code
                .clone()
                .unwrap_or_else(|| codes::BAD_RESPONSE.to_owned()),
            a.message.clone().unwrap_or_default(),
        ),
        Err(e) => (e.code().to_owned(), e.to_string()),
    }
}

fn final_outcome(
    job: &Job,
    verdict: Verdict,
    result: &Result<Answer, CallError>,
    attempts: u32,
) -> Outcome {
    let (mut code, mut message) = describe(result);
    let answer = result.as_ref().ok();
    let status = match verdict {
        // `Code: OK` on a check only means the call worked; the verdict is VerifyResult. Any
        // other answer says nothing of the code typed, and the call may have consumed it.
        Verdict::Success if job.job_type() == JobType::CheckVerifyCode => {
            match answer.and_then(Answer::verify_result) {
                Some(r) if r.eq_ignore_ascii_case("PASS") => Status::Verified,
                Some(r) if r.eq_ignore_ascii_case("UNKNOWN") => Status::NotVerified,
                _ => {
                    code = codes::BAD_RESPONSE.to_owned();
                    message = "Aliyun answered OK without a VerifyResult of PASS or UNKNOWN (the \
                               check may have consumed the code; it is not repeated)"
                        .to_owned();
                    Status::Unknown
                }
            }
        }
        Verdict::Success => Status::Sent,
        Verdict::RateLimited => Status::RateLimited,
        Verdict::Rejected => Status::Rejected,
        Verdict::Failed => {
            if code.eq_ignore_ascii_case(outcome::CLOCK_SKEW) {
                message = format!(
                    "{message} (twice in a row: this machine's clock is more than 15 minutes off)"
                );
            }
            Status::Failed
        }
        Verdict::Unknown => {
            message = format!(
                "{message} (the request may have reached Aliyun; it is not repeated blindly)"
            );
            Status::Unknown
        }
        Verdict::Retry => {
            message = format!("gave up after {attempts} attempts: {message}");
            Status::Failed
        }
    };
    Outcome {
        status,
        code,
        message,
        biz_id: answer.and_then(Answer::biz_id),
        request_id: answer.and_then(|a| a.request_id.clone()),
        attempts,
        followup: Followup::None,
    }
}
