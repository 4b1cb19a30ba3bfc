//! The read-only status page (`/`) and a job's page (`/jobs/{id}`): what an operator checks
//! first, without a database client. Everything shown comes from the operator queries in
//! `store::reports`; phone numbers are masked, verification codes and job parameters are never
//! shown.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, PreEscaped, html};
use serde_json::Value;

use super::AdminState;
use super::chart;
use super::html::{badge, job_href, masked_phones, page, respond, text, time};
use super::queues;
use super::search;
use crate::aliyun::outcome::meaning;
use crate::metrics::AccountTrouble;
use crate::report::{ago, fleet_summary, utc};
use crate::store::{DailyUsage, ErrorClass, FleetWorker, JobDetail, JobFilter, Stats, StoreError};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
const LATEST: i64 = 50;
/// The index reloads itself this often (seconds); plain HTML, no script.
const REFRESH_SECS: u32 = 15;
/// A page that waits on a stuck database helps nobody during an incident.
pub(super) const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Statuses in the order an operator reads them: good, in progress, then the ways jobs fail.
const STATUS_ORDER: &[&str] = &[
    "sent",
    "verified",
    "not_verified",
    "sending",
    "rate_limited",
    "rejected",
    "failed",
    "unknown",
    "expired",
    "invalid",
];

#[derive(Debug, thiserror::Error)]
pub(super) enum PageError {
    #[error("the database did not answer: {0}")]
    Store(#[from] StoreError),
    #[error("the database did not answer within {QUERY_TIMEOUT:?}")]
    Timeout,
    #[error("no such job")]
    NotFound,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            PageError::Store(_) | PageError::Timeout => {
                tracing::warn!(error = %self, "status page: database query failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    html! {
                        h2 { "Database unavailable" }
                        p {
                            "The status page reads Postgres, which did not answer. "
                            code { "/readyz" } " says whether the worker sees it too."
                        }
                    },
                )
            }
            PageError::NotFound => (
                StatusCode::NOT_FOUND,
                html! {
                    h2 { "No such job" }
                    p { "No job with this id is recorded. " a href="/" { "Back to the status page" } "." }
                },
            ),
        };
        respond(status, page("aliyun-sms-worker", None, body))
    }
}

pub(super) async fn index(State(state): State<AdminState>) -> Response {
    match tokio::time::timeout(QUERY_TIMEOUT, index_page(&state)).await {
        Ok(Ok(html)) => respond(StatusCode::OK, html),
        Ok(Err(e)) => e.into_response(),
        Err(_) => PageError::Timeout.into_response(),
    }
}

/// What a failed lookup of what the visitor typed (an id, a search) answers. A value
/// Postgres refuses as data (a NUL) names no job: that is no outage, and is not logged as one.
pub(super) fn lookup_failed(e: StoreError) -> Response {
    if e.class() == ErrorClass::Data {
        PageError::NotFound.into_response()
    } else {
        PageError::from(e).into_response()
    }
}

pub(super) async fn job(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match tokio::time::timeout(QUERY_TIMEOUT, state.store.job_detail(&id)).await {
        Ok(Ok(Some(detail))) => respond(StatusCode::OK, job_page(&detail)),
        Ok(Ok(None)) => PageError::NotFound.into_response(),
        Ok(Err(e)) => lookup_failed(e),
        Err(_) => PageError::Timeout.into_response(),
    }
}

async fn index_page(state: &AdminState) -> Result<String, PageError> {
    let store = &state.store;
    let hour = store.stats(HOUR).await?;
    let day = store.stats(DAY).await?;
    let minutes = store.jobs_per_minute(HOUR).await?;
    let latest = store
        .list_jobs(&JobFilter {
            limit: LATEST,
            ..JobFilter::default()
        })
        .await?;
    let fleet = store.fleet().await?;
    let depths = queues::measure(&state.broker).await;
    let held = fleet.iter().map(|w| w.held).sum();

    let (ready, why) = state.ready();
    let series = chart::series(&minutes);
    let succeeded: i64 = series.iter().map(|m| m.0).sum();
    let failed: i64 = series.iter().map(|m| m.1).sum();
    let body = html! {
        (account_banner(&state.metrics.account_troubles()))
        (daily_budget(state.metrics.daily_usage().as_ref()))
        p #readiness {
            @if ready { span.badge.ok { "ready" } } @else { span.badge.bad { "not ready" } }
            " " span.mono { (why) } " · jobs in flight: " b { (state.metrics.jobs_in_flight()) }
        }
        (queues::section(depths, held))
        (search::form(""))
        (fleet_table(&fleet))
        div.grid {
            section #counts { h2 { "Jobs by status" } (counts_table(&hour, &day)) }
            section #chart {
                h2 { "Jobs per minute, last hour" }
                div.legend {
                    span {
                        span.swatch style={ "background:" (chart::OK_COLOUR) } {}
                        "succeeded: " b #chart-succeeded { (succeeded) }
                    }
                    span {
                        span.swatch style={ "background:" (chart::FAILED_COLOUR) } {}
                        "failed: " b #chart-failed { (failed) }
                    }
                }
                // Built from numbers and constants only.
                (PreEscaped(chart::svg(&minutes)))
            }
        }
        (top_codes(&hour))
        (latest_table(&latest))
    };
    Ok(page("aliyun-sms-worker status", Some(REFRESH_SECS), body))
}

/// Account trouble leaves the worker ready, so the readiness badge stays green: the banner is
/// what makes it impossible to miss.
fn account_banner(troubles: &[AccountTrouble]) -> Markup {
    html! {
        @if !troubles.is_empty() {
            div #account-error .banner.bad {
                b { "Aliyun refuses the account or its credentials" }
                ": jobs of these actions fail at once until an operator acts."
                ul {
                    @for t in troubles {
                        li {
                            code { (t.code) } " on " (t.product) " " code { (t.action) }
                            " since " (t.since.format("%Y-%m-%d %H:%M:%S")) " UTC: "
                            (meaning(t.code))
                        }
                    }
                }
            }
        }
    }
}

/// Today's SMS budget, when daily limits are set (read at the heartbeat).
fn daily_budget(usage: Option<&DailyUsage>) -> Markup {
    html! {
        @if let Some(d) = usage {
            p #daily-budget {
                "SMS today (" (d.day) "): "
                @if let (Some(limit), Some(left)) = (d.total_limit, d.total_left()) {
                    b { (d.total_used) } " of " (limit) " sent, " b { (left) } " left"
                    @if left == 0 { " " span.badge.bad { "spent" } }
                }
                @if let Some(limit) = d.per_prefix_limit {
                    " · per number range: at most " (limit) ", busiest " (d.busiest_prefix_used)
                    ", " b { (d.prefixes_spent) } " ranges spent"
                }
            }
        }
    }
}

fn by_status(stats: &Stats) -> BTreeMap<&str, i64> {
    let mut out = BTreeMap::new();
    for (_, status, n) in &stats.by_status {
        *out.entry(status.as_str()).or_default() += n;
    }
    out
}

fn counts_table(hour: &Stats, day: &Stats) -> Markup {
    let (h, d) = (by_status(hour), by_status(day));
    let mut statuses: Vec<&str> = STATUS_ORDER
        .iter()
        .copied()
        .filter(|s| d.contains_key(s) || h.contains_key(s))
        .collect();
    // A status this page does not know yet still shows, after the known ones.
    statuses.extend(d.keys().copied().filter(|s| !STATUS_ORDER.contains(s)));
    if statuses.is_empty() {
        return html! { p.empty { "No jobs in the last day." } };
    }
    html! {
        table #counts-table {
            thead { tr { th { "status" } th.num { "last hour" } th.num { "last day" } } }
            tbody {
                @for status in statuses {
                    tr data-status=(status) {
                        td { (badge(status)) }
                        td.num { (h.get(status).copied().unwrap_or(0)) }
                        td.num { (d.get(status).copied().unwrap_or(0)) }
                    }
                }
                tr.total data-status="total" {
                    td { "total" } td.num { (hour.total) } td.num { (day.total) }
                }
            }
        }
    }
}

/// Every worker of the fleet (not only this one): the page of any replica shows them all.
fn fleet_table(fleet: &[FleetWorker]) -> Markup {
    let (summary, alarm) = fleet_summary(fleet);
    html! {
        section #workers {
            h2 { "Workers" }
            p #fleet-summary { (summary) }
            @if let Some(alarm) = alarm {
                p #fleet-alarm { (badge("dead")) " " (alarm) }
            }
            @if !fleet.is_empty() {
                table {
                    thead {
                        tr {
                            th { "state" } th { "worker" } th { "id" } th { "started (UTC)" }
                            th { "last heartbeat" } th.num { "jobs held" }
                        }
                    }
                    tbody {
                        @for w in fleet {
                            tr data-worker=(w.short_id()) {
                                td { (badge(w.state().as_str())) }
                                td.wrap { (w.name.as_deref().unwrap_or("-")) }
                                td.mono { (w.short_id()) }
                                td.mono.nowrap { (utc(w.started_at)) }
                                td.nowrap { (ago(w.heartbeat_age_ms)) }
                                td.num { (w.held) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn top_codes(hour: &Stats) -> Markup {
    if hour.top_codes.is_empty() {
        return html! {};
    }
    html! {
        section #codes {
            h2 { "Codes of jobs not sent or verified, last hour" }
            table {
                thead { tr { th { "code" } th.num { "jobs" } th { "meaning" } } }
                tbody {
                    @for (code, n) in &hour.top_codes {
                        tr { td { code { (code) } } td.num { (n) } td { (meaning(code)) } }
                    }
                }
            }
        }
    }
}

fn latest_table(jobs: &[Value]) -> Markup {
    html! {
        section #latest {
            h2 { "Latest " (LATEST) " jobs" }
            @if jobs.is_empty() {
                p.empty { "No jobs yet." }
            } @else {
                (jobs_table(jobs))
            }
        }
    }
}

/// Jobs as lists show them, each linking to its page.
pub(super) fn jobs_table(jobs: &[Value]) -> Markup {
    html! {
                table {
                    thead {
                        tr {
                            th { "created (UTC)" } th { "id" } th { "type" } th { "phone" }
                            th { "status" } th { "code" } th.num { "attempts" }
                        }
                    }
                    tbody {
                        @for j in jobs {
                            @let id = text(&j["id"]);
                            tr {
                                td.mono.nowrap { (time(&j["created_at"])) }
                                td.wrap { a.mono href=(job_href(&id)) { (id) } }
                                td { (text(&j["type"])) }
                                td.mono { (masked_phones(&j["phone_number"])) }
                                td { (badge(&text(&j["status"]))) }
                                td { code { (text(&j["code"])) } }
                                td.num { (text(&j["attempts"])) }
                            }
                        }
                    }
                }
    }
}

fn job_page(d: &JobDetail) -> String {
    let j = &d.job;
    let id = text(&j["id"]);
    let body = html! {
        p { a href="/" { "← status page" } }
        h2 { "Job " code #job-id { (id) } }
        dl {
            dt { "status" } dd { (badge(&text(&j["status"]))) }
            @for (name, key) in [
                ("type", "type"),
                ("code", "code"),
                ("message", "message"),
                ("BizId", "biz_id"),
                ("RequestId", "request_id"),
                ("attempts", "attempts"),
                ("OutId", "out_id"),
                ("reply to", "reply_to"),
            ] {
                dt { (name) } dd { (text(&j[key])) }
            }
            dt { "phone" } dd { span.mono { (masked_phones(&j["phone_number"])) } }
            @for (name, key) in [
                ("created (UTC)", "created_at"),
                ("updated (UTC)", "updated_at"),
                ("finished (UTC)", "finished_at"),
            ] {
                dt { (name) } dd { (time(&j[key])) }
            }
        }
        section #attempts {
            h2 { "Aliyun calls" }
            @if d.attempts.is_empty() {
                p.empty { "Aliyun was not called for this job." }
            } @else {
                table {
                    thead {
                        tr {
                            th.num { "#" } th { "started (UTC)" } th.num { "ms" } th { "action" }
                            th.num { "HTTP" } th { "code" } th { "outcome" } th { "message" }
                            th { "RequestId" }
                        }
                    }
                    tbody {
                        @for a in &d.attempts {
                            tr {
                                td.num { (text(&a["attempt"])) }
                                td.mono.nowrap { (time(&a["started_at"])) }
                                td.num { (text(&a["duration_ms"])) }
                                td { (text(&a["action"])) }
                                td.num { (text(&a["http_status"])) }
                                td { code { (text(&a["code"])) } }
                                td { (text(&a["outcome"])) }
                                td { (text(&a["message"])) }
                                td.mono.wrap { (text(&a["request_id"])) }
                            }
                        }
                    }
                }
            }
        }
        @if !d.deliveries.is_empty() {
            section #deliveries {
                h2 { "Delivery receipts" }
                table {
                    thead {
                        tr {
                            th { "phone" } th { "status" } th { "carrier code" }
                            th { "received (UTC)" }
                        }
                    }
                    tbody {
                        @for r in &d.deliveries {
                            tr {
                                td.mono { (masked_phones(&r["phone_number"])) }
                                td { (badge(&text(&r["delivery_status"]))) }
                                td { code { (text(&r["err_code"])) } }
                                td.mono { (time(&r["received_at"])) }
                            }
                        }
                    }
                }
            }
        }
    };
    page(&format!("job {id}"), None, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn detail(id: &str, message: &str) -> JobDetail {
        JobDetail {
            job: json!({"id": id, "type": "send_verify_code", "status": "failed",
                        "phone_number": "13800138000", "message": message,
                        "params": {"TemplateParam": "{\"code\":\"654321\"}"}}),
            attempts: vec![
                json!({"attempt": 1, "http_status": 503, "code": "ServiceUnavailable",
                                  "message": message, "request_id": "R-1", "outcome": "retry"}),
            ],
            deliveries: vec![],
        }
    }

    #[test]
    fn job_page_escapes_data_and_hides_numbers_and_params() {
        let html = job_page(&detail(
            "<script>x</script>",
            "<img src=x onerror=alert(1)>",
        ));
        assert!(!html.contains("<script>x"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"), "{html}");
        assert!(html.contains("138****8000"), "{html}");
        assert!(!html.contains("13800138000"), "{html}");
        assert!(!html.contains("654321"), "parameters are not shown: {html}");
        assert!(html.contains("ServiceUnavailable") && html.contains("R-1"));
    }

    fn worker(name: &str, live: bool, held: i64) -> FleetWorker {
        FleetWorker {
            id: uuid::Uuid::new_v4(),
            name: Some(name.into()),
            started_at: None,
            heartbeat_at: None,
            heartbeat_age_ms: Some(1500),
            heartbeat_ms: Some(2000),
            stopping_at: None,
            live,
            held,
        }
    }

    #[test]
    fn the_fleet_shows_every_worker_escaped_and_raises_the_alarm_only_for_dead_claims() {
        let body = fleet_table(&[worker("<b>w</b>", true, 2)]).into_string();
        assert!(
            body.contains("&lt;b&gt;w&lt;/b&gt;") && !body.contains("<b>w"),
            "{body}"
        );
        assert!(!body.contains("fleet-alarm"), "{body}");
        assert!(body.contains("1 live worker(s) (0 draining), holding 2 job(s)"));

        let body = fleet_table(&[worker("gone", false, 3)]).into_string();
        assert!(
            body.contains("1 worker(s) stopped beating but still hold 3 sending job(s)"),
            "{body}"
        );
        assert!(
            body.contains("<span class=\"badge bad\">dead</span>"),
            "{body}"
        );
    }

    #[test]
    fn latest_jobs_link_to_their_page() {
        let body = latest_table(&[
            json!({"id": "a b/\"c", "status": "sent", "phone_number": "13800138000"}),
        ])
        .into_string();
        assert!(body.contains("href=\"/jobs/a%20b%2F%22c\""), "{body}");
        assert!(body.contains(">a b/&quot;c</a>"), "{body}");
        assert!(!body.contains("13800138000"));
    }
}
