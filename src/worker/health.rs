//! Whether the database is reachable, as the pipeline last saw it.
//!
//! A failed database call flips the gate shut: the consume loop stops taking deliveries and a
//! probe retries the connection with backoff until it answers, then opens the gate again. So
//! an outage costs no Aliyun call and no churn of requeued messages, and needs no restart.

use std::sync::{Arc, Weak};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;

use crate::store::Store;

#[derive(Clone)]
pub struct DbHealth {
    ok: Arc<watch::Sender<bool>>,
    store: Store,
}

impl DbHealth {
    pub fn new(store: Store) -> Self {
        Self {
            ok: Arc::new(watch::Sender::new(true)),
            store,
        }
    }

    pub fn is_ok(&self) -> bool {
        *self.ok.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.ok.subscribe()
    }

    /// Reports a failed database call; the first report of an outage starts the probe.
    pub fn failed(&self) {
        let was_ok = self.ok.send_replace(false);
        if was_ok {
            tracing::warn!("database unreachable: pausing consumption until it answers");
            tokio::spawn(probe(Arc::downgrade(&self.ok), self.store.clone()));
        }
    }

    /// Waits until the database answers again.
    pub async fn wait_ok(&self) {
        let mut rx = self.ok.subscribe();
        // Err means the sender is gone: nothing left to wait for.
        let _ = rx.wait_for(|ok| *ok).await;
    }
}

/// Pings until the database answers, or until nobody holds the gate any more (the run that
/// started it has returned): it holds only a weak reference to the gate, so a process that
/// lives on after its run is not left pinging for as long as the database stays away.
async fn probe(ok: Weak<watch::Sender<bool>>, store: Store) {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
        if ok.strong_count() == 0 {
            return;
        }
        if store.ping().await.is_ok() {
            if let Some(ok) = ok.upgrade() {
                tracing::info!("database answers again: resuming");
                ok.send_replace(true);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgPoolOptions;

    /// A run that returned while the database was away (in an embedding service, a test) must
    /// not leave its probe pinging for as long as the database stays away.
    #[tokio::test(start_paused = true)]
    async fn the_probe_ends_once_nobody_waits_for_the_database() {
        let pool = PgPoolOptions::new()
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_millis(100))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool");
        let health = DbHealth::new(Store::from_pool(pool));
        let metrics = tokio::runtime::Handle::current().metrics();
        health.failed();
        assert_eq!(metrics.num_alive_tasks(), 1, "the probe runs");
        drop(health);
        tokio::time::timeout(Duration::from_secs(60), async {
            while metrics.num_alive_tasks() > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the probe ended");
    }
}
