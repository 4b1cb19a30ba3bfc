//! Whether the database is reachable, as the pipeline last saw it.
//!
//! A failed database call flips the gate shut: the consume loop stops taking deliveries and a
//! probe retries the connection with backoff until it answers, then opens the gate again. So
//! an outage costs no Aliyun call and no churn of requeued messages, and needs no restart.

use std::sync::Arc;
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
            tokio::spawn(probe(self.clone()));
        }
    }

    /// Waits until the database answers again.
    pub async fn wait_ok(&self) {
        let mut rx = self.ok.subscribe();
        // Err means the sender is gone: nothing left to wait for.
        let _ = rx.wait_for(|ok| *ok).await;
    }
}

async fn probe(health: DbHealth) {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
        if health.store.ping().await.is_ok() {
            tracing::info!("database answers again: resuming");
            health.ok.send_replace(true);
            return;
        }
    }
}
