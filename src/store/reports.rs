//! What operators ask of the tables: lists, one job in full, counts. Filters are bound
//! parameters (`$n IS NULL OR …`), never spliced into the SQL.

use std::time::Duration;

use serde_json::Value;

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

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

impl Store {
    pub async fn list_jobs(&self, f: &JobFilter) -> Result<Vec<Value>, StoreError> {
        let rows: Vec<(Value,)> = sqlx::query_as(
            "SELECT jsonb_build_object(
                        'id', id, 'type', type, 'status', status, 'phone_number', phone_number,
                        'code', code, 'message', message, 'biz_id', biz_id,
                        'attempts', attempts, 'created_at', created_at,
                        'finished_at', finished_at)
             FROM sms_jobs
             WHERE ($1::text IS NULL OR status = $1)
               AND ($2::text IS NULL OR phone_number = $2)
               AND ($3::text IS NULL OR type = $3)
               AND ($4::text IS NULL OR code = $4)
               AND ($5::double precision IS NULL
                    OR created_at > now() - make_interval(secs => $5))
             ORDER BY created_at DESC
             LIMIT $6",
        )
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
