//! What operators ask of the tables: lists, one job in full, counts. Filters are bound
//! parameters (`$n IS NULL OR …`), never spliced into the SQL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{Store, StoreError};

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<String>,
    pub phone: Option<String>,
    pub job_type: Option<String>,
    pub code: Option<String>,
    pub since: Option<Duration>,
    pub limit: i64,
}

/// A job with its attempts and deliveries, as JSON objects of their rows.
#[derive(Debug, Clone)]
pub struct JobDetail {
    pub job: Value,
    pub attempts: Vec<Value>,
    pub deliveries: Vec<Value>,
}

#[derive(Debug, Clone)]
pub struct Stats {
    /// (type, status, count)
    pub by_status: Vec<(String, String, i64)>,
    /// (code, count) of jobs that did not end well, most frequent first.
    pub top_codes: Vec<(String, i64)>,
    pub total: i64,
}

/// Jobs created in one minute, for the status page's chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinuteCount {
    /// 0 is the minute up to now, 1 the one before, and so on.
    pub minutes_ago: i32,
    /// Aliyun did what was asked: `sent`, `verified`, `not_verified`.
    pub succeeded: i64,
    /// Ended any other final way (refused, failed, unknown, rate limited, invalid, expired).
    pub failed: i64,
}

/// A worker process as its heartbeats show it, with the `sending` claims it holds: a live one,
/// or one that looks dead but still holds claims (what an operator must look at).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FleetWorker {
    pub id: Uuid,
    /// `None` when claims name a worker that has no `sms_workers` row at all.
    pub name: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// Since the last beat, by the database's clock (the reader's may be off).
    pub heartbeat_age_ms: Option<i64>,
    /// The interval the worker itself beats at; 5 of them without a beat and it is dead.
    pub heartbeat_ms: Option<i32>,
    /// Set when it began draining after SIGTERM.
    pub stopping_at: Option<DateTime<Utc>>,
    pub live: bool,
    /// Jobs `sending` under its claim.
    pub held: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Live,
    /// Alive, finishing what it holds, taking nothing new.
    Draining,
    /// Silent for 5 of its beats (or never seen) while still holding claims.
    Dead,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Live => "live",
            WorkerState::Draining => "draining",
            WorkerState::Dead => "dead",
        }
    }
}

impl FleetWorker {
    pub fn state(&self) -> WorkerState {
        match (self.live, self.stopping_at) {
            (false, _) => WorkerState::Dead,
            (true, Some(_)) => WorkerState::Draining,
            (true, None) => WorkerState::Live,
        }
    }

    /// The id as operators quote it: enough to tell the fleet's workers apart.
    pub fn short_id(&self) -> String {
        self.id.simple().to_string().chars().take(8).collect()
    }
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

/// A job as lists show it, as one JSON object (a macro, so queries stay static strings).
macro_rules! job_summary {
    () => {
        "jsonb_build_object(
             'id', id, 'type', type, 'status', status, 'phone_number', phone_number,
             'code', code, 'message', message, 'biz_id', biz_id,
             'attempts', attempts, 'created_at', created_at,
             'finished_at', finished_at)"
    };
}

impl Store {
    pub async fn list_jobs(&self, f: &JobFilter) -> Result<Vec<Value>, StoreError> {
        let rows: Vec<(Value,)> = sqlx::query_as(concat!(
            "SELECT ",
            job_summary!(),
            "
             FROM sms_jobs
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::text IS NULL OR phone_number = $2)
               AND ($3::text IS NULL OR type = $3)
               AND ($4::text IS NULL OR code = $4)
               AND ($5::double precision IS NULL
                    OR created_at > now() - make_interval(secs => $5))
             ORDER BY created_at DESC
             LIMIT $6"
        ))
        .bind(&f.status)
        .bind(&f.phone)
        .bind(&f.job_type)
        .bind(&f.code)
        .bind(secs(f.since))
        .bind(f.limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// The jobs an operator's search names, newest first: those sent to `phone` (a batch's
    /// first number is on the job, all of its numbers on its delivery rows) and the job `id`;
    /// only when none is found, the jobs whose id starts with `id`.
    pub async fn search_jobs(
        &self,
        phone: Option<&str>,
        id: &str,
        limit: i64,
    ) -> Result<Vec<Value>, StoreError> {
        // A union of index lookups: an `OR` across the two tables would scan them.
        let rows: Vec<(Value,)> = sqlx::query_as(concat!(
            "SELECT ",
            job_summary!(),
            "
             FROM sms_jobs
             WHERE id IN (SELECT $2::text
                          UNION SELECT id FROM sms_jobs WHERE phone_number = $1
                          UNION SELECT job_id FROM sms_deliveries WHERE phone_number = $1)
             ORDER BY created_at DESC
             LIMIT $3"
        ))
        .bind(phone)
        .bind(id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        if !rows.is_empty() {
            return Ok(rows.into_iter().map(|r| r.0).collect());
        }
        // No index serves a prefix under every collation; walking the newest jobs first stops
        // as soon as `limit` match (`purge` keeps the table bounded).
        let rows: Vec<(Value,)> = sqlx::query_as(concat!(
            "SELECT ",
            job_summary!(),
            "
             FROM sms_jobs
             WHERE starts_with(id, $1)
             ORDER BY created_at DESC
             LIMIT $2"
        ))
        .bind(id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    pub async fn job_detail(&self, id: &str) -> Result<Option<JobDetail>, StoreError> {
        let job: Option<(Value,)> = sqlx::query_as(
            "SELECT to_jsonb(j) - 'claimed_by' - 'lease_until' FROM sms_jobs j WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        let Some((job,)) = job else {
            return Ok(None);
        };
        let attempts: Vec<(Value,)> = sqlx::query_as(
            "SELECT to_jsonb(a) - 'job_id' ||
                    jsonb_build_object('duration_ms',
                        round(extract(epoch FROM finished_at - started_at) * 1000))
             FROM sms_attempts a WHERE job_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        let deliveries: Vec<(Value,)> = sqlx::query_as(
            "SELECT to_jsonb(d) - 'job_id' FROM sms_deliveries d
             WHERE job_id = $1 ORDER BY phone_number",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        Ok(Some(JobDetail {
            job,
            attempts: attempts.into_iter().map(|r| r.0).collect(),
            deliveries: deliveries.into_iter().map(|r| r.0).collect(),
        }))
    }

    pub async fn stats(&self, since: Duration) -> Result<Stats, StoreError> {
        let since = since.as_secs_f64();
        let by_status: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT type, status, count(*) FROM sms_jobs
             WHERE created_at > now() - make_interval(secs => $1)
             GROUP BY type, status ORDER BY type, count(*) DESC",
        )
        .bind(since)
        .fetch_all(self.pool())
        .await?;
        let top_codes: Vec<(String, i64)> = sqlx::query_as(
            "SELECT code, count(*) FROM sms_jobs
             WHERE created_at > now() - make_interval(secs => $1)
               AND status NOT IN ('sent', 'verified', 'sending') AND code IS NOT NULL
             GROUP BY code ORDER BY count(*) DESC LIMIT 10",
        )
        .bind(since)
        .fetch_all(self.pool())
        .await?;
        let total = by_status.iter().map(|r| r.2).sum();
        Ok(Stats {
            by_status,
            top_codes,
            total,
        })
    }

    /// The live workers and every worker that looks dead but still holds `sending` claims,
    /// dead ones first. Liveness is judged by each worker's own beat interval.
    pub async fn fleet(&self) -> Result<Vec<FleetWorker>, StoreError> {
        Ok(sqlx::query_as::<_, FleetWorker>(
            "WITH held AS (
                 SELECT claimed_by AS id, count(*) AS n FROM sms_jobs
                 WHERE status = 'sending' AND claimed_by IS NOT NULL
                 GROUP BY claimed_by
             ), workers AS (
                 SELECT w.*, w.heartbeat_at > now() - 5 * w.heartbeat_ms * interval '1 millisecond'
                             AS live
                 FROM sms_workers w
             )
             SELECT coalesce(w.id, h.id) AS id, w.name, w.started_at, w.heartbeat_at,
                    (extract(epoch FROM now() - w.heartbeat_at) * 1000)::bigint AS heartbeat_age_ms,
                    w.heartbeat_ms, w.stopping_at,
                    coalesce(w.live, false) AS live, coalesce(h.n, 0) AS held
             FROM workers w FULL JOIN held h ON h.id = w.id
             WHERE coalesce(w.live, false) OR h.n > 0
             ORDER BY live, w.started_at NULLS FIRST, id",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Jobs per minute over `window`, by whether they succeeded; minutes without jobs are left
    /// out. Jobs still `sending` are in neither count.
    pub async fn jobs_per_minute(&self, window: Duration) -> Result<Vec<MinuteCount>, StoreError> {
        let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
            "SELECT floor(extract(epoch FROM now() - created_at) / 60)::int AS ago,
                    count(*) FILTER (WHERE status IN ('sent', 'verified', 'not_verified')),
                    count(*) FILTER (WHERE status NOT IN
                                       ('sent', 'verified', 'not_verified', 'sending'))
             FROM sms_jobs
             WHERE created_at > now() - make_interval(secs => $1)
             GROUP BY ago ORDER BY ago",
        )
        .bind(window.as_secs_f64())
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(minutes_ago, succeeded, failed)| MinuteCount {
                minutes_ago,
                succeeded,
                failed,
            })
            .collect())
    }
}
