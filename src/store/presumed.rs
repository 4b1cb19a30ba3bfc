//! Results presumed out, and the watermark that makes the presumption safe.
//!
//! A worker's outcome write marks the job's result as published in the same statement
//! (`result_published_at = finished_at`, see migration 0008), instead of marking each result
//! in a third write once RabbitMQ confirmed it. What keeps a result from being lost when the
//! worker dies between that commit and the confirm is the worker's watermark, in its own
//! `sms_workers` row: every result it presumed out with an earlier `finished_at` was confirmed
//! or handed to the outbox. The fleet's sweeper publishes again what a dead worker presumed
//! from its watermark on (`Store::unpublished_results`); a live one hands over what it still
//! waits for itself, so its watermark is never read while it beats.
//!
//! The watermark rests on the order of the outcome lane: it writes one batch at a time, each
//! batch's `finished_at` is the time its statement began, after the previous one committed,
//! and it is never earlier than the latest presumed so far (the statement takes the greater of
//! its clock and the floor it is given), so a result committed after the watermark was written
//! always lies at or after it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{JobRow, StoreError};

/// How often the watermark is written when it moved: a worker killed at full rate leaves about
/// this much of its results (besides the unconfirmed ones) for the sweeper to publish again.
const TICK: Duration = Duration::from_millis(100);

/// How long the keeper waits for one of its statements. While the worker beats, nobody else
/// hands its results over or reads its watermark, so a statement stuck on a connection that
/// went silent must not hold them until TCP gives up (minutes): given up, it is tried again
/// on the next tick, on another connection. Its entries stay until a hand-over is seen done.
const PATIENCE: Duration = Duration::from_secs(5);

/// How long a presumed result may wait for its confirm before it is handed to the outbox (its
/// mark cleared): 2 s, or a quarter of `republish_after` (`RESULT_REPUBLISH_AFTER_MS`) when
/// that is shorter. A handed-over result goes out again once it is `republish_after` old, as
/// any result no queue confirmed, so the wait and the keeper's tick fit well within that; and
/// one result stuck in a publish does not hold the watermark, and with it every later result
/// a killed worker would leave for the sweeper, for longer than this.
pub(super) fn hand_over_after(republish_after: Duration) -> Duration {
    Duration::from_secs(2).min(republish_after / 4)
}

/// The results one worker presumed out and has not seen confirmed.
#[derive(Default)]
pub(super) struct Presumed {
    /// The worker whose outcomes are presumed: the first to write one through this store.
    /// Another worker's outcomes through the same store are marked the old way.
    owner: OnceLock<Uuid>,
    state: Mutex<State>,
    /// Held while entries are being handed to the outbox, so a stop's last hand-over sees the
    /// entries a failed tick put back.
    handing_over: tokio::sync::Mutex<()>,
    /// See [`Presumed::batch_turn`].
    batch: tokio::sync::RwLock<()>,
    /// Set by the stop's hand-over: nothing is presumed after it.
    stopped: AtomicBool,
}

#[derive(Default)]
struct State {
    unconfirmed: HashMap<String, DateTime<Utc>>,
    by_time: BTreeSet<(DateTime<Utc>, String)>,
    /// The latest `finished_at` presumed so far, and when it was seen: from it the tick tells
    /// the database's time without asking for it.
    latest: Option<(DateTime<Utc>, Instant)>,
}

impl State {
    /// Waits for the result of `id` as of `at`, instead of any other entry of that job.
    fn hold(&mut self, id: &str, at: DateTime<Utc>) {
        if let Some(old) = self.unconfirmed.insert(id.to_owned(), at) {
            self.by_time.remove(&(old, id.to_owned()));
        }
        self.by_time.insert((at, id.to_owned()));
    }

    /// Stops waiting for the result of `id` as of `at`; `false` if that was not waited for.
    fn release(&mut self, id: &str, at: DateTime<Utc>) -> bool {
        if self.unconfirmed.get(id) != Some(&at) {
            return false;
        }
        self.unconfirmed.remove(id);
        self.by_time.remove(&(at, id.to_owned()));
        true
    }
}

/// One microsecond, the resolution of `timestamptz`.
const TICK_OF_CLOCK: TimeDelta = TimeDelta::microseconds(1);

impl Presumed {
    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked; the sets are still sound.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `worker`'s outcomes are presumed through this store.
    pub(super) fn presumes_for(&self, worker: Uuid) -> bool {
        *self.owner.get_or_init(|| worker) == worker
    }

    /// The earliest `finished_at` the next batch may write: later than any presumed so far.
    pub(super) fn floor(&self) -> Option<DateTime<Utc>> {
        self.state().latest.map(|(t, _)| t + TICK_OF_CLOCK)
    }

    /// Takes note of the rows an outcome batch wrote: the ones it presumed out, by this
    /// worker, wait for their confirm.
    pub(super) fn wrote<'a>(&self, rows: impl IntoIterator<Item = &'a JobRow>) {
        let Some(&owner) = self.owner.get() else {
            return;
        };
        let mut s = self.state();
        for row in rows {
            let Some(at) = row.presumed_at() else {
                continue;
            };
            if row.claimed_by != Some(owner) {
                continue;
            }
            s.hold(&row.id, at);
            if s.latest.is_none_or(|(t, _)| t < at) {
                s.latest = Some((at, Instant::now()));
            }
        }
    }

    /// RabbitMQ confirmed the result of `id` as of `finished_at`. `false` when it was not
    /// presumed (or was handed to the outbox meanwhile): then it must be marked.
    pub(super) fn confirmed(&self, id: &str, finished_at: DateTime<Utc>) -> bool {
        self.state().release(id, finished_at)
    }

    /// Until when every presumed result is confirmed: the earliest unconfirmed one, or just
    /// after the latest one. `None` before the first.
    fn watermark(&self) -> Option<DateTime<Utc>> {
        let s = self.state();
        match s.by_time.first() {
            Some((t, _)) => Some(*t),
            None => s.latest.map(|(t, _)| t + TICK_OF_CLOCK),
        }
    }

    /// The entries older than `age` (all of them with `None`), left in place: they hold the
    /// watermark until their hand-over has committed.
    fn overdue(&self, age: Option<Duration>) -> Vec<(String, DateTime<Utc>)> {
        let s = self.state();
        let cut = match (age, s.latest) {
            (None, _) => None,
            (Some(_), None) => return Vec::new(),
            (Some(age), Some((t, seen))) => {
                let now = t + TimeDelta::from_std(seen.elapsed()).unwrap_or(TimeDelta::MAX);
                Some(now - TimeDelta::from_std(age).unwrap_or(TimeDelta::MAX))
            }
        };
        s.by_time
            .iter()
            .take_while(|(t, _)| cut.is_none_or(|cut| *t < cut))
            .map(|(t, id)| (id.clone(), *t))
            .collect()
    }

    /// Forgets entries that were handed over (a newer presumption of the same job stands).
    fn forget(&self, entries: &[(String, DateTime<Utc>)]) {
        let mut s = self.state();
        for (id, t) in entries {
            s.release(id, *t);
        }
    }

    /// An outcome batch failed for `id` after its statement may have committed (the answer,
    /// or the read after it, was lost): its row may be presumed out at any time from `floor`
    /// on, and nobody will publish it. Held at `floor` until it is handed to the outbox.
    pub(super) fn in_doubt(&self, id: &str, floor: DateTime<Utc>) {
        let mut s = self.state();
        if s.unconfirmed.get(id).is_none_or(|t| *t > floor) {
            s.hold(id, floor);
        }
        // The worker's first batch: no row told the database's time yet, and an idle worker
        // may write none for long. Counting from the floor now makes the entry due once it has
        // waited, as any other; the floor only lies earlier than the database's clock, so the
        // next batch's floor and the watermark stay safe.
        if s.latest.is_none() {
            s.latest = Some((floor, Instant::now()));
        }
    }

    /// Hands the entries older than `age` (all with `None`) to the outbox. They stay waiting,
    /// and hold the watermark, until that has committed.
    async fn hand_over(&self, pool: &PgPool, age: Option<Duration>) -> Result<usize, StoreError> {
        let _turn = self.handing_over.lock().await;
        let due = self.overdue(age);
        if due.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = due.iter().map(|(id, _)| id.as_str()).collect();
        let at: Vec<DateTime<Utc>> = due.iter().map(|(_, t)| *t).collect();
        // Only a row still presumed as of that outcome or a later one (an entry in doubt
        // holds its batch's floor): one a confirm marked meanwhile, or a reconciliation
        // finished again, keeps what it has.
        sqlx::query(
            "UPDATE sms_jobs SET result_published_at = NULL
             FROM unnest($1::text[], $2::timestamptz[]) AS t(t_id, t_finished)
             WHERE id = t_id AND finished_at >= t_finished AND result_published_at = finished_at",
        )
        .bind(&ids)
        .bind(&at)
        .execute(pool)
        .await?;
        self.forget(&due);
        Ok(due.len())
    }

    /// For a clean stop, once every job is done: lets the outcome batch being written finish
    /// and presumes nothing after it, then hands what is still unconfirmed to the outbox, so
    /// the worker's row can go. An error means some results rest on the watermark still, and
    /// the row must stay for the sweeper.
    pub(super) async fn hand_over_all(&self, pool: &PgPool) -> Result<(), StoreError> {
        self.stopped.store(true, Ordering::SeqCst);
        drop(self.batch.write().await);
        self.hand_over(pool, None).await.map(|_| ())
    }

    /// Taken (shared) by an outcome batch from its choice to presume until it took note of
    /// what it wrote; a stop takes it alone to wait for that batch.
    pub(super) async fn batch_turn(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.batch.read().await
    }

    /// Whether a batch may still presume (the stop's hand-over has not begun).
    pub(super) fn presuming(&self) -> bool {
        !self.stopped.load(Ordering::SeqCst)
    }

    pub(super) fn is_settled(&self) -> bool {
        self.state().unconfirmed.is_empty()
    }
}

/// Keeps the owner's watermark in its `sms_workers` row, and hands results whose confirm is
/// long overdue to the outbox. Ends with the store, or when it is abandoned.
pub(super) fn spawn_keeper(
    pool: PgPool,
    presumed: &Arc<Presumed>,
    hand_over_after: Duration,
    abandoned: tokio::sync::watch::Receiver<bool>,
) {
    let presumed: Weak<Presumed> = Arc::downgrade(presumed);
    tokio::spawn(super::batch::until_abandoned(abandoned, async move {
        let mut written: Option<DateTime<Utc>> = None;
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(presumed) = presumed.upgrade() else {
                return;
            };
            let Some(&owner) = presumed.owner.get() else {
                continue;
            };
            let handed =
                tokio::time::timeout(PATIENCE, presumed.hand_over(&pool, Some(hand_over_after)))
                    .await;
            match handed {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::warn!(
                    results = n,
                    "results RabbitMQ has not confirmed for {hand_over_after:?} handed to the outbox"
                ),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "overdue results not handed to the outbox; next tick");
                }
                Err(_) => tracing::warn!(
                    "handing overdue results to the outbox took over {PATIENCE:?}; next tick"
                ),
            }
            let mark = presumed.watermark();
            if mark.is_none() || mark == written {
                continue;
            }
            let wrote = tokio::time::timeout(
                PATIENCE,
                sqlx::query("UPDATE sms_workers SET results_confirmed_through = $2 WHERE id = $1")
                    .bind(owner)
                    .bind(mark)
                    .execute(&pool),
            )
            .await;
            match wrote {
                Ok(Ok(_)) => written = mark,
                Ok(Err(e)) => tracing::debug!(error = %e, "watermark not written; next tick"),
                Err(_) => tracing::debug!("watermark not written within {PATIENCE:?}; next tick"),
            }
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, owner: Uuid, at: DateTime<Utc>) -> JobRow {
        JobRow {
            id: id.to_owned(),
            job_type: "send_verify_code".into(),
            status: "sent".into(),
            phone_number: None,
            biz_id: None,
            request_id: None,
            code: None,
            message: None,
            attempts: 1,
            claimed_by: Some(owner),
            lease_until: None,
            finished_at: Some(at),
            reply_to: None,
            correlation_id: None,
            created_at: at,
            called_at: Some(at),
            result_published_at: Some(at),
        }
    }

    #[test]
    fn the_watermark_stays_at_the_earliest_unconfirmed_result() {
        let me = Uuid::new_v4();
        let p = Presumed::default();
        assert!(p.presumes_for(me));
        assert!(!p.presumes_for(Uuid::new_v4()), "one owner per store");
        assert_eq!(p.watermark(), None);
        assert_eq!(p.floor(), None);
        let t0 = Utc::now();
        let t1 = t0 + TimeDelta::milliseconds(3);
        p.wrote(&[row("a", me, t0), row("b", me, t0), row("c", me, t1)]);
        assert_eq!(p.watermark(), Some(t0));
        assert_eq!(p.floor(), Some(t1 + TICK_OF_CLOCK));
        assert!(p.confirmed("a", t0));
        assert!(!p.confirmed("a", t0), "confirmed once");
        assert_eq!(p.watermark(), Some(t0), "b is still out");
        assert!(p.confirmed("b", t0));
        assert_eq!(p.watermark(), Some(t1));
        assert!(
            !p.confirmed("c", t0),
            "a result as of another outcome is marked"
        );
        assert!(p.confirmed("c", t1));
        assert_eq!(p.watermark(), Some(t1 + TICK_OF_CLOCK));
        assert!(p.is_settled());
    }

    #[test]
    fn rows_not_presumed_by_the_owner_are_not_waited_for() {
        let me = Uuid::new_v4();
        let p = Presumed::default();
        assert!(p.presumes_for(me));
        let t = Utc::now();
        let mut marked = row("marked", me, t);
        marked.result_published_at = None;
        let mut sending = row("sending", me, t);
        sending.status = "sending".into();
        p.wrote(&[
            marked,
            sending,
            row("other", Uuid::new_v4(), t),
            JobRow {
                result_published_at: Some(t + TICK_OF_CLOCK),
                ..row("later mark", me, t)
            },
        ]);
        assert!(p.is_settled());
        assert_eq!(p.watermark(), None);
    }

    #[test]
    fn a_presumed_result_is_handed_over_well_within_the_republish_delay() {
        assert_eq!(
            hand_over_after(Duration::from_secs(30)),
            Duration::from_secs(2)
        );
        for ms in [500, 1_000, 2_100, 8_000] {
            let republish = Duration::from_millis(ms);
            let wait = hand_over_after(republish);
            assert!(
                wait + TICK * 2 < republish,
                "{ms} ms: a result may hold the watermark {wait:?}"
            );
        }
    }

    #[test]
    fn only_overdue_entries_are_due_and_they_hold_the_watermark_until_forgotten() {
        let me = Uuid::new_v4();
        let p = Presumed::default();
        assert!(p.presumes_for(me));
        let now = Utc::now();
        let old = now - TimeDelta::seconds(5);
        p.wrote(&[row("old", me, old), row("new", me, now)]);
        let due = p.overdue(Some(Duration::from_secs(2)));
        assert_eq!(due, vec![("old".to_owned(), old)]);
        assert_eq!(p.watermark(), Some(old), "not handed over yet");
        p.forget(&due);
        assert_eq!(p.watermark(), Some(now), "the old one is the outbox's now");
        assert!(!p.confirmed("old", old), "a late confirm of it is marked");
        // A batch whose answer was lost: its row may be presumed from the floor on.
        let floor = now + TICK_OF_CLOCK;
        p.in_doubt("lost", floor);
        p.in_doubt("new", floor);
        assert_eq!(p.watermark(), Some(now), "an earlier entry is kept");
        assert!(p.confirmed("new", now));
        assert_eq!(p.watermark(), Some(floor));
        assert_eq!(p.overdue(None).len(), 1);
        p.forget(&p.overdue(None));
        assert!(p.is_settled());
    }

    #[test]
    fn a_first_batch_in_doubt_is_handed_over_though_nothing_else_is_written() {
        let me = Uuid::new_v4();
        let p = Presumed::default();
        assert!(p.presumes_for(me));
        // The worker's first outcome batch lost its answer: it may have been presumed out at
        // any time, and no later batch may come to tell the database's time.
        p.in_doubt("lost", DateTime::UNIX_EPOCH);
        assert_eq!(p.watermark(), Some(DateTime::UNIX_EPOCH));
        let age = Duration::from_millis(1);
        // Time passing is what is tested: the entry is due once it waited `age`.
        std::thread::sleep(age * 2);
        assert_eq!(
            p.overdue(Some(age)),
            vec![("lost".to_owned(), DateTime::UNIX_EPOCH)]
        );
    }
}
