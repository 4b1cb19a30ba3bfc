//! `purge --older-than`: old finished jobs go with their attempts and receipts; jobs still
//! sending, recently finished or still being reconciled stay.

use aliyun_sms_worker::config;
use aliyun_sms_worker::store::Store;
use sqlx::PgPool;

use crate::helpers::{create_database, drop_database};
use crate::process::run_to_end;

/// A job created `created_days` ago, finished `finished_days` ago (None: not finished).
async fn job(pool: &PgPool, id: &str, status: &str, created_days: i32, finished_days: Option<i32>) {
    sqlx::query(
        "INSERT INTO sms_jobs (id, type, status, phone_number, created_at, finished_at)
         VALUES ($1, 'send_sms', $2, '13900001111',
                 now() - make_interval(days => $3),
                 now() - make_interval(days => $4))",
    )
    .bind(id)
    .bind(status)
    .bind(created_days)
    .bind(finished_days)
    .execute(pool)
    .await
    .expect("insert job");
}

async fn attempt(pool: &PgPool, id: &str, n: i32) {
    sqlx::query(
        "INSERT INTO sms_attempts (job_id, attempt, action, started_at, finished_at, outcome)
         VALUES ($1, $2, 'SendSms', now(), now(), 'success')",
    )
    .bind(id)
    .bind(n)
    .execute(pool)
    .await
    .expect("insert attempt");
}

async fn ids(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT id FROM sms_jobs ORDER BY id")
        .fetch_all(pool)
        .await
        .expect("list ids")
}

async fn purge(db_url: &str, args: &[&str]) -> (i32, String, String) {
    run_to_end(
        [(config::DATABASE_URL, db_url)],
        &[&["purge"], args].concat(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_old_finished_jobs_in_batches_and_nothing_else() {
    let (db_name, db_url) = create_database().await;
    let store = Store::connect(&db_url, 2).await.expect("connect");
    store.migrate().await.expect("migrate");
    let pool = store.pool().clone();

    for id in ["old-a", "old-b", "old-c"] {
        job(&pool, id, "sent", 120, Some(100)).await;
        attempt(&pool, id, 1).await;
    }
    attempt(&pool, "old-a", 2).await;
    sqlx::query(
        "INSERT INTO sms_deliveries (job_id, phone_number, send_date)
         VALUES ('old-a', '13900001111', current_date - 100)",
    )
    .execute(&pool)
    .await
    .expect("insert delivery");
    job(&pool, "old-sending", "sending", 120, None).await;
    job(&pool, "finished-lately", "failed", 120, Some(10)).await;
    job(&pool, "recent", "sent", 1, Some(1)).await;
    job(&pool, "old-reconciling", "unknown", 120, Some(100)).await;
    sqlx::query(
        "UPDATE sms_jobs SET reconcile_until = now() + interval '1 hour'
         WHERE id = 'old-reconciling'",
    )
    .execute(&pool)
    .await
    .expect("reconcile_until");
    let everything = ids(&pool).await;

    let (code, out, err) = purge(&db_url, &["--older-than", "90d", "--dry-run"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("would purge 3 job(s)")
            && out.contains("4 attempt(s)")
            && out.contains("1 delivery receipt(s)"),
        "{out}"
    );
    assert_eq!(ids(&pool).await, everything, "a dry run deletes nothing");

    let (code, out, err) = purge(&db_url, &["--older-than", "90d", "--batch-size", "2"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("purged 3 job(s)")
            && out.contains("4 attempt(s)")
            && out.contains("1 delivery receipt(s)")
            && out.contains("2 batch(es)"),
        "{out}"
    );
    assert_eq!(
        ids(&pool).await,
        [
            "finished-lately",
            "old-reconciling",
            "old-sending",
            "recent"
        ]
    );
    let (attempts,): (i64,) = sqlx::query_as("SELECT count(*) FROM sms_attempts")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (deliveries,): (i64,) = sqlx::query_as("SELECT count(*) FROM sms_deliveries")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((attempts, deliveries), (0, 0));

    let (code, out, _) = purge(&db_url, &["--older-than", "90d"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("purged 0 job(s)"), "{out}");

    let (code, _, err) = purge(&db_url, &["--older-than", "1h"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("1d"), "{err}");
    let (code, _, err) = purge(&db_url, &["--older-than", "90"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("unit"), "{err}");

    pool.close().await;
    drop_database(&db_name).await;
}
