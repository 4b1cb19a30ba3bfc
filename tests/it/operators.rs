//! The operator commands against a database a real worker filled.

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use serde_json::Value;

use crate::helpers::{TestApp, send_job, unique_id};
use crate::process::run_to_end;

async fn cli(app: &TestApp, args: &[&str]) -> (i32, String) {
    let db = app.config.database_url.expose().to_owned();
    let (code, stdout, _) = run_to_end([(config::DATABASE_URL, db.as_str())], args).await;
    (code, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_show_and_stats_answer_operators_questions() {
    let app = TestApp::spawn().await;
    let sent = unique_id("ops-sent");
    let retried = unique_id("ops-retried");
    let refused = unique_id("ops-refused");
    let retried_job = send_job(&retried);
    let refused_job = send_job(&refused);
    let fault = |job: &Value, fault| {
        FaultRule::every(fault)
            .on_phone(job["phone_number"].as_str().unwrap_or_default())
            .times(1)
    };
    app.fake.push_fault(fault(&retried_job, Fault::Http503));
    app.fake.push_fault(fault(
        &refused_job,
        Fault::error("isv.SMS_SIGNATURE_ILLEGAL", "签名不合法"),
    ));
    let sent_job = send_job(&sent);
    for job in [&sent_job, &retried_job, &refused_job] {
        app.publish(job).await;
    }
    app.results(3).await;

    let (code, out) = cli(&app, &["jobs", "list", "--status", "sent", "--json"]).await;
    assert_eq!(code, 0);
    let listed: Vec<Value> = serde_json::from_str(&out).expect("JSON list");
    let ids: Vec<&str> = listed.iter().filter_map(|j| j["id"].as_str()).collect();
    assert!(
        ids.contains(&sent.as_str()) && ids.contains(&retried.as_str()),
        "{out}"
    );
    assert!(
        !ids.contains(&refused.as_str()),
        "filtered by status: {out}"
    );

    let phone = sent_job["phone_number"].as_str().unwrap();
    let (_, by_phone) = cli(&app, &["jobs", "list", "--phone", phone, "--since", "1h"]).await;
    assert!(by_phone.contains(&sent), "{by_phone}");
    assert!(
        !by_phone.contains(phone),
        "the table masks numbers: {by_phone}"
    );

    let (code, shown) = cli(&app, &["jobs", "show", &retried, "--json"]).await;
    assert_eq!(code, 0);
    let detail: Value = serde_json::from_str(&shown).expect("JSON detail");
    assert_eq!(detail["job"]["status"], "sent");
    let attempts = detail["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["http_status"], 503);
    assert!(attempts[0]["duration_ms"].is_number());
    let (_, table) = cli(&app, &["jobs", "show", &retried]).await;
    assert!(table.contains("ServiceUnavailable"), "{table}");

    let (code, _) = cli(&app, &["jobs", "show", "no-such-job"]).await;
    assert_eq!(code, 2);

    let (_, stats) = cli(&app, &["stats", "--since", "1h", "--json"]).await;
    let stats: Value = serde_json::from_str(&stats).expect("JSON stats");
    assert_eq!(stats["total"], 3);
    let top = &stats["top_codes"][0];
    assert_eq!(top["code"], "isv.SMS_SIGNATURE_ILLEGAL");
    assert_eq!(top["meaning"], "signature (sign name) not approved");
    let (_, text) = cli(&app, &["stats"]).await;
    assert!(text.contains("33.3%"), "{text}");
    app.shutdown().await;
}
