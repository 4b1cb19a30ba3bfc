-- The outcome, stamp and renewal of a claim find its row among the `sending` rows by
-- (claimed_by, id). On the old index (claimed_by alone) Postgres walked every claim of the
-- worker for each row it wrote: hundreds per row under load, a third of its time per job.
-- Built in the migration's transaction, not CONCURRENTLY: workers that start together migrate
-- together, and a concurrent build would deadlock with the others waiting on the migration
-- lock. The build blocks writes to sms_jobs while it scans the table; on a large table, create
-- the index CONCURRENTLY by hand before upgrading, and this migration only drops the old one
-- (check that the build succeeded: an interrupted CONCURRENTLY build leaves an invalid index of
-- this name, `pg_index.indisvalid` false, which IF NOT EXISTS would take as done).
CREATE INDEX IF NOT EXISTS sms_jobs_sending_owner_idx
    ON sms_jobs (claimed_by, id) WHERE status = 'sending';
DROP INDEX IF EXISTS sms_jobs_sending_idx;
