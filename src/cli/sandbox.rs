//! `run --sandbox`: the real worker wired to an in-process fake Aliyun, so the whole pipeline
//! can be seen working with only RabbitMQ and Postgres.

use std::net::{Ipv4Addr, SocketAddr};

use crate::config::{
    ALIBABA_CLOUD_ACCESS_KEY_ID, ALIBABA_CLOUD_ACCESS_KEY_SECRET, ALIBABA_CLOUD_SECURITY_TOKEN,
    ALIYUN_DYPNSAPI_ENDPOINT, ALIYUN_DYSMSAPI_ENDPOINT, Config, ConfigError,
};
use crate::fake_aliyun::{FakeAliyun, FakeConfig};

/// Starts the fake on a free loopback port with throw-away credentials, and reads the rest of
/// the configuration from `lookup` with the Aliyun settings pointed at the fake.
pub async fn start(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, FakeAliyun), SandboxError> {
    let key_id = format!("sandbox-{}", uuid::Uuid::new_v4().simple());
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let fake = FakeAliyun::start(
        FakeConfig::new(key_id.clone(), secret.clone()),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    )
    .await?;
    let endpoint = fake.endpoint();
    let config = Config::from_lookup(&|name| match name {
        ALIBABA_CLOUD_ACCESS_KEY_ID => Some(key_id.clone()),
        ALIBABA_CLOUD_ACCESS_KEY_SECRET => Some(secret.clone()),
        ALIBABA_CLOUD_SECURITY_TOKEN => None,
        ALIYUN_DYPNSAPI_ENDPOINT | ALIYUN_DYSMSAPI_ENDPOINT => Some(endpoint.clone()),
        other => lookup(other),
    })?;
    Ok((config, fake))
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("could not start the fake Aliyun: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}
