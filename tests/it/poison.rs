//! Poison messages, against the worker binary: a message that RabbitMQ or Postgres cannot take
//! as it is (an id too long for an AMQP short string, a NUL byte, a value the database refuses)
//! is answered `invalid` and dead-lettered, and the process goes on — no panic, no pause taken
//! for a database outage, ready all along, and the next job is sent.

use std::collections::HashMap;

use aliyun_sms_worker::broker::{HEADER_INVALID_CODE, HEADER_INVALID_REASON};
use aliyun_sms_worker::config;
use aliyun_sms_worker::wire::{JobResult, MAX_ID_BYTES, Status};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::Value;

use crate::dysmsapi::sms_job;
use crate::helpers::{
    TestEnv, admin_get, consume, delete_topology, drop_database, free_addr, next_from, publish_to,
    send_job, test_link, unique_id, unique_phone,
};
use crate::invalid::header;
use crate::process::WorkerProcess;

/// A worker process with its admin listener, and the test's own link to its queues.
struct Live {
    env: TestEnv,
    worker: WorkerProcess,
    admin: String,
    connection: Connection,
    channel: Channel,
    results: Consumer,
    dead: Consumer,
}

impl Live {
    async fn start() -> Self {
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

    async fn publish_json(&self, job: &Value, props: BasicProperties) {
        self.publish(&serde_json::to_vec(job).expect("json"), props)
            .await;
    }

    /// The next `n` results, by correlation id.
    async fn results(&mut self, n: usize) -> HashMap<String, JobResult> {
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
        let mut codes = Vec::new();
        for _ in 0..n {
            let d = next_from(&mut self.dead, "a dead letter").await;
            assert!(!header(&d.properties, HEADER_INVALID_REASON).is_empty());
            codes.push(header(&d.properties, HEADER_INVALID_CODE));
        }
        codes.sort();
        codes
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

    /// SIGTERM; the process must exit cleanly and never have panicked. Then cleans up.
    async fn finish(self) {
        let (status, log) = self.worker.terminate().await;
        assert!(status.success(), "exit 0 on SIGTERM: {status:?}\n{log}");
        assert!(!log.contains("panicked"), "the worker panicked:\n{log}");
        delete_topology(&self.connection, &self.env.settings).await;
        let _ = self
            .connection
            .close(200, ShortString::from("test done"))
            .await;
        drop_database(&self.env.db_name).await;
    }
}

fn correlated(c: &str) -> BasicProperties {
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
