//! The binary as a newcomer runs it: `run --sandbox`, then `enqueue … --wait`, then SIGTERM.

use std::collections::HashMap;

use aliyun_sms_worker::config;

use crate::helpers::{
    PATIENCE, admin_database_url, amqp_url, create_database, drop_database, free_addr,
    queue_settings, remove_topology_and_close,
};
use crate::process::{WorkerProcess, command, run_to_end};

/// Runs `enqueue <args> --wait` and returns its result as JSON.
pub(crate) async fn enqueue(
    settings: &HashMap<String, String>,
    args: &[&str],
) -> serde_json::Value {
    let run = command(settings.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .arg("enqueue")
        .args(args)
        .arg("--wait")
        .output();
    let out = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("enqueue --wait returned in time")
        .expect("enqueue ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "enqueue printed no result ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_worker_answers_enqueued_jobs_and_stops_cleanly_on_sigterm() {
    let (db_name, db_url) = create_database().await;
    let prefix = format!(
        "smsw-test-cli-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let settings: HashMap<String, String> = [
        (config::AMQP_URL, amqp_url()),
        (config::DATABASE_URL, db_url),
    ]
    .into_iter()
    .chain(queue_settings(&prefix))
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    let worker = WorkerProcess::start(&["run", "--sandbox"], &settings).await;
    assert!(
        worker.log.iter().any(|l| l.contains("SANDBOX MODE")),
        "the sandbox says so loudly:\n{}",
        worker.log.join("\n")
    );

    let sent = enqueue(
        &settings,
        &[
            "send-verify-code",
            "--phone",
            "13800138000",
            "--return-verify-code",
            // Long enough not to turn up by chance among the log's timestamps and ports.
            "--code-length",
            "8",
        ],
    )
    .await;
    assert_eq!(sent["status"], "sent", "{sent}");
    assert!(sent["biz_id"].is_string());
    let code = sent["verify_code"]
        .as_str()
        .expect("code requested")
        .to_owned();

    let checked = enqueue(
        &settings,
        &[
            "check-verify-code",
            "--phone",
            "13800138000",
            "--code",
            &code,
        ],
    )
    .await;
    assert_eq!(checked["status"], "verified", "{checked}");

    let (status, log) = worker.terminate().await;
    assert!(status.success(), "worker exit status {status:?}");
    assert!(log.contains("worker stopped"), "{log}");
    assert!(
        !log.contains("13800138000"),
        "full phone number in the log:\n{log}"
    );
    assert!(
        log.contains("138****8000"),
        "masked phone in the job span:\n{log}"
    );
    let leaks: Vec<&str> = log.lines().filter(|l| l.contains(&code)).collect();
    assert!(
        leaks.is_empty(),
        "verification code {code} in the log:\n{leaks:#?}"
    );
    // Debug-printed payloads show bytes as decimal lists; look for the code that way too.
    let as_bytes = code
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(
        !log.contains(&format!("34, {as_bytes}, 34")),
        "verification code (as bytes) in the log:\n{log}"
    );
    drop_database(&db_name).await;
    if let Ok(connection) =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await
    {
        remove_topology_and_close(&connection, &settings).await;
    }
}

/// `enqueue --wait` with no worker to answer: the job is out, so the operator must be told its
/// id and not to enqueue it again under a new one (that is a second SMS), and a script must
/// tell "no answer yet" from "could not publish".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_with_no_worker_names_the_job_and_warns_against_a_new_id() {
    let mut app = crate::helpers::TestApp::spawn().await;
    app.stop_worker().await;
    let id = crate::helpers::unique_id("unanswered");
    let run = command(app.settings().iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args([
            "enqueue",
            "send-verify-code",
            "--phone",
            "13800138000",
            "--id",
            &id,
            "--wait",
            "--timeout-secs",
            "1",
        ])
        .output();
    let out = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("enqueue --wait returned in time")
        .expect("enqueue ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(&id), "{stderr}");
    assert!(
        stderr.contains("new id") && stderr.contains("jobs show"),
        "{stderr}"
    );
    assert!(!stderr.contains("13800138000"), "{stderr}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_missing_setting_is_named_at_start() {
    let amqp = amqp_url();
    let (code, _, stderr) = run_to_end(
        [(config::AMQP_URL, amqp.as_str())],
        &["run", "--no-migrate"],
    )
    .await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains(config::ALIBABA_CLOUD_ACCESS_KEY_ID),
        "the message names the variable: {stderr}"
    );
}

/// `migrate` needs the database only; and a `DATABASE_URL` that does not work says where and
/// why, once, without its password — not only that a pool timed out.
#[tokio::test]
async fn migrate_needs_only_the_database_and_a_wrong_one_says_where_and_why() {
    let (db_name, db_url) = create_database().await;
    let (code, stdout, stderr) =
        run_to_end([(config::DATABASE_URL, db_url.as_str())], &["migrate"]).await;
    assert_eq!(code, 0, "no Aliyun credentials needed: {stderr}");
    assert!(stdout.contains("migrations applied"), "{stdout}");
    drop_database(&db_name).await;

    let closed = free_addr();
    let missing = db_url.replace(&db_name, &format!("{db_name}_gone"));
    for (url, place, why) in [
        (
            format!("postgres://postgres:hunter2pw@{closed}/x"),
            format!("{closed}/x"),
            "refused",
        ),
        (missing, format!("{db_name}_gone"), "does not exist"),
    ] {
        for args in [
            &["migrate"][..],
            &["jobs", "list"],
            &["run", "--no-migrate"],
        ] {
            let mut envs = vec![(config::DATABASE_URL, url.as_str())];
            if args[0] == "run" {
                envs.extend([
                    (config::ALIBABA_CLOUD_ACCESS_KEY_ID, "id"),
                    (config::ALIBABA_CLOUD_ACCESS_KEY_SECRET, "secret"),
                ]);
            }
            let (code, _, stderr) = run_to_end(envs, args).await;
            let error = stderr
                .lines()
                .find(|l| l.starts_with("error:"))
                .unwrap_or_else(|| panic!("{args:?}: no error line: {stderr}"));
            assert_ne!(code, 0, "{args:?}");
            assert!(
                error.contains(&place) && error.contains(why) && error.contains("DATABASE_URL"),
                "{args:?} says where and why: {error}"
            );
            assert_eq!(
                error.matches(why).count(),
                1,
                "{args:?} says it once: {error}"
            );
            assert!(
                !stderr.contains("hunter2pw"),
                "{args:?}: the password: {stderr}"
            );
        }
    }
}

/// A RabbitMQ that answers but will not have us is a setting to fix, and says so: a wrong
/// password or vhost read "no RabbitMQ node answered", like an outage.
#[tokio::test]
async fn a_refused_rabbitmq_login_or_vhost_says_which_setting_to_fix() {
    let amqp = amqp_url();
    let (scheme, rest) = amqp.split_once("://").expect("a URL");
    let (login, place) = rest.split_once('@').expect("a user in AMQP_URL");
    let user = login.split(':').next().unwrap_or(login);
    let wrong_password = format!("{scheme}://{user}:hunter2pw@{place}");
    let (base, _) = amqp.rsplit_once('/').expect("a vhost in AMQP_URL");
    let wrong_vhost = format!("{base}/no-such-vhost-{}", std::process::id());
    for (url, hint) in [
        (wrong_password, "check the user and password in AMQP_URL"),
        (wrong_vhost, "refused the vhost"),
    ] {
        let (code, _, stderr) = run_to_end(
            [(config::AMQP_URL, url.as_str())],
            &["enqueue", "send-verify-code", "--phone", "13800138000"],
        )
        .await;
        assert_ne!(code, 0);
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line: {stderr}"));
        assert!(error.contains(hint), "{url}: {error}");
        assert!(!stderr.contains("hunter2pw"), "the password: {stderr}");
    }
}

/// Word `n` (from 0) of a line the bench printed, as a number.
fn word<T: std::str::FromStr>(line: &str, n: usize) -> T {
    line.split_whitespace()
        .nth(n)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number as word {n} of {line:?}"))
}

/// `bench` on a small backlog (1,100 jobs), one worker process, at 0 and then 50 ms upstream:
/// its own checks (a `sent` row and exactly one send at the fake for every job, a readable peak
/// RSS, the in-flight peak the worker reported) must pass, the figures it prints must be the
/// measured ones, and the two runs are compared side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_one_worker_against_the_ceiling_and_checks_every_job() {
    let (amqp, db) = (amqp_url(), admin_database_url());
    let run = run_to_end(
        [
            (config::AMQP_URL, amqp.as_str()),
            (config::DATABASE_URL, db.as_str()),
        ],
        // Past 1,000 jobs: the backlog is published in chunks of 1,000, and each job must
        // still get a number of its own.
        &["bench", "--jobs", "1100", "--concurrency", "32"],
    );
    let (code, stdout, stderr) = tokio::time::timeout(PATIENCE * 10, run)
        .await
        .expect("the bench finished in time");
    let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
    assert_eq!(code, 0, "{stdout}\n{}", tail.join("\n"));
    let line = |start: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} line:\n{stdout}"))
            .to_owned()
    };
    let rss = line("worker peak RSS:");
    let peak: u32 = rss
        .split("at most ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no in-flight peak in {rss:?}"));
    // A delivery's task ends a moment after its ack, when RabbitMQ may already have sent the
    // next one: the peak of tasks can pass the prefetch by a few, never by a whole window.
    assert!((1..=64).contains(&peak), "{rss}");
    let mib: f64 = word(&rss, 3);
    assert!(mib > 1.0, "a real RSS, not a default: {rss}");
    // Every job writes its rows: a claim, an outcome and an attempt are kilobytes of WAL.
    let wal = line("worker WAL per job:");
    let bytes: f64 = word(&wal, 4);
    assert!(bytes > 500.0, "{wal}");
    let checked = line("checked:");
    let rows: usize = word(&checked, 1);
    // Every job of every phase is checked: the backlog, half rate, and the fixed light rate.
    let jobs_in = |start: &str| -> usize {
        let l = line(start);
        l.split(" jobs)")
            .next()
            .and_then(|head| head.rsplit([' ', '(']).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no job count in {l:?}"))
    };
    let half = jobs_in("worker latency, enqueue -> result at half that rate");
    let light = jobs_in("worker latency, enqueue -> result at a fixed 200/s");
    assert!(half > 0 && light > 0, "{stdout}");
    assert_eq!(rows, 1100 + half + light, "{checked}\n{stdout}");
    // The ceiling is measured before the worker and after it, and the ratio is to their mean.
    let ceiling = line("ceiling (bare lapin");
    let numbers: Vec<f64> = ceiling
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter_map(|n| n.parse().ok())
        .collect();
    let [.., mean, before, after] = numbers[..] else {
        panic!("no mean, before and after in {ceiling:?}");
    };
    assert!(before > 0.0 && after > 0.0, "{ceiling}");
    assert!(
        (mean - (before + after) / 2.0).abs() <= 1.0,
        "the ceiling is the mean of before and after: {ceiling}"
    );
    // The jobs that make the half-rate p99, placed in time: at least the slowest one.
    let slowest = line("worker slowest at half rate: ");
    let slow: usize = word(&slowest, 5);
    assert!(
        (1..=half).contains(&slow) && slowest.contains(" into the phase, up to "),
        "{slowest}"
    );
    // What the half-rate phase cost: the worker's own process among the rest, and how busy
    // the cores were.
    let busy = line("worker at half rate CPU ms per job: worker ");
    assert!(busy.contains(" cores busy"), "{busy}");
    let added = line("latency added at 200/s: p99 ");
    assert!(
        (added.contains("(target <= 10 ms: met; ")
            || added.contains("(target <= 10 ms: NOT met; "))
            && added.contains("the ceiling's own p99 at this rate "),
        "{added}"
    );
    // Where the worker's commits went, per phase, read from its own counters: a backlog's
    // claims and outcomes are written, at least one job per commit.
    let commits = line("worker commits, mean per batch, backlog: ");
    for write in ["claim ", "outcome "] {
        let per_batch: f64 = commits
            .split(write)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {write:?} in {commits:?}"));
        assert!(per_batch >= 1.0, "{commits}");
    }
    for phase in ["paced", "fixed rate"] {
        line(&format!("worker commits, mean per batch, {phase}: claim "));
    }
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("checked:")).count(),
        2,
        "one run at 0 ms, one at 50 ms:\n{stdout}"
    );
    let hidden = line("latency hidden:");
    let rates: Vec<f64> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("worker throughput: "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(rates.len(), 2, "{stdout}");
    assert!(
        hidden.starts_with(&format!("latency hidden: {:.0} jobs/s at 50 ms", rates[1]))
            && hidden.contains(&format!("the {:.0} at 0 ms", rates[0]))
            && (hidden.ends_with(": met)") || hidden.ends_with(": NOT met)")),
        "the comparison uses the two measured rates: {hidden}"
    );
}

/// `bench --workers` on a small backlog: two worker processes on one queue and one database, at
/// 0 and 50 ms upstream. The bench fails (exit 1) unless its own check passes: one `sent` row
/// and one send at the fake per job, every result `sent`, claims by no more workers than ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_a_fleet_of_worker_processes_and_checks_every_job() {
    let (amqp, db) = (amqp_url(), admin_database_url());
    let run = run_to_end(
        [
            (config::AMQP_URL, amqp.as_str()),
            (config::DATABASE_URL, db.as_str()),
        ],
        &[
            "bench",
            "--jobs",
            "300",
            "--workers",
            "2",
            "--concurrency",
            "32",
        ],
    );
    let (code, stdout, stderr) = tokio::time::timeout(PATIENCE * 10, run)
        .await
        .expect("the bench finished in time");
    let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
    assert_eq!(code, 0, "{stdout}\n{}", tail.join("\n"));
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|cells: &Vec<&str>| cells.first() == Some(&"2"))
        .collect();
    assert_eq!(rows.len(), 2, "one row per latency:\n{stdout}");
    assert_eq!(rows[0][1..3], ["0", "ms"], "{stdout}");
    assert_eq!(rows[1][1..3], ["50", "ms"], "{stdout}");
    assert!(
        stdout.contains("checked in every run: 300 rows, all sent, one send per job at the fake"),
        "{stdout}"
    );
}
