//! `LOG_FORMAT=json` over a whole run of the real binary at debug level: every line is JSON
//! a log shipper can take, the job span says which job a line is about, and nothing secret is
//! in any line.

use std::net::{Ipv4Addr, SocketAddr};

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{FakeAliyun, FakeConfig, Fault, FaultRule};
use serde_json::Value;

use crate::cli::enqueue;
use crate::helpers::{
    TEST_KEY_ID, TEST_SECRET, amqp_url, create_database, drop_database, remove_topology_and_close,
    test_settings, unique_phone,
};
use crate::process::WorkerProcess;

fn masked(phone: &str) -> String {
    format!("{}****{}", &phone[..3], &phone[7..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_json_carry_the_job_span_and_leak_nothing() {
    let fake = FakeAliyun::start(
        FakeConfig::new(TEST_KEY_ID, TEST_SECRET),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    )
    .await
    .expect("start fake Aliyun");
    let (db_name, db_url) = create_database().await;
    let prefix = format!(
        "smsw-test-log-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let token = format!("STS.tok{}", uuid::Uuid::new_v4().simple());
    let mut settings = test_settings(&db_url, &fake, &prefix);
    settings.insert(config::ALIBABA_CLOUD_SECURITY_TOKEN.into(), token.clone());
    settings.insert(config::LOG_FORMAT.into(), "json".into());

    let mut worker = WorkerProcess::start(&["run"], &settings).await;

    let code_phone = unique_phone();
    let sms_phone = unique_phone();
    // The first send meets a 503 and is retried, so the retry path logs too.
    fake.push_fault(
        FaultRule::every(Fault::Http503)
            .on_phone(code_phone.as_str())
            .times(1),
    );
    let sent = enqueue(
        &settings,
        &[
            "send-verify-code",
            "--phone",
            &code_phone,
            "--return-verify-code",
            "--code-length",
            "8",
        ],
    )
    .await;
    assert_eq!(sent["status"], "sent", "{sent}");
    assert_eq!(sent["attempts"], 2, "{sent}");
    let code = sent["verify_code"].as_str().expect("code").to_owned();
    let checked = enqueue(
        &settings,
        &["check-verify-code", "--phone", &code_phone, "--code", &code],
    )
    .await;
    assert_eq!(checked["status"], "verified", "{checked}");
    // A backend's own code inside a Dysmsapi template is as secret as Aliyun's.
    let own_code = "73920461";
    let sms = enqueue(
        &settings,
        &[
            "send-sms",
            "--phone",
            &sms_phone,
            "--sign-name",
            "阿里云短信测试",
            "--template-code",
            "SMS_154950909",
            "--template-param",
            &format!("{{\"code\":\"{own_code}\"}}"),
        ],
    )
    .await;
    assert_eq!(sms["status"], "sent", "{sms}");
    assert!(
        worker.wait_for_log("delivery receipt").await,
        "the receipt poller logs the receipt:\n{}",
        worker.log.join("\n")
    );

    let (status, log) = worker.terminate().await;
    assert!(status.success(), "worker exit status {status:?}");
    let lines: Vec<Value> = log
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(),
                "a log line without timestamp, level or target: {line}"
            );
            v
        })
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "debug level was on"
    );

    for (job, job_type, phone) in [
        (&sent, "send_verify_code", &code_phone),
        (&checked, "check_verify_code", &code_phone),
        (&sms, "send_sms", &sms_phone),
    ] {
        let id = job["id"].as_str().expect("job id");
        let finished = lines
            .iter()
            .find(|l| l["message"] == "job finished" && l["span"]["job_id"] == id)
            .unwrap_or_else(|| panic!("no `job finished` line in the span of job {id}:\n{log}"));
        let span = &finished["span"];
        assert_eq!(span["name"], "job", "{finished}");
        assert_eq!(span["job_type"], job_type, "{finished}");
        assert_eq!(span["phone"], masked(phone), "{finished}");
    }
    let retry = lines
        .iter()
        .find(|l| l["message"] == "retryable answer from Aliyun; backing off")
        .unwrap_or_else(|| panic!("the retry is logged:\n{log}"));
    assert_eq!(retry["span"]["job_id"], sent["id"], "{retry}");

    let secrets = [
        ("full phone number", code_phone.as_str()),
        ("full phone number", sms_phone.as_str()),
        ("verification code", code.as_str()),
        ("backend's code", own_code),
        ("AccessKey secret", TEST_SECRET),
        ("AccessKey secret", "s3cr3t"),
        ("security token", token.as_str()),
        ("security token", &token["STS.".len()..]),
    ];
    for (what, secret) in secrets {
        let leaks: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{what} {secret} in the log:\n{leaks:#?}");
    }

    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("connect RabbitMQ");
    remove_topology_and_close(&connection, &settings).await;
    drop_database(&db_name).await;
}

/// The default (pretty) format written to a file or a pipe — a container's log, systemd's
/// journal, the bench's log file — carries no terminal colour codes for a log shipper or
/// `grep` to trip over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_logs_to_a_pipe_carry_no_colour_codes() {
    let env = crate::helpers::TestEnv::new(|_| {}).await;
    let worker = WorkerProcess::start(&["run"], &env.settings).await;
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("consuming jobs"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in the log:\n{log}");
    env.remove().await;
}
