//! The integration suite: one binary, real RabbitMQ and Postgres, the fake Aliyun over HTTP.
//! Every test has its own database and queues, so the suite runs in parallel.

mod admin_access;
mod alerts;
mod chaos;
mod check_config;
mod check_verify_code;
mod chromium;
mod claims;
mod cli;
mod closed_pipe;
mod cluster;
mod compose;
mod dead_letters;
mod dysmsapi;
mod examples;
mod fake_aliyun;
mod fleet;
mod fleet_rate;
mod guards;
mod helpers;
mod invalid;
mod json_logs;
mod metrics;
mod operators;
mod outages;
mod poison;
mod process;
mod prometheus_text;
mod proxy;
mod readme;
mod redaction;
mod reliability;
mod retention;
mod search;
mod send_verify_code;
mod status_page;
