//! The sweeps one worker of the fleet runs at a time (the leader; see `store::leader`):
//!
//! - stale claims whose message will not come back (dead-lettered, purged, lost with a classic
//!   queue): a claim that may have reached Aliyun ends `unknown`, one that never did ends
//!   `failed` (`ABANDONED`) after `ABANDONED_CLAIM_AFTER_MS`;
//! - the result outbox: a final result that no queue confirmed (its worker died between the
//!   commit and the publish, or the broker was away) is published again;
//! - the rows of workers dead for a day that hold no claims are forgotten, and so are the SMS
//!   budgets of days more than a week past;
//! - what the fleet left behind is measured for the alert rules (`deploy/alerts.yml`): the
//!   oldest `sending` claim, the most overdue receipt check, the dead-letter queue's depth.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use crate::broker::Broker;
use crate::broker::Routed;
use crate::config::Config;
use crate::metrics::{FleetGauges, Metrics};
use crate::store::{Store, StoreError};
use crate::worker::pipeline::{PipelineError, deliver_result};

/// Results re-published in one sweep at most.
const OUTBOX_BATCH: i64 = 500;
/// How long one re-published result may wait for RabbitMQ's confirm.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(10);
/// How long the row of a worker that died (was never retired) is kept once it holds nothing.
const DEAD_WORKER_KEPT: Duration = Duration::from_secs(86_400);

pub struct Duties {
    pub config: Arc<Config>,
    pub store: Store,
    pub worker_id: Uuid,
    pub broker: watch::Receiver<Option<Broker>>,
    pub leader: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
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
                        // Also undoes a measurement that finished just after the leadership
                        // was lost.
                        self.metrics.set_fleet(FleetGauges::default());
                        continue;
                    }
                    if let Err(e) = self.sweep().await {
                        tracing::warn!(error = %e, "fleet sweep failed; trying again next time");
                    }
                    self.measure().await;
                }
            }
        }
    }

    /// What cannot be measured now is left out of `/metrics` rather than shown stale: an alert
    /// on a figure that stopped changing would neither fire nor resolve truthfully.
    async fn measure(&self) {
        let backlog = match self.store.backlog().await {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(error = %e, "could not measure the fleet's backlog");
                None
            }
        };
        let broker = self.broker.borrow().clone();
        let dead_letters = match broker {
            Some(broker) => {
                match tokio::time::timeout(PUBLISH_PATIENCE, broker.dead_letter_depth()).await {
                    Ok(Ok(n)) => Some(u64::from(n)),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not count the dead letters");
                        None
                    }
                    Err(_) => None,
                }
            }
            None => None,
        };
        self.metrics.set_fleet(FleetGauges {
            oldest_sending_seconds: backlog.map(|b| b.oldest_sending),
            // With the poller off, every receipt is overdue and nobody is to blame.
            receipts_overdue_seconds: backlog
                .filter(|_| self.config.receipts.enabled)
                .map(|b| b.receipts_overdue),
            dead_letters,
        });
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
            .unpublished_results(fleet.republish_after, OUTBOX_BATCH, self.worker_id)
            .await?;
        if !rows.is_empty() {
            tracing::info!(
                results = rows.len(),
                "publishing results no queue had confirmed"
            );
        }
        for row in rows {
            // One result that cannot go out (or a broker that stopped confirming) must not hold
            // the others, nor this worker's other duties: it stays in the outbox for next time.
            if !*self.leader.borrow() {
                break;
            }
            let (result, route) = (row.to_result()?, row.route());
            let publish = deliver_result(&broker, &result, &route);
            match tokio::time::timeout(PUBLISH_PATIENCE, publish).await {
                // Marked before the next row, so the next sweep cannot publish it again.
                Ok(Ok(Routed::Yes)) => {
                    self.store
                        .mark_result_published(&row.id, result.finished_at)
                        .await?;
                }
                Ok(Ok(Routed::NoQueue)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(job_id = %row.id, error = %e, "result not re-published; next sweep");
                }
                Err(_) => {
                    tracing::warn!(
                        "RabbitMQ did not confirm a re-published result in time; next sweep"
                    );
                    break;
                }
            }
        }
        if self.config.guards.daily.is_some() {
            self.store.prune_daily_usage().await?;
        }
        let pruned = self.store.prune_dead_workers(DEAD_WORKER_KEPT).await?;
        if pruned > 0 {
            tracing::info!(
                workers = pruned,
                "forgot workers dead for a day with no claims left"
            );
        }
        Ok(())
    }
}
