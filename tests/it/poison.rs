//! Poison messages, against the worker binary: a message that RabbitMQ or Postgres cannot take
//! as it is (an id too long for an AMQP short string, a NUL byte, a value the database refuses)
//! is answered `invalid` and dead-lettered, and the process goes on — no panic, no pause taken
//! for a database outage, ready all along, and the next job is sent.

use std::collections::HashMap;

use aliyun_sms_worker::broker::{HEADER_INVALID_CODE, HEADER_INVALID_REASON};
use aliyun_sms_worker::config;
use aliyun_sms_worker::store::{ErrorClass, StoreError};
use aliyun_sms_worker::wire::{JobResult, MAX_ID_BYTES, Status};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::Value;
use sqlx::{Connection as _, PgConnection};

use crate::dysmsapi::sms_job;
use crate::helpers::{
    TestEnv, admin_get, consume, drop_database, free_addr, next_from, publish_to,
    remove_topology_and_close, send_job, test_link, unique_id, unique_phone,
};
use crate::invalid::header;
use crate::process::WorkerProcess;

/// A worker process with its admin listener, and the test's own link to its queues.
pub(crate) struct Live {
    pub(crate) env: TestEnv,
    worker: WorkerProcess,
    admin: String,
    connection: Connection,
    channel: Channel,
    results: Consumer,
    dead: Consumer,
}

impl Live {
    pub(crate) async fn start() -> Self {
        let admin = free_addr();
        let env = TestEnv::new(|s| {
            s.insert(config::ADMIN_ADDR.into(), admin.clone());
        })
        .await;
        let worker = WorkerProcess::start(&["run"], &env.settings).await;
        let (connection, channel) = test_link().await;
        let results = consume(&connection, &env.settings[config::SMS_RESULTS_QUEUE]).await;
        let dead = consume(&connection, &env.settings[config::SMS_DEAD_LETTER_QUEUE]).await;
        Self {
            env,
            worker,
            admin,
            connection,
            channel,
            results,
            dead,
        }
    }

    async fn publish(&self, body: &[u8], props: BasicProperties) {
        let queue = &self.env.settings[config::SMS_JOBS_QUEUE];
        publish_to(&self.channel, queue, body, props).await;
    }

    pub(crate) async fn publish_json(&self, job: &Value, props: BasicProperties) {
        self.publish(&serde_json::to_vec(job).expect("json"), props)
            .await;
    }

    /// The next `n` results, by correlation id.
    pub(crate) async fn results(&mut self, n: usize) -> HashMap<String, JobResult> {
        let mut out = HashMap::new();
        for _ in 0..n {
            let d = next_from(&mut self.results, "a result").await;
            let correlation = d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str().to_owned())
                .expect("every result has a correlation id");
            let result: JobResult = serde_json::from_slice(&d.data).expect("a JobResult");
            out.insert(correlation, result);
        }
        out
    }

    /// The `x-sms-invalid-code` of the next `n` dead letters, sorted.
    async fn dead_letter_codes(&mut self, n: usize) -> Vec<String> {
        let mut codes: Vec<String> = self
            .dead_letters(n)
            .await
            .into_iter()
            .map(|(code, _)| code)
            .collect();
        codes.sort();
        codes
    }

    /// The `x-sms-invalid-code` and `x-sms-invalid-reason` of the next `n` dead letters.
    pub(crate) async fn dead_letters(&mut self, n: usize) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let d = next_from(&mut self.dead, "a dead letter").await;
            let reason = header(&d.properties, HEADER_INVALID_REASON);
            assert!(!reason.is_empty());
            out.push((header(&d.properties, HEADER_INVALID_CODE), reason));
        }
        out
    }

    /// Ready all along: never paused for a database outage, and `/readyz` answers 200 now.
    async fn assert_never_paused(&self) {
        let (status, body) = admin_get(&self.admin, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        let log = self.worker.log.join("\n");
        assert!(
            !log.contains("database unreachable"),
            "a poison message was taken for a database outage:\n{log}"
        );
    }

    /// SIGTERM; the process must exit cleanly and never have panicked. Then cleans up, and
    /// returns the worker's whole log.
    pub(crate) async fn finish(self) -> String {
        let (status, log) = self.worker.terminate().await;
        assert!(status.success(), "exit 0 on SIGTERM: {status:?}\n{log}");
        assert!(!log.contains("panicked"), "the worker panicked:\n{log}");
        remove_topology_and_close(&self.connection, &self.env.settings).await;
        drop_database(&self.env.db_name).await;
        log
    }
}

pub(crate) fn correlated(c: &str) -> BasicProperties {
    BasicProperties::default().with_correlation_id(ShortString::from(c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_longer_than_an_amqp_short_string_is_refused_and_the_worker_goes_on() {
    let mut live = Live::start().await;
    // 90 characters, 270 bytes: the message_id and the `id:phone` receipt id could not be
    // written as AMQP short strings (255 bytes).
    let long_id = "验".repeat(90);
    let after = unique_id("after-long-id");
    live.publish_json(&sms_job(&long_id, &[unique_phone()]), correlated("long-id"))
        .await;
    live.publish_json(&send_job(&after), BasicProperties::default())
        .await;

    let results = live.results(2).await;
    let refused = &results["long-id"];
    assert_eq!(refused.status, Status::Invalid, "{refused:?}");
    assert_eq!(refused.code, "ID_TOO_LONG", "{refused:?}");
    assert!(
        refused.message.contains(&format!("{MAX_ID_BYTES} bytes"))
            && refused.message.contains("270"),
        "the message names the byte limit and the size: {}",
        refused.message
    );
    assert_eq!(refused.attempts, 0);
    assert_eq!(results[&after].status, Status::Sent, "{results:#?}");
    assert_eq!(live.dead_letter_codes(1).await, ["ID_TOO_LONG"]);
    assert_eq!(live.env.fake.calls_for(&long_id), 0, "never reached Aliyun");
    live.assert_never_paused().await;
    live.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_are_answered_invalid_and_never_taken_for_a_database_outage() {
    let mut live = Live::start().await;
    let nul_type = unique_id("nul-type");
    let nul_reply = unique_id("nul-reply-to");
    let nul_correlation = unique_id("nul-correlation");
    let nul_param = unique_id("nul-param");
    let after = unique_id("after-nul");

    live.publish(
        format!(r#"{{"id":"{nul_type}","type":"\u0000"}}"#).as_bytes(),
        correlated("nul-type"),
    )
    .await;
    // Where a NUL in reply_to would have sent the answer is no queue: it comes to the results
    // queue instead.
    live.publish_json(
        &send_job(&nul_reply),
        correlated("nul-reply-to").with_reply_to(ShortString::from("replies\u{0}x")),
    )
    .await;
    live.publish_json(
        &send_job(&nul_correlation),
        BasicProperties::default().with_correlation_id(ShortString::from("corr\u{0}x")),
    )
    .await;
    let mut with_nul_key = send_job(&nul_param);
    with_nul_key["template_param"]["a\u{0}b"] = Value::from("x");
    live.publish_json(&with_nul_key, correlated("nul-param"))
        .await;
    live.publish_json(&send_job(&after), BasicProperties::default())
        .await;

    let results = live.results(5).await;
    for key in [
        "nul-type",
        "nul-reply-to",
        nul_correlation.as_str(),
        "nul-param",
    ] {
        let r = results
            .get(key)
            .unwrap_or_else(|| panic!("no result correlated {key}: {results:#?}"));
        assert_eq!(r.status, Status::Invalid, "{key}: {r:?}");
        assert!(r.message.contains("NUL"), "{key}: {r:?}");
        assert!(!r.message.contains('\0'), "{key}: {r:?}");
    }
    assert_eq!(results[&after].status, Status::Sent, "{results:#?}");
    assert_eq!(live.dead_letter_codes(4).await.len(), 4);
    for id in [&nul_type, &nul_reply, &nul_correlation, &nul_param] {
        assert_eq!(live.env.fake.calls_for(id), 0, "{id} never reached Aliyun");
    }
    live.assert_never_paused().await;
    live.finish().await;
}

/// Whatever validation misses, a value the database refuses is about that message, not an
/// outage: here a constraint refuses some ids, in a batch of claims with valid neighbours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_refuses_is_answered_invalid_and_its_neighbours_are_sent() {
    let mut live = Live::start().await;
    let mut db = PgConnection::connect(&live.env.db_url)
        .await
        .expect("connect test db");
    sqlx::query(
        "ALTER TABLE sms_jobs ADD CONSTRAINT poison_ids CHECK (id NOT LIKE 'refused-by-db-%')",
    )
    .execute(&mut db)
    .await
    .expect("add the constraint");
    let refused = unique_id("refused-by-db");
    let neighbours: Vec<String> = (0..20).map(|i| unique_id(&format!("n{i}"))).collect();
    live.publish_json(&send_job(&refused), correlated("refused"))
        .await;
    for id in &neighbours {
        live.publish_json(&send_job(id), BasicProperties::default())
            .await;
    }

    let results = live.results(1 + neighbours.len()).await;
    let r = &results["refused"];
    assert_eq!(r.status, Status::Invalid, "{r:?}");
    assert_eq!(r.code, "INVALID_DATA", "{r:?}");
    assert!(
        !r.message.contains(&refused),
        "no value of the message: {r:?}"
    );
    for id in &neighbours {
        assert_eq!(results[id].status, Status::Sent, "{id}: {results:#?}");
    }
    assert_eq!(live.dead_letter_codes(1).await, ["INVALID_DATA"]);
    assert_eq!(live.env.fake.calls_for(&refused), 0);
    // The commit counters count what committed: the neighbours' claims, whether they were
    // retried alone or never shared a batch with the refused row; never the refused claim,
    // nor a batch that failed. Each batch is counted before its jobs hear their answers.
    let (status, text) = admin_get(&live.admin, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let exp = crate::prometheus_text::parse(&text);
    let claimed = exp.value("sms_store_batch_jobs_total", &[("write", "claim")]);
    assert_eq!(claimed, Some(neighbours.len() as f64), "{text}");
    live.assert_never_paused().await;
    let _ = db.close().await;
    live.finish().await;
}

/// The class and SQLSTATE of a statement's failure.
fn refusal(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> (ErrorClass, String) {
    let e = StoreError::from(result.expect_err("the statement must fail"));
    (e.class(), e.sqlstate().unwrap_or_else(|| e.to_string()))
}

/// The SQLSTATEs Postgres really sends, classified: a refused value is the data's fault; an
/// administrator's shutdown and a read-only failover are the connection's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_postgres_errors_are_told_apart_by_sqlstate() {
    let (db_name, db_url) = crate::helpers::create_database().await;
    let mut db = PgConnection::connect(&db_url).await.expect("connect");

    // 22021: a NUL in text.
    let nul = sqlx::query("SELECT $1::text").bind("a\0b").execute(&mut db);
    assert_eq!(refusal(nul.await), (ErrorClass::Data, "22021".into()));
    // 23505: a duplicate key.
    sqlx::query("CREATE TEMP TABLE t (x int PRIMARY KEY)")
        .execute(&mut db)
        .await
        .expect("temp table");
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&mut db)
        .await
        .expect("first row");
    let duplicate = sqlx::query("INSERT INTO t VALUES (1)").execute(&mut db);
    assert_eq!(refusal(duplicate.await), (ErrorClass::Data, "23505".into()));

    // 25006: a read-only session, as after a failover to a standby.
    let mut read_only = PgConnection::connect(&db_url).await.expect("connect");
    sqlx::query("SET default_transaction_read_only = on")
        .execute(&mut read_only)
        .await
        .expect("read-only");
    let write = sqlx::query("CREATE TABLE never (x int)").execute(&mut read_only);
    assert_eq!(refusal(write.await), (ErrorClass::Outage, "25006".into()));

    // 57P01: the backend terminated by an administrator.
    let mut victim = PgConnection::connect(&db_url).await.expect("connect");
    let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut victim)
        .await
        .expect("pid");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&mut db)
        .await
        .expect("terminate");
    let after = sqlx::query("SELECT 1").execute(&mut victim);
    // Postgres says why before it closes the connection; had sqlx seen only the close, that is
    // an outage too.
    let (class, sqlstate) = refusal(after.await);
    assert_eq!(class, ErrorClass::Outage, "{sqlstate}");

    let _ = read_only.close().await;
    let _ = db.close().await;
    drop_database(&db_name).await;
}
