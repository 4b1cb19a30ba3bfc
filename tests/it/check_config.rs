//! `check-config` against a running worker's RabbitMQ, Postgres and fake Aliyun: all good,
//! then one thing broken at a time.

use std::collections::HashMap;

use aliyun_sms_worker::config;

use crate::helpers::{TEST_SECRET, TestApp, TestEnv, create_database, drop_database, free_addr};
use crate::process::run_to_end;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn line(&self, check: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(check))
            .unwrap_or_else(|| panic!("no {check} line:\n{}", self.stdout))
    }
}

async fn check_config(settings: &HashMap<String, String>) -> Run {
    let envs = settings.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let (code, stdout, stderr) = run_to_end(envs, &["check-config"]).await;
    Run {
        code,
        stdout,
        stderr,
    }
}

fn with(
    settings: &HashMap<String, String>,
    name: &str,
    value: Option<&str>,
) -> HashMap<String, String> {
    let mut s = settings.clone();
    match value {
        Some(v) => s.insert(name.to_owned(), v.to_owned()),
        None => s.remove(name),
    };
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_each_dependency_in_plain_words() {
    let env = TestEnv::new(|_| {}).await;
    let settings = env.settings.clone();
    // The worker applies the migrations and declares the queues, as in production.
    let app = TestApp::start(env).await;

    let good = check_config(&settings).await;
    assert_eq!(good.code, 0, "{}\n{}", good.stdout, good.stderr);
    for check in ["config", "rabbitmq", "postgres", "aliyun"] {
        assert!(good.line(check).starts_with("ok "), "{}", good.stdout);
    }
    let migrations = aliyun_sms_worker::store::MIGRATOR.iter().count();
    assert!(
        good.line("postgres")
            .contains(&format!("all {migrations} migrations applied")),
        "{}",
        good.stdout
    );
    assert!(
        good.line("aliyun").contains("accepted the credentials"),
        "{}",
        good.stdout
    );
    assert_eq!(app.fake.requests().len(), 1, "one probe call");
    assert!(
        app.fake
            .requests()
            .iter()
            .all(|r| r.action == "QuerySendDetails")
    );

    let wrong = "Wr0ng+Secret/Value";
    let bad_secret = check_config(&with(
        &settings,
        config::ALIBABA_CLOUD_ACCESS_KEY_SECRET,
        Some(wrong),
    ))
    .await;
    assert_ne!(bad_secret.code, 0);
    let line = bad_secret.line("aliyun");
    assert!(
        line.starts_with("FAIL") && line.contains("credentials rejected"),
        "{line}"
    );
    assert!(
        line.contains(config::ALIBABA_CLOUD_ACCESS_KEY_SECRET),
        "{line}"
    );
    assert!(bad_secret.line("postgres").starts_with("ok "));
    // At the default log level the table is the whole answer: no log line above it repeats
    // what a check found ("account trouble").
    let quiet = crate::process::command(
        with(
            &settings,
            config::ALIBABA_CLOUD_ACCESS_KEY_SECRET,
            Some(wrong),
        )
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .env_remove("RUST_LOG")
    .arg("check-config")
    .output()
    .await
    .expect("run check-config");
    let said = String::from_utf8_lossy(&quiet.stderr);
    assert!(said.trim().is_empty(), "log lines beside the table: {said}");
    assert!(
        String::from_utf8_lossy(&quiet.stdout).contains("credentials rejected"),
        "the table still says it"
    );
    let bad_key = check_config(&with(
        &settings,
        config::ALIBABA_CLOUD_ACCESS_KEY_ID,
        Some("LTAI-unknown-key"),
    ))
    .await;
    let line = bad_key.line("aliyun");
    assert!(
        line.contains("credentials rejected") && line.contains(config::ALIBABA_CLOUD_ACCESS_KEY_ID),
        "{line}"
    );

    let no_db = format!("postgres://postgres@{}/nowhere", free_addr());
    let unreachable = check_config(&with(&settings, config::DATABASE_URL, Some(&no_db))).await;
    assert_ne!(unreachable.code, 0);
    let line = unreachable.line("postgres");
    assert!(
        line.starts_with("FAIL") && line.contains("cannot connect"),
        "{line}"
    );
    assert!(unreachable.line("rabbitmq").starts_with("ok "));

    let (empty_db, empty_url) = create_database().await;
    let unmigrated = check_config(&with(&settings, config::DATABASE_URL, Some(&empty_url))).await;
    drop_database(&empty_db).await;
    let line = unmigrated.line("postgres");
    assert!(
        line.starts_with("FAIL") && line.contains("no migrations applied"),
        "{line}"
    );

    let no_queue = check_config(&with(
        &settings,
        config::SMS_JOBS_QUEUE,
        Some("smsw-test-no-such-queue"),
    ))
    .await;
    let line = no_queue.line("rabbitmq");
    assert!(
        line.starts_with("FAIL") && line.contains("does not exist"),
        "{line}"
    );

    let no_fake = format!("http://{}", free_addr());
    let no_aliyun = check_config(&with(
        &settings,
        config::ALIYUN_DYSMSAPI_ENDPOINT,
        Some(&no_fake),
    ))
    .await;
    let line = no_aliyun.line("aliyun");
    assert!(
        line.starts_with("FAIL") && line.contains("could not reach"),
        "{line}"
    );

    let missing = check_config(&with(&settings, config::ALIBABA_CLOUD_ACCESS_KEY_ID, None)).await;
    assert_ne!(missing.code, 0);
    let line = missing.line("config");
    assert!(
        line.starts_with("FAIL") && line.contains(config::ALIBABA_CLOUD_ACCESS_KEY_ID),
        "{line}"
    );
    assert!(
        missing.line("aliyun").starts_with("skip"),
        "{}",
        missing.stdout
    );

    for run in [
        &good,
        &bad_secret,
        &bad_key,
        &unreachable,
        &unmigrated,
        &no_queue,
        &no_aliyun,
        &missing,
    ] {
        for secret in [TEST_SECRET, wrong, "guest:guest"] {
            assert!(
                !run.stdout.contains(secret) && !run.stderr.contains(secret),
                "a secret was printed:\n{}\n{}",
                run.stdout,
                run.stderr
            );
        }
    }
    app.shutdown().await;
}

/// A jobs queue declared earlier with other arguments (a classic queue, another delivery limit)
/// is one `run` can never consume from: RabbitMQ refuses its declare. check-config said `ok`,
/// and `run` retried for ever saying "RabbitMQ unavailable" while RabbitMQ was fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_queue_with_other_settings_fails_the_check_and_run_says_which() {
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{FieldTable, ShortString};
    use tokio::io::{AsyncBufReadExt, BufReader};

    let env = TestEnv::new(|_| {}).await;
    let settings = env.settings.clone();
    let queue = settings[config::SMS_JOBS_QUEUE].clone();
    let (connection, channel) = crate::helpers::test_link().await;
    channel
        .queue_declare(
            ShortString::from(queue.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("a classic jobs queue, declared before the worker");

    let run = check_config(&settings).await;
    assert_ne!(run.code, 0, "{}", run.stdout);
    let line = run.line("rabbitmq");
    assert!(line.starts_with("FAIL "), "{line}");
    assert!(
        line.contains("other settings") && line.contains("SMS_JOBS_QUEUE_TYPE"),
        "{line}"
    );

    let mut worker =
        crate::process::command(settings.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the worker");
    let stderr = worker.stderr.take().expect("stderr piped");
    let said = tokio::time::timeout(crate::helpers::PATIENCE, async {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("RabbitMQ unavailable") {
                return Err(line);
            }
            if line.contains("settings differ from this worker's") {
                return Ok(line);
            }
        }
        Err("the worker's log ended".to_owned())
    })
    .await
    .expect("the worker says why it does not consume");
    let line = said.unwrap_or_else(|line| panic!("blamed RabbitMQ: {line}"));
    assert!(line.contains("SMS_JOBS_QUEUE_TYPE"), "{line}");
    let _ = worker.kill().await;

    let _ = channel
        .queue_delete(
            ShortString::from(queue.as_str()),
            QueueDeleteOptions::default(),
        )
        .await;
    let _ = connection.close(200, ShortString::from("done")).await;
    env.remove().await;
}
