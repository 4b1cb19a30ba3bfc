//! The alert rules (deploy/alerts.yml): valid and unit-tested by promtool, loaded by the
//! compose Prometheus, built on metrics the worker really exports; and the account alarm they
//! start from, raised and cleared by a real worker.

use std::path::{Path, PathBuf};
use std::process::Command;

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use aliyun_sms_worker::metrics::FAMILIES;
use aliyun_sms_worker::wire::Status;
use serde_yaml_ng::Value;

use crate::compose::{compose, host_file, metric_names, prometheus_config, yaml_file};
use crate::helpers::{TestApp, admin_get, free_addr, send_job, unique_id};
use crate::prometheus_text;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

/// Runs promtool; a missing promtool fails with what to install rather than a bare ENOENT.
fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install it (Debian: `apt-get install \
                 --no-install-recommends prometheus`; .ci/run does)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    text
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "deploy/alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "deploy/alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

fn rules() -> Vec<Value> {
    yaml_file(&deploy("alerts.yml"))
        .get("groups")
        .and_then(Value::as_sequence)
        .expect("alerts.yml has groups")
        .iter()
        .flat_map(|g| {
            g.get("rules")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

fn field<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(v, |v, key| v.get(*key))
        .and_then(Value::as_str)
}

#[test]
fn every_rule_queries_metrics_the_worker_exports() {
    let rules = rules();
    assert!(rules.len() >= 6, "{rules:?}");
    let mut used = std::collections::BTreeSet::new();
    for rule in &rules {
        let name = field(rule, &["alert"]).expect("every rule is an alert");
        let expr = field(rule, &["expr"]).expect("every rule has an expr");
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{name} uses no sms_* metric: {expr}");
        for metric in names {
            assert!(
                FAMILIES.contains(&metric.as_str()),
                "{name} queries `{metric}`, which the worker does not export (metrics::FAMILIES, \
                 checked against a live scrape by tests/it/metrics.rs)"
            );
            used.insert(metric);
        }
    }
    for wanted in [
        "sms_worker_aliyun_account_error",
        "sms_jobs_total",
        "sms_fleet_dead_letters",
        "sms_worker_ready",
        "sms_fleet_oldest_sending_seconds",
        "sms_fleet_receipts_overdue_seconds",
    ] {
        assert!(used.contains(wanted), "no alert rule uses {wanted}");
    }
}

#[test]
fn every_alert_has_a_severity_a_pointer_to_its_doc_and_unit_tests_both_ways() {
    let tests_text =
        std::fs::read_to_string(deploy("alerts.test.yml")).expect("deploy/alerts.test.yml");
    let tests = yaml_file(&deploy("alerts.test.yml"));
    let cases: Vec<&Value> = tests
        .get("tests")
        .and_then(Value::as_sequence)
        .expect("alerts.test.yml has tests")
        .iter()
        .flat_map(|t| {
            t.get("alert_rule_test")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
        })
        .collect();
    let alert_rules =
        crate::readme::section(&crate::readme::doc("docs/operations.md"), "## Alert rules");
    for rule in rules() {
        let name = field(&rule, &["alert"]).expect("alert name");
        assert!(
            matches!(
                field(&rule, &["labels", "severity"]),
                Some("critical" | "warning")
            ),
            "{name} has no severity critical|warning"
        );
        assert!(
            field(&rule, &["annotations", "summary"]).is_some(),
            "{name} has no summary"
        );
        let description = field(&rule, &["annotations", "description"]).unwrap_or_default();
        assert!(
            description.contains("docs/operations.md, \"Alert rules\""),
            "{name}'s description does not point to docs/operations.md: {description}"
        );
        assert!(
            alert_rules.contains(&format!("`{name}`")),
            "docs/operations.md's \"Alert rules\" does not explain {name}"
        );
        let of_this: Vec<&&Value> = cases
            .iter()
            .filter(|c| field(c, &["alertname"]) == Some(name))
            .collect();
        let fires = of_this.iter().any(|c| {
            c.get("exp_alerts")
                .and_then(Value::as_sequence)
                .is_some_and(|a| !a.is_empty())
        });
        let quiet = of_this.iter().any(|c| {
            c.get("exp_alerts")
                .and_then(Value::as_sequence)
                .is_some_and(|a| a.is_empty())
        });
        assert!(
            fires && quiet,
            "alerts.test.yml must test {name} firing and not firing"
        );
    }
    assert!(
        tests_text.contains("- alerts.yml"),
        "the tests load alerts.yml"
    );
}

#[test]
fn the_compose_prometheus_loads_the_rules() {
    let doc = compose();
    let config = prometheus_config(&doc);
    let files: Vec<&str> = config
        .get("rule_files")
        .and_then(Value::as_sequence)
        .expect("prometheus.yml has rule_files")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let loaded = files.iter().map(|f| host_file(&doc, "prometheus", f));
    let wanted = deploy("alerts.yml").canonicalize().expect("alerts.yml");
    assert!(
        loaded
            .filter_map(|p| p.canonicalize().ok())
            .any(|p| p == wanted),
        "the compose Prometheus does not load deploy/alerts.yml (rule_files {files:?})"
    );
}

/// The account alarm, end to end: an account-level answer fails its job at once, raises the
/// gauge, and names itself on /readyz (still 200) and the status page; the next accepted call
/// of the same action clears all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_error_raises_the_gauge_and_the_readiness_detail_until_a_call_succeeds() {
    let admin = free_addr();
    let admin_setting = admin.clone();
    let app = TestApp::spawn_with(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin_setting);
    })
    .await;
    let labels = [
        ("product", "dypnsapi"),
        ("action", "SendSmsVerifyCode"),
        ("code", "isv.AMOUNT_NOT_ENOUGH"),
    ];

    let (_, readyz) = admin_get(&admin, "/readyz").await;
    assert_eq!(readyz, "ready\n");

    let broke = send_job(&unique_id("acct-broke"));
    app.fake.push_fault(
        FaultRule::every(Fault::error("isv.AMOUNT_NOT_ENOUGH", "账户余额不足"))
            .on_action("SendSmsVerifyCode")
            .times(1),
    );
    app.publish(&broke).await;
    let (result, _) = app.next_result().await;
    assert_eq!(result.status, Status::Failed, "{result:?}");
    assert_eq!(result.attempts, 1, "an account error is not retried");

    let (_, text) = admin_get(&admin, "/metrics").await;
    let exp = prometheus_text::parse(&text);
    assert_eq!(
        exp.value("sms_worker_aliyun_account_error", &labels),
        Some(1.0),
        "{text}"
    );
    assert_eq!(exp.value("sms_worker_ready", &[]), Some(1.0), "{text}");
    let (status, readyz) = admin_get(&admin, "/readyz").await;
    assert_eq!(
        status, 200,
        "an account error does not make the worker unready"
    );
    assert!(
        readyz.starts_with(
            "ready; degraded: Aliyun account error isv.AMOUNT_NOT_ENOUGH on dypnsapi \
             SendSmsVerifyCode since "
        ) && readyz.contains("(account balance too low)"),
        "{readyz}"
    );
    let (_, page) = admin_get(&admin, "/").await;
    assert!(
        page.contains("id=\"account-error\"") && page.contains("isv.AMOUNT_NOT_ENOUGH"),
        "the status page shows the account error: {page}"
    );

    let fine = send_job(&unique_id("acct-fine"));
    app.publish(&fine).await;
    let (result, _) = app.next_result().await;
    assert_eq!(result.status, Status::Sent, "{result:?}");
    let (_, text) = admin_get(&admin, "/metrics").await;
    assert_eq!(
        prometheus_text::parse(&text).value("sms_worker_aliyun_account_error", &labels),
        None,
        "an accepted call clears the gauge: {text}"
    );
    let (_, readyz) = admin_get(&admin, "/readyz").await;
    assert_eq!(readyz, "ready\n");
    let (_, page) = admin_get(&admin, "/").await;
    assert!(!page.contains("id=\"account-error\""), "{page}");
    app.shutdown().await;
}

/// What only an operator can fix raises the same alarm as an empty balance: an expired
/// timestamp twice in a row (this machine's clock; one re-signed retry, then `failed`), the
/// account's own daily cap (the job is `rate_limited`, but every send will be), and an endpoint
/// that serves the other product (`failed`: the backend's request was fine, so not `rejected`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_clock_the_accounts_cap_or_a_wrong_endpoint_raises_the_account_alarm() {
    let admin = free_addr();
    let admin_setting = admin.clone();
    let app = TestApp::spawn_with(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin_setting);
    })
    .await;
    let refused = |code: &str, http_status: u16, action: &str| {
        FaultRule::every(Fault::error_with_status(code, "from the fake", http_status))
            .on_action(action)
    };

    let skewed = send_job(&unique_id("clock"));
    let skewed_id = skewed["id"].as_str().unwrap_or_default().to_owned();
    app.fake
        .push_fault(refused("InvalidTimeStamp.Expired", 400, "SendSmsVerifyCode").times(5));
    app.publish(&skewed).await;
    let (result, _) = app.next_result().await;
    assert_eq!(result.status, Status::Failed, "{result:?}");
    assert_eq!(
        result.attempts, 2,
        "one re-signed retry, not five: {result:?}"
    );
    assert!(result.message.contains("clock"), "{result:?}");
    assert_eq!(app.fake.calls_for(&skewed_id), 2);
    app.fake.clear_faults();

    let capped = crate::dysmsapi::sms_job(&unique_id("cap"), &[crate::helpers::unique_phone()]);
    app.fake
        .push_fault(refused("isv.DAY_LIMIT_CONTROL", 200, "SendSms").times(1));
    app.publish(&capped).await;
    let (result, _) = app.next_result().await;
    assert_eq!(result.status, Status::RateLimited, "{result:?}");

    let misrouted = send_job(&unique_id("endpoint"));
    app.fake
        .push_fault(refused("InvalidApi.NotFound", 404, "SendSmsVerifyCode").times(1));
    app.publish(&misrouted).await;
    let (result, _) = app.next_result().await;
    assert_eq!(result.status, Status::Failed, "{result:?}");

    let (_, text) = admin_get(&admin, "/metrics").await;
    let exp = prometheus_text::parse(&text);
    for (product, action, code) in [
        ("dypnsapi", "SendSmsVerifyCode", "InvalidApi.NotFound"),
        ("dysmsapi", "SendSms", "isv.DAY_LIMIT_CONTROL"),
    ] {
        let labels = [("product", product), ("action", action), ("code", code)];
        assert_eq!(
            exp.value("sms_worker_aliyun_account_error", &labels),
            Some(1.0),
            "{code}: {text}"
        );
    }
    let (_, readyz) = admin_get(&admin, "/readyz").await;
    assert!(readyz.contains("isv.DAY_LIMIT_CONTROL"), "{readyz}");
    assert!(readyz.contains("sending cap"), "{readyz}");
    app.shutdown().await;
}

/// The leader measures what the fleet left behind: a `sending` claim an hour old (its owner
/// alive, its lease running, so no sweep ends it) shows in `sms_fleet_oldest_sending_seconds`,
/// and the dead-letter queue's depth is there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_exposes_the_fleet_gauges_the_rules_need() {
    let admin = free_addr();
    let admin_setting = admin.clone();
    let app = TestApp::spawn_with(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin_setting);
        s.insert(config::SWEEP_INTERVAL_MS.into(), "100".into());
    })
    .await;
    let (worker,): (uuid::Uuid,) = sqlx::query_as("SELECT id FROM sms_workers")
        .fetch_one(&app.pool)
        .await
        .expect("the worker's row");
    sqlx::query(
        "INSERT INTO sms_jobs (id, type, status, claimed_by, lease_until, called_at,
                               created_at, updated_at)
         VALUES ($1, 'send_verify_code', 'sending', $2, now() + interval '1 hour', now(),
                 now() - interval '1 hour', now() - interval '1 hour')",
    )
    .bind(unique_id("stuck"))
    .bind(worker)
    .execute(&app.pool)
    .await
    .expect("insert a stuck claim");

    // Each scrape is a fresh look; the leader measures every sweep (100 ms here).
    let deadline = tokio::time::Instant::now() + crate::helpers::PATIENCE;
    let exp = loop {
        let (_, text) = admin_get(&admin, "/metrics").await;
        let exp = prometheus_text::parse(&text);
        let oldest = exp.value("sms_fleet_oldest_sending_seconds", &[]);
        if oldest.is_some_and(|s| s >= 3600.0) {
            break exp;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never measured the hour-old claim: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(exp.value("sms_worker_fleet_leader", &[]), Some(1.0));
    // The harness consumes the dead-letter queue as letters arrive: empty, but measured.
    assert_eq!(exp.value("sms_fleet_dead_letters", &[]), Some(0.0));
    assert_eq!(
        exp.value("sms_fleet_receipts_overdue_seconds", &[]),
        Some(0.0)
    );
    app.shutdown().await;
}
