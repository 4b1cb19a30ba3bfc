//! `/search?q=`: "did this user get their code?". A phone number in any form an operator may
//! paste (`+86 138 0013 8000`, `0086-138…`) is normalised as jobs are, and found on the job or
//! on a batch's delivery rows; anything else is taken as a job id, or the start of one.
//!
//! What was typed is a phone number more often than not, so it is never shown in full: not in
//! the heading, not back in the search box. Nothing here logs it.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use percent_encoding::percent_decode_str;

use super::AdminState;
use super::html::{page, respond};
use super::status_page::{PageError, QUERY_TIMEOUT, jobs_table, lookup_failed};
use crate::phone::{self, PhoneNumber};
use crate::wire::MAX_ID_BYTES;

const LIMIT: i64 = 50;

/// What a search asks for.
#[derive(Debug, PartialEq, Eq)]
enum Search {
    Empty,
    TooLong,
    Terms {
        phone: Option<PhoneNumber>,
        /// Also tried as a job id: ids are the backend's to choose, digits included.
        id: String,
        /// What the page may show of it.
        shown: String,
    },
}

/// `q` from the raw query string. Decoded by hand, so that no input (bad percent-encoding,
/// invalid UTF-8) turns into an error page that could quote it.
fn query_text(raw: Option<&str>) -> String {
    raw.unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("q="))
        .map(|v| {
            percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default()
}

fn looks_like_a_number(q: &str) -> bool {
    q.chars().any(|c| c.is_ascii_digit())
        && q.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '(' | ')' | '.'))
}

fn parse(q: &str) -> Search {
    let q = q.trim();
    if q.is_empty() {
        return Search::Empty;
    }
    if q.len() > MAX_ID_BYTES {
        return Search::TooLong;
    }
    let digits = phone::compact(q);
    let phone = PhoneNumber::parse_international(&digits).ok();
    let shown = match &phone {
        Some(p) => p.masked(),
        // A number with a typo is still somebody's number.
        None if looks_like_a_number(q) => phone::mask(&digits),
        None => q.to_owned(),
    };
    Search::Terms {
        phone,
        id: q.to_owned(),
        shown,
    }
}

pub(super) async fn search(State(state): State<AdminState>, RawQuery(raw): RawQuery) -> Response {
    let search = parse(&query_text(raw.as_deref()));
    let Search::Terms { phone, id, shown } = search else {
        return respond(StatusCode::OK, search_page(&search, None));
    };
    let found = state
        .store
        .search_jobs(phone.as_ref().map(PhoneNumber::as_str), &id, LIMIT);
    match tokio::time::timeout(QUERY_TIMEOUT, found).await {
        Ok(Ok(jobs)) => {
            let terms = Search::Terms { phone, id, shown };
            respond(StatusCode::OK, search_page(&terms, Some(&jobs)))
        }
        Ok(Err(e)) => lookup_failed(e),
        Err(_) => PageError::Timeout.into_response(),
    }
}

/// What the search box keeps of a search: only what cannot be a phone number.
fn kept(search: &Search) -> &str {
    match search {
        Search::Terms {
            phone: None, id, ..
        } if !looks_like_a_number(id) => id,
        _ => "",
    }
}

/// The search box, holding `value`.
pub(super) fn form(value: &str) -> Markup {
    html! {
        form #search action="/search" method="get" {
            input type="search" name="q" value=(value) maxlength=(MAX_ID_BYTES)
                placeholder="phone number or job id" aria-label="phone number or job id";
            " " button type="submit" { "Search" }
        }
    }
}

fn search_page(search: &Search, jobs: Option<&[serde_json::Value]>) -> String {
    let body = html! {
        p { a href="/" { "← status page" } }
        (form(kept(search)))
        section #results {
            @match search {
                Search::Empty => {
                    p.empty { "Type a phone number (any form: +86 138 0013 8000, 0086…) or a job id." }
                }
                Search::TooLong => {
                    p.empty {
                        "That is longer than any job id (" (MAX_ID_BYTES) " bytes) or phone number; "
                        "nothing was searched."
                    }
                }
                Search::Terms { phone, shown, .. } => {
                    h2 {
                        "Jobs for "
                        @if phone.is_some() { "phone number " } @else { "job id " }
                        span #searched .mono { (shown) }
                    }
                    @match jobs {
                        Some(jobs) if !jobs.is_empty() => {
                            p.empty {
                                (jobs.len()) " job(s), newest first"
                                @if jobs.len() as i64 == LIMIT { " (the latest " (LIMIT) ")" }
                                "."
                            }
                            (jobs_table(jobs))
                        }
                        _ => { p.empty { "No job found." } }
                    }
                }
            }
        }
    };
    page("search · aliyun-sms-worker", None, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn phone_of(q: &str) -> Option<String> {
        match parse(q) {
            Search::Terms { phone, .. } => phone.map(|p| p.as_str().to_owned()),
            _ => None,
        }
    }

    #[test]
    fn numbers_are_normalised_in_every_form_operators_paste() {
        for q in [
            "13800138000",
            "+86 138 0013 8000",
            "0086-138-0013-8000",
            " 8613800138000 ",
            "138.0013.8000",
            "(+86) 13800138000",
        ] {
            assert_eq!(phone_of(q).as_deref(), Some("13800138000"), "{q}");
        }
        assert_eq!(
            phone_of("+44 20 7946 0958").as_deref(),
            Some("442079460958")
        );
        assert_eq!(phone_of("signup-42"), None);
    }

    #[test]
    fn the_query_is_decoded_without_failing_on_anything() {
        assert_eq!(
            query_text(Some("token=x&q=%2B86+138%200013")),
            "+86 138 0013"
        );
        assert_eq!(query_text(Some("q=%ff%zz")), "\u{fffd}%zz");
        assert_eq!(query_text(None), "");
        assert_eq!(parse(&query_text(Some("q=+++"))), Search::Empty);
        assert_eq!(parse(&"x".repeat(MAX_ID_BYTES + 1)), Search::TooLong);
    }

    #[test]
    fn a_number_is_never_shown_in_full_nor_kept_in_the_box() {
        for q in ["+86 138 0013 8000", "1380013800", "138-0013"] {
            let search = parse(q);
            let html = search_page(&search, Some(&[]));
            let digits = phone::compact(q);
            assert!(!html.contains(&digits), "{q}: {html}");
            assert!(!html.contains(q), "{q}: {html}");
            assert!(html.contains("value=\"\""), "{q}: {html}");
        }
        let html = search_page(&parse("+86 138 0013 8000"), Some(&[]));
        assert!(html.contains(">138****8000</span>"), "{html}");
    }

    #[test]
    fn an_id_is_shown_as_text_and_kept_in_the_box() {
        let q = "a\"><script>x</script>";
        let jobs = [json!({"id": q, "status": "sent", "phone_number": "13800138000"})];
        let html = search_page(&parse(q), Some(&jobs));
        assert!(!html.contains("<script>x"), "{html}");
        assert!(
            html.contains("value=\"a&quot;&gt;&lt;script&gt;x&lt;/script&gt;\""),
            "{html}"
        );
        assert!(html.contains("138****8000") && !html.contains("13800138000"));
    }
}
