//! Delivery receipts and the reconciliation of unknown Dysmsapi sends, both through
//! `QuerySendDetails`.
//!
//! - A `sent` send's numbers are checked until the carrier's receipt is final (delivered or
//!   failed), less and less often while it is still waiting, so no number is hammered.
//! - An `unknown` send (its answer was lost) is looked up by OutId: found, it becomes `sent`
//!   and the backend gets a second result; not found within the grace period, it was never
//!   sent and ends `failed` (`NOT_SENT`). A lookup that cannot decide (refused, unanswered, or
//!   more sends that day than it reads) is asked again, less and less often; if none could
//!   decide while Aliyun kept the day's details (30 days), the job stays `unknown` with the code
//!   `NOT_RECONCILED` and a second result says so. Nothing is resent.
//!
//! Calls are paced to `RECEIPTS_MAX_QPS` across the fleet (the client's schedule, with a lower
//! limit for QuerySendDetails), since QuerySendDetails shares Aliyun's per-account budget with
//! every other user of the account.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::aliyun::{AliyunClient, Answer, Effect, Product, Verdict, classify};
use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::phone;
use crate::store::{DeliveryRow, ReceiptUpdate, ReconcileRow, Store, StoreError, china_time};
use crate::worker::pipeline::publish_result;

/// How many rows one round takes on, of each kind.
const BATCH: i64 = 200;
/// Aliyun keeps send details for 30 days.
const DETAILS_KEPT_DAYS: i64 = 30;
const QUERY_SEND_DETAILS: &str = "QuerySendDetails";
/// QuerySendDetails' largest page.
const PAGE_SIZE: usize = 50;
/// Pages looked through for one OutId (a number rarely gets more than a few sends a day).
const MAX_PAGES: usize = 4;

/// When to look an unknown send up again after a lookup that decided nothing: every poll
/// interval within the grace period; past it (QuerySendDetails refused or did not answer when
/// the last lookup was to decide), as long again as it has been overdue, up to an hour. A send
/// whose lookups keep failing (a RAM policy without `dysms:QuerySendDetails`) then costs a few
/// calls a day instead of one a round, and does not keep newer ones from their turn.
fn reconcile_delay(row: &ReconcileRow, poll: Duration) -> Duration {
    const LONGEST: Duration = Duration::from_secs(3600);
    let overdue = (Utc::now() - row.reconcile_until)
        .to_std()
        .unwrap_or(Duration::ZERO);
    overdue.clamp(poll, LONGEST.max(poll))
}

/// One entry of QuerySendDetails' `SmsSendDetailDTOs.SmsSendDetailDTO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendDetail {
    /// 1 waiting for the receipt, 2 failed, 3 delivered.
    pub send_status: i64,
    pub err_code: Option<String>,
    pub receive_date: Option<String>,
    pub out_id: Option<String>,
    pub biz_id: Option<String>,
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads the details out of a QuerySendDetails answer; anything unexpected reads as none.
pub fn send_details(answer: &Answer) -> Vec<SendDetail> {
    let list = answer
        .body
        .get("SmsSendDetailDTOs")
        .and_then(|d| d.get("SmsSendDetailDTO"))
        .and_then(Value::as_array);
    list.into_iter()
        .flatten()
        .map(|d| SendDetail {
            send_status: text(d.get("SendStatus"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            err_code: text(d.get("ErrCode")),
            receive_date: text(d.get("ReceiveDate")),
            out_id: text(d.get("OutId")),
            biz_id: text(d.get("BizId")),
        })
        .collect()
}

/// `ReceiveDate` is China time, `yyyy-MM-dd HH:mm:ss`.
fn china_datetime(raw: &str) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S").ok()?;
    china_time()
        .from_local_datetime(&naive)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

pub struct Receipts {
    config: Arc<Config>,
    store: Store,
    aliyun: AliyunClient,
    broker: watch::Receiver<Option<Broker>>,
    /// Whether this worker leads the fleet: only the leader polls, so receipts, events and
    /// second results happen once per fleet.
    leader: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Receipts {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        aliyun: AliyunClient,
        broker: watch::Receiver<Option<Broker>>,
        leader: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Only the poller calls QuerySendDetails, so the action's limit is the poller's.
        let aliyun = aliyun.with_action_limit(QUERY_SEND_DETAILS, config.receipts.max_qps);
        Self {
            config,
            store,
            aliyun,
            broker,
            leader,
            metrics,
        }
    }

    /// Polls every `RECEIPTS_POLL_INTERVAL_MS` until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.receipts.poll_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // A round can take longer than a drain: the fleet shares RECEIPTS_MAX_QPS. Stopping
            // mid-round is safe: the queries are idempotent, every write is whole, and rows
            // left unchecked are claimed under a lease and come back to the fleet.
            let round = async {
                tick.tick().await;
                let leading = *self.leader.borrow();
                if !leading {
                    return Ok(());
                }
                self.round().await
            };
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
                result = round => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "receipt round failed; trying again next round");
                    }
                }
            }
        }
    }

    async fn round(&mut self) -> Result<(), RoundError> {
        // A claim hides rows from other pollers; if this worker dies, they come back after it.
        let lease = self.config.receipts.poll_interval + Duration::from_secs(60);
        for row in self.store.claim_due_reconciliations(BATCH, lease).await? {
            self.reconcile(row).await?;
        }
        for row in self.store.claim_due_receipts(BATCH, lease).await? {
            self.check(row).await?;
        }
        for event in self.store.unpublished_receipts(BATCH).await? {
            self.publish_event(&event).await?;
        }
        Ok(())
    }

    async fn query(
        &mut self,
        phone: &str,
        date: NaiveDate,
        biz_id: Option<&str>,
        page: usize,
    ) -> Option<Answer> {
        let mut params = vec![
            ("PhoneNumber", phone.to_owned()),
            ("SendDate", date.format("%Y%m%d").to_string()),
            ("PageSize", PAGE_SIZE.to_string()),
            ("CurrentPage", page.to_string()),
        ];
        if let Some(b) = biz_id {
            params.push(("BizId", b.to_owned()));
        }
        let result = self
            .aliyun
            .call(Product::Dysmsapi, QUERY_SEND_DETAILS, &params, &[])
            .await;
        match (classify(Effect::Idempotent, &result), result) {
            (Verdict::Success, Ok(answer)) => Some(answer),
            (verdict, result) => {
                let code = match &result {
                    Ok(a) => a.code.clone().unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(
                    phone = %phone::mask(phone),
                    verdict = verdict.as_str(),
                    code = %code,
                    "QuerySendDetails did not answer; will ask again later"
                );
                None
            }
        }
    }

    /// Finds the send with this OutId (and/or BizId) among a number's sends of one day.
    async fn find(
        &mut self,
        phone: &str,
        date: NaiveDate,
        biz_id: Option<&str>,
        out_id: Option<&str>,
    ) -> Result<Option<SendDetail>, ()> {
        for page in 1..=MAX_PAGES {
            let Some(answer) = self.query(phone, date, biz_id, page).await else {
                return Err(());
            };
            let details = send_details(&answer);
            let count = details.len();
            let found = details.into_iter().find(|d| match (biz_id, out_id) {
                // Filtered by BizId at Aliyun already.
                (Some(_), _) => true,
                (None, Some(o)) => d.out_id.as_deref() == Some(o),
                (None, None) => false,
            });
            if found.is_some() || count < PAGE_SIZE {
                return Ok(found);
            }
        }
        // More sends that day than were looked through: not finding it proves nothing, and
        // "never sent" would invite a second paid SMS.
        Err(())
    }

    async fn check(&mut self, row: DeliveryRow) -> Result<(), RoundError> {
        let today = Utc::now().with_timezone(&china_time()).date_naive();
        if (today - row.send_date).num_days() > DETAILS_KEPT_DAYS {
            // Aliyun no longer has the details: the receipt will never be known.
            if let Some(event) = self
                .store
                .record_receipt(
                    &row.job_id,
                    &row.phone_number,
                    false,
                    Some("NO_RECEIPT"),
                    None,
                )
                .await?
            {
                self.metrics.receipt(&event.delivery_status);
                self.publish_event(&event).await?;
            }
            return Ok(());
        }
        let found = self
            .find(
                &row.phone_number,
                row.send_date,
                row.biz_id.as_deref(),
                row.out_id.as_deref(),
            )
            .await;
        let final_receipt = match found {
            Ok(Some(d)) if d.send_status == 3 || d.send_status == 2 => Some(d),
            _ => None,
        };
        match final_receipt {
            Some(d) => {
                let received_at = d.receive_date.as_deref().and_then(china_datetime);
                let updated = self
                    .store
                    .record_receipt(
                        &row.job_id,
                        &row.phone_number,
                        d.send_status == 3,
                        d.err_code.as_deref(),
                        received_at,
                    )
                    .await?;
                if let Some(event) = updated {
                    self.metrics.receipt(&event.delivery_status);
                    tracing::info!(
                        job_id = %row.job_id,
                        phone = %phone::mask(&row.phone_number),
                        status = %event.delivery_status,
                        "delivery receipt"
                    );
                    self.publish_event(&event).await?;
                }
            }
            None => {
                // Waiting, not visible yet, or Aliyun did not answer: ask less often each time.
                let exponent = u32::try_from(row.checks.clamp(0, 6)).unwrap_or(6);
                let delay = self.config.receipts.poll_interval * 2u32.pow(exponent);
                self.store
                    .reschedule_receipt(&row.job_id, &row.phone_number, delay)
                    .await?;
            }
        }
        Ok(())
    }

    async fn reconcile(&mut self, row: ReconcileRow) -> Result<(), RoundError> {
        let Some(phone) = row.phone_number.clone() else {
            return Ok(());
        };
        // The send happened on the day the job was created, China time, or just after midnight.
        let first = row.created_at.with_timezone(&china_time()).date_naive();
        let today = Utc::now().with_timezone(&china_time()).date_naive();
        if (today - first).num_days() > DETAILS_KEPT_DAYS {
            // Aliyun keeps no details that old: an empty answer now would read as "never sent".
            tracing::warn!(job_id = %row.id, "unknown send not reconciled: QuerySendDetails did not answer while Aliyun kept its details");
            let ended = self.store.reconcile_given_up(&row.id).await?;
            return self.publish_second_result(&row.id, ended).await;
        }
        let mut dates = vec![first];
        if today > first {
            dates.push(first.succ_opt().unwrap_or(first));
        }
        let mut found = None;
        let mut answered = true;
        for date in dates {
            match self.find(&phone, date, None, row.out_id.as_deref()).await {
                Ok(Some(detail)) => {
                    found = Some(detail);
                    break;
                }
                Ok(None) => {}
                Err(()) => answered = false,
            }
        }
        let ended = match found {
            Some(detail) => {
                tracing::info!(job_id = %row.id, "unknown send found at Aliyun: sent");
                self.store
                    .reconciled_as_sent(&row.id, detail.biz_id.as_deref())
                    .await?
            }
            None if answered && Utc::now() >= row.reconcile_until => {
                tracing::info!(job_id = %row.id, "unknown send not found at Aliyun: never sent");
                self.store.reconciled_as_never_sent(&row.id).await?
            }
            None => {
                self.store
                    .reschedule_reconcile(
                        &row.id,
                        reconcile_delay(&row, self.config.receipts.poll_interval),
                    )
                    .await?;
                None
            }
        };
        self.publish_second_result(&row.id, ended).await
    }

    async fn publish_second_result(
        &mut self,
        id: &str,
        ended: Option<crate::store::JobRow>,
    ) -> Result<(), RoundError> {
        if let Some(job) = ended {
            // The backend already had `unknown`; this second result tells it what happened. It
            // is in the outbox until confirmed, so a broker away now only delays it.
            let result = job.to_result()?;
            let broker = self.broker.borrow().clone();
            if let Some(broker) = broker
                && let Err(e) = publish_result(&self.store, &broker, &result, &job.route()).await
            {
                tracing::warn!(job_id = %id, error = %e, "reconciled result not published yet; the outbox will");
            }
        }
        Ok(())
    }

    async fn publish_event(&self, r: &ReceiptUpdate) -> Result<(), RoundError> {
        let Some(broker) = self.broker.borrow().clone() else {
            return Ok(());
        };
        let event = json!({
            "type": "delivery",
            "job_id": r.job_id,
            "phone_number": r.phone_number,
            "biz_id": r.biz_id,
            "out_id": r.out_id,
            "delivery_status": r.delivery_status,
            "err_code": r.err_code,
            "received_at": r.received_at,
        });
        let id = format!("{}:{}", r.job_id, r.phone_number);
        match broker.publish_receipt(&event, &id).await {
            Ok(()) => {
                self.store
                    .mark_receipt_published(&r.job_id, &r.phone_number)
                    .await?
            }
            Err(e) => tracing::warn!(error = %e, "receipt event not published; will retry"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_parse_from_the_documented_shape_and_garbage() {
        let answer = |body: Value| Answer {
            http_status: 200,
            code: Some("OK".into()),
            message: None,
            request_id: None,
            body,
        };
        let ok = answer(
            json!({"Code":"OK","TotalCount":"1","SmsSendDetailDTOs":{"SmsSendDetailDTO":[
            {"PhoneNum":"1390000****","SendStatus":3,"ErrCode":"DELIVERED","SendDate":"2019-01-08 16:44:10",
             "ReceiveDate":"2019-01-08 16:44:13","OutId":"123"}]}}),
        );
        let d = send_details(&ok);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].send_status, 3);
        assert_eq!(d[0].out_id.as_deref(), Some("123"));
        let at = china_datetime(d[0].receive_date.as_deref().unwrap()).unwrap();
        assert_eq!(at.to_rfc3339(), "2019-01-08T08:44:13+00:00");

        for garbage in [json!(null), json!({"SmsSendDetailDTOs": 5}), json!([1, 2])] {
            assert!(send_details(&answer(garbage)).is_empty());
        }
        assert_eq!(china_datetime("yesterday"), None);
    }
}
