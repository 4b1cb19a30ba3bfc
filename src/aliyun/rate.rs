//! Pacing of Aliyun calls: at most N calls of one action in any one-second window, for the
//! whole fleet when the schedule is shared (see `store::rate`), so a burst of jobs becomes a
//! steady stream of calls rather than a `Throttling.*` storm.
//!
//! The schedule is GCRA without a burst: every action has a "theoretical arrival time" (TAT),
//! and a reservation of `k` calls takes the `k` slots from `max(TAT, now)` on, `spacing` apart,
//! and moves the TAT past them. Slots are spaced so that N + 1 consecutive ones span
//! [`WINDOW`] plus [`MARGIN`]: a call that leaves up to the margin after its slot (timer
//! wake-up, signing, the network) still cannot make a window hold N + 1 calls.
//!
//! A process reserves as many slots as it has callers waiting (one for a lone job, a block
//! under a backlog, at most a tenth of a second's worth), or, when its callers come steadily,
//! as many as they took in the last [`LOOKAHEAD`] (so that a steady stream finds its slots
//! here instead of asking the shared schedule for each), hands them out in order and lets each
//! caller sleep until its own. A slot nobody takes in time is dropped: a lost slot costs some
//! throughput, never the limit.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

/// The window the limit is about.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Added to the window when spacing slots: the most a call may trail its slot, all delays
/// together, before two calls could crowd one window. A busy machine delays a request by a
/// hundred milliseconds and more between its slot and its arrival (seen on two shared cores
/// with the test suite running), so the margin is a quarter of a second; the fleet then reaches
/// 80 % of the limit.
pub const MARGIN: Duration = Duration::from_millis(250);
/// How late a caller may still use its slot. Later than this, the slot is given up and a new
/// one taken; the rest of [`MARGIN`] is for what happens after the slot (signing, the request
/// reaching Aliyun).
pub const GRACE: Duration = Duration::from_millis(25);

/// How far ahead of its callers a process reserves: the demand of this long, at the rate its
/// callers took slots since the last reservation. Within [`GRACE`] of the first slot, so the
/// callers it is for come before the block is stale.
const LOOKAHEAD: Duration = Duration::from_millis(20);

/// Why a schedule could not hand out slots; the source is the schedule's own error.
pub type ScheduleError = Box<dyn std::error::Error + Send + Sync>;

/// Where slots come from: one process's memory, or a schedule the fleet shares.
pub trait Schedule: Send + Sync {
    /// Reserves `count` consecutive slots of `action`, `spacing` apart, and says how long from
    /// now the first one is (zero when it is now).
    fn reserve<'a>(
        &'a self,
        action: &'a str,
        count: u32,
        spacing: Duration,
    ) -> BoxFuture<'a, Result<Duration, ScheduleError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum PaceError {
    /// The schedule did not answer within the pacer's patience. The call is not made: making
    /// it unpaced would drop the fleet's limit without anyone noticing.
    #[error("the rate-limit schedule did not answer for {waited:?}: {source}")]
    Unavailable {
        waited: Duration,
        #[source]
        source: ScheduleError,
    },
}

/// The time between two slots of an action limited to `per_second`.
pub fn spacing(per_second: u32) -> Duration {
    (WINDOW + MARGIN) / per_second.max(1)
}

/// The most slots one reservation takes: a tenth of a second's worth, so a process never holds
/// much of the fleet's budget, and a backlog at a high limit still needs few round trips.
fn max_block(per_second: u32) -> u32 {
    (per_second / 10).max(1)
}

/// The schedule of one process, for callers without a database (`check-config`) and tests.
#[derive(Default)]
pub struct LocalSchedule {
    tat: std::sync::Mutex<HashMap<String, Instant>>,
}

impl Schedule for LocalSchedule {
    fn reserve<'a>(
        &'a self,
        action: &'a str,
        count: u32,
        spacing: Duration,
    ) -> BoxFuture<'a, Result<Duration, ScheduleError>> {
        let now = Instant::now();
        let mut tat = self
            .tat
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = tat.entry(action.to_owned()).or_insert(now);
        let first = (*next).max(now);
        *next = first + spacing * count;
        Box::pin(std::future::ready(Ok(first - now)))
    }
}

/// Slots reserved by this process for one action and not yet taken.
#[derive(Default)]
struct Reserved {
    slots: tokio::sync::Mutex<Slots>,
    /// Callers of this action waiting for a slot: the size of the next reservation.
    waiting: AtomicU32,
}

#[derive(Default)]
struct Slots {
    due: VecDeque<Instant>,
    /// When the last reservation was made, and how many slots callers took since: the demand
    /// the next reservation looks ahead with.
    reserved_at: Option<Instant>,
    taken: u32,
}

impl Slots {
    /// How many slots the next reservation takes: one per caller waiting, or the callers'
    /// recent demand over [`LOOKAHEAD`] if that is more. The look-ahead is at most a quarter
    /// of `max`: after a burst the demand looks high, and what it reserves for callers who do
    /// not come is lost to the fleet.
    fn next_block(&self, waiting: u32, now: Instant, max: u32) -> u32 {
        let ahead = self
            .reserved_at
            .map(|at| now.saturating_duration_since(at))
            .filter(|since| !since.is_zero())
            .map_or(0.0, |since| {
                f64::from(self.taken) * LOOKAHEAD.as_secs_f64() / since.as_secs_f64()
            });
        // Saturating: a burst's rate over a few microseconds is large, and the cap holds it.
        let ahead = ahead.ceil().min(f64::from(max / 4)) as u32;
        waiting.max(ahead).clamp(1, max)
    }
}

/// Counts a caller as waiting for as long as it lives (a caller that gives up stops counting).
struct Waiting<'a>(&'a AtomicU32);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicU32) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Pacer {
    schedule: Arc<dyn Schedule>,
    per_second: u32,
    /// Actions with a lower limit of their own.
    limits: HashMap<String, u32>,
    /// How long an unreachable schedule is retried before a call gives up.
    patience: Duration,
    reserved: std::sync::Mutex<HashMap<String, Arc<Reserved>>>,
}

impl Pacer {
    pub fn new(schedule: Arc<dyn Schedule>, per_second: u32, patience: Duration) -> Self {
        Self {
            schedule,
            per_second: per_second.max(1),
            limits: HashMap::new(),
            patience,
            reserved: std::sync::Mutex::default(),
        }
    }

    /// The same schedule and limits, with `action` held to `per_second` if that is lower.
    /// The new pacer reserves its own slots.
    pub fn with_limit(&self, action: &str, per_second: u32) -> Self {
        let mut limits = self.limits.clone();
        limits.insert(action.to_owned(), per_second.max(1).min(self.limit(action)));
        Self {
            schedule: self.schedule.clone(),
            per_second: self.per_second,
            limits,
            patience: self.patience,
            reserved: std::sync::Mutex::default(),
        }
    }

    /// Calls of `action` per second at most.
    pub fn limit(&self, action: &str) -> u32 {
        self.limits.get(action).copied().unwrap_or(self.per_second)
    }

    /// Waits until `action` may be called; says how long that took when the caller had to wait
    /// for its slot (zero when one was due), which is what the rate-limit metrics count.
    ///
    /// Dropping the future gives up its slot, if it had one: lost, never handed to another
    /// caller late.
    pub async fn pace(&self, action: &str) -> Result<Duration, PaceError> {
        let started = Instant::now();
        let reserved = self.reserved(action);
        let mut waited = false;
        loop {
            let slot = {
                let _waiting = Waiting::enter(&reserved.waiting);
                self.take(&reserved, action).await?
            };
            if slot > Instant::now() {
                waited = true;
                tokio::time::sleep_until(slot).await;
            }
            if Instant::now() <= slot + GRACE {
                return Ok(if waited {
                    started.elapsed()
                } else {
                    Duration::ZERO
                });
            }
            // Woken too late (a stalled process): calling now could crowd the slots after it.
            waited = true;
        }
    }

    fn reserved(&self, action: &str) -> Arc<Reserved> {
        let mut reserved = self
            .reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reserved.entry(action.to_owned()).or_default().clone()
    }

    /// The next slot still usable, reserving more when there is none. One caller at a time
    /// reserves for all who wait; the lock is fair, so slots go out in the callers' order.
    async fn take(&self, reserved: &Reserved, action: &str) -> Result<Instant, PaceError> {
        // Patience is about the schedule not answering, not about waiting for slots.
        let started = Instant::now();
        let limit = self.limit(action);
        let spacing = spacing(limit);
        let mut slots = reserved.slots.lock().await;
        let mut retry_in = Duration::from_millis(50);
        loop {
            let now = Instant::now();
            while slots.due.front().is_some_and(|s| *s + GRACE < now) {
                slots.due.pop_front();
            }
            if let Some(slot) = slots.due.pop_front() {
                slots.taken = slots.taken.saturating_add(1);
                return Ok(slot);
            }
            let count = slots.next_block(
                reserved.waiting.load(Ordering::Relaxed),
                now,
                max_block(limit),
            );
            slots.reserved_at = Some(now);
            slots.taken = 0;
            let left = self.patience.saturating_sub(started.elapsed());
            let failure =
                match tokio::time::timeout(left, self.schedule.reserve(action, count, spacing))
                    .await
                {
                    Ok(Ok(first)) => {
                        let first = Instant::now() + first;
                        slots.due.extend((0..count).map(|i| first + spacing * i));
                        continue;
                    }
                    Ok(Err(e)) => e,
                    Err(elapsed) => Box::new(elapsed) as ScheduleError,
                };
            let waited = started.elapsed();
            if waited + retry_in >= self.patience {
                return Err(PaceError::Unavailable {
                    waited,
                    source: failure,
                });
            }
            tracing::warn!(action, error = %failure, retry_in_ms = retry_in.as_millis() as u64,
                "rate-limit schedule unavailable; the call waits for it");
            tokio::time::sleep(retry_in).await;
            retry_in = (retry_in * 2).min(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The most instants in any window [t, t + WINDOW).
    fn busiest_window(mut at: Vec<Instant>) -> usize {
        at.sort();
        (0..at.len())
            .map(|i| at[i..].iter().take_while(|t| **t - at[i] < WINDOW).count())
            .max()
            .unwrap_or(0)
    }

    /// A local schedule one millisecond away, like a database, that remembers the size of
    /// every reservation.
    #[derive(Default)]
    struct Remote {
        inner: LocalSchedule,
        counts: Mutex<Vec<u32>>,
    }

    impl Schedule for Remote {
        fn reserve<'a>(
            &'a self,
            action: &'a str,
            count: u32,
            spacing: Duration,
        ) -> BoxFuture<'a, Result<Duration, ScheduleError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                self.counts.lock().unwrap().push(count);
                self.inner.reserve(action, count, spacing).await
            })
        }
    }

    fn pacer(schedule: Arc<dyn Schedule>, per_second: u32) -> Arc<Pacer> {
        Arc::new(Pacer::new(schedule, per_second, Duration::from_secs(5)))
    }

    #[tokio::test(start_paused = true)]
    async fn three_pacers_on_one_schedule_stay_within_the_limit_and_near_it() {
        let schedule: Arc<dyn Schedule> = Arc::new(Remote::default());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let run_for = Duration::from_secs(10);
        let mut tasks = Vec::new();
        // Three processes of 32 callers each, with a backlog.
        for _ in 0..3 {
            let pacer = pacer(schedule.clone(), 20);
            for _ in 0..32 {
                let (pacer, calls) = (pacer.clone(), calls.clone());
                tasks.push(tokio::spawn(async move {
                    while start.elapsed() < run_for {
                        pacer.pace("SendSms").await.unwrap();
                        calls.lock().unwrap().push(Instant::now());
                    }
                }));
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        let calls = calls.lock().unwrap().clone();
        assert!(busiest_window(calls.clone()) <= 20);
        // 20 calls per 1.25 s: what the margin leaves of the limit.
        assert!(calls.len() >= 155, "{} calls in 10 s", calls.len());
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_follow_the_demand() {
        let schedule = Arc::new(Remote::default());
        let pacer = pacer(schedule.clone(), 1000);
        // One caller at a time, and no wait at an idle schedule: the first reservation is for
        // one; then callers come steadily, and each reservation is for what they took over the
        // look-ahead, so a steady stream asks the schedule less often than it calls.
        for _ in 0..10 {
            assert_eq!(pacer.pace("SendSms").await.unwrap(), Duration::ZERO);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let steady = schedule.counts.lock().unwrap().clone();
        assert_eq!(steady[0], 1, "{steady:?}");
        assert!(steady.len() <= 6, "{steady:?}");
        assert!(steady.iter().all(|c| *c <= 3), "{steady:?}");
        // Fifty at once: larger blocks, never more than a tenth of a second's worth.
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let pacer = pacer.clone();
                tokio::spawn(async move { pacer.pace("SendSms").await.unwrap() })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let counts = schedule.counts.lock().unwrap().clone();
        let blocks = &counts[steady.len()..];
        // Sixty calls in all; what the look-ahead may reserve beyond them is a quarter of the
        // largest block.
        let reserved = counts.iter().sum::<u32>();
        assert!((60..=60 + 25).contains(&reserved), "{counts:?}");
        assert!(blocks.len() < 10, "{counts:?}");
        assert!(blocks.iter().all(|c| *c <= 100), "{counts:?}");
        // Another action has its own schedule.
        assert_eq!(
            pacer.pace("CheckSmsVerifyCode").await.unwrap(),
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_given_up_or_taken_late_is_lost_not_crowded() {
        let schedule = Arc::new(Remote::default());
        let pacer = pacer(schedule.clone(), 100);
        let calls = Arc::new(Mutex::new(Vec::new()));
        // Ten callers at once that give up after 1.5 ms: one is served at once, the next
        // reserves for the nine who wait, and all but it leave their slots behind.
        let quitters: Vec<_> = (0..10)
            .map(|_| {
                let (pacer, calls) = (pacer.clone(), calls.clone());
                tokio::spawn(async move {
                    let paced = pacer.pace("SendSms");
                    if let Ok(Ok(_)) =
                        tokio::time::timeout(Duration::from_micros(1500), paced).await
                    {
                        calls.lock().unwrap().push(Instant::now());
                    }
                })
            })
            .collect();
        for quitter in quitters {
            quitter.await.unwrap();
        }
        assert!(
            schedule.counts.lock().unwrap().iter().any(|c| *c > 5),
            "a block was reserved: {:?}",
            schedule.counts.lock().unwrap()
        );
        // Half-way through the abandoned slots, a burst: the past ones are not used late.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..150 {
            pacer.pace("SendSms").await.unwrap();
            calls.lock().unwrap().push(Instant::now());
        }
        let calls = calls.lock().unwrap().clone();
        assert!(busiest_window(calls.clone()) <= 100, "{calls:?}");
        for pair in calls.windows(2) {
            assert!(
                pair[1] - pair[0] >= spacing(100) - Duration::from_millis(1),
                "{calls:?}"
            );
        }
        // A wait is reported as such.
        let waited = pacer.pace("SendSms").await.unwrap();
        assert!(
            waited >= spacing(100) - Duration::from_millis(1),
            "{waited:?}"
        );
    }

    struct Unreachable;

    impl Schedule for Unreachable {
        fn reserve<'a>(
            &'a self,
            _: &'a str,
            _: u32,
            _: Duration,
        ) -> BoxFuture<'a, Result<Duration, ScheduleError>> {
            Box::pin(std::future::ready(Err("connection refused".into())))
        }
    }

    /// Never answers, like a database behind a cut link.
    struct Hanging;

    impl Schedule for Hanging {
        fn reserve<'a>(
            &'a self,
            _: &'a str,
            _: u32,
            _: Duration,
        ) -> BoxFuture<'a, Result<Duration, ScheduleError>> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_schedule_fails_the_call_after_the_patience() {
        for schedule in [
            Arc::new(Unreachable) as Arc<dyn Schedule>,
            Arc::new(Hanging) as Arc<dyn Schedule>,
        ] {
            let pacer = Pacer::new(schedule, 100, Duration::from_secs(3));
            let start = Instant::now();
            let err = pacer.pace("SendSms").await.unwrap_err();
            let took = start.elapsed();
            assert!(took <= Duration::from_secs(3), "{took:?}");
            assert!(took >= Duration::from_secs(2), "{took:?}");
            assert!(err.to_string().contains("rate-limit schedule"), "{err}");
        }
    }

    #[test]
    fn limit_plus_one_slots_span_more_than_the_window() {
        for per_second in [1, 5, 20, 1000, 100_000] {
            let span = spacing(per_second) * per_second;
            assert!(
                span >= WINDOW + MARGIN - Duration::from_micros(1),
                "{span:?}"
            );
            assert!(GRACE < MARGIN);
        }
        let pacer = Pacer::new(Arc::new(LocalSchedule::default()), 1000, Duration::ZERO);
        let receipts = pacer.with_limit("QuerySendDetails", 50);
        assert_eq!(receipts.limit("QuerySendDetails"), 50);
        assert_eq!(receipts.limit("SendSms"), 1000);
        // A per-action limit never raises the general one.
        assert_eq!(pacer.with_limit("SendSms", 5000).limit("SendSms"), 1000);
    }
}
