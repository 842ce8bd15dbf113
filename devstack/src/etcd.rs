//! A single-member etcd: the consensus store Patroni keeps its leader lock in.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Result;

use crate::{binaries, free_port, http, process, sys};

/// Debian's `etcd-server` package holds the server binary.
const ETCD_BINARY: &str = "etcd";
const ETCD_PACKAGE: &str = "etcd-server";

/// A running etcd under `root/etcd` with its log in `root/etcd.log`; killed on drop (its data
/// goes with the root of whoever owns it).
#[derive(Debug)]
pub(crate) struct Etcd {
    child: Option<Child>,
    client_port: u16,
}

impl Etcd {
    /// Starts etcd on two free ports (client, peer) and waits until `/health` says true.
    pub(crate) fn start(root: &Path) -> Result<Etcd> {
        let binary = binaries::program(ETCD_BINARY, ETCD_PACKAGE)?;
        let data = root.join("etcd");
        let (child, (client_port, _)) = process::start_server(
            "etcd",
            &root.join("etcd.log"),
            || Ok((free_port()?, free_port()?)),
            |(client, peer), log| {
                let client_url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let mut command = Command::new(&binary);
                command
                    .args(["--name", "etcd1", "--data-dir"])
                    .arg(&data)
                    .args([
                        "--listen-client-urls",
                        &client_url,
                        "--advertise-client-urls",
                        &client_url,
                    ])
                    .args([
                        "--listen-peer-urls",
                        &peer_url,
                        "--initial-advertise-peer-urls",
                        &peer_url,
                    ])
                    .args(["--initial-cluster", &format!("etcd1={peer_url}")])
                    .current_dir(root)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log);
                Ok(sys::spawn(command)?)
            },
            |(client, _)| http::get(client, "/health").is_ok_and(|r| r.status == 200 && r.body.contains("true")),
        )?;
        Ok(Etcd {
            child: Some(child),
            client_port,
        })
    }

    /// `127.0.0.1:PORT`, the form Patroni's `etcd3.hosts` takes.
    pub(crate) fn host(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::shutdown(&mut child, sys::SIGTERM);
        }
    }
}
