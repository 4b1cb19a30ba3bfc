//! The worker's Prometheus metrics: what the pipeline, the Aliyun client and the receipt poller
//! count, and their text exposition for `/metrics`.
//!
//! Recording sits on every job's path, so it is atomics, or a short mutex section over a map
//! whose keys are `'static` label values. Every label value comes from a closed set (job types,
//! statuses, Aliyun actions, the codes [`crate::aliyun::outcome`] knows), so a flood of odd
//! answers cannot grow the number of series.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::aliyun::{Product, outcome};
use crate::store::{BatchCounts, DailyUsage};

/// Every metric family `/metrics` exposes. The Grafana dashboard is checked against it, and the
/// metrics test checks it against a live scrape.
pub const FAMILIES: &[&str] = &[
    "sms_jobs_total",
    "sms_aliyun_calls_total",
    "sms_aliyun_call_codes_total",
    "sms_aliyun_call_duration_seconds",
    "sms_job_stage_duration_seconds",
    "sms_aliyun_retries_total",
    "sms_rate_limit_waits_total",
    "sms_rate_limit_wait_seconds_total",
    "sms_receipts_total",
    "sms_jobs_in_flight",
    "sms_jobs_in_flight_peak",
    "sms_worker_ready",
    "sms_worker_task_restarts_total",
    "sms_worker_fleet_leader",
    "sms_daily_sms_budget",
    "sms_worker_aliyun_account_error",
    "sms_fleet_oldest_sending_seconds",
    "sms_fleet_receipts_overdue_seconds",
    "sms_fleet_dead_letters",
    "sms_store_batches_total",
    "sms_store_batch_jobs_total",
    "sms_store_batch_seconds_total",
];

/// The Aliyun actions this program calls; anything else is counted as `other`.
const ACTIONS: [&str; 5] = [
    "SendSmsVerifyCode",
    "CheckSmsVerifyCode",
    "SendSms",
    "SendBatchSms",
    "QuerySendDetails",
];
const OTHER: &str = "other";
const N_ACTIONS: usize = ACTIONS.len() + 1;

fn action_index(action: &str) -> usize {
    ACTIONS
        .iter()
        .position(|a| *a == action)
        .unwrap_or(ACTIONS.len())
}

fn action_name(index: usize) -> &'static str {
    ACTIONS.get(index).copied().unwrap_or(OTHER)
}

/// Upper bounds of the call-latency buckets, in seconds: from a fast local answer to the
/// default whole-request timeout (10 s).
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The stages of a job, in order; see [`Stage`].
const STAGES: [&str; 6] = ["pace", "claim", "aliyun", "record", "publish", "ack"];

/// A stage of a job whose duration is recorded.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// The first rate-limit slot, taken before the claim (jobs no guard counts; the others
    /// take theirs in `aliyun`).
    Pace = 0,
    Claim = 1,
    Aliyun = 2,
    Record = 3,
    Publish = 4,
    Ack = 5,
}

/// Final delivery-receipt statuses (see `sms_deliveries.delivery_status`).
const RECEIPT_STATUSES: [&str; 2] = ["delivered", "failed"];

/// One histogram series. Buckets are kept non-cumulative (one increment per observation) and
/// summed at render time, so `+Inf` always equals `_count` even while calls are recorded.
#[derive(Default)]
struct Histogram {
    /// `BUCKETS.len()` bounded buckets, then the overflow.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// Aliyun refused the account or its credentials on the latest call of an action: restarting
/// will not help, an operator must act (top up, re-enable the key, grant the RAM permission).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountTrouble {
    pub product: &'static str,
    pub action: &'static str,
    /// Aliyun's code, canonical (see [`outcome::account_trouble`]).
    pub code: &'static str,
    /// The first answer with this code since the action last worked.
    pub since: DateTime<Utc>,
}

/// What one answer changed of the account trouble of its action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountChange {
    Raised(AccountTrouble),
    Cleared(AccountTrouble),
    Unchanged,
}

/// What the fleet's leader measures of the whole fleet (see `duties`); `None` is not measured.
/// They are fleet-wide, so only the leader exposes them: N workers do not multiply them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FleetGauges {
    /// Age of the oldest `sending` claim (since it last changed); 0 when there is none.
    pub oldest_sending_seconds: Option<f64>,
    /// How late the most overdue delivery-receipt check is; 0 when none is overdue.
    pub receipts_overdue_seconds: Option<f64>,
    /// Messages in the dead-letter queue.
    pub dead_letters: Option<u64>,
}

/// A counter family with two labels, keyed by their values (no allocation on a bump).
type Pairs = BTreeMap<(&'static str, &'static str), u64>;

/// Counters the worker bumps.
#[derive(Default)]
pub struct Metrics {
    jobs: Mutex<Pairs>,
    calls: Mutex<Pairs>,
    call_codes: Mutex<Pairs>,
    call_duration: [Histogram; N_ACTIONS],
    stage_duration: [Histogram; STAGES.len()],
    retries: [AtomicU64; N_ACTIONS],
    rate_waits: [AtomicU64; N_ACTIONS],
    rate_wait_nanos: [AtomicU64; N_ACTIONS],
    /// `RECEIPT_STATUSES`, then `other`.
    receipts: [AtomicU64; RECEIPT_STATUSES.len() + 1],
    in_flight: AtomicI64,
    /// The most deliveries ever handled at once since the start.
    in_flight_peak: AtomicI64,
    /// Restarts of supervised background tasks, by task name.
    task_restarts: Mutex<BTreeMap<&'static str, u64>>,
    /// 1 while this worker does the fleet's one-at-a-time duties.
    leader: AtomicI64,
    /// The fleet's SMS budget today, as last read (heartbeat); None when there is none.
    daily: Mutex<Option<DailyUsage>>,
    /// Account trouble by action (each action is its own permission, and only sends spend
    /// balance: one action's refusal says nothing of another's).
    account: Mutex<BTreeMap<&'static str, AccountTrouble>>,
    /// Set by the leader's duties; cleared when this worker stops leading.
    fleet: Mutex<FleetGauges>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere mid-increment; the counts still stand.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn bump(map: &Mutex<Pairs>, a: &'static str, b: &'static str) {
    *lock(map).entry((a, b)).or_default() += 1;
}

impl Metrics {
    /// A supervised background task ended (a panic or an early return) and is restarted.
    pub fn task_restarted(&self, task: &'static str) {
        *lock(&self.task_restarts).entry(task).or_default() += 1;
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.store(i64::from(leading), Ordering::Relaxed);
        if !leading {
            // The new leader measures them now; two workers exposing them would count twice,
            // and this one's would go stale.
            *lock(&self.fleet) = FleetGauges::default();
        }
    }

    /// The leader's latest measurement of the fleet.
    pub fn set_fleet(&self, gauges: FleetGauges) {
        *lock(&self.fleet) = gauges;
    }

    /// Aliyun answered a call of `action` with `code`. An account-level or credential code
    /// raises the action's account trouble; an accepted call (`OK`) clears it. Other answers
    /// leave it: a refused number or a throttled call says nothing of the account, and Aliyun
    /// may check them before the balance or the RAM policy.
    pub fn account_answer(&self, product: Product, action: &str, code: &str) -> AccountChange {
        let action = action_name(action_index(action));
        let mut troubles = lock(&self.account);
        if let Some(code) = outcome::account_trouble(code) {
            if troubles.get(action).is_some_and(|t| t.code == code) {
                return AccountChange::Unchanged;
            }
            let trouble = AccountTrouble {
                product: product.as_str(),
                action,
                code,
                since: Utc::now(),
            };
            troubles.insert(action, trouble.clone());
            AccountChange::Raised(trouble)
        } else if code.eq_ignore_ascii_case("OK") {
            troubles
                .remove(action)
                .map_or(AccountChange::Unchanged, AccountChange::Cleared)
        } else {
            AccountChange::Unchanged
        }
    }

    /// The account trouble standing now, by action.
    pub fn account_troubles(&self) -> Vec<AccountTrouble> {
        lock(&self.account).values().cloned().collect()
    }

    pub fn job_finished(&self, job_type: &'static str, status: &'static str) {
        bump(&self.jobs, job_type, status);
    }

    /// One Aliyun call of the pipeline and what the worker made of its answer (the verdict).
    pub fn aliyun_call(&self, action: &'static str, verdict: &'static str) {
        bump(&self.calls, action, verdict);
    }

    /// One Aliyun call made by the client, whoever asked for it: how long the HTTP exchange
    /// took and the code it ended with (Aliyun's, or the worker's own for no answer).
    pub fn aliyun_answer(&self, action: &str, took: Duration, code: &str) {
        let i = action_index(action);
        self.call_duration[i].observe(took);
        let code = outcome::known_code(code).unwrap_or(OTHER);
        bump(&self.call_codes, action_name(i), code);
    }

    /// How long one stage of a job took.
    pub fn stage(&self, stage: Stage, took: Duration) {
        self.stage_duration[stage as usize].observe(took);
    }

    /// The pipeline is about to call `action` again after a retryable answer.
    pub fn aliyun_retry(&self, action: &str) {
        self.retries[action_index(action)].fetch_add(1, Ordering::Relaxed);
    }

    /// A call waited `waited` for its rate-limit slot; no wait is not counted.
    pub fn rate_limit_wait(&self, action: &str, waited: Duration) {
        if waited.is_zero() {
            return;
        }
        let i = action_index(action);
        self.rate_waits[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.rate_wait_nanos[i].fetch_add(nanos, Ordering::Relaxed);
    }

    /// A delivery receipt turned final.
    pub fn receipt(&self, delivery_status: &str) {
        let i = RECEIPT_STATUSES
            .iter()
            .position(|s| *s == delivery_status)
            .unwrap_or(RECEIPT_STATUSES.len());
        self.receipts[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self, delta: i64) {
        let now = self.in_flight.fetch_add(delta, Ordering::Relaxed) + delta;
        self.in_flight_peak.fetch_max(now, Ordering::Relaxed);
    }

    pub fn set_daily_usage(&self, usage: DailyUsage) {
        *lock(&self.daily) = Some(usage);
    }

    /// Today's SMS budget, as last read; None when there are no daily limits.
    pub fn daily_usage(&self) -> Option<DailyUsage> {
        lock(&self.daily).clone()
    }

    pub fn jobs_in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, ready: bool) -> String {
        let mut out = String::with_capacity(4096);
        let pairs =
            |out: &mut String, name: &str, labels: (&str, &str), rows: Vec<((&str, &str), u64)>| {
                for ((a, b), n) in rows {
                    let _ = writeln!(
                        out,
                        "{name}{{{}=\"{}\",{}=\"{}\"}} {n}",
                        labels.0,
                        escape(a),
                        labels.1,
                        escape(b)
                    );
                }
            };

        header(
            &mut out,
            "sms_jobs_total",
            "counter",
            "Jobs answered, by type and final status.",
        );
        let rows = snapshot(&self.jobs);
        pairs(&mut out, "sms_jobs_total", ("type", "status"), rows);

        header(
            &mut out,
            "sms_aliyun_calls_total",
            "counter",
            "Aliyun calls made for jobs, by action and what the worker made of the answer.",
        );
        let rows = snapshot(&self.calls);
        pairs(
            &mut out,
            "sms_aliyun_calls_total",
            ("action", "outcome"),
            rows,
        );

        header(
            &mut out,
            "sms_aliyun_call_codes_total",
            "counter",
            "Aliyun calls (jobs and receipt queries), by action and answer code; ALIYUN_* are the worker's own codes for no usable answer, codes it does not know count as other.",
        );
        let rows = snapshot(&self.call_codes);
        pairs(
            &mut out,
            "sms_aliyun_call_codes_total",
            ("action", "code"),
            rows,
        );

        self.render_durations(&mut out);

        per_action(
            &mut out,
            "sms_aliyun_retries_total",
            "Retries of a job's Aliyun call after a retryable answer (Throttling*, ServiceUnavailable, not connected).",
            &self.retries,
            |n| n.to_string(),
        );
        per_action(
            &mut out,
            "sms_rate_limit_waits_total",
            "Aliyun calls that waited for their slot under the rate limit (ALIYUN_MAX_QPS, RECEIPTS_MAX_QPS).",
            &self.rate_waits,
            |n| n.to_string(),
        );
        per_action(
            &mut out,
            "sms_rate_limit_wait_seconds_total",
            "Time Aliyun calls spent waiting for their slot under the rate limit.",
            &self.rate_wait_nanos,
            |nanos| seconds(nanos as f64 / 1e9),
        );

        header(
            &mut out,
            "sms_receipts_total",
            "counter",
            "Delivery receipts that turned final, by delivery status.",
        );
        for (i, n) in self.receipts.iter().enumerate() {
            let status = RECEIPT_STATUSES.get(i).copied().unwrap_or(OTHER);
            let n = n.load(Ordering::Relaxed);
            // `other` never happens unless the table gains a status; no need to show a zero.
            if status != OTHER || n > 0 {
                let _ = writeln!(out, "sms_receipts_total{{status=\"{status}\"}} {n}");
            }
        }

        header(
            &mut out,
            "sms_jobs_in_flight",
            "gauge",
            "Deliveries being handled.",
        );
        let _ = writeln!(out, "sms_jobs_in_flight {}", self.jobs_in_flight());
        header(
            &mut out,
            "sms_jobs_in_flight_peak",
            "gauge",
            "The most deliveries handled at once since the worker started.",
        );
        let _ = writeln!(
            out,
            "sms_jobs_in_flight_peak {}",
            self.in_flight_peak.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "sms_worker_ready",
            "gauge",
            "1 when consuming with the database reachable.",
        );
        let _ = writeln!(out, "sms_worker_ready {}", u8::from(ready));
        header(
            &mut out,
            "sms_worker_task_restarts_total",
            "counter",
            "Background tasks (heartbeat, receipts, fleet duties) that stopped and were restarted; any increase is a bug to report.",
        );
        for (task, n) in lock(&self.task_restarts).iter() {
            let _ = writeln!(
                out,
                "sms_worker_task_restarts_total{{task=\"{}\"}} {n}",
                escape(task)
            );
        }
        header(
            &mut out,
            "sms_worker_fleet_leader",
            "gauge",
            "1 while this worker does the fleet's one-at-a-time duties (receipts, reconciliation, sweeps).",
        );
        let _ = writeln!(
            out,
            "sms_worker_fleet_leader {}",
            self.leader.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "sms_daily_sms_budget",
            "gauge",
            "The fleet's SMS budget today (SMS_DAILY_LIMIT, SMS_DAILY_LIMIT_PER_PREFIX), as read at the last heartbeat: scope=\"fleet\" limit, used and left; scope=\"prefix\" limit, the busiest range's use and the ranges spent.",
        );
        if let Some(d) = lock(&self.daily).as_ref() {
            let mut gauge = |scope: &str, what: &str, v: u32| {
                let _ = writeln!(
                    out,
                    "sms_daily_sms_budget{{scope=\"{scope}\",what=\"{what}\"}} {v}"
                );
            };
            if let (Some(limit), Some(left)) = (d.total_limit, d.total_left()) {
                gauge("fleet", "limit", limit);
                gauge("fleet", "used", d.total_used);
                gauge("fleet", "left", left);
            }
            if let Some(limit) = d.per_prefix_limit {
                gauge("prefix", "limit", limit);
                gauge("prefix", "busiest_used", d.busiest_prefix_used);
                gauge("prefix", "ranges_spent", d.prefixes_spent);
            }
        }
        header(
            &mut out,
            "sms_worker_aliyun_account_error",
            "gauge",
            "1 while the latest answer to an Aliyun action was an account-level or credential code (balance, disabled key, RAM permission); cleared by the next accepted call of that action.",
        );
        for t in self.account_troubles() {
            let _ = writeln!(
                out,
                "sms_worker_aliyun_account_error{{product=\"{}\",action=\"{}\",code=\"{}\"}} 1",
                t.product,
                t.action,
                escape(t.code)
            );
        }
        self.render_fleet(&mut out);
        out
    }

    fn render_fleet(&self, out: &mut String) {
        let fleet = *lock(&self.fleet);
        let gauge = |out: &mut String, name: &str, help: &str, value: Option<String>| {
            header(out, name, "gauge", help);
            if let Some(v) = value {
                let _ = writeln!(out, "{name} {v}");
            }
        };
        gauge(
            out,
            "sms_fleet_oldest_sending_seconds",
            "Fleet-wide, from the leader only: age of the oldest sending claim since it last changed (0 when none); one the sweep cannot end stays and grows.",
            fleet.oldest_sending_seconds.map(seconds),
        );
        gauge(
            out,
            "sms_fleet_receipts_overdue_seconds",
            "Fleet-wide, from the leader only: how late the most overdue delivery-receipt check is (0 when none is due); grows while the receipt poller is stopped or behind.",
            fleet.receipts_overdue_seconds.map(seconds),
        );
        gauge(
            out,
            "sms_fleet_dead_letters",
            "Fleet-wide, from the leader only: messages in the dead-letter queue (SMS_DEAD_LETTER_QUEUE).",
            fleet.dead_letters.map(|n| n.to_string()),
        );
    }

    fn render_durations(&self, out: &mut String) {
        histograms(
            out,
            "sms_aliyun_call_duration_seconds",
            "Duration of Aliyun HTTP calls (after any rate-limit wait), by action.",
            "action",
            self.call_duration
                .iter()
                .enumerate()
                .map(|(i, h)| (action_name(i), h)),
        );
        histograms(
            out,
            "sms_job_stage_duration_seconds",
            "Where a job's time goes: claim (its sending row committed), aliyun (every attempt, backoff and rate-limit wait), record (the outcome committed), publish (the result confirmed), ack.",
            "stage",
            STAGES.iter().copied().zip(self.stage_duration.iter()),
        );
    }
}

/// One histogram family, a series per label value; series never observed are left out.
fn histograms<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    series: impl Iterator<Item = (&'a str, &'a Histogram)>,
) {
    header(out, name, "histogram", help);
    for (value, h) in series {
        let counts: Vec<u64> = h
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            continue;
        }
        let mut cumulative = 0;
        for (le, n) in BUCKETS.iter().zip(&counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{{label}=\"{value}\",le=\"{}\"}} {cumulative}",
                seconds(*le)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {count}"
        );
        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{label}=\"{value}\"}} {}", seconds(sum));
        let _ = writeln!(out, "{name}_count{{{label}=\"{value}\"}} {count}");
    }
}

/// The store's group commits (see `store::batch`), after [`Metrics::render`]: jobs per batch
/// is jobs / batches, a batch's mean time seconds / batches. Batches near one job under load
/// mean commits are not shared; long batches mean a slow database.
pub fn render_batches(out: &mut String, counts: &[BatchCounts]) {
    let family = |out: &mut String, name: &str, help: &str, value: fn(&BatchCounts) -> String| {
        header(out, name, "counter", help);
        for c in counts {
            let _ = writeln!(out, "{name}{{write=\"{}\"}} {}", escape(c.write), value(c));
        }
    };
    family(
        out,
        "sms_store_batches_total",
        "Statements of the batched writes that committed (each its own commit), by write: claim, stamp, outcome, result_published. A failed statement is not counted.",
        |c| c.batches.to_string(),
    );
    family(
        out,
        "sms_store_batch_jobs_total",
        "Jobs written by the batched writes' committed statements, by write.",
        |c| c.jobs.to_string(),
    );
    family(
        out,
        "sms_store_batch_seconds_total",
        "Time the batched writes' committed statements took, by write.",
        |c| seconds(c.busy.as_secs_f64()),
    );
}

/// A copy, so the lock is not held while formatting.
fn snapshot(map: &Mutex<Pairs>) -> Vec<((&'static str, &'static str), u64)> {
    lock(map).iter().map(|(k, n)| (*k, *n)).collect()
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A per-action counter family; actions never called are left out.
fn per_action(
    out: &mut String,
    name: &str,
    help: &str,
    values: &[AtomicU64; N_ACTIONS],
    show: impl Fn(u64) -> String,
) {
    header(out, name, "counter", help);
    for (i, v) in values.iter().enumerate() {
        let v = v.load(Ordering::Relaxed);
        if v > 0 {
            let _ = writeln!(out, "{name}{{action=\"{}\"}} {}", action_name(i), show(v));
        }
    }
}

/// A float as Prometheus reads it (`0.005`, `1`, `12.5`).
fn seconds(v: f64) -> String {
    format!("{v}")
}

/// Label values are from closed sets, but the exposition format's escaping costs nothing.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_codes_and_actions_do_not_grow_the_label_sets() {
        let m = Metrics::default();
        for i in 0..100 {
            m.aliyun_answer(
                &format!("Action{i}"),
                Duration::from_millis(1),
                &format!("isv.WEIRD_{i}"),
            );
        }
        m.aliyun_answer("SendSms", Duration::from_millis(30), "OK");
        m.aliyun_answer("SendSms", Duration::from_millis(3), "throttling.user");
        let text = m.render(true);
        assert!(
            text.contains("sms_aliyun_call_codes_total{action=\"other\",code=\"other\"} 100"),
            "{text}"
        );
        assert!(
            text.contains("sms_aliyun_call_codes_total{action=\"SendSms\",code=\"OK\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "sms_aliyun_call_codes_total{action=\"SendSms\",code=\"Throttling.User\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("WEIRD"), "{text}");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_count() {
        let m = Metrics::default();
        for ms in [1, 7, 30, 30, 20_000] {
            m.aliyun_answer("SendSmsVerifyCode", Duration::from_millis(ms), "OK");
        }
        let text = m.render(false);
        let bucket = |le: &str| {
            let prefix = format!(
                "sms_aliyun_call_duration_seconds_bucket{{action=\"SendSmsVerifyCode\",le=\"{le}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no bucket {le}: {text}"))
                .to_owned()
        };
        assert_eq!(bucket("0.005"), "1");
        assert_eq!(bucket("0.01"), "2");
        assert_eq!(bucket("0.05"), "4");
        assert_eq!(bucket("10"), "4");
        assert_eq!(bucket("+Inf"), "5");
        assert!(
            text.contains("sms_aliyun_call_duration_seconds_count{action=\"SendSmsVerifyCode\"} 5")
        );
        assert!(
            text.contains(
                "sms_aliyun_call_duration_seconds_sum{action=\"SendSmsVerifyCode\"} 20.068"
            )
        );
    }

    #[test]
    fn every_family_has_help_and_type() {
        let mut text = Metrics::default().render(true);
        render_batches(&mut text, &[]);
        for family in FAMILIES {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        let typed = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(typed, FAMILIES.len(), "{text}");
    }

    #[test]
    fn account_trouble_is_raised_by_account_codes_and_cleared_by_an_accepted_call() {
        let m = Metrics::default();
        let raised = m.account_answer(Product::Dysmsapi, "SendSms", "isv.amount_not_enough");
        assert!(
            matches!(&raised, AccountChange::Raised(t) if t.code == "isv.AMOUNT_NOT_ENOUGH"),
            "{raised:?}"
        );
        let since = m.account_troubles()[0].since;
        // The same trouble again keeps its start; answers that say nothing of the account
        // leave it standing.
        for code in [
            "isv.AMOUNT_NOT_ENOUGH",
            "isv.MOBILE_NUMBER_ILLEGAL",
            "Throttling.User",
            "ALIYUN_TIMEOUT",
        ] {
            assert_eq!(
                m.account_answer(Product::Dysmsapi, "SendSms", code),
                AccountChange::Unchanged,
                "{code}"
            );
        }
        // Another action's success proves nothing of this one's permission or balance.
        m.account_answer(Product::Dysmsapi, "QuerySendDetails", "OK");
        assert_eq!(m.account_troubles()[0].since, since);
        let text = m.render(true);
        assert!(
            text.contains(
                "sms_worker_aliyun_account_error{product=\"dysmsapi\",action=\"SendSms\",code=\"isv.AMOUNT_NOT_ENOUGH\"} 1"
            ),
            "{text}"
        );
        assert!(matches!(
            m.account_answer(Product::Dysmsapi, "SendSms", "OK"),
            AccountChange::Cleared(_)
        ));
        assert!(m.account_troubles().is_empty());
        assert!(!m.render(true).contains("sms_worker_aliyun_account_error{"));
    }

    #[test]
    fn fleet_gauges_show_only_while_leading() {
        let m = Metrics::default();
        m.set_leader(true);
        m.set_fleet(FleetGauges {
            oldest_sending_seconds: Some(12.5),
            receipts_overdue_seconds: Some(0.0),
            dead_letters: None,
        });
        let text = m.render(true);
        assert!(
            text.contains("\nsms_fleet_oldest_sending_seconds 12.5\n"),
            "{text}"
        );
        assert!(
            text.contains("\nsms_fleet_receipts_overdue_seconds 0\n"),
            "{text}"
        );
        assert!(!text.contains("\nsms_fleet_dead_letters "), "{text}");
        m.set_leader(false);
        let text = m.render(true);
        assert!(
            !text.contains("\nsms_fleet_oldest_sending_seconds "),
            "{text}"
        );
    }

    #[test]
    fn rate_limit_waits_count_only_real_waits() {
        let m = Metrics::default();
        m.rate_limit_wait("SendSms", Duration::ZERO);
        m.rate_limit_wait("SendSms", Duration::from_millis(250));
        m.rate_limit_wait("SendSms", Duration::from_millis(500));
        let text = m.render(true);
        assert!(
            text.contains("sms_rate_limit_waits_total{action=\"SendSms\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sms_rate_limit_wait_seconds_total{action=\"SendSms\"} 0.75"),
            "{text}"
        );
    }
}
