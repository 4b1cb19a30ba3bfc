//! What the CLI commands print. A reader that goes away (`aliyun-sms-worker jobs list | head`)
//! ends the command quietly, as it ends a Unix tool: Rust ignores SIGPIPE, so the write fails
//! with EPIPE, and `println!` would panic on it. SIGPIPE stays ignored rather than restored,
//! because with it restored a write to a socket whose peer has gone (`writev` sends no
//! MSG_NOSIGNAL) would kill a command silently instead of reporting the lost connection.

use std::fmt;
use std::io::{self, Write};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The reader closed its end of the pipe: the command stops, and that is not a failure.
    #[error("standard output closed by its reader")]
    Closed,
    #[error("writing to standard output: {0}")]
    Write(#[source] io::Error),
}

/// Like `println!`, returning an error instead of panicking when the output is gone.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Like `print!`, returning an error instead of panicking when the output is gone.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write(format_args!($($arg)*))
    };
}

/// Writes and flushes, so that a closed pipe is found at this write and not at exit.
pub fn write(args: fmt::Arguments<'_>) -> Result<(), OutputError> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| stdout.flush())
        .map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe => OutputError::Closed,
            _ => OutputError::Write(e),
        })
}

/// Whether a command ended because its output was closed, which the CLI reports as success
/// and without a message.
pub fn closed(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| matches!(cause.downcast_ref(), Some(OutputError::Closed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_output_is_told_apart_through_context() {
        let closed = anyhow::Error::new(OutputError::Closed).context("printing the jobs");
        assert!(super::closed(&closed));
        let full = anyhow::Error::new(OutputError::Write(io::Error::other("disk full")));
        assert!(!super::closed(&full));
        assert!(!super::closed(&anyhow::anyhow!("connection refused")));
    }
}
