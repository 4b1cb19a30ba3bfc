//! The RabbitMQ nodes `AMQP_URL` names: one URL, or a cluster's nodes separated by commas.
//!
//! Every command that talks to RabbitMQ connects through [`AmqpNodes::connect`], so the worker,
//! `enqueue`, `dead-letters`, `check-config`, `bench` and [`crate::sms_client`] all accept the
//! same list. Nodes are tried in turn from a given one: a caller that lost node `k` starts at
//! `k + 1`, so a dead node is not waited for first on every reconnect.

use std::fmt;
use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::config::host_of;

/// How long one node may take to accept a connection before the next is tried. A healthy node
/// answers in milliseconds; a host that drops packets would otherwise hold the caller for the
/// kernel's TCP timeout (minutes) on every reconnect.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest frame the worker asks for, unless `AMQP_URL` says `frame_max=`. Jobs and
/// results are a few hundred bytes; lapin keeps receive and send buffers of 32 frames each,
/// so at RabbitMQ's default of 128 KiB a connection holds 8 MiB of buffers (a sixth of the
/// worker's memory), and at 16 KiB it holds 1 MiB. A larger body is only split into more
/// frames; a message's properties and headers, which AMQP cannot split, must fit in one (see
/// docs/wire-contract.md, "Delivery guarantees").
const FRAME_MAX: u32 = 16 * 1024;

/// The AMQP heartbeat the worker asks for, in seconds, unless `AMQP_URL` says `heartbeat=`. A
/// connection gone silent (a partition, a load balancer that lost its node and keeps the
/// socket open) raises no error: it is known lost when nothing, heartbeats included, has come
/// for two of these. At RabbitMQ's default of 60 s that is two minutes, in which the jobs the
/// worker holds (up to its prefetch) wait on both sides, and a login code is late. RabbitMQ
/// advises 5 to 20 s.
const HEARTBEAT_SECS: u16 = 10;

#[derive(Clone)]
struct Node {
    /// The node's URL, parsed, with [`FRAME_MAX`] when it names no frame size and
    /// [`HEARTBEAT_SECS`] when it names no heartbeat. Holds the
    /// password: never printed (`host` is what logs show).
    uri: AMQPUri,
    /// `host:port`, what logs and errors show instead of the URL.
    host: String,
}

/// The configured nodes, in the operator's order. Prints as `host:port` only.
#[derive(Clone)]
pub struct AmqpNodes {
    nodes: Vec<Node>,
}

/// A live connection and which node of the list it went to.
pub struct Connected {
    pub connection: Connection,
    pub node: usize,
}

/// Every node refused or did not answer; one entry per node tried, `host:port: why`.
#[derive(Debug, thiserror::Error)]
#[error("could not connect to any RabbitMQ node ({})", .failures.join("; "))]
pub struct ConnectError {
    failures: Vec<String>,
}

impl AmqpNodes {
    /// Parses `amqp[s]://…` URLs separated by commas (a comma inside a password is written
    /// `%2C`). The error names the entry, never its credentials.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let entries: Vec<&str> = raw.split(',').map(str::trim).collect();
        let count = entries.len();
        let nodes = entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                let which = if count == 1 {
                    String::new()
                } else {
                    format!("node {} of {count}: ", i + 1)
                };
                if entry.is_empty() {
                    return Err(format!("{which}empty entry (two commas, or a comma at an end)"));
                }
                let mut uri: AMQPUri = entry.parse().map_err(|e: String| {
                    // The URL parser quotes the whole input in some errors: password included.
                    let e = e.replace(entry, &host_of(entry));
                    format!(
                        "{which}{} is not an AMQP URL (amqp[s]://user:password@host:port/vhost): {e}",
                        host_of(entry)
                    )
                })?;
                uri.query.frame_max.get_or_insert(FRAME_MAX);
                uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
                Ok(Node {
                    host: format!("{}:{}", uri.authority.host, uri.authority.port),
                    uri,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { nodes })
    }

    /// The same nodes, each taking the largest frame its server allows, up to 1 MiB: for a
    /// client that must read whatever a queue holds (`dead-letters`), whose headers the
    /// worker's 16 KiB frames may not carry. Bounded, because lapin keeps 32 frames of buffer
    /// and a server without a limit would otherwise have it size them at 4 GiB.
    pub fn with_server_frame_max(&self) -> Self {
        const LARGEST: u32 = 1 << 20;
        let mut nodes = self.nodes.clone();
        for node in &mut nodes {
            node.uri.query.frame_max = Some(LARGEST);
        }
        Self { nodes }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `host:port` of node `node` (counted from 0, wrapping).
    pub fn host(&self, node: usize) -> &str {
        &self.nodes[node % self.nodes.len()].host
    }

    /// Connects to the first node that answers, trying them in order from `start` (wrapping).
    /// `name` is the connection name RabbitMQ shows.
    pub async fn connect(&self, name: &str, start: usize) -> Result<Connected, ConnectError> {
        crate::tls::install_crypto_provider();
        let mut failures = Vec::new();
        for step in 0..self.nodes.len() {
            let node = (start + step) % self.nodes.len();
            let Node { uri, host, .. } = &self.nodes[node];
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            let attempt = tokio::time::timeout(
                NODE_CONNECT_TIMEOUT,
                Connection::connect_uri(uri.clone(), properties),
            )
            .await;
            match attempt {
                Ok(Ok(connection)) => {
                    if !failures.is_empty() {
                        tracing::info!(node = %host, skipped = %failures.join("; "), "connected to the next RabbitMQ node");
                    }
                    return Ok(Connected { connection, node });
                }
                Ok(Err(e)) => failures.push(format!("{host}: {e}{}", hint(&e.to_string()))),
                Err(_) => {
                    failures.push(format!("{host}: no answer within {NODE_CONNECT_TIMEOUT:?}"))
                }
            }
        }
        Err(ConnectError { failures })
    }
}

/// What to check when a node answered but would not have us: these look like an outage in a
/// log that repeats them every few seconds, and are a setting to fix.
fn hint(error: &str) -> &'static str {
    if error.contains("ACCESS_REFUSED") {
        " — the node refused the login: check the user and password in AMQP_URL"
    } else if error.contains("NOT_ALLOWED") {
        " — the node refused the vhost: check that it exists and the user may use it (the path of AMQP_URL)"
    } else {
        ""
    }
}

impl fmt::Display for AmqpNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<&str> = self.nodes.iter().map(|n| n.host.as_str()).collect();
        f.write_str(&hosts.join(", "))
    }
}

impl fmt::Debug for AmqpNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpNodes[{self}]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_or_a_list_parses_and_prints_without_credentials() {
        let one = AmqpNodes::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one.to_string(), "127.0.0.1:5672");
        let three = AmqpNodes::parse(
            "amqp://u:s3cret@rabbit-1:5672/%2f, amqp://u:s3cret@rabbit-2/%2f,amqps://u:s3cret@rabbit-3",
        )
        .unwrap();
        assert_eq!(three.len(), 3);
        assert_eq!(
            three.to_string(),
            "rabbit-1:5672, rabbit-2:5672, rabbit-3:5671"
        );
        assert_eq!(three.host(4), "rabbit-2:5672", "wraps round");
        assert!(!format!("{three:?}").contains("s3cret"));
    }

    #[test]
    fn a_url_without_a_heartbeat_asks_for_ten_seconds_and_one_with_its_own_keeps_it() {
        let nodes = AmqpNodes::parse(
            "amqp://guest:guest@127.0.0.1:5672/%2f,amqp://guest:guest@127.0.0.2:5672/%2f?heartbeat=30",
        )
        .unwrap();
        let heartbeats: Vec<_> = nodes.nodes.iter().map(|n| n.uri.query.heartbeat).collect();
        assert_eq!(heartbeats, [Some(10), Some(30)]);
    }

    #[test]
    fn a_bad_entry_is_named_and_its_password_never_shown() {
        for (raw, expect) in [
            (
                "amqp://u:s3cret@a:5672,,amqp://u:s3cret@b:5672",
                "node 2 of 3: empty",
            ),
            ("amqp://u:s3cret@a:5672,", "node 2 of 2: empty"),
            ("amqp://u:s3cret@a:5672,http://u:s3cret@b:80", "node 2 of 2"),
            ("amqp://u:s3cret@a:5672,u:s3cret@b", "node 2 of 2"),
            ("amqp://u:s3cret@a:99999", "a:99999"),
            ("", "empty"),
        ] {
            let err = AmqpNodes::parse(raw).unwrap_err();
            assert!(err.contains(expect), "{raw:?}: {err}");
            assert!(!err.contains("s3cret"), "{raw:?}: {err}");
        }
    }

    #[tokio::test]
    async fn connecting_skips_nodes_that_refuse_and_says_why_when_all_do() {
        let closed = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (a, b) = (closed(), closed());
        let nodes = AmqpNodes::parse(&format!(
            "amqp://u:s3cret@127.0.0.1:{a}/%2f,amqp://u:s3cret@127.0.0.1:{b}/%2f"
        ))
        .unwrap();
        let err = nodes
            .connect("test", 1)
            .await
            .err()
            .expect("nobody listens");
        let text = err.to_string();
        let (pa, pb) = (
            text.find(&format!(":{a}:")).expect("node a tried"),
            text.find(&format!(":{b}:")).expect("node b tried"),
        );
        assert!(pb < pa, "started at the second node: {text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
