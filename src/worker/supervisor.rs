//! Background tasks that must not die silently: each runs under a supervisor that restarts it
//! after a panic or an early return, counts the restart, and shows the task as down in
//! `/readyz` until it runs again.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// The first restart comes at once; a task that keeps failing is restarted at most this often.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Clone)]
pub struct Supervisor {
    down: Arc<watch::Sender<BTreeSet<&'static str>>>,
    metrics: Arc<Metrics>,
}

impl Supervisor {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            down: Arc::new(watch::Sender::new(BTreeSet::new())),
            metrics,
        }
    }

    /// The names of the tasks that are down right now.
    pub fn subscribe(&self) -> watch::Receiver<BTreeSet<&'static str>> {
        self.down.subscribe()
    }

    /// Runs `make()` as task `name` until it returns after `shutdown` turned true; restarts it
    /// whenever it ends before that.
    pub fn spawn<F, Fut>(
        &self,
        name: &'static str,
        shutdown: watch::Receiver<bool>,
        make: F,
    ) -> JoinHandle<()>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::ZERO;
            loop {
                let task = tokio::spawn(make());
                // Aborting the supervisor aborts the task too, instead of leaving it detached.
                let _abort = AbortOnDrop(task.abort_handle());
                let ended = task.await;
                if *shutdown.borrow() {
                    return;
                }
                match ended {
                    Ok(()) => tracing::error!(task = name, "background task ended; restarting it"),
                    Err(e) if e.is_panic() => {
                        tracing::error!(task = name, "background task panicked; restarting it")
                    }
                    // Cancelled: the runtime is shutting down.
                    Err(_) => return,
                }
                this.metrics.task_restarted(name);
                this.down.send_modify(|d| {
                    d.insert(name);
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF);
                this.down.send_modify(|d| {
                    d.remove(name);
                });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_panicking_task_is_restarted_counted_and_shown_down_meanwhile() {
        let metrics = Arc::new(Metrics::default());
        let supervisor = Supervisor::new(metrics.clone());
        let mut down = supervisor.subscribe();
        let (_stop, shutdown) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
        let counter = runs.clone();
        let _task = supervisor.spawn("receipts", shutdown, move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let done_tx = done_tx.clone();
            async move {
                if n < 2 {
                    panic!("poller bug");
                }
                let _ = done_tx.send(());
                std::future::pending::<()>().await;
            }
        });
        // Shown down after the first panic...
        down.wait_for(|d| d.contains("receipts")).await.unwrap();
        // ...and running again (third run) in the end.
        done.recv().await.unwrap();
        down.wait_for(|d| d.is_empty()).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert!(
            metrics
                .render(true)
                .contains("sms_worker_task_restarts_total{task=\"receipts\"} 2"),
            "{}",
            metrics.render(true)
        );
    }

    #[tokio::test]
    async fn a_task_that_returns_at_shutdown_is_not_restarted() {
        let metrics = Arc::new(Metrics::default());
        let supervisor = Supervisor::new(metrics.clone());
        let (stop, shutdown) = watch::channel(false);
        let inner = shutdown.clone();
        let task = supervisor.spawn("heartbeat", shutdown, move || {
            let mut rx = inner.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        });
        stop.send_replace(true);
        task.await.unwrap();
        assert!(!metrics.render(true).contains("task=\"heartbeat\""));
    }
}
