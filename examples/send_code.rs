//! Send a verification code from a Rust backend and wait for the result.
//!
//! ```sh
//! cargo run --example send_code -- 13800138000
//! ```

use std::time::Duration;

use aliyun_sms_worker::sms_client::SmsClient;
use aliyun_sms_worker::wire::Status;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let jobs_queue = std::env::var("SMS_JOBS_QUEUE").unwrap_or_else(|_| "sms.jobs".into());
    let phone = std::env::args().nth(1).ok_or("usage: send_code PHONE")?;
    // The idempotency key: publishing the same id again answers again, never sends twice.
    let id = format!("signup-{}", uuid::Uuid::new_v4().simple());
    let job = json!({
        "id": id, "type": "send_verify_code", "phone_number": phone,
        "sign_name": "速通互联验证码", "template_code": "100001",
        "template_param": {"code": "##code##", "min": "5"},
    });

    let client = SmsClient::connect(&amqp_url, &jobs_queue).await?;
    let result = client
        .request(&serde_json::to_vec(&job)?, &id, Duration::from_secs(30))
        .await?;
    client.close().await;

    println!("{}", serde_json::to_string(&result)?);
    if result.status != Status::Sent {
        std::process::exit(2);
    }
    Ok(())
}
