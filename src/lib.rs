//! aliyun-sms-worker: SMS verification-code jobs from RabbitMQ, through Alibaba Cloud, into
//! Postgres and a reply queue.
//!
//! The way a job travels: [`broker`] delivers it → [`wire`] decodes and validates it →
//! [`store`] claims its id → [`aliyun`] signs, calls and classifies → [`store`] commits the
//! outcome → [`broker`] publishes the result → ack. [`pipeline`] strings these together for
//! one delivery; [`worker`] runs the consume loop around it.

pub mod admin;
pub mod aliyun;
pub mod amqp_nodes;
pub mod bench;
pub mod broker;
pub mod check_config;
pub mod config;
pub mod dead_letters;
pub mod duties;
pub mod fake_aliyun;
pub mod health;
pub mod metrics;
pub mod ops;
pub mod output;
pub mod phone;
pub mod pipeline;
pub mod receipts;
pub mod retention;
pub mod sandbox;
pub mod sms_client;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod wire;
pub mod worker;

#[cfg(test)]
mod fuzz_tests;
