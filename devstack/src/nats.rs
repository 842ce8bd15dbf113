//! An ephemeral NATS server with JetStream, which tests may kill and restart
//! on the same port and store to inject faults.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::Result;

use crate::free_port;
use crate::process;
use crate::sys;

/// Pause between restart attempts when the old port is briefly unavailable.
const RESTART_RETRY_DELAY_MS: u64 = 200;

/// A NATS server (`-js`) on its own port with its store under its root
/// folder; stopped and the folder deleted on drop.
#[derive(Debug)]
pub struct Nats {
    root: PathBuf,
    binary: PathBuf,
    /// A configuration file of ours (`nats.conf` in the root), when started with one.
    config: Option<PathBuf>,
    port: u16,
    monitor_port: u16,
    child: Option<Child>,
}

impl Nats {
    /// Runs `nats-server -js -a 127.0.0.1 -p PORT -sd root/store -m MONPORT`
    /// and waits until `GET /healthz` on the monitor port says ok.
    ///
    /// `root` must not exist or be empty: it is deleted on drop.
    pub fn start(root: &Path) -> Result<Nats> {
        Self::start_configured(root, None)
    }

    /// Like [`Nats::start`], with `config` (nats-server configuration syntax, e.g. an
    /// `authorization` block) written to `root/nats.conf` and passed with `-c`. The command
    /// line's listen address, ports and store still apply.
    pub fn start_with_config(root: &Path, config: &str) -> Result<Nats> {
        Self::start_configured(root, Some(config))
    }

    fn start_configured(root: &Path, config: Option<&str>) -> Result<Nats> {
        Self::start_node(root, config, false)
    }

    /// `clustered`: a member of a [`NatsCluster`], started before its peers, so its first
    /// start waits only for JetStream to be enabled, not for the cluster's meta leader (which
    /// needs a quorum).
    fn start_node(root: &Path, config: Option<&str>, clustered: bool) -> Result<Nats> {
        let binary = crate::binaries::nats_server()?;
        let root = process::prepare_root(root)?;
        // Dropping `nats` on an error deletes the root.
        let mut nats = Nats {
            root,
            binary,
            config: None,
            port: 0,
            monitor_port: 0,
            child: None,
        };
        if let Some(text) = config {
            // It may hold passwords: readable by this user only.
            let path = nats.root.join("nats.conf");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(text.as_bytes())?;
            nats.config = Some(path);
        }
        let (child, (port, monitor_port)) = nats.launch(|| Ok((free_port()?, free_port()?)), clustered)?;
        nats.child = Some(child);
        nats.port = port;
        nats.monitor_port = monitor_port;
        Ok(nats)
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port (`/healthz`, `/varz`, `/jsz`, ...).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// The folder holding the JetStream store and `nats.log`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the server process is currently running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// SIGKILL, leaving the store as a crash would (for fault-injection tests).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill_group_and_reap(&mut child);
        }
    }

    /// Graceful stop (SIGTERM), waiting up to [`crate::SHUTDOWN_TIMEOUT_MS`]
    /// before SIGKILL. The store is kept, so [`Nats::restart`] can resume it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::shutdown(&mut child, sys::SIGTERM);
        }
    }

    /// Starts the server again on the same client port and store (stopping it
    /// first if it still runs) and waits until it is healthy.
    ///
    /// The client port cannot change, since clients reconnect to it; if it is
    /// momentarily taken the attempt is repeated. The monitor port is private
    /// to us, so a fresh one is picked when the old one is gone.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let port = self.port;
        let mut previous_monitor_port = Some(self.monitor_port);
        let mut first_attempt = true;
        let (child, (_, monitor_port)) = self.launch(
            || {
                if !std::mem::take(&mut first_attempt) {
                    thread::sleep(Duration::from_millis(RESTART_RETRY_DELAY_MS));
                }
                let monitor_port = match previous_monitor_port.take() {
                    Some(monitor_port) => monitor_port,
                    None => free_port()?,
                };
                Ok((port, monitor_port))
            },
            false,
        )?;
        self.child = Some(child);
        self.monitor_port = monitor_port;
        Ok(())
    }

    /// Whether `GET /healthz` says ok: JetStream is up and, in a cluster, has a meta leader
    /// and its streams are current on this node.
    pub fn is_healthy(&self) -> bool {
        healthz_ok(self.monitor_port, "/healthz")
    }

    /// Spawns nats-server on the ports `choose_ports` gives (client, monitor)
    /// and waits for /healthz, retrying when a port was taken. `first_of_cluster`: wait only
    /// until JetStream is enabled (its peers are not up yet, so there is no quorum).
    fn launch(
        &self,
        choose_ports: impl FnMut() -> Result<(u16, u16)>,
        first_of_cluster: bool,
    ) -> Result<(Child, (u16, u16))> {
        let probe = if first_of_cluster {
            "/healthz?js-enabled-only=true"
        } else {
            "/healthz"
        };
        let store = self.root.join("store");
        process::start_server(
            "nats-server",
            &self.root.join("nats.log"),
            choose_ports,
            |(port, monitor_port), log| {
                let mut command = Command::new(&self.binary);
                if let Some(config) = &self.config {
                    command.arg("-c").arg(config);
                }
                command
                    .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
                    .arg("-sd")
                    .arg(&store)
                    .args(["-m", &monitor_port.to_string()])
                    .current_dir(&self.root)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log);
                Ok(sys::spawn(command)?)
            },
            |(_, monitor_port)| healthz_ok(monitor_port, probe),
        )
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
        process::remove_root(&self.root);
    }
}

/// True on a 200 to `GET path` (a `/healthz`) whose body says ok.
fn healthz_ok(monitor_port: u16, path: &str) -> bool {
    crate::http::get(monitor_port, path).is_ok_and(|r| r.status == 200 && r.body.contains("\"ok\""))
}

/// How long a fresh cluster has to elect its JetStream meta leader.
const CLUSTER_FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// NATS servers clustered with each other (full mesh of routes, JetStream clustered), each a
/// [`Nats`] of its own that a test may kill and restart. Clients take [`NatsCluster::urls`]
/// and learn the rest from the servers.
#[derive(Debug)]
pub struct NatsCluster {
    root: PathBuf,
    nodes: Vec<Nats>,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        // Each server stops and deletes its own folder; then the cluster's.
        self.nodes.clear();
        process::remove_root(&self.root);
    }
}

impl NatsCluster {
    /// Starts `size` servers under `root/n1`, `root/n2`, ..., each with `config` (e.g. an
    /// `authorization` block) and the cluster block, and waits until every one is healthy
    /// (a meta leader elected).
    pub fn start(root: &Path, size: usize, config: &str) -> Result<NatsCluster> {
        anyhow::ensure!(size >= 1, "a NATS cluster needs at least one server");
        let root = process::prepare_root(root)?;
        let route_ports = (0..size).map(|_| free_port()).collect::<Result<Vec<u16>>>()?;
        let routes = route_ports
            .iter()
            .map(|port| format!("nats-route://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut cluster = NatsCluster {
            root: root.clone(),
            nodes: Vec::new(),
        };
        for (i, route_port) in route_ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let node_config = format!(
                "{config}\nserver_name: {name}\ncluster {{\n  name: tally\n  listen: 127.0.0.1:{route_port}\n  routes: [{routes}]\n}}\n"
            );
            cluster
                .nodes
                .push(Nats::start_node(&root.join(&name), Some(&node_config), true)?);
        }
        let deadline = std::time::Instant::now() + CLUSTER_FORM_TIMEOUT;
        while !cluster.nodes.iter().all(Nats::is_healthy) {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the NATS cluster under {} formed no JetStream meta leader within {CLUSTER_FORM_TIMEOUT:?}; see its nats.log files",
                root.display()
            );
            thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    /// Every server's client URL, comma-separated (what `TALLY_NATS_URL` takes).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(Nats::url).collect::<Vec<_>>().join(",")
    }

    /// The servers, in start order (`n1` first).
    pub fn nodes(&mut self) -> &mut [Nats] {
        &mut self.nodes
    }
}
