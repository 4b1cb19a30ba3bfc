//! The operator commands' output: `jobs list`, `jobs show`, `stats`. Tables mask phone numbers
//! (they get pasted into tickets and chats); `--json` gives scripts the full data.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::aliyun::outcome::meaning;
use crate::phone;
use crate::store::{FleetWorker, JobDetail, Stats, WorkerState};

/// `30s`, `15m`, `1h`, `90d`.
pub fn parse_age(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{raw:?} needs a unit: s, m, h or d"))?;
    let (n, unit) = raw.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{raw:?} is not a number and a unit"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unit {unit:?} is not one of s, m, h, d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A plain-text table; every column as wide as its widest cell.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(
        &mut out,
        &headers.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>(),
    );
    for row in rows {
        line(&mut out, row);
    }
    out
}

pub fn render_jobs(jobs: &[Value]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                text(&j["created_at"]),
                text(&j["id"]),
                text(&j["type"]),
                j["phone_number"].as_str().map_or("-".into(), phone::mask),
                text(&j["status"]),
                text(&j["code"]),
                text(&j["attempts"]),
            ]
        })
        .collect();
    table(
        &[
            "created_at",
            "id",
            "type",
            "phone",
            "status",
            "code",
            "attempts",
        ],
        &rows,
    )
}

pub fn render_detail(d: &JobDetail) -> String {
    let j = &d.job;
    let mut out = String::new();
    for key in [
        "id",
        "type",
        "status",
        "code",
        "message",
        "biz_id",
        "request_id",
        "attempts",
        "out_id",
        "reply_to",
        "created_at",
        "finished_at",
    ] {
        let _ = writeln!(out, "{key:<12} {}", text(&j[key]));
    }
    let _ = writeln!(
        out,
        "{:<12} {}",
        "phone",
        j["phone_number"].as_str().map_or("-".into(), phone::mask)
    );
    let _ = writeln!(out, "{:<12} {}", "params", j["params"]);
    let _ = writeln!(out, "\nattempts:");
    let rows: Vec<Vec<String>> = d
        .attempts
        .iter()
        .map(|a| {
            [
                "attempt",
                "started_at",
                "duration_ms",
                "http_status",
                "code",
                "outcome",
                "request_id",
            ]
            .iter()
            .map(|k| text(&a[*k]))
            .collect()
        })
        .collect();
    out.push_str(&table(
        &[
            "#",
            "started_at",
            "ms",
            "http",
            "code",
            "outcome",
            "request_id",
        ],
        &rows,
    ));
    if !d.deliveries.is_empty() {
        let _ = writeln!(out, "\ndeliveries:");
        let rows: Vec<Vec<String>> = d
            .deliveries
            .iter()
            .map(|r| {
                vec![
                    r["phone_number"].as_str().map_or("-".into(), phone::mask),
                    text(&r["delivery_status"]),
                    text(&r["err_code"]),
                    text(&r["received_at"]),
                ]
            })
            .collect();
        out.push_str(&table(
            &["phone", "status", "err_code", "received_at"],
            &rows,
        ));
    }
    out
}

pub fn detail_json(d: &JobDetail) -> Value {
    json!({"job": d.job, "attempts": d.attempts, "deliveries": d.deliveries})
}

/// A time as the tables and the status page show it: UTC to the second.
pub fn utc(t: Option<DateTime<Utc>>) -> String {
    t.map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// How long ago, in the coarsest unit that still tells a beat from a crash.
pub fn ago(ms: Option<i64>) -> String {
    let Some(ms) = ms.map(|ms| ms.max(0)) else {
        return "never".into();
    };
    match ms {
        0..10_000 => format!("{:.1} s ago", ms as f64 / 1000.0),
        10_000..120_000 => format!("{} s ago", ms / 1000),
        120_000..7_200_000 => format!("{} min ago", ms / 60_000),
        7_200_000..172_800_000 => format!("{} h ago", ms / 3_600_000),
        _ => format!("{} d ago", ms / 86_400_000),
    }
}

/// The one-line summary of the fleet, and its alarm when a dead worker still holds claims.
pub fn fleet_summary(fleet: &[FleetWorker]) -> (String, Option<String>) {
    let count = |state| fleet.iter().filter(|w| w.state() == state).count();
    let held = |state| -> i64 {
        fleet
            .iter()
            .filter(|w| w.state() == state)
            .map(|w| w.held)
            .sum()
    };
    let (live, draining, dead) = (
        count(WorkerState::Live),
        count(WorkerState::Draining),
        count(WorkerState::Dead),
    );
    let summary = format!(
        "{} live worker(s) ({draining} draining), holding {} job(s)",
        live + draining,
        held(WorkerState::Live) + held(WorkerState::Draining)
    );
    let alarm = (dead > 0).then(|| {
        format!(
            "{dead} worker(s) stopped beating but still hold {} sending job(s)",
            held(WorkerState::Dead)
        )
    });
    (summary, alarm)
}

pub fn render_fleet(fleet: &[FleetWorker]) -> String {
    let (summary, alarm) = fleet_summary(fleet);
    let mut out = format!("{summary}\n");
    if let Some(alarm) = alarm {
        let _ = writeln!(out, "ALARM: {alarm}");
    }
    if fleet.is_empty() {
        return out;
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = fleet
        .iter()
        .map(|w| {
            vec![
                w.state().as_str().to_owned(),
                w.name.clone().unwrap_or_else(|| "-".into()),
                w.short_id(),
                utc(w.started_at),
                ago(w.heartbeat_age_ms),
                w.held.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "state",
            "worker",
            "id",
            "started (UTC)",
            "last beat",
            "held",
        ],
        &rows,
    ));
    out
}

pub fn fleet_json(fleet: &[FleetWorker]) -> Value {
    fleet
        .iter()
        .map(|w| {
            json!({
                "id": w.id.to_string(),
                "name": w.name,
                "state": w.state().as_str(),
                "started_at": w.started_at,
                "heartbeat_at": w.heartbeat_at,
                "heartbeat_age_ms": w.heartbeat_age_ms,
                "heartbeat_ms": w.heartbeat_ms,
                "stopping_at": w.stopping_at,
                "held": w.held,
            })
        })
        .collect()
}

/// `stats --json`: the counts, and the fleet as it is now.
pub fn stats_json(s: &Stats, fleet: &[FleetWorker]) -> Value {
    json!({
        "workers": fleet_json(fleet),
        "total": s.total,
        "by_status": s.by_status.iter().map(|(t, st, n)| json!({"type": t, "status": st, "count": n})).collect::<Vec<_>>(),
        "top_codes": s.top_codes.iter().map(|(c, n)| json!({"code": c, "count": n, "meaning": meaning(c)})).collect::<Vec<_>>(),
    })
}

/// `stats`: the counts of the window, then the fleet as it is now.
pub fn render_stats(s: &Stats, fleet: &[FleetWorker], since: &str) -> String {
    let pct = |n: i64| {
        if s.total == 0 {
            0.0
        } else {
            n as f64 * 100.0 / s.total as f64
        }
    };
    let mut out = format!("jobs in the last {since}: {}\n\n", s.total);
    let rows: Vec<Vec<String>> = s
        .by_status
        .iter()
        .map(|(t, st, n)| {
            vec![
                t.clone(),
                st.clone(),
                n.to_string(),
                format!("{:.1}%", pct(*n)),
            ]
        })
        .collect();
    out.push_str(&table(&["type", "status", "count", "share"], &rows));
    if !s.top_codes.is_empty() {
        out.push_str("\ntop codes of jobs that did not succeed:\n");
        let rows: Vec<Vec<String>> = s
            .top_codes
            .iter()
            .map(|(c, n)| {
                vec![
                    format!("{:.1}%", pct(*n)),
                    c.clone(),
                    n.to_string(),
                    meaning(c).to_owned(),
                ]
            })
            .collect();
        out.push_str(&table(&["share", "code", "count", "meaning"], &rows));
    }
    out.push('\n');
    out.push_str(&render_fleet(fleet));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse() {
        assert_eq!(parse_age("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_age("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert!(parse_age("1").is_err());
        assert!(parse_age("h").is_err());
        assert!(parse_age("1w").is_err());
    }

    #[test]
    fn heartbeat_ages_tell_a_beat_from_a_crash() {
        assert_eq!(ago(Some(340)), "0.3 s ago");
        assert_eq!(ago(Some(-5)), "0.0 s ago", "clock skew is not the future");
        assert_eq!(ago(Some(45_000)), "45 s ago");
        assert_eq!(ago(Some(3_599_999)), "59 min ago");
        assert_eq!(ago(Some(3 * 3_600_000)), "3 h ago");
        assert_eq!(ago(Some(9 * 86_400_000)), "9 d ago");
        assert_eq!(ago(None), "never");
    }

    #[test]
    fn tables_mask_phone_numbers() {
        let out =
            render_jobs(&[json!({"id": "a", "phone_number": "13800138000", "status": "sent"})]);
        assert!(out.contains("138****8000"), "{out}");
        assert!(!out.contains("13800138000"), "{out}");
    }
}
