//! `purge`: deleting finished jobs past a retention age, with their attempts and delivery
//! receipts (the foreign keys cascade).
//!
//! A job still `sending` is never touched: its worker may be mid-call and will write its
//! outcome. Neither is an `unknown` Dysmsapi send still being reconciled. Deletes go in small
//! batches, each its own short statement, so the worker's claims never wait long on a lock; rows
//! a worker holds right now are skipped (`SKIP LOCKED`).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::Store;

/// The jobs a purge with cutoff `$1` may delete, as one SELECT of their ids: `count` and
/// `purge` must agree on it. `created_at < $1` follows from the finish time (a job finishes
/// after it is created) and lets the created_at index find the candidates.
macro_rules! purgeable_ids {
    () => {
        "SELECT id FROM sms_jobs
         WHERE status <> 'sending'
           AND created_at < $1
           AND coalesce(finished_at, created_at) < $1
           AND NOT (status = 'unknown' AND reconcile_until IS NOT NULL
                    AND reconcile_until > now())"
    };
}

/// Rows per delete statement by default.
pub const DEFAULT_BATCH: i64 = 1000;
/// A purged id can be published again and would be sent again: the job row is the idempotency
/// record. A day keeps every redelivery and every retrying backend well inside it.
pub const MIN_AGE: Duration = Duration::from_secs(86_400);

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(
        "refusing to purge jobs younger than 1d: a job's row is what makes a re-published id answer instead of sending again"
    )]
    TooYoung,
    #[error("age {0:?} is too large")]
    TooOld(Duration),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub jobs: i64,
    pub attempts: i64,
    pub deliveries: i64,
    pub batches: u32,
}

/// Jobs finished (or, without a finish time, created) before this instant are purged.
pub fn cutoff(age: Duration) -> Result<DateTime<Utc>, RetentionError> {
    if age < MIN_AGE {
        return Err(RetentionError::TooYoung);
    }
    let age_chrono = chrono::Duration::from_std(age).map_err(|_| RetentionError::TooOld(age))?;
    Utc::now()
        .checked_sub_signed(age_chrono)
        .ok_or(RetentionError::TooOld(age))
}

/// What `purge` would delete: counted, nothing changed.
pub async fn count(store: &Store, cutoff: DateTime<Utc>) -> Result<Purged, RetentionError> {
    let (jobs, attempts, deliveries): (i64, i64, i64) = sqlx::query_as(concat!(
        "WITH doomed AS (",
        purgeable_ids!(),
        ")
         SELECT (SELECT count(*) FROM doomed),
                (SELECT count(*) FROM sms_attempts WHERE job_id IN (SELECT id FROM doomed)),
                (SELECT count(*) FROM sms_deliveries WHERE job_id IN (SELECT id FROM doomed))"
    ))
    .bind(cutoff)
    .fetch_one(store.pool())
    .await?;
    Ok(Purged {
        jobs,
        attempts,
        deliveries,
        batches: 0,
    })
}

/// Deletes in batches of `batch` jobs until none is left.
pub async fn purge(
    store: &Store,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> Result<Purged, RetentionError> {
    let mut total = Purged::default();
    loop {
        // One statement per batch: the children are counted from the same snapshot the
        // delete works on, and the cascade removes them with their job.
        let (jobs, attempts, deliveries): (i64, i64, i64) = sqlx::query_as(concat!(
            "WITH doomed AS (",
            purgeable_ids!(),
            "
                 ORDER BY created_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED),
             children AS (
                 SELECT (SELECT count(*) FROM sms_attempts
                         WHERE job_id IN (SELECT id FROM doomed)) AS attempts,
                        (SELECT count(*) FROM sms_deliveries
                         WHERE job_id IN (SELECT id FROM doomed)) AS deliveries),
             gone AS (
                 DELETE FROM sms_jobs WHERE id IN (SELECT id FROM doomed) RETURNING 1)
             SELECT (SELECT count(*) FROM gone), attempts, deliveries FROM children"
        ))
        .bind(cutoff)
        .bind(batch.max(1))
        .fetch_one(store.pool())
        .await?;
        if jobs == 0 {
            return Ok(total);
        }
        total.jobs += jobs;
        total.attempts += attempts;
        total.deliveries += deliveries;
        total.batches += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ages_are_refused() {
        assert!(matches!(
            cutoff(Duration::from_secs(3600)),
            Err(RetentionError::TooYoung)
        ));
        let c = cutoff(Duration::from_secs(90 * 86_400)).unwrap();
        let days = (Utc::now() - c).num_days();
        assert_eq!(days, 90);
        assert!(cutoff(Duration::from_secs(u64::MAX / 2)).is_err());
    }
}
