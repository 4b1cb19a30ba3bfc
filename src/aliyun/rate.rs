//! A token bucket per Aliyun action, so a burst of jobs becomes a steady stream of calls rather
//! than a `Throttling.User` storm (each throttled answer would cost a retry and a delay anyway).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

pub struct RateLimiter {
    per_second: f64,
    /// The burst a bucket allows: a tenth of a second's worth, so no one-second window ever
    /// sees much more than `per_second` calls.
    capacity: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        Self {
            per_second,
            capacity: (per_second / 10.0).max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `action` may be called; says how long that took (zero when a token was
    /// there), which is what the rate-limit metrics count.
    pub async fn acquire(&self, action: &str) -> Duration {
        let mut waited = None;
        loop {
            match self.try_take(action) {
                None => return waited.map_or(Duration::ZERO, |since: Instant| since.elapsed()),
                Some(d) => {
                    waited.get_or_insert_with(Instant::now);
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    /// Takes a token, or says how long until one is there.
    fn try_take(&self, action: &str) -> Option<Duration> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bucket = buckets.entry(action.to_owned()).or_insert(Bucket {
            tokens: self.capacity,
            refilled: now,
        });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.capacity);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_spread_to_the_rate() {
        let limiter = RateLimiter::new(100);
        let start = Instant::now();
        for _ in 0..110 {
            limiter.acquire("SendSms").await;
        }
        // 10 from the burst allowance, then 100 at 100/s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(990), "{took:?}");
        assert!(took <= Duration::from_millis(1100), "{took:?}");
        // Another action has its own bucket.
        let before = Instant::now();
        assert_eq!(limiter.acquire("CheckSmsVerifyCode").await, Duration::ZERO);
        assert_eq!(before.elapsed(), Duration::ZERO);
        // An empty bucket makes the caller wait, and says for how long.
        let waited = limiter.acquire("SendSms").await;
        assert!(waited >= Duration::from_millis(9), "{waited:?}");
    }
}
