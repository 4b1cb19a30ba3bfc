-- The account's API limits hold for the fleet: every worker takes its Aliyun call slots from one
-- schedule per action (GCRA). `tat` is the "theoretical arrival time", the first free slot;
-- a reservation of k slots moves it k slot-spacings past max(tat, the database's clock).
-- No history is kept: one row per action, updated in place.
-- UNLOGGED: a reservation then commits without waiting for a WAL flush (milliseconds per call
-- otherwise, on the path of every Aliyun call). Nothing is lost that matters: after a crash or a
-- failover the table starts empty, and every slot it held was in the past by then anyway.
CREATE UNLOGGED TABLE sms_rate_limits (
    action TEXT PRIMARY KEY,
    tat    TIMESTAMPTZ NOT NULL
);
