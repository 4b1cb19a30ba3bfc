//! Postgres: the job's claim, its attempts and its final outcome.
//!
//! The row is the idempotency record. A job is only ever sent by the worker that inserted (or
//! re-claimed) its row as `sending`, and the outcome is written back only by that worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::config::NumberLimits;
use crate::wire::{Job, JobResult, Status};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("row for job {0} has an unknown status {1:?}")]
    CorruptStatus(String, String),
    /// A batched write failed for every job in it alike (say, the connection dropped).
    #[error("{0}")]
    Shared(Arc<StoreError>),
    #[error("the database writer stopped")]
    WriterGone,
}

/// The migrations this binary carries (`migrate` applies them, `check-config` compares).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Where a job's result goes, taken from the delivery's AMQP properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyRoute {
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

/// A `sms_jobs` row as the pipeline needs it.
#[derive(Debug, Clone, FromRow)]
pub struct JobRow {
    pub id: String,
    #[sqlx(rename = "type")]
    pub job_type: String,
    pub status: String,
    pub biz_id: Option<String>,
    pub request_id: Option<String>,
    pub code: Option<String>,
    pub message: Option<String>,
    pub attempts: i32,
    pub claimed_by: Option<Uuid>,
    pub lease_until: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

impl JobRow {
    pub fn status(&self) -> Result<Status, StoreError> {
        self.status
            .parse()
            .map_err(|_| StoreError::CorruptStatus(self.id.clone(), self.status.clone()))
    }

    /// The stored result, as it was first published (minus any verification code).
    pub fn to_result(&self) -> Result<JobResult, StoreError> {
        Ok(JobResult {
            id: Some(self.id.clone()),
            job_type: Some(self.job_type.clone()),
            status: self.status()?,
            code: self.code.clone().unwrap_or_default(),
            message: self.message.clone().unwrap_or_default(),
            biz_id: self.biz_id.clone(),
            request_id: self.request_id.clone(),
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            finished_at: self.finished_at.unwrap_or_else(Utc::now),
            verify_code: None,
        })
    }

    pub fn route(&self) -> ReplyRoute {
        ReplyRoute {
            reply_to: self.reply_to.clone(),
            correlation_id: self.correlation_id.clone(),
        }
    }
}

/// What claiming a job id found.
#[derive(Debug)]
pub enum Claim {
    /// This worker now owns the `sending` row and may call Aliyun.
    Owned,
    /// Someone already finished it: replay, don't call.
    Seen(Box<JobRow>),
}

/// One Aliyun call, as recorded in `sms_attempts`.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub action: &'static str,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub http_status: Option<u16>,
    pub code: Option<String>,
    pub message: Option<String>,
    pub request_id: Option<String>,
    pub outcome: &'static str,
}

/// The final outcome written back to the row.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    pub code: String,
    pub message: String,
    pub biz_id: Option<String>,
    pub request_id: Option<String>,
    pub attempts: u32,
    pub followup: Followup,
}

/// What happens to a Dysmsapi send after its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followup {
    None,
    /// Sent: poll the carrier receipt of each number.
    TrackReceipts {
        phones: Vec<String>,
    },
    /// Unknown: look the send up by OutId until `grace` has passed.
    Reconcile {
        phones: Vec<String>,
        grace: Duration,
    },
}

/// The columns of [`JobRow`], spelled once for every SELECT and RETURNING.
macro_rules! job_columns {
    () => {
        "id, type, status, biz_id, request_id, code, message, attempts, claimed_by, \
         lease_until, finished_at, reply_to, correlation_id"
    };
}

/// The INSERT of attempts, from the ten arrays of [`AttemptArrays`] bound as `$1`..`$10`.
/// An attempt already recorded stays as it was.
macro_rules! insert_attempts_sql {
    () => {
        "INSERT INTO sms_attempts (job_id, attempt, action, started_at, finished_at,
                                   http_status, code, message, request_id, outcome)
         SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::timestamptz[],
                              $5::timestamptz[], $6::int[], $7::text[], $8::text[],
                              $9::text[], $10::text[])
         ON CONFLICT (job_id, attempt) DO NOTHING"
    };
}

/// Binds an [`AttemptArrays`] as the first ten parameters of a query or query_as.
macro_rules! bind_attempts {
    ($query:expr, $a:expr) => {
        $query
            .bind(&$a.job_ids)
            .bind(&$a.numbers)
            .bind(&$a.actions)
            .bind(&$a.started)
            .bind(&$a.finished)
            .bind(&$a.http)
            .bind(&$a.codes)
            .bind(&$a.messages)
            .bind(&$a.request_ids)
            .bind(&$a.outcomes)
    };
}

mod batch;
use batch::ClaimReq;
mod deliveries;
mod rate;
mod reports;
pub use deliveries::{DeliveryRow, ReceiptUpdate, ReconcileRow, china_time};
pub use reports::{JobDetail, JobFilter, MinuteCount, Stats};

/// Attempts of many jobs, as one array per column.
#[derive(Default)]
struct AttemptArrays<'a> {
    job_ids: Vec<&'a str>,
    numbers: Vec<i32>,
    actions: Vec<&'static str>,
    started: Vec<DateTime<Utc>>,
    finished: Vec<DateTime<Utc>>,
    http: Vec<Option<i32>>,
    codes: Vec<Option<&'a str>>,
    messages: Vec<Option<&'a str>>,
    request_ids: Vec<Option<&'a str>>,
    outcomes: Vec<&'static str>,
}

impl<'a> AttemptArrays<'a> {
    fn push(&mut self, job_id: &'a str, a: &'a AttemptRecord) {
        self.job_ids.push(job_id);
        self.numbers
            .push(i32::try_from(a.attempt).unwrap_or(i32::MAX));
        self.actions.push(a.action);
        self.started.push(a.started_at);
        self.finished.push(a.finished_at);
        self.http.push(a.http_status.map(i32::from));
        self.codes.push(a.code.as_deref());
        self.messages.push(a.message.as_deref());
        self.request_ids.push(a.request_id.as_deref());
        self.outcomes.push(a.outcome);
    }
}

/// The rows of `ids`, by id; ids without a row are absent.
async fn fetch_many(
    conn: &mut PgConnection,
    ids: &[&str],
) -> Result<HashMap<String, JobRow>, StoreError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<JobRow> = sqlx::query_as(concat!(
        "SELECT ",
        job_columns!(),
        " FROM sms_jobs WHERE id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id.clone(), r)).collect())
}

/// The single answer of a one-job batch.
fn one<T>(mut answers: Vec<T>) -> Result<T, StoreError> {
    answers
        .pop()
        .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// Group commits for claims and outcomes; see [`Store::batched`].
    writer: Option<Arc<batch::Writer>>,
}

impl Store {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // Short, so an outage is noticed quickly; the health probe does the waiting. Jobs
            // share their writes (see `batch`), so a wait for a free connection is rare and a
            // second without one means the database is gone: sqlx keeps retrying a refused
            // connection until this runs out, and no other error would come sooner.
            .acquire_timeout(Duration::from_secs(1))
            .connect_with(options)
            .await?;
        Ok(Self::from_pool(pool))
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool, writer: None }
    }

    /// This store, with claims and outcomes of concurrent jobs written in shared transactions
    /// (see `store::batch`). For the worker, where hundreds of jobs are in flight.
    pub fn batched(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            writer: Some(Arc::new(batch::Writer::spawn(self.pool.clone()))),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Inserts the job as `sending`, or finds the row that is already there.
    ///
    /// A row left `invalid` may be re-claimed: an invalid message never reached Aliyun, so a
    /// corrected job with the same id is a first attempt, not a duplicate.
    pub async fn claim(
        &self,
        job: &Job,
        route: &ReplyRoute,
        worker: Uuid,
        lease: Duration,
        limits: Option<&NumberLimits>,
    ) -> Result<Claim, StoreError> {
        let req = ClaimReq::new(job, route, worker, lease);
        let Some(limits) = limits else {
            if let Some(writer) = &self.writer {
                return writer.claim(req).await;
            }
            let mut conn = self.pool.acquire().await?;
            // Boxed here and below: these statements' futures are kilobytes, and every job in
            // flight would otherwise carry room for them while it waits on the batched path.
            return one(Box::pin(batch::claim_together(&mut conn, &[req])).await?);
        };
        Box::pin(self.claim_limited(job, req, limits)).await
    }

    /// A claim under the local per-number limit: counted and written in one transaction.
    async fn claim_limited(
        &self,
        job: &Job,
        req: ClaimReq,
        limits: &NumberLimits,
    ) -> Result<Claim, StoreError> {
        // Serialise the sends to one number across every worker, so two instances cannot both
        // pass the count; the lock ends with the transaction.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("smsw-number:{}", job.phone().as_str()))
            .execute(&mut *tx)
            .await?;
        let mut refusal = None;
        for (window, max) in &limits.windows {
            let (recent,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM sms_jobs
                 WHERE phone_number = $1 AND type = $2 AND id <> $3
                   AND status IN ('sending', 'sent', 'unknown')
                   AND created_at > now() - make_interval(secs => $4::double precision / 1000)",
            )
            .bind(job.phone().as_str())
            .bind(job.job_type().as_str())
            .bind(&job.id)
            .bind(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
            .fetch_one(&mut *tx)
            .await?;
            if recent >= i64::from(*max) {
                refusal = Some(format!(
                    "local per-number limit: {max} per {}s reached for this number; not sent",
                    window.as_secs()
                ));
                break;
            }
        }
        let req = match refusal {
            Some(why) => req.refused(why),
            None => req,
        };
        let claim = one(batch::claim_together(&mut tx, &[req]).await?)?;
        tx.commit().await?;
        Ok(claim)
    }

    pub async fn fetch(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        Ok(sqlx::query_as::<_, JobRow>(concat!(
            "SELECT ",
            job_columns!(),
            " FROM sms_jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn record_attempt(&self, job_id: &str, a: &AttemptRecord) -> Result<(), StoreError> {
        let mut arrays = AttemptArrays::default();
        arrays.push(job_id, a);
        bind_attempts!(sqlx::query(insert_attempts_sql!()), arrays)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Writes the outcome of a job this worker owns. If the claim was lost meanwhile (another
    /// worker declared it interrupted), the row already holds a final answer and that one is
    /// returned instead, so every result message for a job says the same thing.
    ///
    /// `last_attempt`, the call that decided the outcome, is recorded in the same transaction:
    /// one commit fewer per job.
    pub async fn finish(
        &self,
        job_id: &str,
        worker: Uuid,
        o: &Outcome,
        last_attempt: Option<&AttemptRecord>,
    ) -> Result<JobRow, StoreError> {
        let req = batch::FinishReq {
            job_id: job_id.to_owned(),
            worker,
            outcome: o.clone(),
            last_attempt: last_attempt.cloned(),
        };
        match &self.writer {
            Some(writer) => writer.finish(req).await,
            None => one(Box::pin(batch::finish_together(&self.pool, &[req])).await?)?,
        }
    }

    /// Ends a job whose `sending` claim is dead — its lease ran out, or its worker stopped
    /// beating for `stale` — because that worker died while Aliyun may have been called: the
    /// only honest answer is `unknown`.
    /// An interrupted Dysmsapi send is then reconciled for `reconcile_grace`.
    pub async fn interrupt_if_stale(
        &self,
        job_id: &str,
        stale: Duration,
        reconcile_grace: Duration,
    ) -> Result<Option<JobRow>, StoreError> {
        Ok(sqlx::query_as::<_, JobRow>(concat!(
            "UPDATE sms_jobs SET status = 'unknown', code = 'WORKER_INTERRUPTED',
                    message = 'the worker stopped while this job was being sent; it may or may not have reached Aliyun and is not repeated',
                    finished_at = now(), updated_at = now(), lease_until = NULL,
                    reconcile_until = CASE WHEN type IN ('send_sms', 'send_batch_sms')
                                           THEN now() + make_interval(secs => $3::double precision / 1000) END,
                    next_reconcile_at = CASE WHEN type IN ('send_sms', 'send_batch_sms')
                                             THEN now() END
             WHERE id = $1 AND status = 'sending'
               AND (lease_until <= now()
                    OR NOT EXISTS (SELECT 1 FROM sms_workers w
                                   WHERE w.id = sms_jobs.claimed_by
                                     AND w.heartbeat_at > now() - make_interval(secs => $2::double precision / 1000)))
             RETURNING ",
            job_columns!()
        ))
        .bind(job_id)
        .bind(i64::try_from(stale.as_millis()).unwrap_or(i64::MAX))
        .bind(i64::try_from(reconcile_grace.as_millis()).unwrap_or(i64::MAX))
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Announces (or renews) this worker process; see [`Self::interrupt_if_stale`].
    pub async fn heartbeat(&self, worker: Uuid, name: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sms_workers (id, name) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
        )
        .bind(worker)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A clean stop: this worker holds no claims any more.
    pub async fn retire(&self, worker: Uuid) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sms_workers WHERE id = $1")
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a message that failed validation, when it carried an id, so operators find it.
    /// A real job already stored under that id is left alone.
    pub async fn record_invalid(
        &self,
        id: &str,
        job_type: Option<&str>,
        route: &ReplyRoute,
        code: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sms_jobs (id, type, status, reply_to, correlation_id, code, message,
                                   finished_at)
             VALUES ($1, $2, 'invalid', $3, $4, $5, $6, now())
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(job_type.unwrap_or(""))
        .bind(&route.reply_to)
        .bind(&route.correlation_id)
        .bind(code)
        .bind(message)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
