//! What this process can tell of itself without asking the database: since when, and until
//! when, no other worker of the fleet can have taken it for dead.
//!
//! Another worker judges a claim stale from the owner's heartbeat (five beats without one) or
//! its lease (see `store::fleet`), on the database's clock. A heartbeat's `heartbeat_at` lies
//! between the moment its statement was sent and the moment it committed, both read here on
//! the monotonic clock, which goes on running while the process is paused. So this process is
//! safe until five beats after its latest beat was sent; and it has been safe without a break
//! since `since` as long as each beat committed within five beats of the one before was sent.
//! A break (a pause, an outage) means another worker may have ended this one's claims
//! meanwhile: a claim is only known to be ours again when confirmed after the break.

use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How many beats without one make a worker stale to the others (see `store::fleet`).
const STALE_AFTER_BEATS: u32 = 5;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Beats {
    /// When the latest beat that committed was sent.
    last_sent: Option<Instant>,
    /// Since when the beats have followed each other without a stale moment.
    since: Option<Instant>,
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
    pub fn beat(&self, sent: Instant, committed: Instant) {
        let stale_after = self.stale_after();
        self.beats.send_modify(|b| match b.last_sent {
            Some(last) if committed < last + stale_after => {
                b.last_sent = Some(last.max(sent));
            }
            _ => {
                b.last_sent = Some(sent);
                b.since = Some(committed);
            }
        });
    }

    /// Until when no other worker can judge this one stale by its heartbeat.
    pub fn safe_until(&self) -> Option<Instant> {
        self.beats
            .borrow()
            .last_sent
            .map(|at| at + self.stale_after())
    }

    /// Since when this worker has been safe without a break: a claim confirmed before then
    /// may have been ended by another worker.
    pub fn safe_since(&self) -> Option<Instant> {
        self.beats.borrow().since
    }

    /// Waits (at most a beat) for a heartbeat sent after `after`.
    pub async fn beat_after(&self, after: Instant) {
        let mut beats = self.beats.subscribe();
        let _ = tokio::time::timeout(
            self.every,
            beats.wait_for(|b| b.last_sent.is_some_and(|at| at > after)),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_for_five_beats_after_the_latest_beat_was_sent_and_since_the_last_break() {
        let live = Liveness::new(Duration::from_secs(2));
        assert_eq!(live.safe_until(), None, "not before its first beat");
        let t0 = Instant::now();
        let s = Duration::from_secs;
        live.beat(t0, t0 + Duration::from_millis(5));
        assert_eq!(live.safe_until(), Some(t0 + s(10)));
        let first = live.safe_since();
        assert_eq!(first, Some(t0 + Duration::from_millis(5)));
        // Beats in rhythm keep the run going.
        live.beat(t0 + s(2), t0 + s(2));
        live.beat(t0 + s(4), t0 + s(9));
        assert_eq!(live.safe_until(), Some(t0 + s(14)));
        assert_eq!(live.safe_since(), first);
        // A beat that committed late, but was sent earlier, proves nothing newer.
        live.beat(t0 + s(3), t0 + s(10));
        assert_eq!(live.safe_until(), Some(t0 + s(14)));
        // Paused: the next beat commits after the last one's five beats ran out. Whatever was
        // confirmed before may have been taken meanwhile.
        live.beat(t0 + s(30), t0 + s(31));
        assert_eq!(live.safe_until(), Some(t0 + s(40)));
        assert_eq!(live.safe_since(), Some(t0 + s(31)));
    }
}
