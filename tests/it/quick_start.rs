//! The README's quick start, run as written: its commands are read from the README itself, so
//! a quick start that stops working, or drifts from the binary, fails here.

use std::collections::HashMap;
use std::time::Duration;

use aliyun_sms_worker::config;
use serde_json::Value;

use crate::helpers::{
    PATIENCE, amqp_url, create_database, drop_database, queue_settings, remove_topology_and_close,
};
use crate::process::{WorkerProcess, command};
use crate::readme::{doc, section};

/// How the quick start runs the binary from a clone.
const CARGO_PREFIX: &str = "cargo run --release -- ";

/// The commands (one per line) and the outputs shown in a part of the README.
struct Shown {
    commands: Vec<String>,
    outputs: Vec<Value>,
}

fn shown(text: &str) -> Shown {
    let mut commands = Vec::new();
    let mut outputs = Vec::new();
    for block in text.split("```").skip(1).step_by(2) {
        if let Some(body) = block.strip_prefix("sh\n") {
            commands.extend(body.lines().map(|l| l.trim().to_owned()));
        } else if let Some(body) = block.strip_prefix("json\n") {
            outputs.push(
                serde_json::from_str(body).unwrap_or_else(|e| {
                    panic!("README shows output that is not JSON ({e}):\n{body}")
                }),
            );
        }
    }
    Shown { commands, outputs }
}

/// The arguments of a quick-start command, which must be plain words (no quoting to undo).
fn args_of<'a>(command: &'a str, prefix: &str) -> Vec<&'a str> {
    let rest = command
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("quick-start command does not start with {prefix:?}: {command}"));
    assert!(
        !rest.contains(['\'', '"', '\\', '$']),
        "quick-start command needs a shell to read: {command}"
    );
    rest.split_whitespace().collect()
}

/// Runs `aliyun-sms-worker <args>` to its end: exit code and the result it printed.
async fn run(settings: &HashMap<String, String>, args: &[&str]) -> (i32, Value) {
    let out = command(settings.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args(args)
        .output();
    let out = tokio::time::timeout(PATIENCE + Duration::from_secs(5), out)
        .await
        .unwrap_or_else(|_| panic!("`{}` returned in time", args.join(" ")))
        .expect("run the binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "`{}` printed no result ({e}): {stdout}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_runs_as_written() {
    let readme = doc("README.md");
    let local = shown(&section(
        &readme,
        "### Local (RabbitMQ and Postgres, no Aliyun account)",
    ));
    let [start, send, check] = local.commands.as_slice() else {
        panic!(
            "the local quick start shows three commands (run, send, check): {:?}",
            local.commands
        );
    };
    let [shown_sent, shown_checked] = local.outputs.as_slice() else {
        panic!("the local quick start shows the send's and the check's output");
    };
    let start = args_of(start, CARGO_PREFIX);
    let send = args_of(send, CARGO_PREFIX);
    let mut check = args_of(check, CARGO_PREFIX);
    assert_eq!(start, ["run", "--sandbox"]);
    assert!(
        send.starts_with(&["enqueue", "send-verify-code"])
            && send.contains(&"--return-verify-code"),
        "the send step asks for the code back: {send:?}"
    );
    assert!(
        check.starts_with(&["enqueue", "check-verify-code"]),
        "the second step checks a code: {check:?}"
    );

    // The check step uses the code the send step's output shows, not a placeholder.
    let code_at = check
        .iter()
        .position(|a| *a == "--code")
        .map(|i| i + 1)
        .filter(|&i| i < check.len())
        .expect("the check step passes --code");
    assert_eq!(shown_sent["status"], "sent", "{shown_sent}");
    assert_eq!(
        shown_sent["verify_code"].as_str(),
        Some(check[code_at]),
        "the check step's --code is the verify_code the send step shows"
    );
    assert_eq!(shown_checked["status"], "verified", "{shown_checked}");

    // The Docker quick start sends the same job from inside the worker's container.
    let docker = shown(&section(
        &readme,
        "### With Docker (nothing else installed)",
    ));
    let exec = docker
        .commands
        .iter()
        .find(|c| c.starts_with("docker compose exec "))
        .expect("the Docker quick start shows how to send a job");
    assert_eq!(
        args_of(exec, "docker compose exec worker aliyun-sms-worker "),
        send,
        "the Docker quick start sends the job the local one does"
    );
    crate::compose::service(&crate::compose::compose(), "worker");

    let (db_name, db_url) = create_database().await;
    let prefix = format!(
        "smsw-test-quick-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let settings: HashMap<String, String> = [
        (config::AMQP_URL, amqp_url()),
        (config::DATABASE_URL, db_url),
        // Off: parallel tests would fight over the default port.
        (config::ADMIN_ADDR, String::new()),
    ]
    .into_iter()
    .chain(queue_settings(&prefix))
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    let worker = WorkerProcess::start(&start, &settings).await;

    let (exit, sent) = run(&settings, &send).await;
    assert_eq!(sent["status"], "sent", "{sent}");
    assert_eq!(exit, 0, "enqueue exits 0 for sent");
    let code = sent["verify_code"]
        .as_str()
        .expect("the sandbox returns the code it generated")
        .to_owned();
    check[code_at] = &code;
    let (exit, checked) = run(&settings, &check).await;
    assert_eq!(checked["status"], "verified", "{checked}");
    assert_eq!(exit, 0, "enqueue exits 0 for verified");

    let (status, log) = worker.terminate().await;
    assert!(status.success(), "worker exit status {status:?}:\n{log}");
    drop_database(&db_name).await;
    if let Ok(connection) =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await
    {
        remove_topology_and_close(&connection, &settings).await;
    }
}
