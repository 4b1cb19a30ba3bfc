//! aliyun-sms-worker: SMS verification-code jobs from RabbitMQ, through Alibaba Cloud, into
//! Postgres and a reply queue.
//!
//! The way a job travels: [`broker`] delivers it → [`wire`] decodes and validates it →
//! [`store`] claims its id → [`aliyun`] signs, calls and classifies → [`store`] commits the
//! outcome → [`broker`] publishes the result → ack. [`worker::pipeline`] strings these together
//! for one delivery; [`worker`] runs the consume loop around it. [`cli`] holds every command.
//!
//! - the running worker: [`worker`] (pipeline, health gate, receipts, fleet duties, supervisor);
//! - the commands: [`cli`] (clap definitions, operator commands, bench, sandbox);
//! - shared by both: [`wire`] (the contract), [`aliyun`] (the client), [`store`] (Postgres),
//!   [`broker`] (RabbitMQ), [`admin`] (HTTP listener), [`config`], [`metrics`], [`report`],
//!   [`phone`], [`telemetry`], and [`fake_aliyun`], the test double for Aliyun.

pub mod admin;
pub mod aliyun;
pub mod amqp_nodes;
pub mod broker;
pub mod cli;
pub mod config;
pub mod fake_aliyun;
pub mod metrics;
pub mod phone;
pub mod report;
pub mod sms_client;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod wire;
pub mod worker;

#[cfg(test)]
mod fuzz_tests;
