//! The admin HTTP listener inside `run`: `/healthz` (alive), `/readyz` (consuming, database
//! reachable, not draining) and `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Counters the pipeline bumps. Label values are bounded: job types, statuses, Aliyun actions
/// and verdicts are closed sets in this program.
#[derive(Default)]
pub struct Metrics {
    jobs: Mutex<BTreeMap<(String, String), u64>>,
    calls: Mutex<BTreeMap<(String, String), u64>>,
    in_flight: std::sync::atomic::AtomicI64,
}

fn bump(map: &Mutex<BTreeMap<(String, String), u64>>, a: &str, b: &str) {
    let mut m = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *m.entry((a.to_owned(), b.to_owned())).or_default() += 1;
}

impl Metrics {
    pub fn job_finished(&self, job_type: &str, status: &str) {
        bump(&self.jobs, job_type, status);
    }

    pub fn aliyun_call(&self, action: &str, verdict: &str) {
        bump(&self.calls, action, verdict);
    }

    pub fn in_flight(&self, delta: i64) {
        self.in_flight
            .fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
    }

    fn render(&self, ready: bool) -> String {
        let mut out = String::new();
        let family = |out: &mut String,
                      name: &str,
                      help: &str,
                      labels: (&str, &str),
                      map: &Mutex<BTreeMap<(String, String), u64>>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let m = map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for ((a, b), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{{}=\"{a}\",{}=\"{b}\"}} {n}",
                    labels.0, labels.1
                );
            }
        };
        family(
            &mut out,
            "sms_jobs_total",
            "Jobs answered, by type and final status.",
            ("type", "status"),
            &self.jobs,
        );
        family(
            &mut out,
            "sms_aliyun_calls_total",
            "Aliyun calls, by action and what the worker made of the answer.",
            ("action", "outcome"),
            &self.calls,
        );
        let in_flight = self.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP sms_jobs_in_flight Deliveries being handled.\n# TYPE sms_jobs_in_flight gauge\nsms_jobs_in_flight {in_flight}"
        );
        let _ = writeln!(
            out,
            "# HELP sms_worker_ready 1 when consuming with the database reachable.\n# TYPE sms_worker_ready gauge\nsms_worker_ready {}",
            u8::from(ready)
        );
        out
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    consuming: watch::Receiver<bool>,
    db_ok: watch::Receiver<bool>,
}

impl AdminState {
    fn ready(&self) -> (bool, &'static str) {
        if !*self.consuming.borrow() {
            (
                false,
                "not consuming: RabbitMQ unreachable, starting, or draining",
            )
        } else if !*self.db_ok.borrow() {
            (false, "database unreachable")
        } else {
            (true, "ready")
        }
    }
}

/// Serves the admin endpoints on `addr` until the runtime stops; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    consuming: watch::Receiver<bool>,
    db_ok: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let state = AdminState {
        metrics,
        consuming,
        db_ok,
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin listener stopped");
        }
    });
    Ok((bound, task))
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
    let body = state.metrics.render(state.ready().0);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
