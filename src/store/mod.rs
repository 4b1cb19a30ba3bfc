//! Postgres: the job's claim, its attempts and its final outcome.
//!
//! The row is the idempotency record. A job is only ever sent by the worker that inserted (or
//! re-claimed) its row as `sending`, and the outcome is written back only by that worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::config::DailyLimits;
use crate::wire::{Job, JobResult, Status};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The first connection failed: the pool would only have said that it timed out.
    #[error(
        "cannot connect to Postgres at {target} (DATABASE_URL): {}",
        server_said(refusal)
    )]
    Unreachable {
        target: String,
        // Not a `source`: its text is said above without sqlx's noise, and once.
        refusal: sqlx::Error,
    },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("row for job {0} has an unknown status {1:?}")]
    CorruptStatus(String, String),
    /// A batched write failed for every job in it alike (say, the connection dropped).
    #[error("{0}")]
    Shared(Arc<StoreError>),
    #[error("the database writer stopped")]
    WriterGone,
    /// A stop found results presumed out that are neither confirmed nor in the outbox.
    #[error("results presumed out are still waiting for their confirm")]
    Unsettled,
}

/// What a failed database call says: whether the database is away, or this row's data is bad.
/// The two call for opposite answers — wait for the database, or refuse the message — and
/// taking one for the other either stops the worker for one bad message or loses jobs to an
/// outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database cannot be reached or cannot take writes: the connection broke, the server
    /// is shutting down or refusing connections, or it is a read-only standby after a failover.
    Outage,
    /// The database refused a value of this row (SQLSTATE class 22, data exception, or 23,
    /// integrity): the same write fails the same way however healthy the database is.
    Data,
    /// Neither (a serialization failure, a bug, a corrupt row): tried again later.
    Other,
}

impl StoreError {
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::Database(e) | StoreError::Unreachable { refusal: e, .. } => class_of(e),
            StoreError::Shared(e) => e.class(),
            StoreError::Migrate(_)
            | StoreError::CorruptStatus(..)
            | StoreError::WriterGone
            | StoreError::Unsettled => ErrorClass::Other,
        }
    }

    /// The SQLSTATE Postgres answered with, if it answered.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()),
            StoreError::Shared(e) => e.sqlstate(),
            _ => None,
        }
    }
}

fn class_of(e: &sqlx::Error) -> ErrorClass {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => ErrorClass::Outage,
        sqlx::Error::Database(e) => e.code().map_or(ErrorClass::Other, |c| sqlstate_class(&c)),
        // A value sqlx could not encode for Postgres.
        sqlx::Error::Encode(_) => ErrorClass::Data,
        _ => ErrorClass::Other,
    }
}

/// One plain connection, not a pool: a pool's timeout would hide why it failed. A wrong
/// `DATABASE_URL` then says where and why (refused, no such database, a password refused),
/// naming host:port/database, never the password.
pub async fn plain_connection(url: &str) -> Result<PgConnection, StoreError> {
    connect_plainly(&url.parse()?).await
}

async fn connect_plainly(options: &PgConnectOptions) -> Result<PgConnection, StoreError> {
    const PATIENCE: Duration = Duration::from_secs(10);
    let target = match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    let target = format!(
        "{target}/{}",
        options.get_database().unwrap_or("(default database)")
    );
    tokio::time::timeout(PATIENCE, options.connect())
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {PATIENCE:?}"),
            )))
        })
        .map_err(|refusal| StoreError::Unreachable { target, refusal })
}

/// What the server said, without the line of Postgres's own source sqlx appends to it
/// (`database "sms" does not exist at line 948`), which means nothing to an operator.
fn server_said(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => format!("the server refused: {}", db.message()),
        other => other.to_string(),
    }
}

/// What may pass, beyond the pool's acquire timeout, between a write's wait starting on the
/// worker's clock and its transaction starting on the server's: the round trips before it (a
/// pool's ping, a `BEGIN`), on a busy machine. And, the other way, between the watch reading
/// how long a write has waited and the server reading `now()` for the look.
const CLOCK_SLACK: Duration = Duration::from_millis(250);

/// The longest `application_name` Postgres keeps (`NAMEDATALEN` - 1, in bytes).
const APPLICATION_NAME_MAX: usize = 63;

/// The name of a worker's sessions: the URL's own name (or ours) and this process's `id`,
/// as Postgres keeps it: printable ASCII (Postgres replaces any other byte, with `?` up to 15,
/// with an escape from 16), within 63 bytes. Changed by Postgres instead, it would never equal
/// what the write watch asks for, and every slow write would look silent. The id is what tells
/// two workers apart, so the given name is what gives way.
fn session_name(given: Option<&str>, id: &str) -> String {
    let room = APPLICATION_NAME_MAX.saturating_sub(id.len() + 1);
    let given: String = given
        .unwrap_or("aliyun-sms-worker")
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(room)
        .collect();
    format!("{given} {id}")
}

/// SQLSTATEs that mean the server, not the row: see
/// <https://www.postgresql.org/docs/current/errcodes-appendix.html>.
const OUTAGE_SQLSTATES: &[&str] = &[
    // connection exception
    "08", // invalid authorization (a rotated password)
    "28", // insufficient resources: 53300 too many connections, disk full, out of memory
    "53", // system error (I/O)
    "58",
    // operator intervention: admin or crash shutdown, cannot connect now, idle session ended
    // (not 57014, a cancelled statement)
    "57P",   // read_only_sql_transaction: this server became a standby in a failover
    "25006", // the database itself is gone
    "3D000",
];

fn sqlstate_class(code: &str) -> ErrorClass {
    if OUTAGE_SQLSTATES.iter().any(|p| code.starts_with(p)) {
        ErrorClass::Outage
    } else if code.starts_with("22") || code.starts_with("23") {
        ErrorClass::Data
    } else {
        ErrorClass::Other
    }
}

/// The migrations this binary carries (`migrate` applies them, `check-config` compares).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Where a job's result goes, taken from the delivery's AMQP properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyRoute {
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

/// A `sms_jobs` row as the pipeline needs it.
#[derive(Debug, Clone, FromRow)]
pub struct JobRow {
    pub id: String,
    #[sqlx(rename = "type")]
    pub job_type: String,
    pub status: String,
    /// The (first) number, as the worker normalised it.
    pub phone_number: Option<String>,
    pub biz_id: Option<String>,
    pub request_id: Option<String>,
    pub code: Option<String>,
    pub message: Option<String>,
    pub attempts: i32,
    pub claimed_by: Option<Uuid>,
    pub lease_until: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// When the job was first seen: a code job's maximum age counts from here.
    pub created_at: DateTime<Utc>,
    /// When its owner was about to call Aliyun; `None` while the claim never reached Aliyun.
    pub called_at: Option<DateTime<Utc>>,
    /// When its result was recorded as out; equal to `finished_at` when the outcome write
    /// presumed it (see `store::presumed`), `None` while it is in the outbox.
    pub result_published_at: Option<DateTime<Utc>>,
}

impl JobRow {
    /// `finished_at`, when the outcome write presumed this result out (see `store::presumed`).
    pub(crate) fn presumed_at(&self) -> Option<DateTime<Utc>> {
        self.finished_at
            .filter(|_| self.status != Status::Sending.as_str())
            .filter(|t| self.result_published_at == Some(*t))
    }

    pub fn status(&self) -> Result<Status, StoreError> {
        self.status
            .parse()
            .map_err(|_| StoreError::CorruptStatus(self.id.clone(), self.status.clone()))
    }

    /// The stored result, as it was first published (minus any verification code).
    pub fn to_result(&self) -> Result<JobResult, StoreError> {
        Ok(JobResult {
            id: Some(self.id.clone()),
            job_type: Some(self.job_type.clone()),
            status: self.status()?,
            code: self.code.clone().unwrap_or_default(),
            message: self.message.clone().unwrap_or_default(),
            biz_id: self.biz_id.clone(),
            request_id: self.request_id.clone(),
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            finished_at: self.finished_at.unwrap_or_else(Utc::now),
            verify_code: None,
        })
    }

    pub fn route(&self) -> ReplyRoute {
        ReplyRoute {
            reply_to: self.reply_to.clone(),
            correlation_id: self.correlation_id.clone(),
        }
    }
}

/// What claiming a job id found.
#[derive(Debug)]
pub enum Claim {
    /// This worker now owns the `sending` row and may call Aliyun (after stamping it).
    Owned(Box<JobRow>),
    /// Someone already finished it: replay, don't call.
    Seen(Box<JobRow>),
}

/// One Aliyun call, as recorded in `sms_attempts`.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub action: &'static str,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub http_status: Option<u16>,
    pub code: Option<String>,
    pub message: Option<String>,
    pub request_id: Option<String>,
    pub outcome: &'static str,
}

/// The final outcome written back to the row.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    pub code: String,
    pub message: String,
    pub biz_id: Option<String>,
    pub request_id: Option<String>,
    pub attempts: u32,
    pub followup: Followup,
}

/// What happens to a Dysmsapi send after its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followup {
    None,
    /// Sent: poll the carrier receipt of each number.
    TrackReceipts {
        phones: Vec<String>,
    },
    /// Unknown: look the send up by OutId until `grace` has passed.
    Reconcile {
        phones: Vec<String>,
        grace: Duration,
    },
}

/// The columns of [`JobRow`], spelled once for every SELECT and RETURNING.
macro_rules! job_columns {
    () => {
        "id, type, status, phone_number, biz_id, request_id, code, message, attempts, \
         claimed_by, lease_until, finished_at, reply_to, correlation_id, created_at, called_at, \
         result_published_at"
    };
}

/// The INSERT of attempts, from the ten arrays of [`AttemptArrays`] bound as `$1`..`$10`.
/// An attempt already recorded stays as it was.
/// An attempt already recorded stays as it is, but for the stand-in a worker that judged the
/// owner gone wrote for its open call (`store::fleet`): the owner, alive after all, replaces
/// it with the answer it got, which an operator wants to see (the call went through, or not).
macro_rules! insert_attempts_sql {
    () => {
        "INSERT INTO sms_attempts (job_id, attempt, action, started_at, finished_at,
                                   http_status, code, message, request_id, outcome)
         SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::timestamptz[],
                              $5::timestamptz[], $6::int[], $7::text[], $8::text[],
                              $9::text[], $10::text[])
         ON CONFLICT (job_id, attempt) DO UPDATE SET
             action = EXCLUDED.action, started_at = EXCLUDED.started_at,
             finished_at = EXCLUDED.finished_at, http_status = EXCLUDED.http_status,
             code = EXCLUDED.code, message = EXCLUDED.message, request_id = EXCLUDED.request_id,
             outcome = EXCLUDED.outcome
         WHERE sms_attempts.code = 'WORKER_INTERRUPTED' AND sms_attempts.http_status IS NULL"
    };
}

/// Binds an [`AttemptArrays`] as the first ten parameters of a query or query_as.
macro_rules! bind_attempts {
    ($query:expr, $a:expr) => {
        $query
            .bind(&$a.job_ids)
            .bind(&$a.numbers)
            .bind(&$a.actions)
            .bind(&$a.started)
            .bind(&$a.finished)
            .bind(&$a.http)
            .bind(&$a.codes)
            .bind(&$a.messages)
            .bind(&$a.request_ids)
            .bind(&$a.outcomes)
    };
}

mod batch;
pub use batch::BatchCounts;
use batch::ClaimReq;
mod deliveries;
mod fleet;
mod guards;
mod in_flight;
pub use in_flight::Waiting;
mod leader;
mod presumed;
mod rate;
mod reports;
pub use deliveries::{DeliveryRow, ReceiptUpdate, ReconcileRow, china_time};
pub use fleet::{Backlog, Stale, Swept};
pub use guards::{DailyUsage, Guards, Refusal};
pub use leader::Leadership;
pub use reports::{FleetWorker, JobDetail, JobFilter, MinuteCount, Stats, WorkerState};

/// Attempts of many jobs, as one array per column.
#[derive(Default)]
struct AttemptArrays<'a> {
    job_ids: Vec<&'a str>,
    numbers: Vec<i32>,
    actions: Vec<&'static str>,
    started: Vec<DateTime<Utc>>,
    finished: Vec<DateTime<Utc>>,
    http: Vec<Option<i32>>,
    codes: Vec<Option<&'a str>>,
    messages: Vec<Option<&'a str>>,
    request_ids: Vec<Option<&'a str>>,
    outcomes: Vec<&'static str>,
}

impl<'a> AttemptArrays<'a> {
    fn push(&mut self, job_id: &'a str, a: &'a AttemptRecord) {
        self.job_ids.push(job_id);
        self.numbers
            .push(i32::try_from(a.attempt).unwrap_or(i32::MAX));
        self.actions.push(a.action);
        self.started.push(a.started_at);
        self.finished.push(a.finished_at);
        self.http.push(a.http_status.map(i32::from));
        self.codes.push(a.code.as_deref());
        self.messages.push(a.message.as_deref());
        self.request_ids.push(a.request_id.as_deref());
        self.outcomes.push(a.outcome);
    }
}

/// The rows of `ids`, by id; ids without a row are absent.
async fn fetch_many(
    conn: &mut PgConnection,
    ids: &[&str],
) -> Result<HashMap<String, JobRow>, StoreError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<JobRow> = sqlx::query_as(concat!(
        "SELECT ",
        job_columns!(),
        " FROM sms_jobs WHERE id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id.clone(), r)).collect())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The single answer of a one-job batch.
fn one<T>(mut answers: Vec<T>) -> Result<T, StoreError> {
    answers
        .pop()
        .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// Group commits for claims and outcomes; see [`Store::batched`].
    writer: Option<Arc<batch::Writer>>,
    /// The `application_name` of the worker's sessions; see [`Store::connect_for_worker`].
    session_name: Option<Arc<str>>,
    /// Guarded claims running at once. Each holds a connection for its own transaction, and
    /// a burst of them (hundreds of checks in flight) must queue here, without a deadline,
    /// rather than for the pool, whose short wait would take the burst for an outage.
    guarded: Arc<tokio::sync::Semaphore>,
    /// When the statements the write watch times began, the lanes' and the others'; see
    /// [`Store::writes_waiting_longer_than`].
    in_flight: Arc<in_flight::InFlight>,
}

impl Store {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::connect_with(url, max_connections, None).await
    }

    /// The worker's store. Its sessions are named for this process (`application_name`, after
    /// the URL's own if it has one), so [`Store::unattended`] can tell a write Postgres is
    /// still busy with from one whose connection went silent. And Postgres ends a session
    /// whose client went silent (a failover, a partition) after `write_timeout`, left inside a
    /// transaction or with an answer not taken, so the locks it holds are freed for the fleet
    /// instead of waiting for the server's TCP keepalive (two hours by default). None of the
    /// worker's transactions waits on anything but the database.
    pub async fn connect_for_worker(
        url: &str,
        max_connections: u32,
        write_timeout: Duration,
    ) -> Result<Self, StoreError> {
        Self::connect_with(url, max_connections, Some(write_timeout)).await
    }

    async fn connect_with(
        url: &str,
        max_connections: u32,
        silent_client: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let mut options: PgConnectOptions = url.parse()?;
        let session_name = silent_client.map(|_| {
            let name = session_name(
                options.get_application_name(),
                &uuid::Uuid::new_v4().simple().to_string(),
            );
            options = options.clone().application_name(&name);
            name
        });
        // The pool would only say that it timed out.
        let _ = connect_plainly(&options).await?.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // Short, so an outage is noticed quickly; the health probe does the waiting. Jobs
            // share their writes (see `batch`), so a wait for a free connection is rare and a
            // second without one means the database is gone: sqlx keeps retrying a refused
            // connection until this runs out, and no other error would come sooner.
            .acquire_timeout(Duration::from_secs(1))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    let Some(limit) = silent_client else {
                        return Ok(());
                    };
                    // One at a time, and a refusal only logged: `tcp_user_timeout` is Postgres 12+
                    // and ignored or refused on some platforms, and a pooler may refuse either.
                    for setting in ["idle_in_transaction_session_timeout", "tcp_user_timeout"] {
                        if let Err(e) = sqlx::query("SELECT set_config($1, $2, false)")
                            .bind(setting)
                            .bind(millis(limit).to_string())
                            .execute(&mut *conn)
                            .await
                        {
                            tracing::debug!(setting, error = %e, "session setting not taken");
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let mut store = Self::from_pool(pool);
        store.session_name = session_name.map(Arc::from);
        Ok(store)
    }

    /// Of `writes` (see [`Self::writes_waiting_longer_than`]), those Postgres is not working
    /// on: no statement of this store's sessions is running or waiting (for a lock, a disk, a
    /// standby; not for the client) in a transaction begun with the write. Such a write is on
    /// a connection that went silent. A write's wait counts from before it had a connection,
    /// got within the pool's acquire timeout, so its transaction may begin that much later;
    /// the window is as wide the other way, for the clocks (see [`CLOCK_SLACK`]). A busy
    /// worker's fresh statements, on connections opened since, say nothing of a silent write;
    /// nor does a statement begun well before it (a slow sweep, a claim waiting on another
    /// worker's lock), which may run for as long as the silent one waits. A statement begun
    /// within that window of a silent one and still running hides it: sessions are told
    /// apart by when their transaction began, not by which connection is whose. None for a
    /// store whose sessions are not named (it cannot tell). Asked on a connection of its own:
    /// when writes wait for a lock, the pool may have none to spare.
    pub async fn unattended(&self, writes: &[Waiting]) -> Result<Vec<Waiting>, StoreError> {
        let Some(name) = &self.session_name else {
            return Ok(Vec::new());
        };
        let mut conn = self.pool.connect_options().connect().await?;
        // The server reads `now()` between these two instants, however long the query takes
        // to reach it: each write's wait is compared with both.
        let asked = Instant::now();
        let ages: Result<Vec<f64>, sqlx::Error> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM now() - xact_start)::double precision
             FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid() AND state = 'active'
               AND wait_event_type IS DISTINCT FROM 'Client' AND xact_start IS NOT NULL",
        )
        .bind(name.as_ref())
        .fetch_all(&mut conn)
        .await;
        let answered = Instant::now();
        // Its answer stands however the goodbye goes.
        let _ = conn.close().await;
        let ages = ages?;
        let margin = self.pool.options().get_acquire_timeout() + CLOCK_SLACK;
        Ok(writes
            .iter()
            .filter(|w| {
                let least = asked
                    .saturating_duration_since(w.began)
                    .saturating_sub(margin);
                let most = answered.saturating_duration_since(w.began) + margin;
                let window = least.as_secs_f64()..=most.as_secs_f64();
                !ages.iter().any(|age| window.contains(age))
            })
            .copied()
            .collect())
    }

    pub fn from_pool(pool: PgPool) -> Self {
        // Half the pool, so the batched writers and the fleet's duties always find one.
        let guarded = (pool.options().get_max_connections() / 2).max(1);
        Self {
            pool,
            writer: None,
            session_name: None,
            guarded: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(guarded).unwrap_or(1),
            )),
            in_flight: Arc::default(),
        }
    }

    /// This store, with claims and outcomes of concurrent jobs written in shared transactions
    /// (see `store::batch`). For the worker, where hundreds of jobs are in flight;
    /// `republish_after` is its `RESULT_REPUBLISH_AFTER_MS`.
    pub fn batched(&self, republish_after: Duration) -> Self {
        Self {
            pool: self.pool.clone(),
            writer: Some(Arc::new(batch::Writer::spawn(
                self.pool.clone(),
                republish_after,
                &self.in_flight,
            ))),
            session_name: self.session_name.clone(),
            guarded: self.guarded.clone(),
            in_flight: self.in_flight.clone(),
        }
    }

    /// Stops the batched writers where they stand, queued writes unwritten (see
    /// `batch::Writer::abandon`): for a worker that stops on a silent write while its process
    /// lives on.
    pub fn abandon(&self) {
        if let Some(writer) = &self.writer {
            writer.abandon();
        }
    }

    /// The statements the write watch times that have waited for the database longer than
    /// `age`, the oldest first: a batch whose connection went silent waits until TCP gives up (minutes), holding
    /// every job behind it; a guarded claim holds its job and a turn of the guarded claims; a
    /// takeover, an attempt, an invalid row or a replayed row hold their job; a statement of
    /// the leader's duties holds the fleet's sweeps, receipts and reconciliation, while the
    /// leadership, on a connection of its own, stays here.
    pub fn writes_waiting_longer_than(&self, age: Duration) -> Vec<Waiting> {
        self.in_flight.older_than(age)
    }

    /// Marks a statement the write watch times (see [`Self::writes_waiting_longer_than`]) as under way
    /// until the mark drops. One mark per transaction, taken before it begins: the watch asks
    /// Postgres about a transaction begun with the mark.
    fn watched(&self, what: &'static str) -> in_flight::Mark {
        self.in_flight.begin(what)
    }

    /// What the batched writers did so far (see `store::batch`); empty for a store that
    /// writes each job alone.
    pub fn batch_counts(&self) -> Vec<BatchCounts> {
        self.writer
            .as_ref()
            .map(|w| w.counts().to_vec())
            .unwrap_or_default()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Inserts the job as `sending`, or finds the row that is already there. A job a guard
    /// refuses is inserted final instead (see [`Guards`]).
    ///
    /// A row left `invalid` may be re-claimed: an invalid message never reached Aliyun, so a
    /// corrected job with the same id is a first attempt, not a duplicate.
    ///
    /// `call_lease`, when the caller holds its rate-limit slot and calls Aliyun as soon as the
    /// claim commits: a new row is written stamped (see [`Store::stamp`]) with that lease, so
    /// the first call needs no second commit. A row already claimed or final is left as it is.
    pub async fn claim(
        &self,
        job: &Job,
        route: &ReplyRoute,
        worker: Uuid,
        lease: Duration,
        guards: &Guards<'_>,
        call_lease: Option<Duration>,
    ) -> Result<Claim, StoreError> {
        let mut req = ClaimReq::new(job, route, worker, lease).refused(guards.refusal.clone());
        if let Some(lease) = call_lease {
            req = req.stamped(lease);
        }
        if !guards.counted() {
            if let Some(writer) = &self.writer {
                return writer.claim(req).await;
            }
            let mut watched = self.watched("claim");
            let mut conn = self.pool.acquire().await?;
            // Boxed here and below: these statements' futures are kilobytes, and every job in
            // flight would otherwise carry room for them while it waits on the batched path.
            return one(
                Box::pin(batch::claim_together(&mut conn, &[req], Some(&mut watched))).await?,
            );
        }
        Box::pin(self.claim_guarded(job, req, guards)).await
    }

    /// A claim under guards that count the fleet's history: counted and written in one
    /// transaction, with the number's guarded claims serialised across every worker so that
    /// two cannot both pass the count.
    async fn claim_guarded(
        &self,
        job: &Job,
        req: ClaimReq,
        guards: &Guards<'_>,
    ) -> Result<Claim, StoreError> {
        let _turn = self
            .guarded
            .acquire()
            .await
            .map_err(|_| StoreError::WriterGone)?;
        let mut conn = self.pool.acquire().await?;
        // From the connection in hand on: a wait for one is the pool's, bounded by its own
        // timeout, and not on any statement Postgres could be asked about.
        let _watched = self.watched("guarded claim");
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut refusal = None;
        if let Some(limits) = guards.number_limits {
            guards::lock_number(&mut tx, "number", job.phone().as_str()).await?;
            refusal = guards::number_limits(&mut tx, job, limits).await?;
        }
        if let Some(limit) = guards.check_limit.filter(|_| refusal.is_none()) {
            guards::lock_number(&mut tx, "check", job.phone().as_str()).await?;
            refusal = guards::check_limit(&mut tx, job, limit).await?;
        }
        let mut spent = false;
        if let Some(limits) = guards.daily.filter(|_| refusal.is_none()) {
            refusal = guards::spend_daily(&mut tx, job, limits).await?;
            spent = refusal.is_none();
        }
        let claim = one(batch::claim_together(&mut tx, &[req.refused(refusal)], None).await?)?;
        if spent && !matches!(claim, Claim::Owned(_)) {
            // A job the fleet has seen before spent its SMS when it was first claimed.
            tx.rollback().await?;
            return Ok(claim);
        }
        tx.commit().await?;
        Ok(claim)
    }

    /// Today's SMS budget and what is spent of it.
    pub async fn daily_usage(&self, limits: DailyLimits) -> Result<DailyUsage, StoreError> {
        let mut conn = self.pool.acquire().await?;
        guards::daily_usage(&mut conn, limits).await
    }

    /// Forgets the budgets of days long past.
    pub async fn prune_daily_usage(&self) -> Result<u64, StoreError> {
        let _watched = self.watched("prune");
        let mut conn = self.pool.acquire().await?;
        guards::prune_daily(&mut conn).await
    }

    pub async fn fetch(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let _watched = self.watched("row read");
        Ok(sqlx::query_as::<_, JobRow>(concat!(
            "SELECT ",
            job_columns!(),
            " FROM sms_jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The second step of a claim, taken just before each call to Aliyun: stamps `called_at`
    /// (once) and renews the lease, if `worker` still owns the `sending` claim. `false` means
    /// the claim was lost, and the caller must not call.
    pub async fn stamp(
        &self,
        job_id: &str,
        worker: Uuid,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let req = batch::StampReq {
            job_id: job_id.to_owned(),
            worker,
            lease_ms: millis(lease),
        };
        match &self.writer {
            Some(writer) => writer.stamp(req).await,
            None => Ok(!batch::stamp_together(&self.pool, &[req]).await?.is_empty()),
        }
    }

    /// Records, in the background, that the result of `job_id` as of `finished_at` reached a
    /// queue, so the outbox sweeper leaves it alone. A result this worker's outcome write
    /// presumed out needs no write: it only lets the worker's watermark move on.
    pub fn result_published(&self, job_id: &str, finished_at: DateTime<Utc>) {
        let req = batch::PublishedReq {
            job_id: job_id.to_owned(),
            finished_at,
        };
        match &self.writer {
            Some(writer) => writer.published(req),
            None => {
                let pool = self.pool.clone();
                tokio::spawn(async move {
                    if let Err(e) = batch::mark_published(&pool, &[req]).await {
                        tracing::debug!(error = %e, "result not marked published; the outbox may repeat it");
                    }
                });
            }
        }
    }

    /// For a clean stop, once every job is done: writes the marks [`Self::result_published`]
    /// queued and has not written yet, so the outbox does not publish this worker's last
    /// results again, and hands the results it presumed out and never saw confirmed to the
    /// outbox (see `store::presumed`). After an error the worker's row must not be retired:
    /// the sweeper finds those results through it.
    pub async fn flush_published(&self) -> Result<(), StoreError> {
        match &self.writer {
            Some(writer) => writer.flush_published(&self.pool).await,
            None => Ok(()),
        }
    }

    /// [`Self::result_published`], waited for: for the outbox sweeper, whose next sweep must
    /// not find the row it has just published unmarked.
    pub async fn mark_result_published(
        &self,
        job_id: &str,
        finished_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let req = batch::PublishedReq {
            job_id: job_id.to_owned(),
            finished_at,
        };
        let _watched = self.watched("outbox");
        batch::mark_published(&self.pool, &[req]).await
    }

    pub async fn record_attempt(&self, job_id: &str, a: &AttemptRecord) -> Result<(), StoreError> {
        let _watched = self.watched("attempt");
        let mut arrays = AttemptArrays::default();
        arrays.push(job_id, a);
        bind_attempts!(sqlx::query(insert_attempts_sql!()), arrays)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Writes the outcome of a job this worker owns. If the claim was lost meanwhile (another
    /// worker declared it interrupted), the row already holds a final answer and that one is
    /// returned instead, so every result message for a job says the same thing.
    ///
    /// `last_attempt`, the call that decided the outcome, is recorded in the same transaction:
    /// one commit fewer per job.
    pub async fn finish(
        &self,
        job_id: &str,
        worker: Uuid,
        o: &Outcome,
        last_attempt: Option<&AttemptRecord>,
    ) -> Result<JobRow, StoreError> {
        let req = batch::FinishReq {
            job_id: job_id.to_owned(),
            worker,
            outcome: o.clone(),
            last_attempt: last_attempt.cloned(),
            // The outcome lane decides (see `store::presumed`); written alone, it is marked
            // once confirmed.
            presume: false,
            floor: None,
        };
        match &self.writer {
            Some(writer) => writer.finish(req).await,
            None => {
                let mut watched = self.watched("outcome");
                one(Box::pin(batch::finish_together(&self.pool, &[req], &mut watched)).await?)?
            }
        }
    }

    /// Records a message that failed validation, when it carried an id, so operators find it.
    /// A real job already stored under that id is left alone. Says when the row was written,
    /// if it was.
    pub async fn record_invalid(
        &self,
        id: &str,
        job_type: Option<&str>,
        phone: Option<&str>,
        route: &ReplyRoute,
        code: &str,
        message: &str,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let _watched = self.watched("invalid row");
        Ok(sqlx::query_scalar(
            "INSERT INTO sms_jobs (id, type, status, reply_to, correlation_id, code, message,
                                   finished_at, phone_number)
             VALUES ($1, $2, 'invalid', $3, $4, $5, $6, now(), $7)
             ON CONFLICT (id) DO NOTHING
             RETURNING finished_at",
        )
        .bind(id)
        .bind(job_type.unwrap_or(""))
        .bind(&route.reply_to)
        .bind(&route.correlation_id)
        .bind(code)
        .bind(message)
        .bind(phone)
        .fetch_optional(&self.pool)
        .await?)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::borrow::Cow;

    use super::*;

    #[test]
    fn a_session_name_fits_what_postgres_keeps_and_always_ends_with_the_id() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            session_name(None, id),
            format!("aliyun-sms-worker {id}"),
            "the default name is whole"
        );
        assert_eq!(session_name(Some("billing"), id), format!("billing {id}"));
        let long = "a-very-long-application-name-given-in-the-url";
        let name = session_name(Some(long), id);
        assert_eq!(
            name,
            format!("{} {id}", &long[..APPLICATION_NAME_MAX - id.len() - 1])
        );
        // Each character Postgres would not keep as it is becomes a `?`.
        assert_eq!(
            session_name(Some("短信 sms\n"), id),
            format!("?? sms? {id}")
        );
        let name = session_name(Some(&"短信验证码服务".repeat(5)), id);
        assert!(name.len() <= APPLICATION_NAME_MAX, "{name}");
        assert!(name.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{name}");
        assert!(name.ends_with(&format!(" {id}")), "{name}");
    }

    /// A database error with the given SQLSTATE, as sqlx reports one.
    #[derive(Debug)]
    struct Refused(&'static str);

    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Refused {}

    impl sqlx::error::DatabaseError for Refused {
        fn message(&self) -> &str {
            "refused"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    pub(in crate::store) fn db_error(sqlstate: &'static str) -> StoreError {
        StoreError::Database(sqlx::Error::Database(Box::new(Refused(sqlstate))))
    }

    #[test]
    fn sqlstates_tell_a_bad_value_from_a_database_that_is_away() {
        use ErrorClass::*;
        for (code, class) in [
            ("22021", Data), // a NUL in text
            ("22P05", Data), // \u0000 in jsonb
            ("22001", Data), // a value too long
            ("23505", Data), // a duplicate key
            ("23514", Data), // a check constraint
            ("08006", Outage),
            ("08P01", Outage),
            ("57P01", Outage), // admin shutdown (pg_terminate_backend)
            ("57P02", Outage), // crash shutdown
            ("57P03", Outage), // cannot connect now (starting up, recovering)
            ("53300", Outage), // too many connections
            ("25006", Outage), // read-only: a standby after a failover
            ("28P01", Outage),
            ("3D000", Outage),
            ("57014", Other), // a cancelled statement
            ("40001", Other), // a serialization failure
            ("42P01", Other), // an undefined table: a bug
            ("XX000", Other),
        ] {
            assert_eq!(db_error(code).class(), class, "{code}");
            assert_eq!(db_error(code).sqlstate().as_deref(), Some(code));
        }
        let shared = StoreError::Shared(Arc::new(db_error("22021")));
        assert_eq!(shared.class(), Data);
        assert_eq!(shared.sqlstate().as_deref(), Some("22021"));
        for away in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()),
        ] {
            assert_eq!(StoreError::Database(away).class(), Outage);
        }
        assert_eq!(
            StoreError::Database(sqlx::Error::RowNotFound).class(),
            Other
        );
        assert_eq!(StoreError::WriterGone.class(), Other);
    }
}
