-- Live worker processes. A `sending` claim whose worker stopped beating belongs to a worker
-- that died mid-call: its job ends `unknown` at once instead of waiting out the lease.
CREATE TABLE sms_workers (
    id            UUID PRIMARY KEY,
    name          TEXT NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
