//! A local RabbitMQ cluster that a test starts for itself: extra nodes beside the machine's own
//! (which is never touched), each with its own name, ports, config file and folders, joined into
//! one cluster, and stopped when the [`Cluster`] is dropped, even by a failing test.
//!
//! It needs what Debian's `rabbitmq-server` package installs: the `rabbitmq` user (the nodes
//! run as it, with its Erlang cookie, the one `rabbitmqctl` uses) and
//! `/usr/lib/rabbitmq/bin/rabbitmq-server`; and root, to run a process as that user.
//! Nodes are named `smsw-it-<test pid>-…` and keep their files in `/tmp/<that name>`, so
//! `.ci/run` can sweep what a killed run left behind.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const NODE_PREFIX: &str = "smsw-it-";
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// Not `$TMPDIR`: the `rabbitmq` user must reach the folders, and `.ci/run` looks here.
const BASE: &str = "/tmp";
/// Starting a node takes about 6 s on an idle machine; much longer on a busy one.
const NODE_START: Duration = Duration::from_secs(120);

pub struct Node {
    /// `smsw-it-<pid>-<n>-<i>@localhost`
    pub name: String,
    pub port: u16,
    /// Erlang distribution (node to node, and rabbitmqctl to node).
    dist_port: u16,
    dir: PathBuf,
}

impl Node {
    /// The AMQP URL of this node, with the default guest user (loopback only, as here).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
}

/// Runs `rabbitmqctl -n <node> <args>`; its output, or Err with it when it fails.
fn ctl(node: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "-n", node])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl -n {node} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A free loopback port below the kernel's ephemeral range (32768+), so no outgoing connection
/// takes it between now and the node's start, and outside 25672 (the system node's
/// distribution port) and 35672–35682 (where `rabbitmqctl` listens while it runs). `taken`:
/// ports chosen for nodes that are not listening yet.
fn free_low_port(taken: &mut Vec<u16>) -> u16 {
    loop {
        let port: u16 = rand::random_range(20_000..32_000);
        if port == 25_672 || taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn start_node(node: &Node) -> Result<(), String> {
    let Node {
        name,
        port,
        dist_port,
        dir,
    } = node;
    std::fs::create_dir_all(dir.join("mnesia")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir.join("log")).map_err(|e| e.to_string())?;
    // The system configuration pins the listener to 5672: each node gets its own file.
    std::fs::write(
        dir.join("node.conf"),
        format!("listeners.tcp.default = 127.0.0.1:{port}\n"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("enabled_plugins"), "").map_err(|e| e.to_string())?;
    let chown = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(dir)
        .status()
        .map_err(|e| e.to_string())?;
    if !chown.success() {
        return Err(format!("chown rabbitmq {}", dir.display()));
    }
    let started = Command::new("runuser")
        .args(["-u", "rabbitmq", "--", SERVER, "-detached"])
        .current_dir(dir)
        .env("RABBITMQ_NODENAME", name)
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        // Without the extension, as rabbitmq-server wants it.
        .env("RABBITMQ_CONFIG_FILE", dir.join("node"))
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("runuser rabbitmq-server: {e}"))?;
    if !started.success() {
        return Err(format!("rabbitmq-server -detached for {name}: {started}"));
    }
    Ok(())
}

/// Waits until the node listens for clients: the last step of its boot.
fn await_node(node: &Node) -> Result<(), String> {
    let deadline = Instant::now() + NODE_START;
    while !port_open(node.port) {
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not listen on {} within {NODE_START:?}; see {}",
                node.name,
                node.port,
                node.dir.join("log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

impl Cluster {
    /// Starts `size` nodes side by side and joins the others to the first one.
    pub async fn start(size: usize) -> Self {
        tokio::task::spawn_blocking(move || Self::start_blocking(size))
            .await
            .expect("cluster start did not panic")
    }

    fn start_blocking(size: usize) -> Self {
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        let run = format!(
            "{NODE_PREFIX}{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut taken = Vec::new();
        let mut cluster = Self { nodes: Vec::new() };
        for i in 1..=size {
            let node = Node {
                name: format!("{run}-{i}@localhost"),
                port: free_low_port(&mut taken),
                dist_port: free_low_port(&mut taken),
                dir: PathBuf::from(BASE).join(format!("{run}-{i}")),
            };
            // Pushed first, so the guard stops it even if starting fails half-way.
            cluster.nodes.push(node);
            let node = &cluster.nodes[i - 1];
            if let Err(e) = start_node(node) {
                panic!("starting RabbitMQ node {}: {e}", node.name);
            }
        }
        for node in &cluster.nodes {
            if let Err(e) = await_node(node) {
                panic!("{e}");
            }
        }
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            // start_app returns once the node is running again, as a member of the cluster.
            let joined = ctl(&node.name, &["stop_app"])
                .and_then(|_| ctl(&node.name, &["join_cluster", &first]))
                .and_then(|_| ctl(&node.name, &["start_app"]));
            if let Err(e) = joined {
                panic!("joining {} to {first}: {e}", node.name);
            }
        }
        cluster
    }

    /// Every node's URL, comma-separated, starting with node `first` (the order a worker
    /// tries them in).
    pub fn urls_from(&self, first: usize) -> String {
        (0..self.nodes.len())
            .map(|i| self.nodes[(first + i) % self.nodes.len()].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes holding a replica of quorum queue `queue`, as node 0 sees them.
    pub async fn queue_members(&self, queue: &str) -> Vec<String> {
        let name = self.nodes[0].name.clone();
        let json = tokio::task::spawn_blocking(move || {
            ctl(
                &name,
                &["list_queues", "name", "members", "--formatter", "json"],
            )
        })
        .await
        .expect("rabbitmqctl did not panic")
        .expect("list queues");
        let queues: Vec<serde_json::Value> = serde_json::from_str(&json).expect("JSON queue list");
        let members = queues
            .iter()
            .find(|q| q["name"] == queue)
            .map(|q| q["members"].clone())
            .unwrap_or_default();
        serde_json::from_value(members).unwrap_or_default()
    }

    /// `rabbitmqctl stop`: the node goes away as a crashed or upgraded one would, and the
    /// cluster carries on with the others.
    pub async fn stop_node(&self, i: usize) {
        let name = self.nodes[i].name.clone();
        tokio::task::spawn_blocking(move || ctl(&name, &["stop"]))
            .await
            .expect("rabbitmqctl did not panic")
            .expect("node stopped");
    }

    /// Closes every client connection to node `i`, and only to it (`rabbitmqctl
    /// close_all_connections` closes the whole cluster's), as a node under maintenance does.
    pub async fn close_connections(&self, i: usize) {
        let name = self.nodes[i].name.clone();
        tokio::task::spawn_blocking(move || {
            ctl(
                &name,
                &[
                    "eval",
                    r#"rabbit_networking:close_connections(rabbit_networking:connections_local(), "test: connections closed")."#,
                ],
            )
        })
        .await
        .expect("rabbitmqctl did not panic")
        .expect("connections closed");
    }
}

impl Drop for Cluster {
    /// Synchronous on purpose: the nodes must be gone before the test process can exit.
    fn drop(&mut self) {
        for node in &self.nodes {
            // A node stopped by the test (or never started) refuses; nothing to do then.
            let _ = ctl(&node.name, &["stop"]);
            let _ = std::fs::remove_dir_all(&node.dir);
        }
    }
}
