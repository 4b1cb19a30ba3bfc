//! The fleet's schedule of Aliyun calls, shared through Postgres: every worker process takes
//! its call slots here, so `ALIYUN_MAX_QPS` and `RECEIPTS_MAX_QPS` hold across the fleet. The
//! slot arithmetic and the handing out of slots are in `aliyun::rate`.
//!
//! Times are the database's (`clock_timestamp()`, read after the row lock is held) and come
//! back as a relative wait, so the workers' own clocks never matter.

use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::PgPool;

use super::Store;
use crate::aliyun::rate::{Schedule, ScheduleError};

pub struct FleetSchedule {
    pool: PgPool,
}

impl Store {
    /// The rate-limit schedule shared by every worker on this database.
    pub fn rate_schedule(&self) -> std::sync::Arc<dyn Schedule> {
        std::sync::Arc::new(FleetSchedule {
            pool: self.pool.clone(),
        })
    }
}

impl Schedule for FleetSchedule {
    fn reserve<'a>(
        &'a self,
        action: &'a str,
        count: u32,
        spacing: Duration,
    ) -> BoxFuture<'a, Result<Duration, ScheduleError>> {
        let span = spacing.as_secs_f64() * f64::from(count);
        Box::pin(async move {
            // One statement, one row lock: reservations of the fleet queue up on the row and
            // each one starts where the last one ended.
            let (first,): (f64,) = sqlx::query_as(
                "INSERT INTO sms_rate_limits AS r (action, tat)
                 VALUES ($1, clock_timestamp() + make_interval(secs => $2))
                 ON CONFLICT (action) DO UPDATE
                    SET tat = greatest(r.tat, clock_timestamp()) + make_interval(secs => $2)
                 RETURNING extract(epoch FROM r.tat - clock_timestamp())::float8 - $2",
            )
            .bind(action)
            .bind(span)
            .fetch_one(&self.pool)
            .await?;
            // The first slot is never before the reservation; a few microseconds below zero
            // are the two readings of the clock.
            Ok(Duration::try_from_secs_f64(first).unwrap_or(Duration::ZERO))
        })
    }
}
