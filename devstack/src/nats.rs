//! An ephemeral NATS server with JetStream, which tests may kill and restart
//! on the same port and store to inject faults.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::Result;

use crate::free_port;
use crate::process;
use crate::sys;

/// Timeout for each of connect, write and read of one /healthz probe.
const HEALTHZ_IO_TIMEOUT_MS: u64 = 1_000;
/// A healthz response is a status line, a few headers and `{"status":"ok"}`.
const HEALTHZ_MAX_RESPONSE_BYTES: u64 = 16 * 1024;
/// Pause between restart attempts when the old port is briefly unavailable.
const RESTART_RETRY_DELAY_MS: u64 = 200;

/// A NATS server (`-js`) on its own port with its store under its root
/// folder; stopped and the folder deleted on drop.
#[derive(Debug)]
pub struct Nats {
    root: PathBuf,
    binary: &'static Path,
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
        let (child, (port, monitor_port)) = nats.launch(|| Ok((free_port()?, free_port()?)))?;
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
        let (child, (_, monitor_port)) = self.launch(|| {
            if !std::mem::take(&mut first_attempt) {
                thread::sleep(Duration::from_millis(RESTART_RETRY_DELAY_MS));
            }
            let monitor_port = match previous_monitor_port.take() {
                Some(monitor_port) => monitor_port,
                None => free_port()?,
            };
            Ok((port, monitor_port))
        })?;
        self.child = Some(child);
        self.monitor_port = monitor_port;
        Ok(())
    }

    /// Spawns nats-server on the ports `choose_ports` gives (client, monitor)
    /// and waits for /healthz, retrying when a port was taken.
    fn launch(&self, choose_ports: impl FnMut() -> Result<(u16, u16)>) -> Result<(Child, (u16, u16))> {
        let store = self.root.join("store");
        process::start_server(
            "nats-server",
            &self.root.join("nats.log"),
            choose_ports,
            |(port, monitor_port), log| {
                let mut command = Command::new(self.binary);
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
            |(_, monitor_port)| healthz_ok(monitor_port),
        )
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
        process::remove_root(&self.root);
    }
}

/// `GET /healthz` over plain HTTP/1.0 (so the server closes the connection
/// and we can read to the end); true on a 200 whose body says ok.
fn healthz_ok(monitor_port: u16) -> bool {
    let probe = || -> std::io::Result<bool> {
        let timeout = Duration::from_millis(HEALTHZ_IO_TIMEOUT_MS);
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, monitor_port));
        let mut stream = TcpStream::connect_timeout(&address, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.take(HEALTHZ_MAX_RESPONSE_BYTES).read_to_string(&mut response)?;
        let status_ok = response
            .lines()
            .next()
            .is_some_and(|status| status.split_whitespace().nth(1) == Some("200"));
        Ok(status_ok && response.contains("\"ok\""))
    };
    probe().unwrap_or(false)
}
