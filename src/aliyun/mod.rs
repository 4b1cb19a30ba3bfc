//! Alibaba Cloud: signing, calling, and deciding what an answer means.

pub mod client;
pub mod outcome;
pub mod rate;
pub mod redact;
pub mod sign;

pub use client::{AliyunClient, Answer, CallError, Product};
pub use outcome::{Effect, Verdict, classify};
