//! `aliyun-sms-worker jobs list | head`: the commands that print end quietly when their reader
//! has gone, as Unix tools do, instead of panicking on EPIPE.

use std::process::Stdio;

use aliyun_sms_worker::config;

use crate::helpers::{PATIENCE, TestApp, amqp_url, unique_phone};
use crate::process::command;

/// Runs the binary with its stdout either read to the end or a pipe whose reader is already
/// closed, so that the first write meets EPIPE; returns exit code, stdout and stderr.
async fn run(envs: &[(&str, &str)], args: &[&str], reader_closed: bool) -> (i32, String, String) {
    let mut cmd = command(envs.iter().copied());
    cmd.args(args).stderr(Stdio::piped());
    if reader_closed {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        cmd.stdout(writer);
    } else {
        cmd.stdout(Stdio::piped());
    }
    let child = cmd.spawn().expect("run the binary");
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not finish in time"))
        .expect("wait for the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_print_exit_quietly_when_their_reader_has_gone() {
    let app = TestApp::spawn().await;
    let amqp = amqp_url();
    let db = app.config.database_url.expose().to_owned();
    let queues = &app.config.queues;
    let envs = [
        (config::AMQP_URL, amqp.as_str()),
        (config::DATABASE_URL, db.as_str()),
        (config::SMS_JOBS_QUEUE, queues.jobs.as_str()),
        (config::SMS_RESULTS_QUEUE, queues.results.as_str()),
        (config::SMS_DEAD_LETTER_QUEUE, queues.dead_letter.as_str()),
    ];
    let phone = unique_phone();
    let commands: [&[&str]; 5] = [
        &["enqueue", "send-verify-code", "--phone", &phone],
        &["jobs", "list"],
        &["stats"],
        &["stats", "--json"],
        &["dead-letters", "list"],
    ];
    for args in commands {
        // Read, it prints: so closed, its first write meets the closed pipe.
        let (code, stdout, stderr) = run(&envs, args, false).await;
        assert_eq!(code, 0, "{args:?}: {stdout}\n{stderr}");
        assert!(!stdout.is_empty(), "{args:?} printed nothing:\n{stderr}");

        let (code, _, stderr) = run(&envs, args, true).await;
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?} on a closed pipe:\n{stderr}"
        );
        assert_eq!(code, 0, "{args:?} on a closed pipe:\n{stderr}");
    }
    app.shutdown().await;
}
