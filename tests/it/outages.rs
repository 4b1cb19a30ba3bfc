//! The broker and the database disappear under load; the worker rides it out by itself.

use std::collections::HashSet;
use std::time::Duration;

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use aliyun_sms_worker::wire::Status;

use crate::helpers::{PATIENCE, TestApp, TestEnv, admin_get, free_addr, send_job, unique_id};
use crate::proxy::{Proxy, target_of, through};

/// Starts a worker whose link to `setting` (AMQP_URL or DATABASE_URL) goes through a proxy,
/// gives it 300 jobs at 100 ms each, 16 at a time (about two seconds of work, so it is still
/// busy when the link is cut), and returns once it is busy with them.
async fn busy_worker_behind_proxy(
    mut env: TestEnv,
    setting: &str,
    label: &str,
) -> (TestApp, Proxy, HashSet<String>) {
    let url = env.settings[setting].clone();
    let proxy = Proxy::start(target_of(&url)).await;
    env.settings.insert(setting.into(), through(&url, &proxy));
    env.settings
        .insert(config::WORKER_CONCURRENCY.into(), "16".into());
    env.fake
        .push_fault(FaultRule::every(Fault::Latency { ms: 100 }));
    let app = TestApp::start(env).await;
    let mut ids = HashSet::new();
    for i in 0..300 {
        let job = send_job(&unique_id(&format!("{label}{i}")));
        ids.insert(job["id"].as_str().unwrap_or_default().to_owned());
        app.publish(&job).await;
    }
    tokio::time::timeout(PATIENCE, app.fake.wait_for(|r| r.len() >= 50))
        .await
        .expect("the worker is busy");
    (app, proxy, ids)
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
        if result.status != Status::Sent {
            panic!(
                "{result:?}\nrow: {}\nattempts: {:?}",
                app.job_row(&id).await,
                app.attempts(&id).await
            );
        }
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
    let env = TestEnv::new(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin.clone());
    })
    .await;
    let (app, db, ids) = busy_worker_behind_proxy(env, config::DATABASE_URL, "db").await;

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
    let env = TestEnv::new(|_| {}).await;
    let (app, broker, ids) = busy_worker_behind_proxy(env, config::AMQP_URL, "amqp").await;
    broker.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restore();

    let results = all_sent(&app, &ids).await;
    assert!(results >= ids.len());
    app.shutdown().await;
}
