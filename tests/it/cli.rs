//! The binary as a newcomer runs it: `run --sandbox`, then `enqueue … --wait`, then SIGTERM.

use std::process::Stdio;

use aliyun_sms_worker::config;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::helpers::{PATIENCE, amqp_url, create_database, drop_database};

const BIN: &str = env!("CARGO_BIN_EXE_aliyun-sms-worker");

fn command(envs: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // The most verbose setting an operator is likely to use.
        .env("RUST_LOG", "debug")
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Reads log lines into `log` until one contains `needle`; false on timeout or end of output.
async fn wait_for(
    needle: &str,
    log: &mut Vec<String>,
    lines: &mut mpsc::UnboundedReceiver<String>,
) -> bool {
    let scan = async {
        while let Some(line) = lines.recv().await {
            let found = line.contains(needle);
            log.push(line);
            if found {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(PATIENCE, scan).await.unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_worker_answers_an_enqueued_job_and_stops_cleanly_on_sigterm() {
    let (db_name, db_url) = create_database().await;
    let prefix = format!(
        "smsw-test-cli-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let envs = vec![
        (config::AMQP_URL, amqp_url()),
        (config::DATABASE_URL, db_url),
        (config::SMS_JOBS_QUEUE, format!("{prefix}.jobs")),
        (config::SMS_RESULTS_QUEUE, format!("{prefix}.results")),
        (config::SMS_DEAD_LETTER_QUEUE, format!("{prefix}.dead")),
        (config::SMS_DEAD_LETTER_EXCHANGE, format!("{prefix}.dlx")),
    ];

    let mut worker = command(&envs)
        .args(["run", "--sandbox"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker binary");
    let stderr = worker.stderr.take().expect("stderr piped");
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    assert!(
        wait_for("consuming jobs", &mut log, &mut lines).await,
        "worker never started consuming:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("SANDBOX MODE")),
        "the sandbox says so loudly:\n{}",
        log.join("\n")
    );

    let enqueue = command(&envs)
        .args([
            "enqueue",
            "send-verify-code",
            "--phone",
            "13800138000",
            "--wait",
            "--return-verify-code",
        ])
        .output();
    let out = tokio::time::timeout(PATIENCE, enqueue)
        .await
        .expect("enqueue --wait returned in time")
        .expect("enqueue ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "enqueue failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(&stdout).expect("the result as JSON");
    assert_eq!(result["status"], "sent", "{result}");
    assert!(result["biz_id"].is_string());
    let code = result["verify_code"]
        .as_str()
        .expect("code requested")
        .to_owned();

    let check = command(&envs)
        .args([
            "enqueue",
            "check-verify-code",
            "--phone",
            "13800138000",
            "--code",
            &code,
            "--wait",
        ])
        .output();
    let out = tokio::time::timeout(PATIENCE, check)
        .await
        .expect("check returned in time")
        .expect("check ran");
    let checked: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the check result as JSON");
    assert_eq!(checked["status"], "verified", "{checked}");
    assert!(out.status.success());

    let pid = worker.id().expect("worker pid");
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(kill.success());
    let status = tokio::time::timeout(PATIENCE, worker.wait())
        .await
        .expect("worker exits within the grace period")
        .expect("wait for worker");
    assert!(status.success(), "worker exit status {status:?}");
    // Read to the end of its stderr: the sender closes when the process's stderr does.
    let rest = async {
        while let Some(line) = lines.recv().await {
            log.push(line);
        }
    };
    tokio::time::timeout(PATIENCE, rest)
        .await
        .expect("worker stderr closed");
    let whole = log.join("\n");
    assert!(whole.contains("worker stopped"), "{whole}");
    assert!(
        !whole.contains("13800138000"),
        "full phone number in the log:\n{whole}"
    );
    assert!(
        whole.contains("138****8000"),
        "masked phone in the job span:\n{whole}"
    );
    assert!(
        !whole.contains(&code),
        "verification code in the log:\n{whole}"
    );
    // Debug-printed payloads show bytes as decimal lists; look for the code that way too.
    let as_bytes = code
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(
        !whole.contains(&format!("34, {as_bytes}, 34")),
        "verification code (as bytes) in the log:\n{whole}"
    );
    drop_database(&db_name).await;
}

#[tokio::test]
async fn a_missing_setting_is_named_at_start() {
    let out = command(&[(config::AMQP_URL, amqp_url())])
        .args(["run", "--no-migrate"])
        .output()
        .await
        .expect("run the binary");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(config::ALIBABA_CLOUD_ACCESS_KEY_ID),
        "the message names the variable: {stderr}"
    );
}
