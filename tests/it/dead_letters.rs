//! `dead-letters list` and `dead-letters redrive` against a real worker's dead letters: one
//! refused as invalid by the worker, one dead-lettered by RabbitMQ itself (expired); and a
//! message whose headers the worker's frames cannot carry.

use std::collections::HashMap;

use aliyun_sms_worker::broker::HEADER_INVALID_CODE;
use aliyun_sms_worker::config;
use aliyun_sms_worker::wire::Status;
use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, TestEnv, amqp_url, publish_to, queue_settings, send_job, test_link, unique_id,
    unique_phone,
};
use crate::process::run_to_end;

struct Cli {
    settings: HashMap<String, String>,
}

impl Cli {
    async fn run(&self, args: &[&str]) -> (i32, String, String) {
        let envs = self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        run_to_end(envs, args).await
    }

    async fn list_json(&self) -> Vec<Value> {
        let (code, out, err) = self.run(&["dead-letters", "list", "--json"]).await;
        assert_eq!(code, 0, "{out}\n{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("JSON list ({e}): {out}"))
    }
}

/// Settings for the CLI alone, with no worker: RabbitMQ and queue names of their own.
fn cli_only_settings(label: &str) -> HashMap<String, String> {
    let prefix = format!(
        "smsw-test-{label}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    queue_settings(&prefix)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain([(config::AMQP_URL.to_owned(), amqp_url())])
        .collect()
}

async fn declare(channel: &Channel, name: &str, args: FieldTable) {
    channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("declare queue");
}

async fn delete(channel: &Channel, name: &str) {
    let _ = channel
        .queue_delete(ShortString::from(name), Default::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_without_loss_and_redriven_to_the_worker() {
    let env = TestEnv::new(|_| {}).await;
    let mut settings = env.settings.clone();
    let app = TestApp::start(env).await;
    let dlx = app.config.queues.dead_letter_exchange.clone();
    // The helpers consume the worker's dead-letter queue; the exchange is a fanout, so a second
    // queue bound to it holds the same dead letters for the CLI to look at.
    let inspect = format!("{}.inspect", app.config.queues.jobs);
    let expiring = format!("{}.ttl", app.config.queues.jobs);
    let channel = app.channel().await;
    declare(&channel, &inspect, FieldTable::default()).await;
    channel
        .queue_bind(
            ShortString::from(inspect.as_str()),
            ShortString::from(dlx.as_str()),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let mut ttl_args = FieldTable::default();
    ttl_args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from(dlx.as_bytes().to_vec())),
    );
    ttl_args.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongLongInt(0),
    );
    declare(&channel, &expiring, ttl_args).await;
    settings.insert(config::SMS_DEAD_LETTER_QUEUE.into(), inspect.clone());
    let cli = Cli { settings };

    // Refused by the worker: an unknown field. It carries a number, a typed code, and another
    // number written in groups, as people write them.
    let bad_id = unique_id("dl-bad");
    let bad_phone = unique_phone();
    let other = unique_phone();
    let grouped = format!("({}) {}.{}", &other[..3], &other[3..7], &other[7..]);
    app.publish(&json!({"id": bad_id, "type": "check_verify_code",
        "phone_number": bad_phone, "verify_code": "QZX7K9", "colour": format!("red, call {grouped}")}))
        .await;
    let (refused, _) = app.next_result().await;
    assert_eq!(refused.status, Status::Invalid);
    app.next_dead_letter().await;

    // Dead-lettered by RabbitMQ: a good job that expired in a queue before any worker saw it.
    let good_id = unique_id("dl-good");
    let good = send_job(&good_id);
    channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(expiring.as_str()),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&good).unwrap(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(ShortString::from(good_id.as_str())),
        )
        .await
        .expect("publish");
    app.next_dead_letter().await;

    let (code, table, _) = cli.run(&["dead-letters", "list"]).await;
    assert_eq!(code, 0, "{table}");
    assert!(
        table.contains(&bad_id) && table.contains(&good_id),
        "{table}"
    );
    assert!(table.contains("INVALID_FIELD"), "{table}");
    assert!(table.contains("1x expired"), "{table}");
    assert!(
        !table.contains(&bad_phone),
        "full number in the table: {table}"
    );
    assert!(
        !table.contains(&grouped) && table.contains(&format!("{}****{}", &other[..3], &other[7..])),
        "a number written in groups, masked like any other: {table}"
    );
    let good_phone = good["phone_number"].as_str().unwrap();
    assert!(
        !table.contains(good_phone),
        "full number in the table: {table}"
    );
    assert!(
        table.contains(&format!("{}****", &bad_phone[..3])),
        "{table}"
    );
    assert!(
        !table.contains("QZX7K9"),
        "a verification code in the table: {table}"
    );

    let listed = cli.list_json().await;
    assert_eq!(listed.len(), 2, "{listed:#?}");
    assert_eq!(listed[0]["job_id"], bad_id.as_str());
    assert_eq!(listed[0]["invalid_code"], "INVALID_FIELD");
    assert!(
        listed[0]["invalid_reason"]
            .as_str()
            .is_some_and(|r| r.contains("colour")),
        "{listed:#?}"
    );
    assert_eq!(listed[0]["body"]["verify_code"], "***");
    assert_eq!(listed[1]["job_id"], good_id.as_str());
    assert_eq!(listed[1]["message_id"], good_id.as_str());
    assert_eq!(listed[1]["death_count"], 1);
    assert_eq!(listed[1]["death_reason"], "expired");
    // Listing took nothing away.
    assert_eq!(cli.list_json().await.len(), 2);

    let (code, _, err) = cli.run(&["dead-letters", "redrive"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--id") && err.contains("--all"), "{err}");
    assert_eq!(
        cli.list_json().await.len(),
        2,
        "a refused redrive moves nothing"
    );

    let (code, out, err) = cli
        .run(&[
            "dead-letters",
            "redrive",
            "--id",
            &good_id,
            "--id",
            "no-such-job",
        ])
        .await;
    assert_eq!(code, 2, "an id not found is reported: {out}\n{err}");
    assert!(out.contains("redrove 1 message(s)"), "{out}");
    assert!(
        out.contains("not in") && out.contains("no-such-job"),
        "{out}"
    );
    let (result, _) = app.next_result().await;
    assert_eq!(result.id.as_deref(), Some(good_id.as_str()));
    assert_eq!(result.status, Status::Sent, "{result:?}");
    assert_eq!(app.fake.sends_for(&good_id), 1);
    let left = cli.list_json().await;
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0]["job_id"], bad_id.as_str());

    // --all: the invalid one goes back, is refused again and dead-lettered afresh.
    let (code, out, _) = cli.run(&["dead-letters", "redrive", "--all"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("redrove 1 message(s)"), "{out}");
    let (again, _) = app.next_result().await;
    assert_eq!(again.id.as_deref(), Some(bad_id.as_str()));
    assert_eq!(again.status, Status::Invalid);
    let dead = app.next_dead_letter().await;
    let headers = dead.properties.headers().clone().unwrap_or_default();
    assert!(headers.contains_key(HEADER_INVALID_CODE));
    let back = cli.list_json().await;
    assert_eq!(back.len(), 1, "{back:#?}");
    assert_eq!(back[0]["job_id"], bad_id.as_str());

    delete(&channel, &inspect).await;
    delete(&channel, &expiring).await;
    app.shutdown().await;
}

/// A message whose headers are larger than the worker's 16 KiB frames ends in the dead-letter
/// queue (the worker cannot receive it; RabbitMQ's delivery limit moves it). The CLI must read
/// it and what queues behind it: it hung for ever on it, so nothing behind it could be
/// redriven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_with_headers_too_large_for_the_workers_frames_is_listed_and_passed() {
    let settings = cli_only_settings("dlbig");
    let (connection, channel) = test_link().await;
    let dead = settings[config::SMS_DEAD_LETTER_QUEUE].clone();
    let jobs = settings[config::SMS_JOBS_QUEUE].clone();
    declare(&channel, &dead, FieldTable::default()).await;
    declare(&channel, &jobs, FieldTable::default()).await;

    let big_id = unique_id("dl-big-headers");
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-big"),
        AMQPValue::LongString(LongString::from("A".repeat(20_000))),
    );
    publish_to(
        &channel,
        &dead,
        &serde_json::to_vec(&send_job(&big_id)).expect("json"),
        BasicProperties::default()
            .with_message_id(ShortString::from(big_id.as_str()))
            .with_headers(headers),
    )
    .await;
    let after = unique_id("dl-after-big");
    publish_to(
        &channel,
        &dead,
        &serde_json::to_vec(&send_job(&after)).expect("json"),
        BasicProperties::default().with_message_id(ShortString::from(after.as_str())),
    )
    .await;

    let cli = Cli { settings };
    let listed = cli.list_json().await;
    let ids: Vec<&str> = listed.iter().filter_map(|l| l["job_id"].as_str()).collect();
    assert_eq!(ids, [big_id.as_str(), after.as_str()], "{listed:#?}");
    let (code, out, err) = cli.run(&["dead-letters", "redrive", "--id", &after]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("redrove 1 message(s)"), "{out}");
    let left = cli.list_json().await;
    assert_eq!(left.len(), 1, "the big one stays: {left:#?}");

    delete(&channel, &dead).await;
    delete(&channel, &jobs).await;
    let _ = connection.close(200, ShortString::from("done")).await;
}

/// A redrive that RabbitMQ stops part way (here a jobs queue that takes one message more and
/// then refuses) says which messages it moved before it stopped: it said only the error, and
/// an operator could not tell what had gone back to the jobs queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_stopped_part_way_names_what_it_moved() {
    let settings = cli_only_settings("dlstop");
    let (connection, channel) = test_link().await;
    let dead = settings[config::SMS_DEAD_LETTER_QUEUE].clone();
    let jobs = settings[config::SMS_JOBS_QUEUE].clone();
    declare(&channel, &dead, FieldTable::default()).await;
    let mut full_after_one = FieldTable::default();
    full_after_one.insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(1));
    full_after_one.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    declare(&channel, &jobs, full_after_one).await;
    let ids: Vec<String> = (0..3).map(|i| unique_id(&format!("dl-stop{i}"))).collect();
    for id in &ids {
        publish_to(
            &channel,
            &dead,
            &serde_json::to_vec(&send_job(id)).expect("json"),
            BasicProperties::default().with_message_id(ShortString::from(id.as_str())),
        )
        .await;
    }

    let cli = Cli { settings };
    let (code, out, err) = cli.run(&["dead-letters", "redrive", "--all"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("redrove 1 message(s)") && out.contains(&ids[0]),
        "{out}"
    );
    assert!(
        err.contains("stopped after the 1 above") && err.contains("stay in"),
        "{err}"
    );
    let left: Vec<String> = cli
        .list_json()
        .await
        .iter()
        .filter_map(|l| l["job_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(left, ids[1..].to_vec(), "the rest stay, in order");

    delete(&channel, &dead).await;
    delete(&channel, &jobs).await;
    let _ = connection.close(200, ShortString::from("done")).await;
}
