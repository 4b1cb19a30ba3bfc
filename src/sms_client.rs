//! The backend's side of the contract: publish a job, optionally wait for its result over
//! RabbitMQ's direct reply-to. Used by `enqueue` and usable from any Rust backend.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::amqp_nodes::{AmqpNodes, ConnectError};
use crate::broker::{DIRECT_REPLY_TO, short};
use crate::wire::JobResult;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("AMQP_URL is malformed: {0}")]
    BadUrl(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("queue {0:?} does not exist: start the worker once so it declares its queues")]
    NoSuchQueue(String),
    #[error("RabbitMQ refused the job (publisher nack)")]
    Nacked,
    #[error("no result within {0:?}")]
    Timeout(Duration),
    #[error("the result is not valid JSON: {0}")]
    BadResult(serde_json::Error),
    #[error("the reply consumer closed before a result arrived")]
    Closed,
}

pub struct SmsClient {
    connection: Connection,
    jobs_queue: String,
}

impl SmsClient {
    /// `amqp_url` is what `AMQP_URL` holds: one node's URL, or a cluster's, comma-separated
    /// (the first that answers is used).
    pub async fn connect(amqp_url: &str, jobs_queue: &str) -> Result<Self, ClientError> {
        let nodes = AmqpNodes::parse(amqp_url).map_err(ClientError::BadUrl)?;
        Self::connect_nodes(&nodes, jobs_queue).await
    }

    pub async fn connect_nodes(nodes: &AmqpNodes, jobs_queue: &str) -> Result<Self, ClientError> {
        let connection = nodes
            .connect("aliyun-sms-worker client", 0)
            .await?
            .connection;
        Ok(Self {
            connection,
            jobs_queue: jobs_queue.to_owned(),
        })
    }

    async fn confirmed_channel(&self) -> Result<Channel, ClientError> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    async fn publish_on(
        &self,
        channel: &Channel,
        body: &[u8],
        id: &str,
        reply_to: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            // An id too long for the properties is the worker's to refuse, not ours to panic on.
            .with_message_id(short(id))
            .with_correlation_id(short(id))
            .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0));
        if let Some(r) = reply_to {
            props = props.with_reply_to(ShortString::from(r));
        }
        let confirmation = channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(self.jobs_queue.as_str()),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await?
            .await?;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(ClientError::NoSuchQueue(self.jobs_queue.clone())),
            Confirmation::Nack(_) => Err(ClientError::Nacked),
        }
    }

    /// Publishes a job (persistent, confirmed). Its result goes to the results queue.
    pub async fn publish(&self, body: &[u8], id: &str) -> Result<(), ClientError> {
        let channel = self.confirmed_channel().await?;
        let published = self.publish_on(&channel, body, id, None).await;
        let _ = channel.close(200, ShortString::from("done")).await;
        published
    }

    /// Publishes a job with direct reply-to and waits for its result.
    pub async fn request(
        &self,
        body: &[u8],
        id: &str,
        timeout: Duration,
    ) -> Result<JobResult, ClientError> {
        let channel = self.confirmed_channel().await?;
        // Direct reply-to requires consuming (no-ack) before publishing, on the same channel.
        let mut replies = channel
            .basic_consume(
                ShortString::from(DIRECT_REPLY_TO),
                ShortString::from(""),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        self.publish_on(&channel, body, id, Some(DIRECT_REPLY_TO))
            .await?;
        let correlation = short(id);
        let wait = async {
            while let Some(delivery) = replies.next().await {
                let delivery = delivery?;
                let correlates = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .is_some_and(|c| *c == correlation);
                if correlates {
                    return serde_json::from_slice::<JobResult>(&delivery.data)
                        .map_err(ClientError::BadResult);
                }
            }
            Err(ClientError::Closed)
        };
        let result = tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(ClientError::Timeout(timeout)));
        let _ = channel.close(200, ShortString::from("done")).await;
        result
    }

    /// Closes the connection, giving up after [`CLOSE_PATIENCE`] (lapin's close can hang).
    ///
    /// [`CLOSE_PATIENCE`]: crate::broker::CLOSE_PATIENCE
    pub async fn close(self) {
        crate::broker::close_connection(&self.connection, "client done").await;
    }
}
