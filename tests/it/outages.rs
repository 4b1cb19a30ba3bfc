//! The broker and the database disappear under load; the worker rides it out by itself.

use std::collections::HashSet;
use std::time::Duration;

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use aliyun_sms_worker::wire::Status;
use serde_json::Value;

use crate::helpers::{PATIENCE, TestApp, TestEnv, admin_get, free_addr, send_job, unique_id};
use crate::proxy::{Proxy, target_of, through};

fn jobs(n: usize, label: &str) -> (Vec<Value>, HashSet<String>) {
    let jobs: Vec<Value> = (0..n)
        .map(|i| send_job(&unique_id(&format!("{label}{i}"))))
        .collect();
    let ids = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    (jobs, ids)
}

/// Reads results until every id has one; every one must be `sent`.
async fn all_sent(app: &TestApp, ids: &HashSet<String>) -> usize {
    let mut answered = HashSet::new();
    let mut results = 0;
    while answered.len() < ids.len() {
        let (result, _) = app.next_result().await;
        results += 1;
        let id = result.id.clone().expect("id");
        assert!(
            ids.contains(&id),
            "result for a job nobody sent: {result:?}"
        );
        assert_eq!(result.status, Status::Sent, "{result:?}");
        answered.insert(id);
    }
    for id in ids {
        assert_eq!(app.fake.sends_for(id), 1, "{id} sent exactly once");
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_database_outage_costs_no_job_and_no_unrecorded_call() {
    let admin = free_addr();
    let mut env = TestEnv::new(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin.clone());
    })
    .await;
    let db = Proxy::start(target_of(&env.db_url)).await;
    env.settings
        .insert(config::DATABASE_URL.into(), through(&env.db_url, &db));
    env.fake.push_fault(FaultRule {
        action: None,
        phone: None,
        fault: Fault::Latency { ms: 20 },
        times: None,
    });
    let app = TestApp::start(env).await;
    let (jobs, ids) = jobs(300, "db");
    for job in &jobs {
        app.publish(job).await;
    }
    tokio::time::timeout(PATIENCE, app.fake.wait_for(|r| r.len() >= 50))
        .await
        .expect("the worker is busy");

    assert_eq!(admin_get(&admin, "/readyz").await.0, 200);
    db.cut();
    // Calls already under way when the database went may still land; none may start after.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls_at_cut = app.fake.requests().len();
    let (status, why) = admin_get(&admin, "/readyz").await;
    assert_eq!((status, why.trim()), (503, "database unreachable"));
    assert_eq!(
        admin_get(&admin, "/healthz").await.0,
        200,
        "alive all the same"
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        app.fake.requests().len(),
        calls_at_cut,
        "no Aliyun call while no `sending` row can be committed"
    );
    db.restore();

    all_sent(&app, &ids).await;
    assert_eq!(
        admin_get(&admin, "/readyz").await.0,
        200,
        "ready again by itself"
    );
    let (_, metrics) = admin_get(&admin, "/metrics").await;
    assert!(
        metrics.contains("sms_jobs_total{type=\"send_verify_code\",status=\"sent\"}"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("sms_aliyun_calls_total{action=\"SendSmsVerifyCode\",outcome=\"success\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("sms_worker_ready 1"), "{metrics}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_ridden_out_with_every_job_answered_and_none_resent() {
    let mut env = TestEnv::new(|_| {}).await;
    let amqp = env.settings[config::AMQP_URL].clone();
    let broker = Proxy::start(target_of(&amqp)).await;
    env.settings
        .insert(config::AMQP_URL.into(), through(&amqp, &broker));
    env.fake.push_fault(FaultRule {
        action: None,
        phone: None,
        fault: Fault::Latency { ms: 20 },
        times: None,
    });
    let app = TestApp::start(env).await;
    let (jobs, ids) = jobs(300, "amqp");
    for job in &jobs {
        app.publish(job).await;
    }
    tokio::time::timeout(PATIENCE, app.fake.wait_for(|r| r.len() >= 50))
        .await
        .expect("the worker is busy");
    broker.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restore();

    let results = all_sent(&app, &ids).await;
    assert!(results >= ids.len());
    app.shutdown().await;
}
