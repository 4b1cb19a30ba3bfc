//! When the statements on a job's way began, while they run (a batched lane's, a guarded
//! claim's transaction, a takeover, an attempt, a replayed row), so the write watch can tell
//! one whose connection went silent (see `worker::silent_write`). Each holds its job, a lane's
//! every job behind it, and nothing else would notice.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Default)]
pub(super) struct InFlight {
    next: AtomicU64,
    /// By the order they began in, so the first is the oldest; with what each is.
    began: Mutex<BTreeMap<u64, (&'static str, Instant)>>,
}

impl InFlight {
    /// Marks `what` as begun; it counts until the mark is dropped, however it ends.
    pub(super) fn begin(self: &Arc<Self>, what: &'static str) -> Mark {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.began().insert(id, (what, Instant::now()));
        Mark {
            of: self.clone(),
            id,
        }
    }

    /// The oldest one still running, and how long it has waited.
    pub(super) fn longest(&self) -> Option<(&'static str, Duration)> {
        self.began()
            .first_key_value()
            .map(|(_, (what, began))| (*what, began.elapsed()))
    }

    fn began(&self) -> MutexGuard<'_, BTreeMap<u64, (&'static str, Instant)>> {
        self.began.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) struct Mark {
    of: Arc<InFlight>,
    id: u64,
}

impl Drop for Mark {
    fn drop(&mut self) {
        self.of.began().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_running_one_is_told_and_an_ended_one_no_longer_counts() {
        let in_flight = Arc::new(InFlight::default());
        assert_eq!(in_flight.longest(), None);
        let first = in_flight.begin("guarded claim");
        std::thread::sleep(Duration::from_millis(20));
        let before_second = Instant::now();
        let second = in_flight.begin("attempt");
        let (what, oldest) = in_flight.longest().unwrap_or(("none", Duration::ZERO));
        assert_eq!(what, "guarded claim");
        assert!(oldest >= Duration::from_millis(20), "{oldest:?}");
        drop(first);
        let (what, now) = in_flight.longest().unwrap_or(("none", Duration::MAX));
        assert_eq!(what, "attempt", "the ended one still counts");
        assert!(now <= before_second.elapsed(), "{now:?}");
        drop(second);
        assert_eq!(in_flight.longest(), None);
    }
}
