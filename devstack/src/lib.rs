//! Ephemeral local services for tests and `cargo xtask up`, started from the
//! binaries installed on this Debian machine.
//!
//! This crate owns the lifecycle of:
//!
//! * [`Postgres`]: a PostgreSQL primary and optionally a streaming hot standby
//!   (initdb + pg_basebackup into a root folder of the caller's choosing);
//! * [`Nats`]: a NATS server with JetStream, which can be killed and restarted
//!   in place for fault-injection tests;
//! * [`HaPostgres`]: three Postgres nodes under Patroni (a private etcd holds the leader
//!   lock, replication is synchronous) behind HAProxy's read-write and read-only ports;
//! * [`NatsCluster`]: clustered NATS servers with JetStream.
//!
//! Each service listens on its own free 127.0.0.1 port (never the system
//! services' 5432/4222), keeps its data and logs under its root folder, is
//! health-checked before `start` returns, and is stopped with its root
//! deleted on `stop`/drop. Servers are spawned so that they cannot outlive the
//! process that started them (see `sys::spawn`), leaving no orphans even if
//! the process is killed.
//!
//! Everything is synchronous (std only) so it can be used from plain tests,
//! async tests and xtask alike.

mod binaries;
mod etcd;
mod http;
mod nats;
mod patroni;
mod postgres;
mod process;
mod sys;

use std::net::{Ipv4Addr, TcpListener};

use anyhow::{Context, Result, bail};

pub use nats::{Nats, NatsCluster};
pub use patroni::{HaOptions, HaPostgres, Member, kill_orphaned_postmasters};
pub use postgres::{PgOptions, Postgres, with_user};
pub use process::{READY_TIMEOUT_MS, SHUTDOWN_TIMEOUT_MS};

/// Ports of the system-wide Postgres and NATS on this machine; never handed out.
const RESERVED_PORTS: [u16; 2] = [5432, 4222];
/// How many times `free_port` asks the kernel before giving up.
const FREE_PORT_ATTEMPTS: usize = 16;

/// A TCP port on 127.0.0.1 that was free a moment ago: binds port 0, reads the
/// port the kernel chose, and releases it. Another process may take it before
/// the caller binds it; the launchers retry on a new port when that happens.
pub fn free_port() -> Result<u16> {
    for _ in 0..FREE_PORT_ATTEMPTS {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0 to find a free port")?;
        let port = listener.local_addr()?.port();
        if !RESERVED_PORTS.contains(&port) {
            return Ok(port);
        }
    }
    bail!("the kernel kept handing out reserved ports {RESERVED_PORTS:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_returns_a_bindable_port_that_is_not_a_system_service_port() {
        let port = free_port().unwrap();
        assert!(!RESERVED_PORTS.contains(&port));
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }
}
