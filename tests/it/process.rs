//! The worker binary as a child process, for what only a real process shows: SIGTERM, kill -9,
//! the banner, the whole log.

use std::collections::HashMap;
use std::process::{ExitStatus, Stdio};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::helpers::PATIENCE;

pub const BIN: &str = env!("CARGO_BIN_EXE_aliyun-sms-worker");

/// The binary with only the given environment (plus PATH) and the most verbose log filter an
/// operator is likely to use.
pub fn command<'a>(envs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "debug")
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `aliyun-sms-worker <args>` to its end with only `envs` set (see [`command`]);
/// returns its exit code, stdout and stderr.
pub async fn run_to_end<'a>(
    envs: impl IntoIterator<Item = (&'a str, &'a str)>,
    args: &[&str],
) -> (i32, String, String) {
    let out = command(envs)
        .args(args)
        .output()
        .await
        .expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub struct WorkerProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    reader: tokio::task::JoinHandle<()>,
    /// Every stderr line read so far.
    pub log: Vec<String>,
}

impl WorkerProcess {
    /// Starts `aliyun-sms-worker <args>` and waits until it consumes jobs.
    pub async fn start(args: &[&str], settings: &HashMap<String, String>) -> Self {
        let mut child = command(settings.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the worker binary");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = Self {
            child,
            lines,
            reader,
            log: Vec::new(),
        };
        assert!(
            process.wait_for_log("consuming jobs").await,
            "worker never started consuming:\n{}",
            process.log.join("\n")
        );
        process
    }

    /// Reads log lines until one contains `needle`; false on timeout or end of output.
    pub async fn wait_for_log(&mut self, needle: &str) -> bool {
        let scan = async {
            while let Some(line) = self.lines.recv().await {
                let found = line.contains(needle);
                self.log.push(line);
                if found {
                    return true;
                }
            }
            false
        };
        tokio::time::timeout(PATIENCE, scan).await.unwrap_or(false)
    }

    /// Closes the read end of the worker's stderr, as a log shipper that went away does: its
    /// next log line meets a broken pipe.
    pub async fn stop_reading_log(&mut self) {
        self.reader.abort();
        let _ = (&mut self.reader).await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("worker still running")
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("worker still running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// SIGTERM, then the exit status and the rest of the log.
    pub async fn terminate(mut self) -> (ExitStatus, String) {
        self.signal("-TERM");
        self.finish().await
    }

    /// SIGSTOP: the process stops where it is, as in a frozen VM or a long stall; its sockets
    /// stay open and nothing of it runs until [`Self::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGTERM without waiting: the worker drains while the test goes on; see [`Self::exited`].
    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Waits for the process to exit by itself: its status and its whole log.
    pub async fn exited(mut self) -> (ExitStatus, String) {
        self.finish().await
    }

    /// kill -9: no chance to clean up, as in a crash.
    pub async fn kill9(mut self) -> (ExitStatus, String) {
        self.signal("-KILL");
        self.finish().await
    }

    async fn finish(&mut self) -> (ExitStatus, String) {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("worker exits in time")
            .expect("wait for worker");
        // Read to the end of its stderr: the sender closes when the process's stderr does.
        let rest = async {
            while let Some(line) = self.lines.recv().await {
                self.log.push(line);
            }
        };
        tokio::time::timeout(PATIENCE, rest)
            .await
            .expect("worker stderr closed");
        (status, self.log.join("\n"))
    }
}
