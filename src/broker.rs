//! RabbitMQ: connection, topology, consuming jobs, publishing results and dead letters.

use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, MAX_SHORT_STRING_LENGTH, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};

use crate::amqp_nodes::{AmqpNodes, ConnectError, Connected};
use crate::config::{QueueConfig, QueueType};
use crate::store::ReplyRoute;
use crate::wire::JobResult;

/// RabbitMQ's direct reply-to pseudo-queue: backends waiting on a result consume from it.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Header on a dead-lettered job: the worker's code for why it was refused.
pub const HEADER_INVALID_CODE: &str = "x-sms-invalid-code";
/// Header on a dead-lettered job: the human-readable reason.
pub const HEADER_INVALID_REASON: &str = "x-sms-invalid-reason";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ refused to take the message (publisher nack)")]
    Nacked,
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The jobs queue exists with other arguments than this worker declares it with: RabbitMQ
    /// will not let it consume until they match, and no reconnect changes that.
    #[error(
        "the jobs queue {queue:?} exists with other settings than this worker's \
         (SMS_JOBS_QUEUE_TYPE, SMS_JOBS_DELIVERY_LIMIT, SMS_DEAD_LETTER_EXCHANGE): {detail}; \
         make them match the queue's, or delete the queue for the worker to declare it again"
    )]
    QueueSettings { queue: String, detail: String },
}

/// Whether a confirmed publish reached a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    Yes,
    /// Returned as unroutable: the reply_to queue does not exist (any more).
    NoQueue,
}

#[derive(Clone)]
pub struct Broker {
    connection: std::sync::Arc<Connection>,
    consume: Channel,
    publish: Channel,
    queues: QueueConfig,
    /// Which of the configured nodes this connection went to.
    node: usize,
}

/// A passive declare: the queue's counts if it exists, RabbitMQ's NOT_FOUND otherwise (which
/// closes `channel`; use one of its own).
pub async fn inspect_queue(channel: &Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            short(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// `s` as an AMQP short string, cut at a character boundary past 255 bytes. lapin's own
/// conversion panics there, and ids, correlation ids and receipt ids come from messages: a
/// property that cannot be whole is better cut than a worker task dead mid-job.
pub fn short(s: &str) -> ShortString {
    let mut end = s.len().min(MAX_SHORT_STRING_LENGTH);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(&s[..end]).unwrap_or_default()
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

impl Broker {
    /// Connects to the first of `nodes` that answers, trying them from `start` (see
    /// [`AmqpNodes::connect`]).
    pub async fn connect(
        nodes: &AmqpNodes,
        start: usize,
        name: &str,
        queues: QueueConfig,
    ) -> Result<Self, BrokerError> {
        let Connected { connection, node } = nodes.connect(name, start).await?;
        let consume = connection.create_channel().await?;
        let publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            connection: std::sync::Arc::new(connection),
            consume,
            publish,
            queues,
            node,
        })
    }

    /// Messages waiting in the dead-letter queue.
    pub async fn dead_letter_depth(&self) -> Result<u32, BrokerError> {
        Ok(self
            .inspect(&self.queues.dead_letter)
            .await?
            .message_count())
    }

    /// The jobs queue: messages ready for a consumer (not those delivered and not yet acked,
    /// which AMQP does not count), and its consumers.
    pub async fn jobs_depth(&self) -> Result<(u32, u32), BrokerError> {
        let q = self.inspect(&self.queues.jobs).await?;
        Ok((q.message_count(), q.consumer_count()))
    }

    /// Asked on a channel of its own: a queue deleted under the worker closes the channel the
    /// question is asked on.
    async fn inspect(&self, queue: &str) -> Result<lapin::Queue, BrokerError> {
        let channel = self.connection.create_channel().await?;
        let declared = inspect_queue(&channel, queue).await;
        if declared.is_ok() {
            let _ = channel.close(200, short("counted")).await;
        }
        Ok(declared?)
    }

    /// The index in the node list of the node this broker is connected to.
    pub fn node(&self) -> usize {
        self.node
    }

    /// Declares the queues and the dead-letter exchange. Idempotent; run on every (re)connect
    /// because a broker that lost its state must get the topology back before jobs arrive.
    pub async fn declare_topology(&self) -> Result<(), BrokerError> {
        let q = &self.queues;
        let ch = &self.publish;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ch.exchange_declare(
            short(&q.dead_letter_exchange),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(short(&q.dead_letter), durable, FieldTable::default())
            .await?;
        ch.queue_bind(
            short(&q.dead_letter),
            short(&q.dead_letter_exchange),
            short(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        declare_jobs_queue(ch, q).await?;
        ch.queue_declare(short(&q.results), durable, FieldTable::default())
            .await?;
        if let Some(receipts) = &q.receipts {
            ch.queue_declare(short(receipts), durable, FieldTable::default())
                .await?;
        }
        Ok(())
    }

    /// Publishes a delivery event (persistent, confirmed) to the receipts queue, if enabled.
    pub async fn publish_receipt(
        &self,
        event: &serde_json::Value,
        id: &str,
    ) -> Result<(), BrokerError> {
        let Some(queue) = &self.queues.receipts else {
            return Ok(());
        };
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(short("application/json"))
            .with_type(short("sms.delivery"))
            .with_message_id(short(id));
        let confirmation = self
            .publish
            .basic_publish(
                short(""),
                short(queue),
                BasicPublishOptions::default(),
                event.to_string().as_bytes(),
                props,
            )
            .await?
            .await?;
        interpret(confirmation, queue).map(|_| ())
    }

    pub async fn consume(&self, prefetch: u16, tag: &str) -> Result<Consumer, BrokerError> {
        self.consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        Ok(self
            .consume
            .basic_consume(
                short(&self.queues.jobs),
                short(tag),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?)
    }

    /// Stops new deliveries; deliveries already received can still be acked.
    pub async fn cancel(&self, tag: &str) -> Result<(), BrokerError> {
        Ok(self
            .consume
            .basic_cancel(short(tag), BasicCancelOptions::default())
            .await?)
    }

    pub async fn close(&self) {
        // Closing returns every unacked delivery to its queue.
        close_connection(&self.connection, "worker stopping").await;
    }

    /// Publishes a job's result (persistent, mandatory, confirmed) to its `reply_to`, or to
    /// the results queue.
    pub async fn publish_result(
        &self,
        result: &JobResult,
        route: &ReplyRoute,
    ) -> Result<Routed, BrokerError> {
        let destination = route.reply_to.as_deref().unwrap_or(&self.queues.results);
        // No queue has a name longer than a short string: a cut one could name another queue.
        let Ok(routing_key) = ShortString::try_new(destination) else {
            return Ok(Routed::NoQueue);
        };
        let correlation = route.correlation_id.as_deref().or(result.id.as_deref());
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(short("application/json"))
            .with_type(short("sms.result"))
            .with_timestamp(u64::try_from(result.finished_at.timestamp()).unwrap_or(0));
        if let Some(c) = correlation {
            props = props.with_correlation_id(short(c));
        }
        if let Some(id) = &result.id {
            props = props.with_message_id(short(id));
        }
        let confirmation = self
            .publish
            .basic_publish(
                short(""),
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &result.to_json(),
                props,
            )
            .await?
            .await?;
        interpret(confirmation, destination)
    }

    /// Re-publishes a refused job to the dead-letter exchange, body and properties untouched,
    /// with the reason in headers.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        code: &str,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(short(HEADER_INVALID_CODE), long(code));
        headers.insert(short(HEADER_INVALID_REASON), long(reason));
        let props = delivery.properties.clone().with_headers(headers);
        let confirmation = self
            .publish
            .basic_publish(
                short(&self.queues.dead_letter_exchange),
                short(&self.queues.jobs),
                BasicPublishOptions::default(),
                &delivery.data,
                props,
            )
            .await?
            .await?;
        interpret(confirmation, &self.queues.dead_letter_exchange).map(|_| ())
    }
}

/// How long a clean close of a connection may take before it is given up.
pub const CLOSE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes a connection cleanly, giving up after [`CLOSE_PATIENCE`]; an error means it is closed
/// already. Bounded because lapin's close can wait for ever when a channel dropped just before
/// closes itself from lapin's own task (2 closes in 500 hung in a loop here): the process
/// exiting closes the socket, with the same effect for RabbitMQ.
pub async fn close_connection(connection: &Connection, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_PATIENCE, connection.close(200, short(reason))).await;
}

/// Declares the jobs queue as every worker of the fleet does. On a queue that exists with the
/// same arguments this changes nothing; with others RabbitMQ refuses (`PRECONDITION_FAILED`,
/// which closes `channel`), reported as [`BrokerError::QueueSettings`].
pub async fn declare_jobs_queue(channel: &Channel, q: &QueueConfig) -> Result<(), BrokerError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(short(&q.jobs), durable, jobs_queue_arguments(q))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
            Err(BrokerError::QueueSettings {
                queue: q.jobs.clone(),
                detail: e.to_string(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn jobs_queue_arguments(q: &QueueConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        short("x-dead-letter-exchange"),
        long(&q.dead_letter_exchange),
    );
    if q.jobs_queue_type == QueueType::Quorum {
        args.insert(short("x-queue-type"), long("quorum"));
        args.insert(
            short("x-delivery-limit"),
            AMQPValue::LongLongInt(i64::from(q.delivery_limit)),
        );
    }
    args
}

fn interpret(confirmation: Confirmation, destination: &str) -> Result<Routed, BrokerError> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Routed::Yes),
        // RabbitMQ 3.10 returns mandatory publishes to a direct reply-to name as unroutable
        // even though it delivered them.
        Confirmation::Ack(Some(_)) if destination.starts_with(DIRECT_REPLY_TO) => Ok(Routed::Yes),
        Confirmation::Ack(Some(_)) => Ok(Routed::NoQueue),
        Confirmation::Nack(_) => Err(BrokerError::Nacked),
    }
}

/// The reply route a delivery asks for.
pub fn reply_route(delivery: &Delivery) -> ReplyRoute {
    let p = &delivery.properties;
    ReplyRoute {
        reply_to: p
            .reply_to()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .filter(|s| !s.is_empty()),
        correlation_id: p
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .filter(|s| !s.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn long_and_multibyte_text_is_cut_at_a_character_boundary() {
        let ninety = "验".repeat(90);
        assert_eq!(short(&ninety).as_str(), "验".repeat(85));
        let edge = format!("{}验", "x".repeat(254));
        assert_eq!(short(&edge).as_str(), "x".repeat(254));
        assert_eq!(short(&"x".repeat(300)).as_str(), "x".repeat(255));
        assert_eq!(short("ok").as_str(), "ok");
        assert_eq!(short("").as_str(), "");
    }

    proptest! {
        #[test]
        fn any_text_becomes_a_short_string_without_panicking(s in "\\PC{0,400}") {
            let converted = short(&s);
            prop_assert!(converted.as_str().len() <= 255);
            prop_assert!(s.starts_with(converted.as_str()));
            if s.len() <= 255 {
                prop_assert_eq!(converted.as_str(), s.as_str());
            }
        }
    }
}
