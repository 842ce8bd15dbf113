//! A TCP forwarder a test can cut and restore: a database that goes away and comes back for
//! one client only, not for the servers other tests share.

use std::net::SocketAddr;

use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::free_port;

/// `host:port` of a `postgres://user@host:port/db` URL.
pub fn postgres_address(url: &str) -> SocketAddr {
    let after_at = url.split_once('@').expect("a URL with a user").1;
    let address = after_at.split_once('/').map_or(after_at, |(a, _)| a);
    address.parse().expect("an IP address and port")
}

/// A TCP forwarder from a port of its own to Postgres, that the test can cut (every connection
/// dropped, new ones refused: the database is gone as far as the client can tell) and restore.
/// It affects only the client that connects through it, not the server other tests share.
pub struct Link {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    target: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Link {
    /// Forwards a port of its own to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let mut link = Self {
            port: free_port(),
            target,
            task: None,
        };
        link.restore().await;
        link
    }

    /// Listens again on the same port and forwards every connection.
    pub async fn restore(&mut self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(([127, 0, 0, 1], self.port).into()).unwrap();
        let listener = socket.listen(64).unwrap();
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            // Dropped with this task: aborting it closes every forwarded connection.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        }));
    }

    /// Closes the listener and every connection through it.
    pub fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut();
    }
}

/// `url` with its `host:port` replaced by `link`'s.
pub fn through(url: &str, link: &Link) -> String {
    url.replace(&postgres_address(url).to_string(), &format!("127.0.0.1:{}", link.port))
}
