//! The sweeps one worker of the fleet runs at a time (the leader; see `store::leader`):
//!
//! - stale claims whose message will not come back (dead-lettered, purged, lost with a classic
//!   queue): a claim that may have reached Aliyun ends `unknown`, one that never did ends
//!   `failed` (`ABANDONED`) after `ABANDONED_CLAIM_AFTER_MS`;
//! - the result outbox: a final result that no queue confirmed (its worker died between the
//!   commit and the publish, or the broker was away) is published again.

use std::sync::Arc;

use tokio::sync::watch;
use uuid::Uuid;

use crate::broker::Broker;
use crate::config::Config;
use crate::pipeline::{PipelineError, publish_result};
use crate::store::{Store, StoreError};

/// Results re-published in one sweep at most.
const OUTBOX_BATCH: i64 = 500;

pub struct Duties {
    pub config: Arc<Config>,
    pub store: Store,
    pub worker_id: Uuid,
    pub broker: watch::Receiver<Option<Broker>>,
    pub leader: watch::Receiver<bool>,
}

#[derive(Debug, thiserror::Error)]
enum SweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PipelineError),
}

impl Duties {
    /// Sweeps every `SWEEP_INTERVAL_MS` while this worker leads, until `shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.fleet.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if !*self.leader.borrow() {
                        continue;
                    }
                    if let Err(e) = self.sweep().await {
                        tracing::warn!(error = %e, "fleet sweep failed; trying again next time");
                    }
                }
            }
        }
    }

    async fn sweep(&self) -> Result<(), SweepError> {
        let fleet = &self.config.fleet;
        let swept = self
            .store
            .sweep_stale_claims(
                self.worker_id,
                fleet.abandon_after,
                self.config.receipts.reconcile_grace,
            )
            .await?;
        if swept.interrupted > 0 || swept.abandoned > 0 {
            tracing::warn!(
                interrupted = swept.interrupted,
                abandoned = swept.abandoned,
                "ended stale claims of dead workers"
            );
        }
        let broker = self.broker.borrow().clone();
        let Some(broker) = broker else {
            return Ok(());
        };
        let rows = self
            .store
            .unpublished_results(fleet.republish_after, OUTBOX_BATCH)
            .await?;
        if !rows.is_empty() {
            tracing::info!(
                results = rows.len(),
                "publishing results no queue had confirmed"
            );
        }
        for row in rows {
            publish_result(&self.store, &broker, &row.to_result()?, &row.route()).await?;
        }
        Ok(())
    }
}
