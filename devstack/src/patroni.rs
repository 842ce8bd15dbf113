//! A highly available PostgreSQL: three nodes managed by Patroni (leader lock in a private
//! etcd, `synchronous_mode_strict`: a commit is acknowledged only once a standby has it), and
//! HAProxy routing a read-write port to the leader and a read-only port to the replicas by
//! Patroni's REST health checks (`/primary`, `/replica`).
//!
//! Tests use it to kill the leader's Postgres, a whole node, or to switch over, under load.
//! Patroni starts Postgres in a session of its own, so a node is stopped by stopping Patroni
//! (which stops its Postgres) and then, should that fail, by killing the postmaster named in
//! the data folder's `postmaster.pid`.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::binaries::{self, PostgresBinaries};
use crate::etcd::Etcd;
use crate::postgres::{POSTGRES_USER, SUPERUSER};
use crate::sys::{self, Account};
use crate::{free_port, http, process};

/// Patroni's scope (the cluster's name in etcd and in `patronictl`).
const SCOPE: &str = "tally";
/// Seconds the leader lock lives without renewal: how long a dead leader's machine holds up a
/// failover. Patroni refuses less than 20.
const TTL_S: u32 = 20;
/// Seconds between Patroni's checks of its node.
const LOOP_WAIT_S: u32 = 2;
/// Seconds Patroni retries etcd and Postgres before it gives up its lock.
const RETRY_TIMEOUT_S: u32 = 5;
/// How long a fresh cluster has to elect a leader and stream to every standby.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long Patroni may take to answer a switchover request.
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(90);
/// HAProxy's health-check interval (ms): how soon the router follows a new leader.
const CHECK_INTERVAL_MS: u32 = 500;

/// How to start the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaOptions {
    /// Postgres nodes (one leader, the rest standbys).
    pub nodes: usize,
    /// `false` turns off fsync (fast; a process crash still loses nothing, an OS crash would).
    /// Synchronous replication stays on either way, and full-page writes too (pg_rewind,
    /// which brings a failed leader back as a standby, needs them).
    pub durable: bool,
}

impl Default for HaOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            durable: false,
        }
    }
}

/// One Patroni-managed Postgres node.
#[derive(Debug)]
struct Node {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    pg_port: u16,
    rest_port: u16,
    patroni: Option<Child>,
}

/// A member as Patroni's `/cluster` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// `leader`, `sync_standby`, `replica`, ...
    pub role: String,
    /// `running`, `streaming`, `starting`, `stopped`, `crashed`, ...
    pub state: String,
    pub timeline: Option<i64>,
}

/// The cluster, its etcd and its router; stopped and its root deleted on drop.
#[derive(Debug)]
pub struct HaPostgres {
    root: PathBuf,
    account: Option<Account>,
    nodes: Vec<Node>,
    haproxy: Option<Child>,
    rw_port: u16,
    ro_port: u16,
    // Declared last: dropped after the nodes, which need it to let go of their lock.
    etcd: Option<Etcd>,
}

impl HaPostgres {
    /// Starts etcd, `opts.nodes` Patroni nodes and HAProxy under `root`, and waits until a
    /// leader runs, a synchronous standby streams from it and the read-write port reaches it.
    pub fn start(root: &Path, opts: HaOptions) -> Result<HaPostgres> {
        anyhow::ensure!(opts.nodes >= 2, "synchronous replication needs at least two nodes");
        let postgres = binaries::postgres()?;
        let patroni = binaries::program("patroni", "patroni")?;
        let haproxy = binaries::program("haproxy", "haproxy")?;
        let account = if sys::is_root() {
            Some(sys::lookup_user(POSTGRES_USER)?.with_context(|| {
                format!("running as root, but there is no `{POSTGRES_USER}` user to run Patroni and Postgres as")
            })?)
        } else {
            None
        };
        let root = process::prepare_root(root)?;
        if let Some(account) = account {
            process::check_traversable(&root, account, POSTGRES_USER)?;
        }
        let mut cluster = HaPostgres {
            root: root.clone(),
            account,
            nodes: Vec::new(),
            haproxy: None,
            rw_port: 0,
            ro_port: 0,
            etcd: None,
        };
        let etcd = Etcd::start(&root)?;
        for i in 1..=opts.nodes {
            let name = format!("pg{i}");
            let dir = root.join(&name);
            process::create_data_dir(&dir, account)?;
            let node = Node {
                config: root.join(format!("{name}.yml")),
                log: root.join(format!("{name}.log")),
                pg_port: free_port()?,
                rest_port: free_port()?,
                name,
                dir,
                patroni: None,
            };
            std::fs::write(&node.config, patroni_config(&node, &etcd.host(), postgres, opts))
                .with_context(|| format!("writing {}", node.config.display()))?;
            cluster.nodes.push(node);
        }
        cluster.etcd = Some(etcd);
        for i in 0..cluster.nodes.len() {
            cluster.spawn_patroni(i, &patroni)?;
            // The first node bootstraps alone; the others then clone it.
            if i == 0 {
                cluster.wait_for(BOOTSTRAP_TIMEOUT, "the first node to bootstrap and lead", |members| {
                    members.iter().any(|m| m.role == "leader" && m.state == "running")
                })?;
            }
        }
        cluster.start_haproxy(&haproxy)?;
        cluster.wait_healthy(BOOTSTRAP_TIMEOUT)?;
        Ok(cluster)
    }

    /// `postgres://postgres@127.0.0.1:RW/DATABASE`: the leader, through HAProxy.
    pub fn primary_url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.rw_port)
    }

    /// `postgres://postgres@127.0.0.1:RO/DATABASE`: the standbys, through HAProxy.
    pub fn replica_url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.ro_port)
    }

    /// HAProxy's read-write and read-only ports.
    pub fn router_ports(&self) -> (u16, u16) {
        (self.rw_port, self.ro_port)
    }

    /// Every node's Patroni REST endpoint (`http://127.0.0.1:PORT`), in node order.
    pub fn patroni_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("http://127.0.0.1:{}", n.rest_port))
            .collect()
    }

    /// The folder holding every node's data and log, and etcd's and HAProxy's.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The members as the first answering node's Patroni reports them.
    pub fn members(&self) -> Result<Vec<Member>> {
        let mut last_error = None;
        for node in &self.nodes {
            match http::get(node.rest_port, "/cluster") {
                Ok(response) if response.status == 200 => return parse_members(&response.body),
                Ok(response) => last_error = Some(anyhow::anyhow!("{}: {}", response.status, response.body)),
                Err(error) => last_error = Some(error.into()),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no node"))
            .context("asking Patroni for the cluster"))
    }

    /// The leader's name, if one runs.
    pub fn leader(&self) -> Result<Option<String>> {
        Ok(self
            .members()?
            .into_iter()
            .find(|m| m.role == "leader" && m.state == "running")
            .map(|m| m.name))
    }

    /// Waits until a leader runs with a synchronous standby, every node whose Patroni runs is
    /// a running member, and the read-write port reaches the leader.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let expected = self.nodes.iter().filter(|n| n.patroni.is_some()).count();
        self.wait_for(
            timeout,
            "a leader, a synchronous standby and every node running",
            |members| {
                let running = |m: &&Member| matches!(m.state.as_str(), "running" | "streaming");
                members.iter().filter(running).count() >= expected
                    && members.iter().any(|m| m.role == "leader" && running(&m))
                    && members.iter().any(|m| m.role == "sync_standby" && running(&m))
            },
        )?;
        let deadline = Instant::now() + timeout;
        while !self.pg_ready(self.rw_port) {
            if Instant::now() > deadline {
                bail!(
                    "HAProxy's read-write port {} reaches no leader; see {}",
                    self.rw_port,
                    self.root.display()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// SIGKILLs the Postgres of node `name` (its postmaster), leaving Patroni running: Patroni
    /// restarts it (crash recovery) or, if that takes too long, another node takes over.
    pub fn kill_postgres(&self, name: &str) -> Result<()> {
        let node = self.node(name)?;
        let pid = postmaster_pid(&node.dir).with_context(|| format!("{name} runs no Postgres"))?;
        sys::signal_process(pid, sys::SIGKILL).with_context(|| format!("kill -9 {pid} ({name}'s postmaster)"))?;
        Ok(())
    }

    /// SIGKILLs node `name` whole, Patroni and Postgres, as if its machine died: its leader
    /// lock expires after the TTL, then a synchronous standby takes over.
    pub fn kill_node(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        if let Some(mut patroni) = self.nodes[i].patroni.take() {
            process::kill_group_and_reap(&mut patroni);
        }
        if let Some(pid) = postmaster_pid(&self.nodes[i].dir) {
            kill_server(pid);
        }
        Ok(())
    }

    /// Starts node `name` again (after [`HaPostgres::kill_node`]): it rejoins as a standby,
    /// rewinding its data where its timeline diverged.
    pub fn restart_node(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        anyhow::ensure!(self.nodes[i].patroni.is_none(), "{name} is running");
        let patroni = binaries::program("patroni", "patroni")?;
        self.spawn_patroni(i, &patroni)
    }

    /// A planned switchover (what `patronictl switchover` does): the leader hands over to its
    /// synchronous standby. Returns the new leader's name once it runs.
    pub fn switchover(&self) -> Result<String> {
        let members = self.members()?;
        let leader = members
            .iter()
            .find(|m| m.role == "leader")
            .context("no leader to switch over from")?;
        let candidate = members
            .iter()
            .find(|m| m.role == "sync_standby")
            .context("no synchronous standby to switch over to")?;
        let body = serde_json::json!({ "leader": leader.name, "candidate": candidate.name }).to_string();
        let node = self.node(&leader.name)?;
        // Patroni answers once the candidate leads (or the switchover failed).
        let response = http::request(node.rest_port, "POST", "/switchover", Some(&body), SWITCHOVER_TIMEOUT)?;
        if response.status != 200 {
            bail!("switchover refused ({}): {}", response.status, response.body);
        }
        let candidate = candidate.name.clone();
        self.wait_for(BOOTSTRAP_TIMEOUT, "the switchover's candidate to lead", |members| {
            members
                .iter()
                .any(|m| m.name == candidate && m.role == "leader" && m.state == "running")
        })?;
        Ok(candidate)
    }

    /// Turns synchronous replication on or off for the whole cluster (Patroni's dynamic
    /// configuration, `PATCH /config`), and waits until the members show it: a synchronous
    /// standby, or none. For measuring what synchronous commits cost.
    pub fn set_synchronous(&self, on: bool) -> Result<()> {
        let body = serde_json::json!({ "synchronous_mode": on, "synchronous_mode_strict": on }).to_string();
        let leader = self.leader()?.context("no leader to configure")?;
        let node = self.node(&leader)?;
        let response = http::request(node.rest_port, "PATCH", "/config", Some(&body), SWITCHOVER_TIMEOUT)?;
        if response.status != 200 {
            bail!("PATCH /config refused ({}): {}", response.status, response.body);
        }
        let what = if on {
            "a synchronous standby"
        } else {
            "no synchronous standby"
        };
        self.wait_for(BOOTSTRAP_TIMEOUT, what, |members| {
            members.iter().any(|m| m.role == "sync_standby") == on
        })
    }

    fn node(&self, name: &str) -> Result<&Node> {
        Ok(&self.nodes[self.index(name)?])
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node named {name}"))
    }

    fn spawn_patroni(&mut self, i: usize, patroni: &Path) -> Result<()> {
        let node = &self.nodes[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("opening {}", node.log.display()))?;
        let mut command = Command::new(patroni);
        command
            .arg(&node.config)
            .current_dir(&node.dir)
            .env("HOME", &node.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PG") {
                command.env_remove(name);
            }
        }
        if let Some(account) = self.account {
            command.uid(account.uid).gid(account.gid);
        }
        let child = sys::spawn(command).with_context(|| format!("starting Patroni for {}", node.name))?;
        self.nodes[i].patroni = Some(child);
        Ok(())
    }

    fn start_haproxy(&mut self, haproxy: &Path) -> Result<()> {
        let config_path = self.root.join("haproxy.cfg");
        let nodes = &self.nodes;
        let (child, (rw, ro)) = process::start_server(
            "haproxy",
            &self.root.join("haproxy.log"),
            || Ok((free_port()?, free_port()?)),
            |(rw, ro), log| {
                std::fs::write(&config_path, haproxy_config(nodes, rw, ro))?;
                let mut command = Command::new(haproxy);
                command
                    .arg("-db")
                    .arg("-f")
                    .arg(&config_path)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log);
                Ok(sys::spawn(command)?)
            },
            |(rw, _)| std::net::TcpStream::connect(("127.0.0.1", rw)).is_ok(),
        )?;
        self.haproxy = Some(child);
        self.rw_port = rw;
        self.ro_port = ro;
        Ok(())
    }

    /// Polls `/cluster` until `done` holds for the members, failing after `timeout` with the
    /// last answer.
    fn wait_for(&self, timeout: Duration, what: &str, done: impl Fn(&[Member]) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = match self.members() {
                Ok(members) if done(&members) => return Ok(()),
                Ok(members) => format!("{members:?}"),
                Err(error) => format!("{error:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "waited {timeout:?} for {what}; last seen: {seen}; logs in {}",
                    self.root.display()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn pg_ready(&self, port: u16) -> bool {
        let Ok(binaries) = binaries::postgres() else {
            return false;
        };
        let mut command = Command::new(&binaries.pg_isready);
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
                "-q",
                "-t",
                "2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        sys::spawn(command)
            .and_then(|mut child| child.wait())
            .is_ok_and(|status| status.success())
    }

    fn shutdown(&mut self) {
        let _ = self
            .haproxy
            .take()
            .map(|mut child| process::kill_group_and_reap(&mut child));
        // Every Patroni at once (each stops its Postgres), then whatever is left by force.
        for node in &mut self.nodes {
            if let Some(child) = &node.patroni {
                let _ = sys::signal_process(child.id(), sys::SIGTERM);
            }
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.patroni.take() {
                process::shutdown(&mut child, sys::SIGTERM);
            }
            if let Some(pid) = postmaster_pid(&node.dir) {
                kill_server(pid);
            }
        }
        self.etcd.take();
        if !self.root.as_os_str().is_empty() {
            process::remove_root(&self.root);
            self.root = PathBuf::new();
        }
    }

    /// Stops HAProxy, every node and etcd, then deletes the root.
    pub fn stop(mut self) {
        self.shutdown();
    }
}

impl Drop for HaPostgres {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The postmaster's pid from `DIR/data/postmaster.pid`, if that postmaster still runs.
///
/// The file outlives a killed server, and its pid may since have gone to another process: only
/// a live process whose working folder is this data folder (a postmaster changes into it at
/// start) is taken for this node's postmaster, so nothing else is ever signalled.
fn postmaster_pid(dir: &Path) -> Option<u32> {
    let data = std::fs::canonicalize(dir.join("data")).ok()?;
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    (cwd == data).then_some(pid)
}

/// SIGKILLs a postmaster and every process it forked, as a machine's death would: its backends
/// each lead a session of their own (they call setsid), so no group signal reaches them, and
/// left alone they would run on until they noticed the postmaster gone. Stopped first, the
/// postmaster forks nothing new while its children are listed.
fn kill_server(postmaster: u32) {
    let _ = sys::signal_process(postmaster, libc::SIGSTOP);
    let children = sys::children_of(postmaster);
    let _ = sys::signal_process(postmaster, sys::SIGKILL);
    for child in children {
        let _ = sys::signal_process(child, sys::SIGKILL);
    }
}

fn parse_members(body: &str) -> Result<Vec<Member>> {
    let cluster: Value = serde_json::from_str(body).context("Patroni's /cluster is not JSON")?;
    let members = cluster["members"].as_array().context("no members in /cluster")?;
    Ok(members
        .iter()
        .map(|m| Member {
            name: m["name"].as_str().unwrap_or_default().to_owned(),
            role: m["role"].as_str().unwrap_or_default().to_owned(),
            state: m["state"].as_str().unwrap_or_default().to_owned(),
            timeline: m["timeline"].as_i64(),
        })
        .collect())
}

/// One node's Patroni configuration (YAML; JSON is YAML, so it is written with serde_json).
fn patroni_config(node: &Node, etcd_host: &str, postgres: &PostgresBinaries, opts: HaOptions) -> String {
    let bin_dir = postgres.postgres.parent().unwrap_or(Path::new("/usr/bin"));
    let mut parameters = serde_json::json!({
        "max_connections": 400,
        "shared_buffers": "128MB",
        "wal_level": "replica",
        "hot_standby": "on",
        "wal_log_hints": "on",
        "max_wal_senders": 10,
        "max_replication_slots": 10,
        // No unix sockets: paths under a deep temp folder can exceed 107 bytes.
        "unix_socket_directories": "",
    });
    if !opts.durable {
        parameters["fsync"] = "off".into();
    }
    let config = serde_json::json!({
        "scope": SCOPE,
        "namespace": "/tally/",
        "name": node.name,
        "log": { "level": "WARNING" },
        "restapi": {
            "listen": format!("127.0.0.1:{}", node.rest_port),
            "connect_address": format!("127.0.0.1:{}", node.rest_port),
        },
        "etcd3": { "hosts": etcd_host },
        "bootstrap": {
            "dcs": {
                "ttl": TTL_S,
                "loop_wait": LOOP_WAIT_S,
                "retry_timeout": RETRY_TIMEOUT_S,
                "maximum_lag_on_failover": 1_048_576,
                // A commit waits for a standby's flush; with no standby, commits wait rather
                // than go unreplicated.
                "synchronous_mode": true,
                "synchronous_mode_strict": true,
                "postgresql": {
                    "use_pg_rewind": true,
                    "use_slots": true,
                    "parameters": parameters,
                },
            },
            "initdb": [{ "encoding": "UTF8" }, { "locale": "C" }, { "auth": "trust" }],
            "pg_hba": [
                "host all all 127.0.0.1/32 trust",
                "host replication all 127.0.0.1/32 trust",
            ],
        },
        "postgresql": {
            "listen": format!("127.0.0.1:{}", node.pg_port),
            "connect_address": format!("127.0.0.1:{}", node.pg_port),
            "data_dir": node.dir.join("data"),
            "bin_dir": bin_dir,
            "pgpass": node.dir.join("pgpass"),
            "authentication": {
                "superuser": { "username": SUPERUSER },
                "replication": { "username": "replicator" },
            },
            "parameters": { "unix_socket_directories": "" },
        },
    });
    serde_json::to_string_pretty(&config).expect("a JSON value renders")
}

/// HAProxy: the read-write port to whichever node answers Patroni's `/primary` with 200, the
/// read-only port round-robin over those answering `/replica`. A node marked down has its
/// sessions cut, so clients reconnect (to the new leader) at once.
fn haproxy_config(nodes: &[Node], rw: u16, ro: u16) -> String {
    let servers: String = nodes
        .iter()
        .map(|n| {
            format!(
                "    server {} 127.0.0.1:{} check port {}\n",
                n.name, n.pg_port, n.rest_port
            )
        })
        .collect();
    let listen = |name: &str, port: u16, check: &str| {
        format!(
            "listen {name}\n    bind 127.0.0.1:{port}\n    balance roundrobin\n    option httpchk OPTIONS {check}\n    \
             http-check expect status 200\n    default-server inter {CHECK_INTERVAL_MS} fall 2 rise 1 on-marked-down shutdown-sessions\n{servers}"
        )
    };
    format!(
        "global\n    maxconn 4000\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30m\n    \
         timeout server 30m\n    timeout check 2s\n\n{}\n{}",
        listen("primary", rw, "/primary"),
        listen("replicas", ro, "/replica"),
    )
}

/// SIGKILLs every Postgres still running from a data folder under `root`: what a previous
/// [`HaPostgres`] whose owner was killed outright leaves behind (Patroni dies with its parent,
/// but starts Postgres in a session of its own). Call it before deleting a stale root.
pub fn kill_orphaned_postmasters(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if let Some(pid) = postmaster_pid(&path) {
            kill_server(pid);
        }
        kill_orphaned_postmasters(&path);
    }
}
