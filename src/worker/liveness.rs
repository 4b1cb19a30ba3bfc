//! What this process can tell of itself without asking the database: since when, and until
//! when, no other worker of the fleet can have taken it for dead.
//!
//! Another worker judges a claim stale from the owner's heartbeat (five beats without one) or
//! its lease (see `store::fleet`), on the database's clock. A heartbeat's `heartbeat_at` lies
//! between the moment its statement was sent and the moment it committed, both read here. So
//! this process is safe until five beats after its latest beat was sent; and it has been safe
//! without a break since `since` as long as each beat committed within five beats of the one
//! before was sent. A break (a pause, an outage) means another worker may have ended this
//! one's claims meanwhile: a claim is only known to be ours again when confirmed after it.
//!
//! Time here is a [`Moment`]: the monotonic clock goes on through SIGSTOP but not, on every
//! host, through a suspended machine or a paused VM, after which the wall clock is set right;
//! the longer of the two spans is taken, so either kind of pause counts.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

/// How many beats without one make a worker stale to the others (see `store::fleet`).
const STALE_AFTER_BEATS: u32 = 5;

/// A point in time on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    mono: Instant,
    wall: SystemTime,
}

impl Moment {
    pub fn now() -> Self {
        Self {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// How long from `earlier` to `self`: the longer of the two clocks' spans, zero if both
    /// went back.
    pub fn since(&self, earlier: &Moment) -> Duration {
        let mono = self.mono.saturating_duration_since(earlier.mono);
        let wall = self.wall.duration_since(earlier.wall).unwrap_or_default();
        mono.max(wall)
    }

    /// Whether `self` came after `other` (by the monotonic clock, which never goes back).
    pub fn is_after(&self, other: &Moment) -> bool {
        self.mono > other.mono
    }

    /// The moment `earlier` was, on the monotonic clock, with the wall time it had then as
    /// best it can be told now.
    pub fn before(earlier: Instant) -> Self {
        let now = Self::now();
        Self {
            mono: earlier,
            wall: now
                .wall
                .checked_sub(now.mono.saturating_duration_since(earlier))
                .unwrap_or(now.wall),
        }
    }

    pub fn elapsed(&self) -> Duration {
        Moment::now().since(self)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Beats {
    /// When the latest beat that committed was sent.
    last_sent: Option<Moment>,
    /// Since when the beats have followed each other without a stale moment.
    since: Option<Moment>,
}

pub struct Liveness {
    every: Duration,
    beats: watch::Sender<Beats>,
}

impl Liveness {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            beats: watch::Sender::new(Beats::default()),
        }
    }

    fn stale_after(&self) -> Duration {
        self.every * STALE_AFTER_BEATS
    }

    /// A heartbeat sent at `sent` committed at `committed`.
    pub fn beat(&self, sent: Moment, committed: Moment) {
        let stale_after = self.stale_after();
        self.beats.send_modify(|b| match b.last_sent {
            Some(last) if committed.since(&last) < stale_after => {
                if sent.is_after(&last) {
                    b.last_sent = Some(sent);
                }
            }
            _ => {
                b.last_sent = Some(sent);
                b.since = Some(committed);
            }
        });
    }

    /// Whether, for `margin` from now, no other worker can judge this one stale by its
    /// heartbeat.
    pub fn covers(&self, margin: Duration) -> bool {
        self.beats
            .borrow()
            .last_sent
            .is_some_and(|at| at.elapsed() + margin < self.stale_after())
    }

    /// Whether a claim confirmed at `at` is known to be this worker's still: confirmed since
    /// the last break, and within its `lease` for `margin` more.
    pub fn holds(&self, at: &Moment, lease: Duration, margin: Duration) -> bool {
        let since = self.beats.borrow().since;
        since.is_some_and(|s| !s.is_after(at)) && at.elapsed() + margin < lease
    }

    /// Waits (at most a beat) for a heartbeat sent after `after`.
    pub async fn beat_after(&self, after: Moment) {
        let mut beats = self.beats.subscribe();
        let _ = tokio::time::timeout(
            self.every,
            beats.wait_for(|b| b.last_sent.is_some_and(|at| at.is_after(&after))),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Moment, secs: u64) -> Moment {
        Moment {
            mono: base.mono + Duration::from_secs(secs),
            wall: base.wall + Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_run_of_beats_holds_claims_confirmed_within_it_and_a_break_ends_it() {
        let live = Liveness::new(Duration::from_secs(2));
        let lease = Duration::from_secs(60);
        let margin = Duration::from_secs(2);
        let t0 = Moment::now();
        assert!(!live.covers(margin), "not before its first beat");
        live.beat(t0, t0);
        assert!(live.covers(margin));
        let claimed = Moment::now();
        assert!(live.holds(&claimed, lease, margin));
        // Beats in rhythm keep the run going; one that committed late but was sent earlier
        // proves nothing newer.
        live.beat(at(t0, 2), at(t0, 2));
        live.beat(at(t0, 1), at(t0, 9));
        assert_eq!(live.beats.borrow().last_sent, Some(at(t0, 2)));
        assert!(live.holds(&claimed, lease, margin));
        // Paused: the next beat commits after the last one's five beats ran out. A claim
        // confirmed before may have been taken meanwhile.
        live.beat(at(t0, 30), at(t0, 31));
        assert!(!live.holds(&claimed, lease, margin));
        assert!(live.holds(&at(t0, 32), lease, margin));
    }

    /// A VM paused, a machine suspended: the monotonic clock may not have moved, the wall
    /// clock has.
    #[test]
    fn a_pause_only_the_wall_clock_saw_counts() {
        let before = Moment::now();
        let after = Moment {
            mono: before.mono + Duration::from_millis(10),
            wall: before.wall + Duration::from_secs(60),
        };
        assert_eq!(after.since(&before), Duration::from_secs(60));
        let stepped_back = Moment {
            mono: before.mono + Duration::from_millis(10),
            wall: before.wall - Duration::from_secs(60),
        };
        assert_eq!(stepped_back.since(&before), Duration::from_millis(10));
        let live = Liveness::new(Duration::from_secs(2));
        live.beat(before, before);
        live.beat(after, after);
        assert_eq!(live.beats.borrow().since, Some(after), "a break");
    }
}
