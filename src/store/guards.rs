//! The abuse guards that need the fleet's history: counted in the claim's own transaction, so
//! two workers cannot both let through the last job a guard allows.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use sqlx::PgConnection;

use super::StoreError;
use crate::config::{CheckLimit, DailyLimits, NumberLimits};
use crate::wire::{Job, JobType, Status};

/// Why a job is answered without a call; written as the job's final row at the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: Status,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    /// SMS pumping goes to expensive destinations: templated SMS go only where allowed.
    pub fn country_not_allowed() -> Self {
        Self {
            status: Status::Rejected,
            code: "COUNTRY_NOT_ALLOWED",
            message:
                "a number's country calling code is not in SMS_ALLOWED_COUNTRY_CODES; not sent"
                    .into(),
        }
    }

    fn rate_limited(code: &'static str, message: String) -> Self {
        Self {
            status: Status::RateLimited,
            code,
            message,
        }
    }
}

/// The guards that apply to one job.
#[derive(Debug, Default, Clone)]
pub struct Guards<'a> {
    /// Decided without the database (the country allow-list).
    pub refusal: Option<Refusal>,
    pub number_limits: Option<&'a NumberLimits>,
    pub check_limit: Option<CheckLimit>,
    pub daily: Option<DailyLimits>,
}

impl Guards<'_> {
    /// Whether the claim must be counted in a transaction of its own.
    pub fn counted(&self) -> bool {
        self.refusal.is_none()
            && (self.number_limits.is_some() || self.check_limit.is_some() || self.daily.is_some())
    }
}

/// The day's scope of the whole fleet; sorts before every prefix.
const FLEET_SCOPE: &str = "*";

/// Digits of a number that make its range for `SMS_DAILY_LIMIT_PER_PREFIX`.
const PREFIX_DIGITS: usize = 7;

/// Serialises the guarded claims of one number across the fleet until the transaction ends.
pub(super) async fn lock_number(
    tx: &mut PgConnection,
    kind: &str,
    number: &str,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("smsw-{kind}:{number}"))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Aliyun's per-number send limits, applied before the call.
pub(super) async fn number_limits(
    tx: &mut PgConnection,
    job: &Job,
    limits: &NumberLimits,
) -> Result<Option<Refusal>, StoreError> {
    for (window, max) in &limits.windows {
        let (recent,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM sms_jobs
             WHERE phone_number = $1 AND type = $2 AND id <> $3
               AND status IN ('sending', 'sent', 'unknown')
               AND created_at > now() - make_interval(secs => $4::double precision / 1000)",
        )
        .bind(job.phone().as_str())
        .bind(job.job_type().as_str())
        .bind(&job.id)
        .bind(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
        .fetch_one(&mut *tx)
        .await?;
        if recent >= i64::from(*max) {
            return Ok(Some(Refusal::rate_limited(
                "LOCAL_NUMBER_LIMIT",
                format!(
                    "local per-number limit: {max} per {}s reached for this number; not sent",
                    window.as_secs()
                ),
            )));
        }
    }
    Ok(None)
}

/// Code guessing: the checks of one number that may have reached Aliyun within the window,
/// counted since its last `verified` check (which ends the window).
pub(super) async fn check_limit(
    tx: &mut PgConnection,
    job: &Job,
    limit: CheckLimit,
) -> Result<Option<Refusal>, StoreError> {
    let (recent,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM sms_jobs
         WHERE phone_number = $1 AND type = $2 AND id <> $3
           AND status NOT IN ('invalid', 'expired', 'rate_limited')
           AND created_at > now() - make_interval(secs => $4::double precision / 1000)
           AND created_at > COALESCE(
                 (SELECT max(finished_at) FROM sms_jobs
                  WHERE phone_number = $1 AND type = $2 AND status = 'verified'),
                 '-infinity')",
    )
    .bind(job.phone().as_str())
    .bind(JobType::CheckVerifyCode.as_str())
    .bind(&job.id)
    .bind(i64::try_from(limit.window.as_millis()).unwrap_or(i64::MAX))
    .fetch_one(&mut *tx)
    .await?;
    Ok((recent >= i64::from(limit.max_attempts)).then(|| {
        Refusal::rate_limited(
            "CHECK_LIMIT",
            format!(
                "{} checks of this number within {}s; no more until the window passes or a code is verified; not checked",
                limit.max_attempts,
                limit.window.as_secs()
            ),
        )
    }))
}

/// What a job spends of the day's budget: one SMS per number, by scope.
fn spending(job: &Job, limits: DailyLimits) -> BTreeMap<String, i32> {
    let mut by_scope = BTreeMap::new();
    for phone in job.phones() {
        if limits.total.is_some() {
            *by_scope.entry(FLEET_SCOPE.to_owned()).or_insert(0) += 1;
        }
        if limits.per_prefix.is_some() {
            let number = phone.as_str();
            let prefix = number.get(..PREFIX_DIGITS).unwrap_or(number);
            *by_scope.entry(prefix.to_owned()).or_insert(0) += 1;
        }
    }
    by_scope
}

/// The day the budget counts in, by the database's clock.
pub(super) async fn budget_day(
    conn: &mut PgConnection,
    limits: DailyLimits,
) -> Result<NaiveDate, StoreError> {
    let (day,): (NaiveDate,) = sqlx::query_as(
        "SELECT ((now() AT TIME ZONE 'UTC') + make_interval(secs => $1::double precision))::date",
    )
    .bind(f64::from(limits.utc_offset_secs))
    .fetch_one(&mut *conn)
    .await?;
    Ok(day)
}

/// Spends the job's SMS from the day's budget, or refuses it when any scope would go over;
/// nothing is spent then. Rows are locked in scope order, so two claims never wait on each
/// other in a circle.
pub(super) async fn spend_daily(
    tx: &mut PgConnection,
    job: &Job,
    limits: DailyLimits,
) -> Result<Option<Refusal>, StoreError> {
    let spend = spending(job, limits);
    let scopes: Vec<&str> = spend.keys().map(String::as_str).collect();
    let counts: Vec<i32> = spend.values().copied().collect();
    let day = budget_day(tx, limits).await?;
    sqlx::query(
        "INSERT INTO sms_daily_usage (day, scope, used)
         SELECT $1, s, 0 FROM unnest($2::text[]) AS s ORDER BY s
         ON CONFLICT (day, scope) DO NOTHING",
    )
    .bind(day)
    .bind(&scopes)
    .execute(&mut *tx)
    .await?;
    let used: Vec<(String, i32)> = sqlx::query_as(
        "SELECT scope, used FROM sms_daily_usage
         WHERE day = $1 AND scope = ANY($2) ORDER BY scope FOR UPDATE",
    )
    .bind(day)
    .bind(&scopes)
    .fetch_all(&mut *tx)
    .await?;
    for (scope, used) in &used {
        let n = spend.get(scope).copied().unwrap_or(0);
        let (limit, what) = if scope == FLEET_SCOPE {
            (
                limits.total,
                "the fleet's daily SMS limit (SMS_DAILY_LIMIT)",
            )
        } else {
            (
                limits.per_prefix,
                "the daily SMS limit of this number range (SMS_DAILY_LIMIT_PER_PREFIX)",
            )
        };
        let Some(limit) = limit else { continue };
        if i64::from(*used) + i64::from(n) > i64::from(limit) {
            return Ok(Some(Refusal::rate_limited(
                "DAILY_LIMIT",
                format!("{what} of {limit} is spent for today; not sent"),
            )));
        }
    }
    sqlx::query(
        "UPDATE sms_daily_usage AS u SET used = u.used + t.n
         FROM unnest($2::text[], $3::int[]) AS t(scope, n)
         WHERE u.day = $1 AND u.scope = t.scope",
    )
    .bind(day)
    .bind(&scopes)
    .bind(&counts)
    .execute(&mut *tx)
    .await?;
    Ok(None)
}

/// Today's budget as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyUsage {
    pub day: NaiveDate,
    pub total_limit: Option<u32>,
    pub total_used: u32,
    pub per_prefix_limit: Option<u32>,
    /// Number ranges whose budget is spent today.
    pub prefixes_spent: u32,
    /// The most used number range's count today.
    pub busiest_prefix_used: u32,
}

impl DailyUsage {
    pub fn total_left(&self) -> Option<u32> {
        self.total_limit.map(|l| l.saturating_sub(self.total_used))
    }
}

pub(super) async fn daily_usage(
    conn: &mut PgConnection,
    limits: DailyLimits,
) -> Result<DailyUsage, StoreError> {
    let day = budget_day(conn, limits).await?;
    let (total, spent, busiest): (i64, i64, i64) = sqlx::query_as(
        "SELECT COALESCE(max(used) FILTER (WHERE scope = $2), 0)::bigint,
                count(*) FILTER (WHERE scope <> $2 AND used >= $3),
                COALESCE(max(used) FILTER (WHERE scope <> $2), 0)::bigint
         FROM sms_daily_usage WHERE day = $1",
    )
    .bind(day)
    .bind(FLEET_SCOPE)
    .bind(i64::from(limits.per_prefix.unwrap_or(u32::MAX)))
    .fetch_one(&mut *conn)
    .await?;
    let small = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(DailyUsage {
        day,
        total_limit: limits.total,
        total_used: small(total),
        per_prefix_limit: limits.per_prefix,
        prefixes_spent: small(spent),
        busiest_prefix_used: small(busiest),
    })
}

/// Budgets of past days are only history; a week is kept for operators.
pub(super) async fn prune_daily(conn: &mut PgConnection) -> Result<u64, StoreError> {
    Ok(
        sqlx::query("DELETE FROM sms_daily_usage WHERE day < current_date - 7")
            .execute(&mut *conn)
            .await?
            .rows_affected(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_spends_one_per_number_in_each_scope() {
        let body = serde_json::json!({
            "id": "b1", "type": "send_batch_sms",
            "phone_numbers": ["13800138000", "13800138001", "13900139000"],
            "sign_names": ["s", "s", "s"], "template_code": "SMS_1"
        });
        let job = crate::wire::decode_job(body.to_string().as_bytes(), None).unwrap();
        let limits = DailyLimits {
            total: Some(10),
            per_prefix: Some(5),
            utc_offset_secs: 0,
        };
        let spend = spending(&job, limits);
        assert_eq!(
            spend.into_iter().collect::<Vec<_>>(),
            vec![
                ("*".to_owned(), 3),
                ("1380013".to_owned(), 2),
                ("1390013".to_owned(), 1)
            ]
        );
    }
}
