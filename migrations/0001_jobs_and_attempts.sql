-- One row per job id: the idempotency record and the table operators read.
-- No verification code and no credential is ever stored here.
CREATE TABLE sms_jobs (
    id              TEXT PRIMARY KEY,
    type            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN
                      ('sending', 'sent', 'rate_limited', 'rejected', 'failed',
                       'unknown', 'invalid', 'expired')),
    phone_number    TEXT,
    -- The request's non-secret Aliyun parameters (literal codes redacted).
    params          JSONB NOT NULL DEFAULT '{}'::jsonb,
    out_id          TEXT,
    reply_to        TEXT,
    correlation_id  TEXT,
    biz_id          TEXT,
    request_id      TEXT,
    code            TEXT,
    message         TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- Which worker process holds the `sending` claim, and until when; a claim past its lease
    -- belongs to a worker that died mid-call.
    claimed_by      UUID,
    lease_until     TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ
);

CREATE INDEX sms_jobs_created_at_idx ON sms_jobs (created_at DESC);
CREATE INDEX sms_jobs_status_created_at_idx ON sms_jobs (status, created_at DESC);
CREATE INDEX sms_jobs_phone_created_at_idx ON sms_jobs (phone_number, created_at DESC);

-- One row per Aliyun call.
CREATE TABLE sms_attempts (
    job_id       TEXT NOT NULL REFERENCES sms_jobs (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    action       TEXT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ NOT NULL,
    http_status  INTEGER,
    code         TEXT,
    message      TEXT,
    request_id   TEXT,
    -- What the worker made of the answer: success, retry, rate_limited, rejected, failed, unknown.
    outcome      TEXT NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
