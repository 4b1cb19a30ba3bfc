//! When the statements the write watch times began, while they run (on a job's way: a batched
//! lane's, a guarded claim's transaction, a takeover, an attempt, a replayed row; and the
//! leader's duties), so the watch can tell one whose connection went silent (see
//! `worker::silent_write`). Each holds its job, a lane's every job behind it, the leader's the
//! fleet's duties, and nothing else would notice.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Default)]
pub(super) struct InFlight {
    began: Mutex<Began>,
}

/// The marks by the order they began in, so the first is the oldest; with what each is. An id
/// and its instant are taken under one lock, so a later id never holds an earlier instant.
#[derive(Default)]
struct Began {
    next: u64,
    marks: BTreeMap<u64, (&'static str, Instant)>,
}

impl Began {
    fn insert(&mut self, what: &'static str) -> u64 {
        let id = self.next;
        self.next += 1;
        self.marks.insert(id, (what, Instant::now()));
        id
    }
}

impl InFlight {
    /// Marks `what` as begun; it counts until the mark is dropped, however it ends.
    pub(super) fn begin(self: &Arc<Self>, what: &'static str) -> Mark {
        let id = self.began().insert(what);
        Mark {
            of: self.clone(),
            id,
        }
    }

    /// Those still running that began more than `age` ago, the oldest first.
    pub(super) fn older_than(&self, age: Duration) -> Vec<Waiting> {
        let now = Instant::now();
        self.began()
            .marks
            .iter()
            .map(|(id, (what, began))| Waiting {
                id: *id,
                what,
                began: *began,
            })
            .take_while(|w| now.saturating_duration_since(w.began) > age)
            .collect()
    }

    fn began(&self) -> MutexGuard<'_, Began> {
        self.began.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A statement under way, as [`InFlight::older_than`] tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    /// Which mark: a statement told twice is the same one only if this is.
    id: u64,
    pub what: &'static str,
    pub began: Instant,
}

impl Waiting {
    /// Whether `other` is this same statement, told again.
    pub fn is(&self, other: &Waiting) -> bool {
        self.id == other.id
    }
}

pub(super) struct Mark {
    of: Arc<InFlight>,
    id: u64,
}

impl Mark {
    /// The marked work goes on with another transaction: it counts from now, and last in order.
    pub(super) fn restart(&mut self) {
        let mut began = self.of.began();
        if let Some((what, _)) = began.marks.remove(&self.id) {
            self.id = began.insert(what);
        }
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        self.of.began().marks.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(told: &[Waiting]) -> Vec<&'static str> {
        told.iter().map(|w| w.what).collect()
    }

    #[test]
    fn those_waiting_longer_than_an_age_are_told_oldest_first_until_they_end_or_restart() {
        let in_flight = Arc::new(InFlight::default());
        assert!(in_flight.older_than(Duration::ZERO).is_empty());
        let first = in_flight.begin("guarded claim");
        let mut second = in_flight.begin("claim");
        std::thread::sleep(Duration::from_millis(300));
        let third = in_flight.begin("attempt");
        // Far from both: a thread paused for a while on a busy machine changes nothing.
        let age = Duration::from_millis(150);
        let told = in_flight.older_than(age);
        assert_eq!(names(&told), ["guarded claim", "claim"]);
        second.restart();
        let again = in_flight.older_than(age);
        assert_eq!(
            names(&again),
            ["guarded claim"],
            "a restarted one counts anew"
        );
        assert!(again[0].is(&told[0]) && !again[0].is(&told[1]));
        drop(first);
        assert!(
            in_flight.older_than(age).is_empty(),
            "an ended one no longer counts"
        );
        drop((second, third));
        assert!(in_flight.older_than(Duration::ZERO).is_empty());
    }
}
