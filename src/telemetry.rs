//! Logging: `tracing` to stderr, human-readable or JSON.
//!
//! What goes into fields is the caller's responsibility: phone numbers are masked by
//! [`crate::phone::PhoneNumber`]'s `Display`, codes and secrets are never passed at all.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

const DEFAULT_FILTER: &str = "info,lapin=warn,sqlx=warn,hyper=warn,reqwest=warn";

/// lapin logs every returned message with its whole body, and RabbitMQ 3.10 returns every
/// direct reply-to result, which may carry a verification code. Off whatever RUST_LOG says.
const ALWAYS_OFF: &str = "lapin::returned_messages=off";

/// `RUST_LOG`, else the default; `quiet` makes the default no logging at all.
pub fn filter(quiet: bool) -> EnvFilter {
    let default = if quiet { "off" } else { DEFAULT_FILTER };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    match ALWAYS_OFF.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

pub fn init(format: LogFormat, quiet: bool) {
    let filter = filter(quiet);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        // Colours only for a person at a terminal: in a file, a pipe or a container's log
        // they are escape codes a shipper or `grep` trips over.
        .with_ansi(std::io::stderr().is_terminal());
    // try_init: a second call (tests, embedded use) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// stderr that drops what it cannot write. A log reader that went away (a shipper restarted, a
/// `| grep -m1` that found its line) must not stop the worker: tracing-subscriber reports a
/// failed write with `eprintln!`, which panics on a closed stderr — in whichever task logged,
/// the one that turns SIGTERM into a drain included.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Writes a line to stderr, dropping it if stderr is gone (see [`LossyStderr`]); for what the
/// CLI says outside the log (a banner, a last error).
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(LossyStderr, "{line}");
}

/// An error and its causes on one line, each said once: a wrapper that ends its own text with
/// its source's (`database error: X`, then X) would otherwise print it twice or more.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let said = s.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = s.source();
    }
    text
}
