//! Alibaba Cloud: signing, calling, and deciding what an answer means.

pub mod answer;
pub mod client;
pub mod outcome;
pub mod rate;
pub mod redact;
pub mod sign;

pub use answer::{Answer, CallError, Product};
pub use client::AliyunClient;
pub use outcome::{Effect, Verdict, classify};
