//! A TCP proxy a test can cut and restore: what a network partition looks like to the worker.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    addr: SocketAddr,
    up: watch::Sender<bool>,
    silent: watch::Sender<u64>,
    /// Bumped by [`Proxy::end_silent`]: the silent connections born before close.
    ended: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards `from` to `to` until either end closes or the proxy is cut (false), or it falls
/// silent (true). Both are looked at after each read and before its write: bytes that arrive
/// once [`Proxy::silence`] or [`Proxy::cut`] has returned (a reply to what the test unlocks
/// next) never pass, however the tasks are scheduled.
async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    (up, silence): (&watch::Receiver<bool>, &watch::Receiver<u64>),
    born: u64,
) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if *silence.borrow() > born {
            return true;
        }
        if !*up.borrow() {
            return false;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return false;
        }
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let up = watch::Sender::new(true);
        let state = up.subscribe();
        let silent = watch::Sender::new(0u64);
        let silence = silent.subscribe();
        let ended = watch::Sender::new(0u64);
        let ending = ended.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut state = state.clone();
                let mut silence = silence.clone();
                let born = *silence.borrow();
                let mut ending = ending.clone();
                let born_ended = *ending.borrow();
                if !*state.borrow() {
                    // Cut: accept and drop at once, like a refused connection.
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut client = client;
                    let went_silent = {
                        let (mut from_client, mut to_client) = client.split();
                        let (mut from_server, mut to_server) = server.split();
                        let heard = (state.clone(), silence.clone());
                        tokio::select! {
                            s = pump(&mut from_client, &mut to_server, (&heard.0, &heard.1), born) => s,
                            s = pump(&mut from_server, &mut to_client, (&heard.0, &heard.1), born) => s,
                            _ = state.wait_for(|up| !*up) => false,
                            r = silence.wait_for(|g| *g > born) => r.is_ok(),
                        }
                    };
                    if went_silent {
                        // Silent: both ends stay open and nothing more passes, until TCP gives
                        // up at last (`end_silent`).
                        let _keep = (client, server);
                        let _ = ending.wait_for(|g| *g > born_ended).await;
                    }
                });
            }
        });
        Self {
            addr,
            up,
            silent,
            ended,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// The connections open now stop passing anything, without closing; new ones work.
    pub fn silence(&self) {
        self.silent.send_modify(|g| *g += 1);
    }

    /// Closes the connections gone silent, as TCP does when it gives up on them at last.
    pub fn end_silent(&self) {
        self.ended.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// The `host:port` of a URL like `amqp://user:pass@host:port/vhost`.
pub fn target_of(url: &str) -> SocketAddr {
    let after_scheme = url.split("://").nth(1).expect("a URL");
    let authority = after_scheme.split('/').next().expect("an authority");
    let host_port = authority.rsplit('@').next().expect("host:port");
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().expect("a numeric host:port in the URL")
}

/// The same URL with its host:port replaced by the proxy's.
pub fn through(url: &str, proxy: &Proxy) -> String {
    let original = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|authority| authority.rsplit('@').next())
        .expect("host:port")
        .to_owned();
    url.replacen(&original, &format!("127.0.0.1:{}", proxy.port()), 1)
}
