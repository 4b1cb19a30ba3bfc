//! Delivery receipts and the reconciliation of unknown sends.
//!
//! Both are work queues in Postgres: rows are claimed with `FOR UPDATE SKIP LOCKED` and pushed
//! forward (`next_check_at`, `next_reconcile_at`) in the same statement, so several workers
//! share the polling without asking Aliyun twice about one number.

use std::time::Duration;

use chrono::{DateTime, FixedOffset, NaiveDate, Offset, Utc};
use sqlx::{FromRow, Postgres, Transaction};

use super::{JobRow, Store, StoreError, millis};

/// China Standard Time: QuerySendDetails' `SendDate` and `ReceiveDate` are in it.
pub fn china_time() -> FixedOffset {
    // UTC+8 is always a valid offset; the fallback only keeps this free of panics.
    FixedOffset::east_opt(8 * 3600).unwrap_or(Utc.fix())
}

/// A number whose receipt is due for a check.
#[derive(Debug, Clone, FromRow)]
pub struct DeliveryRow {
    pub job_id: String,
    pub phone_number: String,
    pub biz_id: Option<String>,
    pub out_id: Option<String>,
    pub send_date: NaiveDate,
    pub checks: i32,
}

/// A receipt that turned final, for the event.
#[derive(Debug, Clone, FromRow)]
pub struct ReceiptUpdate {
    pub job_id: String,
    pub phone_number: String,
    pub biz_id: Option<String>,
    pub out_id: Option<String>,
    pub delivery_status: String,
    pub err_code: Option<String>,
    pub received_at: Option<DateTime<Utc>>,
}

/// An unknown send due for a lookup by OutId.
#[derive(Debug, Clone, FromRow)]
pub struct ReconcileRow {
    pub id: String,
    pub out_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub reconcile_until: DateTime<Utc>,
    /// The numbers of the send (one lookup is enough: all share the OutId).
    pub phone_number: Option<String>,
}

pub(super) async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    job_id: &str,
    phones: &[String],
    biz_id: Option<&str>,
) -> Result<(), StoreError> {
    let send_date = Utc::now().with_timezone(&china_time()).date_naive();
    sqlx::query(
        "INSERT INTO sms_deliveries (job_id, phone_number, biz_id, out_id, send_date)
         SELECT $1, phone, $3, (SELECT out_id FROM sms_jobs WHERE id = $1), $4
         FROM unnest($2::text[]) AS phone
         ON CONFLICT (job_id, phone_number) DO UPDATE SET biz_id = EXCLUDED.biz_id",
    )
    .bind(job_id)
    .bind(phones)
    .bind(biz_id)
    .bind(send_date)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Claims up to `limit` receipts to check now, hiding them from other pollers for `lease`.
    /// Only sends that are `sent` are polled; unknown ones are reconciled first.
    pub async fn claim_due_receipts(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        let _watched = self.watched("receipts");
        Ok(sqlx::query_as::<_, DeliveryRow>(
            "UPDATE sms_deliveries d
             SET next_check_at = now() + make_interval(secs => $2::double precision / 1000)
             WHERE (d.job_id, d.phone_number) IN (
                 SELECT x.job_id, x.phone_number FROM sms_deliveries x
                 JOIN sms_jobs j ON j.id = x.job_id AND j.status = 'sent'
                 WHERE x.delivery_status = 'waiting' AND x.next_check_at <= now()
                 ORDER BY x.next_check_at
                 LIMIT $1
                 FOR UPDATE OF x SKIP LOCKED)
             RETURNING d.job_id, d.phone_number, d.biz_id, d.out_id, d.send_date, d.checks",
        )
        .bind(limit)
        .bind(millis(lease))
        .fetch_all(self.pool())
        .await?)
    }

    /// Still waiting: check again after `delay` (which the caller grows with `checks`).
    pub async fn reschedule_receipt(
        &self,
        job_id: &str,
        phone: &str,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let _watched = self.watched("receipts");
        sqlx::query(
            "UPDATE sms_deliveries SET checks = checks + 1, updated_at = now(),
                    next_check_at = now() + make_interval(secs => $3::double precision / 1000)
             WHERE job_id = $1 AND phone_number = $2",
        )
        .bind(job_id)
        .bind(phone)
        .bind(millis(delay))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records a final receipt; returns it for the event unless another poller got there first.
    pub async fn record_receipt(
        &self,
        job_id: &str,
        phone: &str,
        delivered: bool,
        err_code: Option<&str>,
        received_at: Option<DateTime<Utc>>,
    ) -> Result<Option<ReceiptUpdate>, StoreError> {
        let _watched = self.watched("receipts");
        Ok(sqlx::query_as::<_, ReceiptUpdate>(
            "UPDATE sms_deliveries SET delivery_status = $3, err_code = $4, received_at = $5,
                    checks = checks + 1, updated_at = now()
             WHERE job_id = $1 AND phone_number = $2 AND delivery_status = 'waiting'
             RETURNING job_id, phone_number, biz_id, out_id, delivery_status, err_code,
                       received_at",
        )
        .bind(job_id)
        .bind(phone)
        .bind(if delivered { "delivered" } else { "failed" })
        .bind(err_code)
        .bind(received_at)
        .fetch_optional(self.pool())
        .await?)
    }

    pub async fn mark_receipt_published(
        &self,
        job_id: &str,
        phone: &str,
    ) -> Result<(), StoreError> {
        let _watched = self.watched("receipts");
        sqlx::query(
            "UPDATE sms_deliveries SET event_published_at = now()
             WHERE job_id = $1 AND phone_number = $2",
        )
        .bind(job_id)
        .bind(phone)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Final receipts whose event could not be published (broker down at the time).
    pub async fn unpublished_receipts(&self, limit: i64) -> Result<Vec<ReceiptUpdate>, StoreError> {
        let _watched = self.watched("receipts");
        Ok(sqlx::query_as::<_, ReceiptUpdate>(
            "SELECT job_id, phone_number, biz_id, out_id, delivery_status, err_code, received_at
             FROM sms_deliveries
             WHERE delivery_status <> 'waiting' AND event_published_at IS NULL
             ORDER BY updated_at LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Claims unknown Dysmsapi sends due for a lookup.
    pub async fn claim_due_reconciliations(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<ReconcileRow>, StoreError> {
        let _watched = self.watched("reconciliation");
        Ok(sqlx::query_as::<_, ReconcileRow>(
            "UPDATE sms_jobs j
             SET next_reconcile_at = now() + make_interval(secs => $2::double precision / 1000)
             WHERE j.id IN (
                 SELECT id FROM sms_jobs
                 WHERE status = 'unknown' AND reconcile_until IS NOT NULL
                   AND next_reconcile_at <= now()
                 ORDER BY next_reconcile_at
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED)
             RETURNING j.id, j.out_id, j.created_at, j.reconcile_until,
                       COALESCE((SELECT min(phone_number) FROM sms_deliveries d
                                 WHERE d.job_id = j.id), j.phone_number) AS phone_number",
        )
        .bind(limit)
        .bind(millis(lease))
        .fetch_all(self.pool())
        .await?)
    }

    /// Not found yet: look again after `delay`, but within the grace period no later than its
    /// end (when a last lookup decides); past it, after `delay`.
    pub async fn reschedule_reconcile(
        &self,
        job_id: &str,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let _watched = self.watched("reconciliation");
        sqlx::query(
            // LEAST skips the NULL a past grace period gives.
            "UPDATE sms_jobs SET next_reconcile_at = LEAST(
                    now() + make_interval(secs => $2::double precision / 1000),
                    CASE WHEN reconcile_until > now() THEN reconcile_until END)
             WHERE id = $1 AND status = 'unknown'",
        )
        .bind(job_id)
        .bind(millis(delay))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The unknown send was found at Aliyun: it is `sent`, and its receipts get polled.
    pub async fn reconciled_as_sent(
        &self,
        job_id: &str,
        biz_id: Option<&str>,
    ) -> Result<Option<JobRow>, StoreError> {
        let _watched = self.watched("reconciliation");
        let mut tx = self.pool().begin().await?;
        let row = sqlx::query_as::<_, JobRow>(concat!(
            "UPDATE sms_jobs SET status = 'sent', code = 'OK',
                    message = 'the answer was lost, but Aliyun has the send (found by OutId)',
                    biz_id = COALESCE($2, biz_id), updated_at = now(), finished_at = now(),
                    reconcile_until = NULL, next_reconcile_at = NULL, result_published_at = NULL
             WHERE id = $1 AND status = 'unknown'
             RETURNING ",
            job_columns!()
        ))
        .bind(job_id)
        .bind(biz_id)
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_some() {
            sqlx::query(
                "UPDATE sms_deliveries SET biz_id = COALESCE($2, biz_id), next_check_at = now()
                 WHERE job_id = $1",
            )
            .bind(job_id)
            .bind(biz_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(row)
    }

    /// No lookup could decide while Aliyun kept the send's details: it stays `unknown`, now for
    /// good, and its second result says so.
    pub async fn reconcile_given_up(&self, job_id: &str) -> Result<Option<JobRow>, StoreError> {
        self.end_reconciliation(
            job_id,
            "unknown",
            "NOT_RECONCILED",
            "the answer was lost, and QuerySendDetails could not tell while Aliyun kept the \
             send's details (30 days): whether it was sent will not be known",
        )
        .await
    }

    /// Not found at Aliyun within the grace period: it was never sent.
    pub async fn reconciled_as_never_sent(
        &self,
        job_id: &str,
    ) -> Result<Option<JobRow>, StoreError> {
        self.end_reconciliation(
            job_id,
            "failed",
            "NOT_SENT",
            "the answer was lost and Aliyun has no send with this OutId: it was never sent",
        )
        .await
    }

    /// Ends the reconciliation of an `unknown` send with its final answer, for the outbox to
    /// publish as the job's second result; `None` if it was not `unknown` any more.
    async fn end_reconciliation(
        &self,
        job_id: &str,
        status: &str,
        code: &str,
        message: &str,
    ) -> Result<Option<JobRow>, StoreError> {
        let _watched = self.watched("reconciliation");
        Ok(sqlx::query_as::<_, JobRow>(concat!(
            "UPDATE sms_jobs SET status = $2, code = $3, message = $4,
                    updated_at = now(), finished_at = now(),
                    reconcile_until = NULL, next_reconcile_at = NULL, result_published_at = NULL
             WHERE id = $1 AND status = 'unknown'
             RETURNING ",
            job_columns!()
        ))
        .bind(job_id)
        .bind(status)
        .bind(code)
        .bind(message)
        .fetch_optional(self.pool())
        .await?)
    }
}
