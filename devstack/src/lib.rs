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
/// How many ports `free_port` tries before giving up.
const FREE_PORT_ATTEMPTS: usize = 64;
/// The lowest port `free_port` hands out (above the well-known and most registered ones).
const FREE_PORT_MIN: u16 = 10_000;

/// A TCP port on 127.0.0.1 that was free a moment ago, chosen at random **below the kernel's
/// ephemeral range** (`net.ipv4.ip_local_port_range`) and checked by binding it.
///
/// Below that range, because the kernel hands ephemeral ports to every outgoing connection:
/// a port of that range chosen for a server that binds it seconds later (Patroni, etcd, a
/// service under test) could meanwhile be the local end of some client's connection, which
/// happens often in a suite whose tests reconnect by the thousand during failovers. Another
/// process may still take the port first; the launchers retry on a new port when that
/// happens.
pub fn free_port() -> Result<u16> {
    let ephemeral_min = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_min <= FREE_PORT_MIN + 1_000 {
        // An unusual range that leaves nothing below it: take what the kernel gives.
        return kernel_port();
    }
    for _ in 0..FREE_PORT_ATTEMPTS {
        let port = FREE_PORT_MIN + (random() % u64::from(ephemeral_min - FREE_PORT_MIN)) as u16;
        if RESERVED_PORTS.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found in {FREE_PORT_ATTEMPTS} tries between {FREE_PORT_MIN} and {ephemeral_min}")
}

/// A port the kernel chooses (binds port 0), never a reserved one.
fn kernel_port() -> Result<u16> {
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

/// A random number from the standard library's per-process random hash keys and a counter (no
/// crate needed for choosing ports).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.finish()
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

    #[test]
    fn free_ports_lie_below_the_ephemeral_range_of_outgoing_connections() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let ephemeral_min: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        for _ in 0..100 {
            let port = free_port().unwrap();
            assert!((FREE_PORT_MIN..ephemeral_min).contains(&port), "{port}");
        }
    }
}
