//! The Python and Node examples of docs/backend.md, run as a backend developer would run them,
//! against a worker with the fake Aliyun. docs/backend.md shows these files verbatim (see
//! `readme.rs`).

use std::path::Path;
use std::process::Output;

use aliyun_sms_worker::config;
use serde_json::Value;

use crate::helpers::{PATIENCE, TestApp, amqp_url, unique_phone};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

async fn run_example(app: &TestApp, program: &str, script: &str, phone: &str) -> Output {
    let run = tokio::process::Command::new(program)
        .arg(script)
        .arg(phone)
        .current_dir(Path::new(ROOT).join(Path::new(script).parent().unwrap_or(Path::new("."))))
        .env(config::AMQP_URL, amqp_url())
        .env(config::SMS_JOBS_QUEUE, &app.config.queues.jobs)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(PATIENCE, run)
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish in time"))
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (is it installed? scripts/test installs it): {e}")
        })
}

async fn assert_sent(app: &TestApp, out: &Output, phone: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let result: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the example printed no result ({e}): {stdout}\n{stderr}"));
    assert_eq!(result["status"], "sent", "{result}");
    assert_eq!(result["type"], "send_verify_code");
    let id = result["id"].as_str().expect("result id");
    let row = app.job_row(id).await;
    assert_eq!(row["status"], "sent", "{row}");
    assert_eq!(row["phone_number"], phone);
    assert_eq!(app.fake.sends_for(id), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_sends_a_code_and_prints_the_result() {
    let app = TestApp::spawn().await;
    let phone = unique_phone();
    let script = format!("{ROOT}/examples/python/send_code.py");
    let out = run_example(&app, "python3", &script, &phone).await;
    assert_sent(&app, &out, &phone).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_example_sends_a_code_and_prints_the_result() {
    let app = TestApp::spawn().await;
    let phone = unique_phone();
    let script = format!("{ROOT}/examples/node/send_code.js");
    let out = run_example(&app, "node", &script, &phone).await;
    assert_sent(&app, &out, &phone).await;
    app.shutdown().await;
}
