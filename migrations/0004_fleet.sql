-- Several worker processes share one database. This migration gives the claim its two steps,
-- each worker its own heartbeat interval, and results an outbox.

-- A `sending` claim is stamped `called_at` by its owner, under the ownership fence, just before
-- the first request to Aliyun leaves. A stale claim without the stamp never reached Aliyun and
-- is taken over and sent by another worker; only a stamped one may have reached Aliyun and
-- ends `unknown`.
-- The default is for rows written by binaries older than this migration (during a rolling
-- upgrade, and rows already `sending` now): they never stamp, so they count as called — never
-- taken over and sent again. This binary writes NULL explicitly when it claims.
ALTER TABLE sms_jobs ADD COLUMN called_at TIMESTAMPTZ DEFAULT now();

-- The outbox: set once the job's (latest) result was confirmed by RabbitMQ. A final row without
-- it is re-published by the fleet's sweeper, so no result is dropped when a reply queue is gone
-- or the broker is away. Rows finished before this migration count as published.
ALTER TABLE sms_jobs ADD COLUMN result_published_at TIMESTAMPTZ;
UPDATE sms_jobs SET result_published_at = coalesce(finished_at, updated_at)
 WHERE status <> 'sending';
CREATE INDEX sms_jobs_unpublished_idx ON sms_jobs (finished_at)
    WHERE result_published_at IS NULL AND status <> 'sending';
-- The sweeper of abandoned claims looks at `sending` rows only.
CREATE INDEX sms_jobs_sending_idx ON sms_jobs (claimed_by) WHERE status = 'sending';

-- Each worker says how often it beats: it is taken for dead after 5 of its own beats, whatever
-- the reader's setting. `stopping_at` marks a worker that is draining after SIGTERM: alive, but
-- taking no new jobs.
ALTER TABLE sms_workers ADD COLUMN heartbeat_ms INTEGER NOT NULL DEFAULT 2000;
ALTER TABLE sms_workers ADD COLUMN stopping_at TIMESTAMPTZ;
-- The start of this worker's current unbroken run of beats (reset when a beat comes after a
-- gap of more than 5 beats). A worker judges another dead only once its own run is longer than
-- the other's staleness window: after a database outage every heartbeat is old, and nobody's
-- claims are taken until their owners had a fair chance to beat again.
ALTER TABLE sms_workers ADD COLUMN alive_since TIMESTAMPTZ NOT NULL DEFAULT now();
