-- A result the worker's own outcome write presumes published. Marking each result once its
-- confirm came back cost Postgres a fifth of its work per job (a row written a third time, all
-- its indexes with it). Now the outcome write sets `result_published_at = finished_at` (a mark
-- never equals it: a mark is written in a later transaction), and the worker records in its
-- own row how far that presumption holds: every result it presumed out with an earlier
-- `finished_at` was confirmed by RabbitMQ, or handed to the outbox (`result_published_at`
-- NULL). The sweeper publishes again what a worker presumed from its watermark on, once it is
-- older than RESULT_REPUBLISH_AFTER_MS: the results of a worker that died between the commit
-- and the confirm, whose message may never be delivered again.
--
-- NULL: a worker of an earlier version, which marks every result it confirms.
ALTER TABLE sms_workers ADD COLUMN results_confirmed_through TIMESTAMPTZ;
-- Built in the migration's transaction, as 0007 explains (a large table: build it
-- CONCURRENTLY by hand first).
CREATE INDEX IF NOT EXISTS sms_jobs_presumed_idx ON sms_jobs (claimed_by, finished_at)
    WHERE result_published_at = finished_at AND status <> 'sending';
