-- The fleet's SMS budget per day (SMS_DAILY_LIMIT, SMS_DAILY_LIMIT_PER_PREFIX): one row per day
-- and scope ('*' for the whole fleet, else the first 7 digits of the numbers it counts).
-- Spent when a send is claimed, in the claim's transaction, so every worker sees one count.
-- Logged, unlike the rate-limit schedule: a budget that a crash reset would be spent twice.
CREATE TABLE sms_daily_usage (
    day   DATE    NOT NULL,
    scope TEXT    NOT NULL,
    used  INTEGER NOT NULL CHECK (used >= 0),
    PRIMARY KEY (day, scope)
);
