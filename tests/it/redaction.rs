//! Aliyun's errors echo the request (a `SignatureDoesNotMatch` carries the whole string to
//! sign): with a wrong secret, nothing a user typed, no template value and no STS token may
//! reach the result, the rows, `jobs show`, the status page or the log — while the error
//! itself stays recognisable.

use aliyun_sms_worker::config;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::cli::enqueue;
use crate::helpers::{TestEnv, admin_get, attempts, free_addr, job_row, unique_id, unique_phone};
use crate::process::{WorkerProcess, run_to_end};

/// A value no job shares by chance: digits, as codes and template values usually are.
fn unique_digits(n: usize) -> String {
    let hex = uuid::Uuid::new_v4().as_u128();
    format!("{:0n$}", hex % 10u128.pow(n as u32))
}

/// A job of every type, each with its own numbers and values; the secrets they carry; and a
/// template value that is no code (the job's stored `params` keep those, by design, but
/// Aliyun's echo of them is hidden like any other).
fn jobs() -> (Vec<(Value, &'static str)>, Vec<String>, String) {
    let [p1, p2, p3, p4] = [(); 4].map(|_| unique_phone());
    let typed_code = unique_digits(6);
    let own_code = unique_digits(8);
    let [c0, c1] = [(); 2].map(|_| unique_digits(6));
    let name = format!("Name{}", unique_digits(7));
    let jobs = vec![
        (
            json!({
                "id": unique_id("redact-send"),
                "type": "send_verify_code",
                "phone_number": p1,
                "sign_name": "速通互联验证码",
                "template_code": "100001",
                "template_param": {"code": "##code##", "min": "5"},
            }),
            "SendSmsVerifyCode",
        ),
        (
            json!({
                "id": unique_id("redact-check"),
                "type": "check_verify_code",
                "phone_number": p1,
                "verify_code": typed_code,
            }),
            "CheckSmsVerifyCode",
        ),
        (
            json!({
                "id": unique_id("redact-sms"),
                "type": "send_sms",
                "phone_numbers": [p2],
                "sign_name": "阿里云短信测试",
                "template_code": "SMS_154950909",
                "template_param": {"code": own_code},
            }),
            "SendSms",
        ),
        (
            json!({
                "id": unique_id("redact-batch"),
                "type": "send_batch_sms",
                "phone_numbers": [p3, p4],
                "sign_names": ["阿里云", "阿里云"],
                "template_code": "SMS_4",
                "template_params": [{"code": c0, "name": name}, {"code": c1}],
            }),
            "SendBatchSms",
        ),
    ];
    (
        jobs,
        vec![p1, p2, p3, p4, typed_code, own_code, c0, c1],
        name,
    )
}

/// `what` holds none of `secrets` and still names Aliyun's code.
fn assert_redacted(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{secret} in {what}:\n{text}"
        );
    }
    assert!(
        text.contains("SignatureDoesNotMatch"),
        "{what} no longer says what went wrong:\n{text}"
    );
}

/// The `sms_jobs` row keeps the number in its own column by design (receipts, `jobs list
/// --phone`); it must be nowhere else.
fn without_phone_column(mut job: Value) -> Value {
    if let Some(m) = job.as_object_mut() {
        m.remove("phone_number");
    }
    job
}

async fn nothing_of_the_request_leaks_from_a_signature_mismatch(version: &str) {
    let admin = free_addr();
    let token = format!("STS.tok{}", uuid::Uuid::new_v4().simple());
    let env = TestEnv::with_fake(
        |fake| fake.keys.access_key_secret = "not-the-workers-secret".into(),
        |s| {
            s.insert(config::ALIBABA_CLOUD_SECURITY_TOKEN.into(), token.clone());
            s.insert(config::ALIYUN_SIGNATURE_VERSION.into(), version.into());
            s.insert(config::ADMIN_ADDR.into(), admin.clone());
        },
    )
    .await;
    let worker = WorkerProcess::start(&["run"], &env.settings).await;
    let pool = PgPool::connect(&env.db_url).await.expect("connect test db");

    let (jobs, mut secrets, name) = jobs();
    secrets.push(token.clone());
    secrets.push(token["STS.".len()..].to_owned());
    for (job, action) in &jobs {
        let id = job["id"].as_str().expect("job id");
        let result = enqueue(&env.settings, &["json", &job.to_string()]).await;
        assert_eq!(
            result["code"], "SignatureDoesNotMatch",
            "{version}: {result}"
        );
        assert_redacted("the result", &result.to_string(), &secrets);
        let message = result["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(action) && message.contains("[redacted]"),
            "{version}: the echo stays readable, only values are hidden: {message}"
        );

        let row = without_phone_column(job_row(&pool, id).await);
        assert_redacted("the sms_jobs row", &row.to_string(), &secrets);
        let tried = attempts(&pool, id).await;
        assert_redacted(
            "the sms_attempts rows",
            &Value::from(tried.clone()).to_string(),
            &secrets,
        );
        for echo in tried
            .iter()
            .map(|a| &a["message"])
            .chain([&result["message"]])
        {
            assert!(!echo.to_string().contains(&name), "{name} echoed: {echo}");
        }

        let (code, shown, err) = run_to_end(
            [(config::DATABASE_URL, env.db_url.as_str())],
            &["jobs", "show", id, "--json"],
        )
        .await;
        assert_eq!(code, 0, "{err}");
        let mut shown: Value = serde_json::from_str(&shown).expect("JSON detail");
        shown["job"] = without_phone_column(shown["job"].take());
        assert_redacted("`jobs show --json`", &shown.to_string(), &secrets);

        let (status, page) = admin_get(&admin, &format!("/jobs/{id}")).await;
        assert_eq!(status, 200, "{page}");
        assert_redacted("the status page", &page, &secrets);
    }

    let (status, log) = worker.terminate().await;
    assert!(status.success(), "worker exit status {status:?}");
    assert_redacted("the worker's debug log", &log, &secrets);

    pool.close().await;
    env.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_signature_mismatch_echoes_no_number_code_template_value_or_token() {
    nothing_of_the_request_leaks_from_a_signature_mismatch("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v3_signature_mismatch_echoes_no_number_code_template_value_or_token() {
    nothing_of_the_request_leaks_from_a_signature_mismatch("v3").await;
}
