//! The few HTML building blocks the status pages need. Job ids, messages and codes come from
//! backends and from Aliyun; maud escapes every value put into markup unless it is wrapped in
//! `PreEscaped` (used only for the constant style sheet and the numbers-only chart). The pages
//! carry no script, and the Content-Security-Policy forbids any; forms go to this site only.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::DateTime;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use crate::phone;

/// Characters left as they are in a job id inside a link; the rest is percent-encoded, so an
/// id with `/`, `?` or `#` still names one job.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `href` of a job's detail page.
pub fn job_href(id: &str) -> String {
    format!("/jobs/{}", utf8_percent_encode(id, PATH_SEGMENT))
}

/// A JSON field as display text: `-` when absent.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A timestamp from Postgres' JSON (`2026-11-23T15:06:10.123456+00:00`) as `2026-11-23
/// 15:06:10`, UTC; anything else as it is.
pub fn time(v: &Value) -> String {
    match v.as_str().map(DateTime::parse_from_rfc3339) {
        Some(Ok(t)) => t.to_utc().format("%Y-%m-%d %H:%M:%S").to_string(),
        _ => text(v),
    }
}

/// Phone numbers as the page shows them: every number of a list masked.
pub fn masked_phones(v: &Value) -> String {
    match v.as_str() {
        Some(numbers) => numbers
            .split(',')
            .map(|n| phone::mask(n.trim()))
            .collect::<Vec<_>>()
            .join(", "),
        None => "-".into(),
    }
}

/// The CSS class of a status badge (a job's, a receipt's or a worker's); statuses outside the
/// known set get the neutral one.
pub fn status_class(status: &str) -> &'static str {
    match status {
        "sent" | "verified" | "delivered" | "live" => "ok",
        "not_verified" | "rate_limited" | "waiting" | "draining" => "warn",
        "rejected" | "failed" | "unknown" | "dead" => "bad",
        "sending" => "busy",
        _ => "muted",
    }
}

pub fn badge(status: &str) -> Markup {
    html! { span class={ "badge " (status_class(status)) } { (status) } }
}

const STYLE: &str = "
:root { color-scheme: light; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e; --busy: #0969da;
  --muted: #57606a; --line: #d0d7de; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', 'PingFang SC', 'Microsoft YaHei', 'Noto Sans CJK SC', sans-serif; color: #1f2328; background: #fff; }
header { display: flex; gap: 1.5rem; align-items: baseline; padding: .8rem 1.5rem; background: #24292f; color: #fff; }
header h1 { font-size: 1.1rem; margin: 0; }
header a { color: #fff; text-decoration: none; }
header .meta { color: #d0d7de; font-size: .9rem; }
main { padding: 1rem 1.5rem 2rem; max-width: 1200px; }
h2 { font-size: 1rem; margin: 1.6rem 0 .5rem; }
.grid { display: grid; grid-template-columns: minmax(260px, 1fr) 2fr; gap: 1.5rem; align-items: start; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem; }
td.wrap { word-break: break-all; } .nowrap { white-space: nowrap; }
a { color: var(--busy); }
.badge { display: inline-block; padding: 0 .5rem; border-radius: 1rem; font-size: .8rem; font-weight: 600; color: #fff; background: var(--muted); }
.badge.ok { background: var(--ok); } .badge.warn { background: var(--warn); }
.badge.bad { background: var(--bad); } .badge.busy { background: var(--busy); }
.legend { display: flex; gap: 1.2rem; font-size: .9rem; margin: .3rem 0; }
.swatch { display: inline-block; width: .8rem; height: .8rem; border-radius: 2px; margin-right: .3rem; vertical-align: -1px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; margin: 0; }
dt { color: var(--muted); } dd { margin: 0; word-break: break-all; }
.empty, .muted { color: var(--muted); }
form#search { margin: .5rem 0 1rem; } form#search input { width: 22rem; max-width: 100%; padding: .25rem .4rem; }
.banner { margin: .5rem 0 1rem; padding: .6rem 1rem; border-radius: 6px; border: 1px solid; }
.banner.bad { color: var(--bad); border-color: var(--bad); background: #ffebe9; }
.banner ul { margin: .3rem 0 0; }
";

/// A whole page around `body`.
pub fn page(title: &str, refresh: Option<u32>, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(seconds) = refresh {
                    meta http-equiv="refresh" content=(seconds);
                }
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    h1 { a href="/" { "aliyun-sms-worker" } }
                    span.meta { "read-only status" }
                }
                main { (body) }
            }
        }
    }
    .into_string()
}

/// Sends a page: no caching (it is live data) and no script, frame or outside resource.
pub fn respond(status: StatusCode, page: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        page,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn markup_in_values_is_escaped() {
        let html = badge(r#"<img src=x onerror="a('b')">&"#).into_string();
        assert_eq!(
            html,
            "<span class=\"badge muted\">&lt;img src=x onerror=&quot;a('b')&quot;&gt;&amp;</span>"
        );
        let page = page("<t>", None, html! { p { "x" } });
        assert!(page.contains("<title>&lt;t&gt;</title>"), "{page}");
    }

    #[test]
    fn links_keep_odd_ids_in_one_segment() {
        assert_eq!(job_href("a-b_c.d~e"), "/jobs/a-b_c.d~e");
        assert_eq!(job_href("x/../y?z#\"<"), "/jobs/x%2F..%2Fy%3Fz%23%22%3C");
    }

    #[test]
    fn phones_are_masked_one_by_one() {
        assert_eq!(masked_phones(&json!("13800138000")), "138****8000");
        assert_eq!(
            masked_phones(&json!("13800138000,8613900139000")),
            "138****8000, 861****9000"
        );
        assert_eq!(masked_phones(&Value::Null), "-");
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(
            time(&json!("2026-11-23T23:06:10.5+08:00")),
            "2026-11-23 15:06:10"
        );
        assert_eq!(time(&json!("soon")), "soon");
    }
}
