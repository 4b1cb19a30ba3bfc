//! The status page's chart: jobs per minute over the last hour, succeeded and failed stacked,
//! as inline SVG (no script, no outside asset). Hovering a bar shows its numbers (`<title>`).

use std::fmt::Write as _;

use crate::store::MinuteCount;

pub const MINUTES: usize = 60;

const WIDTH: usize = 720;
const HEIGHT: usize = 180;
const LEFT: usize = 36;
const BOTTOM: usize = 22;
const TOP: usize = 8;
const SLOT: usize = (WIDTH - LEFT) / MINUTES;

pub const OK_COLOUR: &str = "#2da44e";
pub const FAILED_COLOUR: &str = "#cf222e";

/// A round number at or above `n`, so the axis reads well.
fn axis_max(n: i64) -> i64 {
    let n = n.max(1);
    let mut step = 1;
    loop {
        for m in [1, 2, 5] {
            if m * step >= n {
                return m * step;
            }
        }
        step *= 10;
    }
}

/// Per minute, oldest first: (succeeded, failed). Counts outside the window are ignored.
pub fn series(rows: &[MinuteCount]) -> [(i64, i64); MINUTES] {
    let mut out = [(0, 0); MINUTES];
    for r in rows {
        if let Ok(ago) = usize::try_from(r.minutes_ago)
            && ago < MINUTES
        {
            let slot = &mut out[MINUTES - 1 - ago];
            slot.0 += r.succeeded;
            slot.1 += r.failed;
        }
    }
    out
}

pub fn svg(rows: &[MinuteCount]) -> String {
    let data = series(rows);
    let max = axis_max(data.iter().map(|(s, f)| s + f).max().unwrap_or(0));
    let plot = (HEIGHT - BOTTOM - TOP) as f64;
    let y_of = |n: i64| (n as f64 / max as f64) * plot;
    let base = (HEIGHT - BOTTOM) as f64;
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"100%\" \
         role=\"img\" aria-labelledby=\"chart-title\" style=\"max-width:{WIDTH}px;font:11px sans-serif\">\
         <title id=\"chart-title\">Jobs per minute, last hour: succeeded and failed</title>"
    );
    // Grid: top, middle and the base line, labelled.
    for (frac, label) in [(1.0, max), (0.5, max / 2), (0.0, 0)] {
        let y = base - plot * frac;
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{WIDTH}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#d0d7de\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#57606a\">{label}</text>",
            LEFT - 4,
            y + 4.0
        );
    }
    for (i, (ok, failed)) in data.iter().enumerate() {
        let x = LEFT + i * SLOT + 1;
        let w = SLOT - 2;
        let ago = MINUTES - 1 - i;
        let _ = write!(
            out,
            "<g><title>{} min ago: {ok} succeeded, {failed} failed</title>",
            ago
        );
        let h_ok = y_of(*ok);
        let h_failed = y_of(*failed);
        if *ok > 0 {
            let _ = write!(
                out,
                "<rect x=\"{x}\" y=\"{:.1}\" width=\"{w}\" height=\"{h_ok:.1}\" fill=\"{OK_COLOUR}\"/>",
                base - h_ok
            );
        }
        if *failed > 0 {
            let _ = write!(
                out,
                "<rect x=\"{x}\" y=\"{:.1}\" width=\"{w}\" height=\"{h_failed:.1}\" fill=\"{FAILED_COLOUR}\"/>",
                base - h_ok - h_failed
            );
        }
        // An invisible full-height target, so even an empty minute shows its tooltip.
        let _ = write!(
            out,
            "<rect x=\"{x}\" y=\"{TOP}\" width=\"{w}\" height=\"{plot:.1}\" fill=\"transparent\"/></g>"
        );
    }
    for (i, label) in [(0, "-60 min"), (30, "-30 min"), (MINUTES - 1, "now")] {
        let x = LEFT + i * SLOT + SLOT / 2;
        let anchor = match i {
            0 => "start",
            i if i == MINUTES - 1 => "end",
            _ => "middle",
        };
        let _ = write!(
            out,
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"{anchor}\" fill=\"#57606a\">{label}</text>",
            HEIGHT - 6
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_land_oldest_first_and_outliers_are_dropped() {
        let rows = [
            MinuteCount {
                minutes_ago: 0,
                succeeded: 3,
                failed: 1,
            },
            MinuteCount {
                minutes_ago: 59,
                succeeded: 1,
                failed: 0,
            },
            MinuteCount {
                minutes_ago: 60,
                succeeded: 9,
                failed: 9,
            },
            MinuteCount {
                minutes_ago: -1,
                succeeded: 9,
                failed: 9,
            },
        ];
        let s = series(&rows);
        assert_eq!(s[MINUTES - 1], (3, 1));
        assert_eq!(s[0], (1, 0));
        assert_eq!(s.iter().map(|(a, b)| a + b).sum::<i64>(), 5);
    }

    #[test]
    fn axis_rounds_up() {
        assert_eq!(axis_max(0), 1);
        assert_eq!(axis_max(3), 5);
        assert_eq!(axis_max(7), 10);
        assert_eq!(axis_max(11), 20);
        assert_eq!(axis_max(480), 500);
    }

    #[test]
    fn bars_are_drawn_for_busy_minutes_only() {
        let svg = svg(&[MinuteCount {
            minutes_ago: 0,
            succeeded: 2,
            failed: 2,
        }]);
        assert_eq!(svg.matches(OK_COLOUR).count(), 1);
        assert_eq!(svg.matches(FAILED_COLOUR).count(), 1);
        assert!(svg.contains("0 min ago: 2 succeeded, 2 failed"));
        assert!(svg.ends_with("</svg>"));
    }
}
