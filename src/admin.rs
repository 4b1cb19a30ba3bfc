//! The admin HTTP listener inside `run`: `/healthz` (alive), `/readyz` (consuming, database
//! reachable, not draining), `/metrics` (Prometheus text format), and a read-only status page
//! at `/` with one page per job at `/jobs/{id}` and a search by phone number or job id at
//! `/search`. With `ADMIN_TOKEN` set, all but the two probes
//! need the token (see `access`).

mod access;
mod chart;
mod html;
mod queues;
mod search;
mod status_page;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::aliyun::outcome::meaning;
use crate::broker::Broker;
use crate::config::Secret;
use crate::metrics::AccountTrouble;
pub use crate::metrics::Metrics;
use crate::store::Store;

/// What readiness is made of.
#[derive(Clone)]
pub struct Probes {
    /// The consume loop is running.
    pub consuming: watch::Receiver<bool>,
    /// The database answered the last time it was asked.
    pub db_ok: watch::Receiver<bool>,
    /// Supervised background tasks that are down (being restarted).
    pub tasks_down: watch::Receiver<std::collections::BTreeSet<&'static str>>,
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    probes: Probes,
    store: Store,
    /// The worker's connection, when it has one: the page counts the queues on it.
    broker: watch::Receiver<Option<Broker>>,
}

impl AdminState {
    /// Whether to take jobs, and why, with any account trouble after it. Account trouble does
    /// not make the worker unready: a restart cannot fix it, and the worker still answers every
    /// job at once (`failed`), which beats jobs piling up behind an unready fleet.
    fn ready(&self) -> (bool, String) {
        let (ready, why) = self.readiness();
        match account_detail(&self.metrics.account_troubles()) {
            Some(detail) => (ready, format!("{why}; {detail}")),
            None => (ready, why),
        }
    }

    fn readiness(&self) -> (bool, String) {
        let down = self.probes.tasks_down.borrow();
        if !*self.probes.consuming.borrow() {
            (
                false,
                "not consuming: RabbitMQ unreachable, starting, or draining".into(),
            )
        } else if !*self.probes.db_ok.borrow() {
            (false, "database unreachable".into())
        } else if !down.is_empty() {
            let names: Vec<&str> = down.iter().copied().collect();
            (
                false,
                format!("background task restarting: {}", names.join(", ")),
            )
        } else {
            (true, "ready".into())
        }
    }
}

/// `degraded: Aliyun account error <code> on <product> <action> since <time> (<meaning>)`, one
/// clause per action in trouble; `None` when there is none.
fn account_detail(troubles: &[AccountTrouble]) -> Option<String> {
    if troubles.is_empty() {
        return None;
    }
    let clauses: Vec<String> = troubles
        .iter()
        .map(|t| {
            format!(
                "Aliyun account error {} on {} {} since {} ({})",
                t.code,
                t.product,
                t.action,
                t.since.format("%Y-%m-%dT%H:%M:%SZ"),
                meaning(t.code)
            )
        })
        .collect();
    Some(format!("degraded: {}", clauses.join("; ")))
}

/// The admin listener, running; dropped, it stops at once (a run that returned early leaves
/// no listener on its port).
pub struct Listener {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Listener {
    /// Stops it: no new connection, and every open one (a scraper's keep-alive) closed once
    /// its request is answered; cut after `patience`.
    pub async fn stop(mut self, patience: std::time::Duration) {
        self.stop.send_replace(true);
        if tokio::time::timeout(patience, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            // Its port is free once the task is gone.
            let _ = (&mut self.task).await;
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the admin endpoints on `addr` until stopped; returns the bound address.
/// `token`, when given, guards every page but `/healthz` and `/readyz`.
pub async fn serve(
    addr: SocketAddr,
    token: Option<&Secret>,
    metrics: Arc<Metrics>,
    probes: Probes,
    store: Store,
    broker: watch::Receiver<Option<Broker>>,
) -> std::io::Result<(SocketAddr, Listener)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let state = AdminState {
        metrics,
        probes,
        store,
        broker,
    };
    let mut pages = Router::new()
        .route("/", get(status_page::index))
        .route("/jobs/{id}", get(status_page::job))
        .route("/search", get(search::search))
        .route("/metrics", get(metrics_text));
    if let Some(token) = token {
        pages = pages.route_layer(middleware::from_fn_with_state(
            access::Gate::new(token),
            access::require,
        ));
    }
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(pages)
        .with_state(state);
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let serving = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "admin listener stopped");
        }
    });
    Ok((bound, Listener { task, stop }))
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let (ready, why) = state.ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{why}\n")).into_response()
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    let mut body = state.metrics.render(state.ready().0);
    crate::metrics::render_batches(&mut body, &state.store.batch_counts());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
