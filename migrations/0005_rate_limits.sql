-- The account's API limits hold for the fleet: every worker takes its Aliyun call slots from one
-- schedule per action (GCRA). `tat` is the "theoretical arrival time", the first free slot;
-- a reservation of k slots moves it k slot-spacings past max(tat, the database's clock).
-- No history is kept: one row per action, updated in place.
CREATE TABLE sms_rate_limits (
    action TEXT PRIMARY KEY,
    tat    TIMESTAMPTZ NOT NULL
);
