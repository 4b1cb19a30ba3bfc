//! The read-only status page (`/`) and a job's page (`/jobs/{id}`): what an operator checks
//! first, without a database client. Everything shown comes from the operator queries in
//! `store::reports`; phone numbers are masked, verification codes and job parameters are never
//! shown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::AdminState;
use super::chart;
use super::html::{badge, esc, job_href, masked_phones, page, respond, text, time};
use crate::aliyun::outcome::meaning;
use crate::metrics::AccountTrouble;
use crate::ops::{ago, fleet_summary, utc};
use crate::store::{FleetWorker, JobDetail, JobFilter, Stats, StoreError};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
const LATEST: i64 = 50;
/// The index reloads itself this often (seconds); plain HTML, no script.
const REFRESH_SECS: u32 = 15;
/// A page that waits on a stuck database helps nobody during an incident.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

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
enum PageError {
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
                    "<h2>Database unavailable</h2><p>The status page reads Postgres, which did not \
                     answer. <code>/readyz</code> says whether the worker sees it too.</p>",
                )
            }
            PageError::NotFound => (
                StatusCode::NOT_FOUND,
                "<h2>No such job</h2><p>No job with this id is recorded. <a href=\"/\">Back to the \
                 status page</a>.</p>",
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

pub(super) async fn job(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match tokio::time::timeout(QUERY_TIMEOUT, state.store.job_detail(&id)).await {
        Ok(Ok(Some(detail))) => respond(StatusCode::OK, job_page(&detail)),
        Ok(Ok(None)) => PageError::NotFound.into_response(),
        Ok(Err(e)) => PageError::from(e).into_response(),
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

    let mut body = String::with_capacity(32 * 1024);
    account_banner(&mut body, &state.metrics.account_troubles());
    let (ready, why) = state.ready();
    let _ = write!(
        body,
        "<p id=\"readiness\">{} <span class=\"mono\">{}</span> · jobs in flight: <b>{}</b></p>",
        if ready {
            "<span class=\"badge ok\">ready</span>"
        } else {
            "<span class=\"badge bad\">not ready</span>"
        },
        esc(&why),
        state.metrics.jobs_in_flight()
    );
    fleet_table(&mut body, &fleet);
    body.push_str("<div class=\"grid\"><section id=\"counts\"><h2>Jobs by status</h2>");
    counts_table(&mut body, &hour, &day);
    body.push_str("</section><section id=\"chart\"><h2>Jobs per minute, last hour</h2>");
    let series = chart::series(&minutes);
    let succeeded: i64 = series.iter().map(|m| m.0).sum();
    let failed: i64 = series.iter().map(|m| m.1).sum();
    let _ = write!(
        body,
        "<div class=\"legend\"><span><span class=\"swatch\" style=\"background:{}\"></span>succeeded: \
         <b id=\"chart-succeeded\">{succeeded}</b></span><span><span class=\"swatch\" \
         style=\"background:{}\"></span>failed: <b id=\"chart-failed\">{failed}</b></span></div>{}",
        chart::OK_COLOUR,
        chart::FAILED_COLOUR,
        chart::svg(&minutes)
    );
    body.push_str("</section></div>");
    top_codes(&mut body, &hour);
    latest_table(&mut body, &latest);
    Ok(page("aliyun-sms-worker status", Some(REFRESH_SECS), &body))
}

/// Account trouble leaves the worker ready, so the readiness badge stays green: the banner is
/// what makes it impossible to miss.
fn account_banner(body: &mut String, troubles: &[AccountTrouble]) {
    if troubles.is_empty() {
        return;
    }
    body.push_str(
        "<div id=\"account-error\" class=\"banner bad\"><b>Aliyun refuses the account or its \
         credentials</b>: jobs of these actions fail at once until an operator acts.<ul>",
    );
    for t in troubles {
        let _ = write!(
            body,
            "<li><code>{}</code> on {} <code>{}</code> since {} UTC: {}</li>",
            esc(t.code),
            esc(t.product),
            esc(t.action),
            t.since.format("%Y-%m-%d %H:%M:%S"),
            esc(meaning(t.code))
        );
    }
    body.push_str("</ul></div>");
}

fn by_status(stats: &Stats) -> BTreeMap<&str, i64> {
    let mut out = BTreeMap::new();
    for (_, status, n) in &stats.by_status {
        *out.entry(status.as_str()).or_default() += n;
    }
    out
}

fn counts_table(body: &mut String, hour: &Stats, day: &Stats) {
    let (h, d) = (by_status(hour), by_status(day));
    let mut statuses: Vec<&str> = STATUS_ORDER
        .iter()
        .copied()
        .filter(|s| d.contains_key(s) || h.contains_key(s))
        .collect();
    // A status this page does not know yet still shows, after the known ones.
    statuses.extend(d.keys().copied().filter(|s| !STATUS_ORDER.contains(s)));
    if statuses.is_empty() {
        body.push_str("<p class=\"empty\">No jobs in the last day.</p>");
        return;
    }
    body.push_str(
        "<table id=\"counts-table\"><thead><tr><th>status</th><th class=\"num\">last hour</th>\
         <th class=\"num\">last day</th></tr></thead><tbody>",
    );
    for status in statuses {
        let _ = write!(
            body,
            "<tr data-status=\"{}\"><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(status),
            badge(status),
            h.get(status).copied().unwrap_or(0),
            d.get(status).copied().unwrap_or(0)
        );
    }
    let _ = write!(
        body,
        "<tr class=\"total\" data-status=\"total\"><td>total</td><td class=\"num\">{}</td>\
         <td class=\"num\">{}</td></tr></tbody></table>",
        hour.total, day.total
    );
}

/// Every worker of the fleet (not only this one): the page of any replica shows them all.
fn fleet_table(body: &mut String, fleet: &[FleetWorker]) {
    let (summary, alarm) = fleet_summary(fleet);
    let _ = write!(
        body,
        "<section id=\"workers\"><h2>Workers</h2><p id=\"fleet-summary\">{}</p>",
        esc(&summary)
    );
    if let Some(alarm) = alarm {
        let _ = write!(
            body,
            "<p id=\"fleet-alarm\">{} {}</p>",
            badge("dead"),
            esc(&alarm)
        );
    }
    if fleet.is_empty() {
        body.push_str("</section>");
        return;
    }
    body.push_str(
        "<table><thead><tr><th>state</th><th>worker</th><th>id</th><th>started (UTC)</th>\
         <th>last heartbeat</th><th class=\"num\">jobs held</th></tr></thead><tbody>",
    );
    for w in fleet {
        let _ = write!(
            body,
            "<tr data-worker=\"{}\"><td>{}</td><td class=\"wrap\">{}</td><td class=\"mono\">{}</td>\
             <td class=\"mono nowrap\">{}</td><td class=\"nowrap\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&w.short_id()),
            badge(w.state().as_str()),
            esc(w.name.as_deref().unwrap_or("-")),
            esc(&w.short_id()),
            esc(&utc(w.started_at)),
            esc(&ago(w.heartbeat_age_ms)),
            w.held
        );
    }
    body.push_str("</tbody></table></section>");
}

fn top_codes(body: &mut String, hour: &Stats) {
    if hour.top_codes.is_empty() {
        return;
    }
    body.push_str(
        "<section id=\"codes\"><h2>Codes of jobs not sent or verified, last hour</h2><table><thead><tr>\
         <th>code</th><th class=\"num\">jobs</th><th>meaning</th></tr></thead><tbody>",
    );
    for (code, n) in &hour.top_codes {
        let _ = write!(
            body,
            "<tr><td><code>{}</code></td><td class=\"num\">{n}</td><td>{}</td></tr>",
            esc(code),
            esc(meaning(code))
        );
    }
    body.push_str("</tbody></table></section>");
}

fn latest_table(body: &mut String, jobs: &[Value]) {
    let _ = write!(body, "<section id=\"latest\"><h2>Latest {LATEST} jobs</h2>");
    if jobs.is_empty() {
        body.push_str("<p class=\"empty\">No jobs yet.</p></section>");
        return;
    }
    body.push_str(
        "<table><thead><tr><th>created (UTC)</th><th>id</th><th>type</th><th>phone</th>\
         <th>status</th><th>code</th><th class=\"num\">attempts</th></tr></thead><tbody>",
    );
    for j in jobs {
        let id = text(&j["id"]);
        let _ = write!(
            body,
            "<tr><td class=\"mono nowrap\">{}</td><td class=\"wrap\"><a class=\"mono\" href=\"{}\">{}</a></td>\
             <td>{}</td><td class=\"mono\">{}</td><td>{}</td><td><code>{}</code></td>\
             <td class=\"num\">{}</td></tr>",
            esc(&time(&j["created_at"])),
            esc(&job_href(&id)),
            esc(&id),
            esc(&text(&j["type"])),
            esc(&masked_phones(&j["phone_number"])),
            badge(&text(&j["status"])),
            esc(&text(&j["code"])),
            esc(&text(&j["attempts"]))
        );
    }
    body.push_str("</tbody></table></section>");
}

fn job_page(d: &JobDetail) -> String {
    let j = &d.job;
    let id = text(&j["id"]);
    let mut body = String::with_capacity(8 * 1024);
    let _ = write!(
        body,
        "<p><a href=\"/\">&larr; status page</a></p><h2>Job <code id=\"job-id\">{}</code></h2><dl>",
        esc(&id)
    );
    let field = |body: &mut String, name: &str, value: String| {
        let _ = write!(body, "<dt>{name}</dt><dd>{value}</dd>");
    };
    field(&mut body, "status", badge(&text(&j["status"])));
    for (name, key) in [
        ("type", "type"),
        ("code", "code"),
        ("message", "message"),
        ("BizId", "biz_id"),
        ("RequestId", "request_id"),
        ("attempts", "attempts"),
        ("OutId", "out_id"),
        ("reply to", "reply_to"),
    ] {
        field(&mut body, name, esc(&text(&j[key])).into_owned());
    }
    field(
        &mut body,
        "phone",
        format!(
            "<span class=\"mono\">{}</span>",
            esc(&masked_phones(&j["phone_number"]))
        ),
    );
    for (name, key) in [
        ("created (UTC)", "created_at"),
        ("updated (UTC)", "updated_at"),
        ("finished (UTC)", "finished_at"),
    ] {
        field(&mut body, name, esc(&time(&j[key])).into_owned());
    }
    body.push_str("</dl>");

    body.push_str("<section id=\"attempts\"><h2>Aliyun calls</h2>");
    if d.attempts.is_empty() {
        body.push_str("<p class=\"empty\">Aliyun was not called for this job.</p>");
    } else {
        body.push_str(
            "<table><thead><tr><th class=\"num\">#</th><th>started (UTC)</th><th class=\"num\">ms</th>\
             <th>action</th><th class=\"num\">HTTP</th><th>code</th><th>outcome</th><th>message</th>\
             <th>RequestId</th></tr></thead><tbody>",
        );
        for a in &d.attempts {
            let _ = write!(
                body,
                "<tr><td class=\"num\">{}</td><td class=\"mono nowrap\">{}</td><td class=\"num\">{}</td>\
                 <td>{}</td><td class=\"num\">{}</td><td><code>{}</code></td><td>{}</td><td>{}</td>\
                 <td class=\"mono wrap\">{}</td></tr>",
                esc(&text(&a["attempt"])),
                esc(&time(&a["started_at"])),
                esc(&text(&a["duration_ms"])),
                esc(&text(&a["action"])),
                esc(&text(&a["http_status"])),
                esc(&text(&a["code"])),
                esc(&text(&a["outcome"])),
                esc(&text(&a["message"])),
                esc(&text(&a["request_id"]))
            );
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("</section>");

    if !d.deliveries.is_empty() {
        body.push_str(
            "<section id=\"deliveries\"><h2>Delivery receipts</h2><table><thead><tr><th>phone</th>\
             <th>status</th><th>carrier code</th><th>received (UTC)</th></tr></thead><tbody>",
        );
        for r in &d.deliveries {
            let _ = write!(
                body,
                "<tr><td class=\"mono\">{}</td><td>{}</td><td><code>{}</code></td><td class=\"mono\">{}</td></tr>",
                esc(&masked_phones(&r["phone_number"])),
                badge(&text(&r["delivery_status"])),
                esc(&text(&r["err_code"])),
                esc(&time(&r["received_at"]))
            );
        }
        body.push_str("</tbody></table></section>");
    }
    page(&format!("job {}", esc(&id)), None, &body)
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
        let mut body = String::new();
        fleet_table(&mut body, &[worker("<b>w</b>", true, 2)]);
        assert!(
            body.contains("&lt;b&gt;w&lt;/b&gt;") && !body.contains("<b>w"),
            "{body}"
        );
        assert!(!body.contains("fleet-alarm"), "{body}");
        assert!(body.contains("1 live worker(s) (0 draining), holding 2 job(s)"));

        let mut body = String::new();
        fleet_table(&mut body, &[worker("gone", false, 3)]);
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
        let mut body = String::new();
        latest_table(
            &mut body,
            &[json!({"id": "a b/\"c", "status": "sent", "phone_number": "13800138000"})],
        );
        assert!(body.contains("href=\"/jobs/a%20b%2F%22c\""), "{body}");
        assert!(body.contains(">a b/&quot;c</a>"), "{body}");
        assert!(!body.contains("13800138000"));
    }
}
