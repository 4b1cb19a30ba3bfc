//! When the worker's transactions outside the batched lanes began (the guarded claims), so the
//! heartbeat can tell one whose connection went silent (see `worker::silent_write`). A lane
//! keeps its own mark: it writes one batch at a time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Default)]
pub(super) struct InFlight {
    next: AtomicU64,
    /// By the order they began in, so the first is the oldest.
    began: Mutex<BTreeMap<u64, Instant>>,
}

impl InFlight {
    /// Marks a transaction as begun; it counts until the mark is dropped, however it ends.
    pub(super) fn begin(self: &Arc<Self>) -> Mark {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.began().insert(id, Instant::now());
        Mark {
            of: self.clone(),
            id,
        }
    }

    /// How long the oldest transaction still running has waited.
    pub(super) fn longest(&self) -> Option<Duration> {
        self.began()
            .first_key_value()
            .map(|(_, began)| began.elapsed())
    }

    fn began(&self) -> MutexGuard<'_, BTreeMap<u64, Instant>> {
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
    fn the_oldest_running_transaction_is_the_one_told_and_an_ended_one_no_longer_counts() {
        let in_flight = Arc::new(InFlight::default());
        assert_eq!(in_flight.longest(), None);
        let first = in_flight.begin();
        std::thread::sleep(Duration::from_millis(20));
        let before_second = Instant::now();
        let second = in_flight.begin();
        let oldest = in_flight.longest().unwrap_or_default();
        assert!(oldest >= Duration::from_millis(20), "{oldest:?}");
        drop(first);
        let now = in_flight.longest().unwrap_or_default();
        assert!(
            now <= before_second.elapsed(),
            "the ended one still counts: {now:?}"
        );
        drop(second);
        assert_eq!(in_flight.longest(), None);
    }
}
