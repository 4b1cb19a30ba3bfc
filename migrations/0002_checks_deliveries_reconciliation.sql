-- Verification checks have their own final statuses.
ALTER TABLE sms_jobs DROP CONSTRAINT sms_jobs_status_check;
ALTER TABLE sms_jobs ADD CONSTRAINT sms_jobs_status_check CHECK (status IN
    ('sending', 'sent', 'verified', 'not_verified', 'rate_limited', 'rejected', 'failed',
     'unknown', 'invalid', 'expired'));

-- A Dysmsapi send that ended `unknown` is looked up at Aliyun by OutId until this time; then,
-- if it was never found, it is declared never sent (`failed`).
ALTER TABLE sms_jobs ADD COLUMN reconcile_until TIMESTAMPTZ;
ALTER TABLE sms_jobs ADD COLUMN next_reconcile_at TIMESTAMPTZ;
CREATE INDEX sms_jobs_reconcile_idx ON sms_jobs (next_reconcile_at)
    WHERE status = 'unknown' AND reconcile_until IS NOT NULL;

-- One row per number of a Dysmsapi send: the carrier's delivery receipt, as QuerySendDetails
-- reports it.
CREATE TABLE sms_deliveries (
    job_id              TEXT NOT NULL REFERENCES sms_jobs (id) ON DELETE CASCADE,
    phone_number        TEXT NOT NULL,
    biz_id              TEXT,
    out_id              TEXT,
    -- QuerySendDetails asks for the send date, in China time (UTC+8).
    send_date           DATE NOT NULL,
    delivery_status     TEXT NOT NULL DEFAULT 'waiting'
                          CHECK (delivery_status IN ('waiting', 'delivered', 'failed')),
    err_code            TEXT,
    received_at         TIMESTAMPTZ,
    checks              INTEGER NOT NULL DEFAULT 0,
    next_check_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    event_published_at  TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, phone_number)
);
CREATE INDEX sms_deliveries_due_idx ON sms_deliveries (next_check_at)
    WHERE delivery_status = 'waiting';
CREATE INDEX sms_deliveries_phone_idx ON sms_deliveries (phone_number, created_at DESC);
