//! What several worker processes share through Postgres: heartbeats, the two steps of a claim,
//! stale claims, the result outbox, and the sweep of claims nobody will finish.
//!
//! The fence: a worker acts on a job only through a statement that checks, in the same row,
//! `status = 'sending' AND claimed_by = <itself>`. Another worker can end or take a claim at
//! any moment; the owner finds out at its next step, never after a second call.

use std::time::Duration;

use uuid::Uuid;

use super::{JobRow, Store, StoreError, millis};

/// Whether the `sending` claim of the row in scope is stale, as judged by the worker bound as
/// `$me`: its owner is gone (retired, or never beat), or the judge has beaten without a break
/// for longer than the owner's own staleness window and the owner has either stopped beating
/// for that window or overrun its lease.
///
/// The owner's silence is also read off the claim's own `updated_at`: the heartbeat sits in
/// another table, which a statement reads as of its start, while the claim row is read again
/// if it changed meanwhile. An owner that resumed and stamped its claim after the judging
/// statement began (its fence before a call, see `worker::pipeline`) is then not judged from a
/// heartbeat it has since renewed.
///
/// The judge's own unbroken run matters after a database outage: then every heartbeat is old,
/// and nobody is judged dead until its owner has had five beats' time to come back. A judge
/// whose own last beat is more than two beats old (it has not beaten since the outage) judges
/// no one.
macro_rules! claim_is_stale {
    ($me:literal) => {
        concat!(
            "(NOT EXISTS (SELECT 1 FROM sms_workers o WHERE o.id = sms_jobs.claimed_by)
              OR EXISTS (SELECT 1 FROM sms_workers o, sms_workers judge
                         WHERE o.id = sms_jobs.claimed_by AND judge.id = ",
            $me,
            "
                           AND judge.heartbeat_at > now() - judge.heartbeat_ms * interval '2 milliseconds'
                           AND judge.alive_since <= now() - o.heartbeat_ms * interval '5 milliseconds'
                           AND ((o.heartbeat_at <= now() - o.heartbeat_ms * interval '5 milliseconds'
                                 AND sms_jobs.updated_at <= now() - o.heartbeat_ms * interval '5 milliseconds')
                                OR sms_jobs.lease_until <= now())))"
        )
    };
}

/// What became of a stale claim.
#[derive(Debug)]
pub enum Stale {
    /// It never reached Aliyun: it is now this worker's claim, to call.
    TakenOver(Box<JobRow>),
    /// It may have reached Aliyun: it ended `unknown`.
    Interrupted(Box<JobRow>),
}

/// What the sweep of abandoned claims ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub interrupted: u64,
    pub abandoned: u64,
}

/// The fields `unknown` gets when a worker died after it may have called Aliyun. An interrupted
/// Dysmsapi send is then looked up by OutId for `$grace` milliseconds.
macro_rules! interrupted_set {
    ($grace:literal) => {
        concat!(
            // The call it was in counts: recorded attempts are the ones that got an answer.
            "attempts = (SELECT count(*) FROM sms_attempts a WHERE a.job_id = sms_jobs.id) + 1,
             status = 'unknown', code = 'WORKER_INTERRUPTED',
             message = 'the worker stopped while this job was being sent; it may or may not have reached Aliyun and is not repeated',
             finished_at = now(), updated_at = now(), lease_until = NULL, result_published_at = NULL,
             reconcile_until = CASE WHEN type IN ('send_sms', 'send_batch_sms')
                                    THEN now() + make_interval(secs => ",
            $grace,
            "::double precision / 1000) END,
             next_reconcile_at = CASE WHEN type IN ('send_sms', 'send_batch_sms') THEN now() END"
        )
    };
}

/// Follows an `UPDATE … SET interrupted_set!() … RETURNING …` named `ended`: records the call
/// each interrupted job was in as its last attempt, so the job's page shows a call was open and
/// since when (no earlier than its previous attempt's end), not a job with no call at all.
macro_rules! record_interrupted_call {
    () => {
        ", recorded AS (
             INSERT INTO sms_attempts (job_id, attempt, action, started_at, finished_at, code,
                                       message, outcome)
             SELECT e.id, e.attempts,
                    CASE e.type WHEN 'send_verify_code' THEN 'SendSmsVerifyCode'
                                WHEN 'check_verify_code' THEN 'CheckSmsVerifyCode'
                                WHEN 'send_sms' THEN 'SendSms'
                                ELSE 'SendBatchSms' END,
                    COALESCE(GREATEST(e.called_at, (SELECT max(a.finished_at) FROM sms_attempts a
                                                    WHERE a.job_id = e.id)), now()),
                    now(), 'WORKER_INTERRUPTED',
                    'the worker stopped while this call was open; no answer was read', 'unknown'
             FROM ended e
             ON CONFLICT (job_id, attempt) DO NOTHING)"
    };
}

/// What the fleet has left behind, in seconds; 0 when there is nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Age of the oldest `sending` claim, since it last changed.
    pub oldest_sending: f64,
    /// How long the most overdue receipt check of a `sent` job has been due.
    pub receipts_overdue: f64,
}

impl Store {
    /// Measures the [`Backlog`]; both read a partial index (`sending` rows, due receipts).
    pub async fn backlog(&self) -> Result<Backlog, StoreError> {
        let _watched = self.watched("fleet gauges");
        let (oldest_sending, receipts_overdue): (f64, f64) = sqlx::query_as(
            "SELECT
                 GREATEST(COALESCE((SELECT EXTRACT(EPOCH FROM now() - min(updated_at))
                                    FROM sms_jobs WHERE status = 'sending'), 0), 0)::double precision,
                 GREATEST(COALESCE((SELECT EXTRACT(EPOCH FROM now() - d.next_check_at)
                                    FROM sms_deliveries d
                                    JOIN sms_jobs j ON j.id = d.job_id AND j.status = 'sent'
                                    WHERE d.delivery_status = 'waiting' AND d.next_check_at <= now()
                                    ORDER BY d.next_check_at LIMIT 1), 0), 0)::double precision",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(Backlog {
            oldest_sending,
            receipts_overdue,
        })
    }

    /// Announces (or renews) this worker process and how often it beats. A beat after a gap of
    /// more than two beats starts a new unbroken run (`alive_since`): an outage too short to make
    /// anyone stale still restarts every judge's count, so one just short of five beats cannot
    /// make an owner whose next beat is a little late look dead.
    ///
    /// The first beat starts the worker's watermark (see `store::presumed`) at now: it beats
    /// before its first claim, so every result it will presume out comes later.
    pub async fn heartbeat(
        &self,
        worker: Uuid,
        name: &str,
        every: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sms_workers (id, name, heartbeat_ms, results_confirmed_through)
             VALUES ($1, $2, $3, now())
             ON CONFLICT (id) DO UPDATE SET
                 alive_since = CASE
                     WHEN sms_workers.heartbeat_at
                          <= now() - sms_workers.heartbeat_ms * interval '2 milliseconds'
                     THEN now() ELSE sms_workers.alive_since END,
                 heartbeat_at = now(), heartbeat_ms = EXCLUDED.heartbeat_ms",
        )
        .bind(worker)
        .bind(name)
        .bind(i32::try_from(every.as_millis()).unwrap_or(i32::MAX))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Renews the leases of the claims this worker is still working on (`ids`): a stamped one
    /// for `job_lease`, an unstamped one for `claim_lease`. A claim its owner no longer works on
    /// (its reply was lost, its task gave up) is not renewed, and others settle it once its lease
    /// is over; one its owner is busy with — a long backoff, an outcome waiting for the database
    /// to come back — keeps its owner for as long as the owner beats.
    ///
    /// Only leases that have run for half a `beat` are renewed: most jobs end sooner, and
    /// renewing every claim at every beat wrote a new version of each row in flight (with its
    /// index entries). A claim whose owner beats keeps half a beat less than it would if renewed
    /// at every beat: its lease less half a beat, less the time to the next renewal.
    pub async fn renew_claims(
        &self,
        worker: Uuid,
        ids: &[String],
        (claim_lease, job_lease): (Duration, Duration),
        beat: Duration,
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        // SKIP LOCKED: a row locked now is having its outcome written (or its stamp), by a
        // batch that locks rows in its own order. Waiting for it would deadlock with that
        // batch; skipping it costs nothing, as the row is about to be final or the next beat
        // renews it, long before the lease of several beats runs out. NO KEY UPDATE, the lock
        // an UPDATE of these columns takes anyway: attempts and receipts that reference the
        // row still go in meanwhile.
        sqlx::query(
            "UPDATE sms_jobs j SET lease_until = GREATEST(j.lease_until, now() + make_interval(
                     secs => CASE WHEN j.called_at IS NULL THEN $3 ELSE $4 END::double precision / 1000))
             FROM (SELECT id FROM sms_jobs
                   WHERE id = ANY($2) AND status = 'sending' AND claimed_by = $1
                     AND lease_until < now() + make_interval(
                         secs => (CASE WHEN called_at IS NULL THEN $3 ELSE $4 END - $5)::double precision / 1000)
                   FOR NO KEY UPDATE SKIP LOCKED) AS free
             WHERE j.id = free.id",
        )
        .bind(worker)
        .bind(ids)
        .bind(millis(claim_lease))
        .bind(millis(job_lease))
        .bind(millis(beat / 2))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Forgets workers that stopped beating `kept` ago and hold no claims (killed, never
    /// retired), nor results presumed out after their watermark that the outbox has yet to
    /// publish. Says how many.
    pub async fn prune_dead_workers(&self, kept: Duration) -> Result<u64, StoreError> {
        let _watched = self.watched("prune");
        Ok(sqlx::query(
            "DELETE FROM sms_workers w
             WHERE w.heartbeat_at < now() - make_interval(secs => $1::double precision / 1000)
               AND NOT EXISTS (SELECT 1 FROM sms_jobs j
                               WHERE j.status = 'sending' AND j.claimed_by = w.id)
               AND NOT EXISTS (SELECT 1 FROM sms_jobs j
                               WHERE j.claimed_by = w.id AND j.status <> 'sending'
                                 AND j.result_published_at = j.finished_at
                                 AND j.finished_at >= w.results_confirmed_through)",
        )
        .bind(millis(kept))
        .execute(self.pool())
        .await?
        .rows_affected())
    }

    /// This worker got SIGTERM: it takes no new jobs but still owns (and finishes) its claims.
    pub async fn stopping(&self, worker: Uuid) -> Result<(), StoreError> {
        sqlx::query("UPDATE sms_workers SET stopping_at = now() WHERE id = $1")
            .bind(worker)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// At a stop whose grace ran out: hands back the claims among `ids` that this worker knows
    /// it never called Aliyun for (stamped before a call that never left), so that the next
    /// worker takes them over and sends them instead of ending them `unknown`. Returns how many.
    pub async fn release_uncalled(&self, me: Uuid, ids: &[String]) -> Result<u64, StoreError> {
        let _watched = self.watched("release");
        Ok(sqlx::query(
            "UPDATE sms_jobs SET called_at = NULL, lease_until = now(), updated_at = now()
             WHERE id = ANY($2) AND status = 'sending' AND claimed_by = $1",
        )
        .bind(me)
        .bind(ids)
        .execute(self.pool())
        .await?
        .rows_affected())
    }

    /// A clean stop: the process is about to exit. Claims it still holds are stale from now on.
    pub async fn retire(&self, worker: Uuid) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sms_workers WHERE id = $1")
            .bind(worker)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Settles a `sending` claim that `me` found stale: an unstamped one (Aliyun never called) is
    /// taken over by `me` for `claim_lease`; a stamped one ends `unknown`. `None` while the claim
    /// is live (or the row is not `sending` any more).
    pub async fn settle_stale(
        &self,
        job_id: &str,
        me: Uuid,
        claim_lease: Duration,
        reconcile_grace: Duration,
    ) -> Result<Option<Stale>, StoreError> {
        // One mark per statement, each a transaction of its own (see `Store::watched`).
        let watched = self.watched("takeover");
        let taken = sqlx::query_as::<_, JobRow>(concat!(
            "UPDATE sms_jobs SET claimed_by = $2, updated_at = now(),
                    lease_until = now() + make_interval(secs => $3::double precision / 1000)
             WHERE id = $1 AND status = 'sending' AND called_at IS NULL AND ",
            claim_is_stale!("$2"),
            " RETURNING ",
            job_columns!()
        ))
        .bind(job_id)
        .bind(me)
        .bind(millis(claim_lease))
        .fetch_optional(self.pool())
        .await?;
        drop(watched);
        if let Some(row) = taken {
            return Ok(Some(Stale::TakenOver(Box::new(row))));
        }
        let _watched = self.watched("takeover");
        let ended = sqlx::query_as::<_, JobRow>(concat!(
            "WITH ended AS (UPDATE sms_jobs SET ",
            interrupted_set!("$3"),
            " WHERE id = $1 AND status = 'sending' AND called_at IS NOT NULL AND ",
            claim_is_stale!("$2"),
            " RETURNING ",
            job_columns!(),
            ")",
            record_interrupted_call!(),
            " SELECT * FROM ended"
        ))
        .bind(job_id)
        .bind(me)
        .bind(millis(reconcile_grace))
        .fetch_optional(self.pool())
        .await?;
        Ok(ended.map(|r| Stale::Interrupted(Box::new(r))))
    }

    /// Ends the stale claims that no delivery will come back for (the message was dead-lettered,
    /// purged, or lost with its queue): stamped ones as `unknown` at once, unstamped ones — never
    /// sent — as `failed` (`ABANDONED`) once they have been stale for `abandon_after`, since
    /// until then a redelivery may still take them over. Run by one worker of the fleet; their
    /// results go out through the outbox.
    pub async fn sweep_stale_claims(
        &self,
        me: Uuid,
        abandon_after: Duration,
        reconcile_grace: Duration,
    ) -> Result<Swept, StoreError> {
        // One mark per statement, each a transaction of its own (see `Store::watched`).
        let watched = self.watched("stale claims sweep");
        let interrupted: i64 = sqlx::query_scalar(concat!(
            "WITH ended AS (UPDATE sms_jobs SET ",
            interrupted_set!("$2"),
            " WHERE status = 'sending' AND called_at IS NOT NULL AND ",
            claim_is_stale!("$1"),
            " RETURNING id, type, attempts, called_at)",
            record_interrupted_call!(),
            " SELECT count(*) FROM ended"
        ))
        .bind(me)
        .bind(millis(reconcile_grace))
        .fetch_one(self.pool())
        .await?;
        let interrupted = u64::try_from(interrupted).unwrap_or(0);
        drop(watched);
        let _watched = self.watched("stale claims sweep");
        let abandoned = sqlx::query(concat!(
            "UPDATE sms_jobs SET status = 'failed', code = 'ABANDONED',
                    message = 'the job was claimed but never sent, and its message did not come back; Aliyun was not called',
                    finished_at = now(), updated_at = now(), lease_until = NULL,
                    result_published_at = NULL
             WHERE status = 'sending' AND called_at IS NULL
               AND updated_at <= now() - make_interval(secs => $2::double precision / 1000) AND ",
            claim_is_stale!("$1")
        ))
        .bind(me)
        .bind(millis(abandon_after))
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(Swept {
            interrupted,
            abandoned,
        })
    }

    /// Final rows whose result was not confirmed by RabbitMQ for `older_than` (the worker that
    /// finished them died, or the broker was away): the outbox to re-publish. Those are the
    /// rows left unmarked, and the rows a dead worker presumed out (see `store::presumed`)
    /// from its watermark on: the ones it may have died before seeing confirmed. A live worker
    /// hands its own unconfirmed results to the outbox, so its watermark, however late its
    /// last write, is not read; `me` judges who is dead as for stale claims. (A worker of an
    /// earlier version has no watermark and presumes nothing.)
    pub async fn unpublished_results(
        &self,
        older_than: Duration,
        limit: i64,
        me: Uuid,
    ) -> Result<Vec<JobRow>, StoreError> {
        let _watched = self.watched("outbox");
        Ok(sqlx::query_as::<_, JobRow>(concat!(
            "(SELECT ",
            job_columns!(),
            " FROM sms_jobs
              WHERE result_published_at IS NULL AND status <> 'sending'
                AND finished_at <= now() - make_interval(secs => $1::double precision / 1000)
              ORDER BY finished_at LIMIT $2)
             UNION ALL
             (SELECT j.* FROM sms_workers w CROSS JOIN LATERAL (
                  SELECT ",
            job_columns!(),
            " FROM sms_jobs
                  WHERE claimed_by = w.id AND status <> 'sending'
                    AND result_published_at = finished_at
                    AND finished_at >= w.results_confirmed_through
                    AND finished_at <= now() - make_interval(secs => $1::double precision / 1000)
                  ORDER BY finished_at LIMIT $2) j
              WHERE w.heartbeat_at <= now() - w.heartbeat_ms * interval '5 milliseconds'
                AND EXISTS (SELECT 1 FROM sms_workers judge
                            WHERE judge.id = $3
                              AND judge.heartbeat_at > now() - judge.heartbeat_ms * interval '2 milliseconds'
                              AND judge.alive_since <= now() - w.heartbeat_ms * interval '5 milliseconds')
              ORDER BY j.finished_at LIMIT $2)
             ORDER BY finished_at LIMIT $2"
        ))
        .bind(millis(older_than))
        .bind(limit)
        .bind(me)
        .fetch_all(self.pool())
        .await?)
    }
}
